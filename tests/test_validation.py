"""Every out-of-bounds field becomes InvalidArgument naming the field and its limit; a valid request
resolves to the documented defaults. Token ids come from a whitespace tokenizer: validation takes
the tokenizer as a callable precisely so that it can be tested without the model's tokenizer."""

from __future__ import annotations

import math

import pytest

from retroserve.v1 import retroserve_pb2 as pb
from server.config import Limits, RetrievalDefaults
from server.errors import DatastoreUnavailable, InvalidArgument
from server.api.validation import (
    MAX_SEED,
    RetrieveQuery,
    TokenizeQuery,
    ValidationContext,
    generation_params_from_pb,
)
from server.core.params import GenerationParams

LIMITS = Limits()
DEFAULTS = RetrievalDefaults()


def word_ids(text: str) -> list[int]:
    """One id per whitespace-separated word (its position)."""
    return list(range(len(text.split())))


CONTEXT = ValidationContext(LIMITS, DEFAULTS, tokenize=word_ids, has_chunk_datastore=True)


def request(**parts) -> pb.GenerateRequest:
    message = pb.GenerateRequest(prompt=parts.pop("prompt", "Tell me about assert."))
    if "request_id" in parts:
        message.request_id = parts.pop("request_id")
    for part, fields in parts.items():
        for name, value in fields.items():
            target = getattr(message, part)
            if isinstance(value, (list, tuple)):
                getattr(target, name).extend(value)
            else:
                setattr(target, name, value)
    return message


def refused(message: pb.GenerateRequest, context: ValidationContext = CONTEXT) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        generation_params_from_pb(message, context)
    return info.value


# (parts of the request, field path, text the message must contain: the value and the bound)
INVALID = [
    ({"prompt": ""}, "prompt", "non-whitespace"),
    ({"prompt": " \n\t "}, "prompt", "non-whitespace"),
    ({"prompt": "word " * (LIMITS.max_prompt_tokens + 1)}, "prompt",
     f"{LIMITS.max_prompt_tokens + 1} tokens; at most {LIMITS.max_prompt_tokens}"),
    ({"sampling": {"temperature": -1.0}}, "sampling.temperature", "sampling.temperature=-1 must be in [0, 2]"),
    ({"sampling": {"temperature": 1e9}}, "sampling.temperature", "=1e+09 must be in [0, 2]"),
    ({"sampling": {"temperature": math.nan}}, "sampling.temperature", "nan must be a finite number"),
    ({"sampling": {"temperature": math.inf}}, "sampling.temperature", "inf must be a finite number"),
    ({"sampling": {"top_p": 0.0}}, "sampling.top_p", "sampling.top_p=0 must be in (0, 1]"),
    ({"sampling": {"top_p": 1.5}}, "sampling.top_p", "sampling.top_p=1.5 must be in (0, 1]"),
    ({"sampling": {"top_p": -0.1}}, "sampling.top_p", "(0, 1]"),
    ({"sampling": {"top_p": math.nan}}, "sampling.top_p", "finite"),
    ({"sampling": {"top_k": -1}}, "sampling.top_k", f"sampling.top_k=-1 must be in [0, {LIMITS.max_top_k}]"),
    ({"sampling": {"top_k": LIMITS.max_top_k + 1}}, "sampling.top_k", f"[0, {LIMITS.max_top_k}]"),
    ({"sampling": {"seed": -5}}, "sampling.seed", f"sampling.seed=-5 must be in [0, {MAX_SEED}]"),
    ({"sampling": {"seed": MAX_SEED + 1}}, "sampling.seed", f"[0, {MAX_SEED}]"),
    ({"stopping": {"max_new_tokens": 0}}, "stopping.max_new_tokens",
     f"stopping.max_new_tokens=0 must be in [1, {LIMITS.max_new_tokens}]"),
    ({"stopping": {"max_new_tokens": LIMITS.max_new_tokens + 1}}, "stopping.max_new_tokens",
     f"[1, {LIMITS.max_new_tokens}]"),
    ({"stopping": {"stop_sequences": ["x"] * (LIMITS.max_stop_sequences + 1)}}, "stopping.stop_sequences",
     f"{LIMITS.max_stop_sequences + 1} entries; at most {LIMITS.max_stop_sequences}"),
    ({"stopping": {"stop_sequences": ["ok", ""]}}, "stopping.stop_sequences[1]",
     f"empty; stop sequences must be 1..{LIMITS.max_stop_sequence_chars} characters"),
    ({"stopping": {"stop_sequences": ["y" * (LIMITS.max_stop_sequence_chars + 1)]}}, "stopping.stop_sequences[0]",
     f"{LIMITS.max_stop_sequence_chars + 1} characters; at most {LIMITS.max_stop_sequence_chars}"),
    ({"stopping": {"time_limit_ms": -1}}, "stopping.time_limit_ms",
     f"stopping.time_limit_ms=-1 must be in [0, {round(LIMITS.max_time_limit_s * 1000)}]"),
    ({"stopping": {"time_limit_ms": round(LIMITS.max_time_limit_s * 1000) + 1}}, "stopping.time_limit_ms",
     f"[0, {round(LIMITS.max_time_limit_s * 1000)}]"),
    ({"retrieval": {"mode": 99}}, "retrieval.mode",
     "retrieval.mode=99 is not a known RetrievalMode; valid: RETRIEVAL_MODE_UNSPECIFIED"),
    ({"retrieval": {"mode": pb.RETRIEVAL_MODE_TOKEN}}, "retrieval.mode", "needs a token-mode datastore"),
    ({"retrieval": {"layout": 7}}, "retrieval.layout", "retrieval.layout=7 is not a known ContextLayout"),
    ({"retrieval": {"neighbours": 0}}, "retrieval.neighbours",
     f"retrieval.neighbours=0 must be in [1, {DEFAULTS.max_neighbours}]"),
    ({"retrieval": {"neighbours": DEFAULTS.max_neighbours + 1}}, "retrieval.neighbours",
     f"[1, {DEFAULTS.max_neighbours}]"),
    ({"retrieval": {"stride": 0}}, "retrieval.stride",
     f"retrieval.stride=0 must be in [{DEFAULTS.min_stride}, {DEFAULTS.max_stride}]"),
    ({"retrieval": {"stride": DEFAULTS.max_stride + 1}}, "retrieval.stride", f"{DEFAULTS.max_stride}]"),
    ({"retrieval": {"keep_rank_margin": DEFAULTS.max_neighbours + 1}}, "retrieval.keep_rank_margin",
     f"retrieval.keep_rank_margin={DEFAULTS.max_neighbours + 1} must be in [0, {DEFAULTS.max_neighbours}]"),
    ({"retrieval": {"query_tokens": 0}}, "retrieval.query_tokens",
     f"retrieval.query_tokens=0 must be in [1, {DEFAULTS.max_query_tokens}]"),
    ({"retrieval": {"query_tokens": DEFAULTS.max_query_tokens + 1}}, "retrieval.query_tokens",
     f"[1, {DEFAULTS.max_query_tokens}]"),
]


@pytest.mark.parametrize("parts, field_path, expected", INVALID, ids=[case[1] + f"#{i}" for i, case in enumerate(INVALID)])
def test_invalid_field_is_refused_with_its_limit(parts, field_path, expected):
    error = refused(request(**parts))
    assert error.field_path == field_path
    assert expected in str(error)


def test_chunk_mode_refused_without_a_datastore():
    context = ValidationContext(LIMITS, DEFAULTS, tokenize=word_ids, has_chunk_datastore=False)
    error = refused(request(retrieval={"mode": pb.RETRIEVAL_MODE_CHUNK}), context)
    assert "needs a chunk-mode datastore" in str(error) and "available modes: none" in str(error)


def test_token_mode_accepted_with_a_token_datastore():
    context = ValidationContext(LIMITS, DEFAULTS, tokenize=word_ids, has_token_datastore=True)
    resolved = generation_params_from_pb(request(retrieval={"mode": pb.RETRIEVAL_MODE_TOKEN}), context)
    assert resolved.retrieval_mode == "token"


def test_hybrid_mode_needs_both_datastores():
    for has_chunk, has_token, available in [(True, False, "none, chunk"), (False, True, "none, token")]:
        context = ValidationContext(LIMITS, DEFAULTS, tokenize=word_ids, has_chunk_datastore=has_chunk,
                                    has_token_datastore=has_token)
        error = refused(request(retrieval={"mode": pb.RETRIEVAL_MODE_HYBRID}), context)
        assert "needs both a chunk-mode and a token-mode datastore" in str(error)
        assert f"available modes: {available}" in str(error)
    context = ValidationContext(LIMITS, DEFAULTS, tokenize=word_ids, has_token_datastore=True)
    assert context.available_modes == ("none", "chunk", "token", "hybrid")
    resolved = generation_params_from_pb(
        request(retrieval={"mode": pb.RETRIEVAL_MODE_HYBRID, "neighbours": 3, "knn_lambda": 0.5}), context)
    assert (resolved.retrieval_mode, resolved.neighbours, resolved.knn_lambda) == ("hybrid", 3, 0.5)


def test_prompt_at_the_limit_is_accepted():
    prompt = "word " * LIMITS.max_prompt_tokens
    assert generation_params_from_pb(request(prompt=prompt), CONTEXT).prompt_token_count == LIMITS.max_prompt_tokens


def test_tokenizer_is_not_called_for_requests_refused_by_cheaper_checks():
    def explode(text):
        raise AssertionError("tokenized an invalid request")

    context = ValidationContext(LIMITS, DEFAULTS, tokenize=explode)
    with pytest.raises(InvalidArgument):
        generation_params_from_pb(request(sampling={"top_p": 2.0}), context)


def test_unset_fields_resolve_to_server_defaults():
    resolved = generation_params_from_pb(pb.GenerateRequest(prompt="Hello"), CONTEXT)
    assert resolved == GenerationParams(
        prompt="Hello",
        prompt_ids=(0,),
        max_new_tokens=LIMITS.default_max_new_tokens,
        temperature=0.0, top_p=1.0, top_k=0, seed=None,
        stop_sequences=(), include_stop_sequence=False, time_limit_s=LIMITS.max_time_limit_s,
        retrieval_mode=DEFAULTS.mode,
        neighbours=DEFAULTS.neighbours, stride=DEFAULTS.stride, query_tokens=DEFAULTS.query_tokens,
        layout=DEFAULTS.layout,
    )
    assert resolved.greedy


def test_default_mode_falls_back_to_none_without_a_datastore():
    context = ValidationContext(LIMITS, DEFAULTS, tokenize=word_ids, has_chunk_datastore=False)
    assert generation_params_from_pb(pb.GenerateRequest(prompt="Hi"), context).retrieval_mode == "none"


def test_valid_request_round_trips():
    message = request(
        prompt="The assert statement",
        request_id="abc-123",
        sampling={"temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 1234},
        stopping={"max_new_tokens": 100, "stop_sequences": ["\n\n", "END"], "time_limit_ms": 2500,
                  "include_stop_sequence": True},
        retrieval={"mode": pb.RETRIEVAL_MODE_CHUNK, "neighbours": 4, "stride": 64, "query_tokens": 16,
                   "return_provenance": True, "layout": pb.CONTEXT_LAYOUT_AFTER_PROMPT},
        response={"return_token_ids": True, "return_logprobs": True},
    )
    # Through the wire format, as the server receives it.
    message = pb.GenerateRequest.FromString(message.SerializeToString())
    resolved = generation_params_from_pb(message, CONTEXT)
    assert resolved == GenerationParams(
        prompt="The assert statement", prompt_ids=(0, 1, 2), max_new_tokens=100,
        temperature=0.7, top_p=0.9, top_k=40, seed=1234,
        stop_sequences=("\n\n", "END"), include_stop_sequence=True, time_limit_s=2.5,
        retrieval_mode="chunk", neighbours=4, stride=64, query_tokens=16, layout="after_prompt",
        return_provenance=True, return_token_ids=True, return_logprobs=True,
    )
    assert resolved.prompt_ids == (0, 1, 2)  # tokenized once, here, and handed to the loop


def test_greedy_ignores_sampling_knobs():
    """temperature 0 is greedy: top_p/top_k/seed are dropped so the resolved request says so."""
    resolved = generation_params_from_pb(
        request(sampling={"temperature": 0.0, "top_p": 0.5, "top_k": 3, "seed": 9}), CONTEXT
    )
    assert (resolved.top_p, resolved.top_k, resolved.seed) == (1.0, 0, None)


def test_bounds_follow_the_configured_limits():
    context = ValidationContext(Limits(max_new_tokens=10, default_max_new_tokens=5), DEFAULTS, tokenize=word_ids)
    error = refused(request(stopping={"max_new_tokens": 11}), context)
    assert "must be in [1, 10]" in str(error)


def test_every_field_of_a_request_reaches_its_parameters_and_only_the_engine_setting_of_knn():
    """GenerationParams is the one request type from the API to the engine: every set field of
    a GenerateRequest arrives under its own name, and the kNN-LM settings derive from it."""
    context = ValidationContext(LIMITS, DEFAULTS, tokenize=word_ids, has_token_datastore=True)
    resolved = generation_params_from_pb(request(retrieval={
        "mode": pb.RETRIEVAL_MODE_HYBRID, "knn_lambda": 0.5, "knn_k": 8, "knn_temperature": 3.0,
        "knn_skip_above_prob": 0.9, "knn_pointer_min": 2, "keep_rank_margin": 0,
        "shard_policy": pb.SHARD_POLICY_REQUIRE_ALL}), context)
    assert (resolved.knn_lambda, resolved.knn_k, resolved.knn_temperature, resolved.knn_skip_above_prob,
            resolved.knn_pointer_min, resolved.keep_rank_margin, resolved.shard_policy) == (
        0.5, 8, 3.0, 0.9, 2, 0, "require_all")
    knn = resolved.knn_settings()
    assert (knn.lam, knn.k, knn.temperature, knn.skip_above_prob, knn.pointer_min) == (0.5, 8, 3.0, 0.9, 2)
    assert generation_params_from_pb(request(), CONTEXT).knn_settings() is None  # chunk mode


# -- Retrieve and Tokenize ------------------------------------------------------------------------


def test_retrieve_valid_and_defaults():
    assert RetrieveQuery.from_pb(pb.RetrieveRequest(query="assert"), CONTEXT) == RetrieveQuery("assert", DEFAULTS.neighbours)
    assert RetrieveQuery.from_pb(pb.RetrieveRequest(query="assert", neighbours=5), CONTEXT).neighbours == 5


@pytest.mark.parametrize(
    "message, field_path, expected",
    [
        (pb.RetrieveRequest(query=""), "query", "non-whitespace"),
        (pb.RetrieveRequest(query="   "), "query", "non-whitespace"),
        (pb.RetrieveRequest(query="q" * (LIMITS.max_query_chars + 1)), "query",
         f"at most {LIMITS.max_query_chars} are allowed"),
        (pb.RetrieveRequest(query="q", neighbours=0), "neighbours", f"neighbours=0 must be in [1, {DEFAULTS.max_neighbours}]"),
        (pb.RetrieveRequest(query="q", neighbours=DEFAULTS.max_neighbours + 1), "neighbours",
         f"[1, {DEFAULTS.max_neighbours}]"),
    ],
)
def test_retrieve_invalid(message, field_path, expected):
    with pytest.raises(InvalidArgument) as info:
        RetrieveQuery.from_pb(message, CONTEXT)
    assert info.value.field_path == field_path and expected in str(info.value)


def test_retrieve_without_datastore_is_a_failed_precondition():
    context = ValidationContext(LIMITS, DEFAULTS, has_chunk_datastore=False)
    with pytest.raises(DatastoreUnavailable):
        RetrieveQuery.from_pb(pb.RetrieveRequest(query="assert"), context)


def test_tokenize():
    assert TokenizeQuery.from_pb(pb.TokenizeRequest(text="", return_tokens=True), CONTEXT) == TokenizeQuery("", True)
    with pytest.raises(InvalidArgument) as info:
        TokenizeQuery.from_pb(pb.TokenizeRequest(text="x" * (LIMITS.max_tokenize_chars + 1)), CONTEXT)
    assert f"at most {LIMITS.max_tokenize_chars} are allowed" in str(info.value)


def test_server_wide_neighbour_tokens_reach_info_with_their_sign():
    from server.api import pb_convert

    for tokens in (64, -64):
        info = pb_convert.retrieval_defaults_to_pb(RetrievalDefaults(neighbour_tokens=tokens), ("none", "chunk"))
        assert info.neighbour_tokens == tokens
