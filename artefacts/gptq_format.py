"""4-bit GPTQ tensors in the classic AutoGPTQ layout that vLLM's WNA16 kernels load.

Layout (per nn.Linear with weight W[out, in], group size g, symmetric, desc_act=false):
- qweight int32 [in/8, out]: eight 4-bit codes of consecutive input rows per int32, low bits first;
- qzeros  int32 [in/g, out/8]: the zero point (8) stored minus one (the "v1" GPTQ convention),
  eight output columns per int32;
- scales  bf16  [in/g, out] (SCALE_DTYPE);
- g_idx   int32 [in]: group of each input row (i // g).
W[o, i] = scales[i // g, o] * (code[i, o] - 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = 4
PACK = 32 // BITS  # codes per int32
MAX_CODE = (1 << BITS) - 1
SYM_ZERO = 1 << (BITS - 1)  # 8: symmetric zero point
SCALE_DTYPE = torch.bfloat16
"""vLLM loads scales into parameters of the model's dtype, which is bf16 on the CPU's 4-bit kernel
and on GPUs: fp16 scales were rounded there (a warning per layer, and a served model that is not
the prepared one). bf16 values widen exactly to fp32 (the dense copy, the fidelity reference) and
to fp16 for scales of this size, so every path serves the same weights."""


@dataclass
class PackedLinear:
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor


def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """Pack int codes [rows, cols] (rows % 8 == 0) into int32 [rows/8, cols] along rows."""
    rows, cols = codes.shape
    grouped = codes.to(torch.int64).reshape(rows // PACK, PACK, cols)
    shifts = (torch.arange(PACK, dtype=torch.int64) * BITS).view(1, PACK, 1)
    packed = (grouped << shifts).sum(dim=1)
    return _to_int32(packed)


def _pack_cols(codes: torch.Tensor) -> torch.Tensor:
    """Pack int codes [rows, cols] (cols % 8 == 0) into int32 [rows, cols/8] along columns."""
    return _pack_rows(codes.t().contiguous()).t().contiguous()


def _to_int32(values: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    values = values & 0xFFFFFFFF
    values = torch.where(values >= 1 << 31, values - (1 << 32), values)
    return values.to(torch.int32)


def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    shifts = (torch.arange(PACK, dtype=torch.int64) * BITS).view(1, PACK, 1)
    expanded = (packed.to(torch.int64).unsqueeze(1) >> shifts) & MAX_CODE
    return expanded.reshape(packed.shape[0] * PACK, packed.shape[1])


def pack(codes_in_out: torch.Tensor, scales: torch.Tensor, group_size: int,
         scale_dtype: torch.dtype = SCALE_DTYPE) -> PackedLinear:
    """Pack codes [in, out] (0..15) and per-group scales [in/g, out] into GPTQ tensors."""
    in_features, out_features = codes_in_out.shape
    if in_features % group_size or in_features % PACK or out_features % PACK:
        raise ValueError(
            f"{in_features=} and {out_features=} must be multiples of {PACK}, "
            f"and in_features of {group_size=}"
        )
    zeros = torch.full((in_features // group_size, out_features), SYM_ZERO - 1, dtype=torch.int64)
    return PackedLinear(
        qweight=_pack_rows(codes_in_out),
        qzeros=_pack_cols(zeros),
        scales=scales.to(scale_dtype).contiguous(),
        g_idx=(torch.arange(in_features, dtype=torch.int32) // group_size),
    )


def dequantize(packed: PackedLinear) -> torch.Tensor:
    """Reference dequantization back to W[out, in] in fp32 (used by tests and error reports)."""
    codes = _unpack_rows(packed.qweight).to(torch.float32)  # [in, out]
    zeros = _unpack_rows(packed.qzeros.t().contiguous()).t().to(torch.float32) + 1  # [in/g, out]
    group = packed.g_idx.to(torch.int64)
    weight = (codes - zeros[group]) * packed.scales.to(torch.float32)[group]
    return weight.t().contiguous()
