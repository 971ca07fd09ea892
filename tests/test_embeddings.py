"""Embeddings: the Embedder against an independent forward, its packing and compiles, `LLM.embed`,
and POST /v1/embeddings through the official `openai` client."""

import asyncio
import base64

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxserve.attention import build_metadata, get_backend
from jaxserve.engine.embed import Embedder, PoolerConfig
from jaxserve.engine.outputs import InvalidRequestError
from jaxserve.kv_cache.cache import allocate_kv_cache
from tests.engine_fixtures import tiny_loaded
from tests.server_fixtures import API_KEY, MAX_MODEL_LEN, MODEL, LiveServer, tiny_chat_model

HDR = {"Authorization": f"Bearer {API_KEY}"}


class Reference:
    """Final hidden states of one sequence through the documented JAX pipeline
    (docs/jax_pipelines.md): the plain-gather backend, one sequence, its own cache. Inputs are
    padded to one token count so the reference compiles once."""

    def __init__(self, model, num_tokens: int = 256, block_size: int = 16):
        self.graphdef, self.params = nnx.split(model)
        self.cfg, self.t, self.b = model.config, num_tokens, block_size
        backend = get_backend("gather")

        @jax.jit
        def forward(params, kv, ids, positions, meta):
            hidden, _ = nnx.merge(self.graphdef, params)(ids, positions, kv, meta, backend)
            return hidden

        self.forward = forward

    def hidden(self, ids: list[int]) -> np.ndarray:   # [n, D]
        n, pages = len(ids), self.t // self.b
        kv = allocate_kv_cache(self.cfg, pages + 1, self.b, jnp.float32)
        meta, pos = build_metadata([(list(range(1, 1 + -(-n // self.b))), 0, n)], block_size=self.b,
                                   num_tokens=self.t, num_seqs=1, max_blocks_per_seq=pages)
        padded = np.zeros(self.t, np.int32)
        padded[:n] = ids
        return np.asarray(self.forward(self.params, kv, padded, pos, meta))[:n]

    def pooled(self, ids: list[int], pooling: str = "LAST", normalize: bool = True) -> np.ndarray:
        h = self.hidden(ids)
        v = {"LAST": h[-1], "MEAN": h.mean(0), "CLS": h[0]}[pooling]
        return v / np.linalg.norm(v) if normalize else v


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded(seed=3)


@pytest.fixture(scope="module")
def ref(tiny):
    return Reference(tiny.model, num_tokens=96, block_size=8)


# lengths across page (8) and call (32 tokens) edges; 70 and 96 span several calls
LENGTHS = [1, 5, 8, 9, 31, 32, 33, 70, 96]


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 128, n).tolist() for n in LENGTHS]


def _embedder(model, **kw) -> Embedder:
    return Embedder(model, **{**dict(max_model_len=96, block_size=8, max_tokens_per_call=32,
                                     max_seqs_per_call=4, backend="reference"), **kw})


@pytest.mark.parametrize("pooling", ["LAST", "MEAN", "CLS"])
@pytest.mark.parametrize("normalize", [True, False])
def test_embedding_is_the_pooled_final_hidden_state(tiny, ref, inputs, pooling, normalize):
    e = _embedder(tiny.model)
    got = e.embed(inputs, pooling_type=pooling, normalize=normalize)
    for ids, vec in zip(inputs, got):
        assert vec.shape == (64,) and vec.dtype == np.float32
        np.testing.assert_allclose(vec, ref.pooled(ids, pooling, normalize), rtol=1e-5, atol=2e-6)


def test_batched_equals_one_by_one_and_compiles_are_bounded(tiny, inputs):
    e = _embedder(tiny.model)
    together = e.embed(inputs)
    first = e.lowerings
    assert 0 < first <= len(e.buckets) + 2      # a forward per bucket, the cache, the zero carry
    alone = [e.embed([x])[0] for x in inputs]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
    mixed = e.embed(inputs[::-1] + inputs, pooling_type="MEAN", normalize=[True, False] * 9)
    assert e.lowerings == first                  # every bucket was compiled already
    assert np.isclose(np.linalg.norm(mixed[0]), 1.0) and not np.isclose(np.linalg.norm(mixed[1]), 1.0)


def test_weights_are_shared_not_copied(tiny):
    e = _embedder(tiny.model)
    own = jax.tree.leaves(nnx.state(tiny.model))
    assert len(e.params) == len(own) and all(a is b for a, b in zip(e.params, own))


def test_packing_keeps_calls_bounded_and_one_input_spanning(tiny):
    e = _embedder(tiny.model)
    lengths = [3, 100 - 4, 40, 2, 32, 17, 1, 1, 1, 1, 1, 64]
    calls = e.plan(lengths)
    seen = {}
    for chunks in calls:
        assert sum(c.take for c in chunks) <= 32 and len(chunks) <= 4
        for row, c in enumerate(chunks):
            assert c.start == seen.get(c.index, 0)          # in order, no gaps
            seen[c.index] = c.start + c.take
            if c.start > 0 or c.start + c.take < lengths[c.index]:
                assert row == 0                             # spans calls: always row 0
    assert seen == dict(enumerate(lengths))


def test_invalid_inputs(tiny):
    e = _embedder(tiny.model)
    with pytest.raises(InvalidRequestError, match="input 1 is empty"):
        e.embed([[1], []])
    with pytest.raises(InvalidRequestError, match=r"token id 128 is outside the vocabulary \[0, 128\)"):
        e.embed([[1, 128]])
    with pytest.raises(InvalidRequestError, match="-1"):
        e.embed([[-1]])
    with pytest.raises(InvalidRequestError, match="97 tokens, more than the 96"):
        e.embed([[1] * 97])
    with pytest.raises(InvalidRequestError, match="integers"):
        e.embed([[True, 2]])
    with pytest.raises(ValueError, match="pooling_type"):
        e.embed([[1]], pooling_type="MAX")
    assert e.embed([]) == []
    # a long max_model_len is capped for embedding inputs (the private cache holds one input)
    capped = _embedder(tiny.model, max_model_len=20000)
    assert capped.max_input_len == 8192 and capped.num_pages < 8192 // 8 + 32 // 8 + 4 + 2
    with pytest.raises(InvalidRequestError, match="8193 tokens, more than the 8192 this server "
                                                  "embeds \\(the embedding input limit\\)"):
        capped.check([[1] * 8193])


def test_pooler_config_parse():
    assert PoolerConfig.parse(None) == PoolerConfig("LAST", True)
    assert PoolerConfig.parse("mean") == PoolerConfig("MEAN", True)
    assert PoolerConfig.parse('{"pooling_type": "CLS", "normalize": false}') == PoolerConfig("CLS", False)
    for bad in ('{"pooling_type": "MAX"}', '{"normalise": true}', "{not json", '{"normalize": "no"}'):
        with pytest.raises(ValueError):
            PoolerConfig.parse(bad)


def test_llm_embed_uses_the_engine_weights(tiny, ref):
    from jaxserve import LLM
    llm = LLM(tiny, max_model_len=96, max_num_seqs=4, max_num_batched_tokens=32, block_size=8,
              num_kv_blocks=40, compilation_cache_dir=None, show_progress=False)
    prompts = [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": list(range(2, 60))}]
    vecs = llm.embed(prompts)
    assert [v.shape for v in vecs] == [(64,), (64,)]
    for p, v in zip(prompts, vecs):
        np.testing.assert_allclose(v, ref.pooled(p["prompt_token_ids"]), rtol=1e-5, atol=2e-6)
    runner = set(map(id, llm.engine.runner.params))
    assert all(id(a) in runner for a in llm._embedder.params)   # the runner's arrays, no copy
    mean = llm.embed(prompts[0], pooling_type="MEAN", normalize=False)[0]
    np.testing.assert_allclose(mean, ref.pooled([5, 6, 7], "MEAN", False), rtol=1e-5, atol=2e-6)
    # generation is unaffected
    assert llm.generate(prompts[:1])[0].finished


# -- the server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live(smollm):
    with LiveServer(tiny_chat_model(smollm.tokenizer)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(live):
    import openai
    return openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def live_ref(live):
    return Reference(live.engine.core.lm.model, num_tokens=MAX_MODEL_LEN)


def test_openai_client_embeddings(live, client, live_ref):
    tok = live.engine.tokenizer
    text = "The quick brown fox jumps over the lazy dog."
    ids = tok.encode(text)
    # the client asks for base64 unless told otherwise and decodes it to floats
    r = client.embeddings.create(model=MODEL, input=text)
    assert r.object == "list" and r.model == MODEL and len(r.data) == 1
    assert r.data[0].object == "embedding" and r.data[0].index == 0
    assert r.usage.prompt_tokens == len(ids) and r.usage.total_tokens == len(ids)
    vec = np.asarray(r.data[0].embedding, np.float32)
    np.testing.assert_allclose(vec, live_ref.pooled(ids), rtol=1e-5, atol=2e-6)
    f = client.embeddings.create(model=MODEL, input=text, encoding_format="float")
    assert np.array_equal(np.asarray(f.data[0].embedding, np.float32), vec)
    assert client.embeddings.create(model=MODEL, input=text, dimensions=64, user="u1").data

    texts = ["Hello", "a somewhat longer sentence about embeddings and pooling", "x"]
    many = client.embeddings.create(model=MODEL, input=texts)
    assert [d.index for d in many.data] == [0, 1, 2]
    for t, d in zip(texts, many.data):
        np.testing.assert_allclose(d.embedding, live_ref.pooled(tok.encode(t)), rtol=1e-5, atol=2e-6)
    assert many.usage.prompt_tokens == sum(len(tok.encode(t)) for t in texts)

    as_ids = client.embeddings.create(model=MODEL, input=ids)
    np.testing.assert_allclose(as_ids.data[0].embedding, vec, rtol=1e-6, atol=1e-7)
    lists = client.embeddings.create(model=MODEL, input=[ids, [5, 6, 7]])
    assert len(lists.data) == 2 and lists.usage.prompt_tokens == len(ids) + 3


def test_base64_is_little_endian_float32(live):
    body = {"model": MODEL, "input": [[5, 6, 7, 8], [9]]}
    f = httpx.post(live.url + "/v1/embeddings", json=body, headers=HDR, timeout=60).json()
    b = httpx.post(live.url + "/v1/embeddings", json={**body, "encoding_format": "base64"},
                   headers=HDR, timeout=60).json()
    assert set(f) >= {"object", "data", "model", "usage"} and f["usage"] == {"prompt_tokens": 5,
                                                                              "total_tokens": 5}
    for fd, bd in zip(f["data"], b["data"]):
        raw = np.frombuffer(base64.b64decode(bd["embedding"]), "<f4")
        assert raw.shape == (64,) and np.array_equal(raw, np.asarray(fd["embedding"], np.float32))


def test_truncate_and_normalize_extras(live, live_ref):
    long = list(range(10, 10 + MAX_MODEL_LEN + 40))
    r = httpx.post(live.url + "/v1/embeddings", headers=HDR, timeout=60, json={
        "input": long, "truncate_prompt_tokens": 100, "normalize": False}).json()
    np.testing.assert_allclose(r["data"][0]["embedding"], live_ref.pooled(long[-100:], normalize=False),
                               rtol=1e-5, atol=1e-5)
    assert r["usage"]["prompt_tokens"] == 100


def test_concurrent_requests_while_generating(live, client):
    single = client.embeddings.create(model=MODEL, input="same text").data[0].embedding

    async def main():
        async with httpx.AsyncClient(timeout=120) as c:
            gen = c.post(live.url + "/v1/completions", headers=HDR,
                         json={"prompt": "hi", "max_tokens": 20, "ignore_eos": True})
            embs = [c.post(live.url + "/v1/embeddings", headers=HDR,
                           json={"input": ["same text", f"other {i}"]}) for i in range(6)]
            return await asyncio.gather(gen, *embs)

    out = asyncio.run(main())
    assert all(r.status_code == 200 for r in out), [r.text for r in out if r.status_code != 200]
    for r in out[1:]:
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], single, rtol=1e-6, atol=1e-7)
    assert out[0].json()["usage"]["completion_tokens"] == 20


BAD = [
    ({"input": "x", "dimensions": 32}, 400, "dimensions"),
    ({"input": []}, 400, "input"),
    ({"input": ""}, 400, "input"),
    ({"input": ["ok", ""]}, 400, "input"),
    ({"input": [[]]}, 400, "input"),
    ({"input": [1, 10 ** 6]}, 400, "input"),
    ({"input": [[1], [2, -5]]}, 400, "input"),
    ({"input": [1] * (MAX_MODEL_LEN + 1)}, 400, "input"),
    ({"input": ["a", 1]}, 400, "input"),
    ({"input": {"text": "a"}}, 400, "input"),
    ({"input": ["a"] * 2049}, 400, "input"),
    ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "a", "truncate_prompt_tokens": MAX_MODEL_LEN + 1}, 400, "truncate_prompt_tokens"),
    ({"input": "a", "model": "gpt-5"}, 404, "model"),
    ({}, 400, "input"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_embedding_requests(live, body, status, param):
    r = httpx.post(live.url + "/v1/embeddings", json=body, headers=HDR, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err
    if body.get("input") == [1] * (MAX_MODEL_LEN + 1):
        assert str(MAX_MODEL_LEN) in err["message"] and str(MAX_MODEL_LEN + 1) in err["message"]
    if param == "dimensions":
        assert "64" in err["message"]


def _compiles_metric(live) -> float:
    line = next(x for x in httpx.get(live.url + "/metrics").text.splitlines()
                if x.startswith(f'jaxserve:compiles_after_warmup_total{{model_name="{MODEL}"}}'))
    return float(line.rsplit(" ", 1)[1])


def test_embedding_compiles_are_not_counted_as_serving_compiles(live, client):
    service = live.app.state.embeddings
    service.embedder = None               # a fresh embedder: its buckets compile again
    before, raw = _compiles_metric(live), live.engine.get_stats()["compiles_after_warmup"]
    client.embeddings.create(model=MODEL, input=["one", "two " * 100])
    assert service.embedder.lowerings > 0
    assert live.engine.get_stats()["compiles_after_warmup"] - raw == service.embedder.lowerings
    assert _compiles_metric(live) == before
