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
