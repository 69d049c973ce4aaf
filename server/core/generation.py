"""The RETRO-style generation loop: generate `stride` tokens, retrieve, re-prompt, repeat.

One user request becomes a sequence of engine segments. Before each segment (chunk mode) the last
`query_tokens` tokens of prompt+output form a query; its k neighbours, fetched through the
cross-request batcher, are laid out in the context (server/core/context.py; a retrieval that returns the
chunks already in the context continues it, so the engine finds it in its prefix cache) and the
engine continues for up to `stride` tokens. Concurrent requests share engine batches (vLLM continuous batching)
and retrieval batches (the batcher). Stop sequences and the time limit are enforced here, across
segment boundaries, and the engine request is aborted whenever the loop ends early.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.core import context
from server.config import CHUNK_MODES, DEFAULT_KEEP_RANK_MARGIN, DEFAULT_LAYOUT, DEFAULT_NEIGHBOUR_TOKENS, KNN_MODES
from server.core.engine import Engine, SegmentSampling
from server.knn.settings import DEFAULT_KNN_K, DEFAULT_KNN_LAMBDA, DEFAULT_KNN_TEMPERATURE, KnnRequestSettings

log = logging.getLogger(__name__)


class StopReason:
    MAX_TOKENS = "MAX_TOKENS"
    EOS_TOKEN = "EOS_TOKEN"
    STOP_SEQUENCE = "STOP_SEQUENCE"
    TIME_LIMIT = "TIME_LIMIT"
    CANCELLED = "CANCELLED"
    ERROR = "ERROR"


@dataclass
class RetrievalEvent:
    """One retrieval and the output span [start_token, end_token) it informed."""

    query_text: str
    start_token: int
    end_token: int
    start_char: int = 0
    end_char: int = 0
    neighbours: list[Any] = field(default_factory=list)
    seconds: float = 0.0
    missing_shards: tuple[Any, ...] = ()
    """Datastore shards that did not answer (retriever.datastore.MissingShard); partial policy only."""


@dataclass
class GenerationDelta:
    """What a streaming client receives: new text/tokens, and retrievals as they happen."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    retrievals: list[RetrievalEvent] = field(default_factory=list)
    result: "GenerationResult | None" = None


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    prompt_tokens: int
    stop_reason: str
    stop_sequence: str | None
    seed: int | None
    retrievals: list[RetrievalEvent]
    ttft_s: float | None
    total_s: float
    retrieval_s: float
    engine_prompt_tokens: int
    """Prompt tokens the engine was given over all segments (re-prefills included)."""
    cached_prompt_tokens: int
    """Of those, tokens served from vLLM's prefix cache."""
    continued_segments: int = 0
    """Retrievals that returned the chunks already in the context, so the segment continued it."""

    @property
    def computed_prompt_tokens(self) -> int:
        """Prompt tokens the engine computed (not served from the prefix cache)."""
        return self.engine_prompt_tokens - self.cached_prompt_tokens


@dataclass
class LoopSettings:
    """The resolved per-request knobs the loop needs (validation fills them from the request)."""

    prompt: str
    max_new_tokens: int
    prompt_ids: Sequence[int] | None = None
    """The prompt's token ids when validation already tokenized it; None: the loop tokenizes `prompt`."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_sequences: Sequence[str] = ()
    include_stop_sequence: bool = False
    time_limit_s: float | None = None
    retrieval_mode: str = "none"
    neighbours: int = 2
    stride: int = 16
    query_tokens: int = 32
    layout: str = DEFAULT_LAYOUT
    keep_same_neighbours: bool = True
    """Continue the previous context when a retrieval returns the chunks already in it."""
    neighbour_tokens: int = DEFAULT_NEIGHBOUR_TOKENS
    """Part of each neighbour in the context (0: all; context.neighbour_block)."""
    keep_rank_margin: int = DEFAULT_KEEP_RANK_MARGIN
    """Also continue it while those chunks are among the new k + this many nearest."""
    shard_policy: str = "partial"
    return_logprobs: bool = False
    knn_lambda: float = DEFAULT_KNN_LAMBDA
    knn_k: int = DEFAULT_KNN_K
    knn_temperature: float = DEFAULT_KNN_TEMPERATURE
    knn_skip_above_prob: float = 1.0
    knn_pointer_min: int = 0

    def knn_settings(self) -> KnnRequestSettings | None:
        """The engine's kNN-LM settings in token and hybrid mode (None in other modes)."""
        if self.retrieval_mode not in KNN_MODES:
            return None
        return KnnRequestSettings.from_knn_fields(self)


class Generator:
    """Runs generation requests against one engine; each chunk-mode request brings the retrieval
    batcher of the datastore it runs on (server/core/hot_swap.py pins one per request)."""

    def __init__(self, engine: Engine, metrics=None):
        self.engine = engine
        self.metrics = metrics
        self.separator_ids = context.separator_ids(engine.tokenizer)

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.engine.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    async def retrieve(self, batcher, query_ids: Sequence[int], k: int, shard_policy: str = "partial"):
        """(query text, neighbours, seconds, missing shards) from `batcher` (the datastore version
        this request holds); raises retriever.fanout.ShardsUnavailable when datastore shards are
        missing and `shard_policy` refuses partial neighbours."""
        query_text = self.decode(query_ids)
        start = time.perf_counter()
        neighbours = await batcher.retrieve(query_text, k)
        missing = ()
        if getattr(neighbours, "missing_shards", ()):
            from retriever.fanout import enforce_shard_policy

            missing = enforce_shard_policy(neighbours, shard_policy)
        return query_text, list(neighbours), time.perf_counter() - start, missing

    async def generate(self, settings: LoopSettings, request_id: str, batcher=None) -> AsyncIterator[GenerationDelta]:
        """Yield deltas; the last one carries `result`. Cancellation aborts the engine request.

        `batcher`: the retriever.batcher.RetrievalBatcher chunk mode retrieves through."""
        started = time.perf_counter()
        deadline = started + settings.time_limit_s if settings.time_limit_s else None
        prompt_ids = self.tokenize(settings.prompt) if settings.prompt_ids is None else list(settings.prompt_ids)
        use_retrieval = settings.retrieval_mode in CHUNK_MODES
        if use_retrieval and batcher is None:
            raise RuntimeError("chunk retrieval requested but the server has no datastore")
        # kNN-LM retrieves inside the engine at every step (server/knn/model.py): token mode is one
        # segment, hybrid mode carries it into each chunk-mode segment.
        knn = settings.knn_settings()
        seed = settings.seed
        if seed is None and settings.temperature > 0:
            seed = random.randrange(2**31)

        generated: list[int] = []
        logprobs: list[float] = []
        retrievals: list[RetrievalEvent] = []
        emitted_chars = 0
        ttft = None
        retrieval_s = 0.0
        engine_prompt_tokens = cached_tokens = 0
        stop_reason = None
        stop_sequence = None
        final_text = ""
        max_stop = max((len(s) for s in settings.stop_sequences), default=0)
        segment = 0
        neighbours: list[Any] = []
        candidates: list[Any] = []
        fetched = context.candidate_count(settings.neighbours, settings.keep_same_neighbours, settings.keep_rank_margin)
        built: context.BuiltContext | None = None
        """The previous segment's context; `segment_start` is where its output began."""
        segment_start = 0
        continued_segments = 0
        unsent = GenerationDelta()
        """Tokens, log-probs and retrievals of the delta a stop sequence ended (sent with the result)."""

        while stop_reason is None:
            remaining = settings.max_new_tokens - len(generated)
            span = min(settings.stride, remaining) if use_retrieval else remaining
            pending: list[RetrievalEvent] = []
            if use_retrieval:
                history = prompt_ids + generated
                query_ids = history[-settings.query_tokens :]
                query_text, candidates, seconds, missing = await self.retrieve(
                    batcher, query_ids, fetched, settings.shard_policy)
                retrieval_s += seconds
                start_char = len(self.decode(generated))
            built = context.next_context(
                built if use_retrieval else None,
                generated[segment_start:],
                prompt_ids,
                generated,
                candidates[: settings.neighbours] if use_retrieval else [],
                self.separator_ids,
                self.engine.max_model_len - span,
                layout=settings.layout,
                keep_same_neighbours=settings.keep_same_neighbours,
                candidates=candidates,
                neighbour_tokens=settings.neighbour_tokens,
            )
            if use_retrieval:
                # Provenance names the neighbours in the context, as this retrieval found them (a
                # continued context keeps chunks that are among its candidates, with their new scores).
                kept = set(built.neighbour_ids) if built.continued else None
                neighbours = (candidates[: settings.neighbours] if kept is None
                              else [n for n in candidates if n.chunk_id in kept])
                event = RetrievalEvent(
                    query_text, len(generated), len(generated), start_char, start_char,
                    neighbours=neighbours, seconds=seconds, missing_shards=missing,
                )
                retrievals.append(event)
                pending.append(event)
            continued_segments += built.continued
            segment_start = len(generated)
            engine_prompt_tokens += len(built.token_ids)
            sampling = SegmentSampling(
                max_tokens=span,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
                seed=None if seed is None else (seed + 1_000_003 * segment) % (2**31),
                logprobs=settings.return_logprobs,
                knn=knn,
            )
            segment_tokens = 0
            finish_reason = None
            try:
                async with asyncio.timeout(None if deadline is None else max(0.0, deadline - time.perf_counter())):
                    async for delta in self.engine.generate_segment(
                        built.token_ids, sampling, f"{request_id}-{segment}"
                    ):
                        if delta.num_cached_tokens is not None and segment_tokens == 0 and delta.token_ids:
                            cached_tokens += delta.num_cached_tokens
                        if delta.token_ids and ttft is None:
                            ttft = time.perf_counter() - started
                        generated.extend(delta.token_ids)
                        segment_tokens += len(delta.token_ids)
                        if delta.logprobs:
                            logprobs.extend(delta.logprobs)
                        text = self.decode(generated)
                        hit = _find_stop(text, settings.stop_sequences, emitted_chars, max_stop)
                        if hit is not None:
                            index, stop_sequence = hit
                            final_text = text[: index + (len(stop_sequence) if settings.include_stop_sequence else 0)]
                            stop_reason = StopReason.STOP_SEQUENCE
                            unsent = GenerationDelta(token_ids=list(delta.token_ids),
                                                     logprobs=list(delta.logprobs or []), retrievals=pending)
                            break
                        safe_end = len(text) - (max_stop - 1 if max_stop else 0)
                        if text.endswith("\ufffd"):
                            safe_end = min(safe_end, len(text) - 1)
                        out = GenerationDelta(token_ids=list(delta.token_ids), retrievals=pending)
                        if delta.logprobs:
                            out.logprobs = list(delta.logprobs)
                        if safe_end > emitted_chars:
                            out.text = text[emitted_chars:safe_end]
                            emitted_chars = safe_end
                        pending = []
                        yield out
                        if delta.finished:
                            finish_reason = delta.finish_reason
            except TimeoutError:
                stop_reason = StopReason.TIME_LIMIT
            for event in retrievals[-1:] if use_retrieval else []:
                event.end_token = len(generated)
            segment += 1
            if stop_reason is not None:
                break
            if finish_reason == "stop":
                stop_reason = StopReason.EOS_TOKEN
            elif len(generated) >= settings.max_new_tokens:
                stop_reason = StopReason.MAX_TOKENS
            elif finish_reason == "abort":
                stop_reason = StopReason.CANCELLED

        if stop_reason != StopReason.STOP_SEQUENCE:
            final_text = self.decode(generated)
        if retrievals:
            _char_spans(retrievals, generated, self.decode, len(final_text))
        if self.metrics is not None:
            self.metrics.observe_generation(
                len(prompt_ids), len(generated), len(retrievals), cached_tokens,
                engine_prompt_tokens=engine_prompt_tokens, mode=settings.retrieval_mode,
                continued_segments=continued_segments,
            )
        result = GenerationResult(
            text=final_text,
            token_ids=generated,
            logprobs=logprobs,
            prompt_tokens=len(prompt_ids),
            stop_reason=stop_reason,
            stop_sequence=stop_sequence,
            seed=seed,
            retrievals=retrievals,
            ttft_s=ttft,
            total_s=time.perf_counter() - started,
            retrieval_s=retrieval_s,
            engine_prompt_tokens=engine_prompt_tokens,
            cached_prompt_tokens=cached_tokens,
            continued_segments=continued_segments,
        )
        tail = final_text[emitted_chars:] if len(final_text) > emitted_chars else ""
        yield GenerationDelta(text=tail, token_ids=unsent.token_ids, logprobs=unsent.logprobs,
                              retrievals=unsent.retrievals, result=result)


def _find_stop(text: str, stops: Sequence[str], emitted: int, max_stop: int) -> tuple[int, str] | None:
    """Earliest stop sequence in the not-yet-emitted part of the text (plus overlap)."""
    if not stops:
        return None
    start = max(0, emitted - max_stop)
    best = None
    for stop in stops:
        index = text.find(stop, start)
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def _char_spans(retrievals: list[RetrievalEvent], generated: list[int], decode, text_chars: int) -> None:
    """Character spans into the returned text (clamped: a matched stop sequence may cut it)."""
    for event in retrievals:
        event.start_char = min(len(decode(generated[: event.start_token])), text_chars)
        event.end_char = min(len(decode(generated[: event.end_token])), text_chars)
