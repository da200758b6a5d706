"""AWQ and GPTQ linear layers (fused pieces, act order, zero points) against the weights
their packed tensors stand for: 4-bit ones through torch's int4 CPU kernel, 8-bit GPTQ
decoded at load."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from pagoda.errors import UnsupportedModelError
from pagoda.layers.linear import QKVParallelLinear, RowParallelLinear
from pagoda.layers.quantization.cpu_block_dot import kernel_name
from pagoda.layers.quantization.int_checkpoints import (
    AWQConfig,
    GPTQConfig,
    unpack_int32,
)
from tests.layers.quantization.packers import (
    AWQ_ORDER,
    awq_tensors,
    gptq_tensors,
    pack_int32,
    quantize,
)
from tests.layers.quantization.packers import load_pieces as load

HIDDEN, HEAD_DIM, HEADS, KV_HEADS = 256, 32, 4, 2


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # bfloat16 activations and scales in torch's int4 kernel (~2^-8 relative per term); int8
    # activations per block of 32 in the block-dot kernel (half a step of 1/127 of each
    # block's largest)
    torch.testing.assert_close(actual, expected, rtol=0,
                               atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("order", [tuple(range(8)), AWQ_ORDER])
def test_nibbles_unpack_as_they_were_packed(order):
    values = torch.randint(0, 16, (16, 32), dtype=torch.int32)
    assert torch.equal(unpack_int32(pack_int32(values, 1, order), 1, order), values)
    assert torch.equal(unpack_int32(pack_int32(values, 0), 0), values)


def test_bytes_unpack_as_they_were_packed():
    values = torch.randint(0, 256, (16, 32), dtype=torch.int32)
    assert torch.equal(unpack_int32(pack_int32(values, 1, bits=8), 1, bits=8), values)
    assert torch.equal(unpack_int32(pack_int32(values, 0, bits=8), 0, bits=8), values)


def test_an_awq_fused_qkv_matches_its_weights(cpu_kernel):
    config = AWQConfig({"quant_method": "awq", "bits": 4, "group_size": 128,
                        "zero_point": True, "version": "gemm"})
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS,
                              method=config.linear_method("qkv_proj", None))
    sizes = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]
    quantized = [quantize(torch.randn(n, HIDDEN) * 0.05, 128, symmetric=False) for n in sizes]
    load(layer, [awq_tensors(q) for q in quantized])
    expected = kernel_name(4, 2) if cpu_kernel == "cpu_block_dot" else "int4pack_mm_for_cpu"
    assert layer.method.kernel(layer) == expected
    x = torch.randn(5, HIDDEN)
    close(layer(x), F.linear(x, torch.cat([q.weights() for q in quantized])))


@pytest.mark.parametrize("desc_act", [False, True])
def test_a_gptq_layer_matches_its_weights(desc_act, cpu_kernel):
    config = GPTQConfig({"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True,
                         "desc_act": desc_act})
    layer = RowParallelLinear(HIDDEN, 96, bias=True, method=config.linear_method("o_proj", None))
    g_idx = torch.randperm(HIDDEN) // 64 if desc_act else None  # act order: groups scattered
    q = quantize(torch.randn(96, HIDDEN) * 0.05, 64, symmetric=True, g_idx=g_idx)
    load(layer, [gptq_tensors(q)])
    layer.bias.data.copy_(torch.randn(96))
    assert layer.method.kernel(layer).endswith("(act order)") == desc_act
    x = torch.randn(3, HIDDEN)
    close(layer(x), F.linear(x, q.weights(), layer.bias))


@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_an_8_bit_gptq_fused_qkv_matches_its_weights(desc_act, symmetric, torch_cpu_kernels):
    """GPTQ Int8 (Qwen's GPTQ-Int8 checkpoints): four bytes per int32; without the block-dot
    kernel decoded at load to float32, from float16 scales and mins (a min of -zero * scale
    rounds to float16: at most 2^-11 of 255 steps, an eighth of a step, per weight)."""
    config = GPTQConfig({"quant_method": "gptq", "bits": 8, "group_size": 128,
                         "sym": symmetric, "desc_act": desc_act})
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS,
                              method=config.linear_method("qkv_proj", None))
    g_idx = torch.randperm(HIDDEN) // 128 if desc_act else None
    sizes = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]
    quantized = [quantize(torch.randn(n, HIDDEN) * 0.05, 128, symmetric, g_idx, bits=8)
                 for n in sizes]
    assert int(max(q.codes.max() for q in quantized)) > 15  # bytes, not nibbles
    load(layer, [gptq_tensors(q) for q in quantized])
    assert layer.quantized.weight.dtype == torch.float32
    kernel = layer.method.kernel(layer)
    assert kernel.startswith("8-bit codes decoded at load") and \
        kernel.endswith("(act order)") == desc_act
    x = torch.randn(5, HIDDEN)
    weights = torch.cat([q.weights() for q in quantized])
    step = torch.cat([q.scales.float().amax(0) for q in quantized])  # each row's largest
    bound = (x.abs().sum(1, keepdim=True) * step / 8 + 1e-5).expand(5, -1)
    assert ((layer(x) - F.linear(x, weights)).abs() <= bound).all()


@pytest.mark.parametrize("desc_act", [False, True])
def test_an_8_bit_gptq_layer_runs_on_the_block_dot_kernel(desc_act, block_dot_kernel):
    config = GPTQConfig({"quant_method": "gptq", "bits": 8, "group_size": 128, "sym": False,
                         "desc_act": desc_act})
    layer = RowParallelLinear(HIDDEN, 96, bias=True, method=config.linear_method("o_proj", None))
    g_idx = torch.randperm(HIDDEN) // 128 if desc_act else None
    q = quantize(torch.randn(96, HIDDEN) * 0.05, 128, False, g_idx, bits=8)
    load(layer, [gptq_tensors(q)])
    layer.bias.data.copy_(torch.randn(96))
    assert layer.method.kernel(layer) == kernel_name(8, 2) + (
        " (act order)" if desc_act else "")
    x = torch.randn(3, HIDDEN)
    close(layer(x), F.linear(x, q.weights(), layer.bias))


def test_formats_pagoda_does_not_read_are_refused():
    with pytest.raises(UnsupportedModelError, match="gemv packing"):
        AWQConfig({"version": "GEMV"})
    with pytest.raises(UnsupportedModelError, match="awq with 8-bit weights .*4 bits are"):
        AWQConfig({"bits": 8})
    with pytest.raises(UnsupportedModelError, match="gptq with 3-bit weights .*4 or 8 bits"):
        GPTQConfig({"bits": 3})
    assert AWQConfig({"modules_to_not_convert": ["down_proj"]}).linear_method(
        "model.layers.0.mlp.down_proj", None) is None
