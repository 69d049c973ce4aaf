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
from server.config import CHUNK_MODES
from server.core.engine import Engine, SegmentSampling
from server.core.output import OutputText, StopSequences
from server.core.params import GenerationParams
from server.knn.settings import KnnRequestSettings

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

    async def generate(self, params: GenerationParams, request_id: str, batcher=None) -> AsyncIterator[GenerationDelta]:
        """Yield deltas; the last one carries `result`. Cancellation aborts the engine request.

        `batcher`: the retriever.batcher.RetrievalBatcher chunk mode retrieves through."""
        request = self._start(params, batcher)
        deadline = request.started + params.time_limit_s if params.time_limit_s else None
        # kNN-LM retrieves inside the engine at every step (server/knn/model.py): token mode is one
        # segment, hybrid mode carries it into each chunk-mode segment.
        knn = params.knn_settings()
        while request.stop_reason is None:
            remaining = params.max_new_tokens - len(request.generated)
            span = min(params.stride, remaining) if request.chunk_mode else remaining
            pending = await self._next_context(request, batcher, span)
            finish_reason = None
            try:
                async with asyncio.timeout(None if deadline is None else max(0.0, deadline - time.perf_counter())):
                    async for delta in self.engine.generate_segment(request.built.token_ids,
                                                                    self._sampling(request, span, knn),
                                                                    f"{request_id}-{request.segments}"):
                        out = self._take(request, delta, pending)
                        if out is None:  # a stop sequence ended the request
                            break
                        pending = []
                        yield out
                        if delta.finished:
                            finish_reason = delta.finish_reason
            except TimeoutError:
                request.stop_reason = StopReason.TIME_LIMIT
            self._end_segment(request, finish_reason)
        yield self._finish(request)

    # -- input processing: the next segment's context ----------------------------------------

    def _start(self, params: GenerationParams, batcher) -> "_Request":
        if params.retrieval_mode in CHUNK_MODES and batcher is None:
            raise RuntimeError("chunk retrieval requested but the server has no datastore")
        seed = params.seed
        if seed is None and params.temperature > 0:
            seed = random.randrange(2**31)
        return _Request(
            params=params, seed=seed, started=time.perf_counter(),
            prompt_ids=self.tokenize(params.prompt) if params.prompt_ids is None else list(params.prompt_ids),
            output=OutputText(self.engine.tokenizer), stops=StopSequences(params.stop_sequences),
        )

    async def _next_context(self, request: "_Request", batcher, span: int) -> list[RetrievalEvent]:
        """Retrieve (chunk mode) and lay out the next segment's context; the new retrieval events."""
        params = request.params
        candidates: list[Any] = []
        if request.chunk_mode:
            history = request.prompt_ids + request.generated
            query_text, candidates, seconds, missing = await self.retrieve(
                batcher, history[-params.query_tokens:], request.fetched, params.shard_policy)
            request.retrieval_s += seconds
        request.built = context.next_context(
            request.built if request.chunk_mode else None,
            request.generated[request.segment_start:],
            request.prompt_ids,
            request.generated,
            candidates[: params.neighbours],
            self.separator_ids,
            self.engine.max_model_len - span,
            layout=params.layout,
            keep_same_neighbours=params.keep_same_neighbours,
            candidates=candidates,
            neighbour_tokens=params.neighbour_tokens,
        )
        pending = []
        if request.chunk_mode:
            # Provenance names the neighbours in the context, as this retrieval found them (a
            # continued context keeps chunks that are among its candidates, with their new scores).
            kept = set(request.built.neighbour_ids) if request.built.continued else None
            neighbours = (candidates[: params.neighbours] if kept is None
                          else [n for n in candidates if n.chunk_id in kept])
            start, start_char = len(request.generated), len(request.output.text)
            pending.append(RetrievalEvent(query_text, start, start, start_char, start_char, neighbours=neighbours,
                                          seconds=seconds, missing_shards=missing))
            request.retrievals.extend(pending)
        request.continued_segments += request.built.continued
        request.segment_start = len(request.generated)
        request.engine_prompt_tokens += len(request.built.token_ids)
        return pending

    @staticmethod
    def _sampling(request: "_Request", span: int, knn: KnnRequestSettings | None) -> SegmentSampling:
        params, seed = request.params, request.seed
        return SegmentSampling(
            max_tokens=span,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=None if seed is None else (seed + 1_000_003 * request.segments) % (2**31),
            logprobs=params.return_logprobs,
            knn=knn,
        )

    # -- output processing --------------------------------------------------------------------

    @staticmethod
    def _take(request: "_Request", delta, pending: list[RetrievalEvent]) -> GenerationDelta | None:
        """Add an engine delta to the request; what to stream, or None when a stop sequence ended
        the request (its tokens then go out with the result)."""
        params = request.params
        if delta.num_cached_tokens is not None and delta.token_ids and len(request.generated) == request.segment_start:
            request.cached_tokens += delta.num_cached_tokens
        if delta.token_ids and request.ttft is None:
            request.ttft = time.perf_counter() - request.started
        request.generated.extend(delta.token_ids)
        request.logprobs.extend(delta.logprobs or [])
        text = request.output.extend(delta.token_ids)
        out = GenerationDelta(token_ids=list(delta.token_ids), logprobs=list(delta.logprobs or []), retrievals=pending)
        hit = request.stops.find(text, request.emitted_chars)
        if hit is not None:
            index, request.stop_sequence = hit
            request.final_text = text[: index + (len(request.stop_sequence) if params.include_stop_sequence else 0)]
            request.stop_reason = StopReason.STOP_SEQUENCE
            request.unsent = out
            return None
        safe_end = request.stops.safe_end(text)
        if safe_end > request.emitted_chars:
            out.text = text[request.emitted_chars:safe_end]
            request.emitted_chars = safe_end
        return out

    @staticmethod
    def _end_segment(request: "_Request", finish_reason: str | None) -> None:
        if request.chunk_mode:
            request.retrievals[-1].end_token = len(request.generated)
        request.segments += 1
        if request.stop_reason is not None:
            return
        if finish_reason == "stop":
            request.stop_reason = StopReason.EOS_TOKEN
        elif len(request.generated) >= request.params.max_new_tokens:
            request.stop_reason = StopReason.MAX_TOKENS
        elif finish_reason == "abort":
            request.stop_reason = StopReason.CANCELLED

    def _finish(self, request: "_Request") -> GenerationDelta:
        """The last delta: the text not streamed yet and the result (metrics observed)."""
        if request.stop_reason != StopReason.STOP_SEQUENCE:
            request.final_text = self.decode(request.generated)
        if request.retrievals:
            _char_spans(request.retrievals, request.generated, self.decode, len(request.final_text))
        if self.metrics is not None:
            self.metrics.observe_generation(
                len(request.prompt_ids), len(request.generated), len(request.retrievals), request.cached_tokens,
                engine_prompt_tokens=request.engine_prompt_tokens, mode=request.params.retrieval_mode,
                continued_segments=request.continued_segments,
            )
        result = GenerationResult(
            text=request.final_text,
            token_ids=request.generated,
            logprobs=request.logprobs,
            prompt_tokens=len(request.prompt_ids),
            stop_reason=request.stop_reason,
            stop_sequence=request.stop_sequence,
            seed=request.seed,
            retrievals=request.retrievals,
            ttft_s=request.ttft,
            total_s=time.perf_counter() - request.started,
            retrieval_s=request.retrieval_s,
            engine_prompt_tokens=request.engine_prompt_tokens,
            cached_prompt_tokens=request.cached_tokens,
            continued_segments=request.continued_segments,
        )
        final_text, unsent = request.final_text, request.unsent
        tail = final_text[request.emitted_chars:] if len(final_text) > request.emitted_chars else ""
        return GenerationDelta(text=tail, token_ids=unsent.token_ids, logprobs=unsent.logprobs,
                               retrievals=unsent.retrievals, result=result)


@dataclass
class _Request:
    """One request's progress through its engine segments: the loop's state."""

    params: GenerationParams
    seed: int | None
    started: float
    prompt_ids: list[int]
    output: OutputText
    stops: StopSequences
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    retrievals: list[RetrievalEvent] = field(default_factory=list)
    built: context.BuiltContext | None = None
    """The latest segment's context; `segment_start` is where its output began."""
    segment_start: int = 0
    segments: int = 0
    ttft: float | None = None
    retrieval_s: float = 0.0
    engine_prompt_tokens: int = 0
    cached_tokens: int = 0
    continued_segments: int = 0
    stop_reason: str | None = None
    stop_sequence: str | None = None
    final_text: str = ""
    emitted_chars: int = 0
    unsent: GenerationDelta = field(default_factory=GenerationDelta)
    """Tokens, log-probs and retrievals of the delta a stop sequence ended (sent with the result)."""

    @property
    def chunk_mode(self) -> bool:
        return self.params.retrieval_mode in CHUNK_MODES

    @property
    def fetched(self) -> int:
        """Candidates each retrieval fetches (k, plus the rank margin when neighbours may be kept)."""
        return context.candidate_count(self.params.neighbours, self.params.keep_same_neighbours,
                                       self.params.keep_rank_margin)


def _char_spans(retrievals: list[RetrievalEvent], generated: list[int], decode, text_chars: int) -> None:
    """Character spans into the returned text (clamped: a matched stop sequence may cut it)."""
    for event in retrievals:
        event.start_char = min(len(decode(generated[: event.start_token])), text_chars)
        event.end_char = min(len(decode(generated[: event.end_token])), text_chars)
