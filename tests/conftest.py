"""Shared fixtures. The HF transformers reference runs in its own interpreter (one with torch):

  1. $JAXSERVE_REF_PYTHON if set,
  2. .venv-ref/bin/python in the repository (created by `scripts/setup.sh --test`),
  3. this interpreter, if it can import torch (the GPU machine).
It runs once per session and writes tiny checkpoints + reference logits/tokens under a temp dir.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests import parity_cases as pc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    # On a GPU, float32 matmuls default to TF32, whose rounding depends on the batch shape: the
    # tiny random models' greedy tokens then flip between a batched and a solo run. The tests check
    # scheduling and kernels, so they run float32 at full precision everywhere.
    import jax
    if jax.default_backend() == "gpu":
        jax.config.update("jax_default_matmul_precision", "highest")


def reference_python() -> str | None:
    env = os.environ.get("JAXSERVE_REF_PYTHON")
    if env:
        return env
    venv = os.path.join(ROOT, ".venv-ref", "bin", "python")
    if os.path.exists(venv):
        return venv
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    return None


class Reference:
    def __init__(self, root: str):
        self.root = root

    def dir(self, name: str) -> str:
        return os.path.join(self.root, name)

    def npz(self, name: str) -> dict[str, np.ndarray]:
        with np.load(os.path.join(self.root, name, "reference.npz")) as z:
            return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def smollm_path() -> str:
    from jaxserve.loading import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def smollm(smollm_path):
    """The embedded default loaded once (float32 on CPU)."""
    from jaxserve.loading import load_model
    return load_model(smollm_path, dtype="float32")


@pytest.fixture(scope="session")
def smollm_chat_prompts(smollm) -> list[list[int]]:
    from jaxserve.tokenizer import encode_chat
    return [encode_chat(smollm.tokenizer, [{"role": "user", "content": c}]) for c in pc.SMOLLM_CHATS]


def _run_reference(root: str, jobs: list[dict]) -> Reference:
    py = reference_python()
    if py is None:
        pytest.fail("no interpreter with torch for the HF transformers reference: run "
                    "`scripts/setup.sh --test` (creates .venv-ref) or set JAXSERVE_REF_PYTHON")
    plan = os.path.join(root, "plan.json")
    with open(plan, "w") as f:
        json.dump({"jobs": jobs}, f)
    script = os.path.join(ROOT, "tests", "reference", "hf_reference.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([py, script, plan], capture_output=True, text=True, env=env, timeout=1500)
    if proc.returncode != 0:
        pytest.fail(f"HF reference run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return Reference(root)


@pytest.fixture(scope="session")
def hf_reference(tmp_path_factory) -> Reference:
    """Tiny random checkpoints of every family, saved by transformers, and their HF outputs."""
    root = str(tmp_path_factory.mktemp("hf_reference"))
    jobs = []
    for i, (name, cfg) in enumerate(pc.TINY_FAMILIES.items()):
        cfg = {k: v for k, v in cfg.items() if k != "architectures"}
        jobs.append({"kind": "tiny", "name": name, "config": cfg, "seed": 100 + i,
                     "out_dir": os.path.join(root, name), "prompts": pc.tiny_prompts(),
                     "max_new_tokens": pc.TINY_NEW_TOKENS,
                     **({"max_shard_size": "60KB"} if name in pc.SHARDED else {})})
    return _run_reference(root, jobs)


@pytest.fixture(scope="session")
def hf_reference_smollm(tmp_path_factory, smollm_path, smollm_chat_prompts) -> Reference:
    """HF transformers on the embedded SmolLM2 GGUF: greedy chat continuations and tokenization."""
    root = str(tmp_path_factory.mktemp("hf_reference_smollm"))
    jobs = [{"kind": "gguf", "name": "smollm2", "path": smollm_path,
             "out_dir": os.path.join(root, "smollm2"), "prompts": smollm_chat_prompts,
             "max_new_tokens": pc.SMOLLM_NEW_TOKENS},
            {"kind": "tokenize", "name": "tokenizer", "path": smollm_path,
             "out_dir": os.path.join(root, "tokenizer"), "texts": pc.TOKENIZER_TEXTS}]
    return _run_reference(root, jobs)


@pytest.fixture(autouse=True)
def _no_persistent_cache_leaks():
    """JAX's persistent compilation cache is off when a test starts and again when it ends, so a
    test (or a module fixture) that turned it on (an engine built with a cache directory) does not
    leave later tests writing every executable they compile into it: XLA:CPU crashed the process
    compiling interpret-mode Pallas kernels with the cache on. A test that wants the cache turns it
    on itself (`compilation_cache_dir=...`)."""
    _persistent_cache_off()
    yield
    _persistent_cache_off()


def _persistent_cache_off():
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if jax.config.jax_compilation_cache_dir is not None:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()


# The kernel tests (Pallas in interpret mode on the CPU) run first: late in a long session, after
# the server and engine tests, XLA:CPU crashed compiling them (a segfault in
# backend_compile_and_load); alone, or first, they pass.
_FIRST = ("test_pallas_decode", "test_pallas_prefill", "test_pallas_prefill_mgpu",
          "test_skinny_matmul", "test_rms_norm", "test_attention_reference")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        return _FIRST.index(name) if name in _FIRST else len(_FIRST)
    items.sort(key=rank)   # stable: the order within each group is kept
