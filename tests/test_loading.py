"""Every way weights get in, and the errors for broken checkpoints (which name file and tensor)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxserve.loading import ModelNotFoundError, WeightLoadError, load_model
from jaxserve.loading.orbax_io import save_orbax
from jaxserve.runner.generate import GreedyGenerator
from tests import parity_cases as pc

PROMPT = pc.tiny_prompts()[4]


def _greedy(lm, n=8):
    return GreedyGenerator(lm.model).generate(PROMPT, n, return_logits=True)


@pytest.fixture
def llama_dir(hf_reference, tmp_path):
    d = tmp_path / "llama"
    shutil.copytree(hf_reference.dir("llama"), d)
    os.remove(d / "reference.npz")
    return d


def test_sharded_index_checkpoint_loads(hf_reference):
    d = hf_reference.dir("llama3_tied")
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    lm = load_model(d, dtype="float32")
    assert lm.config.tie_word_embeddings and lm.config.rope.rope_type == "llama3"


def test_bfloat16_target_dtype(llama_dir):
    lm = load_model(str(llama_dir), dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(lm.model, nnx.Param)))
    ref = load_model(str(llama_dir), dtype="float32")
    a = _greedy(lm).prompt_logits
    b = _greedy(ref).prompt_logits
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()  # bf16 rounding only


def test_hub_id_from_local_cache(llama_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--acme--tiny-llama" / "snapshots" / commit
    shutil.copytree(llama_dir, snap)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lm = load_model("acme/tiny-llama", dtype="float32")
    direct = load_model(str(llama_dir), dtype="float32")
    assert _greedy(lm).token_ids == _greedy(direct).token_ids
    with pytest.raises(ModelNotFoundError) as e:
        load_model("acme/not-cached", dtype="float32")
    assert "acme/not-cached" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)


def test_dummy_weights_have_real_shapes(llama_dir):
    real = load_model(str(llama_dir), dtype="float32")
    dummy = load_model(str(llama_dir), dtype="float32", load_format="dummy")
    rs = nnx.to_pure_dict(nnx.state(real.model, nnx.Param))
    ds = nnx.to_pure_dict(nnx.state(dummy.model, nnx.Param))
    assert jax.tree.map(lambda x: x.shape, rs) == jax.tree.map(lambda x: x.shape, ds)
    assert not np.allclose(rs["embed"], ds["embed"])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ds))
    assert len(_greedy(dummy).token_ids) == 8


def test_dummy_preset_needs_no_files():
    lm = load_model("smollm2-135m", load_format="dummy", dtype="float32")
    assert lm.config.num_layers == 30 and lm.tokenizer is None


def test_orbax_roundtrip(llama_dir, tmp_path):
    lm = load_model(str(llama_dir), dtype="float32")
    out = save_orbax(lm.model, lm.hf_config, str(tmp_path / "converted"))
    back = load_model(out)
    assert back.source == out
    np.testing.assert_array_equal(_greedy(back).prompt_logits, _greedy(lm).prompt_logits)
    # a checkpoint converted by a version with another parameter layout is refused clearly
    marker = os.path.join(out, "jaxserve_checkpoint.json")
    with open(marker) as f:
        m = json.load(f)
    del m["layout"]
    with open(marker, "w") as f:
        json.dump(m, f)
    with pytest.raises(WeightLoadError, match="layout 1.*jaxserve convert"):
        load_model(out)


def test_cli_convert_then_generate_with_tokenizer(smollm_path, tmp_path):
    from jaxserve.cli import main
    out = tmp_path / "smol-orbax"
    assert main(["convert", "--model", smollm_path, "--output", str(out), "--dtype", "bfloat16"]) == 0
    lm = load_model(str(out))
    assert lm.tokenizer is not None and lm.tokenizer.chat_template
    assert lm.config.num_layers == 30


# -- broken checkpoints ---------------------------------------------------------------------------

def _only_file(d):
    (f,) = [x for x in os.listdir(d) if x.endswith(".safetensors")]
    return d / f


def test_missing_directory_and_weights(tmp_path):
    with pytest.raises((ModelNotFoundError, WeightLoadError)):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(pc.TINY_FAMILIES["llama"]))
    with pytest.raises(WeightLoadError, match=r"no \*\.safetensors"):
        load_model(str(tmp_path / "empty"))


def test_truncated_file_names_file_and_tensor(llama_dir):
    f = _only_file(llama_dir)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightLoadError) as e:
        load_model(str(llama_dir))
    assert f.name in str(e.value) and "tensor '" in str(e.value)


def test_garbage_header(llama_dir):
    f = _only_file(llama_dir)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    with pytest.raises(WeightLoadError, match="header") as e:
        load_model(str(llama_dir))
    assert f.name in str(e.value)


def test_unknown_and_missing_tensors(llama_dir):
    f = _only_file(llama_dir)
    tensors = load_file(str(f))
    tensors["model.layers.0.mlp.extra_proj.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(f))
    with pytest.raises(WeightLoadError, match="unknown tensor name") as e:
        load_model(str(llama_dir))
    assert "model.layers.0.mlp.extra_proj.weight" in str(e.value) and f.name in str(e.value)
    del tensors["model.layers.0.mlp.extra_proj.weight"]
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(f))
    with pytest.raises(WeightLoadError, match="missing 1 tensor") as e:
        load_model(str(llama_dir))
    assert "model.layers.1.self_attn.k_proj.weight" in str(e.value)


def test_shape_mismatch_names_tensor(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightLoadError, match="does not match") as e:
        load_model(str(llama_dir))
    assert "mlp" in str(e.value) and ".safetensors" in str(e.value)


def test_missing_shard(hf_reference, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(hf_reference.dir("llama3_tied"), d)
    shard = sorted(x for x in os.listdir(d) if x.endswith(".safetensors"))[-1]
    os.remove(d / shard)
    with pytest.raises(WeightLoadError, match="missing weights shard") as e:
        load_model(str(d))
    assert shard in str(e.value)


def test_unsupported_architecture(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Qwen3ForCausalLM"):
        load_model(str(llama_dir))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(WeightLoadError, match="bad.gguf"):
        load_model(str(bad))
