"""Experts held as codes for the GPU's fused MoE kernel (pagoda/layers/moe/expert_codes.py):
a layer's stacks made from an FP8, integer or GGUF checkpoint's pieces (a tensor-parallel
rank's rows and groups too), what does not fit turning the layer to floats, floats quantized
to float8 at load, and the kernel on every layout against the weights they decode to under
Triton's CPU interpreter (this module's __main__ in a subprocess: TRITON_INTERPRET=1 must
be set before triton is imported) and compiled for sm_90 with bfloat16 activations (which
the interpreter cannot run); tests/gpu/test_fused_moe.py runs the kernel at real sizes."""

from __future__ import annotations

import json
import re
from functools import partial

import pytest
import torch

from bench.kernels.sass_census import cuobjdump
from pagoda.layers.linear import deferred_linear_methods
from pagoda.layers.moe import expert_codes
from pagoda.layers.moe.layer import FusedMoE
from pagoda.layers.parallel import SINGLE, ParallelGroup
from pagoda.layers.quantization.cpu_fp8_dot import Fp8Rows
from pagoda.layers.quantization.fp8 import random_float8_rows
from tests.layers.moe_cases import float8_experts, integer_experts, random_moe
from tests.layers.moe_cases import stacked_codes as stack_of
from tests.utils import compile_for_cuda, interpreter_report

MARKER = "CODES-RESULTS "
# (tokens, experts, top_k, hidden, inter, layout, drop_experts): float8 with a scale a row
# or a row and 32 inputs; 4-bit codes in groups of 32 and 64 (two a byte); 8-bit and 6-bit
# (GGUF Q6_K's) codes a byte in groups of 16 and 32, an intermediate size of 48; float8 on
# FP8 tensor cores (activations quantized a row), a scale a row or a 128 x 128 block; integer
# codes decoded to weights before each product (the prefill tiles' way). Integer codes in
# tiles of few rows split their inputs among programs wherever a call has several steps of
# them (the interpreter counts an H200's multiprocessors): the gate-up product with dropped
# experts, both products with the top-k sums in the down one, 3 splits of 48 inputs;
# "int-unsplit" runs the same without, and "float8-split" / "float8-tc-split" split float8
# experts' inputs in two (as PAGODA_MOE_SPLIT_K=2 would)
CODES_CASES = [(1, 8, 2, 32, 48, ("float8", None), False),
               (7, 4, 4, 64, 32, ("float8", 32), False),
               (1, 8, 2, 64, 64, ("int", 4, 32), False),
               (7, 4, 4, 128, 64, ("int", 4, 64), True),
               (40, 8, 2, 64, 64, ("int", 8, 16), False),
               (5, 8, 2, 64, 48, ("int", 6, 16), False),
               (7, 4, 4, 128, 128, ("float8-tc", None), True),
               (40, 8, 2, 256, 128, ("float8-tc", 128), False),
               (7, 4, 4, 128, 64, ("int-decoded", 4, 64), True),
               (40, 8, 2, 64, 64, ("int-decoded", 8, 16), False),
               (3, 8, 2, 256, 128, ("int", 4, 32), False),
               (7, 4, 4, 128, 64, ("int-unsplit", 4, 64), True),
               (5, 8, 2, 64, 48, ("int-unsplit", 6, 16), False),
               (3, 4, 2, 256, 64, ("float8-split", None), True),
               (3, 4, 2, 256, 128, ("float8-tc-split", None), False)]


def pieces_of(w: torch.Tensor, layout: tuple) -> list:
    """Each expert's piece of stacked floats in `layout` (as checkpoints bring them)."""
    if layout[0] == "float8":
        values, scale = float8_experts(w, layout[1])
        return [Fp8Rows(values[e], scale[e]) for e in range(w.shape[0])]
    return integer_experts(w, *layout[1:])


def loaded_layer(w13: torch.Tensor, w2: torch.Tensor, layout: tuple,
                 group: ParallelGroup = SINGLE) -> FusedMoE:
    """A layer holding stacked codes, loaded piece by piece as a checkpoint's experts."""
    with deferred_linear_methods():
        layer = FusedMoE(w13.shape[0], 2, w13.shape[2], w2.shape[2], True, group)
    layer.hold_stacked_codes()
    inter = w2.shape[2]
    gate_up_param, down_param = layer.gate_up_proj, layer.down_proj  # as the loader finds them
    for e, (gate_up, down) in enumerate(zip(pieces_of(w13, layout), pieces_of(w2, layout),
                                            strict=True)):
        for half in (0, 1):
            gate_up_param.weight_loader(gate_up_param, expert_codes.narrowed(
                gate_up, 0, half * inter, inter), 2 * e + half)
        down_param.weight_loader(down_param, down, e)
    layer.__dict__.pop("after_loading")()
    return layer


def decoded(layer: FusedMoE) -> list[torch.Tensor]:
    return [torch.stack([codes.decoded(e, torch.float32) for e in range(codes.shape[0])])
            for codes in layer.stacked_experts()]


def reference(w13: torch.Tensor, w2: torch.Tensor) -> FusedMoE:
    layer = FusedMoE(w13.shape[0], 2, w13.shape[2], w2.shape[2], True)
    layer.gate_up_proj.data.copy_(w13)
    layer.down_proj.data.copy_(w2)
    return layer


@pytest.mark.parametrize("layout", [("float8", None), ("float8", 16), ("int", 4, 32),
                                    ("int", 8, 16)], ids=str)
def test_a_layer_stacks_its_experts_codes(layout):
    """The stacks hold each expert's codes as its pieces brought them (float8 values, or
    integers two or one a byte, scales and lows as float16), the torch path computes the
    weights they decode to, and two tensor-parallel ranks each hold their rows and groups."""
    x, w13, w2, _, _ = random_moe(5, 4, 2, 64, 64, torch.float32, "cpu")
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    layer = loaded_layer(w13, w2, layout)
    gate_up, down = layer.stacked_experts()
    float8 = layout[0] == "float8"
    assert layer.holds_stacked_codes and gate_up.codes.dtype == \
        (torch.float8_e4m3fn if float8 else torch.uint8)
    assert gate_up.codes.shape[2] == (32 if layout[1:] == (4, 32) else 64)  # two a byte
    held = decoded(layer)
    for stack, weight in zip(held, (w13, w2), strict=True):
        torch.testing.assert_close(stack, weight, rtol=0.07, atol=0.03)  # the codes' rounding
    torch.testing.assert_close(layer(x, logits), reference(*held)(x, logits))
    if layout == ("float8", 16) or layout == ("int", 8, 16):
        parts = [decoded(loaded_layer(w13, w2, layout, ParallelGroup(rank, 2)))
                 for rank in (0, 1)]
        torch.testing.assert_close(torch.cat([parts[0][0][:, :32], parts[1][0][:, :32],
                                              parts[0][0][:, 32:], parts[1][0][:, 32:]], 1),
                                   held[0])
        torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]], 2), held[1])


def test_nibbles_pack_two_halves_of_each_64_inputs():
    codes = torch.randint(0, 16, (3, 128), dtype=torch.uint8)
    packed = expert_codes.packed_nibbles(codes)
    assert packed.shape == (3, 64)
    assert torch.equal(packed[:, 5] & 0xF, codes[:, 5]) and torch.equal(packed[:, 5] >> 4,
                                                                      codes[:, 37])
    assert torch.equal(expert_codes.unpacked_nibbles(packed), codes)


@pytest.mark.parametrize("first", ["floats", "other-layout"])
def test_a_piece_that_does_not_fit_turns_the_layer_to_floats(first):
    """A float expert, or one of another layout: the layer holds floats, the experts that
    came as codes decoded into them, and says so (`stacks_refused`)."""
    _, w13, w2, _, _ = random_moe(1, 2, 2, 64, 32, torch.float32, "cpu")
    with deferred_linear_methods():
        layer = FusedMoE(2, 2, 64, 32, True)
    layer.hold_stacked_codes()
    param = layer.gate_up_proj  # as the loader finds it
    codes = integer_experts(w13[:1, :32], 4, 32)[0]
    param.weight_loader(param, codes, 0)
    odd = w13[0, 32:] if first == "floats" else integer_experts(w13[:1, 32:], 8, 16)[0]
    param.weight_loader(param, odd, 1)
    assert not layer.holds_stacked_codes and "after_loading" not in layer.__dict__
    assert layer.stacks_refused  # (the loader's one line counts such layers)
    assert layer.gate_up_proj.dtype == torch.float32 and not hasattr(layer, "gate_up_scale")
    torch.testing.assert_close(layer.gate_up_proj[0, :32], codes.decoded(), rtol=2e-3,
                               atol=1e-3)  # the stack's float16 scales
    expected = odd if first == "floats" else odd.decoded()
    assert torch.equal(layer.gate_up_proj[0, 32:], expected)


@pytest.mark.parametrize("packed", [False, True], ids=["pieces", "packed"])
@pytest.mark.parametrize("rank", [None, 0, 1])
def test_floats_quantized_to_float8_as_they_load(packed, rank):
    """`--quantization fp8` on a float checkpoint (hold_stacked_codes(float8=True)): each
    piece becomes float8 as it comes, each row's values and scale those of the dense layers'
    per-channel quantization of the floats in the model's dtype; every expert's floats in
    one tensor (transformers 5) alike; a tensor-parallel rank holds its rows, of the whole
    rows' scales."""
    from pagoda.layers.quantization.fp8 import quantize_per_channel
    _, w13, w2, _, _ = random_moe(1, 3, 2, 64, 32, torch.float32, "cpu")
    with deferred_linear_methods():
        layer = FusedMoE(3, 2, 64, 32, True,
                         SINGLE if rank is None else ParallelGroup(rank, 2))
    layer.hold_stacked_codes(float8=True)
    gate_up_param, down_param = layer.gate_up_proj, layer.down_proj
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # the model's, as the loader sets it
    try:
        if packed:
            gate_up_param.weight_loader(gate_up_param, w13)
            down_param.weight_loader(down_param, w2)
        else:
            for e in range(3):
                for half in (0, 1):
                    gate_up_param.weight_loader(gate_up_param, w13[e, half * 32:][:32],
                                                2 * e + half)
                down_param.weight_loader(down_param, w2[e], e)
    finally:
        torch.set_default_dtype(previous)
    layer.__dict__.pop("after_loading")()
    assert layer.holds_stacked_codes and not layer.stacks_refused
    rows = slice(None) if rank is None else slice(16 * rank, 16 * rank + 16)
    for kind, codes, weights in zip(("gate_up", "down"), layer.stacked_experts(), (w13, w2),
                                    strict=True):
        assert codes.scale.shape[2] == 1
        for e in range(3):
            values, scale = quantize_per_channel(weights[e].bfloat16())
            if kind == "gate_up":  # the rank's rows of the gate, then of the up
                keep = torch.cat([torch.arange(32)[rows], torch.arange(32, 64)[rows]])
                values, scale = values[keep], scale[keep]
            else:
                values = values[:, rows]
            assert torch.equal(codes.codes[e].view(torch.uint8), values.view(torch.uint8))
            assert torch.equal(codes.scale[e], scale)


def test_the_kernel_takes_what_it_can_step_through():
    floats = torch.zeros(4, 128)
    groups = integer_experts(floats[None], 4, 32)[0]
    assert expert_codes.takes(groups, 128)
    assert not expert_codes.takes(groups, 96)  # not a whole number of 64-input steps
    assert not expert_codes.takes(integer_experts(floats[None, :, :96], 8, 48)[0], 96)
    assert expert_codes.takes(integer_experts(floats[None, :, :96], 8, 96)[0], 96)  # a row
    assert not expert_codes.takes(floats, 128)


def kernel_errors() -> dict[str, list[float]]:
    """codes_kernel_error of every CODES_CASES case, float32 and float16 activations (run
    under the interpreter: this module's __main__)."""
    from pagoda.layers.tile_counters import nonzero_counters
    from tests.layers.moe_cases import codes_kernel_error
    errors = {str(dtype): [codes_kernel_error(*case[:6], dtype, "cpu", case[6])
                           for case in CODES_CASES] for dtype in (torch.float32, torch.float16)}
    return {**errors, "counters left non-zero": nonzero_counters()}


def test_codes_match_their_decoded_weights_under_the_interpreter():
    """The grouped GEMMs converting codes as they read them (float8 scaled once a row or a
    step at a time, integers times their scale plus their low, 4-bit ones two a byte), and
    float8 by float8 activations on tensor cores, against the torch path on the weights they
    decode to (and the activations as the path rounds them), float32 and float16; the
    split inputs' counters (and the top-k sums') reset by the programs that used them."""
    errors = interpreter_report("tests.layers.test_expert_codes", MARKER)
    assert errors["counters left non-zero"] == 0, errors
    assert max(errors["torch.float32"]) < 1e-5, errors
    assert max(errors["torch.float16"]) < 2e-3, errors  # the activations rounded to float16


def test_integer_codes_at_decode_launch_their_inputs_split(monkeypatch):
    """A one-token gate-up product of 4-bit codes launches split_count's splits (the grid's
    second dimension, its SPLITS constant) and a float workspace for their sums; floats
    launch one split (the launch recorded, not run: the interpreter cases above run it)."""
    from pagoda.layers.moe import triton_moe
    launches = []

    class Recorded:
        def __getitem__(self, grid):
            return lambda *args, **constants: launches.append((grid, args, constants))
    monkeypatch.setattr(triton_moe, "_moe_gemm_kernel", Recorded())
    _, w13, _, _, _ = random_moe(1, 8, 2, 256, 128, torch.float32, "cpu")
    blocks = triton_moe.ExpertBlocks(torch.tensor([0, 1] + [2] * 14, dtype=torch.int32),
                                     torch.tensor([3, -1], dtype=torch.int32),
                                     torch.tensor([16], dtype=torch.int32), 16)
    config = triton_moe.moe_config(1, 2, 8)
    x = torch.randn(1, 256)
    for experts in (stack_of(w13, ("int", 4, 32)), w13):
        triton_moe._grouped_gemm(x, experts, torch.empty(2, 128), blocks, None, 2, True,
                                 config)
    (codes_grid, codes_args, codes_constants), (floats_grid, _, floats_constants) = launches
    splits = codes_grid[1]
    assert splits > 1 and codes_constants["SPLITS"] == splits
    assert codes_args[11].shape == (splits, 2, 256)  # float32 sums of gate and up, a split
    assert floats_grid[1] == floats_constants["SPLITS"] == 1


def test_float8_experts_take_fp8_tensor_cores_from_pagoda_moe_fp8_from(monkeypatch):
    """PAGODA_MOE_FP8_FROM (unset: every call; "off": none): calls of at least that many
    tokens whose experts are float8 over whole 128-input steps."""
    from pagoda.layers.moe import triton_moe
    _, w13, w2, _, _ = random_moe(1, 2, 2, 128, 128, torch.float32, "cpu")
    float8 = [stack_of(w, ("float8", None)) for w in (w13, w2)]
    for given, expected in ((None, 1), ("off", None), ("256", 256)):
        if given is None:
            monkeypatch.delenv("PAGODA_MOE_FP8_FROM", raising=False)
        else:
            monkeypatch.setenv("PAGODA_MOE_FP8_FROM", given)
        assert triton_moe._fp8_tensor_cores_from() == expected
    monkeypatch.setattr(triton_moe, "FP8_TENSOR_CORES_FROM", 1)
    assert triton_moe.takes_fp8_tensor_cores(1, *float8)
    monkeypatch.setattr(triton_moe, "FP8_TENSOR_CORES_FROM", None)
    assert not triton_moe.takes_fp8_tensor_cores(4096, *float8)
    monkeypatch.setattr(triton_moe, "FP8_TENSOR_CORES_FROM", 256)
    assert triton_moe.takes_fp8_tensor_cores(256, *float8)
    assert not triton_moe.takes_fp8_tensor_cores(255, *float8)
    assert not triton_moe.takes_fp8_tensor_cores(4096, w13, w2)  # floats
    integers = [stack_of(w, ("int", 4, 32)) for w in (w13, w2)]
    assert not triton_moe.takes_fp8_tensor_cores(4096, *integers)
    _, w13, w2, _, _ = random_moe(1, 2, 2, 64, 64, torch.float32, "cpu")
    assert not triton_moe.takes_fp8_tensor_cores(4096, *(stack_of(w, ("float8", None))
                                                         for w in (w13, w2)))  # 64 inputs


def test_a_rank_s_inputs_keep_whole_groups():
    """A tensor-parallel rank's slice of an expert's inputs takes its groups' scales; a slice
    that cuts a group of several is refused (the layer then holds floats)."""
    piece = integer_experts(torch.randn(1, 4, 128), 8, 32)[0]
    half = expert_codes.narrowed(piece, 1, 64, 64)
    assert half.group == 32 and torch.equal(half.scale, piece.scale[:, 2:])
    assert torch.equal(half.decoded(), piece.decoded()[:, 64:])
    assert expert_codes.narrowed(piece, 1, 48, 48) is None
    row = integer_experts(torch.randn(1, 4, 128), 8, 128)[0]  # one scale a row
    assert expert_codes.narrowed(row, 1, 32, 96).group == 96


# (CODES, BITS, inputs a group (None: one scale a row), codes' type, scales' type) of the
# kernel's paths
COMPILED = [(1, 8, None, "*fp8e4nv", "*fp32"), (1, 8, 128, "*fp8e4nv", "*fp32"),
            (2, 4, 128, "*u8", "*fp16"), (2, 4, 32, "*u8", "*fp16"), (2, 8, 32, "*u8", "*fp16"),
            (3, 8, None, "*fp8e4nv", "*fp32"), (3, 8, 128, "*fp8e4nv", "*fp32")]


@pytest.mark.parametrize(("codes", "bits", "group", "stored", "scales"), COMPILED)
@pytest.mark.parametrize("tokens", [1, 1024, 4096])
@pytest.mark.parametrize("gated", [True, False], ids=["gate_up", "down"])
def test_each_codes_path_compiles_for_hopper_with_bf16_activations(codes, bits, group, stored,
                                                                   scales, tokens, gated):
    """Qwen3-30B-A3B's products (gate-up: 2048 inputs, 768 outputs a half; down: 768 inputs,
    2048 outputs) at the tiles moe_config and launch_tile give 1, 1,024 and 4,096 tokens:
    tensor-core products (Hopper's wgmma from 64 rows a block; float8 by float8 on the FP8
    tensor-core path), and no register spills: integer codes, and float8 ones in blocks of
    128 inputs, spilled at the 128-row tile (the int4 down product 155 local loads and stores
    a thread, and the layer ran 5x slower than bf16 at 4,096 tokens on an H100) until they
    were decoded to weights before each product there."""
    from pagoda.layers.moe.triton_moe import (
        _moe_gemm_kernel,
        launch_tile,
        moe_config,
        split_count,
    )
    config = moe_config(tokens, 8, 128)
    n, k = (768, 2048) if gated else (2048, 768)
    groups = 1 if group is None else k // group
    block_n, block_k = launch_tile(config, gated, codes, bits, groups, k)
    # the splits an H200 (132 multiprocessors) gives the 8 experts one token hits
    splits = split_count(codes, config, min(8 * tokens, 128) * (n // block_n), k, block_k, 132)
    assert (splits > 1) == (codes == 2 and tokens == 1)
    pointers = {"a_ptr": "*fp8e4nv" if codes == 3 else "*bf16", "a_scale_ptr": "*fp32",
                "b_ptr": stored, "b_scale_ptr": scales,
                "b_low_ptr": scales if codes == 2 else "*bf16", "c_ptr": "*bf16",
                "weights_ptr": "*fp32", "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32",
                "sum_ptr": "*bf16", "count_ptr": "*i32", "partial_ptr": "*fp32",
                "split_count_ptr": "*i32", "num_assignments": "i32",
                "num_blocks": "i32"}
    asm = compile_for_cuda(_moe_gemm_kernel, pointers, {
        "N": n, "K": k, "A_ROW_DIV": 8 if gated else 1, "GATED": gated,
        "MUL_WEIGHT": not gated, "SUM_TOP_K": 0, "SUM_TOKENS": 1, "CODES": codes,
        "BITS": bits, "GROUPS": groups, "E4M3_BYTES": False, "BLOCK_M": config.block_m,
        "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLITS": splits, "DOT_PRECISION": "tf32",
        "DOT": 2, "PDL": True},
        num_warps=config.num_warps, num_stages=config.num_stages)
    assert ("wgmma" if config.block_m >= 64 else "mma.sync") in asm["ptx"]
    if codes == 3 and config.block_m >= 64:  # float8 products on Hopper's FP8 tensor cores
        assert ".e4m3.e4m3" in asm["ptx"]
    assert not re.search(r"\b(LDL|STL)\b", cuobjdump(asm["cubin"]))


@pytest.mark.parametrize("layout", [(4, 32), (8, 16)])
def test_floats_quantized_to_integer_codes(layout):
    """Floats quantized to integer codes (moe_bench's codes of the bf16 layer's weights):
    each group's codes span its minimum to its maximum, within half a step of the floats."""
    _, w13, w2, _, _ = random_moe(1, 3, 2, 64, 64, torch.float32, "cpu")
    layer = reference(w13, w2)
    layer.quantize_experts(layout)
    gate_up, down = layer.stacked_experts()
    assert layer.holds_stacked_codes and (gate_up.bits, gate_up.group) == layout
    for codes, weight in ((gate_up, w13), (down, w2)):
        step = codes.scale.float().amax()
        decoded = torch.stack([codes.decoded(e, torch.float32) for e in range(3)])
        assert (decoded - weight).abs().max() <= 0.51 * step + 1e-3  # float16 scales


@pytest.mark.parametrize("make", [random_float8_rows,
                                  partial(expert_codes.random_group_codes, 4, 32)],
                         ids=["float8", "int4-g32"])
def test_dummy_experts_stack_random_codes_and_never_floats(make):
    """Dummy experts of a quantized config on a GPU (hold_dummy_codes, stacked): each
    expert's stacks hold the codes its random pieces were made with, piece by piece through
    the loaders; the layer never holds its experts as floats."""
    with deferred_linear_methods():
        layer = FusedMoE(3, 2, 128, 64, True)
    layer.hold_dummy_codes(make, stacked=True)
    assert layer.gate_up_proj.numel() == 0  # a placeholder, not floats
    assert layer.init_dummy(torch.Generator().manual_seed(5), 0.02)
    layer.__dict__.pop("after_loading")()
    replay = torch.Generator().manual_seed(5)
    gate_up, down = layer.stacked_experts()
    assert layer.holds_stacked_codes and not layer.stacks_refused
    for e in range(3):
        gate, up, expert_down = (make(rows, columns, replay, 0.02).decoded()
                                 for rows, columns in ((64, 128), (64, 128), (128, 64)))
        torch.testing.assert_close(gate_up.decoded(e, torch.float32), torch.cat([gate, up]),
                                   rtol=1e-3, atol=1e-6)  # float16 scales in the stacks
        torch.testing.assert_close(down.decoded(e, torch.float32), expert_down,
                                   rtol=1e-3, atol=1e-6)


if __name__ == "__main__":
    print(MARKER + json.dumps(kernel_errors()))
