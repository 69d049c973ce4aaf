"""`retroserve eval ablate`: change one thing at a time around a base setting, on one datastore.

The base setting is the first value of each of `--k`, `--stride` and `--query-tokens`. Every other
value of those is scored with the rest held at the base. The datastore side is varied the same way,
each variant derived from the base datastore's stored embeddings (no re-embedding):
- `--pca D`: the chunks re-indexed after PCA to D dimensions (`datastore reduce`);
- `--near-dup T`: exact and near-duplicate chunks (cosine >= T) pruned (`datastore prune`);
- `--index F`: the same chunks under another FAISS index, e.g. a compressed one.
Each row carries bits per byte and the search time per retrieval (the batched search of all of a
setting's queries divided by their number), so the quality cost and the speed gain sit side by
side. Writes results.json, ablations.png and prints the table.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from artefacts.cpu_kernels import machine_description
from server.config import CHUNK_MODES
from server.evaluation.cli import (add_intervals, add_scoring_arguments, exit_cleanly_on_sigterm, handles_errors,
                                   heldout_from_args, invocation, model_dir_from_args,
                                   print_table, score_grid, with_engine, write_results)
from server.evaluation.scoring import EvalSettings

log = logging.getLogger(__name__)


def settings_ablations(args) -> list[tuple[str, object, EvalSettings]]:
    """(factor, value, settings) for the base and each one-factor change of k, stride, query."""
    base = EvalSettings(mode="chunk", neighbours=args.k[0], stride=args.stride[0],
                        query_tokens=args.query_tokens[0], retriever=args.retriever[0], layout=args.layout[0],
                        neighbour_tokens=args.neighbour_tokens[0],
                        keep_same_neighbours=args.keep_same_neighbours, keep_rank_margin=args.keep_rank_margin[0],
                        suffix_repeat_tokens=args.suffix_repeat_tokens[0])
    rows = [("base", None, base)]
    rows += [("k", k, replace(base, neighbours=k)) for k in args.k[1:]]
    rows += [("stride", s, replace(base, stride=s)) for s in args.stride[1:]]
    rows += [("retriever", r, replace(base, retriever=r)) for r in args.retriever[1:]]
    rows += [("neighbour_tokens", n, replace(base, neighbour_tokens=n)) for n in args.neighbour_tokens[1:]]
    rows += [("query_tokens", q, replace(base, query_tokens=q)) for q in args.query_tokens[1:]]
    return rows


def derive_variants(base_dir: Path, output_dir: Path, args) -> list[tuple[str, object, Path, dict]]:
    """Build (or reuse) every datastore variant: (factor, value, path, what was done)."""
    from datastore_tools.prune import prune_datastore
    from datastore_tools.reduce import reduce_datastore

    variants = []
    for dim in args.pca:
        path = output_dir / "datastores" / f"pca-{dim}"
        if not (path / "manifest.json").is_file():
            reduce_datastore(base_dir, path, dim)
        variants.append(("pca", dim, path, {}))
    for threshold in args.near_dup:
        path = output_dir / "datastores" / f"near-dup-{threshold:g}"
        if not (path / "manifest.json").is_file():
            prune_datastore(base_dir, path, exact=True, near_dup=threshold)
        before, after = _chunks(base_dir), _chunks(path)
        variants.append(("near_dup", threshold, path, {"before": before, "removed": before - after}))
    for factory in args.index:
        path = output_dir / "datastores" / ("index-" + "".join(c if c.isalnum() else "_" for c in factory))
        if not (path / "manifest.json").is_file():
            reduce_datastore(base_dir, path, None, index=factory)
        variants.append(("index", factory, path, {}))
    return variants


def _chunks(datastore_dir: Path) -> int:
    return int(json.loads((datastore_dir / "manifest.json").read_text())["counts"]["chunks"])


def index_bytes_per_entry(datastore_dir: Path) -> float:
    from retriever import format as fmt

    return (datastore_dir / fmt.INDEX_FILE).stat().st_size / max(1, _chunks(datastore_dir))


def _annotate(row: dict, factor: str, value, datastore_dir: Path, extra: dict) -> dict:
    row["ablation"] = {"factor": factor, "value": value, **extra}
    if row["settings"]["mode"] in CHUNK_MODES:
        row["search_ms_per_retrieval"] = 1e3 * row["retrieval_seconds"] / max(1, row["retrievals"])
        row["index_bytes_per_entry"] = index_bytes_per_entry(datastore_dir)
    return row


async def ablate_async(args, engine=None) -> dict:
    documents = heldout_from_args(args)
    model_dir = Path(engine.config.model_dir) if engine is not None else model_dir_from_args(args)
    base_dir = Path(args.datastore)
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    variants = await loop.run_in_executor(None, derive_variants, base_dir, args.output_dir, args)
    log.info("datastore variants ready in %.0f s", time.perf_counter() - started)
    ablations = settings_ablations(args)
    base_settings = ablations[0][2]

    async def work(engine) -> list[dict]:
        grid = [EvalSettings(mode="none")] + [settings for _, _, settings in ablations]
        scored = await score_grid(engine, documents, grid, base_dir, args)
        rows = [_annotate(scored[0], "alone", None, base_dir, {})]
        rows += [_annotate(row, factor, value, base_dir, {})
                 for row, (factor, value, _) in zip(scored[1:], ablations)]
        for factor, value, path, info in variants:
            row = (await score_grid(engine, documents, [base_settings], path, args))[0]
            rows.append(_annotate(row, factor, value, path, info))
        return rows

    rows = await with_engine(model_dir, args, engine, work)
    add_intervals(rows)
    print_table(rows)
    print_ablations(rows)
    payload = {"command": "ablate", "invocation": invocation(), "machine": machine_description(),
               "documents": [d.source for d in documents], "base": rows[1]["settings"],
               "datastore": str(base_dir), "rows": rows, "max_doc_chars": args.max_doc_chars}
    path = write_results(args.output_dir, payload)
    plot_ablations(rows, args.output_dir / "ablations.png")
    print(f"wrote {path}")
    return payload


def print_ablations(rows: list[dict]) -> None:
    alone = rows[0]["bits_per_byte"]
    base = rows[1]["bits_per_byte"]
    print(f"{'factor':14s} {'value':>22s} {'bits/byte':>9s} {'vs base':>8s} {'vs alone':>8s} "
          f"{'search ms':>9s} {'index B/entry':>13s}")
    for row in rows[1:]:
        ablation = row["ablation"]
        print(f"{ablation['factor']:14s} {str(ablation['value'] if ablation['value'] is not None else ''):>22s} "
              f"{row['bits_per_byte']:9.4f} {(row['bits_per_byte'] / base - 1) * 100:+7.2f}% "
              f"{(row['bits_per_byte'] / alone - 1) * 100:+7.2f}% {row['search_ms_per_retrieval']:9.3f} "
              f"{row['index_bytes_per_entry']:13.1f}")


def plot_ablations(rows: list[dict], path: Path) -> None:
    """One panel per factor: bits per byte of each value, with the base and the model alone as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alone, base = rows[0], rows[1]
    factors: dict[str, list[dict]] = {}
    for row in rows[2:]:
        factors.setdefault(row["ablation"]["factor"], []).append(row)
    # The base is one point of each settings factor.
    base_value = {"k": base["settings"]["neighbours"], "stride": base["settings"]["stride"],
                  "query_tokens": base["settings"]["query_tokens"], "pca": "none (384)",
                  "near_dup": "none", "index": base.get("datastore", {}).get("index", "base")}
    if not factors:
        factors = {"k": []}
    columns = min(3, len(factors))
    rows_of_panels = -(-len(factors) // columns)
    fig, axes = plt.subplots(rows_of_panels, columns, figsize=(3.6 * columns, 3.4 * rows_of_panels),
                             sharey=True, squeeze=False)
    for ax, (factor, points) in zip(axes.flat, factors.items()):
        base_point = dict(base, ablation={"factor": factor, "value": base_value[factor]})
        points = [base_point] + points
        if factor in ("k", "stride", "query_tokens"):
            points.sort(key=lambda r: r["ablation"]["value"])
        labels = [str(p["ablation"]["value"]) for p in points]
        ax.bar(range(len(points)), [p["bits_per_byte"] for p in points],
               color=["tab:orange" if p is base_point else "tab:blue" for p in points])
        for x, p in enumerate(points):
            ax.annotate(f"{p['search_ms_per_retrieval']:.1f} ms", (x, p["bits_per_byte"]), ha="center",
                        va="bottom", fontsize=7)
        ax.axhline(alone["bits_per_byte"], color="tab:red", linestyle="--", label="model alone")
        ax.set_xticks(range(len(points)), labels, rotation=20, ha="right", fontsize=7)
        ax.set_title(factor)
    for ax in list(axes.flat)[len(factors):]:
        ax.axis("off")
    values = [r["bits_per_byte"] for r in rows]
    axes[0][0].set_ylim(min(values) * 0.97, max(values) * 1.03)
    axes[0][0].set_ylabel("bits per byte (lower is better)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("One change at a time from the base setting (orange); search ms per retrieval above bars",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_ablate(args) -> int:
    exit_cleanly_on_sigterm()
    asyncio.run(ablate_async(args))
    return 0


def add_ablate_command(commands) -> None:
    """Adds `ablate` to the `eval` subcommands (server.evaluation.cli.add_eval_commands)."""
    ablate = commands.add_parser("ablate", help="one change at a time around a base setting: k, stride, "
                                                "query length, PCA, pruning, index type")
    ablate.add_argument("--split", type=Path, default=None)
    ablate.add_argument("--heldout", type=Path, nargs="+", default=None)
    ablate.add_argument("--datastore", type=Path, required=True, help="the base datastore")
    ablate.add_argument("--pca", type=int, nargs="*", default=[128], help="PCA dimensions to try")
    ablate.add_argument("--near-dup", type=float, nargs="*", default=[0.95],
                        help="near-duplicate pruning thresholds (cosine) to try")
    ablate.add_argument("--index", nargs="*", default=["IVF256,PQ384x4fs"],
                        help="other FAISS indexes to try (the default is the build's choice for ~100k entries; "
                             "a small datastore needs fewer IVF lists, e.g. IVF16,PQ384x4fs)")
    add_scoring_arguments(ablate)
    # First value of each is the base setting.
    ablate.set_defaults(k=[2, 1, 4], stride=[16, 64], query_tokens=[32, 16, 64], func=handles_errors(run_ablate))
