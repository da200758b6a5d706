"""compressed-tensors checkpoints packed by compressed-tensors itself (the library
llmcompressor writes them with): int4 and int8 pack-quantized (symmetric and with zero
points), int8 int-quantized (W8A8's weights, per row or group) and float8 weights, each
loaded into a fused qkv and checked against the weights the library decompresses them to."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.naive_quantized.base import (
    FloatQuantizationCompressor,
    IntQuantizationCompressor,
)
from compressed_tensors.compressors.pack_quantized.base import (
    PackedQuantizationCompressor,
)
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams
from torch.nn import functional as F

from pagoda.layers.linear import QKVParallelLinear
from pagoda.layers.quantization.compressed_tensors import compressed_tensors_config
from pagoda.layers.quantization.cpu_block_dot import kernel_name

HIDDEN, HEAD_DIM, HEADS, KV_HEADS = 256, 32, 4, 2
SIZES = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]


def compressed(compressor, args: QuantizationArgs, rows: int, group: int | None, seed: int
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One piece as the library stores it, and the weights it decompresses them to."""
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    weight = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(seed)) * 0.05
    groups = weight.reshape(rows, -1, group or HIDDEN)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    stored = compressor.compress({"weight": weight, "weight_scale": scale,
                                  "weight_zero_point": zero}, scheme)
    return stored, compressor.decompress(dict(stored), scheme)["weight"]


def qkv_layer(values: dict) -> QKVParallelLinear:
    config = compressed_tensors_config(values)
    return QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS,
                             method=config.linear_method("model.layers.0.self_attn.qkv_proj",
                                                         None))


def load(layer, pieces: list[dict[str, torch.Tensor]]) -> None:
    for shard, tensors in enumerate(pieces):
        for name, tensor in tensors.items():
            param = getattr(layer, name)
            param.weight_loader(param, tensor, shard)
    layer.method.process_weights_after_loading(layer)


def config_of(args: QuantizationArgs, fmt: str) -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "format": fmt,
                                          "weights": args.model_dump()}}}


# (kernel name, tolerance as a share of the largest output) per CPU path and width
KERNELS = {
    # int8 activations per block of 32: half a step of 1/127 of each block's largest
    ("cpu_block_dot", 4): (kernel_name(4, 2), 2e-2),
    ("cpu_block_dot", 8): (kernel_name(8, 2), 2e-2),
    # bfloat16 activations and scales in torch's int4 kernel
    ("torch", 4): ("int4pack_mm_for_cpu", 2e-2),
    # W8A16 decoded at load without the block-dot kernel (float32 weights from float16 scales
    # and mins: the mins round by at most 2^-11 of their size)
    ("torch", 8): ("8-bit codes decoded at load (dense matmul)", 2e-3),
}


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_pack_quantized_matches_the_librarys_weights(symmetric, bits, cpu_kernel):
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group",
                            group_size=128)
    layer = qkv_layer(config_of(args, "pack-quantized"))
    pieces = [compressed(PackedQuantizationCompressor, args, rows, 128, seed)
              for seed, rows in enumerate(SIZES)]
    assert ("weight_zero_point" in pieces[0][0]) != symmetric
    load(layer, [stored for stored, _ in pieces])
    kernel, tolerance = KERNELS[cpu_kernel, bits]
    assert layer.method.kernel(layer) == kernel
    x = torch.randn(4, HIDDEN)
    expected = F.linear(x, torch.cat([weights for _, weights in pieces]))
    torch.testing.assert_close(layer(x), expected, rtol=0,
                               atol=tolerance * expected.abs().max().item())


@pytest.mark.parametrize("strategy, group, symmetric", [
    ("channel", None, True), ("channel", None, False), ("group", 128, True)])
def test_int8_int_quantized_matches_the_librarys_weights(strategy, group, symmetric, cpu_kernel):
    """W8A8 int8 checkpoints' weights (int8 as they are, a scale per row or group), run
    weight-only: on CPU the block-dot kernel's bytes, or decoded at load."""
    args = QuantizationArgs(num_bits=8, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=group)
    values = config_of(args, "int-quantized")
    values["config_groups"]["group_0"]["input_activations"] = QuantizationArgs(
        num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True).model_dump()
    layer = qkv_layer(values)
    pieces = [compressed(IntQuantizationCompressor, args, rows, group, seed)
              for seed, rows in enumerate(SIZES)]
    assert pieces[0][0]["weight"].dtype == torch.int8
    assert ("weight_zero_point" in pieces[0][0]) != symmetric
    load(layer, [stored for stored, _ in pieces])
    kernel, tolerance = KERNELS[cpu_kernel, 8]
    assert layer.method.kernel(layer) == kernel
    x = torch.randn(4, HIDDEN)
    expected = F.linear(x, torch.cat([weights for _, weights in pieces]))
    torch.testing.assert_close(layer(x), expected, rtol=0,
                               atol=tolerance * expected.abs().max().item())


def test_float8_channel_weights_match_the_librarys_weights():
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    layer = qkv_layer(config_of(args, "float-quantized"))
    pieces = [compressed(FloatQuantizationCompressor, args, rows, None, seed)
              for seed, rows in enumerate(SIZES)]
    load(layer, [stored for stored, _ in pieces])
    x = torch.randn(4, HIDDEN)
    torch.testing.assert_close(layer(x), F.linear(x, torch.cat([w for _, w in pieces])))
