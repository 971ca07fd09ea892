"""Incremental detokenization that never emits half a character.

Byte-level BPE tokens can split a multi-byte UTF-8 character (an emoji, a CJK ideograph) across two
or more tokens. Decoding the new token alone would print U+FFFD. Instead we keep a small window:
`prefix_offset..read_offset` is text already emitted, and we emit only the part of the decoded
window beyond it, and only once it no longer ends in an incomplete character.
"""

from __future__ import annotations

from typing import Any, Iterable

_REPLACEMENT = "\ufffd"
_CONTEXT = 5  # prompt tokens kept as context so leading spaces/merges decode as in the full text


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: Iterable[int] = (), *,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = list(prompt_ids)
        self.read_offset = len(self.tokens)
        self.prefix_offset = max(0, self.read_offset - _CONTEXT)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Append generated token(s); return the newly completed text (possibly "")."""
        self.tokens.extend([token_ids] if isinstance(token_ids, int) else token_ids)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of generation: emit whatever is pending, even an incomplete character."""
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        delta = full[len(prefix) :]
        self.prefix_offset = self.read_offset = len(self.tokens)
        self.text += delta
        return delta
