"""Learned adaptive retrieval for kNN-LM (Efficient kNN-LM, He et al. 2021): a small MLP reads the
model's own next-token distribution at a position and predicts the weight λ(x) the kNN distribution
deserves there; an engine with a gate threshold skips the search where λ(x) is below it and mixes
at λ(x) elsewhere.

It is trained (datastore_tools/token_gate.py, `retroserve datastore gate`) on held-out text the
datastore does not contain, by minimising the kNN-LM loss -log(λ(x)·p_kNN(y) + (1-λ(x))·p_LM(y)) of the
true next token y, and stored beside the token datastore's index as `gate.json`. Training and serving
compute the features with the same function (`features`):
- entropy of p_LM (nats) and its max probability: a confident model gains little from neighbours;
- log(1 + position): early positions have little context;
- log(1 + count of the current token among the datastore's values): frequent tokens (punctuation,
  markup) are where the datastore has many look-alike contexts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

GATE_FILE = "gate.json"
MAX_LAMBDA = 1 - 1e-6
FEATURE_NAMES = ("entropy", "max_prob", "log_position", "log_token_count")


def token_counts(values: np.ndarray, vocab: int) -> np.ndarray:
    """How often each token id is some entry's value (the datastore's unigram counts), [vocab] int64."""
    values = np.asarray(values, dtype=np.int64)
    return np.bincount(values[(values >= 0) & (values < vocab)], minlength=vocab)


def features(log_probs: torch.Tensor, positions: np.ndarray, tokens: np.ndarray, counts: np.ndarray) -> torch.Tensor:
    """[R, 4] float32 gate inputs (FEATURE_NAMES) from the model's log-probs [R, V] (float32), each
    row's position in its sequence and its current (input) token id."""
    probs = log_probs.exp()
    entropy = -(probs * torch.where(torch.isfinite(log_probs), log_probs, torch.zeros_like(log_probs))).sum(-1)
    max_prob = probs.amax(-1)
    tokens = np.clip(np.asarray(tokens, dtype=np.int64), 0, len(counts) - 1)
    extra = np.stack([np.log1p(np.asarray(positions, dtype=np.float64)),
                      np.log1p(counts[tokens].astype(np.float64))], axis=1)
    return torch.cat([entropy[:, None], max_prob[:, None],
                      torch.from_numpy(extra).to(dtype=torch.float32, device=log_probs.device)], dim=1)


@dataclass
class KnnGate:
    """feature standardisation + Linear(4, H) + tanh + Linear(H, 1) + sigmoid = λ(x)."""

    mean: np.ndarray
    std: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    info: dict = field(default_factory=dict)
    """How it was trained and what it measured (written by datastore_tools/token_gate.py)."""

    def lam(self, x: torch.Tensor) -> torch.Tensor:
        """λ(x) in (0, 1), [R] float32, for features [R, 4]."""
        def t(a):
            return torch.as_tensor(np.asarray(a, dtype=np.float32), device=x.device)

        hidden = torch.tanh(((x - t(self.mean)) / t(self.std)) @ t(self.w1) + t(self.b1))
        # Never exactly 1 (float32 sigmoid rounds there from logit 17): λ 1 would give every token no
        # neighbour names probability 0. The fit clamps the same way.
        return torch.sigmoid(hidden @ t(self.w2) + t(self.b2)).squeeze(-1).clamp(max=MAX_LAMBDA)

    def to_json(self) -> dict:
        return {"features": list(FEATURE_NAMES), "mean": self.mean.tolist(), "std": self.std.tolist(),
                "w1": self.w1.tolist(), "b1": self.b1.tolist(), "w2": self.w2.tolist(), "b2": self.b2.tolist(),
                "info": self.info}

    @classmethod
    def from_json(cls, data: dict) -> "KnnGate":
        if tuple(data.get("features", ())) != FEATURE_NAMES:
            raise ValueError(f"gate features {data.get('features')} are not {list(FEATURE_NAMES)}; retrain it "
                             "with `retroserve datastore gate`")
        arrays = {name: np.asarray(data[name], dtype=np.float32) for name in ("mean", "std", "w1", "b1", "w2", "b2")}
        return cls(**arrays, info=data.get("info", {}))

    @classmethod
    def load(cls, datastore_dir: str | Path) -> "KnnGate":
        """The gate stored in a token datastore; FileNotFoundError naming the command that trains one."""
        path = Path(datastore_dir) / GATE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"token datastore {datastore_dir} has no learned gate ({GATE_FILE}); train one "
                                    f"with `retroserve datastore gate {datastore_dir} --heldout FILE...`")
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
