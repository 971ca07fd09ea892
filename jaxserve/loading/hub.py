"""Resolve a Hugging Face hub id (`Qwen/Qwen2.5-7B-Instruct`) to a local snapshot directory.

Uses huggingface_hub's cache. `HF_HUB_OFFLINE=1` (read at call time) means: use the cache only, and
if the model is not there, fail with a message that names the model and says how to get it.
"""

from __future__ import annotations

import os
import re

from jaxserve.loading.errors import ModelNotFoundError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
ALLOW = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
_TRUE = {"1", "true", "yes", "on"}


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not os.path.exists(name)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def resolve_hub_model(repo_id: str, *, revision: str | None = None,
                      cache_dir: str | None = None, config_only: bool = False) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE") or None
    offline = hub_offline()
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                 local_files_only=offline,
                                 allow_patterns=["config.json"] if config_only else ALLOW)
    except LocalEntryNotFoundError:
        if offline:
            raise ModelNotFoundError(
                f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                f"set: download it first (`huggingface-cli download {repo_id}` with network), unset "
                f"HF_HUB_OFFLINE, or pass a local model directory") from None
        raise ModelNotFoundError(
            f"model {repo_id!r} could not be downloaded from the Hugging Face hub (no network?) and "
            f"is not cached: check the name and connectivity, or pass a local model directory") from None
    except Exception as e:  # RepositoryNotFoundError, GatedRepoError, HTTP errors
        raise ModelNotFoundError(f"model {repo_id!r} could not be fetched from the Hugging Face hub: "
                                 f"{type(e).__name__}") from None
