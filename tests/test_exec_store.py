"""The executable store: a warm start loads every compiled step executable instead of tracing and
lowering it, gives the same tokens, and starts afresh when anything that shapes the programs
changes."""

import glob
import os

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
