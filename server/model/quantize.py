"""Weight-only 4-bit quantization of a dense causal LM into GPTQ tensors.

Two methods share one per-group scale search:
- `rtn`: round to nearest with an MSE-optimal clipping ratio per group;
- `gptq`: Frantar et al. 2022: columns are quantized in order and each one's rounding error is
  spread over the not-yet-quantized columns through the inverse Hessian of the layer's inputs
  (H = X^T X from calibration text), which keeps the layer's *outputs* close rather than its weights.
Both produce symmetric codes with group size g along the input dimension (desc_act=false).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn
from tqdm import tqdm

from artefacts import gptq_format

log = logging.getLogger(__name__)

CLIP_GRID = torch.linspace(1.0, 0.6, 21)
"""Clipping ratios tried per group; 1.0 keeps the group's full range."""


def group_scales(weight_groups: torch.Tensor, scale_dtype: torch.dtype = gptq_format.SCALE_DTYPE) -> torch.Tensor:
    """MSE-optimal symmetric scales for weight groups [..., g] -> [...], each a value of
    `scale_dtype` (the stored one, so the error GPTQ compensates is the served model's)."""
    def stored(scale: torch.Tensor) -> torch.Tensor:
        return scale.to(scale_dtype).to(weight_groups.dtype)

    max_abs = weight_groups.abs().amax(dim=-1).clamp_min(1e-8)
    best_scale = stored(max_abs * 2 / gptq_format.MAX_CODE)
    best_err = torch.full_like(max_abs, float("inf"))
    for ratio in CLIP_GRID:
        scale = stored(ratio * max_abs * 2 / gptq_format.MAX_CODE)
        codes = quantize_codes(weight_groups, scale.unsqueeze(-1))
        recon = (codes - gptq_format.SYM_ZERO) * scale.unsqueeze(-1)
        err = (recon - weight_groups).pow(2).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    return best_scale


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 of weight for a broadcastable scale (zero point 8)."""
    return torch.clamp(torch.round(weight / scale) + gptq_format.SYM_ZERO, 0, gptq_format.MAX_CODE)


def quantize_rtn(weight: torch.Tensor, group_size: int,
                 scale_dtype: torch.dtype = gptq_format.SCALE_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (codes [in, out], scales [in/g, out]) by rounding to nearest."""
    out_features, in_features = weight.shape
    groups = weight.reshape(out_features, in_features // group_size, group_size)
    scales = group_scales(groups, scale_dtype)  # [out, in/g]
    codes = quantize_codes(groups, scales.unsqueeze(-1)).reshape(out_features, in_features)
    return codes.t().contiguous(), scales.t().contiguous()


def quantize_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    block_size: int = 128,
    damp_ratio: float = 0.01,
    scale_dtype: torch.dtype = gptq_format.SCALE_DTYPE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ: weight [out, in], hessian [in, in] -> (codes [in, out], scales [in/g, out])."""
    weight = weight.clone().to(torch.float64)
    hessian = hessian.clone().to(torch.float64)
    out_features, in_features = weight.shape
    if block_size % group_size:
        raise ValueError(f"{block_size=} must be a multiple of {group_size=}")
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    damp = damp_ratio * torch.mean(torch.diag(hessian))
    hessian += damp * torch.eye(in_features, dtype=hessian.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)

    codes = torch.zeros_like(weight)
    scales = torch.zeros(in_features // group_size, out_features, dtype=torch.float64)
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        block = weight[:, start:end].clone()
        block_err = torch.zeros_like(block)
        hinv_block = hinv[start:end, start:end]
        for col in range(end - start):
            absolute = start + col
            if absolute % group_size == 0:
                group = block[:, col : col + group_size]
                scale = group_scales(group, scale_dtype)
                scales[absolute // group_size] = scale
            scale = scales[absolute // group_size]
            column = block[:, col]
            code = quantize_codes(column, scale)
            codes[:, absolute] = code
            recon = (code - gptq_format.SYM_ZERO) * scale
            err = (column - recon) / hinv_block[col, col]
            block[:, col:] -= err.unsqueeze(1) @ hinv_block[col, col:].unsqueeze(0)
            block_err[:, col] = err
        weight[:, end:] -= block_err @ hinv[start:end, end:]
    return codes.t().contiguous().to(torch.int64), scales.to(torch.float32)


class HessianCollector:
    """Accumulates X^T X of each nn.Linear's inputs through forward hooks."""

    def __init__(self, modules: dict[str, nn.Linear]):
        self.hessians: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._last_input: torch.Tensor | None = None
        self._last_gram: torch.Tensor | None = None
        self._handles = [
            module.register_forward_hook(self._hook(name)) for name, module in modules.items()
        ]

    def _hook(self, name: str):
        def accumulate(_module, inputs, _output):
            x = inputs[0]
            # q/k/v (and gate/up) read the same tensor object: compute its X^T X once. Identity,
            # not the data pointer: the allocator reuses a freed input's address for the next
            # layer's input of the same shape, which made o_proj/gate_proj take a stale X^T X.
            # Holding the reference keeps the address from being reused while it is compared.
            if self._last_input is not x:
                flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                self._last_input, self._last_gram = x, (flat.t() @ flat).to(torch.float64)
            if name not in self.hessians:
                self.hessians[name] = torch.zeros_like(self._last_gram)
                self.counts[name] = 0
            self.hessians[name] += self._last_gram
            self.counts[name] += x.numel() // x.shape[-1]

        return accumulate

    def close(self) -> dict[str, torch.Tensor]:
        for handle in self._handles:
            handle.remove()
        self._last_input = self._last_gram = None
        return {name: h / max(self.counts[name], 1) for name, h in self.hessians.items()}


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder's projection layers; embeddings, norms and the (tied) LM head stay unquantized."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in f".{name}" and "lm_head" not in name
    }


@torch.no_grad()
def collect_hessians(
    model: nn.Module, calibration: Iterable[torch.Tensor], linears: dict[str, nn.Linear]
) -> dict[str, torch.Tensor]:
    collector = HessianCollector(linears)
    try:
        for input_ids in tqdm(list(calibration), desc="calibration", unit="seq"):
            model(input_ids=input_ids.unsqueeze(0))
    finally:
        hessians = collector.close()
    return hessians


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    group_size: int,
    method: str,
    calibration: list[torch.Tensor] | None = None,
    scale_dtype: torch.dtype = gptq_format.SCALE_DTYPE,
) -> dict[str, gptq_format.PackedLinear]:
    """Quantize every decoder linear of `model`; returns packed tensors by module name.

    The model itself is left as it was (fp32) so callers can compare against it.
    """
    linears = quantizable_linears(model)
    if method not in ("rtn", "gptq"):
        raise ValueError(f"{method=} must be one of 'rtn', 'gptq'")
    hessians = collect_hessians(model, calibration or [], linears) if method == "gptq" else {}
    packed: dict[str, gptq_format.PackedLinear] = {}
    for name, module in tqdm(linears.items(), desc=f"quantize ({method})", unit="layer"):
        weight = module.weight.detach().to(torch.float32)
        if method == "gptq":
            codes, scales = quantize_gptq(weight, hessians[name], group_size, scale_dtype=scale_dtype)
        else:
            codes, scales = quantize_rtn(weight, group_size, scale_dtype)
        packed[name] = gptq_format.pack(codes, scales, group_size, scale_dtype)
    return packed
