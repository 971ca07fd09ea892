"""Typed loading errors. Messages name the file and tensor at fault, never an object address."""

from __future__ import annotations

import os


class WeightLoadError(ValueError):
    """A checkpoint could not be turned into model parameters."""

    def __init__(self, message: str, *, file: str | os.PathLike | None = None,
                 tensor: str | None = None):
        where = []
        if file is not None:
            where.append(f"file {os.path.basename(os.fspath(file))!r}")
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.file = None if file is None else os.fspath(file)
        self.tensor = tensor


class ModelNotFoundError(FileNotFoundError):
    """The model named by the user is neither a local path nor reachable/cached on the hub."""
