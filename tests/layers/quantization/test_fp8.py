"""FP8 weight-only linear layers against the weights they stand for: block scales, a fused
qkv with a per-tensor scale per piece, compressed-tensors channel scales, and 16-bit
weights quantized at load; each on pagoda's CPU float8 kernel and decoded at load."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from pagoda.errors import UnsupportedModelError
from pagoda.layers.linear import QKVParallelLinear, RowParallelLinear
from pagoda.layers.quantization.compressed_tensors import compressed_tensors_config
from pagoda.layers.quantization.fp8 import FP8, Fp8Config
from tests.layers.quantization.packers import load_pieces as load

HIDDEN, HEAD_DIM, HEADS, KV_HEADS = 256, 64, 4, 2
SIZES = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]
KERNEL_NAMES = {"cpu_fp8_dot": "cpu_fp8_dot (float8 bytes decoded in registers, float32 "
                               "products)",
                "decoded": "fp8 weights decoded at load (dense matmul)"}
pytestmark = pytest.mark.usefixtures("fp8_cpu_kernel")  # every test on each CPU path


def fp8_weight(rows: int, columns: int) -> torch.Tensor:
    return (torch.randn(rows, columns) * 100).clamp(-448, 448).to(FP8)


def test_block_scales_of_a_fused_qkv():
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, method=Fp8Config(
        {"quant_method": "fp8", "weight_block_size": [128, 128]}).linear_method("qkv", None))
    pieces, references = [], []
    for rows in SIZES:
        weight, scale = fp8_weight(rows, HIDDEN), torch.rand(rows // 128, HIDDEN // 128) / 1e3
        pieces.append({"weight": weight, "weight_scale_inv": scale})
        expanded = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
        references.append(weight.float() * expanded)
    load(layer, pieces)
    x = torch.randn(5, HIDDEN)
    torch.testing.assert_close(layer(x), F.linear(x, torch.cat(references)))


def test_a_per_tensor_scale_per_piece_and_an_input_scale():
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, method=Fp8Config(
        {"quant_method": "fp8", "activation_scheme": "static"}).linear_method("qkv", None))
    pieces = [{"weight": fp8_weight(rows, HIDDEN), "weight_scale": torch.tensor(1e-3 * (i + 1)),
               "input_scale": torch.tensor(0.5)} for i, rows in enumerate(SIZES)]
    load(layer, pieces)
    reference = torch.cat([p["weight"].float() * p["weight_scale"] for p in pieces])
    x = torch.randn(3, HIDDEN)
    torch.testing.assert_close(layer(x), F.linear(x, reference))


def test_compressed_tensors_channel_scales():
    config = compressed_tensors_config({"quant_method": "compressed-tensors", "config_groups": {
        "group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                       "strategy": "channel"}}},
        "ignore": ["lm_head"]})
    layer = RowParallelLinear(HIDDEN, 96, bias=True, method=config.linear_method("o_proj", None))
    weight, scale = fp8_weight(96, HIDDEN), torch.rand(96, 1) / 1e3
    load(layer, [{"weight": weight, "weight_scale": scale}])
    layer.bias.data.copy_(torch.randn(96))
    x = torch.randn(2, HIDDEN)
    torch.testing.assert_close(layer(x), F.linear(x, weight.float() * scale, layer.bias))
    assert config.linear_method("lm_head", None) is None


def test_16_bit_weights_quantized_at_load_stay_within_fp8_rounding(fp8_cpu_kernel):
    layer = RowParallelLinear(HIDDEN, 96, method=Fp8Config(None).linear_method("o_proj", None))
    weight = torch.randn(96, HIDDEN)
    load(layer, [{"weight": weight}])
    assert layer.method.kernel(layer) == KERNEL_NAMES[fp8_cpu_kernel]
    decoded = layer(torch.eye(HIDDEN)).t()  # the weights the layer multiplies by
    row_max = weight.abs().amax(1, keepdim=True)
    # E4M3: 3 mantissa bits, so half a step is 1/16 relative; subnormals below 2^-6 * scale
    bound = weight.abs() / 16 + row_max / 448 * 2.0 ** -9
    assert ((decoded - weight).abs() <= bound).all()


def test_on_the_kernel_a_layer_holds_a_byte_per_weight(fp8_cpu_kernel):
    layer = RowParallelLinear(HIDDEN, 96, method=Fp8Config(None).linear_method("o_proj", None))
    load(layer, [{"weight": torch.randn(96, HIDDEN)}])
    held = sum(p.numel() * p.element_size() for p in layer.parameters())
    per_weight = 1 if fp8_cpu_kernel == "cpu_fp8_dot" else 4  # float32 once decoded
    assert held == 96 * HIDDEN * per_weight + (96 * 4 if per_weight == 1 else 0)


def test_a_fused_layer_quantized_at_load_holds_each_piece_as_float8_as_it_comes():
    """`--quantization fp8` on a 16-bit checkpoint: each piece of a fused qkv is float8 rows
    once it has loaded (no layer is ever held in 16 bits), its values and scales those of
    the whole weight's per-channel quantization in the model's dtype; a missing piece stops
    the layer with one error."""
    from pagoda.layers.quantization.fp8 import quantize_per_channel
    method = Fp8Config(None).linear_method("qkv", None)
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, method=method)
    weights = [torch.randn(rows, HIDDEN) for rows in SIZES]
    layer.weight.weight_loader(layer.weight, weights[0], 0)
    assert layer.weight.numel() == 0 and layer.collected[("weight", 0)].weight.dtype == FP8
    for shard in (1, 2):
        layer.weight.weight_loader(layer.weight, weights[shard], shard)
    rows = [layer.collected[("weight", shard)] for shard in range(len(SIZES))]
    values, scale = torch.cat([r.weight for r in rows]), torch.cat([r.scale for r in rows])
    expected_values, expected_scale = quantize_per_channel(torch.cat(weights))
    assert torch.equal(values.view(torch.uint8), expected_values.view(torch.uint8))
    assert torch.equal(scale, expected_scale)
    partial = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, method=method)
    partial.weight.weight_loader(partial.weight, weights[0], 0)
    with pytest.raises(UnsupportedModelError, match="lacks some of its weights"):
        method.process_weights_after_loading(partial)


def test_compressed_tensors_formats_pagoda_does_not_read_are_refused():
    with pytest.raises(UnsupportedModelError, match="int8 are not supported"):
        compressed_tensors_config({"config_groups": {"g": {"weights": {"type": "int",
                                                                        "num_bits": 8}}}})
