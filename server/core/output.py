"""Output processing of the generation loop: the text as tokens arrive, and stop sequences.

The loop turns engine tokens into the text a client streams. Decoding the whole output again on
every delta costs O(n) per token; OutputText decodes incrementally instead.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers.decoders import DecodeStream


class OutputText:
    """A request's output text, decoded as its tokens arrive.

    With a fast (Rust-backed) tokenizer this is tokenizers' DecodeStream, the incremental
    detokenizer of vLLM's fast path: each token costs one short decode. Its text is always a
    prefix of the whole output's decode: a character whose bytes have not all arrived is held back
    (tests/test_output.py checks both against `tokenizer.decode`). A tokenizer without a Rust
    backend decodes the whole output again, as vLLM's slow path does.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream = DecodeStream(skip_special_tokens=True) if self._backend is not None else None
        self._ids: list[int] = []
        self.text = ""

    def extend(self, token_ids: Sequence[int]) -> str:
        """Add tokens; the text so far."""
        if self._stream is None:
            self._ids.extend(token_ids)
            self.text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
            return self.text
        for token_id in token_ids:
            piece = self._stream.step(self._backend, token_id)
            if piece:
                self.text += piece
        return self.text


class StopSequences:
    """A request's stop sequences, searched in the text as it grows (the longest one's length is
    what a search must look back over and what streaming must hold back)."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, emitted: int) -> tuple[int, str] | None:
        """Earliest stop sequence in the not-yet-emitted part of the text (plus the overlap a stop
        sequence can have with text already emitted)."""
        if not self.stops:
            return None
        start = max(0, emitted - self.longest)
        best = None
        for stop in self.stops:
            index = text.find(stop, start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def safe_end(self, text: str) -> int:
        """How much of `text` may be streamed: not the last len(longest stop) - 1 characters (a stop
        sequence may still complete there) nor a trailing replacement character (an incomplete
        multi-byte character of the slow path)."""
        end = len(text) - (self.longest - 1 if self.longest else 0)
        if text.endswith("\ufffd"):
            end = min(end, len(text) - 1)
        return end
