"""GenerationParams: one generation request's parameters, from the API to the engine.

Like vLLM's SamplingParams, one frozen type carries a request through the server: the API's
validation (server/api/validation.py, where every bound is checked) builds it with each unset
field resolved to the server's defaults, the generation loop reads it, and the engine's kNN-LM
settings derive from it. Nothing downstream re-checks or renames a field.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.config import DEFAULT_KEEP_RANK_MARGIN, DEFAULT_LAYOUT, DEFAULT_NEIGHBOUR_TOKENS, KNN_MODES
from server.knn.settings import DEFAULT_KNN_K, DEFAULT_KNN_LAMBDA, DEFAULT_KNN_TEMPERATURE, KnnRequestSettings


@dataclass(frozen=True)
class GenerationParams:
    """A generation request with every default resolved."""

    prompt: str
    max_new_tokens: int
    prompt_ids: tuple[int, ...] | None = None
    """The prompt's token ids, tokenized once by validation for the length check (None: the loop
    tokenizes the prompt)."""
    # -- sampling
    temperature: float = 0.0
    """0 means greedy; then top_p=1, top_k=0 and seed=None whatever the request said."""
    top_p: float = 1.0
    top_k: int = 0
    """0: off."""
    seed: int | None = None
    """None: the loop picks one when sampling (and reports it)."""
    # -- stopping
    stop_sequences: tuple[str, ...] = ()
    include_stop_sequence: bool = False
    time_limit_s: float | None = None
    """Wall-clock budget; requests that set none get Limits.max_time_limit_s (None: no limit)."""
    # -- retrieval
    retrieval_mode: str = "none"
    """One of config.RETRIEVAL_MODES."""
    neighbours: int = 2
    stride: int = 16
    query_tokens: int = 32
    layout: str = DEFAULT_LAYOUT
    keep_same_neighbours: bool = True
    """Server-wide (RetrievalDefaults.keep_same_neighbours), not a request field: continue the
    previous context when a retrieval returns the chunks already in it."""
    neighbour_tokens: int = DEFAULT_NEIGHBOUR_TOKENS
    """Server-wide (RetrievalDefaults.neighbour_tokens), not a request field: 0 whole neighbours,
    N > 0 the last N tokens of each, N < 0 the first -N (context.neighbour_block)."""
    keep_rank_margin: int = DEFAULT_KEEP_RANK_MARGIN
    """Also continue it while those chunks are among the new k + this many nearest."""
    shard_policy: str = "partial"
    """"partial" | "require_all": what a retrieval does when a datastore shard is missing."""
    knn_lambda: float = DEFAULT_KNN_LAMBDA
    """Token mode: λ of λ·p_kNN + (1-λ)·p_LM."""
    knn_k: int = DEFAULT_KNN_K
    knn_temperature: float = DEFAULT_KNN_TEMPERATURE
    knn_skip_above_prob: float = 1.0
    """Token mode: skip the search on steps whose LM max probability is above this (1: never)."""
    knn_pointer_min: int = 0
    """Token mode: follow pointers when at least this many remain (0: off)."""
    # -- response
    return_provenance: bool = False
    return_token_ids: bool = False
    return_logprobs: bool = False

    @property
    def prompt_token_count(self) -> int | None:
        return None if self.prompt_ids is None else len(self.prompt_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def knn_settings(self) -> KnnRequestSettings | None:
        """The engine's kNN-LM settings in token and hybrid mode (None in other modes)."""
        if self.retrieval_mode not in KNN_MODES:
            return None
        return KnnRequestSettings.from_knn_fields(self)
