"""Prometheus metrics of the server, and the HTTP endpoint that exposes them.

Naming follows Prometheus conventions: one app prefix (`retroserve_`), base units (`_seconds`),
counters end in `_total`. Label values are bounded sets (rpc names, grpc codes, retrieval modes,
phases), never request ids or texts.

Registries. vLLM registers its own engine metrics (`vllm:*`) in prometheus_client's default
REGISTRY when the engine runs with log_stats on. In production, `Metrics()` (no argument) registers
ours in that same default registry and `start_metrics_server` exposes it, so one scrape sees vLLM's
metrics and ours. Tests pass their own `CollectorRegistry()` for isolation (a registry refuses a
second metric of the same name, so only one default-registry `Metrics` may exist per process).

No `_created` series: prometheus-client adds a creation-timestamp series beside every counter and
histogram by default, doubling the series count for a value Prometheus's text format ignores;
importing this module turns them off for the process (vLLM's metrics included).
"""

from __future__ import annotations

import threading

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from server.config import CHUNK_MODES, RETRIEVAL_MODES

PREFIX = "retroserve"

prometheus_client.disable_created_metrics()

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
"""Whole RPCs: Tokenize/Info take milliseconds, a CPU generation of 1024 tokens minutes."""
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 60)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
RETRIEVAL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
"""One datastore phase or one retrieval: sub-millisecond (cache, Flat) to seconds (huge IVF on CPU)."""
COUNT_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Retrievals per request (1024 tokens at stride 1 is the worst case) and queries per batch."""

RETRIEVAL_PHASES = ("embed", "search", "payload")
CACHE_KINDS = ("exact", "approximate")
SWAP_OUTCOMES = ("ok", "refused", "error")
"""Datastore hot swaps: swapped; refused (failed verification, old one kept); error (unexpected)."""
SEGMENT_CONTEXTS = ("continued", "rebuilt")
SHARD_FAILURE_REASONS = ("timeout", "unavailable", "error")
"""Why a datastore shard's results were missing (retriever.datastore.MissingShard.reason)."""


def _name(suffix: str) -> str:
    return f"{PREFIX}_{suffix}"


class Metrics:
    """All metrics of one server. Attributes are prometheus_client metric objects.

    Generation (labels: mode = one of config.RETRIEVAL_MODES):
      request_latency          Histogram retroserve_request_duration_seconds{rpc, mode}
      requests                 Counter   retroserve_requests_total{rpc, code}   (every finished RPC)
      errors                   Counter   retroserve_errors_total{rpc, code}     (code != OK)
      time_to_first_token      Histogram retroserve_time_to_first_token_seconds{mode}
      inter_token_latency      Histogram retroserve_inter_token_latency_seconds{mode}
      prompt_tokens            Counter   retroserve_prompt_tokens_total
      generated_tokens         Counter   retroserve_generated_tokens_total{mode}
      requests_running         Gauge     retroserve_requests_running
      requests_waiting         Gauge     retroserve_requests_waiting
    Retrieval:
      retrieval_latency        Histogram retroserve_retrieval_duration_seconds   (one retrieval as
                                         the generation loop waits for it: batching included)
      retrieval_phase_latency  Histogram retroserve_retrieval_phase_duration_seconds{phase}
                                         (phase = embed | search | payload, per batched call)
      retrieval_batch_queries  Histogram retroserve_retrieval_batch_queries      (queries per call)
      retrievals_per_request   Histogram retroserve_retrievals_per_request
      cache_hits               Counter   retroserve_retrieval_cache_hits_total{kind}
                                         (kind = exact | approximate)
      cache_misses             Counter   retroserve_retrieval_cache_misses_total
    Datastore hot swap (server/core/hot_swap.py):
      datastore_swaps          Counter   retroserve_datastore_swaps_total{outcome}
                                         (outcome = ok | refused | error)
      retired_datastores_open  Gauge     retroserve_retired_datastores_open  (swapped out, still
                                         held by requests in flight)
    Datastore shards (servers with --retriever-shards; shard = the shard's index, a bounded set):
      shard_search_latency     Histogram retroserve_shard_search_duration_seconds{shard}
                                         (one shard's answer to one batched search, as the server
                                         waits for it: network and the shard's search and payloads)
      shard_failures           Counter   retroserve_shard_failures_total{shard, reason}
                                         (reason = timeout | unavailable | error)
    Prefix cache (hit rate = cached / engine prompt tokens):
      engine_prompt_tokens     Counter   retroserve_engine_prompt_tokens_total  (re-prefills included)
      prefix_cache_cached_tokens Counter retroserve_prefix_cache_cached_tokens_total
    What retrieval costs the engine, on any hardware (computed / generated tokens, by mode):
      computed_prompt_tokens   Counter   retroserve_computed_prompt_tokens_total{mode}  (engine
                                         prompt tokens not served from the prefix cache)
      chunk_segments           Counter   retroserve_chunk_segments_total{context}  (context =
                                         continued: the retrieval returned the chunks already in
                                         the context | rebuilt: laid out anew)
    Token mode (kNN-LM; read from the engine process's KnnStats at scrape time, `watch_knn`):
      knn rows                 Counter   retroserve_knn_rows_total{how}  (how = searched | pointer |
                                         skipped: neighbours from a search, from pointers, or none
                                         because adaptive retrieval left the row to the model)
      knn searches             Counter   retroserve_knn_searches_total   (FAISS calls, batched)
      knn steps                Counter   retroserve_knn_steps_total  (engine steps with token-mode rows)
      knn time                 Counter   retroserve_knn_seconds_total{phase}  (phase = search: finding
                                         neighbours, by search or pointers | mix: values and
                                         interpolation); per step: rate(seconds) / rate(steps)
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = prometheus_client.REGISTRY if registry is None else registry
        self.exposed_registry = self.registry
        """What the HTTP endpoint should serve: with the default registry, vLLM's metrics too."""

        common = {"registry": self.registry}
        self._declare_generation(common)
        self._declare_retrieval(common)
        self._declare_engine_cost(common)
        # Series with a fixed label set exist from the start, so rate() works before the first event.
        self._collectors = [value for value in vars(self).values() if isinstance(value, MetricWrapperBase)]
        for phase in RETRIEVAL_PHASES:
            self.retrieval_phase_latency.labels(phase=phase)
        for kind in CACHE_KINDS:
            self.cache_hits.labels(kind=kind)
        for outcome in SWAP_OUTCOMES:
            self.datastore_swaps.labels(outcome=outcome)
        for mode in RETRIEVAL_MODES:
            self.generated_tokens.labels(mode=mode)
            self.computed_prompt_tokens.labels(mode=mode)
        for how in SEGMENT_CONTEXTS:
            self.chunk_segments.labels(context=how)

    def _declare_generation(self, common: dict) -> None:
        """Requests, tokens and their latencies."""
        self.request_latency = Histogram(
            _name("request_duration_seconds"), "Time to serve one RPC, from receipt to last byte.",
            ["rpc", "mode"], buckets=REQUEST_BUCKETS, **common)
        self.requests = Counter(
            _name("requests"), "RPCs finished, by gRPC status code.", ["rpc", "code"], **common)
        self.errors = Counter(
            _name("errors"), "RPCs that ended with a gRPC status other than OK.", ["rpc", "code"], **common)
        self.time_to_first_token = Histogram(
            _name("time_to_first_token_seconds"), "Request start to first generated token.",
            ["mode"], buckets=FIRST_TOKEN_BUCKETS, **common)
        self.inter_token_latency = Histogram(
            _name("inter_token_latency_seconds"), "Time between consecutive generated tokens.",
            ["mode"], buckets=INTER_TOKEN_BUCKETS, **common)
        self.prompt_tokens = Counter(
            _name("prompt_tokens"), "Prompt tokens of finished generation requests.", **common)
        self.generated_tokens = Counter(
            _name("generated_tokens"), "Tokens generated, by retrieval mode.", ["mode"], **common)
        self.requests_running = Gauge(
            _name("requests_running"), "Generation requests being decoded now.", **common)
        self.requests_waiting = Gauge(
            _name("requests_waiting"), "Generation requests admitted but not started.", **common)

    def _declare_retrieval(self, common: dict) -> None:
        """Retrieval, its cache and the datastore shards."""
        self.retrieval_latency = Histogram(
            _name("retrieval_duration_seconds"),
            "One retrieval as the generation loop waits for it (batching window included).",
            buckets=RETRIEVAL_BUCKETS, **common)
        self.retrieval_phase_latency = Histogram(
            _name("retrieval_phase_duration_seconds"),
            "Seconds per phase of one batched datastore call.", ["phase"],
            buckets=RETRIEVAL_BUCKETS, **common)
        self.retrieval_batch_queries = Histogram(
            _name("retrieval_batch_queries"), "Queries searched together in one datastore call.",
            buckets=COUNT_BUCKETS, **common)
        self.retrievals_per_request = Histogram(
            _name("retrievals_per_request"), "Retrievals made by one generation request.",
            buckets=COUNT_BUCKETS, **common)
        self.cache_hits = Counter(
            _name("retrieval_cache_hits"), "Retrieval queries answered by the query cache.",
            ["kind"], **common)
        self.cache_misses = Counter(
            _name("retrieval_cache_misses"), "Retrieval queries that went to the index.", **common)
        self.shard_search_latency = Histogram(
            _name("shard_search_duration_seconds"),
            "One datastore shard's answer to one batched search, as the server waited for it.",
            ["shard"], buckets=RETRIEVAL_BUCKETS, **common)
        self.shard_failures = Counter(
            _name("shard_failures"), "Batched searches a datastore shard did not answer, by reason.",
            ["shard", "reason"], **common)

    def _declare_engine_cost(self, common: dict) -> None:
        """What retrieval costs the engine (prefix cache, computed tokens) and hot swaps."""
        self.engine_prompt_tokens = Counter(
            _name("engine_prompt_tokens"),
            "Prompt tokens handed to the engine, re-prompts after retrievals included.", **common)
        self.prefix_cache_cached_tokens = Counter(
            _name("prefix_cache_cached_tokens"),
            "Of the engine prompt tokens, those served from vLLM's prefix cache.", **common)
        self.computed_prompt_tokens = Counter(
            _name("computed_prompt_tokens"),
            "Engine prompt tokens computed (not served from the prefix cache), by retrieval mode.",
            ["mode"], **common)
        self.chunk_segments = Counter(
            _name("chunk_segments"),
            "Chunk-mode segments after a retrieval: the previous context continued (same chunks) or rebuilt.",
            ["context"], **common)
        self.datastore_swaps = Counter(
            _name("datastore_swaps"),
            "Datastore hot swaps (Admin.ReloadDatastore, SIGHUP) by outcome.", ["outcome"], **common)
        self.retired_datastores_open = Gauge(
            _name("retired_datastores_open"),
            "Swapped-out datastores still open for requests in flight.", **common)

    def watch_knn(self, read_stats) -> None:
        """Expose the kNN-LM counters `read_stats()` returns (server/core/engine.py Engine.knn_stats)."""
        collector = _KnnCollector(read_stats)
        self.registry.register(collector)
        self._collectors.append(collector)

    def close(self) -> None:
        """Unregister from the registry, so a later server in the same process can register."""
        for collector in self._collectors:
            self.registry.unregister(collector)
        self._collectors = []

    # -- called by the error interceptor -------------------------------------------------------

    def observe_rpc(self, rpc: str, mode: str, code: str, seconds: float) -> None:
        """One finished RPC: its latency, and its status code (`code` is a grpc.StatusCode name)."""
        self.request_latency.labels(rpc=rpc, mode=mode).observe(seconds)
        self.requests.labels(rpc=rpc, code=code).inc()
        if code != "OK":
            self.errors.labels(rpc=rpc, code=code).inc()

    # -- called by the generation loop / servicer ------------------------------------------------

    def observe_generation(
        self,
        prompt_tokens: int,
        generated_tokens: int,
        retrievals: int,
        cached_tokens: int,
        engine_prompt_tokens: int | None = None,
        mode: str = "none",
        continued_segments: int = 0,
    ) -> None:
        """One finished generation request. Pass `engine_prompt_tokens` to make the prefix-cache
        hit rate (cached / engine prompt tokens) and the computed prompt tokens computable."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.labels(mode=mode).inc(generated_tokens)
        self.retrievals_per_request.observe(retrievals)
        self.prefix_cache_cached_tokens.inc(cached_tokens)
        if engine_prompt_tokens is not None:
            self.engine_prompt_tokens.inc(engine_prompt_tokens)
            self.computed_prompt_tokens.labels(mode=mode).inc(max(0, engine_prompt_tokens - cached_tokens))
        if mode in CHUNK_MODES and retrievals:
            self.chunk_segments.labels(context="continued").inc(continued_segments)
            # The first segment has no previous context to continue: it counts as neither.
            self.chunk_segments.labels(context="rebuilt").inc(max(0, retrievals - 1 - continued_segments))

    def observe_first_token(self, seconds: float, mode: str = "none") -> None:
        self.time_to_first_token.labels(mode=mode).observe(seconds)

    def observe_token_gap(self, seconds: float, tokens: int = 1, mode: str = "none") -> None:
        """`tokens` tokens arrived `seconds` after the previous ones: each counts seconds/tokens,
        so a delta carrying several tokens does not look like one slow token."""
        if tokens <= 0:
            return
        per_token = seconds / tokens
        child = self.inter_token_latency.labels(mode=mode)
        for _ in range(tokens):
            child.observe(per_token)

    # -- called by the retrieval side -------------------------------------------------------------

    def observe_retrieval(self, seconds: float) -> None:
        """One retrieval as the generation loop (or Retrieve RPC) waited for it."""
        self.retrieval_latency.observe(seconds)

    def observe_retrieval_phases(self, embed: float, search: float, payload: float, queries: int) -> None:
        """One batched datastore call (retriever.datastore.Timing has these fields)."""
        self.retrieval_phase_latency.labels(phase="embed").observe(embed)
        self.retrieval_phase_latency.labels(phase="search").observe(search)
        self.retrieval_phase_latency.labels(phase="payload").observe(payload)
        self.retrieval_batch_queries.observe(queries)

    def observe_timing(self, timing) -> None:
        """Convenience for a retriever.datastore.Timing (or anything with its four fields)."""
        self.observe_retrieval_phases(timing.embed, timing.search, timing.payload, timing.queries)

    def init_shards(self, count: int) -> None:
        """Create every shard's series at zero, so a shard that never fails still shows up."""
        for shard in range(count):
            self.shard_search_latency.labels(shard=str(shard))
            for reason in SHARD_FAILURE_REASONS:
                self.shard_failures.labels(shard=str(shard), reason=reason)

    def observe_shard_search(self, shard: int, seconds: float) -> None:
        self.shard_search_latency.labels(shard=str(shard)).observe(seconds)

    def observe_shard_failure(self, shard: int, reason: str) -> None:
        self.shard_failures.labels(shard=str(shard), reason=reason).inc()

    def observe_cache(self, hits: int = 0, misses: int = 0, approximate_hits: int = 0) -> None:
        """Query-cache outcomes since the last call (counts, not cumulative totals)."""
        if hits:
            self.cache_hits.labels(kind="exact").inc(hits)
        if approximate_hits:
            self.cache_hits.labels(kind="approximate").inc(approximate_hits)
        if misses:
            self.cache_misses.inc(misses)


class _KnnCollector:
    """Counters kept by the kNN model class inside vLLM's engine process, read when scraped."""

    def __init__(self, read_stats):
        self.read_stats = read_stats

    def describe(self):
        return []  # names are not fixed before the first collect; nothing to check at register time

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        stats = self.read_stats() or {}
        rows = CounterMetricFamily(f"{PREFIX}_knn_rows", "Token-mode rows by how their neighbours were found.",
                                   labels=["how"])
        for how, key in (("searched", "searched_rows"), ("pointer", "pointer_rows"), ("skipped", "skipped_rows")):
            rows.add_metric([how], float(stats.get(key, 0)))
        yield rows
        yield CounterMetricFamily(f"{PREFIX}_knn_searches", "Token datastore search calls (batched).",
                                  value=float(stats.get("searches", 0)))
        yield CounterMetricFamily(f"{PREFIX}_knn_steps", "Engine steps that had token-mode rows.",
                                  value=float(stats.get("steps", 0)))
        seconds = CounterMetricFamily(f"{PREFIX}_knn_seconds", "Engine-process time spent on kNN-LM by phase.",
                                      labels=["phase"])
        for phase, key in (("search", "search_s"), ("mix", "mix_s")):
            seconds.add_metric([phase], float(stats.get(key, 0.0)))
        yield seconds


class RetrieverMetrics:
    """Metrics of a `retroserve retriever serve` shard process (same conventions as Metrics):

      requests           Counter   retroserve_retriever_requests_total{rpc, code}
      request_latency    Histogram retroserve_retriever_request_duration_seconds{rpc}
      phase_latency      Histogram retroserve_retriever_phase_duration_seconds{phase}
                                   (phase = embed | search | payload, per Search)
      batch_queries      Histogram retroserve_retriever_batch_queries   (queries per Search)
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = prometheus_client.REGISTRY if registry is None else registry
        self.exposed_registry = self.registry
        common = {"registry": self.registry}
        self.requests = Counter(f"{PREFIX}_retriever_requests", "Retriever RPCs finished, by gRPC status code.",
                                ["rpc", "code"], **common)
        self.request_latency = Histogram(
            f"{PREFIX}_retriever_request_duration_seconds", "Time to serve one retriever RPC.", ["rpc"],
            buckets=RETRIEVAL_BUCKETS, **common)
        self.phase_latency = Histogram(
            f"{PREFIX}_retriever_phase_duration_seconds", "Seconds per phase of one Search.", ["phase"],
            buckets=RETRIEVAL_BUCKETS, **common)
        self.batch_queries = Histogram(
            f"{PREFIX}_retriever_batch_queries", "Queries in one Search.", buckets=COUNT_BUCKETS, **common)
        self._collectors = [self.requests, self.request_latency, self.phase_latency, self.batch_queries]
        for phase in RETRIEVAL_PHASES:
            self.phase_latency.labels(phase=phase)

    def close(self) -> None:
        for collector in self._collectors:
            self.registry.unregister(collector)
        self._collectors = []

    def observe_rpc(self, rpc: str, mode: str, code: str, seconds: float) -> None:
        """Called by server.api.errors.ErrorInterceptor (`mode` is unused here)."""
        self.requests.labels(rpc=rpc, code=code).inc()
        self.request_latency.labels(rpc=rpc).observe(seconds)

    def observe_timing(self, timing) -> None:
        """One Search's retriever.datastore.Timing."""
        for phase in RETRIEVAL_PHASES:
            self.phase_latency.labels(phase=phase).observe(getattr(timing, phase))
        self.batch_queries.observe(timing.queries)


def split_address(address: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); an empty host means all interfaces."""
    host, separator, port = address.rpartition(":")
    if not separator or not port.isdigit():
        raise ValueError(f"{address=} must be host:port (port 0 picks a free one)")
    return host.strip("[]") or "0.0.0.0", int(port)


def start_metrics_server(address: str, registry: CollectorRegistry | None = None):
    """Serve `registry` (default: prometheus_client's REGISTRY) as Prometheus text on
    http://address/metrics in a daemon thread. Returns (server, thread, bound_port); stop it with
    `stop_metrics_server(server)`. Port 0 binds a free port (tests)."""
    host, port = split_address(address)
    server, thread = prometheus_client.start_http_server(
        port, addr=host, registry=prometheus_client.REGISTRY if registry is None else registry
    )
    return server, thread, server.server_address[1]


def stop_metrics_server(server, thread: threading.Thread | None = None, timeout_s: float = 5.0) -> None:
    server.shutdown()
    server.server_close()
    if thread is not None:
        thread.join(timeout_s)
