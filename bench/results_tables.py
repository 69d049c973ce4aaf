"""Markdown tables from the committed results JSON (docs/results/), so every README figure can be
checked against the run it came from.

    python bench/results_tables.py docs/results/pydocs_hybrid_test.json [more.json ...]
    python bench/results_tables.py --check README.md

Each file gives one table, with the command that produced it above. `eval run` files (rows with
bits per byte) give bits per byte, the change against the model alone with its 95% interval and
documents worse, the prose-only change and the share of tokens made less likely; `eval sweep`
files give each datastore size with the step from the next smaller one; `bench_serving`
files give throughput and latency ratios against their first row; `eval cloze` files give exact
match per mode with its difference from the model alone; `bench_knn` files give bits per byte,
searches avoided, kNN time per step and throughput against the model alone per scenario;
`bench_token_search` files give search time, recall and p_kNN distance per index. `--check` finds every
`<!-- table: PATH -->` marker in a Markdown file and fails when the table under it differs from
the one this script makes from PATH.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

MARKER = re.compile(r"^<!-- table: (\S+) -->$")


def _interval(interval: dict | None) -> str:
    if not interval:
        return ""
    return (f"{interval['change'] * 100:+.1f}% [{interval['low'] * 100:+.1f}, {interval['high'] * 100:+.1f}]")


def _worse(interval: dict | None) -> str:
    return f"{interval['documents_worse']} of {interval['documents']}" if interval else ""


def eval_table(payload: dict) -> list[str]:
    lines = ["| setting | scored tokens | bits per byte | change vs alone [95%] | documents worse "
             "| prose only vs alone [95%] | tokens worse |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in payload["rows"]:
        worse = row.get("tokens_worse_vs_alone")
        lines.append(f"| {row['label']} | {row['tokens']:,} | {row['bits_per_byte']:.4f} "
                     f"| {_interval(row.get('vs_alone'))} | {_worse(row.get('vs_alone'))} "
                     f"| {_interval(row.get('prose_vs_alone'))} | {'' if worse is None else f'{worse:.1%}'} |")
    return lines


def sweep_table(payload: dict) -> list[str]:
    """`eval sweep`: one row per datastore size, with the step from the next smaller one (a token-mode
    sweep counts entries of nested document subsets, a chunk-mode sweep chunks of nested file subsets)."""
    token = any(row["settings"]["mode"] == "token" for row in payload["rows"])
    lines = [f"| datastore | {'entries' if token else 'chunks'} | scored tokens | bits per byte | change vs alone [95%] "
             "| documents worse | vs next smaller [95%] | documents worse |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in sorted(payload["rows"], key=lambda r: r["fraction"]):
        what = f"of the documents ({row['datastore']['documents']})" if token else "of the files"
        lines.append(f"| {row['fraction']:.0%} {what} | {row['datastore']['entries']:,} | {row['tokens']:,} "
                     f"| {row['bits_per_byte']:.4f} | {_interval(row.get('vs_alone'))} | {_worse(row.get('vs_alone'))} "
                     f"| {_interval(row.get('vs_smaller'))} | {_worse(row.get('vs_smaller'))} |")
    return lines


def serving_table(payload: dict) -> list[str]:
    rows = payload["rows"]
    base = rows[0]["output_tokens_per_s"]
    lines = ["| scenario | tok/s | vs first row | inter-token p50 / p99 ms | computed prompt per generated token |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['scenario']} | {row['output_tokens_per_s']:.1f} | {row['output_tokens_per_s'] / base:.2f}x "
                     f"| {row['inter_token_p50_ms']:.0f} / {row['inter_token_p99_ms']:.0f} "
                     f"| {row.get('computed_prompt_per_generated', 0.0):.1f} |")
    return lines


def knn_bench_table(payload: dict) -> list[str]:
    """bench_knn.py: one row per scenario (throughput ratios against the model alone of the first engine)."""
    concurrency = [int(c) for c in payload["arguments"]["concurrency"]]
    lines = ["| scenario | bits per byte | vs kNN-LM | searches skipped / avoided (scoring; generating) "
             "| kNN ms per step: search + mix | " + " | ".join(f"tok/s c={c} | x model" for c in concurrency) + " |",
             "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---: | ---:" for _ in concurrency) + " |"]
    for row in payload["rows"]:
        relative = "" if row.get("relative_to_knn") is None else f"{100 * row['relative_to_knn']:+.2f}%"
        if row["scenario"] == "model alone":
            avoided = ""
        else:
            avoided = (f"{row['eval_skipped_fraction']:.1%} / {row['eval_pointer_fraction']:.1%}; "
                       f"{row['gen_skipped_fraction']:.1%} / {row['gen_pointer_fraction']:.1%}")
        timing = ("" if row.get("search_ms_per_step") is None
                  else f"{row['search_ms_per_step']:.1f} + {row['mix_ms_per_step']:.1f}")
        speeds = " | ".join(f"{row['tokens_per_s'][str(c)]:.1f} | {row['throughput_vs_model'][str(c)]:.2f}"
                            for c in concurrency)
        lines.append(f"| {row['scenario']} | {row['bits_per_byte']:.4f} | {relative} | {avoided} | {timing} | {speeds} |")
    return lines


def token_search_table(payload: dict) -> list[str]:
    """bench_token_search.py: one row per index and search setting."""
    k = payload["arguments"]["k"]
    lines = [f"| index | search params | ms per {payload['arguments']['batch']} queries, p50 / p90 "
             f"| recall@{k} | p_kNN total variation, mean / p90 |",
             "| --- | --- | ---: | ---: | ---: |"]
    for row in payload["rows"]:
        params = ", ".join(f"{key} {value}" for key, value in row["params"].items())
        lines.append(f"| {row['factory']} | {params} | {row['search_ms_p50']:.1f} / {row['search_ms_p90']:.1f} "
                     f"| {row['recall']:.3f} | {row['tv_mean']:.4f} / {row['tv_p90']:.4f} |")
    return lines


def table(path: Path) -> list[str]:
    try:
        return table_from_payload(json.loads(path.read_text(encoding="utf-8")))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def table_from_payload(payload: dict) -> list[str]:
    rows = payload.get("rows") or []
    if payload.get("command") == "cloze":
        from server.evaluation.cloze import cloze_table

        lines = cloze_table(rows)
    elif rows and "throughput_vs_model" in rows[0]:  # bench_knn rows carry bits per byte too
        lines = knn_bench_table(payload)
    elif rows and "fraction" in rows[0]:
        lines = sweep_table(payload)
    elif rows and "bits_per_byte" in rows[0]:
        lines = eval_table(payload)
    elif rows and "output_tokens_per_s" in rows[0]:
        lines = serving_table(payload)
    elif rows and "recall" in rows[0] and "tv_mean" in rows[0]:
        lines = token_search_table(payload)
    else:
        raise ValueError("neither `eval run`/`eval sweep` nor bench_serving results (no rows with bits_per_byte "
                         "or output_tokens_per_s)")
    if payload.get("invocation"):
        lines = [f"`{payload['invocation']}`", ""] + lines
    return lines


def check(markdown: Path) -> list[str]:
    """Markers whose table differs from the one made from its JSON (empty: all agree)."""
    text = markdown.read_text(encoding="utf-8").splitlines()
    problems = []
    for number, line in enumerate(text):
        match = MARKER.match(line)
        if not match:
            continue
        expected = table(markdown.parent / match.group(1))
        found = text[number + 1: number + 1 + len(expected)]
        if found != expected:
            problems.append(f"{markdown}:{number + 1}: the table under {match.group(0)} differs from "
                            f"`python bench/results_tables.py {match.group(1)}`")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", type=Path, help="results JSON files")
    parser.add_argument("--check", type=Path, default=None, help="a Markdown file whose marked tables to verify")
    args = parser.parse_args(argv)
    for path in args.results:
        print(f"<!-- table: {path} -->")
        print("\n".join(table(path)))
        print()
    if args.check:
        problems = check(args.check)
        print("\n".join(problems) or f"{args.check}: every marked table matches its JSON",
              file=sys.stderr if problems else sys.stdout)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
