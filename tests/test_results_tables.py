"""bench/results_tables.py: the README's tables are made from the committed results JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import results_tables

REPO = Path(__file__).resolve().parents[1]


def test_every_marked_readme_table_matches_its_results_file():
    assert results_tables.check(REPO / "README.md") == []


def test_an_edited_figure_is_caught(tmp_path):
    rows = [{"label": "model alone", "tokens": 100, "bits_per_byte": 1.0, "settings": {"mode": "none"}},
            {"label": "chunk k=2", "tokens": 100, "bits_per_byte": 0.9, "tokens_worse_vs_alone": 0.25,
             "vs_alone": {"change": -0.1, "low": -0.15, "high": -0.05, "documents": 4, "documents_worse": 1}}]
    (tmp_path / "r.json").write_text(json.dumps({"invocation": "retroserve eval run", "rows": rows}))
    made = results_tables.table(tmp_path / "r.json")
    assert made[0] == "`retroserve eval run`"
    assert made[-1] == "| chunk k=2 | 100 | 0.9000 | -10.0% [-15.0, -5.0] | 1 of 4 |  | 25.0% |"
    readme = tmp_path / "README.md"
    readme.write_text("\n".join(["# x", "<!-- table: r.json -->", *made, ""]))
    assert results_tables.check(readme) == []
    readme.write_text(readme.read_text().replace("0.9000", "0.8900"))
    assert len(results_tables.check(readme)) == 1


def test_an_unknown_results_file_is_refused(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"rows": [{"foo": 1}]}))
    with pytest.raises(ValueError, match="neither"):
        results_tables.table(tmp_path / "x.json")


def test_a_sweep_gives_one_row_per_size_with_the_step_from_the_next_smaller():
    step = {"change": -0.03, "low": -0.06, "high": -0.01, "documents": 12, "documents_worse": 3}
    rows = [{"fraction": 1.0, "settings": {"mode": "chunk"}, "datastore": {"entries": 40000}, "tokens": 3000,
             "bits_per_byte": 1.05,
             "vs_alone": {"change": -0.1, "low": -0.15, "high": -0.05, "documents": 12, "documents_worse": 0},
             "vs_smaller": step},
            {"fraction": 0.1, "settings": {"mode": "chunk"}, "datastore": {"entries": 4000}, "tokens": 3000,
             "bits_per_byte": 1.08,
             "vs_alone": {"change": -0.07, "low": -0.1, "high": -0.04, "documents": 12, "documents_worse": 0}}]
    made = results_tables.table_from_payload({"rows": rows})
    assert made[:2] == ["| datastore | chunks | scored tokens | bits per byte | change vs alone [95%] | documents worse "
                        "| vs next smaller [95%] | documents worse |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    assert made[2:] == [
        "| 10% of the files | 4,000 | 3,000 | 1.0800 | -7.0% [-10.0, -4.0] | 0 of 12 |  |  |",
        "| 100% of the files | 40,000 | 3,000 | 1.0500 | -10.0% [-15.0, -5.0] | 0 of 12 | -3.0% [-6.0, -1.0] | 3 of 12 |",
    ]
    # A token-mode sweep (`eval sweep --token-datastore`) cuts documents of a token datastore: entries.
    for row, documents in zip(rows, (16, 2)):
        row["settings"]["mode"] = "token"
        row["datastore"]["documents"] = documents
    made = results_tables.table_from_payload({"rows": rows})
    assert made[0].startswith("| datastore | entries |")
    assert made[2].startswith("| 10% of the documents (2) | 4,000 |")


def test_a_cloze_file_gives_exact_match_per_mode_with_the_change_from_the_model_alone():
    rows = [{"mode": "none", "items": 200, "hits": 50, "accuracy": 0.25, "low": 0.2, "high": 0.3},
            {"mode": "chunk", "items": 200, "hits": 70, "accuracy": 0.35, "low": 0.29, "high": 0.41,
             "vs_base": {"base": "none", "points": 10.0, "low": 6.5, "high": 13.25, "won": 30, "lost": 10}}]
    made = results_tables.table_from_payload({"command": "cloze", "invocation": "retroserve eval cloze", "rows": rows})
    assert made[0] == "`retroserve eval cloze`"
    assert made[-2:] == ["| none | 200 | 25.0% [20.0, 30.0] |  |  |",
                         "| chunk | 200 | 35.0% [29.0, 41.0] | +10.0 [+6.5, +13.2] | 30 / 10 |"]


def test_a_knn_bench_file_gives_bits_per_byte_searches_avoided_and_throughput_per_scenario():
    rows = [{"scenario": "model alone", "bits_per_byte": 1.0, "relative_to_knn": None, "eval_skipped_fraction": 0.0,
             "eval_pointer_fraction": 0.0, "gen_skipped_fraction": 0.0, "gen_pointer_fraction": 0.0,
             "search_ms_per_step": None, "mix_ms_per_step": None,
             "tokens_per_s": {"1": 10.0, "16": 60.0}, "throughput_vs_model": {"1": 1.0, "16": 1.0}},
            {"scenario": "kNN-LM", "bits_per_byte": 0.9, "relative_to_knn": 0.0, "eval_skipped_fraction": 0.25,
             "eval_pointer_fraction": 0.5, "gen_skipped_fraction": 0.125, "gen_pointer_fraction": 0.0,
             "search_ms_per_step": 12.34, "mix_ms_per_step": 2.0,
             "tokens_per_s": {"1": 9.0, "16": 45.0}, "throughput_vs_model": {"1": 0.9, "16": 0.75}}]
    made = results_tables.table_from_payload({"invocation": "python bench/bench_knn.py",
                                              "arguments": {"concurrency": [1, 16]}, "rows": rows})
    assert made[0] == "`python bench/bench_knn.py`"
    assert made[-2:] == ["| model alone | 1.0000 |  |  |  | 10.0 | 1.00 | 60.0 | 1.00 |",
                         "| kNN-LM | 0.9000 | +0.00% | 25.0% / 50.0%; 12.5% / 0.0% | 12.3 + 2.0 | 9.0 | 0.90 | 45.0 | 0.75 |"]


def test_a_token_search_file_gives_time_recall_and_distribution_distance_per_index():
    rows = [{"factory": "IVF8,Flat", "params": {"nprobe": 2}, "search_ms_p50": 1.234, "search_ms_p90": 2.0,
             "recall": 0.9876, "tv_mean": 0.01234, "tv_p90": 0.05}]
    made = results_tables.table_from_payload({"arguments": {"k": 64, "batch": 16}, "rows": rows})
    assert made == ["| index | search params | ms per 16 queries, p50 / p90 | recall@64 | p_kNN total variation, mean / p90 |",
                    "| --- | --- | ---: | ---: | ---: |",
                    "| IVF8,Flat | nprobe 2 | 1.2 / 2.0 | 0.988 | 0.0123 / 0.0500 |"]
