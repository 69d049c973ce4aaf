"""kNN-LM speed benchmark: bits per byte and greedy-generation throughput of the model alone, plain
kNN-LM and each speed technique (issue 5), in one table.

Rows: model alone; kNN-LM; adaptive retrieval (--skip-above-prob); pointer following
(--pointer-min); both together; and, when given, a greedy-merged datastore (--merged-datastore,
`retroserve datastore prune --mode token`) and a PCA datastore (--pca-datastore, built with
`datastore build --mode token --pca N`) and any `--variant NAME=DIR` (e.g. the same keys under a
fast-scan index: `datastore reduce --index IVF512,PQ288x4fs,RFlat`), each as plain kNN-LM (a variant
also with adaptive retrieval) on its own engine. Per row: bits per
byte on the held-out split (as `retroserve eval run --token-datastore` scores it: one request per
document, prompt log-probs through the engine's kNN model class), the fraction of token-mode rows
whose search was skipped (adaptive) or avoided (pointers) while scoring and while generating
(the engine's KnnStats), the engine process's kNN time per engine step while generating (finding
neighbours, by search or pointers; mixing), and output tokens/s of greedy generation at each --concurrency (prompts:
the first --prompt-chars of held-out documents; generation may stop early at EOS, so tokens are
counted, not assumed). Everything runs in this process through server/core/engine.py, like `eval run`.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_knn.py --split runs/pydocs/split.json \\
        --token-datastore DIR [--merged-datastore DIR] [--pca-datastore DIR] --output runs/knn-bench.json
    # tiny: --max-docs 2 --max-doc-chars 400 --max-tokens 8 --requests 2 --concurrency 1 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from server.knn.settings import (DEFAULT_KNN_K, DEFAULT_KNN_LAMBDA, DEFAULT_KNN_POINTER_POOL,  # noqa: E402
                                 DEFAULT_KNN_POINTER_RADIUS, DEFAULT_KNN_TEMPERATURE, knn_fractions)

log = logging.getLogger("bench_knn")


@dataclass
class Scenario:
    name: str
    datastore: str  # "main", "merged", "pca" or a --variant name: which engine serves it
    mode: str  # "none" or "token"
    skip_above_prob: float = 1.0
    pointer_min: int = 0
    gate_threshold: float = 0.0
    """Learned gate (an engine setting: each threshold gets its own engine on the main datastore)."""


@dataclass
class Row:
    scenario: str
    datastore: str
    entries: int
    bits_per_byte: float
    relative_to_knn: float | None
    """bits per byte relative to plain kNN-LM on the main datastore (0.01 = 1% worse)."""
    eval_skipped_fraction: float
    eval_pointer_fraction: float
    tokens_per_s: dict[int, float] = field(default_factory=dict)
    """Output tokens/s of greedy generation per concurrency."""
    throughput_vs_model: dict[int, float] = field(default_factory=dict)
    gen_skipped_fraction: float = 0.0
    gen_pointer_fraction: float = 0.0
    eval_seconds: float = 0.0
    search_ms_per_step: float | None = None
    """Engine-process time finding neighbours (search or pointers) per kNN step while generating."""
    mix_ms_per_step: float | None = None
    """Engine-process time looking up values and interpolating per kNN step while generating."""
    rows_per_step: float | None = None
    """Token-mode rows per kNN step while generating (the batch a search serves)."""


def scenarios(args) -> list[Scenario]:
    """Rows in order; pointers get a row per --pointer-min value, the combinations use the first."""
    first = args.pointer_min[0]
    out = [Scenario("model alone", "main", "none"), Scenario("kNN-LM", "main", "token"),
           Scenario(f"adaptive skip>{args.skip_above_prob:g}", "main", "token", skip_above_prob=args.skip_above_prob)]
    out += [Scenario(f"pointers>={m}", "main", "token", pointer_min=m) for m in args.pointer_min]
    out.append(Scenario(f"adaptive+pointers>={first}", "main", "token", skip_above_prob=args.skip_above_prob,
                        pointer_min=first))
    if args.merged_datastore:
        out.append(Scenario("greedy-merged", "merged", "token"))
        out.append(Scenario(f"greedy-merged+pointers>={first}", "merged", "token", pointer_min=first))
    if args.pca_datastore:
        out.append(Scenario("PCA", "pca", "token"))
    if args.gate_threshold:
        out += [Scenario(f"learned gate<{t:g}", "gate", "token", gate_threshold=t) for t in args.gate_threshold]
    for name, _ in args.variant:
        out.append(Scenario(f"kNN-LM, {name}", name, "token"))
        if args.skip_above_prob < 1:
            out.append(Scenario(f"{name} + adaptive skip>{args.skip_above_prob:g}", name, "token",
                                skip_above_prob=args.skip_above_prob))
    return out


def variant(text: str) -> tuple[str, Path]:
    """--variant NAME=DIR."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path or name in ("main", "merged", "pca", "gate"):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=DIR with a NAME other than "
                                         "main, merged and pca (e.g. fastscan=runs/pydocs/token-small-fs)")
    return name, Path(path)


def knn_settings(args, scenario: Scenario):
    from server.knn.settings import KnnRequestSettings

    if scenario.mode != "token":
        return None
    return KnnRequestSettings(lam=args.knn_lambda, k=args.knn_k, temperature=args.knn_temperature,
                              skip_above_prob=scenario.skip_above_prob, pointer_min=scenario.pointer_min)


async def throughput(engine, prompts: list[list[int]], knn, concurrency: int, max_tokens: int, tag: str) -> float:
    """Output tokens/s of greedy generation, `concurrency` requests in flight until `prompts` are done."""
    from server.core.engine import SegmentSampling

    queue = list(enumerate(prompts))
    produced = 0

    async def worker() -> None:
        nonlocal produced
        while queue:
            number, prompt = queue.pop()
            sampling = SegmentSampling(max_tokens=max_tokens, knn=knn)
            async for delta in engine.generate_segment(prompt, sampling, f"bench-{tag}-{concurrency}-{number}"):
                produced += len(delta.token_ids)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return produced / (time.perf_counter() - started)


async def run_engine(args, datastore: Path, runs: list[Scenario], documents, model_dir: Path,
                     gate_threshold: float = 0.0) -> list[Row]:
    from server.config import EngineConfig
    from server.core.engine import Engine
    from server.evaluation.scoring import EvalSettings, Evaluator

    loop = asyncio.get_running_loop()
    config = EngineConfig(model_dir=model_dir, max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
                          max_num_seqs=max(args.concurrency), token_datastore=datastore,
                          knn_pointer_pool=args.knn_pointer_pool, knn_pointer_radius=args.knn_pointer_radius,
                          knn_gate_threshold=gate_threshold)
    engine = await loop.run_in_executor(None, Engine.start, config, None if args.device == "auto" else args.device)
    rows = []
    try:
        evaluator = Evaluator(engine, max_doc_chars=args.max_doc_chars, concurrency=args.eval_concurrency)
        tokenizer = engine.tokenizer
        count = max(args.requests, max(args.concurrency))
        texts = [documents[i % len(documents)].text[: args.prompt_chars] for i in range(count)]
        prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        await throughput(engine, prompts[:2], None, 1, 2, "warmup")
        for scenario in runs:
            knn = knn_settings(args, scenario)
            settings = EvalSettings(mode=scenario.mode, knn_lambda=args.knn_lambda, knn_k=args.knn_k,
                                    knn_temperature=args.knn_temperature, knn_skip_above_prob=scenario.skip_above_prob,
                                    knn_pointer_min=scenario.pointer_min)
            before = engine.knn_stats()
            started = time.perf_counter()
            result = await evaluator.evaluate(documents, settings)
            eval_seconds = time.perf_counter() - started
            eval_skip, eval_pointer = knn_fractions(engine.knn_stats(), before)
            row = Row(scenario.name, scenario.datastore, engine.token_datastore.ntotal, result.bits_per_byte, None,
                      eval_skip, eval_pointer, eval_seconds=eval_seconds)
            before = engine.knn_stats()
            for concurrency in args.concurrency:
                row.tokens_per_s[concurrency] = await throughput(
                    engine, prompts[: max(args.requests, concurrency)], knn, concurrency, args.max_tokens,
                    scenario.name.replace(" ", "_"))
            after = engine.knn_stats()
            row.gen_skipped_fraction, row.gen_pointer_fraction = knn_fractions(after, before)
            steps = after.get("steps", 0) - before.get("steps", 0)
            if steps:
                row.search_ms_per_step = 1e3 * (after["search_s"] - before.get("search_s", 0.0)) / steps
                row.mix_ms_per_step = 1e3 * (after["mix_s"] - before.get("mix_s", 0.0)) / steps
                row.rows_per_step = (after["rows"] - before.get("rows", 0)) / steps
            log.info("%s: %.4f bits/byte, %s tok/s", scenario.name, row.bits_per_byte,
                     {c: round(v, 1) for c, v in row.tokens_per_s.items()})
            rows.append(row)
    finally:
        engine.shutdown()
    return rows


def _number(value: float | None, width: int, digits: int) -> str:
    return f"{'':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def print_table(rows: list[Row], concurrency: list[int], out=sys.stdout) -> None:
    head = (f"{'scenario':<28} {'entries':>9} {'bits/byte':>9} {'vs kNN':>7} {'eval skip':>9} {'eval ptr':>8} "
            f"{'gen skip':>8} {'gen ptr':>7} {'search ms':>9} {'mix ms':>6} {'rows':>5} " + " ".join(f"{f'tok/s c={c}':>11} {'x model':>7}" for c in concurrency))
    print(head, file=out)
    for row in rows:
        relative = "" if row.relative_to_knn is None else f"{100 * row.relative_to_knn:+.2f}%"
        line = (f"{row.scenario:<28} {row.entries:>9} {row.bits_per_byte:>9.4f} {relative:>7} "
                f"{row.eval_skipped_fraction:>9.1%} {row.eval_pointer_fraction:>8.1%} "
                f"{row.gen_skipped_fraction:>8.1%} {row.gen_pointer_fraction:>7.1%} "
                f"{_number(row.search_ms_per_step, 9, 1)} {_number(row.mix_ms_per_step, 6, 1)} "
                f"{_number(row.rows_per_step, 5, 1)} ")
        line += " ".join(f"{row.tokens_per_s.get(c, float('nan')):>11.1f} {row.throughput_vs_model.get(c, float('nan')):>7.2f}"
                         for c in concurrency)
        print(line, file=out)


async def main_async(args) -> list[Row]:
    from artefacts import paths
    from server.evaluation.cli import heldout_documents, read_split, refuse_leaking_token_datastore

    model_dir = Path(args.model) if args.model else paths.default_model_dir()
    files = (args.documents.read_text().split() if args.documents else read_split(args.split)["heldout"])
    documents = heldout_documents(files, args.max_docs)
    all_runs = scenarios(args)
    stores = {"main": args.token_datastore, "merged": args.merged_datastore, "pca": args.pca_datastore,
              **dict(args.variant)}
    for path in filter(None, stores.values()):
        refuse_leaking_token_datastore(Path(path), documents)  # the same guard as `eval run`
    rows: list[Row] = []
    for name, path in stores.items():
        runs = [s for s in all_runs if s.datastore == name]
        if path and runs:
            rows += await run_engine(args, Path(path), runs, documents, model_dir)
    for scenario in (s for s in all_runs if s.datastore == "gate"):
        rows += await run_engine(args, Path(args.token_datastore), [scenario], documents, model_dir,
                                 gate_threshold=scenario.gate_threshold)
    knn = next(r for r in rows if r.scenario == "kNN-LM")
    model = next(r for r in rows if r.scenario == "model alone")
    for row in rows:
        if row.scenario != "model alone":
            row.relative_to_knn = row.bits_per_byte / knn.bits_per_byte - 1
        row.throughput_vs_model = {c: v / model.tokens_per_s[c] for c, v in row.tokens_per_s.items()}
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", type=Path, required=True, help="split.json from `retroserve eval split`")
    parser.add_argument("--documents", type=Path, default=None,
                        help="file listing the documents to score, one path per line (default: the split's "
                             "held-out files), e.g. a test half when λ/k/T were tuned on the other half")
    parser.add_argument("--token-datastore", type=Path, required=True)
    parser.add_argument("--merged-datastore", type=Path, default=None, help="greedy-merged token datastore")
    parser.add_argument("--pca-datastore", type=Path, default=None, help="token datastore built with --pca")
    parser.add_argument("--gate-threshold", type=float, nargs="*", default=[],
                        help="learned-gate thresholds (the token datastore's gate.json, `retroserve datastore gate`), "
                             "each on its own engine")
    parser.add_argument("--variant", type=variant, action="append", default=[], metavar="NAME=DIR",
                        help="another token datastore (e.g. the same keys under another index), served by its "
                             "own engine as plain kNN-LM and with adaptive retrieval; repeatable")
    parser.add_argument("--model", type=Path, default=None, help="prepared model (default: the cache's)")
    parser.add_argument("--max-docs", type=int, default=None, help="held-out documents scored (default: all)")
    parser.add_argument("--max-doc-chars", type=int, default=4096, help="characters scored per document")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per throughput request")
    parser.add_argument("--prompt-chars", type=int, default=600, help="prompt characters per throughput request")
    parser.add_argument("--requests", type=int, default=32, help="throughput requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--eval-concurrency", type=int, default=4, help="documents scored at once")
    parser.add_argument("--knn-lambda", type=float, default=DEFAULT_KNN_LAMBDA)
    parser.add_argument("--knn-k", type=int, default=DEFAULT_KNN_K)
    parser.add_argument("--knn-temperature", type=float, default=DEFAULT_KNN_TEMPERATURE)
    parser.add_argument("--skip-above-prob", type=float, default=0.9, help="adaptive retrieval threshold")
    parser.add_argument("--pointer-min", type=int, nargs="+", default=[4],
                        help="pointer following minimum (a row each; the combined rows use the first)")
    parser.add_argument("--knn-pointer-pool", type=int, default=DEFAULT_KNN_POINTER_POOL,
                        help="engine setting: a search's nearest entries that seed the pointer set")
    parser.add_argument("--knn-pointer-radius", type=float, default=DEFAULT_KNN_POINTER_RADIUS,
                        help="engine setting: pointer distance gate (0: off)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="where the engine runs")
    parser.add_argument("--output", type=Path, default=None, help="write rows and arguments as JSON")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from server.evaluation.cli import EvalError

    try:
        rows = asyncio.run(main_async(args))
    except EvalError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print_table(rows, args.concurrency)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        payload = {"invocation": " ".join(["python bench/bench_knn.py", *(argv if argv is not None else sys.argv[1:])]),
                   "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "rows": [asdict(row) for row in rows]}
        args.output.write_text(json.dumps(payload, indent=2, default=str))  # Paths, --variant pairs
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
