"""Request validation: protobuf requests in, plain resolved dataclasses out, or InvalidArgument.

Everything a client sends passes through here before it reaches the engine or the datastore, so
nothing a client sends can crash the server or start work that a bound forbids. Each refusal names
the field path, the value and the bound, e.g. "sampling.temperature=-1 must be in [0, 2]".
Unset fields resolve to the server defaults (Limits, RetrievalDefaults), so the rest of the
server never sees protobuf presence rules.

Proto3 enums are open: a client built from a newer .proto can send an enum number this server
does not know, and the Python message keeps it as a plain int. Those are refused here by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from protos.retroserve.v1 import retroserve_pb2 as pb
from server.config import DEFAULT_KEEP_RANK_MARGIN, DEFAULT_LAYOUT, DEFAULT_NEIGHBOUR_TOKENS, Limits, RetrievalDefaults, modes_served
from server.knn.settings import DEFAULT_KNN_K, DEFAULT_KNN_LAMBDA, DEFAULT_KNN_TEMPERATURE
from server.errors import DatastoreUnavailable, InvalidArgument

MAX_SEED = 2**31 - 1
"""Seeds are in [0, 2**31 - 1]: the generation loop derives per-segment seeds modulo 2**31."""

MODE_FROM_PB = {
    pb.RETRIEVAL_MODE_NONE: "none",
    pb.RETRIEVAL_MODE_CHUNK: "chunk",
    pb.RETRIEVAL_MODE_TOKEN: "token",
    pb.RETRIEVAL_MODE_HYBRID: "hybrid",
}
MODE_TO_PB = {name: number for number, name in MODE_FROM_PB.items()}
LAYOUT_FROM_PB = {
    pb.CONTEXT_LAYOUT_PREPEND: "prepend",
    pb.CONTEXT_LAYOUT_AFTER_PROMPT: "after_prompt",
    pb.CONTEXT_LAYOUT_SUFFIX: "suffix",
}
LAYOUT_TO_PB = {name: number for number, name in LAYOUT_FROM_PB.items()}
SHARD_POLICY_FROM_PB = {
    pb.SHARD_POLICY_PARTIAL: "partial",
    pb.SHARD_POLICY_REQUIRE_ALL: "require_all",
}
SHARD_POLICY_TO_PB = {name: number for number, name in SHARD_POLICY_FROM_PB.items()}


@dataclass(frozen=True)
class ValidationContext:
    """What validation needs to know about this server; built once by the servicer."""

    limits: Limits = field(default_factory=Limits)
    retrieval: RetrievalDefaults = field(default_factory=RetrievalDefaults)
    tokenize: Callable[[str], Sequence[int]] | None = None
    """Token ids of a text under the served model's tokenizer (no special tokens); None skips the
    prompt-length check (only for tests of other fields: the server always passes one)."""
    has_chunk_datastore: bool = True
    has_token_datastore: bool = False

    @property
    def available_modes(self) -> tuple[str, ...]:
        return modes_served(self.has_chunk_datastore, self.has_token_datastore)

    @property
    def default_mode(self) -> str:
        """RetrievalDefaults.mode when this server can serve it, else "none"."""
        return self.retrieval.mode if self.retrieval.mode in self.available_modes else "none"


@dataclass(frozen=True)
class GenerationRequest:
    """A validated generation request with every default resolved.

    Field names shared with server.core.generation.LoopSettings mean the same thing there;
    `loop_settings_kwargs()` returns exactly those.
    """

    prompt: str
    prompt_ids: tuple[int, ...] | None
    """The prompt's token ids, tokenized once here for the length check and passed on to the
    generation loop (None when validated without a tokenizer: the loop tokenizes the prompt)."""
    max_new_tokens: int
    temperature: float = 0.0
    """0 means greedy; then top_p=1, top_k=0 and seed=None whatever the request said."""
    top_p: float = 1.0
    top_k: int = 0
    """0: off."""
    seed: int | None = None
    """None: the loop picks one when sampling (and reports it)."""
    stop_sequences: tuple[str, ...] = ()
    include_stop_sequence: bool = False
    time_limit_s: float | None = None
    """Wall-clock budget; requests that set none get Limits.max_time_limit_s (None only in tests
    of the loop: no limit)."""
    retrieval_mode: str = "none"
    """One of config.RETRIEVAL_MODES."""
    neighbours: int = 2
    stride: int = 16
    query_tokens: int = 32
    layout: str = DEFAULT_LAYOUT
    keep_same_neighbours: bool = True
    """Server-wide (RetrievalDefaults.keep_same_neighbours), not a request field."""
    neighbour_tokens: int = DEFAULT_NEIGHBOUR_TOKENS
    """Server-wide (RetrievalDefaults.neighbour_tokens), not a request field: 0 whole neighbours,
    N > 0 the last N tokens of each, N < 0 the first -N."""
    keep_rank_margin: int = DEFAULT_KEEP_RANK_MARGIN
    shard_policy: str = "partial"
    """"partial" | "require_all": what a retrieval does when a datastore shard is missing."""
    return_provenance: bool = False
    return_token_ids: bool = False
    return_logprobs: bool = False
    knn_lambda: float = DEFAULT_KNN_LAMBDA
    """Token mode: λ of λ·p_kNN + (1-λ)·p_LM."""
    knn_k: int = DEFAULT_KNN_K
    knn_temperature: float = DEFAULT_KNN_TEMPERATURE
    knn_skip_above_prob: float = 1.0
    """Token mode: skip the search on steps whose LM max probability is above this (1: never)."""
    knn_pointer_min: int = 0
    """Token mode: follow pointers when at least this many remain (0: off)."""

    LOOP_FIELDS = (
        "prompt", "prompt_ids", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop_sequences",
        "include_stop_sequence", "time_limit_s", "retrieval_mode", "neighbours", "stride",
        "query_tokens", "layout", "keep_same_neighbours", "neighbour_tokens", "keep_rank_margin", "shard_policy", "return_logprobs", "knn_lambda", "knn_k",
        "knn_temperature", "knn_skip_above_prob", "knn_pointer_min",
    )

    @property
    def prompt_token_count(self) -> int | None:
        return None if self.prompt_ids is None else len(self.prompt_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def loop_settings_kwargs(self) -> dict:
        """Keyword arguments for server.core.generation.LoopSettings."""
        return {name: getattr(self, name) for name in self.LOOP_FIELDS}

    @classmethod
    def from_pb(cls, request: pb.GenerateRequest, context: ValidationContext) -> "GenerationRequest":
        """Validate and resolve; raises InvalidArgument naming the first bad field.

        Cheap checks run first; the prompt is tokenized last, only for requests otherwise valid.
        """
        limits = context.limits
        if not request.prompt.strip():
            raise InvalidArgument("prompt", "prompt must contain a non-whitespace character")

        sampling = request.sampling
        temperature = _optional(sampling, "temperature", 0.0)
        _check_finite("sampling.temperature", temperature)
        _check_range("sampling.temperature", temperature, 0, limits.max_temperature)
        top_p = _optional(sampling, "top_p", 1.0)
        _check_finite("sampling.top_p", top_p)
        if not 0.0 < top_p <= 1.0:
            raise InvalidArgument("sampling.top_p", f"sampling.top_p={_show(top_p)} must be in (0, 1]")
        top_k = _optional(sampling, "top_k", 0)
        _check_range("sampling.top_k", top_k, 0, limits.max_top_k, note=" (0 = off)")
        seed = _optional(sampling, "seed", None)
        if seed is not None:
            _check_range("sampling.seed", seed, 0, MAX_SEED)

        stopping = request.stopping
        max_new_tokens = _optional(stopping, "max_new_tokens", limits.default_max_new_tokens)
        _check_range("stopping.max_new_tokens", max_new_tokens, 1, limits.max_new_tokens)
        stop_sequences = tuple(stopping.stop_sequences)
        if len(stop_sequences) > limits.max_stop_sequences:
            raise InvalidArgument(
                "stopping.stop_sequences",
                f"stopping.stop_sequences has {len(stop_sequences)} entries; at most "
                f"{limits.max_stop_sequences} are allowed",
            )
        for index, stop in enumerate(stop_sequences):
            path = f"stopping.stop_sequences[{index}]"
            if not stop:
                raise InvalidArgument(path, f"{path} is empty; stop sequences must be 1..{limits.max_stop_sequence_chars} characters")
            if len(stop) > limits.max_stop_sequence_chars:
                raise InvalidArgument(
                    path, f"{path} has {len(stop)} characters; at most {limits.max_stop_sequence_chars} are allowed"
                )
        max_time_limit_ms = round(limits.max_time_limit_s * 1000)
        _check_range("stopping.time_limit_ms", stopping.time_limit_ms, 0, max_time_limit_ms, note=" (0 = none)")

        retrieval = request.retrieval
        mode = _resolve_mode(retrieval.mode, context)
        layout = _resolve_enum("retrieval.layout", retrieval.layout, LAYOUT_FROM_PB, pb.ContextLayout,
                               context.retrieval.layout)
        shard_policy = _resolve_enum("retrieval.shard_policy", retrieval.shard_policy, SHARD_POLICY_FROM_PB,
                                     pb.ShardPolicy, context.retrieval.shard_policy)
        defaults = context.retrieval
        neighbours = _optional(retrieval, "neighbours", defaults.neighbours)
        _check_range("retrieval.neighbours", neighbours, 1, defaults.max_neighbours)
        stride = _optional(retrieval, "stride", defaults.stride)
        _check_range("retrieval.stride", stride, defaults.min_stride, defaults.max_stride)
        query_tokens = _optional(retrieval, "query_tokens", defaults.query_tokens)
        _check_range("retrieval.query_tokens", query_tokens, 1, defaults.max_query_tokens)
        knn_lambda = _optional(retrieval, "knn_lambda", defaults.knn_lambda)
        _check_finite("retrieval.knn_lambda", knn_lambda)
        _check_range("retrieval.knn_lambda", knn_lambda, 0.0, 1.0)
        knn_k = _optional(retrieval, "knn_k", defaults.knn_k)
        _check_range("retrieval.knn_k", knn_k, 1, defaults.max_knn_k)
        knn_temperature = _optional(retrieval, "knn_temperature", defaults.knn_temperature)
        _check_finite("retrieval.knn_temperature", knn_temperature)
        if not knn_temperature > 0:
            raise InvalidArgument("retrieval.knn_temperature",
                                  f"retrieval.knn_temperature={_show(knn_temperature)} must be > 0")
        knn_skip_above_prob = _optional(retrieval, "knn_skip_above_prob", defaults.knn_skip_above_prob)
        _check_finite("retrieval.knn_skip_above_prob", knn_skip_above_prob)
        if not 0.0 < knn_skip_above_prob <= 1.0:
            raise InvalidArgument("retrieval.knn_skip_above_prob",
                                  f"retrieval.knn_skip_above_prob={_show(knn_skip_above_prob)} must be in (0, 1] "
                                  "(1 = never skip)")
        keep_rank_margin = _optional(retrieval, "keep_rank_margin", defaults.keep_rank_margin)
        _check_range("retrieval.keep_rank_margin", keep_rank_margin, 0, defaults.max_neighbours)
        knn_pointer_min = _optional(retrieval, "knn_pointer_min", defaults.knn_pointer_min)
        _check_range("retrieval.knn_pointer_min", knn_pointer_min, 0, defaults.max_knn_k, note=" (0 = off)")

        prompt_ids = None
        if context.tokenize is not None:
            prompt_ids = tuple(context.tokenize(request.prompt))
            if len(prompt_ids) > limits.max_prompt_tokens:
                raise InvalidArgument(
                    "prompt",
                    f"prompt has {len(prompt_ids)} tokens; at most {limits.max_prompt_tokens} are allowed",
                )

        greedy = temperature == 0.0
        return cls(
            prompt=request.prompt,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new_tokens,
            temperature=float(temperature),
            top_p=1.0 if greedy else float(top_p),
            top_k=0 if greedy else top_k,
            seed=None if greedy else seed,
            stop_sequences=stop_sequences,
            include_stop_sequence=stopping.include_stop_sequence,
            time_limit_s=stopping.time_limit_ms / 1000 if stopping.time_limit_ms else limits.max_time_limit_s,
            retrieval_mode=mode,
            neighbours=neighbours,
            stride=stride,
            query_tokens=query_tokens,
            layout=layout,
            keep_same_neighbours=defaults.keep_same_neighbours,
            neighbour_tokens=defaults.neighbour_tokens,
            keep_rank_margin=keep_rank_margin,
            shard_policy=shard_policy,
            return_provenance=retrieval.return_provenance,
            return_token_ids=request.response.return_token_ids,
            return_logprobs=request.response.return_logprobs,
            knn_lambda=float(knn_lambda),
            knn_k=knn_k,
            knn_temperature=float(knn_temperature),
            knn_skip_above_prob=float(knn_skip_above_prob),
            knn_pointer_min=knn_pointer_min,
        )


@dataclass(frozen=True)
class RetrieveQuery:
    """A validated Retrieve request."""

    query: str
    neighbours: int
    shard_policy: str = "partial"

    @classmethod
    def from_pb(cls, request: pb.RetrieveRequest, context: ValidationContext) -> "RetrieveQuery":
        if not context.has_chunk_datastore:
            raise DatastoreUnavailable("this server runs without a chunk datastore, so Retrieve cannot search one")
        if not request.query.strip():
            raise InvalidArgument("query", "query must contain a non-whitespace character")
        if len(request.query) > context.limits.max_query_chars:
            raise InvalidArgument(
                "query", f"query has {len(request.query)} characters; at most {context.limits.max_query_chars} are allowed"
            )
        neighbours = _optional(request, "neighbours", context.retrieval.neighbours)
        _check_range("neighbours", neighbours, 1, context.retrieval.max_neighbours)
        shard_policy = _resolve_enum("shard_policy", request.shard_policy, SHARD_POLICY_FROM_PB, pb.ShardPolicy,
                                     context.retrieval.shard_policy)
        return cls(request.query, neighbours, shard_policy)


@dataclass(frozen=True)
class TokenizeQuery:
    """A validated Tokenize request (empty text is fine: it has zero tokens)."""

    text: str
    return_tokens: bool

    @classmethod
    def from_pb(cls, request: pb.TokenizeRequest, context: ValidationContext) -> "TokenizeQuery":
        if len(request.text) > context.limits.max_tokenize_chars:
            raise InvalidArgument(
                "text", f"text has {len(request.text)} characters; at most {context.limits.max_tokenize_chars} are allowed"
            )
        return cls(request.text, request.return_tokens)


# -- helpers -------------------------------------------------------------------------------------


def _optional(message, name: str, default):
    """The field's value when the client set it (proto3 `optional` presence), else `default`."""
    return getattr(message, name) if message.HasField(name) else default


def _show(value) -> str:
    """-1.0 -> "-1", 0.25 -> "0.25", nan -> "nan": values as a person would write them."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _check_finite(path: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(path, f"{path}={_show(value)} must be a finite number")


def _check_range(path: str, value, low, high, note: str = "") -> None:
    if not low <= value <= high:
        raise InvalidArgument(path, f"{path}={_show(value)} must be in [{_show(low)}, {_show(high)}]{note}")


def _resolve_enum(path: str, number: int, known: dict[int, str], enum_type, default: str) -> str:
    if number == 0:
        return default
    if number not in known:
        valid = ", ".join(enum_type.keys())
        raise InvalidArgument(path, f"{path}={number} is not a known {enum_type.DESCRIPTOR.name}; valid: {valid}")
    return known[number]


_MODE_NEEDS = {"chunk": "a chunk-mode datastore", "token": "a token-mode datastore",
               "hybrid": "both a chunk-mode and a token-mode datastore"}


def _resolve_mode(number: int, context: ValidationContext) -> str:
    mode = _resolve_enum("retrieval.mode", number, MODE_FROM_PB, pb.RetrievalMode, context.default_mode)
    if mode not in context.available_modes:
        raise InvalidArgument(
            "retrieval.mode",
            f"retrieval.mode={pb.RetrievalMode.Name(number)} needs {_MODE_NEEDS[mode]}, which this "
            f"server has not loaded; available modes: {', '.join(context.available_modes)}",
        )
    return mode
