"""Compilation management: persistent XLA cache, and a counter of compilations after warm-up.

The counter listens to JAX's public monitoring events: one `/jax/core/compile/jaxpr_to_mlir_module`
event fires per lowering of any jitted computation (whether or not the persistent cache then
supplies the executable). After warm-up, steady serving must add none.
"""

from __future__ import annotations

import os
import threading

import jax

_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_lock = threading.Lock()
_count = 0
_installed = False


def _listener(event: str, duration: float, **kwargs) -> None:
    global _count
    if event == _LOWERING_EVENT:
        with _lock:
            _count += 1


def install_compile_listener() -> None:
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _installed = True


def total_compiles() -> int:
    return _count


class CompileCounter:
    """`compiles_after_warmup`: lowerings in this process since `mark_warm()`."""

    def __init__(self) -> None:
        install_compile_listener()
        self._baseline: int | None = None

    def mark_warm(self) -> None:
        self._baseline = total_compiles()

    @property
    def compiles_after_warmup(self) -> int:
        return 0 if self._baseline is None else total_compiles() - self._baseline


def default_cache_dir() -> str:
    return os.environ.get("JAXSERVE_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxserve", "xla")


def makedirs_private(path: str) -> None:
    """`os.makedirs(path, exist_ok=True)`, creating every missing directory owner-only (0o700,
    whatever the umask). Directories that already exist are left as they are."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
            continue   # created meanwhile by someone else: not ours to change
        os.chmod(d, 0o700)   # the umask may have taken bits off (it never adds any)


def enable_persistent_cache(cache_dir: str | None = "auto") -> str | None:
    """Turn on JAX's persistent compilation cache (None or "" disables). The directory, and any
    missing parent, is created owner-only (0o700); an existing one keeps its permissions."""
    if not cache_dir:
        return None
    path = default_cache_dir() if cache_dir == "auto" else cache_dir
    makedirs_private(path)
    jax.config.update("jax_compilation_cache_dir", path)
    # every executable, however quick to compile: a warm start then compiles nothing
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path
