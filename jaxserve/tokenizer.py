"""Tokenizers: Hugging Face `tokenizers` (fast) tokenizers from a model directory or a GGUF file.

Chat formatting uses the tokenizer's own `chat_template` through `apply_chat_template`, which
transformers renders in a sandboxed Jinja environment.
"""

from __future__ import annotations

import os
from typing import Any, Callable

# Pre-tokenizer split patterns, named as llama.cpp names them in `tokenizer.ggml.pre`.
_GPT2_REGEX = None  # ByteLevel's built-in GPT-2 regex
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# pre name -> (split digits one by one first, split regex or None for GPT-2's)
_PRE_TOKENIZERS = {
    "default": (False, _GPT2_REGEX), "gpt2": (False, _GPT2_REGEX),
    "smollm": (True, _GPT2_REGEX), "starcoder": (True, _GPT2_REGEX), "refact": (True, _GPT2_REGEX),
    "llama-bpe": (False, _LLAMA3_REGEX), "llama3": (False, _LLAMA3_REGEX),
    "qwen2": (False, _QWEN2_REGEX),
}


class TokenizerError(ValueError):
    """A tokenizer could not be built from the model files."""


def load_hf_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types here
        raise TokenizerError(f"could not load a tokenizer from the model directory "
                             f"{os.path.basename(os.path.normpath(path))!r}: {type(e).__name__}") from None


def tokenizer_from_gguf_fields(field: Callable[[str], Any], *, source: str = "gguf"):
    """Build a fast tokenizer from GGUF `tokenizer.ggml.*` metadata (byte-level BPE models)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"{source}: GGUF tokenizer model {kind!r} is not supported "
                             f"(only byte-level BPE, 'gpt2')")
    pre = field("tokenizer.ggml.pre") or "default"
    if pre not in _PRE_TOKENIZERS:
        raise TokenizerError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported "
                             f"(supported: {', '.join(sorted(_PRE_TOKENIZERS))})")
    tokens: list[str] = list(field("tokenizer.ggml.tokens"))
    types: list[int] = list(field("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    digits, regex = _PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    # NOTE: GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == 3])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == 4])

    def tok(key: str) -> str | None:
        i = field(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    out = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=tok("bos"), eos_token=tok("eos"),
                                  unk_token=tok("unknown"), pad_token=tok("padding"))
    template = field("tokenizer.chat_template")
    if template:
        out.chat_template = template
    return out


def encode_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True,
                chat_template: str | None = None) -> list[int]:
    """Render `messages` with the chat template and tokenize the result (no extra BOS: the
    template already writes the special tokens it wants)."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise TokenizerError("this model's tokenizer has no chat template; use a plain prompt")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                         tokenize=False, chat_template=chat_template)
    return tokenizer.encode(text, add_special_tokens=False)
