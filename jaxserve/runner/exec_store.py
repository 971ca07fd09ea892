"""Compiled step executables kept on disk, so that a warm start neither traces nor lowers.

JAX's persistent compilation cache skips XLA's compile, but looking an entry up needs the lowered
program: every start still traces and lowers each step executable (for an 8B model with the
serving defaults, 50 executables and ~18 s of a ~25 s warm start). This store keeps the compiled
executables themselves (`jax.experimental.serialize_executable`), one file per executable, under
a fingerprint of everything that shapes them:

- JAX, jaxlib and flax versions; the backend, its platform version and the devices the runner
  runs on (ids and kinds), the process index;
- the source of the `jaxserve` and `pallas_kernels` packages (any code change starts afresh);
- the runner's configuration (model config, buckets, block size, mesh, attention backend), the
  XLA options it compiles with, and the environment variables that select code paths
  (`JAXSERVE_*`, `XLA_FLAGS`);
- per executable: its key, static arguments and its arguments' shapes, dtypes and shardings.

Anything the store cannot load (missing, written by another fingerprint, unreadable, or an
executable the backend cannot serialize) is lowered and compiled as usual; the store only ever
saves time. Files are written atomically (temporary file, then rename). Entries are pickles, to
be trusted like the XLA cache beside them. Entries live in one folder per process and device set
(`p<process>-d<device ids>/<fingerprint>/`), and only the `_KEEP` most recently used fingerprints
of each are kept (each code or configuration change adds one, ~80 MB for an 8B model's 50
executables).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import tempfile
import warnings

import jax

def enabled() -> bool:
    """Whether engines keep their compiled step executables: on GPUs by default. Not on the CPU:
    XLA:CPU executables that hold interpret-mode Pallas kernels fail after a reload.
    JAXSERVE_EXECUTABLE_STORE=1 / 0 forces it on / off."""
    flag = os.environ.get("JAXSERVE_EXECUTABLE_STORE")
    return flag != "0" if flag else jax.default_backend() == "gpu"


_FORMAT = 1
_KEEP = 4
_ENV_PREFIXES = ("JAXSERVE_", "XLA_FLAGS", "XLA_PYTHON_CLIENT_")
_SOURCE_PACKAGES = ("jaxserve", "pallas_kernels")


def _source_digest() -> str:
    """sha256 over the .py files of the packages whose code the executables are traced from."""
    h = hashlib.sha256()
    for name in _SOURCE_PACKAGES:
        spec = importlib.util.find_spec(name)   # imported or not (kernels import lazily)
        if spec is None or not spec.origin:
            continue
        root = os.path.dirname(spec.origin)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for fn in sorted(filenames):
                if fn.endswith(".py"):
                    path = os.path.join(dirpath, fn)
                    h.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as f:
                        h.update(f.read())
    return h.hexdigest()


def _describe_args(args, static: dict) -> str:
    def leaf(a):
        return (tuple(getattr(a, "shape", ())), str(getattr(a, "dtype", type(a).__name__)),
                str(getattr(a, "sharding", None)))
    return repr((str(jax.tree.structure(args)), [leaf(a) for a in jax.tree.leaves(args)],
                 sorted(static.items())))


class ExecutableStore:
    """Load/save compiled executables for one runner configuration (`describe`: text naming it)."""

    def __init__(self, root: str, describe: str, devices):
        import flax
        import jaxlib

        self.devices = list(devices)
        backend = self.devices[0].client
        parts = [f"format {_FORMAT}", jax.__version__, jaxlib.__version__, flax.__version__,
                 backend.platform, backend.platform_version,
                 repr([(d.id, d.device_kind) for d in self.devices]), f"process {jax.process_index()}",
                 _source_digest(), describe,
                 repr(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))]
        self.fingerprint = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]
        # one folder per (process, devices): data-parallel replicas and the processes of a job
        # sharing a cache directory keep (and prune) their own entries
        slot = f"p{jax.process_index()}-d" + "-".join(str(d.id) for d in self.devices)
        self.dir = os.path.join(root, slot, self.fingerprint)
        self.saved = 0
        self._warned = False
        self._prune(os.path.join(root, slot))
        if backend.platform in ("gpu", "cuda", "rocm"):
            try:   # sets the path Mosaic GPU kernels' host code needs when an executable is loaded
                importlib.import_module("jax.experimental.mosaic.gpu")
            except ImportError:
                pass

    def _prune(self, root: str) -> None:
        """Mark this fingerprint as used now; delete all but the `_KEEP` most recently used."""
        import shutil
        try:
            os.makedirs(root, exist_ok=True)
            if os.path.isdir(self.dir):
                os.utime(self.dir)
            dirs = [os.path.join(root, d) for d in os.listdir(root)]
        except OSError:
            return
        dirs = sorted((d for d in dirs if os.path.isdir(d) and d != self.dir),
                      key=os.path.getmtime, reverse=True)
        for d in dirs[_KEEP - 1:]:
            shutil.rmtree(d, ignore_errors=True)

    def path(self, key: tuple, args, static: dict) -> str:
        """The file of the executable for this key, these arguments and static arguments."""
        name = hashlib.sha256((repr(key) + _describe_args(args, static)).encode()).hexdigest()[:40]
        return os.path.join(self.dir, name + ".exe")

    def load(self, path: str):
        """The executable stored at `path` (from `path()`), or None (thread-safe)."""
        if not os.path.exists(path):
            return None
        from jax.experimental.serialize_executable import deserialize_and_load
        try:
            with open(path, "rb") as f:
                blob, in_tree, out_tree = pickle.load(f)
            exe = deserialize_and_load(blob, in_tree, out_tree, backend=self.devices[0].client,
                                       execution_devices=self.devices)
        except Exception as e:  # noqa: BLE001 - a bad entry costs a compile, never a failure
            self._warn(f"could not load {path} ({type(e).__name__}: {e}); compiling instead")
            return None
        return exe

    def save(self, path: str, compiled) -> bool:
        from jax.experimental.serialize_executable import serialize
        try:
            data = pickle.dumps(serialize(compiled), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - e.g. CPU sorts with a custom comparator: not serializable
            return False
        try:
            os.makedirs(self.dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            self._warn(f"could not write to {self.dir} ({e})")
            return False
        self.saved += 1
        return True

    def _warn(self, msg: str) -> None:
        if not self._warned:
            warnings.warn(f"executable store: {msg}", RuntimeWarning, stacklevel=3)
            self._warned = True
