"""The engine on the real embedded model: chat, chunked prefill, stop strings, detokenization."""

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.runner.generate import GreedyGenerator
from jaxserve.tokenizer import encode_chat

QUESTIONS = ["What is the capital of France?", "Name three colors.",
             "Write one sentence about the sea. Use an emoji 🌊."]


@pytest.fixture(scope="module")
def llm(smollm):
    # a 16-token budget: every chat prompt (~40 tokens) is prefilled in chunks
    return LLM(smollm, max_model_len=512, max_num_seqs=2, max_num_batched_tokens=16,
               compilation_cache_dir=None, show_progress=False)


def test_chat_batch_equals_simple_greedy_path(llm, smollm):
    sp = SamplingParams(temperature=0.0, max_tokens=30)
    outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], sp)
    assert llm.get_stats()["compiles_after_warmup"] == 0
    gen = GreedyGenerator(smollm.model)
    for q, out in zip(QUESTIONS, outs):
        ids = encode_chat(smollm.tokenizer, [{"role": "user", "content": q}])
        ref = gen.generate(ids, 30, stop_token_ids=[smollm.tokenizer.eos_token_id])
        assert out.outputs[0].token_ids == ref.token_ids
        assert out.outputs[0].text == smollm.tokenizer.decode(ref.token_ids, skip_special_tokens=True)
        assert "\ufffd" not in out.outputs[0].text
    assert "Paris" in outs[0].outputs[0].text
    assert outs[0].outputs[0].finish_reason == "stop"


def test_stop_strings(llm):
    msgs = [{"role": "user", "content": QUESTIONS[0]}]
    full = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=30))[0].outputs[0].text
    cut = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=30, stop=["Paris"]))[0].outputs[0]
    assert cut.text == full[: full.index("Paris")]
    assert cut.finish_reason == "stop" and cut.stop_reason == "Paris"
    kept = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=30, stop=["Paris"],
                                         include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == full[: full.index("Paris") + len("Paris")]
    s = llm.get_stats()
    assert s["kv_blocks_free"] == s["kv_blocks_total"]


def test_string_prompt_and_logprobs_decode(llm):
    out = llm.generate("The quick brown fox", SamplingParams(temperature=0.0, max_tokens=5,
                                                             logprobs=2))[0]
    assert out.prompt == "The quick brown fox"
    first = out.outputs[0].logprobs[0]
    tok = out.outputs[0].token_ids[0]
    assert first[tok].decoded_token == llm.tokenizer.decode([tok])


def test_async_scheduling_changes_nothing(llm):
    import dataclasses

    msgs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    sp = [SamplingParams(temperature=0.0, max_tokens=25, stop=["Paris", "Blue"]),
          SamplingParams(temperature=0.0, max_tokens=25, stop=["Blue"]),
          SamplingParams(temperature=0.9, seed=5, max_tokens=25)]
    eng = llm.engine
    results = {}
    for overlap in (True, False):
        eng.config = dataclasses.replace(eng.config, async_scheduling=overlap)
        results[overlap] = [(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].finish_reason)
                            for o in llm.chat(msgs, sp)]
    eng.config = dataclasses.replace(eng.config, async_scheduling=True)
    assert results[True] == results[False]
    assert results[True][0][2] == "stop" and results[True][1][2] == "stop"
