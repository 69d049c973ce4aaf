"""Output processing of the generation loop (server/core/output.py) against the reference:
`tokenizer.decode` of the whole output, the loop's former per-delta decode."""

from __future__ import annotations

import random

import pytest

from server.core.output import OutputText, StopSequences


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


class SlowTokenizer:
    """The served tokenizer without its Rust backend: OutputText's re-decoding path."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


def token_sequences(tokenizer, count: int = 600):
    """Seeded outputs: random ids over the whole vocabulary, over the special and byte tokens,
    and encodings of text with multi-byte characters (split across tokens)."""
    rng = random.Random(0)
    pieces = ["é", "€", "日本語", " x", "😀", "\n", "  ", "def f():", "ü"]
    for trial in range(count):
        length = rng.randint(1, 40)
        if trial % 3 == 0:
            yield [rng.randrange(len(tokenizer)) for _ in range(length)]
        elif trial % 3 == 1:
            yield [rng.randrange(300) for _ in range(length)]
        else:
            yield tokenizer("".join(rng.choice(pieces) for _ in range(length)), add_special_tokens=False)["input_ids"]


def test_incremental_text_is_always_a_prefix_of_the_whole_decode(tokenizer):
    """After every delta (1-3 tokens) the text is a prefix of the whole decode, and all of it
    unless the output ends in a character whose bytes have not all arrived (U+FFFD in the whole
    decode), so streamed text never needs correcting."""
    rng = random.Random(1)
    held_back = 0
    for ids in token_sequences(tokenizer):
        output = OutputText(tokenizer)
        position = 0
        while position < len(ids):
            step = rng.randint(1, 3)
            text = output.extend(ids[position:position + step])
            position += step
            whole = tokenizer.decode(ids[:position], skip_special_tokens=True)
            assert whole.startswith(text)
            assert text == whole or whole.endswith("\ufffd")
            held_back += len(whole) > len(text)
    assert held_back > 0  # the byte-token sequences did split characters


def test_a_tokenizer_without_a_rust_backend_re_decodes_the_whole_output(tokenizer):
    for ids in list(token_sequences(tokenizer, 60)):
        output = OutputText(SlowTokenizer(tokenizer))
        for position in range(len(ids)):
            assert output.extend(ids[position:position + 1]) == tokenizer.decode(ids[:position + 1],
                                                                                skip_special_tokens=True)


def test_the_earliest_stop_sequence_wins_and_may_overlap_emitted_text():
    assert StopSequences(["END", "STOP"]).find("abc STOP def END", 0) == (4, "STOP")
    assert StopSequences(["STOP"]).find("abc STOP", 6) == (4, "STOP")  # started before the emitted end
    assert StopSequences(["STOP"]).find("abc STOP", 8 + 4) is None  # wholly emitted already: found before
    assert StopSequences([]).find("abc", 0) is None


def test_streamed_text_stops_short_of_a_possible_stop_sequence_and_an_incomplete_character():
    assert StopSequences(["world"]).safe_end("hello wor") == len("hello wor") - 4
    assert StopSequences([]).safe_end("hello") == 5
    assert StopSequences([]).safe_end("hello\ufffd") == 5
