"""The learned kNN-LM gate without an engine (retriever/knn_gate.py, datastore_tools/token_gate.py):
features against numpy, the fit against the constant λ it replaces on seeded data, the stored form,
and the CLI's defaults against the server's. The trained gate inside the engine is checked in
tests/test_knn_serving.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retriever import knn_gate


def test_features_match_a_numpy_computation():
    generator = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(5, 50, generator=generator) * 3, dim=-1)
    positions, tokens = np.array([0, 1, 7, 100, 2047]), np.array([3, 3, 49, 0, 60])  # 60: beyond the vocabulary
    counts = knn_gate.token_counts(np.array([3, 3, 3, 49, -1, 70]), 50)
    assert counts[3] == 3 and counts[49] == 1 and counts.sum() == 4  # padding and out-of-range values ignored
    got = knn_gate.features(log_probs, positions, tokens, counts).numpy()
    p = log_probs.double().exp().numpy()
    np.testing.assert_allclose(got[:, 0], -(p * np.log(p)).sum(1), rtol=1e-5)
    np.testing.assert_allclose(got[:, 1], p.max(1), rtol=1e-6)
    np.testing.assert_allclose(got[:, 2], np.log1p(positions), rtol=1e-6)
    np.testing.assert_allclose(got[:, 3], np.log1p([3, 3, 1, 0, 1]), rtol=1e-6)  # 60 clipped to id 49


def _synthetic(n=4000, seed=0):
    """Positions where the datastore knows the next token exactly when the model is unsure."""
    rs = np.random.RandomState(seed)
    max_prob = rs.uniform(0.05, 0.99, n)
    feats = torch.tensor(np.stack([-np.log(max_prob) * 2, max_prob, np.log1p(rs.randint(0, 500, n)),
                                   np.log1p(rs.randint(0, 1000, n))], 1), dtype=torch.float32)
    lp_lm = torch.tensor(np.log(max_prob * rs.uniform(0.3, 1.0, n)), dtype=torch.float64)
    helps = max_prob < 0.5
    lp_knn = torch.tensor(np.where(helps, np.log(0.8), np.log(0.01)), dtype=torch.float64)
    return feats, lp_lm, lp_knn, helps


def test_the_fit_beats_the_constant_lambda_and_skips_where_the_datastore_does_not_help():
    from datastore_tools.token_gate import _loss, fit, report

    feats, lp_lm, lp_knn, helps = _synthetic()
    gate = fit(feats[:3000], lp_lm[:3000], lp_knn[:3000])
    held = report(gate, feats[3000:], lp_lm[3000:], lp_knn[3000:], constant_lam=0.25)
    assert held["learned_lambda"] < held["constant_lambda"] - 0.05  # nats/token on positions not fitted
    lam = gate.lam(feats[3000:]).numpy()
    assert lam[helps[3000:]].min() > lam[~helps[3000:]].max()  # the gate separates the two kinds of position
    assert held["constant_lambda"] == pytest.approx(float(_loss(0.25, lp_lm[3000:], lp_knn[3000:])))
    again = fit(feats[:3000], lp_lm[:3000], lp_knn[:3000])
    assert np.array_equal(again.w1, gate.w1)  # seeded: the same gate twice


def test_the_stored_gate_round_trips_and_a_missing_one_names_the_command(tmp_path):
    import json

    from datastore_tools.token_gate import fit

    feats, lp_lm, lp_knn, _ = _synthetic(500)
    gate = fit(feats, lp_lm, lp_knn, steps=20)
    (tmp_path / knn_gate.GATE_FILE).write_text(json.dumps(gate.to_json()))
    loaded = knn_gate.KnnGate.load(tmp_path)
    assert torch.equal(loaded.lam(feats), gate.lam(feats))
    with pytest.raises(FileNotFoundError, match="retroserve datastore gate"):
        knn_gate.KnnGate.load(tmp_path / "elsewhere")
    stored = gate.to_json() | {"features": ["entropy"]}
    with pytest.raises(ValueError, match="retrain"):
        knn_gate.KnnGate.from_json(stored)


def test_the_gate_command_defaults_are_the_servers():
    import argparse

    from datastore_tools.cli import add_gate_arguments
    from server.knn import settings

    parser = argparse.ArgumentParser()
    add_gate_arguments(parser)
    args = parser.parse_args(["store", "--heldout", "a"])
    assert (args.knn_k, args.knn_temperature, args.knn_lambda) == (
        settings.DEFAULT_KNN_K, settings.DEFAULT_KNN_TEMPERATURE, settings.DEFAULT_KNN_LAMBDA)
