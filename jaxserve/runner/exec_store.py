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
saves time. Files are written atomically (temporary file, then rename). Entries live in one folder
per process and device set (`p<process>-d<device ids>/<fingerprint>/`), and only the `_KEEP` most
recently used fingerprints of each are kept (each code or configuration change adds one, ~80 MB
for an 8B model's 50 executables).

Trust: an entry is a pickled compiled executable, i.e. code: loading it runs whatever it holds.
The store therefore creates its directories owner-only (0o700) and its files 0o600, and before it
loads an entry it checks the store root, every directory from the root down to the entry's, and
the entry file: each must be owned by the current user (effective uid) and not writable by group
or others, and the entry must be a regular file, not a symbolic link. Each directory below the
root is opened relative to the one above it (symbolic links not followed) and the entry is read
through a descriptor matched to the file that was checked, so nothing can be swapped in between.
Where the check fails the store warns once (naming the path and why) and neither loads nor saves
there: the engine compiles as usual. This keeps other local users from planting code; it does
not protect against anything running as the same user (which can write the store, or the code,
anyway). The directories above the store root are not checked (the root is checked wherever its
path leads). JAX's persistent compilation cache beside the store is JAX's: it gets no such check,
only the owner-only directories `compile.enable_persistent_cache` creates.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import stat
import tempfile
import threading
import warnings

import jax

from jaxserve.runner.compile import makedirs_private


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


class _Untrusted(Exception):
    """A path the store must not load from: `path` and the `reason` why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path} {reason}")
        self.path, self.reason = path, reason


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _check(st: os.stat_result, path: str, want_dir: bool) -> None:
    """Raise `_Untrusted` unless `st` is a directory (or regular file) owned by this user and not
    writable by group or others."""
    if stat.S_ISLNK(st.st_mode):
        raise _Untrusted(path, "is a symbolic link")
    if want_dir and not stat.S_ISDIR(st.st_mode):
        raise _Untrusted(path, "is not a directory")
    if not want_dir and not stat.S_ISREG(st.st_mode):
        raise _Untrusted(path, "is not a regular file")
    if st.st_uid != os.geteuid():
        raise _Untrusted(path, f"is owned by uid {st.st_uid}, not by this user "
                               f"(uid {os.geteuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "other users" if st.st_mode & stat.S_IWOTH else "its group"
        raise _Untrusted(path, f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})")


def _open_trusted_dir(root: str, parts: list[str], create: bool = False) -> int:
    """A descriptor of `root/parts[0]/...`, each directory checked with `_check` (the components
    below the root opened relative to the one above, not following symbolic links). `create`:
    make missing components owner-only. Raises `_Untrusted`, or OSError (FileNotFoundError when a
    component is missing)."""
    if not hasattr(os, "geteuid") or not _NOFOLLOW:
        raise _Untrusted(root, "cannot be checked for its owner on this platform")
    fd = os.open(root, _DIR_FLAGS)
    try:
        _check(os.fstat(fd), root, want_dir=True)
        path = root
        for part in parts:
            path = os.path.join(path, part)
            made = False
            if create:
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                    made = True
                except FileExistsError:
                    pass
            try:
                sub = os.open(part, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if not isinstance(e, FileNotFoundError) and os.path.islink(path):
                    raise _Untrusted(path, "is a symbolic link") from None
                raise
            os.close(fd)
            fd = sub
            if made:
                os.fchmod(fd, 0o700)   # the umask may have taken bits off
            _check(os.fstat(fd), path, want_dir=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


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
        self.root = root
        self.dir = os.path.join(root, slot, self.fingerprint)
        self._parts = [slot, self.fingerprint]
        self.saved = 0
        self._warned = False
        self._warn_lock = threading.Lock()
        # None, or why the store neither loads nor saves here (see the module docstring)
        self.refused: str | None = None
        try:
            makedirs_private(root)
            os.close(_open_trusted_dir(root, [slot], create=True))
            if os.path.lexists(self.dir):
                os.close(_open_trusted_dir(root, self._parts))
        except _Untrusted as e:
            self._refuse(e)
        except OSError as e:
            self.refused = str(e)
            self._warn(f"cannot use {root} ({e}); compiling instead")
        if self.refused is None:
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

    def _open_entry(self, path: str) -> int:
        """A read descriptor of the entry file `path` (in `self.dir`), after the trust check of
        its directories and of the file itself. Raises `_Untrusted` or OSError."""
        if os.path.dirname(path) != self.dir:
            raise _Untrusted(path, "is not in this store's directory")
        name = os.path.basename(path)
        dfd = _open_trusted_dir(self.root, self._parts)
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            _check(st, path, want_dir=False)
            fd = os.open(name, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), dir_fd=dfd)
        finally:
            os.close(dfd)
        try:
            fst = os.fstat(fd)
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                raise _Untrusted(path, "was replaced while being checked")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def load(self, path: str):
        """The executable stored at `path` (from `path()`), or None (thread-safe). Only read after
        the trust check in the module docstring passes."""
        if self.refused is not None:
            return None
        try:
            fd = self._open_entry(path)
        except FileNotFoundError:
            return None
        except _Untrusted as e:
            self._refuse(e)
            return None
        except OSError as e:
            self._warn(f"could not load {path} ({e}); compiling instead")
            return None
        from jax.experimental.serialize_executable import deserialize_and_load
        try:
            with os.fdopen(fd, "rb") as f:
                blob, in_tree, out_tree = pickle.load(f)
            exe = deserialize_and_load(blob, in_tree, out_tree, backend=self.devices[0].client,
                                       execution_devices=self.devices)
        except Exception as e:  # noqa: BLE001 - a bad entry costs a compile, never a failure
            self._warn(f"could not load {path} ({type(e).__name__}: {e}); compiling instead")
            return None
        return exe

    def save(self, path: str, compiled) -> bool:
        """Write `compiled` to `path` (from `path()`), a 0o600 file; False where it cannot be
        (not serializable, or the store refused its directory)."""
        if self.refused is not None:
            return False
        from jax.experimental.serialize_executable import serialize
        try:
            data = pickle.dumps(serialize(compiled), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 - e.g. CPU sorts with a custom comparator: not serializable
            return False
        try:
            os.close(_open_trusted_dir(self.root, self._parts, create=True))
        except _Untrusted as e:
            self._refuse(e)
            return False
        except OSError as e:
            self._warn(f"could not write to {self.dir} ({e})")
            return False
        try:
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")   # 0o600 (less by umask)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(fd, 0o600)
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            self._warn(f"could not write to {self.dir} ({e})")
            return False
        self.saved += 1
        return True

    def _refuse(self, e: _Untrusted) -> None:
        """Stop loading and saving: `e.path` fails the trust check."""
        self.refused = str(e)
        self._warn(f"not loading or saving executables: {e.path} {e.reason} (the store only "
                   f"trusts directories and files owned by this user and writable by it alone: "
                   f"fix the permissions, e.g. chmod 700, or remove it); compiling instead")

    def _warn(self, msg: str) -> None:
        with self._warn_lock:
            if self._warned:
                return
            self._warned = True
        warnings.warn(f"executable store: {msg}", RuntimeWarning, stacklevel=3)
