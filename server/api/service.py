"""The `retroserve.v1.Retroserve` servicer: validate, admit, run the generation loop, answer.

Each RPC validates its request (server/api/validation.py) before any work starts, then generation
requests pass an admission bound (`Limits.max_queue` admitted at once; more get
RESOURCE_EXHAUSTED at once instead of queueing without bound). Exceptions are domain errors
(server/errors.py); the interceptor (server/api/errors.py) turns them into status codes. A client
that cancels, or whose deadline passes, cancels the handler task, which aborts the engine request
(server/core/engine.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import time
from pathlib import Path

from retroserve.v1 import retroserve_pb2 as pb
from retroserve.v1 import retroserve_pb2_grpc
from retriever import neighbour_pb
from server.api import pb_convert
from server.core import request_context
from server.config import CHUNK_MODES, ServerConfig
from server.errors import EngineDead, NotReady, Overloaded
from server.core.generation import GenerationDelta, GenerationResult, Generator, RetrievalEvent
from server.core.params import GenerationParams
from server.api.validation import RetrieveQuery, TokenizeQuery, ValidationContext, generation_params_from_pb


class Admission:
    """At most `limit` generation requests admitted; tracks waiting (no token yet) and running."""

    def __init__(self, limit: int, metrics=None):
        self.limit = limit
        self.metrics = metrics
        self.admitted = 0
        self.running = 0

    @contextlib.contextmanager
    def admit(self):
        if self.admitted >= self.limit:
            raise Overloaded(
                f"{self.admitted} generation requests are in progress, the most this server admits "
                f"(max_queue={self.limit}); retry with backoff"
            )
        self.admitted += 1
        ticket = _Ticket(self)
        self._publish()
        try:
            yield ticket
        finally:
            self.admitted -= 1
            if ticket.started:
                self.running -= 1
            self._publish()

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.requests_running.set(self.running)
            self.metrics.requests_waiting.set(self.admitted - self.running)


class _Ticket:
    def __init__(self, admission: Admission):
        self.admission = admission
        self.started = False

    def mark_started(self) -> None:
        if not self.started:
            self.started = True
            self.admission.running += 1
            self.admission._publish()


def retrieval_to_pb(event: RetrievalEvent, open_span: bool = False) -> pb.Retrieval:
    """`open_span`: the span is still being generated (GenerateStream), so end == start."""
    return pb.Retrieval(
        query_text=event.query_text,
        start_token=event.start_token,
        end_token=event.start_token if open_span else event.end_token,
        start_char=event.start_char,
        end_char=event.start_char if open_span else event.end_char,
        neighbours=[neighbour_pb.to_pb(n) for n in event.neighbours],
        retrieval_ms=event.seconds * 1000.0,
        missing_shards=[pb_convert.missing_shard_to_pb(m) for m in event.missing_shards],
    )


def _summary_fields(result: GenerationResult, request_id: str) -> dict:
    """Fields shared by GenerateResponse and the last GenerateStreamResponse."""
    fields = dict(
        generated_token_count=len(result.token_ids),
        prompt_token_count=result.prompt_tokens,
        stop_reason=pb_convert.stop_reason_to_pb(result.stop_reason),
        stop_sequence=result.stop_sequence or "",
        timing=pb.GenerationTiming(
            ttft_ms=(result.ttft_s or 0.0) * 1000.0,
            total_ms=result.total_s * 1000.0,
            retrieval_ms=result.retrieval_s * 1000.0,
            retrievals=len(result.retrievals),
        ),
        prefix_cache=pb.PrefixCacheStats(
            engine_prompt_tokens=result.engine_prompt_tokens,
            cached_prompt_tokens=result.cached_prompt_tokens,
            continued_segments=result.continued_segments,
        ),
        request_id=request_id,
    )
    if result.seed is not None:
        fields["seed"] = result.seed
    return fields


def _model_info(config: ServerConfig, engine) -> pb.ModelInfo:
    """Computed once at start: fingerprints hash the weights (~0.3 s for the default model)."""
    from retriever import fingerprints

    model_dir = Path(config.engine.model_dir)
    quant = (json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {})
    quantization = (
        f"{quant.get('quant_method', '?')} {quant.get('bits', '?')}-bit group {quant.get('group_size', '?')}"
        if quant else "none"
    )
    quantization += f"; served as {engine.served_what}"
    return pb.ModelInfo(
        name=model_dir.name,
        fingerprint=fingerprints.model_fingerprint(model_dir),
        tokenizer_fingerprint=fingerprints.tokenizer_fingerprint(model_dir),
        quantization=quantization,
        dtype=engine.dtype,
        max_model_len=engine.max_model_len,
        device=engine.device,
    )


class RetroserveService(retroserve_pb2_grpc.RetroserveServicer):
    """Serves one engine and (optionally) a chunk datastore, held in a server.core.hot_swap.DatastoreSlot
    so it can be swapped while serving; token mode is served by the engine itself when it was
    started with a token datastore."""

    def __init__(self, config: ServerConfig, engine, datastores=None, metrics=None):
        self.config = config
        self.engine = engine
        self.datastores = datastores
        self.metrics = metrics
        self.generator = Generator(engine, metrics)
        self.validation = ValidationContext(
            limits=config.limits,
            retrieval=config.retrieval,
            tokenize=self.generator.tokenize,
            has_chunk_datastore=datastores is not None,
            has_token_datastore=getattr(engine, "has_token_datastore", False),
        )
        self.admission = Admission(config.limits.max_queue, metrics)
        self.model_info = _model_info(config, engine)
        self.draining = False
        try:
            self.version = importlib.metadata.version("retroserve")
        except importlib.metadata.PackageNotFoundError:  # running from a source tree
            self.version = "0+source"

    # -- helpers ---------------------------------------------------------------------------------

    def _check_ready(self) -> None:
        if self.draining:
            raise NotReady("the server is shutting down; retry on another replica")
        if self.engine.errored:
            raise EngineDead("the inference engine has stopped; the server is restarting")

    def _validate_generation(self, request: pb.GenerateRequest) -> GenerationParams:
        validated = generation_params_from_pb(request, self.validation)
        current = request_context.current_request()
        if current is not None:
            current.mode = validated.retrieval_mode
        return validated

    async def _generate(self, validated: GenerationParams, request_id: str):
        """Run the loop under admission, observing first-token and inter-token latency."""
        self._check_ready()
        mode = validated.retrieval_mode
        with self.admission.admit() as ticket:
            async with self._datastore_for(mode) as retrieval:
                batcher = retrieval.batcher if retrieval is not None else None
                last_token_at = None
                async for delta in self.generator.generate(validated, request_id, batcher):
                    if delta.token_ids:
                        now = time.perf_counter()
                        if last_token_at is None:
                            ticket.mark_started()
                        elif self.metrics is not None:
                            self.metrics.observe_token_gap(now - last_token_at, len(delta.token_ids), mode)
                        last_token_at = now
                    if self.metrics is not None:
                        for event in delta.retrievals:
                            self.metrics.observe_retrieval(event.seconds)
                        if delta.result is not None and delta.result.ttft_s is not None:
                            self.metrics.observe_first_token(delta.result.ttft_s, mode)
                    if delta.result is not None and self.engine.errored:
                        raise EngineDead("the inference engine stopped during this request")
                    yield delta

    def _datastore_for(self, mode: str):
        """A lease on the datastore serving now (the request keeps it across a hot swap), or
        nothing for modes that read none."""
        if mode in CHUNK_MODES and self.datastores is not None:
            return self.datastores.lease()
        return contextlib.nullcontext()

    def _request_id(self) -> str:
        return request_context.current_request_id() or request_context.new_request_id()

    # -- RPCs ------------------------------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        validated = self._validate_generation(request)
        request_id = self._request_id()
        result = None
        async for delta in self._generate(validated, request_id):
            result = delta.result or result
        response = pb.GenerateResponse(text=result.text, **_summary_fields(result, request_id))
        if validated.return_provenance:
            response.retrievals.extend(retrieval_to_pb(event) for event in result.retrievals)
        if validated.return_token_ids:
            response.token_ids.extend(result.token_ids)
        if validated.return_logprobs:
            response.logprobs.extend(result.logprobs)
        return response

    async def GenerateStream(self, request: pb.GenerateRequest, context):
        validated = self._validate_generation(request)
        request_id = self._request_id()
        async for delta in self._generate(validated, request_id):
            message = self._stream_message(delta, validated)
            if delta.result is not None:
                message.MergeFrom(pb.GenerateStreamResponse(**_summary_fields(delta.result, request_id)))
                yield message
            elif message.ByteSize():
                yield message

    @staticmethod
    def _stream_message(delta: GenerationDelta, validated: GenerationParams) -> pb.GenerateStreamResponse:
        message = pb.GenerateStreamResponse(text=delta.text)
        if validated.return_token_ids:
            message.token_ids.extend(delta.token_ids)
        if validated.return_logprobs:
            message.logprobs.extend(delta.logprobs)
        if validated.return_provenance:
            # Sent as they happen, so their spans are still open (the proto's convention).
            message.retrievals.extend(retrieval_to_pb(event, open_span=True) for event in delta.retrievals)
        return message

    async def Retrieve(self, request: pb.RetrieveRequest, context) -> pb.RetrieveResponse:
        query = RetrieveQuery.from_pb(request, self.validation)
        current = request_context.current_request()
        if current is not None:
            current.mode = "chunk"
        self._check_ready()
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        async with self.datastores.lease() as retrieval:
            results = await loop.run_in_executor(None, retrieval.search, [query.query], query.neighbours)
        total = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.observe_retrieval(total)
        missing = ()
        if getattr(results[0], "missing_shards", ()):
            from retriever.fanout import enforce_shard_policy

            missing = enforce_shard_policy(results[0], query.shard_policy)
        timing = results.timing
        return pb.RetrieveResponse(
            missing_shards=[pb_convert.missing_shard_to_pb(m) for m in missing],
            neighbours=[neighbour_pb.to_pb(n) for n in results[0][: query.neighbours]],
            timing=pb.RetrieveTiming(
                embed_ms=timing.embed * 1000.0,
                search_ms=timing.search * 1000.0,
                payload_ms=timing.payload * 1000.0,
                total_ms=total * 1000.0,
            ),
        )

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        query = TokenizeQuery.from_pb(request, self.validation)
        token_ids = self.generator.tokenize(query.text)
        response = pb.TokenizeResponse(token_ids=token_ids, token_count=len(token_ids))
        if query.return_tokens:
            response.tokens.extend(self.engine.tokenizer.convert_ids_to_tokens(token_ids))
        return response

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        return pb.InfoResponse(
            model=self.model_info,
            datastore=pb_convert.datastore_info_to_pb(self.datastores.version if self.datastores else None),
            limits=pb_convert.limits_to_pb(self.config.limits),
            retrieval_defaults=pb_convert.retrieval_defaults_to_pb(
                self.config.retrieval, self.validation.available_modes,
                self.datastores.version.retrieval.datastore.method if self.datastores else None,
            ),
            version=self.version,
            token_datastore=(pb_convert.datastore_summary_to_pb(self.engine.token_datastore)
                             if getattr(self.engine, "token_datastore", None) is not None
                             else pb.DatastoreInfo(loaded=False)),
        )

