"""Cut documents into fixed-size chunks of the serving model's tokens, linked to their continuation.

Chunks are token spans (not character spans) because the server places neighbours' tokens straight
into the model's context: a chunk is exactly `chunk_tokens` tokens except a document's last one,
which may be shorter (a document shorter than one chunk becomes one short chunk). Chunk ids are
assigned in document order, so a chunk's continuation is simply the next id within its document.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from datastore_tools.errors import DatastoreToolError
from datastore_tools.ingest import Document

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    doc: int
    pos: int  # index of the chunk inside its document
    tokens: tuple[int, ...]
    text: str
    last: bool  # the document's last chunk (no continuation)


def load_tokenizer(model_dir: str | Path):
    """The serving model's tokenizer from a model directory (prepared model or any HF model dir)."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DatastoreToolError(
            f"model directory {model_dir} does not exist; run `retroserve model prepare` or pass --model DIR"
        )
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as error:
        raise DatastoreToolError(
            f"cannot load a tokenizer from {model_dir} ({error}); pass a model directory with "
            "tokenizer.json (e.g. the output of `retroserve model prepare`)"
        ) from error


def chunk_documents(
    documents: Sequence[Document], tokenizer, chunk_tokens: int = 64, batch_size: int = 64
) -> list[Chunk]:
    """Tokenize (no special tokens) and split every document; texts are the decoded chunk tokens."""
    if chunk_tokens < 1:
        raise DatastoreToolError(f"--chunk-tokens must be >= 1, got {chunk_tokens}")
    chunks: list[Chunk] = []
    for start in range(0, len(documents), batch_size):
        batch = documents[start : start + batch_size]
        encoded = tokenizer(
            [document.text for document in batch], add_special_tokens=False, verbose=False
        )["input_ids"]
        for offset, ids in enumerate(encoded):
            spans = [tuple(ids[i : i + chunk_tokens]) for i in range(0, len(ids), chunk_tokens)]
            texts = tokenizer.batch_decode(
                [list(span) for span in spans], clean_up_tokenization_spaces=False
            )
            for pos, (span, text) in enumerate(zip(spans, texts)):
                chunks.append(Chunk(start + offset, pos, span, text, pos == len(spans) - 1))
    return chunks
