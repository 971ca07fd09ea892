"""The executable store: a warm start loads every compiled step executable instead of tracing and
lowering it, gives the same tokens, and starts afresh when anything that shapes the programs
changes."""

import glob
import os
import pickle
import re
import stat

import jax
import jax.numpy as jnp
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.runner.compile import total_compiles
from tests.engine_fixtures import tiny_loaded

STORE = "jaxserve-executables"


def _build(cache_dir, backend="reference"):
    if backend == "pallas-mosaic":   # bf16, 128-wide heads, 16-token pages: Mosaic GPU prefill
        lm = tiny_loaded(dtype=jnp.bfloat16, hidden_size=256, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=128)
        return LLM(lm, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
                   block_size=16, num_kv_blocks=32, attention_backend="pallas",
                   compilation_cache_dir=str(cache_dir), show_progress=False)
    return LLM(tiny_loaded(), max_model_len=64, max_num_seqs=4, max_num_batched_tokens=16,
               block_size=4, num_kv_blocks=32, attention_backend=backend,
               compilation_cache_dir=str(cache_dir), show_progress=False)


def _outputs(llm):
    prompts = [{"prompt_token_ids": [3, 4, 5]}, {"prompt_token_ids": list(range(10, 31))}]
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=8, ignore_eos=True,
                             logprobs=2)]
    outs = []
    for sp in params:   # greedy, then seeded top-p with logprobs (the "full" sampler)
        for o in llm.generate(prompts, sp, use_tqdm=False):
            c = o.outputs[0]
            outs.append((c.token_ids, None if c.logprobs is None else
                         [sorted((t, round(x.logprob, 5)) for t, x in d.items()) for d in c.logprobs]))
    return outs


def _files(cache_dir):
    return glob.glob(os.path.join(str(cache_dir), STORE, "*", "*", "*.exe"))


@pytest.fixture(autouse=True)
def _store_on(monkeypatch):
    # on by default only on GPUs; the CPU's jnp-attention executables reload fine
    monkeypatch.setenv("JAXSERVE_EXECUTABLE_STORE", "1")


_GPU_ONLY = pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason="GPU only: XLA:CPU executables holding interpret-mode Pallas kernels fail after a "
           "reload, so the store is off on the CPU for them")


@pytest.mark.parametrize("backend", [
    "reference", pytest.param("pallas", marks=_GPU_ONLY),
    pytest.param("pallas-mosaic", marks=_GPU_ONLY)])
def test_warm_start_loads_every_executable_and_lowers_none(tmp_path, backend):
    first = _build(tmp_path, backend)
    ws = first.engine.runner.warmup_seconds
    assert ws["loaded"] == 0 and ws["saved"] == ws["executables"] > 0
    assert len(_files(tmp_path)) == ws["executables"]
    want = _outputs(first)
    first.shutdown()

    before = total_compiles()
    second = _build(tmp_path, backend)
    ws2 = second.engine.runner.warmup_seconds
    assert ws2["loaded"] == ws2["executables"] == ws["executables"] and ws2["saved"] == 0
    # lowerings during the second start-up: only the small slot-fill helper (not a step executable)
    lowered = total_compiles() - before
    assert lowered <= 2, lowered
    assert _outputs(second) == want
    assert second.get_stats()["compiles_after_warmup"] == 0
    second.shutdown()


def test_store_starts_afresh_when_the_environment_changes(tmp_path, monkeypatch):
    _build(tmp_path).shutdown()
    n = len(_files(tmp_path))
    monkeypatch.setenv("JAXSERVE_TEST_STORE_KEY", "1")   # any JAXSERVE_* variable is in the key
    llm = _build(tmp_path)
    ws = llm.engine.runner.warmup_seconds
    assert ws["loaded"] == 0 and ws["saved"] == ws["executables"]
    assert len(_files(tmp_path)) == 2 * n
    llm.shutdown()


def test_unreadable_entries_are_compiled_instead(tmp_path):
    first = _build(tmp_path)
    want = _outputs(first)
    first.shutdown()
    files = _files(tmp_path)
    for path in files:   # (every one: XLA:CPU can fail to run reloaded and fresh executables mixed)
        with open(path, "wb") as f:
            f.write(b"not an executable")
    with pytest.warns(RuntimeWarning, match="executable store"):
        llm = _build(tmp_path)
    ws = llm.engine.runner.warmup_seconds
    assert ws["loaded"] == 0 and ws["saved"] == ws["executables"] == len(files)
    assert _outputs(llm) == want
    llm.shutdown()


def test_store_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_EXECUTABLE_STORE", "0")
    llm = _build(tmp_path)
    assert llm.engine.runner.warmup_seconds["saved"] == 0 and not _files(tmp_path)
    llm.shutdown()


def test_only_the_most_recent_fingerprints_are_kept(tmp_path, monkeypatch):
    from jaxserve.runner import exec_store
    monkeypatch.setattr(exec_store, "_KEEP", 2)
    dirs = []
    for i in range(3):
        monkeypatch.setenv("JAXSERVE_TEST_STORE_KEY", str(i))
        llm = _build(tmp_path)
        dirs.append(os.path.dirname(_files(tmp_path)[0]) if i == 0 else
                    next(d for d in glob.glob(os.path.join(str(tmp_path), STORE, "*", "*"))
                         if d not in dirs))
        llm.shutdown()
    left = sorted(glob.glob(os.path.join(str(tmp_path), STORE, "*", "*")))
    assert left == sorted(dirs[1:])   # the oldest fingerprint is gone, the last two stay


def test_replicas_on_other_devices_keep_their_own_entries(tmp_path, monkeypatch):
    # data-parallel replicas (or processes) sharing a cache directory: pruning one device set's
    # fingerprints leaves the others' alone
    import types

    from jaxserve.runner import exec_store
    monkeypatch.setattr(exec_store, "_KEEP", 1)
    dev = jax.devices()[0]
    other = types.SimpleNamespace(id=dev.id + 7, device_kind=dev.device_kind, client=dev.client)
    stores = [exec_store.ExecutableStore(str(tmp_path), "config", [d]) for d in (dev, other)]
    for st in stores:
        os.makedirs(st.dir)
    exec_store.ExecutableStore(str(tmp_path), "config", [dev])         # same slot, same key
    newer = exec_store.ExecutableStore(str(tmp_path), "other config", [other])
    assert os.path.isdir(stores[0].dir)                 # the first device set's entries stay
    assert not os.path.isdir(stores[1].dir)             # the other set kept only its newest
    assert os.path.dirname(newer.dir) == os.path.dirname(stores[1].dir) != os.path.dirname(stores[0].dir)


# --- trust boundary: entries are pickles (code), loaded only from directories only we can write ---

def _run_marker(path):
    open(path, "w").close()


class _Planted:
    """A pickle that, once unpickled, creates the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return _run_marker, (self.marker,)


def _store(root):
    from jaxserve.runner import exec_store
    return exec_store.ExecutableStore(str(root), "config", jax.devices()[:1])


def _plant(store, tmp_path):
    """A planted entry (0o600, ours) in the store's fingerprint directory: its path, the
    marker."""
    os.makedirs(store.dir, exist_ok=True)
    os.chmod(store.dir, 0o700)
    entry = store.path(("planted",), (), {})
    marker = tmp_path / "unpickled"
    with open(entry, "wb") as f:
        pickle.dump(_Planted(marker), f)
    os.chmod(entry, 0o600)
    return entry, marker


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def test_a_planted_entry_in_our_own_directory_is_unpickled(tmp_path, umask):
    # the control: the check does not refuse everything, so the tests below can fail
    store = _store(tmp_path / "store")
    entry, marker = _plant(store, tmp_path)
    with pytest.warns(RuntimeWarning, match="could not load"):
        assert store.load(entry) is None   # it unpickles to no executable
    assert marker.exists()


@pytest.mark.parametrize("which,mode,reason", [
    ("root", 0o777, "writable by other users"), ("slot", 0o775, "writable by its group"),
    ("dir", 0o757, "writable by other users"), ("entry", 0o666, "writable by other users")],
    ids=["root-777", "slot-775", "dir-757", "entry-666"])
def test_a_planted_entry_where_others_can_write_is_not_unpickled(tmp_path, umask, which, mode,
                                                                 reason):
    store = _store(tmp_path / "store")
    entry, marker = _plant(store, tmp_path)
    bad = {"root": store.root, "slot": os.path.dirname(store.dir), "dir": store.dir,
           "entry": entry}[which]
    os.chmod(bad, mode)
    # found when loading (the directories were fine when the store started) ...
    with pytest.warns(RuntimeWarning, match=re.escape(f"{bad} is {reason}")):
        assert store.load(entry) is None
    assert not marker.exists() and store.refused
    # ... or by a store started afterwards (on starting, or on its first load for the entry):
    # it then neither loads nor saves there
    with pytest.warns(RuntimeWarning, match=re.escape(f"{bad} is {reason}")):
        late = _store(tmp_path / "store")
        assert late.load(entry) is None
    assert late.refused and not marker.exists()
    compiled = jax.jit(lambda x: x + 1).lower(jnp.ones(3)).compile()
    assert not late.save(late.path(("k",), (), {}), compiled)
    assert sorted(os.listdir(store.dir)) == [os.path.basename(entry)]
    assert _mode(bad) == mode   # left as it was


def test_entries_owned_by_another_user_are_not_unpickled(tmp_path, umask, monkeypatch):
    store = _store(tmp_path / "store")
    entry, marker = _plant(store, tmp_path)
    euid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: euid + 1)   # everything is now someone else's
    with pytest.warns(RuntimeWarning,
                      match=re.escape(f"{store.root} is owned by uid {euid}, not by this")):
        assert store.load(entry) is None
    assert not marker.exists()


@pytest.mark.parametrize("which", ["entry", "dir"])
def test_symbolic_links_are_not_followed(tmp_path, umask, which):
    store = _store(tmp_path / "store")
    entry, marker = _plant(store, tmp_path)
    if which == "entry":    # the entry links to a file of ours elsewhere
        os.rename(entry, tmp_path / "elsewhere.exe")
        os.symlink(tmp_path / "elsewhere.exe", entry)
        link = entry
    else:                   # the fingerprint directory links to a directory of ours elsewhere
        link = store.dir
        os.rename(store.dir, tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", store.dir)
    with pytest.warns(RuntimeWarning, match=re.escape(f"{link} is a symbolic link")):
        assert store.load(entry) is None
    assert not marker.exists()


@pytest.mark.parametrize("mask", [0o022, 0o222], ids=["umask-022", "umask-222"])
def test_directories_are_created_owner_only(tmp_path, umask, mask):
    from jaxserve.runner.compile import enable_persistent_cache
    umask(mask)
    keep = {k: getattr(jax.config, k)
            for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
    try:
        path = enable_persistent_cache(str(tmp_path / "x" / "xla"))
    finally:
        for k, v in keep.items():
            jax.config.update(k, v)
    assert _mode(tmp_path / "x") == _mode(path) == 0o700
    store = _store(os.path.join(path, STORE))
    compiled = jax.jit(lambda x: x + 1).lower(jnp.ones(3)).compile()
    entry = store.path(("k",), (), {})
    assert store.save(entry, compiled) and not store.refused
    for d in (store.root, os.path.dirname(store.dir), store.dir):
        assert _mode(d) == 0o700, d
    assert _mode(entry) == 0o600
    # and it loads what it saved (not run: XLA:CPU may not run a reloaded executable next to
    # fresh ones of the same process)
    assert store.load(entry) is not None


def test_an_existing_cache_directory_keeps_its_permissions(tmp_path, umask):
    from jaxserve.runner.compile import makedirs_private
    os.mkdir(tmp_path / "mine", 0o755)
    makedirs_private(str(tmp_path / "mine"))
    assert _mode(tmp_path / "mine") == 0o755   # not writable by others: the store trusts it
    store = _store(tmp_path / "mine")
    assert not store.refused
