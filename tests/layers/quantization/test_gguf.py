"""GGUF linear layers kept in blocks against gguf-py's dequantized weights, on each CPU
path (pagoda's block-dot kernel; torch's int4 matmul for 4-bit types and blocks decoded per
call for the others): a fused qkv whose pieces differ in type, a float piece, bias, and a
piece of the wrong shape."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pagoda.layers.embedding import LMHead, VocabEmbedding
from pagoda.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    deferred_linear_methods,
)
from pagoda.layers.quantization import finish_linear_layers
from pagoda.layers.quantization.base import DenseWeight
from pagoda.layers.quantization.cpu_block_dot import BlockDotWeight, kernel_name
from pagoda.layers.quantization.gguf import (
    BlockRows,
    GGUFConfig,
    GGUFLinearMethod,
    GGUFWeight,
    held_bits,
)
from pagoda.layers.quantization.group_gemm import GroupQuantWeight
from pagoda.layers.quantization.int4 import Int4PackedWeight
from tests.layers.quantization.test_gguf_blocks import gguf_py, random_rows

HIDDEN, HEAD_DIM, HEADS, KV_HEADS = 256, 32, 4, 2


def gguf_piece(name: str, rows: int, columns: int, seed: int) -> tuple[GGUFWeight, torch.Tensor]:
    """A checkpoint piece in blocks and its weights as gguf-py decodes them."""
    raw = random_rows(name, rows, columns, seed)
    return (GGUFWeight(torch.from_numpy(raw), name, columns),
            torch.from_numpy(gguf_py(raw, name)))


def loaded(layer, pieces) -> None:
    for shard, piece in enumerate(pieces):
        layer.weight.weight_loader(layer.weight, piece, shard if len(pieces) > 1 else None)
    layer.method.process_weights_after_loading(layer)


def kernel_tolerance(reference: torch.Tensor) -> dict:
    # the int4 kernel runs on bfloat16 activations and scales (~2^-8 relative per term), the
    # block-dot kernel on int8 activations (half a step of 1/127 of each block's largest)
    return dict(rtol=0, atol=2e-2 * reference.abs().max().item())


def test_a_fused_qkv_of_mixed_types_matches_the_dequantized_weights(cpu_kernel):
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, method=GGUFLinearMethod())
    q, q_ref = gguf_piece("Q4_K", HEADS * HEAD_DIM, HIDDEN, 1)
    k, k_ref = gguf_piece("Q4_1", KV_HEADS * HEAD_DIM, HIDDEN, 2)
    v, v_ref = gguf_piece("Q6_K", KV_HEADS * HEAD_DIM, HIDDEN, 3)
    loaded(layer, [q, k, v])
    # on the block-dot kernel, q's Q4_K and k's Q4_1 (its scales float16s) are held apart and
    # v's Q6_K (groups of 16) as 6-bit codes; on torch's path q and k share one kernel and no
    # kernel takes v
    if cpu_kernel == "cpu_block_dot":
        kernels = [BlockDotWeight] * 3
        name = f"{kernel_name(4, 2, factored=True)} + " \
            f"{kernel_name(4, 2, half_scales=True)} + {kernel_name(6, 2, factored=True)}"
    else:
        kernels = [Int4PackedWeight, BlockRows]
        name = "int4pack_mm_for_cpu + Q6_K decoded per call"
    assert [type(k) for k in layer.gguf_kernels] == kernels
    assert layer.method.kernel(layer) == name
    x = torch.randn(7, HIDDEN)
    y = layer(x)
    if cpu_kernel == "cpu_block_dot":  # each kernel writes its columns of one output
        assert torch.equal(y, torch.cat([kernel(x) for kernel in layer.gguf_kernels], -1))
    q_out, k_out, v_out = layer.split(y)
    int4_ref = F.linear(x, torch.cat([q_ref, k_ref]))
    torch.testing.assert_close(torch.cat([q_out, k_out], -1), int4_ref,
                               **kernel_tolerance(int4_ref))
    v_expected = F.linear(x, v_ref)  # decoded per call: float32 exact
    tolerance = kernel_tolerance(v_expected) if cpu_kernel == "cpu_block_dot" else {}
    torch.testing.assert_close(v_out, v_expected, **tolerance)


def test_group_kernels_of_a_layer_write_their_columns_of_one_output():
    """A layer held as several group kernels (as a GPU holds a Q4_K_M file's qkv: 4-bit
    planes, then byte planes) gives each kernel's product in its columns, the bias after."""
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias=True,
                              method=GGUFLinearMethod())
    generator = torch.Generator().manual_seed(0)
    layer.gguf_kernels = nn.ModuleList([
        GroupQuantWeight(torch.randint(0, 16, (rows, HIDDEN), generator=generator),
                         torch.rand(rows, HIDDEN // 32, generator=generator), None, 32, bits,
                         planes=True)
        for rows, bits in (((HEADS + KV_HEADS) * HEAD_DIM, 4), (KV_HEADS * HEAD_DIM, 8))])
    layer.bias.data.copy_(torch.randn(layer.bias.shape, generator=generator))
    x = torch.randn(3, 2, HIDDEN, generator=generator)
    expected = torch.cat([kernel(x) for kernel in layer.gguf_kernels], -1) + layer.bias
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("name", ["Q4_0", "Q8_0", "Q5_0", "Q5_K", "Q2_K", "Q3_K"])
def test_a_row_parallel_layer_with_bias_matches(name, cpu_kernel):
    layer = RowParallelLinear(HIDDEN, 64, bias=True, method=GGUFLinearMethod())
    piece, ref = gguf_piece(name, 64, HIDDEN, 4)
    loaded(layer, [piece])
    layer.bias.data.copy_(torch.randn(64))
    x = torch.randn(3, 2, HIDDEN)
    expected = F.linear(x, ref, layer.bias)
    decoded_per_call = cpu_kernel == "torch" and name != "Q4_0"
    assert isinstance(layer.gguf_kernels[0], BlockRows) == decoded_per_call
    # decoded per call: float32, up to the order of the sums (the bias is added after them)
    tolerance = {"rtol": 1e-5, "atol": 1e-4} if decoded_per_call else kernel_tolerance(expected)
    torch.testing.assert_close(layer(x), expected, **tolerance)


def test_a_float_piece_stays_dense_beside_blocks(cpu_kernel):
    layer = MergedColumnParallelLinear(HIDDEN, [64, 64], method=GGUFLinearMethod())
    gate, gate_ref = gguf_piece("Q8_0", 64, HIDDEN, 5)
    up = torch.randn(64, HIDDEN)
    loaded(layer, [gate, up])
    blocks = BlockDotWeight if cpu_kernel == "cpu_block_dot" else BlockRows
    assert [type(k) for k in layer.gguf_kernels] == [blocks, DenseWeight]
    x = torch.randn(4, HIDDEN)
    expected = F.linear(x, torch.cat([gate_ref, up]))
    gate_out, up_out = layer(x).split(64, dim=-1)
    torch.testing.assert_close(up_out, expected[:, 64:])
    tolerance = kernel_tolerance(expected) if blocks is BlockDotWeight else {}
    torch.testing.assert_close(gate_out, expected[:, :64], **tolerance)


def test_byte_codes_in_groups_of_32_and_of_16_take_two_kernels(block_dot_kernel):
    """A Q5_K_M file's qkv: q and k in Q5_K (groups of 32), v in Q6_K (groups of 16), all
    6-bit codes: two kernels, one for each group size (one kernel failed to stack them)."""
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, method=GGUFLinearMethod())
    pieces = [gguf_piece(kind, rows, HIDDEN, seed) for kind, rows, seed in (
        ("Q5_K", HEADS * HEAD_DIM, 1), ("Q5_K", KV_HEADS * HEAD_DIM, 2),
        ("Q6_K", KV_HEADS * HEAD_DIM, 3))]
    loaded(layer, [piece for piece, _ in pieces])
    assert [(k.bits, k.group_size) for k in layer.gguf_kernels] == [(6, 32), (6, 16)]
    x = torch.randn(5, HIDDEN)
    expected = F.linear(x, torch.cat([reference for _, reference in pieces]))
    torch.testing.assert_close(layer(x), expected, **kernel_tolerance(expected))


def test_two_and_three_bit_codes_are_held_as_nibbles(block_dot_kernel):
    """A Q3_K_M-like qkv: q in Q3_K and k in Q2_K held as 4-bit codes (their codes fit a
    nibble), v's Q6_K as 6-bit codes, each with its scales factored as the blocks store them
    (int8 a group of 16, Q2_K's mins too, floats a super-block of 256): 4.75, 5.25 and 6.75
    bits a weight, where bytes and float32 scales took 12 (Q6_K); what held_bits tells the
    estimate is what each kernel holds (Q3_K's and Q2_K's apart: their lows differ in
    form)."""
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, method=GGUFLinearMethod())
    kinds = ("Q3_K", "Q2_K", "Q6_K")
    pieces = [gguf_piece(kind, rows, HIDDEN, seed) for kind, rows, seed in zip(
        kinds, (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM), (1, 2, 3))]
    loaded(layer, [piece for piece, _ in pieces])
    assert [(k.bits, k.group_size, k.factored) for k in layer.gguf_kernels] == \
        [(4, 16, True), (4, 16, True), (6, 16, True)]
    assert layer.method.kernel(layer) == " + ".join(  # (each name once)
        kernel_name(bits, 2, factored=True) for bits in (4, 6))
    cpu = torch.device("cpu")
    for kernel, kind in zip(layer.gguf_kernels, kinds, strict=True):
        held = sum(p.numel() * p.element_size() for p in kernel.parameters())
        assert held * 8 == kernel.out_features * HIDDEN * held_bits(kind, cpu)
    assert [held_bits(kind, cpu) for kind in kinds] == [4.75, 5.25, 6.75]
    x = torch.randn(5, HIDDEN)
    expected = F.linear(x, torch.cat([reference for _, reference in pieces]))
    torch.testing.assert_close(layer(x), expected, **kernel_tolerance(expected))


@pytest.mark.parametrize(("kind", "paired", "unpaired"), [
    ("Q6_K", 9, 10), ("Q3_K", 9, 10), ("Q2_K", 10, 10), ("Q4_K", 5, 5), ("Q8_0", 8.5, 9),
    ("Q4_0", 4.5, 5)])
def test_held_bits_on_cuda_are_what_the_group_kernel_holds(kind, paired, unpaired,
                                                          monkeypatch):
    """What held_bits tells the estimate for a GPU is the bytes of the group kernel's
    weights: byte planes of Q6_K and Q3_K hold only their scales, two groups' to a word
    (every low is -32 or -4 times its group's scale), and Q8_0's and Q4_0's codes with no
    min (their lows -128 and -8 times the scale): half a bit or a bit a weight fewer than with
    PAGODA_PLANE_SCALE_PAIRS=0 and PAGODA_CENTRED_CODES=0; Q2_K's mins are mins."""
    from pagoda.layers.quantization import group_gemm
    from pagoda.layers.quantization.gguf import group_layout
    from pagoda.layers.quantization.gguf_blocks import byte_groups
    piece, _ = gguf_piece(kind, 64, HIDDEN, 9)
    bits, group = group_layout(kind)
    codes, scale, low = byte_groups(piece.rows, kind)[:3]
    cuda = torch.device("cuda")
    for pairs, expected in ((True, paired), (False, unpaired)):
        monkeypatch.setattr(group_gemm, "SCALE_PAIRS_IN_PLANES", pairs)
        monkeypatch.setattr(group_gemm, "CENTRED_CODES", pairs)
        kernel = GroupQuantWeight(codes, scale, low, group, bits)
        held = sum(p.numel() * p.element_size() for p in kernel.parameters())
        assert held * 8 == 64 * HIDDEN * held_bits(kind, cuda) == 64 * HIDDEN * expected


def test_a_piece_of_the_wrong_shape_is_refused():
    layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, method=GGUFLinearMethod())
    wrong, _ = gguf_piece("Q4_0", KV_HEADS * HEAD_DIM, HIDDEN, 6)
    with pytest.raises(ValueError, match="does not fit"):
        layer.weight.weight_loader(layer.weight, wrong, 0)


def test_deferred_layers_allocate_no_weights_until_bound():
    with deferred_linear_methods():
        layer = RowParallelLinear(HIDDEN, 64)
    assert layer.method is None and not hasattr(layer, "weight")
    layer.bind_method(GGUFLinearMethod())
    assert layer.weight.numel() == 0 and layer.weight.gguf_blocks
    with pytest.raises(RuntimeError):
        layer.bind_method(GGUFLinearMethod())


def tied_table(vocab: int) -> tuple[VocabEmbedding, LMHead]:
    embedding = VocabEmbedding(vocab, HIDDEN)
    head = LMHead(vocab, HIDDEN, tied_to=embedding)
    GGUFConfig().bind_tied_table(embedding, head)
    return embedding, head


def test_a_tied_table_is_held_by_the_block_dot_kernel(block_dot_kernel):
    """The LM head multiplies by the Q8_0 codes (activations in two passes: float32's
    logits to 1e-4 of the largest); lookups decode the rows exactly; no float table."""
    embedding, head = tied_table(96)
    assert embedding.weight is head.weight and embedding.weight.numel() == 0
    keeps = embedding.weight.gguf_blocks
    assert all(keeps(kind) for kind in ("Q8_0", "Q4_K", "Q6_K"))
    table, ref = gguf_piece("Q8_0", 96, HIDDEN, 7)
    embedding.weight.weight_loader(embedding.weight, table)
    kernels = finish_linear_layers(nn.ModuleList([embedding, head]))
    assert kernels == {"lm_head": kernel_name(8, 2, half_scales=True)}  # Q8_0's d: float16s
    assert isinstance(head.quantized, BlockDotWeight) and embedding.quantized is head.quantized
    ids = torch.tensor([[3, 95], [0, 3]])
    assert torch.equal(embedding(ids), ref[ids])
    hidden = torch.randn(5, HIDDEN)
    expected = F.linear(hidden, ref)
    torch.testing.assert_close(head(hidden), expected, rtol=0,
                               atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K", "Q6_K"])
def test_a_tied_table_the_gpu_kernel_holds_serves_the_head_and_the_lookups(kind, factored,
                                                                           monkeypatch):
    """A table of a type the GPU group kernel takes (as on CUDA: the kernel kind forced
    here, on CPU, where its product is the decoded weights'): held once as its codes, the
    head's product and the lookups (their rows decoded alone) are the table gguf-py
    decodes, to the float16 rounding of the k-quants' group scales and mins, or exactly
    with them held factored (PAGODA_PLANE_FACTORED_SCALES=1: multiplied out in float32)."""
    from pagoda.layers.quantization import gguf, group_gemm
    monkeypatch.setattr(group_gemm, "FACTORED_SCALES_IN_PLANES", factored)
    monkeypatch.setattr(gguf, "_kernel_kind", lambda type_name, rows, columns, device:
                        "group{}x{}".format(*gguf.group_layout(type_name)))
    embedding, head = tied_table(96)
    table, ref = gguf_piece(kind, 96, HIDDEN, 8)
    assert embedding.weight.gguf_blocks(kind)
    embedding.weight.weight_loader(embedding.weight, table)
    kernels = finish_linear_layers(nn.ModuleList([embedding, head]))
    assert kernels["lm_head"].startswith("triton group gemm")
    assert isinstance(head.quantized, GroupQuantWeight) and embedding.quantized is head.quantized
    ids = torch.tensor([[3, 95], [0, 3]])
    k_quant = kind != "Q8_0"
    assert (head.quantized.sub_words is not None) == (factored and k_quant)
    rounding = 2 ** -11 if k_quant and not factored else 0  # (Q8_0's scales are float16s)
    atol = rounding * ref.abs().max().item()
    torch.testing.assert_close(embedding(ids), ref[ids], rtol=0, atol=atol)
    held = head.quantized.dequantize(torch.float32)  # every row, as the head multiplies it
    torch.testing.assert_close(held, ref, rtol=0, atol=atol)
    hidden = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(0))
    expected = F.linear(hidden, held)
    torch.testing.assert_close(head(hidden), expected, rtol=0,
                               atol=1e-6 * expected.abs().max().item())


def test_a_tied_table_stays_float_without_the_kernel_or_whole_tiles(cpu_kernel):
    """torch's path, or a vocabulary that is not whole tiles of 16 rows: the loader is asked
    for floats, and the embedding and the head share the float table."""
    vocab = 96 if cpu_kernel == "torch" else 100
    embedding, head = tied_table(vocab)
    assert not embedding.weight.gguf_blocks("Q8_0")
    _, table = gguf_piece("Q8_0", vocab, HIDDEN, 7)  # as the loader decodes it
    embedding.weight.weight_loader(embedding.weight, table)
    assert finish_linear_layers(nn.ModuleList([embedding, head])) == {}
    assert embedding.weight is head.weight and embedding.weight.dtype == torch.float32
    assert embedding.weight.shape == (embedding.rows, HIDDEN)
    assert head.quantized is None and embedding.quantized is None
    ids = torch.tensor([[3, vocab - 1]])
    assert torch.equal(embedding(ids), table[ids])
