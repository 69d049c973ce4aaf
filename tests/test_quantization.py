"""GPTQ packing and quantizers, checked against exact references on seeded weights."""

from __future__ import annotations

import torch

from artefacts import gptq_format
from server.model import quantize


def seeded_weight(out_features=96, in_features=128, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator) * 0.05


def test_pack_then_dequantize_reproduces_codes_times_scales():
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (128, 96), generator=generator)
    scales = torch.rand(2, 96, generator=generator) + 0.01
    packed = gptq_format.pack(codes, scales, group_size=64)
    assert packed.qweight.shape == (16, 96) and packed.qweight.dtype == torch.int32
    assert packed.qzeros.shape == (2, 12) and packed.qzeros.dtype == torch.int32
    assert packed.scales.dtype == torch.bfloat16 and packed.g_idx.tolist() == [i // 64 for i in range(128)]
    expected = ((codes.float() - 8) * scales.bfloat16().float().repeat_interleave(64, dim=0)).t()
    torch.testing.assert_close(gptq_format.dequantize(packed), expected, rtol=0, atol=0)


def test_scales_are_chosen_among_stored_values_so_no_load_rounds_them():
    """The quantizers pick scales the stored dtype holds exactly: packing does not move them, and
    the fp32 dense copy and vLLM's bf16 or fp16 parameters all receive the same values."""
    weight = seeded_weight()
    hessian = weight.new_ones(()) * torch.eye(128) + 0.1
    for codes, scales in (quantize.quantize_rtn(weight, 32), quantize.quantize_gptq(weight, hessian, 32)):
        packed = gptq_format.pack(codes, scales, group_size=32)
        assert torch.equal(packed.scales.float(), scales.float())
        assert torch.equal(packed.scales.half().float(), scales.float())


def test_packing_uses_low_bits_first_and_v1_zero_convention():
    codes = torch.zeros(8, 8, dtype=torch.int64)
    codes[0, 0], codes[1, 0] = 1, 2  # first two input rows of output column 0
    packed = gptq_format.pack(codes, torch.ones(1, 8), group_size=8)
    assert int(packed.qweight[0, 0]) == 1 | (2 << 4)
    assert int(packed.qzeros[0, 0]) == 0x77777777  # zero point 8 stored minus one, eight columns


def test_rtn_error_is_within_half_a_step():
    weight = seeded_weight()
    codes, scales = quantize.quantize_rtn(weight, group_size=64)
    recon = ((codes.float() - 8) * scales.repeat_interleave(64, dim=0)).t()
    step = scales.repeat_interleave(64, dim=0).t()
    inside = (weight / step).abs() <= 7  # values the clip search did not clip
    assert torch.all((recon - weight).abs()[inside] <= step[inside] / 2 + 1e-6)


def test_gptq_beats_rtn_on_layer_output_error():
    weight = seeded_weight(seed=2)
    generator = torch.Generator().manual_seed(3)
    # Correlated inputs, as real activations are: that is where GPTQ's error feedback pays off.
    mixing = torch.randn(128, 128, generator=generator)
    inputs = torch.randn(2048, 128, generator=generator) @ mixing * 0.1
    hessian = (inputs.t() @ inputs / inputs.shape[0]).double()

    def output_error(codes, scales):
        recon = ((codes.float() - 8) * scales.float().repeat_interleave(64, dim=0)).t()
        return float(((inputs @ recon.t() - inputs @ weight.t()) ** 2).mean())

    rtn = output_error(*quantize.quantize_rtn(weight, 64))
    gptq = output_error(*quantize.quantize_gptq(weight, hessian, 64))
    assert gptq < 0.8 * rtn, (gptq, rtn)


class _Block(torch.nn.Module):
    """q/k share one input; o reads a fresh tensor of the same shape, created after q's input
    died - the case where the allocator hands o's input the address q's input had."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(16, 16, bias=False)
        self.k = torch.nn.Linear(16, 16, bias=False)
        self.o = torch.nn.Linear(16, 16, bias=False)

    def forward(self, x):
        normed = x * 2.0
        mixed = self.q(normed) + self.k(normed)
        del normed
        return self.o(torch.tanh(mixed))


def test_hessian_collector_equals_explicit_gram_matrices():
    from server.model.quantize import HessianCollector

    torch.manual_seed(0)
    block = _Block()
    inputs = [torch.randn(3, 7, 16) for _ in range(4)]
    collector = HessianCollector({"q": block.q, "k": block.k, "o": block.o})
    with torch.no_grad():
        for x in inputs:
            block(x)
    hessians = collector.close()

    def gram(rows):
        flat = torch.cat([r.reshape(-1, 16) for r in rows]).double()
        return flat.t() @ flat / flat.shape[0]

    with torch.no_grad():
        q_inputs = [x * 2.0 for x in inputs]
        o_inputs = [torch.tanh(block.q(n) + block.k(n)) for n in q_inputs]
    tolerance = dict(rtol=1e-5, atol=1e-6)  # the collector multiplies in fp32
    torch.testing.assert_close(hessians["q"], gram(q_inputs), **tolerance)
    torch.testing.assert_close(hessians["k"], gram(q_inputs), **tolerance)
    torch.testing.assert_close(hessians["o"], gram(o_inputs), **tolerance)
