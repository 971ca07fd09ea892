"""Token-exact parity with HF transformers, float32.

For each family a tiny random checkpoint is made and saved by transformers; we load the saved
safetensors, run the same prompts through our paged forward (prefill, then one token per step) and
compare logits and greedy tokens with transformers'. Then the real SmolLM2-135M-Instruct GGUF.
"""

import numpy as np
import pytest

from jaxserve.loading import load_model
from jaxserve.runner.generate import GreedyGenerator
from tests import parity_cases as pc

RTOL = 1e-4  # max |delta logit| relative to the logit scale


def _check(ref, prompts, gen, new_tokens, label):
    for i, ids in enumerate(prompts):
        res = gen.generate(ids, new_tokens, return_logits=True)
        ref_prompt = ref[f"prompt_logits_{i}"]
        scale = float(np.abs(ref_prompt).max())
        err = float(np.abs(res.prompt_logits - ref_prompt).max())
        assert err <= RTOL * scale, f"{label} prompt {i} (len {len(ids)}): max|dlogit| {err:.3g} vs scale {scale:.3g}"
        ref_tokens = ref[f"tokens_{i}"].tolist()
        assert res.token_ids == ref_tokens, f"{label} prompt {i} (len {len(ids)}): greedy tokens differ"
        step = np.stack(res.step_logits)
        err = float(np.abs(step - ref[f"step_logits_{i}"]).max())
        assert err <= RTOL * scale, f"{label} prompt {i}: decode-step logits differ by {err:.3g}"


@pytest.mark.parametrize("family", list(pc.TINY_FAMILIES))
def test_tiny_family_matches_transformers(hf_reference, family):
    lm = load_model(hf_reference.dir(family), dtype="float32")
    assert lm.config.architecture == pc.TINY_FAMILIES[family]["architectures"][0]
    gen = GreedyGenerator(lm.model, page_size=16)
    _check(hf_reference.npz(family), pc.tiny_prompts(), gen, pc.TINY_NEW_TOKENS, family)


def test_smollm2_gguf_matches_transformers(hf_reference_smollm, smollm, smollm_chat_prompts):
    assert len(smollm_chat_prompts) >= 5
    gen = GreedyGenerator(smollm.model, page_size=16)
    _check(hf_reference_smollm.npz("smollm2"), smollm_chat_prompts, gen, pc.SMOLLM_NEW_TOKENS, "smollm2")


def test_gguf_tokenizer_matches_transformers(hf_reference_smollm, smollm):
    ref = hf_reference_smollm.npz("tokenizer")
    for i, text in enumerate(pc.TOKENIZER_TEXTS):
        ours = smollm.tokenizer.encode(text, add_special_tokens=False)
        assert ours == ref[f"ids_{i}"].tolist(), text
        assert smollm.tokenizer.decode(ours) == text
