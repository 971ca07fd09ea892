"""A streaming safetensors reader.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
data_offsets) and the raw little-endian tensor bytes. We memory-map the file and hand out one tensor
at a time as a numpy view, so loading never holds more than the tensor being converted in host
memory. bfloat16/float8 use the `ml_dtypes` types that JAX itself uses. Every inconsistency
(truncated file, bad header, offsets past the end, size/shape mismatch) raises `WeightLoadError`
naming the file and tensor.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

from jaxserve.loading.errors import WeightLoadError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise WeightLoadError("truncated safetensors file (no header)", file=self.path)
                (n,) = struct.unpack("<Q", raw)
                if n > _MAX_HEADER or 8 + n > size:
                    raise WeightLoadError("corrupt safetensors header length", file=self.path)
                header = json.loads(f.read(n))
        except FileNotFoundError:
            raise WeightLoadError("missing weights file", file=self.path) from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WeightLoadError("corrupt safetensors header (not JSON)", file=self.path) from None
        if not isinstance(header, dict):
            raise WeightLoadError("corrupt safetensors header", file=self.path)
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self._data_len = size - self._data_start
        self.header: dict[str, dict] = header
        self._mm: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        info = self.header.get(name)
        if info is None:
            raise WeightLoadError("tensor not in file", file=self.path, tensor=name)
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]])
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise WeightLoadError(f"unsupported or malformed entry {info!r}", file=self.path,
                                  tensor=name) from None
        count = int(np.prod(shape, dtype=np.int64))
        if end < begin or end > self._data_len or end - begin != count * dtype.itemsize:
            raise WeightLoadError("tensor bytes out of range or size does not match its shape "
                                  "(corrupt or truncated file)", file=self.path, tensor=name)
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[self._data_start + begin : self._data_start + end]
        return raw.view(dtype).reshape(shape)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.header:
            yield name, self.get(name)
