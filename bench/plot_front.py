"""The quality/speed front users choose a stride from: bits per byte against served throughput.

Joins two measurements of the same model and datastore: bits per byte per stride from
`retroserve eval ablate` (its base row and its stride rows, results.json) and served output tokens/s
per stride at one concurrency from `bench/bench_serving.py` (serving.json, scenarios `none` and
`chunk-strideN`). Prints the table and writes a PNG. Not a test.

    .venv/bin/python bench/plot_front.py --ablations runs/pydocs/ablate/results.json \\
        --serving bench/results/serving.json --concurrency 16 --out docs/img/pydocs_front.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def front_points(ablations: dict, serving: dict, concurrency: int) -> list[dict]:
    """[{stride (None: model alone), bits_per_byte, tokens_per_s}] for every stride measured by both."""
    rows = ablations["rows"]
    quality = {None: rows[0]["bits_per_byte"]}
    for row in rows[1:]:
        if row["ablation"]["factor"] in ("base", "stride"):
            quality[row["settings"]["stride"]] = row["bits_per_byte"]
    speed = {}
    for row in serving["rows"]:
        if row["concurrency"] != concurrency:
            continue
        if row["scenario"] == "none":
            speed[None] = row["output_tokens_per_s"]
        elif row["scenario"].startswith("chunk-stride") and row["scenario"][12:].isdigit():
            speed[int(row["scenario"][12:])] = row["output_tokens_per_s"]
    return [{"stride": s, "bits_per_byte": quality[s], "tokens_per_s": speed[s]}
            for s in sorted(set(quality) & set(speed), key=lambda s: -1 if s is None else s)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablations", type=Path, required=True)
    parser.add_argument("--serving", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    points = front_points(json.loads(args.ablations.read_text()), json.loads(args.serving.read_text()),
                          args.concurrency)
    if len(points) < 2:
        raise SystemExit("no stride is in both files: run eval ablate with --stride and bench_serving with "
                         "matching chunk-strideN scenarios")
    print(f"{'retrieval':>16s} {'bits/byte':>9s} {'tok/s':>7s} {'vs alone':>8s}")
    alone = next((p for p in points if p["stride"] is None), None)
    for p in points:
        name = "none" if p["stride"] is None else f"every {p['stride']} tok"
        ratio = f"{p['tokens_per_s'] / alone['tokens_per_s']:.2f}x" if alone else ""
        print(f"{name:>16s} {p['bits_per_byte']:9.4f} {p['tokens_per_s']:7.1f} {ratio:>8s}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_speed = sorted(points, key=lambda p: p["tokens_per_s"])
    ax.plot([p["tokens_per_s"] for p in by_speed], [p["bits_per_byte"] for p in by_speed], "o-")
    for p in points:
        ax.annotate("model alone" if p["stride"] is None else f"stride {p['stride']}",
                    (p["tokens_per_s"], p["bits_per_byte"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(f"served output tokens/s at concurrency {args.concurrency}")
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title("Retrieval frequency: quality vs throughput")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
