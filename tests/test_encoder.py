"""The embedder backends agree with the float32 torch reference (sentence-transformers)."""

from __future__ import annotations

import numpy as np
import pytest
from pydoc_data.topics import topics

from retriever.encoder import BACKENDS, EncoderError, QueryEncoder, native_bf16, resolve_backend


def _texts(count: int) -> list[str]:
    """Seeded 300-character slices of the Python reference: real prose and code."""
    pieces = [body[i : i + 300] for body in topics.values() for i in range(0, len(body) - 300, 900)]
    picked = np.random.RandomState(0).choice(len(pieces), count, replace=False)
    return [pieces[i] for i in picked]


def test_auto_backend_follows_the_hardware():
    assert resolve_backend("auto") == ("torch-bf16" if native_bf16() else "torch")
    assert resolve_backend("torch") == "torch"
    with pytest.raises(EncoderError, match="unknown embedder backend"):
        QueryEncoder(backend="tensorrt")
    assert "auto" not in BACKENDS  # the manifest records what actually ran


def test_bf16_autocast_keeps_neighbours(encoder):
    corpus, queries = _texts(240), _texts(280)[240:]
    bf16 = QueryEncoder(backend="torch-bf16")
    reference_db, reference_q = encoder.encode(corpus), encoder.encode(queries)
    db, q = bf16.encode(corpus), bf16.encode(queries)
    assert db.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(db, axis=1), 1.0, atol=1e-5)
    assert float((db * reference_db).sum(1).min()) > 0.999
    truth = np.argsort(-(reference_q @ reference_db.T), axis=1)[:, :10]
    found = np.argsort(-(q @ db.T), axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert recall >= 0.95, recall
    assert bf16.describe()["backend"] == "torch-bf16"
