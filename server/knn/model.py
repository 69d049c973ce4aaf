"""kNN-LM inside vLLM: a Llama model class whose logits are mixed with a token datastore's.

`KnnLlamaForCausalLM` is vLLM's `LlamaForCausalLM` (same weights, same forward) with one change:
`compute_logits(hidden_states)` searches the token datastore (retriever/token_datastore.py) once
for all rows of the batch that belong to token-mode requests and returns, for those rows,
log(λ·p_kNN + (1-λ)·p_LM) with p_kNN = softmax(-d/T) scattered onto the vocabulary
(kernels/knn_interpolation.py: Triton on CUDA, the sparse torch path elsewhere). Rows of other
requests are returned with exactly the values `LlamaForCausalLM` computes. vLLM samples and
computes log-probs (prompt log-probs too) from what `compute_logits` returns, so generation,
`logprobs` and `prompt_logprobs` (hence `retroserve eval`) all see the mixture.

Which rows belong to token-mode requests. vLLM calls `compute_logits` with hidden states only, so
the model must learn the batch layout (which request each row is, and its λ, k, T) through
supported extension points; vLLM 0.32 has two model runners and each offers one:
- V1 runner (the only one on the CPU: V2 needs a Triton GPU driver): a custom logits processor,
  `KnnBatchTracker` (engine arg `logits_processors`), receives every batch change with the
  requests' `SamplingParams` (whose `extra_args["retroserve_knn"]` carries λ, k, T) before each
  forward pass, so it knows the settings per persistent-batch index. `forward` runs inside vLLM's
  forward context, whose attention metadata holds the step's `query_start_loc` (token offsets per
  batch index). The tracker and the model meet through `_TRACKERS`, keyed by the VllmConfig both
  are built from (one per engine process).
- V2 runner (the default on CUDA): a model may provide its own `ModelState` via
  `get_model_state_cls()`; `KnnModelState.add_request` sees each request's SamplingParams and
  `prepare_inputs` the step's InputBatch (request order, token offsets, logits rows). Not
  exercised on this CPU-only machine.
Either way `compute_logits` maps its rows to requests the same way:
- the sampling call receives `hidden_states[logits_indices]`, a gathered copy: its rows follow
  `cu_num_logits` (one row per request without speculative decoding);
- prompt log-probs call it with slices of the tensor `forward` returned (views): the row offset
  is the view's storage offset, and token t belongs to the request whose `query_start_loc` range
  holds it.
A logits processor alone cannot do the mixing: vLLM computes log-probs from the raw logits, before
processors, and never runs processors for prompt log-probs, so neither `logprobs` nor `eval`
would see the mixture. If neither hook reports a layout while token-mode requests exist,
compute_logits raises rather than silently serving the plain LM.

Speed techniques (server/knn/speed.py), per request in KnnRequestSettings:
- adaptive retrieval (`skip_above_prob`): rows whose LM max probability is above it keep the raw
  logits and are not searched;
- the learned gate (engine-wide `gate_threshold` > 0; retriever/knn_gate.py, trained with
  `retroserve datastore gate`): rows whose predicted λ(x) is below the threshold keep the raw logits
  and are not searched, the others mix at λ(x) instead of the request's λ (a request's λ 0 still
  means the model alone);
- pointer following (`pointer_min`, RetoMaton): each request's `_Slot` (which moves with it in the
  persistent batch) keeps the previous position's neighbour ids; a row's observed token is the
  forward's input id at that row's token (the sampled token for decode rows, the next prompt token
  for prompt-log-prob rows), and the previous neighbours that predicted it, advanced along
  next.npy, are the row's neighbours when at least `pointer_min` remain (distances recomputed
  exactly from the stored keys). Prompt rows of a request form one chain processed in order;
  a gap (a skipped row) starts a new chain;
- merge counts (a greedy-merged datastore's counts.npy) add log(count) to each neighbour's score.
`KnnStats` counts rows searched, followed and skipped; when the engine settings name a
`stats_file` it is rewritten (JSON, atomically) after every kNN step, which the server process
reads (server/core/engine.py `Engine.knn_stats`).

Registration: server/knn/plugin.py registers the class from a `vllm.general_plugins` entry point
(pyproject.toml); the server selects it with `hf_overrides={"architectures": [KNN_ARCHITECTURE],
HF_CONFIG_KEY: json}` (server/core/engine.py), which also carries the datastore path into the engine
process. No vLLM file or forward is patched.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from server.knn import speed as knn_speed
from server.knn.settings import (DEFAULT_KNN_POINTER_POOL, DEFAULT_KNN_POINTER_RADIUS, HF_CONFIG_KEY, KNN_ARCHITECTURE,
                                 KnnRequestSettings)

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    settings: KnnRequestSettings
    prompt_logprobs: bool
    pointer: knn_speed.PointerState | None = None
    """Pointer following: the neighbours of this request's latest searched-or-followed position."""


@dataclass
class _StepLayout:
    """What compute_logits needs from this step's InputBatch (host copies, no device sync)."""

    slots: list[_Slot | None]
    """Per request in batch order: its kNN settings, None for requests not in token mode."""
    query_start_loc: np.ndarray
    """[num_reqs + 1] token offsets of each request in the flat batch."""
    cu_num_logits: np.ndarray
    """[num_reqs + 1] sampling-row offsets of each request."""
    num_tokens: int
    positions: torch.Tensor | None = None
    """[num_tokens] position of every token in its sequence (the forward's `positions`)."""


class KnnModelState(DefaultModelState):
    """The default model state plus bookkeeping of token-mode requests for KnnLlamaForCausalLM."""

    def add_request(self, req_index, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        params = new_req_data.sampling_params
        settings = KnnRequestSettings.from_sampling_params(params) if params is not None else None
        # Slots are recycled: always overwrite, so a previous occupant's settings never leak.
        self.model.knn_slots[req_index] = (
            None if settings is None else _Slot(settings, params.prompt_logprobs is not None)
        )

    def prepare_inputs(self, input_batch, req_states):
        inputs = super().prepare_inputs(input_batch, req_states)
        slots = [self.model.knn_slots.get(int(i)) for i in input_batch.idx_mapping_np[: input_batch.num_reqs]]
        if any(slot is not None for slot in slots):
            num_reqs = input_batch.num_reqs
            self.model.knn_step = _StepLayout(
                slots=slots,
                query_start_loc=np.array(input_batch.query_start_loc_np[: num_reqs + 1], copy=True),
                cu_num_logits=np.array(input_batch.cu_num_logits_np[: num_reqs + 1], copy=True),
                num_tokens=int(input_batch.num_tokens),
            )
        else:
            self.model.knn_step = None  # fast path: compute_logits is LlamaForCausalLM's
        return inputs

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int):
        self.model.knn_step = None
        return super().prepare_dummy_inputs(num_reqs, num_tokens)


_TRACKERS: dict[int, "KnnBatchTracker"] = {}
"""id(VllmConfig) -> the tracker built from it: the rendezvous of tracker and model inside one
engine process (vLLM builds the logits processors before the model, from the same VllmConfig)."""


class KnnBatchTracker(LogitsProcessor):
    """V1-runner logits processor that changes no logits: it records, per persistent-batch index,
    the kNN-LM settings of token-mode requests for KnnLlamaForCausalLM (see the module docstring)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        KnnRequestSettings.from_sampling_params(sampling_params)  # raises ValueError when malformed

    def __init__(self, vllm_config, device, is_pin_memory: bool):
        self.slots: dict[int, _Slot] = {}
        self.num_reqs = 0
        _TRACKERS[id(vllm_config)] = self

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        self.num_reqs = batch_update.batch_size

        def settings(params, prompt_ids, output_ids):
            found = KnnRequestSettings.from_sampling_params(params)
            return None if found is None else _Slot(found, params.prompt_logprobs is not None)

        process_dict_updates(self.slots, batch_update, settings)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True


@dataclass
class KnnStats:
    """Counters of the engine process, logged every `LOG_EVERY_S` seconds."""

    steps: int = 0
    rows: int = 0
    """Token-mode rows seen (each one position of one request)."""
    searches: int = 0
    """FAISS search calls (each over a batch of rows)."""
    searched_rows: int = 0
    """Rows whose neighbours came from a search."""
    pointer_rows: int = 0
    """Rows whose neighbours came from pointers (a search avoided)."""
    skipped_rows: int = 0
    """Rows adaptive retrieval left to the LM (no neighbours)."""
    search_s: float = 0.0
    mix_s: float = 0.0

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["skipped_fraction"] = self.skipped_rows / self.rows if self.rows else 0.0
        used = self.searched_rows + self.pointer_rows
        out["pointer_fraction"] = self.pointer_rows / used if used else 0.0
        return out


LOG_EVERY_S = 30.0


class KnnLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose compute_logits mixes in a token datastore for token-mode rows."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        raw = getattr(vllm_config.model_config.hf_config, HF_CONFIG_KEY, None)
        if not raw:
            raise ValueError(
                f"{KNN_ARCHITECTURE} needs hf_overrides {{'{HF_CONFIG_KEY}': json}} naming the token datastore; "
                "start the engine through server/core/engine.py with a token datastore configured"
            )
        settings = json.loads(raw) if isinstance(raw, str) else dict(raw)
        from retriever.token_datastore import TokenDatastore

        self.datastore = TokenDatastore.open(
            Path(settings["datastore"]),
            expected_model_fingerprint=settings.get("model_fingerprint"),
        )
        hidden = vllm_config.model_config.hf_config.hidden_size
        if self.datastore.manifest["dims"]["embedding"] != hidden:
            raise ValueError(f"token datastore keys are {self.datastore.manifest['dims']['embedding']}-d, "
                             f"the model's hidden states {hidden}-d")
        self._vllm_config_id = id(vllm_config)
        self.knn_slots: dict[int, _Slot | None] = {}
        self.knn_step: _StepLayout | None = None
        self.knn_state_attached = False
        self.knn_stats = KnnStats()
        self._forward_output: torch.Tensor | None = None
        self._last_log = time.monotonic()
        self._captures = 0
        self._stats_file = settings.get("stats_file")
        self._input_ids: torch.Tensor | None = None
        self._forward_calls = 0
        self._key_distances: knn_speed.KeyDistances | None = None
        self._pointer_pool = int(settings.get("pointer_pool", DEFAULT_KNN_POINTER_POOL))
        self._pointer_radius = float(settings.get("pointer_radius", DEFAULT_KNN_POINTER_RADIUS))
        self._gate_threshold = float(settings.get("gate_threshold", 0.0))
        self._gate = None
        if self._gate_threshold > 0:
            from retriever.knn_gate import KnnGate, token_counts

            self._gate = KnnGate.load(settings["datastore"])
            self._token_counts = token_counts(self.datastore.values, int(vllm_config.model_config.get_vocab_size()))

    def get_model_state_cls(self):
        self.knn_state_attached = True
        return KnnModelState

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if not self.knn_state_attached:
            self.knn_step = self._v1_layout()  # V1 runner; under V2, KnnModelState set it already
        self._forward_calls += 1
        self._input_ids = input_ids  # pointer following: the token observed at each row
        output = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        # Kept (a reference, no copy) so compute_logits can recognise prompt-log-prob slices of it.
        self._forward_output = output if isinstance(output, torch.Tensor) else None
        if self.knn_step is not None:
            self.knn_step.positions = positions
        return output

    def _v1_layout(self) -> _StepLayout | None:
        """This step's layout from the tracker (settings per batch index) and the forward context
        (token offsets per batch index); None when no token-mode request is in the batch."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        tracker = _TRACKERS.get(self._vllm_config_id)
        if tracker is None or not tracker.slots:
            return None
        metadata = get_forward_context().attn_metadata if is_forward_context_available() else None
        if isinstance(metadata, list):
            metadata = metadata[0] if metadata else None
        if not metadata:
            return None  # profiling and dummy runs
        num_reqs = tracker.num_reqs
        query_start_loc = next(iter(metadata.values())).query_start_loc[: num_reqs + 1].cpu().numpy().copy()
        return _StepLayout(
            slots=[tracker.slots.get(i) for i in range(num_reqs)],
            query_start_loc=query_start_loc,
            cu_num_logits=np.arange(num_reqs + 1),
            num_tokens=int(query_start_loc[-1]),
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = super().compute_logits(hidden_states)
        step = self.knn_step
        if logits is None or step is None:
            return logits
        requests = self._requests_of_rows(hidden_states, step)
        if requests is None:
            return logits
        request_of_row, tokens, prompt_rows = requests
        active = []
        for row, request in enumerate(request_of_row):
            slot = step.slots[request] if request >= 0 else None
            if slot is not None and (not prompt_rows or slot.prompt_logprobs):
                active.append(row)
        if prompt_rows and active and step.positions is not None:
            # Prompt rows before a request's mix_from_position keep the model's own distribution.
            start = np.array([step.slots[request_of_row[row]].settings.mix_from_position for row in active])
            if start.any():
                positions = step.positions.cpu().numpy()[tokens[np.asarray(active)]]
                active = [row for row, position, first in zip(active, positions, start) if position >= first]
        if not active:
            return logits
        return self._mix(logits, hidden_states, np.asarray(active), request_of_row, tokens, step)

    # -- internals ----------------------------------------------------------------------------

    def _requests_of_rows(self, hidden_states: torch.Tensor, step: _StepLayout):
        """(request index per row (-1: none), flat token index per row, rows are prompt positions?)."""
        rows = hidden_states.shape[0]
        base = self._forward_output
        if (base is not None and hidden_states.dim() == 2 and base.dim() == 2
                and hidden_states.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()):
            row_bytes = base.stride(0) * base.element_size()
            offset = (hidden_states.data_ptr() - base.data_ptr()) // row_bytes
            tokens = np.arange(offset, offset + rows)
            request = np.searchsorted(step.query_start_loc[1:], tokens, side="right")
            request = np.where(tokens < step.num_tokens, request, -1)
            return request, tokens, True
        if rows == int(step.cu_num_logits[-1]):
            sample_rows = np.arange(rows)
            request = np.searchsorted(step.cu_num_logits[1:], sample_rows, side="right")
            return request, step.query_start_loc[request + 1] - 1, False
        raise RuntimeError(
            f"compute_logits got {rows} rows that are neither the step's {int(step.cu_num_logits[-1])} "
            "sampling rows nor a slice of the forward output; this vLLM calls compute_logits in a way "
            "server/knn/model.py does not know, so token-mode rows cannot be identified"
        )

    def _mix(self, logits, hidden_states, active, request_of_row, tokens, step):
        from kernels.knn_interpolation import knn_interpolate

        started = time.perf_counter()
        stats = self.knn_stats
        stats.steps += 1
        stats.rows += len(active)
        device = logits.device
        slots = [step.slots[request_of_row[row]] for row in active]
        skip, gate_lam = self._rows_to_skip(logits, active, slots, tokens, step)
        if skip.any():
            stats.skipped_rows += int(skip.sum())
            gate_lam = None if gate_lam is None else gate_lam[~skip]
            active = active[~skip]
            slots = [slot for slot, skipped in zip(slots, skip) if not skipped]
            if not len(active):
                self._publish_stats()
                return logits
        queries = hidden_states[torch.as_tensor(active, device=hidden_states.device)].float().cpu().numpy()
        row_tokens = tokens[active]
        positions = step.positions.cpu().numpy()[row_tokens] if step.positions is not None else row_tokens
        k = np.array([slot.settings.k for slot in slots])
        pointer_min = np.array([slot.settings.pointer_min for slot in slots])
        requests = request_of_row[active]
        chain = np.zeros(len(active), dtype=np.int64)
        start_ids, start_radius = {}, {}
        if pointer_min.any():
            observed = self._input_ids.cpu().numpy()[row_tokens]
            # A chain: consecutive positions of one request (prompt rows in order; one decode row).
            new_chain = np.ones(len(active), dtype=bool)
            new_chain[1:] = (requests[1:] != requests[:-1]) | (positions[1:] != positions[:-1] + 1)
            chain = np.cumsum(new_chain) - 1
            for i in np.nonzero(new_chain)[0]:
                state = slots[i].pointer
                if state is not None and state.position == positions[i] - 1:
                    start_ids[int(chain[i])] = state.ids
                    start_radius[int(chain[i])] = state.radius
            if self._key_distances is None:
                self._key_distances = knn_speed.KeyDistances(self.datastore.index)
        else:
            observed = np.zeros(len(active), dtype=np.int64)
        found = knn_speed.find_neighbours(self.datastore, queries, k, pointer_min, chain, observed, start_ids,
                                          self._key_distances,
                                          pointer_pool=self._pointer_pool,
                                          pointer_radius=self._pointer_radius, start_radius=start_radius)
        if pointer_min.any():
            self._remember_pointers(slots, positions, found)
        searched = time.perf_counter()
        values = self.datastore.lookup_values(found.ids)
        distances = found.distances / np.array([slot.settings.temperature for slot in slots],
                                               dtype=np.float32)[:, None]  # per-row T; the kernel uses T = 1
        log_counts = knn_speed.log_counts(self.datastore.counts, found.ids)
        lam = torch.tensor([slot.settings.lam for slot in slots], dtype=torch.float32)
        if gate_lam is not None:
            lam = torch.where(lam > 0, torch.from_numpy(gate_lam.astype(np.float32)), lam)
        active_t = torch.as_tensor(active, device=device)
        # Every row mixes (all requests in token mode, λ > 0): no gather in, no scatter out.
        every_row = len(active) == logits.shape[0] and bool((lam > 0).all())
        mixed = knn_interpolate(
            logits if every_row else logits[active_t],
            torch.from_numpy(distances).to(device),
            torch.from_numpy(values).to(device),
            temperature=1.0,
            lam=lam.to(device),
            log_counts=None if log_counts is None else torch.from_numpy(log_counts).to(device),
            metric="l2",
            validate=False,
        )
        if every_row:
            out = mixed
        else:
            out = logits.float()
            if out.data_ptr() == logits.data_ptr():
                out = out.clone()
            # Rows with λ = 0 come back as log_softmax: keep their raw logits, bit for bit.
            use = (lam > 0).to(device)
            out[active_t[use]] = mixed[use]
        if any(slot.settings.capture_dir for slot in slots):
            self._capture(slots, queries, positions, found)
        stats.searches += found.searches
        stats.searched_rows += int(found.searched.sum())
        stats.pointer_rows += int((~found.searched).sum())
        stats.search_s += searched - started
        stats.mix_s += time.perf_counter() - searched
        self._publish_stats()
        return out

    def _rows_to_skip(self, logits, active, slots, tokens, step) -> tuple[np.ndarray, np.ndarray | None]:
        """(bool [len(active)]: rows that keep their raw logits and are not searched, the learned
        gate's λ(x) per row or None): adaptive retrieval skips confident rows, the gate rows whose
        λ(x) is under the engine's threshold."""
        thresholds = np.array([slot.settings.skip_above_prob for slot in slots], dtype=np.float32)
        skip = np.zeros(len(active), dtype=bool)
        if (thresholds < 1.0).any():
            skip |= knn_speed.confident_rows(logits[torch.as_tensor(active, device=logits.device)],
                                             torch.from_numpy(thresholds)).cpu().numpy()
        gate_lam = None
        if self._gate is not None:
            gate_lam = self._gate_lambdas(logits, active, tokens, step)
            skip |= gate_lam < self._gate_threshold
        return skip, gate_lam

    def _gate_lambdas(self, logits, active, tokens, step) -> np.ndarray:
        """float32 [len(active)]: the learned gate's λ(x) of each row."""
        from retriever.knn_gate import features

        rows = torch.as_tensor(active, device=logits.device)
        log_probs = torch.log_softmax(logits[rows], dim=-1, dtype=torch.float32)
        row_tokens = tokens[active]
        positions = step.positions.cpu().numpy()[row_tokens] if step.positions is not None else row_tokens
        observed = self._input_ids.cpu().numpy()[row_tokens]
        return self._gate.lam(features(log_probs, positions, observed, self._token_counts)).cpu().numpy()

    def _remember_pointers(self, slots, positions, found) -> None:
        """Keep each request's neighbours of its highest position this step for the next step (the
        V1 runner scores a request's sampling row before its prompt rows, in separate calls)."""
        for i, slot in enumerate(slots):
            if slot.settings.pointer_min <= 0:
                continue
            state = slot.pointer
            position = int(positions[i])
            if state is None or state.step != self._forward_calls or position >= state.position:
                slot.pointer = knn_speed.PointerState(position, found.pointer_sets[i].copy(), self._forward_calls,
                                                      found.radii[i])

    def _publish_stats(self) -> None:
        stats = self.knn_stats
        if self._stats_file:
            tmp = f"{self._stats_file}.tmp"
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(stats.as_dict(), handle)
            os.replace(tmp, self._stats_file)
        if time.monotonic() - self._last_log > LOG_EVERY_S and stats.steps:
            self._last_log = time.monotonic()
            log.info("kNN-LM: %d rows (%d searched, %d by pointers, %d skipped), %d searches, search %.1f ms/step, "
                     "mix %.1f ms/step", stats.rows, stats.searched_rows, stats.pointer_rows, stats.skipped_rows,
                     stats.searches, 1e3 * stats.search_s / stats.steps, 1e3 * stats.mix_s / stats.steps)

    def _capture(self, slots, queries, positions, found) -> None:
        for directory in {slot.settings.capture_dir for slot in slots if slot.settings.capture_dir}:
            rows = [i for i, slot in enumerate(slots) if slot.settings.capture_dir == directory]
            os.makedirs(directory, exist_ok=True)
            np.savez(os.path.join(directory, f"step-{os.getpid()}-{self._captures:06d}.npz"),
                     queries=queries[rows], positions=positions[rows], ids=found.ids[rows],
                     distances=found.distances[rows])
            self._captures += 1
