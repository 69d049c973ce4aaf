"""`retroserve eval` on the session's real engine: bits per byte against direct references, the
leakage guard, and the run/sweep commands end to end on the tiny corpus (JSON and plots written).

The commands run on the session server's event loop with its engine (`run_async(args, engine)`),
so no second vLLM engine is loaded; `Engine.start` itself is exercised by the server tests.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from artefacts.tokenizer import document_start_ids
from server.evaluation import ablate as eval_ablate, cli as eval_cli
from server.cli.main import build_parser
from server.evaluation.scoring import EvalDocument, Evaluator, EvalSettings, ngram_overlap, paired_bootstrap

TEXT = "The assert statement checks a condition and raises AssertionError when it is false. ☃"


def direct_bits_per_byte(server, text: str) -> float:
    """From the engine's prompt log-probs, without the eval code: sum over the text's tokens."""
    from server.core.engine import SegmentSampling

    engine = server.running.engine
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = document_start_ids(engine.tokenizer) + ids

    async def logprobs():
        values = None
        async for delta in engine.generate_segment(prompt, SegmentSampling(max_tokens=1, prompt_logprobs=True), "direct"):
            values = delta.prompt_logprobs or values
        return values

    values = server.call(logprobs())
    return -sum(values[1:]) / math.log(2) / len(text.encode("utf-8"))


def test_bits_per_byte_equals_direct_engine_computation(server):
    evaluator = Evaluator(server.running.engine)
    result = server.call(evaluator.evaluate([EvalDocument("tiny", TEXT)], EvalSettings(mode="none")))
    assert result.documents[0].bytes == len(TEXT.encode("utf-8")) > len(TEXT)  # the snowman is 3 bytes
    assert result.bits_per_byte == pytest.approx(direct_bits_per_byte(server, TEXT), rel=1e-9)
    assert 0.3 < result.bits_per_byte < 3.0


def test_bits_per_byte_agrees_with_transformers(server):
    """The evaluator's bits per byte on the fidelity check's text (884 tokens) against fp32
    transformers on the same weights, teacher-forced: within the check's bound (0.3%; measured
    +0.11% on Zen 4, bf16 rounding; a shifted token or int8 activations move it by > 1.5%)."""
    from server.model import check as model_check

    engine = server.running.engine
    text = model_check.check_text()
    result = server.call(Evaluator(engine).evaluate([EvalDocument("check", text)], EvalSettings(mode="none")))
    reference = model_check.load_reference(engine.config.model_dir)
    ids = model_check.scored_ids(engine.tokenizer, text)
    logprobs = model_check.reference_logprobs(reference, ids)
    nll = -logprobs.gather(1, torch.tensor(ids[1:])[:, None]).double().sum().item()
    expected = nll / math.log(2) / len(text.encode("utf-8"))
    assert result.documents[0].bytes == len(text.encode("utf-8"))
    assert result.bits_per_byte == pytest.approx(expected, rel=model_check.Bounds().bpb_rel)


def test_chunk_mode_with_one_span_equals_model_alone(server):
    """The first span has no preceding query: with stride >= the document it is the model alone."""
    retrieve_calls = []
    evaluator = Evaluator(server.running.engine, lambda q, k, method: retrieve_calls.append(q) or [[] for _ in q])
    alone = server.call(evaluator.evaluate([EvalDocument("tiny", TEXT)], EvalSettings(mode="none")))
    one_span = server.call(evaluator.evaluate([EvalDocument("tiny", TEXT)], EvalSettings(mode="chunk", stride=512)))
    assert retrieve_calls == [] and one_span.documents[0].retrievals == 0
    assert one_span.bits_per_byte == pytest.approx(alone.bits_per_byte, rel=1e-9)


def test_retrieval_queries_are_the_tokens_before_each_span(server):
    seen = []
    evaluator = Evaluator(server.running.engine, lambda queries, k, method: seen.extend(queries) or [[] for _ in queries])
    server.call(evaluator.evaluate([EvalDocument("doc", TEXT)], EvalSettings(mode="chunk", stride=4, query_tokens=6)))
    tokenizer = server.running.engine.tokenizer
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    expected = [tokenizer.decode(ids[max(0, s - 6): s], skip_special_tokens=True) for s in range(4, len(ids), 4)]
    assert seen == expected


def test_leakage_guard_drops_neighbours_from_the_scored_document(server, server_datastore, prepared_model_dir):
    from pydoc_data.topics import topics

    datastore, retrieve = eval_cli.open_retrieval(server_datastore, prepared_model_dir)
    try:
        sources = {n.source for _, n in ((None, n) for row in retrieve([topics["assert"][:200]], 5) for n in row)}
        leaked_source = next(s for s in sources if s.endswith("assert.txt"))
        used = []

        def recording_retrieve(queries, k, method):
            rows = retrieve(queries, k, method)
            used.append(rows)
            return rows

        evaluator = Evaluator(server.running.engine, recording_retrieve, max_doc_chars=600)
        document = EvalDocument(leaked_source, topics["assert"])
        result = server.call(evaluator.evaluate([document], EvalSettings(mode="chunk", stride=32, neighbours=2)))
    finally:
        datastore.close()
    assert result.documents[0].excluded_neighbours > 0
    spans = evaluator.last_plan
    assert spans and all(n.source != leaked_source for span in spans for n in span.neighbours)
    assert all(len(span.neighbours) == 2 for span in spans if span.start > 0)


def test_ngram_overlap_counts_verbatim_reuse():
    datastore = [list(range(100))]
    assert ngram_overlap([list(range(20, 60))], datastore, n=13)["overlap"] == 1.0
    assert ngram_overlap([list(range(200, 240))], datastore, n=13)["overlap"] == 0.0
    half = ngram_overlap([list(range(80, 120))], datastore, n=5)
    assert 0.4 < half["overlap"] < 0.6


def test_eval_run_and_sweep_commands_write_results_and_plots(server, corpus_dir, tmp_path, capsys):
    parser = build_parser()
    split_path = tmp_path / "split.json"
    args = parser.parse_args(["eval", "split", str(corpus_dir), "-o", str(split_path), "--heldout-fraction", "0.3",
                              "--seed", "3"])
    assert args.func(args) == 0
    split = json.loads(split_path.read_text())
    assert split["heldout"] and split["datastore"] and not set(split["heldout"]) & set(split["datastore"])

    run_dir = tmp_path / "run"
    args = parser.parse_args(["eval", "sweep", "--split", str(split_path), "--fractions", "0.5", "1.0",
                              "--k", "2", "--stride", "32", "--max-doc-chars", "500",
                              "--output-dir", str(run_dir)])
    payload = server.call(eval_cli.sweep_async(args, engine=server.running.engine), timeout=600)
    assert len(payload["references"]) == 1 and len(payload["rows"]) == 2
    entries = sorted({row["datastore"]["entries"] for row in payload["rows"]})
    assert len(entries) == 2 and entries[0] < entries[1]
    smaller, larger = sorted(payload["rows"], key=lambda row: row["fraction"])
    assert "vs_smaller" not in smaller
    assert larger["vs_smaller"] == paired_bootstrap(smaller["per_document"], larger["per_document"])
    assert (run_dir / "sweep.png").stat().st_size > 1000
    assert json.loads((run_dir / "results.json").read_text())["rows"][0]["bits_per_byte"] > 0

    args = parser.parse_args(["eval", "run", "--split", str(split_path), "--datastore",
                              str(run_dir / "datastores" / "fraction-1"), "--k", "2", "--stride", "16", "32",
                              "--max-doc-chars", "500", "--output-dir", str(tmp_path / "ablate")])
    payload = server.call(eval_cli.run_async(args, engine=server.running.engine), timeout=600)
    labels = [row["label"] for row in payload["rows"]]
    assert labels == ["model alone", "chunk k=2 stride=16 query=32 bm25 first96",
                      "chunk k=2 stride=32 query=32 bm25 first96"]
    assert 0.0 <= payload["overlap"]["overlap"] <= 1.0

    args = parser.parse_args(["eval", "ablate", "--split", str(split_path), "--datastore",
                              str(run_dir / "datastores" / "fraction-1"), "--k", "2", "1", "--stride", "32",
                              "--query-tokens", "32", "--pca", "16", "--near-dup", "0.9", "--index", "HNSW16,Flat",
                              "--max-doc-chars", "400", "--output-dir", str(tmp_path / "ablations")])
    payload = server.call(eval_ablate.ablate_async(args, engine=server.running.engine), timeout=600)
    factors = [(row["ablation"]["factor"], row["ablation"]["value"]) for row in payload["rows"]]
    assert factors == [("alone", None), ("base", None), ("k", 1), ("pca", 16), ("near_dup", 0.9),
                       ("index", "HNSW16,Flat")]
    assert payload["rows"][3]["datastore"]["entries"] == payload["rows"][1]["datastore"]["entries"]
    pruned = payload["rows"][4]
    assert pruned["datastore"]["entries"] == pruned["ablation"]["before"] - pruned["ablation"]["removed"]
    assert all(row["search_ms_per_retrieval"] > 0 for row in payload["rows"][1:])
    assert (tmp_path / "ablations" / "ablations.png").stat().st_size > 1000
    assert (tmp_path / "ablate" / "settings.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "bits/byte" in out and "near-verbatim overlap" in out


def test_eval_cli_names_a_bad_split_file(tmp_path, capsys):
    bad = tmp_path / "split.json"
    bad.write_text("{}")
    args = build_parser().parse_args(["eval", "run", "--split", str(bad)])
    assert args.func(args) == 2
    assert "retroserve eval split" in capsys.readouterr().err


def test_paired_bootstrap_gives_the_byte_weighted_change_and_an_interval_around_it():
    from server.evaluation.scoring import paired_bootstrap

    base = [{"source": f"d{i}", "bytes": 100 + 10 * i, "nll_nats": 50.0 + i} for i in range(12)]
    other = [dict(d, nll_nats=d["nll_nats"] * (0.9 if i % 3 else 1.02)) for i, d in enumerate(base)]
    result = paired_bootstrap(base, other)
    total_base = sum(d["nll_nats"] for d in base)
    assert result["change"] == pytest.approx(sum(d["nll_nats"] for d in other) / total_base - 1)
    assert result["low"] < result["change"] < result["high"] < 0
    assert result["documents_worse"] == 4 and result["documents"] == 12
    same = paired_bootstrap(base, base)
    assert same["change"] == same["low"] == same["high"] == 0 and same["documents_worse"] == 0
    with pytest.raises(ValueError, match="same documents"):
        paired_bootstrap(base, other[::-1])


def test_windows_of_one_document_are_one_resampling_unit():
    from server.evaluation.scoring import paired_bootstrap

    base = [{"source": f"d{i}", "bytes": 100, "nll_nats": 50.0 + i} for i in range(6)]
    other = [dict(d, nll_nats=d["nll_nats"] * (0.8 if i % 2 else 1.05)) for i, d in enumerate(base)]
    whole = paired_bootstrap(base, other)

    def halves(rows):  # each document scored as two windows of half its bytes and loss
        return [dict(d, bytes=d["bytes"] / 2, nll_nats=d["nll_nats"] / 2, offset=o) for d in rows for o in (0, 500)]

    split = paired_bootstrap(halves(base), halves(other))
    assert split == pytest.approx(whole)  # same change, interval and counts: 6 documents, not 12 windows
    assert split["documents"] == 6 and split["documents_worse"] == 3


def test_prose_lines_exclude_restructuredtext_markup():
    from server.evaluation.scoring import prose_layout

    lines = [
        (":mod:`os` --- Miscellaneous interfaces\n", True),  # a role starts prose
        ("======================================\n", False),
        (".. module:: os\n", False),
        ("   :synopsis: Miscellaneous operating system interfaces.\n", False),
        ("**Source code:** :source:`Lib/os.py`\n", False),
        ("\n", False),
        ("This module provides a portable way of using operating system dependent functionality.\n", True),
        ("..\n", False),
        ("   - an indented list item\n", True),
    ]
    text = "".join(line for line, _ in lines)
    starts = [sum(len(line) for line, _ in lines[:i]) for i in range(len(lines))]
    ends = [start + len(line) - 1 for start, (line, _) in zip(starts, lines)]  # each line's newline
    prose, prose_bytes = prose_layout(text, starts + ends)
    expected = [is_prose for _, is_prose in lines]
    assert prose == expected + expected  # a newline belongs to the line it ends
    assert prose_bytes == sum(len(line.encode()) for line, is_prose in lines if is_prose)


def test_share_of_tokens_worse_pairs_tokens_in_order():
    from server.evaluation.scoring import DocumentScore, EvalResult, EvalSettings, share_of_tokens_worse

    def result(*documents):
        return EvalResult(EvalSettings(), [DocumentScore("d", 1, len(lp), 0.0, token_logprobs=lp) for lp in documents])

    base = result([-1.0, -2.0, -3.0], [-0.5])
    other = result([-1.5, -2.0, -2.0], [-0.6])
    assert share_of_tokens_worse(base, other) == 2 / 4
    assert share_of_tokens_worse(base, base) == 0.0
    with pytest.raises(ValueError):
        share_of_tokens_worse(base, result([-1.0], [-0.5]))


def test_document_windows_spread_over_the_whole_text_at_line_starts():
    from server.evaluation.scoring import document_windows

    text = "".join(f"line {i:04d} " + "x" * (i % 37) + "\n" for i in range(2000))
    windows = document_windows(text, 5, 1000)
    assert len(windows) == 5 and windows[0] == (0, text[:1000])
    offsets = [offset for offset, _ in windows]
    assert all(offset == 0 or text[offset - 1] == "\n" for offset in offsets)
    assert all(b >= a + 1000 for a, b in zip(offsets, offsets[1:]))  # no overlap
    assert offsets[-1] >= len(text) - 1000 - 60  # the last one reaches the end (one line's slack)
    assert all(window == text[offset: offset + 1000] for offset, window in windows)
    assert document_windows(text, 1, 1000) == [(0, text[:1000])]
    assert document_windows("short\n", 5, 1000) == [(0, "short\n")]
    assert len(document_windows(text, 10**6, 1000)) <= len(text) // 1000


def test_computed_tokens_count_what_the_prefix_cache_would_not_serve():
    """Whole KV blocks shared with the previous span's prompt of the same document are served."""
    from types import SimpleNamespace

    from server.evaluation.scoring import Evaluator, _Span

    evaluator = Evaluator.__new__(Evaluator)
    evaluator.engine = SimpleNamespace(config=SimpleNamespace(block_size=4))
    spans = [_Span(0, 0, 4), _Span(0, 4, 8), _Span(0, 8, 12), _Span(1, 0, 4)]
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5]]
    # 5 (nothing before) + 9 - 4 (one shared block) + 6 (differs at once) + 5 (another document)
    assert evaluator._computed_tokens(spans, prompts) == 5 + 5 + 6 + 5


def test_a_span_whose_neighbours_come_back_continues_the_previous_span_prompt():
    """Eval builds span contexts with the generation loop's next_context: when span j+1 retrieves
    span j's chunks (any order), its prompt is span j's prompt followed by its own target."""
    from types import SimpleNamespace

    from server.evaluation.scoring import EvalSettings, Evaluator, _Span

    def chunk(chunk_id):
        return SimpleNamespace(chunk_id=chunk_id, chunk_tokens=(chunk_id,) * 3, continuation_tokens=(chunk_id,) * 2)

    evaluator = Evaluator.__new__(Evaluator)
    evaluator.engine = SimpleNamespace(max_model_len=2048)
    evaluator.separator_ids, evaluator.start_ids = (9,), [7]
    ids = list(range(100, 148))
    spans = [_Span(0, 0, 16), _Span(0, 16, 32, [chunk(1), chunk(2)]), _Span(0, 32, 48, [chunk(2), chunk(1)])]
    for span in spans:
        span.candidates = list(span.neighbours)
    built = evaluator._contexts(spans, [ids], EvalSettings(stride=16, layout="suffix"))
    assert [c.continued for c in built] == [False, False, True]
    assert built[0].token_ids == [7]
    assert built[1].token_ids[: 1 + 16] == [7] + ids[:16]  # suffix: the document so far comes first
    assert built[2].token_ids == built[1].token_ids + ids[16:32]
    relaid = evaluator._contexts(spans, [ids], EvalSettings(stride=16, layout="suffix", keep_same_neighbours=False))
    assert not relaid[2].continued and relaid[2].token_ids[: 1 + 32] == [7] + ids[:32]


def test_bench_knn_refuses_a_token_datastore_built_from_the_scored_documents(tmp_path, capsys):
    """bench_knn publishes token-mode figures, so it runs eval's leakage guard before any engine starts."""
    from bench import bench_knn

    scored = tmp_path / "scored.rst"
    scored.write_text("Held-out text.\n")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"heldout": [str(scored)], "datastore": []}))
    store = tmp_path / "token"
    store.mkdir()
    (store / "docs.json").write_text(json.dumps([{"source": str(scored)}]))
    assert bench_knn.main(["--split", str(split), "--token-datastore", str(store)]) == 2
    assert "was built from 1 of the scored documents" in capsys.readouterr().err


def test_eval_modes_select_the_grid_and_hybrid_pairs_every_chunk_with_every_token_setting():
    def grid(*extra):
        args = build_parser().parse_args(["eval", "run", "--heldout", "x.rst", "--datastore", "d", "--token-datastore",
                                          "t", "--k", "2", "4", "--knn-lambda", "0.1", "0.25", *extra])
        return [(s.mode, s.neighbours if s.mode != "token" else None,
                 s.knn_lambda if s.mode != "chunk" else None) for s in eval_cli.settings_grid(args)
                if s.mode != "none"]

    assert grid() == [("chunk", 2, None), ("chunk", 4, None), ("token", None, 0.1), ("token", None, 0.25)]
    assert grid("--modes", "none", "hybrid") == [("hybrid", 2, 0.1), ("hybrid", 2, 0.25), ("hybrid", 4, 0.1),
                                                 ("hybrid", 4, 0.25)]


def test_eval_retriever_grid_scores_each_ranking_method_and_names_it():
    args = build_parser().parse_args(["eval", "run", "--heldout", "x.rst", "--datastore", "d", "--k", "2", "4",
                                      "--retriever", "dense", "fusion"])
    chunk = [s for s in eval_cli.settings_grid(args) if s.mode == "chunk"]
    assert [(s.retriever, s.neighbours) for s in chunk] == [("dense", 2), ("dense", 4), ("fusion", 2), ("fusion", 4)]
    assert "fusion" in chunk[2].label() and "dense" not in chunk[0].label()  # dense is unnamed, as before BM25
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "run", "--heldout", "x.rst", "--retriever", "tfidf"])


def test_eval_neighbour_tokens_grid_names_the_shorter_neighbours():
    args = build_parser().parse_args(["eval", "run", "--heldout", "x.rst", "--datastore", "d",
                                      "--neighbour-tokens", "0", "64"])
    chunk = [s for s in eval_cli.settings_grid(args) if s.mode == "chunk"]
    assert [s.neighbour_tokens for s in chunk] == [0, 64]
    assert "last64" in chunk[1].label() and "last" not in chunk[0].label()
