"""Quantized linear layers split over a tensor-parallel group of two: each rank loads the
whole checkpoint tensors and keeps its part, and its fused qkv gives its slice of q, k and v
of the one-device layer; a row-parallel layer's partial products add up to the one-device
output. Every format: AWQ, GPTQ, compressed-tensors int4, FP8 (block, per-tensor and
per-channel scales) and GGUF blocks; and the splits a format cannot make are refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import (
    PackedQuantizationCompressor,
)
from compressed_tensors.quantization import QuantizationArgs

from pagoda.errors import UnsupportedModelError
from pagoda.layers.linear import QKVParallelLinear, RowParallelLinear
from pagoda.layers.parallel import ParallelGroup
from pagoda.layers.quantization.compressed_tensors import compressed_tensors_config
from pagoda.layers.quantization.fp8 import Fp8Config
from pagoda.layers.quantization.gguf import GGUFLinearMethod, GGUFWeight
from pagoda.layers.quantization.int_checkpoints import AWQConfig, GPTQConfig
from tests.layers.quantization.packers import awq_tensors, gptq_tensors, quantize
from tests.layers.quantization.packers import load_pieces as load
from tests.layers.quantization.test_compressed_tensors import compressed, config_of
from tests.layers.quantization.test_fp8 import fp8_weight
from tests.layers.quantization.test_gguf_blocks import random_rows

HIDDEN, HEAD_DIM, HEADS, KV_HEADS, ROW_OUT = 256, 32, 4, 2, 96
SIZES = [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM]
TWO = [ParallelGroup(rank, 2) for rank in range(2)]
INT4_ARGS = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group",
                             group_size=128)
Piece = Callable[[int, int], dict]  # (rows, seed) -> the checkpoint tensors of one piece


def awq_piece(rows: int, seed: int) -> dict:
    torch.manual_seed(seed)
    return awq_tensors(quantize(torch.randn(rows, HIDDEN) * 0.05, 128, symmetric=False))


def gptq_piece(rows: int, seed: int) -> dict:
    torch.manual_seed(seed)
    return gptq_tensors(quantize(torch.randn(rows, HIDDEN) * 0.05, 128, symmetric=True))


def packed_int4_piece(rows: int, seed: int) -> dict:
    return compressed(PackedQuantizationCompressor, INT4_ARGS, rows, 128, seed)[0]


def fp8_block_piece(rows: int, seed: int) -> dict:
    torch.manual_seed(seed)
    return {"weight": fp8_weight(rows, HIDDEN),
            "weight_scale_inv": torch.rand(-(-rows // 128), HIDDEN // 128) / 1e3}


def fp8_tensor_piece(rows: int, seed: int) -> dict:
    torch.manual_seed(seed)
    return {"weight": fp8_weight(rows, HIDDEN), "weight_scale": torch.tensor(1e-3 * seed),
            "input_scale": torch.tensor(0.5)}


def fp8_channel_piece(rows: int, seed: int) -> dict:
    torch.manual_seed(seed)
    return {"weight": fp8_weight(rows, HIDDEN), "weight_scale": torch.rand(rows, 1) / 1e3}


def gguf_piece(type_name: str) -> Piece:
    def piece(rows: int, seed: int) -> dict:
        raw = torch.from_numpy(random_rows(type_name, rows, HIDDEN, seed))
        return {"weight": GGUFWeight(raw, type_name, HIDDEN)}
    return piece


AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}
CHANNEL_FP8 = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
    "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}}
FORMATS: dict[str, tuple[Callable, Piece]] = {
    "awq": (lambda: AWQConfig(AWQ).linear_method("x", None), awq_piece),
    "gptq": (lambda: GPTQConfig({"bits": 4, "group_size": 128}).linear_method("x", None),
             gptq_piece),
    "compressed-tensors-int4": (
        lambda: compressed_tensors_config(config_of(INT4_ARGS, "pack-quantized"))
        .linear_method("x", None), packed_int4_piece),
    "fp8-block": (lambda: Fp8Config({"weight_block_size": [128, 128]}).linear_method("x", None),
                  fp8_block_piece),
    "fp8-tensor": (lambda: Fp8Config({}).linear_method("x", None), fp8_tensor_piece),
    "fp8-channel": (lambda: compressed_tensors_config(CHANNEL_FP8).linear_method("x", None),
                    fp8_channel_piece),
    "gguf-q4_0": (GGUFLinearMethod, gguf_piece("Q4_0")),
    "gguf-q8_0": (GGUFLinearMethod, gguf_piece("Q8_0")),
}


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # the int4 kernel runs on bfloat16: each rank's sums round apart from one device's
    torch.testing.assert_close(actual, expected, rtol=0,
                               atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_rank_of_a_fused_qkv_gives_its_heads(fmt):
    method, piece = FORMATS[fmt]
    pieces = [piece(rows, seed) for seed, rows in enumerate(SIZES, 1)]
    whole = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, method=method())
    load(whole, pieces)
    x = torch.randn(5, HIDDEN)
    q, k, v = whole.split(whole(x))
    for group in TWO:
        rank = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, method=method(), group=group)
        load(rank, pieces)
        expected = [part.chunk(2, dim=-1)[group.rank] for part in (q, k, v)]
        close(rank(x), torch.cat(expected, dim=-1))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_row_parallel_partial_products_add_up(fmt):
    method, piece = FORMATS[fmt]
    tensors = piece(ROW_OUT, 7)
    whole = RowParallelLinear(HIDDEN, ROW_OUT, method=method())
    load(whole, [tensors])
    x = torch.randn(3, HIDDEN)
    total = torch.zeros(3, ROW_OUT)
    for group, inputs in zip(TWO, x.chunk(2, dim=-1)):
        rank = RowParallelLinear(HIDDEN, ROW_OUT, method=method(), group=group)
        load(rank, [tensors])
        total += rank.method.apply(rank, inputs)
    close(total, whole(x))


def test_int4_inputs_that_are_not_whole_groups_per_rank_are_refused():
    method = AWQConfig(AWQ | {"group_size": 256}).linear_method
    with pytest.raises(UnsupportedModelError, match="awq weights do not split over 2 "
                       "tensor-parallel ranks here: each rank's 128 of the 256 inputs"):
        RowParallelLinear(HIDDEN, ROW_OUT, method=method("o_proj", None), group=TWO[0])


def test_gptq_act_order_is_refused_in_row_parallel_layers_only():
    torch.manual_seed(0)
    g_idx = torch.randperm(HIDDEN) // 128  # act order: one input order for q, k, v

    def act_order_piece(rows: int) -> dict:
        return gptq_tensors(quantize(torch.randn(rows, HIDDEN) * 0.05, 128, symmetric=True,
                                     g_idx=g_idx))
    config = GPTQConfig({"bits": 4, "group_size": 128, "desc_act": True})
    column = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS,
                               method=config.linear_method("qkv", None), group=TWO[1])
    load(column, [act_order_piece(rows) for rows in SIZES])
    assert column.method.kernel(column).endswith("(act order)")
    row = RowParallelLinear(HIDDEN, ROW_OUT, method=config.linear_method("o_proj", None),
                            group=TWO[1])
    with pytest.raises(UnsupportedModelError, match="act-order .* do not split over the "
                       "inputs of a row-parallel layer"):
        load(row, [act_order_piece(ROW_OUT)])


def test_awq_outputs_that_split_inside_a_packed_int32_are_refused():
    layer = QKVParallelLinear(HIDDEN, 4, 4, 2, method=AWQConfig(AWQ).linear_method("x", None),
                              group=TWO[0])
    with pytest.raises(UnsupportedModelError, match=r"awq qweight: output rows do not split "
                       r"over 2 tensor-parallel ranks: each rank's 4 \(from 0\) are not whole "
                       "units of 8"):  # k and v: 4 of 8 outputs a rank, packed eight an int32
        load(layer, [awq_piece(rows, 1) for rows in (16, 8, 8)])


def test_gguf_types_whose_blocks_straddle_a_ranks_inputs_are_decoded_at_load():
    column = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, method=GGUFLinearMethod(),
                               group=TWO[0])
    row = RowParallelLinear(HIDDEN, ROW_OUT, method=GGUFLinearMethod(), group=TWO[0])
    assert column.weight.gguf_blocks("Q4_K") and row.weight.gguf_blocks("Q4_0")
    assert not row.weight.gguf_blocks("Q4_K")  # 256 weights a block, 128 inputs a rank
