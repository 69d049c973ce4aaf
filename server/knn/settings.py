"""Names and per-request settings shared by the server process and the kNN-LM model class.

Kept free of torch and vLLM imports: validation and the generation loop use it in the gRPC process,
server/knn/model.py inside vLLM's engine process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

KNN_ARCHITECTURE = "RetroserveKnnLlamaForCausalLM"
"""Architecture name the plugin registers and the engine selects with hf_overrides."""
KNN_BATCH_TRACKER = "server.knn.model:KnnBatchTracker"
"""V1-runner logits processor that reports token-mode rows to the model class (engine arg)."""
HF_CONFIG_KEY = "retroserve_knn"
"""hf_config attribute (a JSON string) with the engine-wide settings: datastore path, fingerprint."""
EXTRA_ARGS_KEY = "retroserve_knn"
DEFAULT_KNN_LAMBDA = 0.25
DEFAULT_KNN_K = 64
"""Server defaults λ and k, tuned on 12 held-out Python docs (2000 characters each) against a
158,841-entry token datastore (`retroserve eval run --heldout DEV... --knn-lambda 0.2 0.3 --knn-k 16 64`
and `--knn-lambda 0.25 --knn-k 64`, T 30): k 16 -> 64 gives 0.8832 -> 0.8782 bits per byte at λ 0.2
and 0.8849 -> 0.8778 at λ 0.3; λ 0.2 / 0.25 / 0.3 at k 64: 0.8782 / 0.8768 / 0.8778 (model alone
0.9969)."""
DEFAULT_KNN_POINTER_POOL = 256
"""Engine default: how many of a search's nearest entries seed a request's pointer set (RetoMaton)."""
DEFAULT_KNN_POINTER_RADIUS = 0.0
"""Engine default of the pointer distance gate (server/knn/speed.py find_neighbours); 0: off."""
DEFAULT_KNN_TEMPERATURE = 30.0
"""Server default T, tuned on held-out Python docs (`retroserve eval run --token-datastore ...
--knn-temperature 1 10 30 100`, λ 0.25, k 16: 0.993 / 0.960 / 0.935 / 0.936 bits per byte, model
alone 1.166); T multiplies the squared-L2 scale of 576-d hidden states, so T=1 is far too sharp."""
"""SamplingParams.extra_args key of a token-mode request's settings (KnnRequestSettings)."""


@dataclass(frozen=True)
class KnnRequestSettings:
    """Per-request kNN-LM knobs, resolved by the server (validation) before they reach vLLM."""

    lam: float
    """Interpolation weight λ of p_kNN, in [0, 1]; 0 returns the model's own distribution."""
    k: int
    """Neighbours retrieved per step."""
    temperature: float
    """Softmax temperature over negative squared L2 distances."""
    capture_dir: str | None = None
    """Test/diagnostic hook (not reachable from the API): write every searched query, its
    position and neighbours to this directory as .npz files."""
    skip_above_prob: float = 1.0
    """Adaptive retrieval: a step whose LM max next-token probability is above this keeps the
    plain LM distribution and is not searched; >= 1 never skips."""
    pointer_min: int = 0
    """Pointer following (RetoMaton): reuse the previous step's neighbours that predicted the
    observed token, advanced to their corpus successors, when at least this many remain (no
    search); 0 always searches."""
    mix_from_position: int = 0
    """Prompt rows at positions before this keep the model's own distribution and are not
    searched: evaluation scores only the span at the end of a context, and a hybrid context's
    neighbours and earlier text would otherwise cost a search per token (not reachable from the
    API; generation samples only after its prompt, so it leaves this 0)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0 or self.k < 1 or not self.temperature > 0:
            raise ValueError(f"invalid kNN-LM settings {self}: need lam in [0, 1], k >= 1, temperature > 0")
        if not self.skip_above_prob > 0 or self.pointer_min < 0:
            raise ValueError(f"invalid kNN-LM settings {self}: need skip_above_prob > 0, pointer_min >= 0")

    @classmethod
    def from_knn_fields(cls, settings) -> "KnnRequestSettings":
        """From an object carrying the API's names for these knobs (knn_lambda, knn_k,
        knn_temperature, knn_skip_above_prob, knn_pointer_min): server.core.params.GenerationParams,
        server.evaluation.scoring.EvalSettings."""
        return cls(lam=settings.knn_lambda, k=settings.knn_k, temperature=settings.knn_temperature,
                   skip_above_prob=settings.knn_skip_above_prob, pointer_min=settings.knn_pointer_min)

    def to_extra_args(self) -> dict:
        return {EXTRA_ARGS_KEY: asdict(self)}

    @classmethod
    def from_sampling_params(cls, params) -> "KnnRequestSettings | None":
        extra = getattr(params, "extra_args", None) or {}
        value = extra.get(EXTRA_ARGS_KEY)
        return None if value is None else cls(**value)


def knn_fractions(after: dict, before: dict) -> tuple[float, float]:
    """(skipped fraction of token-mode rows, pointer fraction of the rows not skipped) between two
    snapshots of the engine's kNN counters (server/core/engine.py `Engine.knn_stats`)."""
    get = lambda key: after.get(key, 0) - before.get(key, 0)  # noqa: E731
    rows, used = get("rows"), get("searched_rows") + get("pointer_rows")
    return (get("skipped_rows") / rows if rows else 0.0), (get("pointer_rows") / used if used else 0.0)
