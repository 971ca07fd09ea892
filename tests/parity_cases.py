"""The tiny random models and prompts of the HF parity tests (one per family and feature)."""

import numpy as np

_BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-5, hidden_act="silu")

TINY_FAMILIES = {
    # Llama 2/3 style, GQA 4:2, untied head
    "llama": dict(_BASE, model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=10000.0,
                  tie_word_embeddings=False),
    # Llama 3.1 rope scaling + tied embeddings (SmolLM2 style), MQA (4:1), sharded checkpoint
    "llama3_tied": dict(_BASE, model_type="llama", architectures=["LlamaForCausalLM"],
                        num_key_value_heads=1, rope_theta=500000.0, tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 32}),
    # Mistral with a sliding window shorter than the longer prompts
    "mistral": dict(_BASE, model_type="mistral", architectures=["MistralForCausalLM"],
                    rope_theta=10000.0, sliding_window=24, tie_word_embeddings=False),
    # Qwen2: q/k/v biases (randomised, so they matter), large rope theta
    "qwen2": dict(_BASE, model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                  rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False),
    # Qwen3: q/k RMSNorm, explicit head_dim != hidden/heads
    "qwen3": dict(_BASE, model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=32,
                  rope_theta=1000000.0, tie_word_embeddings=False, attention_bias=False,
                  use_sliding_window=False),
}
SHARDED = {"llama3_tied"}

PROMPT_LENGTHS = [1, 5, 16, 17, 33, 70]   # length 1, and lengths crossing 16/32/64
TINY_NEW_TOKENS = 32


def tiny_prompts(seed: int = 1234) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=n).tolist() for n in PROMPT_LENGTHS]


SMOLLM_CHATS = [
    "What is the capital of France? Answer in two sentences.",
    "Write a short poem about the ocean.",
    "Explain how photosynthesis works to a ten-year-old.",
    "Give me three tips for learning a new programming language.",
    "Describe the water cycle step by step.",
]
SMOLLM_NEW_TOKENS = 40

TOKENIZER_TEXTS = [
    "Hello world! How are you today?",
    "Café naïve résumé — “quotes” and emoji 🤗🚀",
    "日本語のテキストと中文",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "<|im_start|>user\nHi<|im_end|>\n",
]
