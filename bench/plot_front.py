"""The quality/speed front users choose a setting from: bits per byte against served throughput.

Joins two measurements of the same model and datastore: bits per byte per (layout, stride) from
`retroserve eval run` or `eval ablate` (results.json) and served output tokens/s per (layout,
stride) at one concurrency from `bench/bench_serving.py` (serving.json: scenario `none` and the
`chunk-strideN[-LAYOUT]` scenarios; a scenario without a layout ran the server's default).
Optional `--alone NAME=results.json` adds other models scored alone (e.g. Gemma-3 270M) at the
model-alone throughput of their own serving run (`NAME=results.json:serving.json`). Prints the
table and writes a PNG. Not a test.

    .venv/bin/python bench/plot_front.py --quality docs/results/pydocs_layouts.json \\
        --serving docs/results/serving_pydocs.json --concurrency 16 --out docs/img/pydocs_front.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ALONE = ("alone", None)


def quality_points(results: dict) -> dict:
    """{(layout, stride) or ALONE: bits per byte} from eval run/ablate results (chunk k rows at the
    first k only, so one front compares layouts and strides)."""
    rows = results["rows"]
    points = {}
    k = next((r["settings"]["neighbours"] for r in rows if r["settings"]["mode"] == "chunk"), None)
    for row in rows:
        settings = row["settings"]
        if settings["mode"] == "none":
            points.setdefault(ALONE, row["bits_per_byte"])
        elif settings["mode"] == "chunk" and settings["neighbours"] == k and not settings.get("keep_rank_margin"):
            factor = row.get("ablation", {}).get("factor", "base")
            if factor in ("base", "stride"):
                points.setdefault((settings.get("layout", "prepend"), settings["stride"]), row["bits_per_byte"])
    return points


def speed_points(serving: dict, concurrency: int) -> dict:
    """{(layout, stride) or ALONE: output tokens/s} at `concurrency`."""
    default = serving.get("default_layout", "prepend")
    scenarios = serving.get("scenarios", {})
    points = {}
    for row in serving["rows"]:
        if row["concurrency"] != concurrency:
            continue
        options = scenarios.get(row["scenario"])
        if row["scenario"] == "none":
            points[ALONE] = row["output_tokens_per_s"]
        elif options and options.get("mode") == "chunk" and set(options) <= {"mode", "stride", "layout"}:
            points[(options.get("layout", default), options["stride"])] = row["output_tokens_per_s"]
    return points


def front_points(quality: dict, serving: dict, concurrency: int) -> list[dict]:
    """[{layout, stride (None: model alone), bits_per_byte, tokens_per_s}] measured by both files."""
    bits, speed = quality_points(quality), speed_points(serving, concurrency)
    keys = sorted(set(bits) & set(speed), key=lambda key: (key[0] != "alone", key[0], key[1] or 0))
    return [{"layout": key[0], "stride": key[1], "bits_per_byte": bits[key], "tokens_per_s": speed[key]}
            for key in keys]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quality", "--ablations", dest="quality", type=Path, required=True)
    parser.add_argument("--serving", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--alone", action="append", default=[],
                        help="NAME=results.json:serving.json, another model alone (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    points = front_points(json.loads(args.quality.read_text()), json.loads(args.serving.read_text()),
                          args.concurrency)
    for spec in args.alone:
        name, files = spec.split("=", 1)
        quality_file, serving_file = files.split(":", 1)
        other = front_points(json.loads(Path(quality_file).read_text()),
                             json.loads(Path(serving_file).read_text()), args.concurrency)
        points += [dict(p, layout=name) for p in other if p["stride"] is None]
    if len(points) < 2:
        raise SystemExit("no (layout, stride) is in both files: score the strides and layouts the serving "
                         "run measured (chunk-strideN[-LAYOUT] scenarios)")
    alone = next((p for p in points if p["layout"] == "alone"), None)
    print(f"{'setting':>24s} {'bits/byte':>9s} {'tok/s':>7s} {'vs alone':>8s}")
    for p in points:
        name = p["layout"] if p["stride"] is None else f"{p['layout']}, every {p['stride']}"
        ratio = f"{p['tokens_per_s'] / alone['tokens_per_s']:.2f}x" if alone else ""
        print(f"{name:>24s} {p['bits_per_byte']:9.4f} {p['tokens_per_s']:7.1f} {ratio:>8s}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for layout in dict.fromkeys(p["layout"] for p in points if p["stride"] is not None):
        line = sorted((p for p in points if p["layout"] == layout), key=lambda p: p["tokens_per_s"])
        ax.plot([p["tokens_per_s"] for p in line], [p["bits_per_byte"] for p in line], "o-", label=layout)
    for p in points:
        label = p["layout"] if p["stride"] is None else f"stride {p['stride']}"
        marker = "s" if p["stride"] is None else None
        if marker:
            ax.plot(p["tokens_per_s"], p["bits_per_byte"], marker, color="black")
        ax.annotate(label, (p["tokens_per_s"], p["bits_per_byte"]), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
    ax.set_xlabel(f"served output tokens/s at concurrency {args.concurrency}")
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title("Chunk retrieval: quality vs throughput by layout and stride")
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
