"""Load a local Hugging Face model directory: `config.json` + `*.safetensors` (single or sharded)."""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import numpy as np

from jaxserve.loading.errors import WeightLoadError
from jaxserve.loading.safetensors_io import SafetensorsFile

INDEX = "model.safetensors.index.json"


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise WeightLoadError("model directory has no config.json", file=cfg_path)
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise WeightLoadError(f"config.json is not valid JSON ({e.msg} at line {e.lineno})",
                              file=cfg_path) from None


def safetensors_files(path: str) -> list[str]:
    index_path = os.path.join(path, INDEX)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise WeightLoadError("corrupt sharded-checkpoint index", file=index_path) from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                tensor = next(t for t, f in weight_map.items() if f == name)
                raise WeightLoadError("missing weights shard listed in the index",
                                      file=name, tensor=tensor)
        return [os.path.join(path, f) for f in files]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        bins = glob.glob(os.path.join(path, "*.bin")) + glob.glob(os.path.join(path, "*.pt"))
        hint = " (PyTorch .bin checkpoints are not read; convert them to safetensors)" if bins else ""
        raise WeightLoadError(f"no *.safetensors weights in the model directory{hint}",
                              file=os.path.join(path, "*.safetensors"))
    return files


def iter_safetensors(path: str) -> Iterator[tuple[str, str, np.ndarray]]:
    for file in safetensors_files(path):
        st = SafetensorsFile(file)
        for name in st.keys():
            yield file, name, st.get(name)
