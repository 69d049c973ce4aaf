"""Cloze items and their scoring (server/evaluation/cloze.py); served end to end in test_knn_serving.py."""

from __future__ import annotations

import random

import numpy as np
import pytest

from server.evaluation import cloze

OPENING = "The os module\n=============\n\n" + "This module provides a portable way of using operating system services. " * 4


def test_items_are_the_text_before_each_name_the_text_has_not_named_yet():
    text = (OPENING + "\nCall :func:`os.getcwd` to read it, or :func:`os.getcwd` again; "
            "see ``O_RDONLY`` and :option:`--verbose` and :meth:`~dict.get()` and ``x``, "
            ":ref:`the tutorial <tut-os>` and ``a + b``.")
    items = cloze.document_items("os.rst", text, per_document=10, context_chars=1000, min_context_chars=200)
    assert [item.answer for item in items] == ["os.getcwd", "O_RDONLY", "--verbose", "dict.get"]
    first = items[0]
    assert text[first.offset:].startswith(":func:`os.getcwd`")
    assert first.prompt == text[:first.offset].rstrip() and first.prompt.endswith("Call")
    # the second os.getcwd is named in its own prompt: no item; short names, titles, expressions: none
    assert all(not cloze.names_in(item.prompt, item.answer) for item in items)


def test_a_name_too_close_to_the_start_has_no_item_and_long_prompts_start_at_a_line():
    text = "``early_name`` here.\n" + OPENING * 3 + "\nfinally ``late_name`` appears."
    items = cloze.document_items("a.rst", text, per_document=10, context_chars=300, min_context_chars=200)
    assert [item.answer for item in items] == ["late_name"]
    prompt = items[0].prompt
    assert len(prompt) <= 300 and text[:items[0].offset].rstrip().endswith(prompt)
    assert text[text.rindex(prompt) - 1] == "\n"  # it starts at a line start


def test_items_spread_evenly_over_a_document_with_more_candidates_than_asked():
    text = OPENING + " ".join(f"then ``name_{i:03d}`` follows." for i in range(100))
    items = cloze.document_items("b.rst", text, per_document=5, context_chars=1000, min_context_chars=200)
    assert [item.answer for item in items] == [f"name_{i:03d}" for i in (0, 20, 40, 60, 80)]


@pytest.mark.parametrize("generated, hit", [
    (" :func:`os.getcwd` returns", True),
    (" os.getcwd() returns", True),
    (" the os.getcwdb function", False),
    (" os.getcwd.__doc__", False),
    (" one two three four five six seven os.getcwd", True),
    (" one two three four five six seven eight os.getcwd", False),
    (" pos.getcwd", False),
])
def test_a_hit_names_the_whole_answer_within_the_first_words(generated, hit):
    assert cloze.is_hit("os.getcwd", generated, words=8) is hit


def test_accuracy_and_its_paired_difference_resample_documents():
    rng = random.Random(0)
    items = [cloze.ClozeItem(f"doc{d}", i, "p", "name") for d in range(6) for i in range(rng.randint(2, 9))]
    base = [rng.random() < 0.3 for _ in items]
    other = [b or rng.random() < 0.3 for b in base]
    report = cloze.accuracy_intervals(items, {"none": base, "chunk": other, "same": base}, samples=2000)

    assert report["none"]["accuracy"] == pytest.approx(sum(base) / len(items))
    assert report["none"]["low"] <= report["none"]["accuracy"] <= report["none"]["high"]
    versus = report["chunk"]["vs_base"]
    assert versus["points"] == pytest.approx(100 * (sum(other) - sum(base)) / len(items))
    assert versus["won"] == sum(o and not b for b, o in zip(base, other)) and versus["lost"] == 0
    assert 0 <= versus["low"] <= versus["points"] <= versus["high"]
    assert report["same"]["vs_base"]["low"] == report["same"]["vs_base"]["high"] == 0.0

    # the interval is the percentile interval of the item-weighted difference over resampled documents
    sources = sorted({item.source for item in items}, key=lambda s: int(s[3:]))
    count = np.array([sum(item.source == s for item in items) for s in sources], dtype=float)
    gained = np.array([sum(o - b for item, b, o in zip(items, base, other) if item.source == s) for s in sources])
    draws = np.random.default_rng(0).integers(0, len(sources), size=(2000, len(sources)))
    low, high = np.percentile(100 * gained[draws].sum(axis=1) / count[draws].sum(axis=1), [2.5, 97.5])
    assert (versus["low"], versus["high"]) == pytest.approx((low, high))


def test_results_score_each_output_and_keep_its_first_words():
    items = [cloze.ClozeItem("a", 0, "p", "os.getcwd"), cloze.ClozeItem("b", 5, "q", "O_RDONLY")]
    payload = cloze.results_payload(items, {"none": [" os.getcwd() here", " O_WRONLY"],
                                            "chunk": [" nothing", " ``O_RDONLY`` flag and more words"]}, words=3)
    assert [(row["mode"], row["hits"]) for row in payload["rows"]] == [("none", 1), ("chunk", 1)]
    assert payload["rows"][1]["vs_base"]["won"] == 1 and payload["rows"][1]["vs_base"]["lost"] == 1
    assert payload["items"][1]["outputs"]["chunk"] == "``O_RDONLY`` flag and"
    assert payload["items"][1]["hits"] == {"none": False, "chunk": True}
