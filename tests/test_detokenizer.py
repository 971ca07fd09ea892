"""Incremental detokenization of byte-level BPE output, including characters split across tokens."""

from jaxserve.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Plain ASCII text, with punctuation!",
    "Emoji 🤗🚀 and CJK 日本語 and accents café",
    "🦙🦙🦙",
]


def test_streamed_text_equals_full_decode(smollm):
    tok = smollm.tokenizer
    prompt = tok.encode("Say something:", add_special_tokens=False)
    split_seen = False
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        d = IncrementalDetokenizer(tok, prompt)
        pieces = []
        for i in ids:
            delta = d.add(i)
            assert "\ufffd" not in delta
            split_seen |= delta == ""
            pieces.append(delta)
        pieces.append(d.flush())
        assert "".join(pieces) == text == d.text
    assert split_seen, "no multi-byte character was split across tokens: the test lost its point"


def test_flush_emits_incomplete_tail(smollm):
    tok = smollm.tokenizer
    ids = tok.encode("🤗", add_special_tokens=False)
    assert len(ids) > 1
    d = IncrementalDetokenizer(tok)
    assert d.add(ids[0]) == ""
    tail = d.flush()  # dangling bytes surface once, at the end, as replacement characters
    assert tail and set(tail) == {"\ufffd"}
    assert d.flush() == ""


def test_special_tokens_are_skipped(smollm):
    tok = smollm.tokenizer
    d = IncrementalDetokenizer(tok)
    text = d.add(tok.encode("Hi", add_special_tokens=False)) + d.add(tok.eos_token_id) + d.flush()
    assert text == "Hi"
