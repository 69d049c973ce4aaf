"""Request validation: protobuf requests in, plain resolved dataclasses out (a generation request
becomes server.core.params.GenerationParams), or InvalidArgument.

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

from retroserve.v1 import retroserve_pb2 as pb
from retroserve.v1.names import LAYOUT_FROM_PB, MODE_FROM_PB, SHARD_POLICY_FROM_PB
from server.config import Limits, RetrievalDefaults, modes_served
from server.core.params import GenerationParams
from server.errors import DatastoreUnavailable, InvalidArgument

MAX_SEED = 2**31 - 1
"""Seeds are in [0, 2**31 - 1]: the generation loop derives per-segment seeds modulo 2**31."""



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


def generation_params_from_pb(request: pb.GenerateRequest, context: ValidationContext) -> GenerationParams:
    """Validate and resolve a GenerateRequest; raises InvalidArgument naming the first bad field.

    Cheap checks run first; the prompt is tokenized last, only for requests otherwise valid.
    """
    if not request.prompt.strip():
        raise InvalidArgument("prompt", "prompt must contain a non-whitespace character")
    fields = {**_sampling_fields(request.sampling, context.limits),
              **_stopping_fields(request.stopping, context.limits),
              **_retrieval_fields(request.retrieval, context),
              "return_provenance": request.retrieval.return_provenance,
              "return_token_ids": request.response.return_token_ids,
              "return_logprobs": request.response.return_logprobs}
    prompt_ids = None
    if context.tokenize is not None:
        prompt_ids = tuple(context.tokenize(request.prompt))
        if len(prompt_ids) > context.limits.max_prompt_tokens:
            raise InvalidArgument(
                "prompt",
                f"prompt has {len(prompt_ids)} tokens; at most {context.limits.max_prompt_tokens} are allowed",
            )
    return GenerationParams(prompt=request.prompt, prompt_ids=prompt_ids, **fields)


def _sampling_fields(sampling: pb.SamplingParameters, limits: Limits) -> dict:
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
    greedy = temperature == 0.0
    return {"temperature": float(temperature), "top_p": 1.0 if greedy else float(top_p),
            "top_k": 0 if greedy else top_k, "seed": None if greedy else seed}


def _stopping_fields(stopping: pb.StoppingCriteria, limits: Limits) -> dict:
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
    return {"max_new_tokens": max_new_tokens, "stop_sequences": stop_sequences,
            "include_stop_sequence": stopping.include_stop_sequence,
            "time_limit_s": stopping.time_limit_ms / 1000 if stopping.time_limit_ms else limits.max_time_limit_s}


def _retrieval_fields(retrieval: pb.RetrievalParameters, context: ValidationContext) -> dict:
    defaults = context.retrieval
    fields = {
        "retrieval_mode": _resolve_mode(retrieval.mode, context),
        "layout": _resolve_enum("retrieval.layout", retrieval.layout, LAYOUT_FROM_PB, pb.ContextLayout,
                                defaults.layout),
        "shard_policy": _resolve_enum("retrieval.shard_policy", retrieval.shard_policy, SHARD_POLICY_FROM_PB,
                                      pb.ShardPolicy, defaults.shard_policy),
        "keep_same_neighbours": defaults.keep_same_neighbours,
        "neighbour_tokens": defaults.neighbour_tokens,
    }
    for name, low, high, note in (("neighbours", 1, defaults.max_neighbours, ""),
                                  ("stride", defaults.min_stride, defaults.max_stride, ""),
                                  ("query_tokens", 1, defaults.max_query_tokens, ""),
                                  ("knn_k", 1, defaults.max_knn_k, ""),
                                  ("keep_rank_margin", 0, defaults.max_neighbours, ""),
                                  ("knn_pointer_min", 0, defaults.max_knn_k, " (0 = off)")):
        fields[name] = _optional(retrieval, name, getattr(defaults, name))
        _check_range(f"retrieval.{name}", fields[name], low, high, note=note)
    for name in ("knn_lambda", "knn_temperature", "knn_skip_above_prob"):
        fields[name] = float(_optional(retrieval, name, getattr(defaults, name)))
        _check_finite(f"retrieval.{name}", fields[name])
    _check_range("retrieval.knn_lambda", fields["knn_lambda"], 0.0, 1.0)
    if not fields["knn_temperature"] > 0:
        raise InvalidArgument("retrieval.knn_temperature",
                              f"retrieval.knn_temperature={_show(fields['knn_temperature'])} must be > 0")
    if not 0.0 < fields["knn_skip_above_prob"] <= 1.0:
        raise InvalidArgument("retrieval.knn_skip_above_prob",
                              f"retrieval.knn_skip_above_prob={_show(fields['knn_skip_above_prob'])} must be "
                              "in (0, 1] (1 = never skip)")
    return fields


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
