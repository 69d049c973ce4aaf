"""Serving benchmark: a real `retroserve serve` subprocess driven over gRPC by concurrent streams.

For each scenario (retrieval mode, stride, context layout) and each concurrency, it sends
`--requests-per-stream` requests per concurrent stream and reports output tokens/s, request
latency, time to first token, inter-token gaps, retrieval time, and the prefix-cache hit rate
(cached / engine prompt tokens, re-prompts after retrievals included). Not a test; prints a table
and writes JSON. All scenarios run against the same server in one run, so they compare as ratios.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_serving.py            # default model + datastore
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_serving.py --address 127.0.0.1:50051  # running server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retroserve.v1 import retroserve_pb2_grpc as pb_grpc  # noqa: E402
from retroserve.v1.names import LAYOUT_FROM_PB  # noqa: E402
from server.client import RetroserveClient, build_generate_request  # noqa: E402
from artefacts.cpu_kernels import machine_description  # noqa: E402
from server.evaluation.cli import invocation  # noqa: E402

SCENARIOS = {
    "none": dict(mode="none"),
    # The server's default layout and keep_rank_margin unless the name pins one.
    "chunk-stride64": dict(mode="chunk", stride=64),
    "chunk-stride64-k1": dict(mode="chunk", stride=64, neighbours=1),
    "chunk-stride16-k1": dict(mode="chunk", stride=16, neighbours=1),
    "chunk-stride16-k3": dict(mode="chunk", stride=16, neighbours=3),
    "chunk-stride16-k4": dict(mode="chunk", stride=16, neighbours=4),
    "chunk-stride64-k4": dict(mode="chunk", stride=64, neighbours=4),
    "chunk-stride32": dict(mode="chunk", stride=32),
    "chunk-stride16": dict(mode="chunk", stride=16),
    "chunk-stride64-prepend": dict(mode="chunk", stride=64, layout="prepend"),
    "chunk-stride32-prepend": dict(mode="chunk", stride=32, layout="prepend"),
    "chunk-stride16-prepend": dict(mode="chunk", stride=16, layout="prepend"),
    "chunk-stride64-suffix": dict(mode="chunk", stride=64, layout="suffix"),
    "chunk-stride16-suffix": dict(mode="chunk", stride=16, layout="suffix"),
    "chunk-stride16-suffix-keep6": dict(mode="chunk", stride=16, layout="suffix", keep_rank_margin=6),
    "chunk-stride16-after_prompt": dict(mode="chunk", stride=16, layout="after_prompt"),
    # Keep the context's neighbours while they are among the new k + M nearest (RaLMSpec-like;
    # the server's default margin is 6).
    "chunk-stride16-keep0": dict(mode="chunk", stride=16, keep_rank_margin=0),
    "chunk-stride16-keep2": dict(mode="chunk", stride=16, keep_rank_margin=2),
    "chunk-stride16-keep6": dict(mode="chunk", stride=16, keep_rank_margin=6),
    "chunk-stride16-keep14": dict(mode="chunk", stride=16, keep_rank_margin=14),
    # No retrieval, but each prompt is longer by about what one neighbour block adds at the defaults
    # (2 x 96 tokens + separators ~ 800 characters of this text): the cost of computing neighbours as
    # prompt tokens once per request, i.e. what retrieve-once RAG pays and the floor of chunk-stride64
    # (one retrieval per 64-token reply) for any layout that does not reuse neighbour KV.
    "none-longer-prompt": dict(mode="none", extra_prompt_chars=800),
}


@dataclass
class Outcome:
    seconds: float
    ttft_s: float
    gaps_s: list[float]
    tokens: int
    retrieval_ms: float
    engine_prompt_tokens: int
    cached_prompt_tokens: int
    retrievals: int
    continued_segments: int


@dataclass
class Row:
    scenario: str
    concurrency: int
    requests: int
    output_tokens_per_s: float
    request_p50_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    inter_token_p50_ms: float
    inter_token_p99_ms: float
    retrieval_ms_per_request: float
    prefix_cache_hit_rate: float
    computed_prompt_per_generated: float
    """Engine prompt tokens computed (not from the prefix cache) per generated token."""
    computed_prompt_per_request: float
    continued_fraction: float
    """Of the retrievals after each request's first, those that returned the chunks already in the
    context (the segment continued it)."""
    wall_s: float
    extra: dict = field(default_factory=dict)


def prompts(count: int, chars: int, first: int) -> list[str]:
    """Windows of the language reference, distinct across the whole run (`first` = how many were
    used before), so no scenario finds another's prompts in the prefix or query cache."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    step = chars + 1
    if (first + count) * step > len(text):
        raise ValueError(f"not enough distinct {chars}-character prompts for {first + count} requests")
    return [text[(first + i) * step:(first + i) * step + chars] for i in range(count)]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (with few samples p99 is the maximum)."""
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]


async def one_request(stub, prompt: str, options: dict, max_new_tokens: int) -> Outcome:
    request = build_generate_request(prompt, max_new_tokens=max_new_tokens, **options)
    started = time.perf_counter()
    first = last = None
    gaps = []
    final = None
    async for message in stub.GenerateStream(request):
        now = time.perf_counter()
        if message.text or message.token_ids:
            if first is None:
                first = now
            elif last is not None:
                gaps.append(now - last)
            last = now
        if message.stop_reason:
            final = message
    if final is None:
        raise RuntimeError("stream ended without a final message")
    return Outcome(
        seconds=time.perf_counter() - started,
        ttft_s=(first or time.perf_counter()) - started,
        gaps_s=gaps,
        tokens=final.generated_token_count,
        retrieval_ms=final.timing.retrieval_ms,
        engine_prompt_tokens=final.prefix_cache.engine_prompt_tokens,
        cached_prompt_tokens=final.prefix_cache.cached_prompt_tokens,
        retrievals=final.timing.retrievals,
        continued_segments=final.prefix_cache.continued_segments,
    )


async def run_scenario(address: str, name: str, options: dict, concurrency: int, per_stream: int,
                       max_new_tokens: int, prompt_chars: int, first_prompt: int) -> Row:
    options = dict(options)
    texts = prompts(concurrency * per_stream, prompt_chars + options.pop("extra_prompt_chars", 0), first_prompt)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RetroserveStub(channel)

        async def stream(worker: int) -> list[Outcome]:
            return [
                await one_request(stub, texts[worker * per_stream + i], options, max_new_tokens)
                for i in range(per_stream)
            ]

        started = time.perf_counter()
        outcomes = [o for batch in await asyncio.gather(*(stream(w) for w in range(concurrency))) for o in batch]
        wall = time.perf_counter() - started
    ttfts = sorted(o.ttft_s * 1000 for o in outcomes)
    gaps = sorted(g * 1000 for o in outcomes for g in o.gaps_s)
    engine_tokens = sum(o.engine_prompt_tokens for o in outcomes)
    computed = engine_tokens - sum(o.cached_prompt_tokens for o in outcomes)
    later_retrievals = sum(max(0, o.retrievals - 1) for o in outcomes)
    return Row(
        scenario=name,
        concurrency=concurrency,
        requests=len(outcomes),
        output_tokens_per_s=sum(o.tokens for o in outcomes) / wall,
        request_p50_s=statistics.median(o.seconds for o in outcomes),
        ttft_p50_ms=statistics.median(ttfts),
        ttft_p99_ms=percentile(ttfts, 0.99),
        inter_token_p50_ms=statistics.median(gaps) if gaps else float("nan"),
        inter_token_p99_ms=percentile(gaps, 0.99) if gaps else float("nan"),
        retrieval_ms_per_request=statistics.mean(o.retrieval_ms for o in outcomes),
        prefix_cache_hit_rate=sum(o.cached_prompt_tokens for o in outcomes) / engine_tokens if engine_tokens else 0.0,
        computed_prompt_per_generated=computed / max(1, sum(o.tokens for o in outcomes)),
        computed_prompt_per_request=computed / len(outcomes),
        continued_fraction=sum(o.continued_segments for o in outcomes) / later_retrievals if later_retrievals else 0.0,
        wall_s=wall,
    )


def start_server(port: int, metrics_port: int, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "server.cli.main", "serve", "--address", f"127.0.0.1:{port}",
               "--metrics-address", f"127.0.0.1:{metrics_port}", *extra]
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    log = open(REPO / "bench" / "results" / "bench_serving_server.log", "w")
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    with RetroserveClient(f"127.0.0.1:{port}") as client:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}; see {log.name}")
            try:
                if client.health(timeout=2, wait_for_ready=True) == "SERVING":
                    return process
            except grpc.RpcError:
                pass
            time.sleep(2)
    process.terminate()
    raise RuntimeError("server did not become SERVING within 15 minutes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help="benchmark a running server instead of starting one")
    parser.add_argument("--port", type=int, default=50071)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--scenarios", nargs="+",
                        default=[name for name in SCENARIOS
                                 if not name.endswith("-k1") and "-keep" not in name and name != "none-longer-prompt"],
                        choices=list(SCENARIOS))
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompt-chars", type=int, default=600,
                        help="prompt length in characters (600 chars ~ 150 tokens)")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="extra `retroserve serve` flags (last on the command line)")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "serving.json")
    args = parser.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)

    process = None
    address = args.address
    if address is None:
        process = start_server(args.port, args.port + 1, args.server_args)
        address = f"127.0.0.1:{args.port}"
    try:
        with RetroserveClient(address) as client:
            info = client.info()
        rows = []
        print(f"{'scenario':30s} {'conc':>4s} {'req':>4s} {'tok/s':>7s} {'vs none':>7s} {'p50 s':>6s} "
              f"{'ttft50':>7s} {'ttft99':>7s} {'itl50':>6s} {'itl99':>6s} {'retr ms':>8s} {'prefix hit':>10s} "
              f"{'computed/gen':>12s} {'same chunks':>11s}")
        baseline: dict[int, float] = {}
        used = 0
        for name in args.scenarios:
            for concurrency in args.concurrency:
                row = asyncio.run(run_scenario(address, name, SCENARIOS[name], concurrency,
                                               args.requests_per_stream, args.max_new_tokens, args.prompt_chars,
                                               used))
                used += row.requests
                rows.append(row)
                if name == "none":
                    baseline[concurrency] = row.output_tokens_per_s
                if concurrency in baseline:
                    row.extra["throughput_vs_none"] = row.output_tokens_per_s / baseline[concurrency]
                ratio = row.extra.get("throughput_vs_none", float("nan"))
                print(f"{row.scenario:30s} {row.concurrency:4d} {row.requests:4d} {row.output_tokens_per_s:7.1f} "
                      f"{ratio:7.2f} {row.request_p50_s:6.2f} {row.ttft_p50_ms:7.0f} {row.ttft_p99_ms:7.0f} "
                      f"{row.inter_token_p50_ms:6.1f} {row.inter_token_p99_ms:6.1f} "
                      f"{row.retrieval_ms_per_request:8.1f} {row.prefix_cache_hit_rate:10.3f} "
                      f"{row.computed_prompt_per_generated:12.2f} {row.continued_fraction:11.2f}", flush=True)
        report = {
            "invocation": invocation(),
            "machine": machine_description(),
            "model": {"name": info.model.name, "fingerprint": info.model.fingerprint,
                      "quantization": info.model.quantization, "dtype": info.model.dtype, "device": info.model.device},
            "datastore": {"name": info.datastore.name, "digest": info.datastore.manifest_digest,
                          "entries": info.datastore.entry_count, "index": info.datastore.index_factory},
            "default_layout": LAYOUT_FROM_PB.get(info.retrieval_defaults.layout, "prepend"),
            "retrieval_defaults": MessageToDict(info.retrieval_defaults, preserving_proto_field_name=True),
            "scenarios": {name: SCENARIOS[name] for name in args.scenarios},
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": [asdict(row) for row in rows],
        }
        args.output.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.output}")
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
