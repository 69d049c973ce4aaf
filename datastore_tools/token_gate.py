"""`datastore gate`: fit the learned kNN-LM gate (retriever/knn_gate.py) of a token datastore.

On held-out documents (text the datastore must not contain: a document it holds would find its own
next tokens), the served weights (the same HF transformers model and dtype that computed the keys,
token_build.load_key_model) give at every position the next-token log-probs and the hidden state;
the datastore's own index gives the neighbours of that hidden state, hence p_kNN of the true next
token at the server's k and T. A 4-32-1 MLP on the gate features is fitted (full-batch Adam, seeded)
to minimise the kNN-LM loss with λ(x) in place of the constant λ. 20% of the documents are kept out
of the fit to report what the gate does on positions it was not fitted on: its loss, the constant-λ
loss, and the share of positions below each threshold with the loss when those skip the search.
The gate is written to the datastore in place (gate.json, then the manifest, atomically).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from datastore_tools.errors import DatastoreToolError
from datastore_tools.manifest import write_manifest
from retriever import format as fmt
from retriever import knn_gate
from retriever import token_datastore as tds

log = logging.getLogger(__name__)

THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25)


def _position_data(store, model, tokenizer, texts: list[str], k: int, temperature: float):
    """Per position of every text: gate features, log p_LM(y) and log p_kNN(y) of the true next token
    y, and the text's number."""
    import torch

    from artefacts.tokenizer import document_start_ids
    from datastore_tools.token_build import windows

    counts = knn_gate.token_counts(store.values, int(model.config.vocab_size))
    start = document_start_ids(tokenizer)
    feats, lp_lm, lp_knn, doc = [], [], [], []
    for number, text in enumerate(texts):
        ids = start + tokenizer(text, add_special_tokens=False)["input_ids"]
        for begin, end, keep_from in windows(len(ids), 512, 448):
            with torch.inference_mode():
                hidden = model.model(input_ids=torch.tensor([ids[begin:end]])).last_hidden_state[0]
                log_probs = torch.log_softmax(model.lm_head(hidden).float(), dim=-1)
            rows = np.arange(keep_from - begin, min(end, len(ids) - 1) - begin)  # positions with a next token
            if not len(rows):
                continue
            positions = begin + rows
            targets = np.asarray(ids)[positions + 1]
            lp = log_probs[torch.as_tensor(rows)]
            feats.append(knn_gate.features(lp, positions, np.asarray(ids)[positions], counts))
            lp_lm.append(lp[torch.arange(len(rows)), torch.as_tensor(targets)].numpy())
            found = store.search(hidden[torch.as_tensor(rows)].float().numpy(), k)
            scores = np.where(found.ids >= 0, -found.distances.astype(np.float64) / temperature, -np.inf)
            weights = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)
            hit = np.where(found.values == targets[:, None], weights, -np.inf)
            lp_knn.append(np.logaddexp.reduce(hit, axis=1))
            doc.append(np.full(len(rows), number))
    return (torch.cat(feats), torch.from_numpy(np.concatenate(lp_lm)).double(),
            torch.from_numpy(np.concatenate(lp_knn)).double(), np.concatenate(doc))


def _loss(lam, lp_lm, lp_knn):
    """Mean kNN-LM negative log-likelihood (nats/token) with per-position λ (tensor or float)."""
    import torch

    lam = torch.as_tensor(lam, dtype=torch.float64).expand_as(lp_lm)
    return -torch.logaddexp(torch.log(lam) + lp_knn, torch.log1p(-lam) + lp_lm).mean()


def fit(feats, lp_lm, lp_knn, hidden: int = 32, steps: int = 600, seed: int = 0) -> knn_gate.KnnGate:
    """Full-batch Adam on the kNN-LM loss; returns the gate (float32 weights)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    x = ((feats - mean) / std).double()
    w1 = (torch.randn(feats.shape[1], hidden, generator=generator, dtype=torch.float64) * 0.3).requires_grad_()
    b1 = torch.zeros(hidden, dtype=torch.float64, requires_grad=True)
    w2 = (torch.randn(hidden, 1, generator=generator, dtype=torch.float64) * 0.3).requires_grad_()
    b2 = torch.full((1,), -1.0, dtype=torch.float64, requires_grad=True)  # starts near λ 0.27
    optimiser = torch.optim.Adam([w1, b1, w2, b2], lr=0.02)
    for _ in range(steps):
        optimiser.zero_grad()
        lam = torch.sigmoid(torch.tanh(x @ w1 + b1) @ w2 + b2).squeeze(-1).clamp(1e-6, knn_gate.MAX_LAMBDA)
        loss = _loss(lam, lp_lm, lp_knn)
        loss.backward()
        optimiser.step()
    as_np = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
    return knn_gate.KnnGate(as_np(mean), as_np(std), as_np(w1), as_np(b1), as_np(w2), as_np(b2))


def report(gate: knn_gate.KnnGate, feats, lp_lm, lp_knn, constant_lam: float) -> dict:
    """What the gate does on these positions: losses (nats/token) and, per threshold, the share of
    positions it would skip and the loss when they keep the model alone and the rest mix at the
    constant λ or at λ(x) (what a gated engine serves)."""
    import torch

    lam = gate.lam(feats).double()
    clamped = lam.clamp(1e-6, knn_gate.MAX_LAMBDA)
    out = {"positions": int(len(lp_lm)), "model_alone": float(-lp_lm.mean()),
           "constant_lambda": float(_loss(constant_lam, lp_lm, lp_knn)),
           "learned_lambda": float(_loss(clamped, lp_lm, lp_knn)), "skip": {}}
    for threshold in THRESHOLDS:
        skip = lam < threshold
        mixed = torch.where(skip, torch.zeros_like(lam), torch.full_like(lam, constant_lam))
        learned = torch.where(skip, torch.zeros_like(lam), clamped)
        out["skip"][str(threshold)] = {"fraction": float(skip.double().mean()),
                                       "constant_lambda_elsewhere": float(_loss(mixed, lp_lm, lp_knn)),
                                       "learned_lambda_elsewhere": float(_loss(learned, lp_lm, lp_knn))}
    return out


def train_gate(datastore: str | Path, heldout: list[str], *, model_dir: Path, max_doc_chars: int = 2000,
               k: int = 64, temperature: float = 30.0, constant_lam: float = 0.25, seed: int = 0) -> dict:
    """Fit and store the gate of `datastore`; returns what gate.json's "info" records."""
    from datastore_tools import chunking
    from datastore_tools.ingest import read_documents
    from datastore_tools.token_build import key_dtype, load_key_model

    path = Path(datastore)
    store = tds.TokenDatastore.open(path, device="cpu")
    documents, _ = read_documents(heldout)
    documents = [d for d in documents if d.text.strip()]
    leaked = fmt.shared_sources(store.docs, [d.source for d in documents])
    if leaked:
        raise DatastoreToolError(f"{len(leaked)} of the --heldout documents are in the token datastore "
                                 f"({', '.join(leaked[:3])}); train the gate on text it does not hold "
                                 "(e.g. the dev half of `retroserve eval split`)")
    if len(documents) < 5:
        raise DatastoreToolError(f"--heldout gave {len(documents)} documents with text; the gate needs at least 5 "
                                 "(one fifth is kept out of the fit to check it)")
    started = time.perf_counter()
    tokenizer = chunking.load_tokenizer(model_dir)
    model = load_key_model(model_dir, key_dtype(model_dir))
    feats, lp_lm, lp_knn, doc = _position_data(store, model, tokenizer, [d.text[:max_doc_chars] for d in documents],
                                               k, temperature)
    checked = doc % 5 == 4  # every fifth document is kept out of the fit
    gate = fit(feats[~checked], lp_lm[~checked], lp_knn[~checked], seed=seed)
    gate.info = {"documents": len(documents), "max_doc_chars": max_doc_chars, "k": k, "temperature": temperature,
                 "seed": seed, "sources": [d.source for d in documents],
                 "fitted": report(gate, feats[~checked], lp_lm[~checked], lp_knn[~checked], constant_lam),
                 "kept_out": report(gate, feats[checked], lp_lm[checked], lp_knn[checked], constant_lam),
                 "seconds": round(time.perf_counter() - started, 1)}
    tmp = path / f"{knn_gate.GATE_FILE}.tmp"
    tmp.write_text(json.dumps(gate.to_json(), indent=1), encoding="utf-8")
    os.replace(tmp, path / knn_gate.GATE_FILE)
    manifest = dict(store.manifest)
    manifest["gate"] = {"file": knn_gate.GATE_FILE, "features": list(knn_gate.FEATURE_NAMES)}
    write_manifest(path, manifest)
    log.info("gate of %s: kept-out loss %.4f learned λ vs %.4f constant λ", path,
             gate.info["kept_out"]["learned_lambda"], gate.info["kept_out"]["constant_lambda"])
    return gate.info
