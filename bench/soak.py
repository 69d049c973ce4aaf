"""Soak and fault runs against a real `retroserve serve` subprocess on loopback.

Scenarios (each prints a summary line; all land in the JSON report):
- soak: `--streams` concurrent streaming clients for `--duration` seconds, chunk-retrieval and
  plain requests mixed, every `--cancel-every`-th request cancelled after its first message and
  every `--deadline-every`-th sent with a deadline that expires mid-generation. Only those
  intended failures may happen. RSS of the server and of its engine processes is taken after a
  warm-up and again once the load is over and the server idle, with the requests still open in
  the engine and in the admission queue (Prometheus).
- overload: `--max-queue` streams hold every admission slot, then `--overload-calls` more requests
  arrive (one after another, then all at once): each must get RESOURCE_EXHAUSTED; how fast.
- duplicate-ids: concurrent requests that carry the same request_id.
- sigterm: SIGTERM while `--streams` streams run and new ones keep arriving: every request sent
  before the signal must end with a normal stop reason, later ones complete or get UNAVAILABLE;
  exit status 0.
- engine-kill: SIGKILL to the server's EngineCore process during load: health stops answering
  SERVING, requests in flight get UNAVAILABLE, the server exits non-zero (3) and no engine
  process outlives it.

The machine this ran on was shared: figures are what one run measured, not a capacity rating.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/soak.py --datastore-dir DIR              # everything
    HF_HUB_OFFLINE=1 .venv/bin/python bench/soak.py --scenarios soak --duration 600   # longer soak

tests/test_soak.py (opt-in slow tests) runs the same functions with smaller bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retroserve.v1 import retroserve_pb2 as pb  # noqa: E402
from retroserve.v1 import retroserve_pb2_grpc as pb_grpc  # noqa: E402
from server.client import build_generate_request  # noqa: E402

log = logging.getLogger("soak")

NORMAL_STOPS = {pb.STOP_REASON_MAX_TOKENS, pb.STOP_REASON_EOS_TOKEN, pb.STOP_REASON_STOP_SEQUENCE,
                pb.STOP_REASON_TIME_LIMIT}
ENGINE_MARK = "EngineCore"
"""vLLM names its engine process VLLM::EngineCore (its title, in /proc/PID/cmdline)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prompt_texts(count: int, chars: int, seed: int) -> list[str]:
    """Windows of the Python language reference at seeded offsets (distinct prompts)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    rng = random.Random(seed)
    return [text[start:start + chars] for start in (rng.randrange(len(text) - chars) for _ in range(count))]


class ServeProcess:
    """`python -m server.cli.main serve` on free loopback ports; `close` leaves no process behind."""

    def __init__(self, serve_args: list[str], log_path: Path):
        self.port, self.metrics_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "server.cli.main", "serve", "--address", self.address,
                   "--metrics-address", f"127.0.0.1:{self.metrics_port}", *serve_args]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(command, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=os.environ.copy())
        self.descendants: list[psutil.Process] = []
        self.leftovers: list[str] = []
        """"pid name" of descendants still alive after the server exited (killed by `reap`)."""

    def wait_serving(self, timeout_s: float = 900) -> float:
        """Seconds until health says SERVING; raises if the process exits first."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self.log_path}")
            if health(self.address) == "SERVING":
                self.descendants = psutil.Process(self.process.pid).children(recursive=True)
                return time.monotonic() - started
            time.sleep(1)
        raise RuntimeError(f"server not SERVING after {timeout_s:.0f} s; see {self.log_path}")

    def engine_core(self) -> psutil.Process:
        for child in psutil.Process(self.process.pid).children(recursive=True):
            if ENGINE_MARK in " ".join(child.cmdline()):
                return child
        raise RuntimeError("no EngineCore process under the server")

    def rss_mib(self) -> dict[str, float]:
        """Resident memory of the server process and of its engine processes (EngineCore and
        whatever it started), MiB."""
        main = psutil.Process(self.process.pid)
        engine = 0
        for child in main.children(recursive=True):
            try:
                engine += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        server = main.memory_info().rss
        return {"server": server / 2**20, "engine": engine / 2**20, "total": (server + engine) / 2**20}

    def metrics(self) -> dict[str, float]:
        """Prometheus samples summed by name (labels dropped)."""
        from prometheus_client.parser import text_string_to_metric_families

        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read()
        sums: dict[str, float] = collections.defaultdict(float)
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                sums[sample.name] += sample.value
        return sums

    def open_requests(self) -> dict[str, float]:
        samples = self.metrics()
        return {name: samples.get(name, 0.0) for name in (
            "retroserve_requests_running", "retroserve_requests_waiting",
            "vllm:num_requests_running", "vllm:num_requests_waiting")}

    def wait_idle(self, timeout_s: float = 60) -> dict[str, float]:
        deadline = time.monotonic() + timeout_s
        while True:
            counts = self.open_requests()
            if not any(counts.values()) or time.monotonic() > deadline:
                return counts
            time.sleep(0.5)

    def close(self, grace_s: float = 90) -> int:
        """Stop the server (SIGTERM, then SIGKILL) and kill any descendant left; its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self.reap()
        self._log.close()
        return self.process.returncode

    def reap(self, wait_s: float = 10.0) -> None:
        """Kill descendants still running `wait_s` after the server exited (an orphaned EngineCore
        or worker), noting them as "pid name"."""
        alive = []
        for child in self.descendants:
            try:
                alive.append((child, child.name()))
            except psutil.NoSuchProcess:
                pass
        _, lingering = psutil.wait_procs([child for child, _ in alive], timeout=wait_s)
        names = dict((child.pid, name) for child, name in alive)
        for child in lingering:
            self.leftovers.append(f"{child.pid} {names[child.pid]}")
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def health(address: str, timeout_s: float = 2.0) -> str:
    """SERVING / NOT_SERVING / unreachable."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError:
        return "unreachable"


# -- requests --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One streaming request as its client saw it."""

    kind: str
    """"complete", "cancel" (cancelled after its first message) or "deadline" (short deadline)."""
    messages: int = 0
    tokens: int = 0
    stop_reason: int = 0
    code: str = "OK"
    details: str = ""
    sent_at: float = 0.0
    seconds: float = 0.0
    after: str = ""
    """How the same client's previous request ended (a refusal right after a cancelled request
    says the server had not yet seen that cancellation)."""

    @property
    def intended(self) -> bool:
        """Did it end the way its kind should?"""
        if self.kind == "cancel":
            return self.code == "CANCELLED" or self.stop_reason in NORMAL_STOPS
        if self.kind == "deadline":
            return self.code == "DEADLINE_EXCEEDED" or (self.code == "OK" and self.stop_reason in NORMAL_STOPS)
        return self.code == "OK" and self.stop_reason in NORMAL_STOPS

    @property
    def label(self) -> str:
        if self.code == "OK":
            return "OK" if self.stop_reason in NORMAL_STOPS else "OK without a normal stop reason"
        return f"{self.code} (intended)" if self.intended else self.code


async def stream_once(stub, request: pb.GenerateRequest, kind: str = "complete",
                      timeout_s: float = 300) -> Outcome:
    outcome = Outcome(kind, sent_at=time.monotonic())
    call = stub.GenerateStream(request, timeout=timeout_s)
    try:
        async for message in call:
            outcome.messages += 1
            outcome.tokens += len(message.token_ids)
            if message.stop_reason:
                outcome.stop_reason = message.stop_reason
            if kind == "cancel":
                call.cancel()
                outcome.code = "CANCELLED"
                break
    except grpc.aio.AioRpcError as error:
        outcome.code, outcome.details = error.code().name, error.details() or ""
    except asyncio.CancelledError:  # our own call.cancel() surfacing from the iterator
        outcome.code = "CANCELLED"
    outcome.seconds = time.monotonic() - outcome.sent_at
    return outcome


def tally(outcomes: list[Outcome]) -> dict[str, int]:
    return dict(collections.Counter(o.label for o in outcomes).most_common())


# -- scenarios ---------------------------------------------------------------------------------------


@dataclass
class SoakResult:
    streams: int
    duration_s: float
    requests: int
    tokens: int
    outcomes: dict[str, int]
    unexpected: list[str]
    rss_before_mib: dict[str, float]
    rss_after_mib: dict[str, float]
    rss_after_each_round_mib: list[float]
    """Total RSS once idle after each of the equal rounds the load ran in: a leak grows with
    every round, a warm-up (bounded caches filling) flattens."""
    query_cache_inserts: float
    """Retrieval cache misses during the load: entries put in the (bounded) query cache."""
    open_after: dict[str, float]
    warmup_s: float

    @property
    def ok(self) -> bool:
        return not self.unexpected and not any(self.open_after.values())


async def _load(address: str, streams: int, seconds: float, max_new_tokens: int, cancel_every: int,
                deadline_every: int, seed: int) -> list[Outcome]:
    rng = random.Random(seed)
    texts = prompt_texts(4096, 400, seed)
    counter = iter(range(10**9))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RetroserveStub(channel)
        end = time.monotonic() + seconds

        async def worker() -> list[Outcome]:
            done = []
            while time.monotonic() < end:
                n = next(counter)
                kind = ("cancel" if cancel_every and n % cancel_every == cancel_every - 1 else
                        "deadline" if deadline_every and n % deadline_every == deadline_every - 2 else "complete")
                mode = rng.choice(("chunk", "none"))
                options = dict(stride=rng.choice((8, 16, 32))) if mode == "chunk" else {}
                request = build_generate_request(texts[n % len(texts)], mode=mode, return_token_ids=True,
                                                 max_new_tokens=rng.randint(4, max_new_tokens), **options)
                timeout = rng.uniform(0.3, 2.0) if kind == "deadline" else 300
                outcome = await stream_once(stub, request, kind, timeout)
                outcome.after = done[-1].label if done else ""
                done.append(outcome)
            return done

        results = await asyncio.gather(*(worker() for _ in range(streams)))
    return [outcome for batch in results for outcome in batch]


def soak(server: ServeProcess, streams: int, duration_s: float, max_new_tokens: int = 32,
         cancel_every: int = 5, deadline_every: int = 7, warmup_s: float = 20, seed: int = 0,
         rounds: int = 3) -> SoakResult:
    """The load in `rounds` equal rounds, measured between a warm-up with the same mix and an idle
    server after each round."""
    asyncio.run(_load(server.address, streams, warmup_s, max_new_tokens, cancel_every, deadline_every, seed + 1))
    server.wait_idle()
    time.sleep(2)
    before = server.rss_mib()
    misses_before = server.metrics().get("retroserve_retrieval_cache_misses_total", 0.0)
    started = time.monotonic()
    outcomes, per_round = [], []
    open_after: dict[str, float] = {}
    for index in range(rounds):
        outcomes += asyncio.run(_load(server.address, streams, duration_s / rounds, max_new_tokens, cancel_every,
                                      deadline_every, seed + 100 * index))
        open_after = server.wait_idle()
        time.sleep(2)
        per_round.append(round(server.rss_mib()["total"], 1))
    elapsed = time.monotonic() - started
    after = server.rss_mib()
    inserts = server.metrics().get("retroserve_retrieval_cache_misses_total", 0.0) - misses_before
    unexpected = [f"{o.kind} (after {o.after or 'nothing'}): {o.code} {o.details[:120]}"
                  for o in outcomes if not o.intended]
    return SoakResult(streams, round(elapsed, 1), len(outcomes), sum(o.tokens for o in outcomes), tally(outcomes),
                      unexpected[:20], before, after, per_round, inserts, open_after, warmup_s)


@dataclass
class OverloadResult:
    max_queue: int
    calls: int
    codes: dict[str, int]
    sequential_ms: dict[str, float]
    burst_ms: dict[str, float]
    open_after: dict[str, float]

    @property
    def ok(self) -> bool:
        return self.codes == {"RESOURCE_EXHAUSTED": 2 * self.calls} and not any(self.open_after.values())


def _summary_ms(seconds: list[float]) -> dict[str, float]:
    values = sorted(s * 1000 for s in seconds)
    return {"p50": round(statistics.median(values), 2), "p99": round(values[min(len(values) - 1,
            int(0.99 * len(values)))], 2), "max": round(values[-1], 2)}


async def _overload(address: str, max_queue: int, calls: int):
    texts = prompt_texts(max_queue + 1, 400, 11)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RetroserveStub(channel)
        holders = [stub.GenerateStream(build_generate_request(texts[i], mode="none", max_new_tokens=1000))
                   for i in range(max_queue)]
        for holder in holders:
            await holder.read()  # a message: admitted and decoding
        codes: collections.Counter = collections.Counter()

        async def one() -> float:
            started = time.perf_counter()
            try:
                await stub.Generate(build_generate_request(texts[-1], mode="none", max_new_tokens=4), timeout=60)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as error:
                codes[error.code().name] += 1
            return time.perf_counter() - started

        sequential = [await one() for _ in range(calls)]
        burst = await asyncio.gather(*(one() for _ in range(calls)))
        for holder in holders:
            holder.cancel()
    return codes, sequential, burst


def overload(server: ServeProcess, max_queue: int, calls: int = 100) -> OverloadResult:
    codes, sequential, burst = asyncio.run(_overload(server.address, max_queue, calls))
    return OverloadResult(max_queue, calls, dict(codes), _summary_ms(sequential), _summary_ms(burst),
                          server.wait_idle())


@dataclass
class DuplicateIdsResult:
    requests: int
    outcomes: dict[str, int]
    details: list[str]

    @property
    def ok(self) -> bool:
        return self.outcomes == {"OK": self.requests}


async def _duplicate_ids(address: str, requests: int):
    texts = prompt_texts(requests, 300, 5)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RetroserveStub(channel)
        return await asyncio.gather(*(
            stream_once(stub, build_generate_request(text, mode=mode, max_new_tokens=24, request_id="same-id"))
            for text, mode in zip(texts, ("chunk", "none") * requests)))


def duplicate_ids(server: ServeProcess, requests: int = 4) -> DuplicateIdsResult:
    outcomes = asyncio.run(_duplicate_ids(server.address, requests))
    return DuplicateIdsResult(requests, tally(outcomes), [o.details[:200] for o in outcomes if o.details])


@dataclass
class SigtermResult:
    before_signal: dict[str, int]
    after_signal: dict[str, int]
    lost: list[str]
    exit_code: int
    exit_s: float
    leftovers: list[str]

    @property
    def ok(self) -> bool:
        return not self.lost and self.exit_code == 0 and not self.leftovers


async def _sigterm(server: ServeProcess, streams: int, late: int, max_new_tokens: int):
    texts = prompt_texts(streams + late, 400, 21)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.RetroserveStub(channel)
        first = [asyncio.create_task(stream_once(
            stub, build_generate_request(texts[i], mode=("chunk", "none")[i % 2], max_new_tokens=max_new_tokens,
                                         return_token_ids=True))) for i in range(streams)]
        await asyncio.sleep(3)  # all received and admitted (max_queue >= streams), some decoding
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        later = []
        for i in range(late):
            later.append(asyncio.create_task(stream_once(
                stub, build_generate_request(texts[streams + i], mode="none", max_new_tokens=8), timeout_s=60)))
            await asyncio.sleep(0.25)
        return await asyncio.gather(*first), await asyncio.gather(*later), signalled


def sigterm_during_load(server: ServeProcess, streams: int = 6, late: int = 8,
                        max_new_tokens: int = 48) -> SigtermResult:
    first, later, signalled = asyncio.run(_sigterm(server, streams, late, max_new_tokens))
    code = server.process.wait(300)
    exit_s = time.monotonic() - signalled
    server.reap()
    lost = [f"sent before SIGTERM: {o.code} after {o.messages} messages {o.details[:160]}"
            for o in first if not (o.code == "OK" and o.stop_reason in NORMAL_STOPS)]
    lost += [f"sent after SIGTERM: {o.code} after {o.messages} messages {o.details[:160]}"
             for o in later if not ((o.code == "OK" and o.stop_reason in NORMAL_STOPS)
                                    or (o.code == "UNAVAILABLE" and o.messages == 0))]
    return SigtermResult(tally(first), tally(later), lost, code, round(exit_s, 2), list(server.leftovers))


@dataclass
class EngineKillResult:
    in_flight: dict[str, int]
    in_flight_details: list[str]
    health_seen: list[tuple[float, str]]
    """(seconds after the kill, status) at each change of the health answer."""
    exit_code: int | None
    exit_s: float
    leftovers: list[str]

    @property
    def ok(self) -> bool:
        statuses = [status for _, status in self.health_seen]
        after_serving = statuses[statuses.index("NOT_SERVING"):] if "NOT_SERVING" in statuses else []
        return (self.exit_code not in (0, None) and not self.leftovers and bool(after_serving)
                and "SERVING" not in after_serving and set(self.in_flight) == {"UNAVAILABLE"})


async def _engine_kill(server: ServeProcess, streams: int):
    texts = prompt_texts(streams, 400, 31)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.RetroserveStub(channel)
        calls = [asyncio.create_task(stream_once(stub, build_generate_request(
            texts[i], mode=("chunk", "none")[i % 2], max_new_tokens=400), timeout_s=120)) for i in range(streams)]
        await asyncio.sleep(3)
        engine = server.engine_core()
        engine.kill()
        killed = time.monotonic()
        seen: list[tuple[float, str]] = []
        loop = asyncio.get_running_loop()
        while server.process.poll() is None and time.monotonic() - killed < 120:
            status = await loop.run_in_executor(None, health, server.address, 0.5)
            if not seen or seen[-1][1] != status:
                seen.append((round(time.monotonic() - killed, 3), status))
            await asyncio.sleep(0.02)
        outcomes = await asyncio.gather(*calls)
    return outcomes, seen, killed


def engine_kill(server: ServeProcess, streams: int = 4) -> EngineKillResult:
    outcomes, seen, killed = asyncio.run(_engine_kill(server, streams))
    try:
        code = server.process.wait(60)
    except subprocess.TimeoutExpired:
        code = None
    exit_s = time.monotonic() - killed
    time.sleep(1)
    server.reap()
    seen.append((round(exit_s, 3), f"exited {code}"))
    return EngineKillResult(tally(outcomes), sorted({o.details[:160] for o in outcomes if o.details}), seen, code,
                            round(exit_s, 2), list(server.leftovers))


# -- command line ------------------------------------------------------------------------------------


SCENARIOS = ("soak", "overload", "duplicate-ids", "sigterm", "engine-kill")


def serve_args(args) -> list[str]:
    extra = ["--max-queue", str(args.max_queue), "--grace-period-s", "120", "--kv-cache-gib", "1",
             "--max-num-seqs", "16"]
    if args.model_dir:
        extra += ["--model-dir", str(args.model_dir)]
    if args.datastore_dir:
        extra += ["--datastore-dir", str(args.datastore_dir)]
    return extra + args.server_args


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--datastore-dir", type=Path)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--duration", type=float, default=120.0, help="soak seconds (after a warm-up)")
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3, help="soak rounds, RSS taken idle after each")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--overload-calls", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[])
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "soak.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logs = args.output.parent
    report: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    ok = True

    def record(name: str, result) -> None:
        nonlocal ok
        ok &= result.ok
        report[name] = {**asdict(result), "ok": result.ok}
        log.info("%s: %s", name, json.dumps(report[name]))
        args.output.write_text(json.dumps(report, indent=2))

    shared = [s for s in args.scenarios if s in ("soak", "overload", "duplicate-ids")]
    if shared:
        with ServeProcess(serve_args(args), logs / "soak_server.log") as server:
            report["start_s"] = round(server.wait_serving(), 1)
            if "soak" in shared:
                record("soak", soak(server, args.streams, args.duration, args.max_new_tokens,
                                    warmup_s=args.warmup, seed=args.seed, rounds=args.rounds))
            if "overload" in shared:
                record("overload", overload(server, args.max_queue, args.overload_calls))
            if "duplicate-ids" in shared:
                record("duplicate_ids", duplicate_ids(server))
    if "sigterm" in args.scenarios:
        with ServeProcess(serve_args(args), logs / "sigterm_server.log") as server:
            server.wait_serving()
            record("sigterm", sigterm_during_load(server, streams=min(args.streams, args.max_queue)))
    if "engine-kill" in args.scenarios:
        with ServeProcess(serve_args(args), logs / "engine_kill_server.log") as server:
            server.wait_serving()
            record("engine_kill", engine_kill(server))
    log.info("wrote %s; %s", args.output, "all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
