"""The GPU form of quantized weights (codes with a scale and a min per group) and its Triton
kernels: the packings round-trip, the torch path is the formula, and the kernels equal the
dense product of the decoded weights under Triton's CPU interpreter (TRITON_INTERPRET=1
must be set before triton is imported, hence a subprocess) for every code width, group size,
4-bit layout (planes, and halves for shapes planes do not fit) and token count class they
have a path for; they compile for sm_90 with no GPU. Real sizes run on the GPU in
tests/gpu/test_quantized_gpu.py."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from torch.nn import functional as F

from pagoda.layers.quantization.group_gemm import (
    FP8,
    PLANE_STEP,
    GroupQuantWeight,
    pack_int4_halves,
    pack_int4_planes,
    supports,
    takes_planes,
    unpack_int4_halves,
    unpack_int4_planes,
)
from pagoda.layers.tile_counters import nonzero_counters
from tests.utils import compile_for_cuda, interpreter_report

MARKER = "GROUP-GEMM-ERRORS "
# name -> (tokens, outputs, inputs, group, bits, with a min (or "zero points": mins that are
# -z * scale for integers z; "centred": codes whose mins are all -2^(bits - 1) * scale,
# GGUF Q8_0's and Q4_0's, held without them), float8 codes). 4-bit codes run
# in planes where they fit (inputs a multiple of 128, groups of 32): up to 32 tokens in
# tiles of 8-32 tokens with split inputs, more in larger tiles (split up to 64 tokens); each
# such case runs again in halves (PLANE_CASES' "-halves"). Halves and 8-bit codes: up to 32
# tokens run in the few-token kernel (1-12 tokens: split inputs, added in the kernel), more
# in the larger one (33-64 tokens: split inputs there too)
CASES = {
    "int4-planes-g256-tokens-40": (40, 200, 256, 256, 4, True, False),
    "int4-planes-g128-tokens-100": (100, 130, 384, 128, 4, False, False),
    "int4-planes-g64-tokens-20": (20, 72, 2048, 64, 4, True, False),
    "int4-planes-g96-one-token": (1, 40, 384, 96, 4, True, False),  # steps cross groups
    "int4-planes-g192-tokens-3": (3, 40, 384, 192, 4, False, False),
    # integer zero points (AWQ, GPTQ): the codes minus them in the product, scaled sums
    "int4-planes-zero-points-g128-one-token": (1, 200, 1024, 128, 4, "zero points", False),
    "int4-planes-zero-points-g32-tokens-12": (12, 72, 1024, 32, 4, "zero points", False),
    "int4-planes-zero-points-g256-tokens-40": (40, 130, 512, 256, 4, "zero points", False),
    "int4-planes-zero-points-g96-tokens-3": (3, 40, 384, 96, 4, "zero points", False),
    # halves only: inputs not a multiple of 128 (one-token GEMV for groups of 64)
    "int4-halves-g64-one-token": (1, 200, 1088, 64, 4, True, False),
    "int4-halves-g32-tokens-5": (5, 40, 576, 32, 4, True, False),
    "int4-g32-split": (1, 96, 1024, 32, 4, True, False),
    # one token of 4-bit codes in groups of a multiple of 64: in planes here, and in halves
    # (their "-halves" runs) the one-token kernel (splits of whole groups, of a group's part,
    # a group a row; outputs not a multiple of 4 fall back to the few-token kernel)
    "int4-g128-one-token-split": (1, 200, 2048, 128, 4, False, False),
    "int4-g256-one-token": (1, 132, 768, 256, 4, True, False),
    "int4-g64-one-token-many-words": (1, 1032, 1024, 64, 4, True, False),
    "int4-per-row-one-token": (1, 8, 640, 640, 4, False, False),
    "int4-one-token-outputs-not-4s": (1, 98, 256, 128, 4, True, False),
    # one token of 8-bit codes a byte each: the byte GEMV (outputs a multiple of 4), else
    # the few-token kernel
    "int8-g16-one-token-split": (1, 200, 2048, 16, 8, True, False),
    "int8-g32-centred-one-token-many-words": (1, 1032, 1024, 32, 8, "centred", False),
    "int8-one-token-outputs-not-4s": (1, 98, 256, 32, 8, True, False),
    "int4-g128-nomin": (7, 80, 256, 128, 4, False, False),
    "int4-g64-large": (80, 48, 128, 64, 4, True, False),
    "int4-g32-tiles-split": (12, 40, 1024, 32, 4, True, False),
    "int4-g32-many-split": (40, 96, 1024, 32, 4, True, False),
    "int8-g16": (3, 40, 128, 16, 8, True, False),
    "int8-g32-tokens-32": (32, 72, 256, 32, 8, True, False),
    "int8-g32-large": (70, 40, 96, 32, 8, True, False),
    "int8-g32-centred-tokens-5": (5, 40, 256, 32, 8, "centred", False),
    "int4-planes-g32-centred-one-token": (1, 72, 1024, 32, 4, "centred", False),
    "int4-planes-g32-centred-tokens-12": (12, 40, 512, 32, 4, "centred", False),
    "int4-planes-g32-centred-tokens-40": (40, 40, 256, 32, 4, "centred", False),
    "int8-g32-centred-split": (1, 96, 2048, 32, 8, "centred", False),
    "int8-g32-centred-large": (70, 40, 256, 32, 8, "centred", False),
    # 8-bit GPTQ / compressed-tensors W8A16: groups of 128 (a step a group)
    "int8-g128-split": (1, 48, 1024, 128, 8, True, False),
    "int8-g128-tokens-20": (20, 40, 512, 128, 8, True, False),
    "int8-g128-large": (70, 40, 256, 128, 8, True, False),
    # compressed-tensors int8 weights with a scale per row (W8A8 int8, run weight-only)
    "int8-per-row-split": (1, 48, 1024, 1024, 8, True, False),
    "fp8-per-row": (5, 40, 256, 256, 8, False, True),
    "fp8-per-row-split": (1, 72, 2048, 2048, 8, False, True),
    "fp8-per-row-tokens-20": (20, 72, 256, 256, 8, False, True),
    "fp8-per-row-inputs-not-128s": (3, 40, 320, 320, 8, False, True),  # steps of 64
    "fp8-blocks": (5, 40, 256, 128, 8, False, True),
    "fp8-blocks-many": (48, 40, 256, 128, 8, False, True),
    "fp8-one-token": (1, 40, 256, 128, 8, False, True),
}


def random_weight(outputs: int, inputs: int, group: int, bits: int, with_min: bool,
                  float8: bool, generator: torch.Generator, planes: bool | None = None,
                  step_sums: bool = True) -> GroupQuantWeight:
    if float8:
        codes = (torch.randn(outputs, inputs, generator=generator) * 100).clamp(-448, 448)
        codes = codes.to(FP8)
    else:
        codes = torch.randint(0, 2 ** bits, (outputs, inputs), generator=generator)
    scale = torch.rand(outputs, inputs // group, generator=generator) * 0.01 + 0.001
    if with_min == "zero points":  # as checkpoints store them: float16 scales
        scale = scale.half().float()
        zeros = torch.randint(0, 2 ** bits, scale.shape, generator=generator)
        return GroupQuantWeight(codes, scale, -zeros * scale, group, bits, planes,
                                zero_points=True, step_sums=step_sums)
    if with_min == "centred":
        weight = GroupQuantWeight(codes, scale, -2 ** (bits - 1) * scale, group, bits, planes,
                                  step_sums=step_sums)
        takes_it = (not weight.planes if bits == 8
                    else not weight.step_sums and not weight.has_one_token_kernel)
        assert (weight.shared_zero == 2 ** (bits - 1)) == takes_it
        assert weight.holds_mins != takes_it
        return weight
    low = -torch.rand(outputs, inputs // group, generator=generator) * 0.05 if with_min else None
    return GroupQuantWeight(codes, scale, low, group, bits, planes, step_sums=step_sums)


# the 4-bit cases that run in planes (from step words: a step's or a plane's sums scaled),
# each run again in halves and in planes without the words (scaled weight by weight)
PLANE_CASES = [name for name, (_, _, inputs, group, bits, *_) in CASES.items()
               if takes_planes(inputs, group, bits)]


# 8-bit codes of at most 7 bits (GGUF Q6_K's 0..63 here) in byte planes: name -> (tokens,
# outputs, inputs, group, with a min (or "zero points", or "shared zero": Q6_K's 32 for
# every group, its scales held in pairs)); each run from step words or scale pairs (a
# plane's or a step's sums scaled; in the larger tiles weight by weight) and again weight
# by weight from their own arrays ("-weight-by-weight")
BYTE_PLANE_CASES = {
    "bytes-g16-one-token": (1, 72, 512, 16, True),
    "bytes-g16-tokens-12-split": (12, 40, 1024, 16, True),
    "bytes-g32-tokens-20": (20, 48, 256, 32, True),  # a step a group: a step's sums scaled
    "bytes-g16-tokens-40": (40, 40, 256, 16, True),  # the larger tiles
    "bytes-g16-zero-points-tokens-3": (3, 40, 256, 16, "zero points"),
    "bytes-g64-tokens-5": (5, 40, 384, 64, True),  # two steps a group
    "bytes-g16-nomin-tokens-2": (2, 40, 256, 16, False),
    "bytes-g16-shared-zero-one-token": (1, 72, 512, 16, "shared zero"),
    "bytes-g16-shared-zero-tokens-12-split": (12, 40, 1024, 16, "shared zero"),
    "bytes-g16-shared-zero-tokens-40": (40, 40, 256, 16, "shared zero"),
}


def byte_plane_weight(outputs: int, inputs: int, group: int, with_min: bool | str,
                      generator: torch.Generator, step_sums: bool) -> GroupQuantWeight:
    codes = torch.randint(0, 64, (outputs, inputs), generator=generator)
    scale = (torch.rand(outputs, inputs // group, generator=generator) * 0.01 + 0.001)
    if with_min == "zero points":
        scale = scale.half().float()
        low = -torch.randint(0, 64, scale.shape, generator=generator) * scale
    elif with_min == "shared zero":
        low = -32 * scale
    else:
        low = -torch.rand(scale.shape, generator=generator) * 0.05 if with_min else None
    weight = GroupQuantWeight(codes, scale, low, group, 8, planes=True,
                              zero_points=with_min == "zero points", step_sums=step_sums)
    assert weight.planes and weight.codes.dtype == torch.int16
    assert (weight.shared_zero == 32) == (with_min == "shared zero" and step_sums)
    return weight


def byte_plane_errors(generator: torch.Generator) -> dict[str, float]:
    from pagoda.layers.quantization.triton_group_gemm import group_gemm
    errors = {}
    for name, (tokens, outputs, inputs, group, with_min) in BYTE_PLANE_CASES.items():
        for step_sums, suffix in ((True, ""), (False, "-weight-by-weight")):
            weight = byte_plane_weight(outputs, inputs, group, with_min, generator, step_sums)
            x = torch.randn(tokens, inputs, generator=generator)
            expected = F.linear(x, weight.dequantize(torch.float32))
            errors[name + suffix] = ((group_gemm(x, weight) - expected).abs()
                                     / (1 + expected.abs())).max().item()
    # float16 activations: the codes OR-ed into the mantissa of 1024 (bfloat16's 128 is for a
    # GPU: the interpreter has no bfloat16 constants)
    for with_min, name in ((True, "bytes-g16-tokens-3-fp16"),
                           ("shared zero", "bytes-g16-shared-zero-tokens-3-fp16")):
        weight = byte_plane_weight(40, 512, 16, with_min, generator, True)
        x = torch.randn(3, 512, generator=generator).half()
        expected = x.float() @ weight.dequantize(torch.float32).t()
        errors[name] = ((group_gemm(x, weight).float() - expected).norm()
                        / expected.norm()).item()
    return errors


# products written into columns of a wider output (group_gemm's `out`): the planes,
# few-token and one-token kernels store rows that far apart, the other paths copy into them
COLUMN_CASES = ["int4-planes-g96-one-token", "int4-planes-g128-tokens-100",
                "int4-planes-zero-points-g32-tokens-12", "fp8-per-row-split", "int8-g16",
                "int8-g32-large", "int4-g128-one-token-split-halves",
                "int8-g16-one-token-split", "bytes-g16-tokens-12-split"]


def column_errors(generator: torch.Generator) -> dict[str, float]:
    """Each COLUMN_CASES product stored at columns 8.. of an output 24 columns wider than
    it, filled with NaN: its error against the dense product, or inf where a column
    outside its own was written."""
    from pagoda.layers.quantization.triton_group_gemm import group_gemm
    errors = {}
    for name in COLUMN_CASES:
        if name in BYTE_PLANE_CASES:
            tokens, outputs, inputs, group, with_min = BYTE_PLANE_CASES[name]
            weight = byte_plane_weight(outputs, inputs, group, with_min, generator, True)
        else:
            tokens, outputs, inputs, *layout = CASES[name.removesuffix("-halves")]
            weight = random_weight(outputs, inputs, *layout, generator,
                                   planes=False if name.endswith("-halves") else None)
        x = torch.randn(tokens, inputs, generator=generator)
        expected = F.linear(x, weight.dequantize(torch.float32))
        wide = torch.full((tokens, outputs + 24), float("nan"))
        returned = group_gemm(x, weight, out=wide[:, 8:8 + outputs])
        outside = torch.cat([wide[:, :8], wide[:, 8 + outputs:]], dim=1)
        written = returned.data_ptr() == wide[:, 8:].data_ptr() and outside.isnan().all()
        errors[f"{name}-columns"] = ((wide[:, 8:8 + outputs] - expected).abs()
                                     / (1 + expected.abs())).max().item() if written \
            else float("inf")
    return errors


# GGUF k-quants with their scales held factored (random blocks, 512 inputs: two
# super-blocks): name -> (type, tokens, step sums, gated). Step sums scale a plane's sums
# (Q4_K's nibble planes, the byte planes of groups of 16) or a step's (Q5_K); up to 32
# tokens; more, and Q4_K without step sums, scale weight by weight; a long call on byte
# planes decodes the weights first
FACTORED_CASES = {
    "factored-q4_k-one-token": ("Q4_K", 1, None, 0),
    "factored-q4_k-tokens-12": ("Q4_K", 12, None, 0),
    "factored-q4_k-tokens-40": ("Q4_K", 40, None, 0),
    "factored-q4_k-weight-by-weight-tokens-5": ("Q4_K", 5, False, 0),
    "factored-q4_k-gated-tokens-3": ("Q4_K", 3, None, 1),
    "factored-q6_k-one-token": ("Q6_K", 1, None, 0),
    "factored-q6_k-tokens-40": ("Q6_K", 40, None, 0),
    "factored-q6_k-decoded-first-tokens-300": ("Q6_K", 300, None, 0),  # (from 256 tokens)
    "factored-q5_k-tokens-3": ("Q5_K", 3, None, 0),
    "factored-q2_k-tokens-12": ("Q2_K", 12, None, 0),
    "factored-q3_k-one-token": ("Q3_K", 1, None, 0),
}
FACTORED_TOLERANCE = 1e-5  # of the output's norm (the random blocks' weights reach 1e3)


def factored_weight(type_name: str, outputs: int, inputs: int, seed: int,
                    step_sums: bool | None = None) -> GroupQuantWeight:
    """Random GGUF blocks of `type_name` as the GPU holds them: codes in planes, the
    scales factored."""
    from pagoda.layers.quantization.gguf_blocks import INT4_FORMATS, byte_groups, scale_factors
    from tests.layers.quantization.test_gguf_blocks import random_rows
    rows = torch.from_numpy(random_rows(type_name, outputs, inputs, seed))
    codes, scale, low, group = byte_groups(rows, type_name)
    bits = 4 if type_name in INT4_FORMATS else 8
    return GroupQuantWeight(codes, scale, low, group, bits, step_sums=step_sums,
                            factors=scale_factors(rows, type_name))


def factored_errors(generator: torch.Generator) -> dict[str, float]:
    """The kernels on factored scales against the dense product (the gated case against
    the activation after it): |kernel - dense| / |dense| over the whole output."""
    from pagoda.layers.activation import SiluAndMul
    from pagoda.layers.quantization import group_gemm as held
    from pagoda.layers.quantization.triton_group_gemm import group_gemm
    held.FACTORED_SCALES_IN_PLANES = True  # (this subprocess's: PAGODA_PLANE_FACTORED_SCALES=1)
    errors = {}
    for seed, (name, (type_name, tokens, step_sums, gated)) in enumerate(
            FACTORED_CASES.items()):
        weight = factored_weight(type_name, 40, 512, seed, step_sums)
        assert weight.sub_words is not None
        x = torch.randn(tokens, 512, generator=generator)
        expected = F.linear(x, weight.dequantize(torch.float32))
        if gated:
            expected = SiluAndMul().forward_native(expected)
        got = group_gemm(x, weight, gated=gated)
        errors[name] = ((got - expected).norm() / expected.norm()).item()
    return errors


# cases whose gate-up product applies the gated activation to its outputs (GATED_KINDS by
# name: 1 SiLU, 2 GELU's tanh form), tiles of gates and their ups partly past the outputs:
# planes of 4-bit codes (a step's sums, a plane's, zero points), byte planes, the few-token
# kernel's 4-bit halves, 8-bit codes and float8 rows, split inputs or not
GATED_CASES = {"int4-planes-zero-points-g128-one-token": 1, "int4-planes-g64-tokens-20": 2,
               "int4-g32-tiles-split": 1, "int4-halves-g32-tokens-5": 2, "int8-g16": 1,
               "fp8-per-row-split": 2, "fp8-blocks": 1}
GATED_BYTE_PLANE_CASES = {"bytes-g16-tokens-12-split": 2, "bytes-g32-tokens-20": 1,
                          "bytes-g16-shared-zero-one-token": 1}
# one token on the one-token GEMV (4-bit halves, bytes a code, the last tile's gate words
# partly past the outputs): its tile of words half gates', half their ups'
GATED_GEMV_CASES = {"int4-g128-one-token-split": 1, "int8-g16-one-token-split": 2,
                    "int8-g32-centred-one-token-many-words": 1}
# their error: act(gate) up of a gate and an up each within the GEMV's error of its plain
# outputs (its offsets cost up to 8 bits of float32's 24), which the product adds up
GATED_GEMV_TOLERANCE = 5e-4


def gated_errors(generator: torch.Generator) -> dict[str, float]:
    """The gate-up product applying the gated activation to its outputs against the dense
    product and the activation applied after it (torch)."""
    from pagoda.layers.activation import GeluTanhAndMul, SiluAndMul
    from pagoda.layers.quantization.triton_group_gemm import group_gemm
    activations = {1: SiluAndMul(), 2: GeluTanhAndMul()}
    weights = {name: (CASES[name][0], random_weight(*CASES[name][1:], generator), kind)
               for name, kind in GATED_CASES.items()}
    for name, kind in GATED_BYTE_PLANE_CASES.items():
        tokens, outputs, inputs, group, with_min = BYTE_PLANE_CASES[name]
        weights[name] = (tokens, byte_plane_weight(outputs, inputs, group, with_min, generator,
                                                   True), kind)
    for name, kind in GATED_GEMV_CASES.items():
        weight = random_weight(*CASES[name][1:], generator, planes=False)
        assert weight.has_one_token_kernel
        weights[name] = (CASES[name][0], weight, kind)
    errors = {}
    for name, (tokens, weight, kind) in weights.items():
        x = torch.randn(tokens, weight.in_features, generator=generator)
        expected = activations[kind].forward_native(
            F.linear(x, weight.dequantize(torch.float32)))
        got = group_gemm(x, weight, gated=kind)
        assert got.shape == expected.shape
        errors[f"{name}-gated"] = ((got - expected).abs() / (1 + expected.abs())).max().item()
    return errors


# a product whose outputs feed an RMSNorm, and the next product, which finishes it: name ->
# (tokens, the first product's CASES layout or byte planes' (outputs, inputs, group, with a
# min), the second's, its gated activation). The outputs' width is the second's inputs:
# planes, few-token, byte-plane and one-token GEMV ("halves": 4-bit codes so) kernels on
# either side, split inputs and several token tiles
NORMED_CASES = {
    "normed-int4-planes-into-int4-g32": (3, (256, 1024, 128, 4, "zero points", False),
                                         (96, 256, 32, 4, True, False), 0),
    "normed-int8-into-fp8-rows-gated": (5, (128, 2048, 16, 8, True, False),
                                        (144, 128, 128, 8, False, True), 1),
    "normed-fp8-rows-into-int4-planes-gated": (20, (256, 2048, 2048, 8, False, True),
                                               (160, 256, 64, 4, True, False), 2),
    "normed-bytes-into-int8-g128": (12, ("bytes", 128, 1024, 16, True),
                                    (40, 128, 128, 8, True, False), 0),
    "normed-int8-gemv-into-int4-gemv-gated": (1, (256, 2048, 16, 8, True, False),
                                              ("halves", 192, 256, 128, 4, False, False), 1),
    "normed-int4-gemv-into-int8-gemv": (1, ("halves", 128, 1024, 128, 4, True, False),
                                        (200, 128, 32, 8, "centred", False), 0),
}
NORMED_TOLERANCE = 1e-4  # float32 sums of squares and products added in other orders


def normed_errors(generator: torch.Generator) -> dict[str, float]:
    """A product that leaves the RMSNorm of its outputs plus the residual for the next
    product to finish (group_gemm_then_norm, then group_gemm's `normed`) against the dense
    products with the norm between them (torch); and the new residual it stores."""
    from pagoda.layers.activation import GeluTanhAndMul, SiluAndMul
    from pagoda.layers.quantization.triton_group_gemm import group_gemm, group_gemm_then_norm

    def weight(layout: tuple) -> GroupQuantWeight:
        if layout[0] == "bytes":
            return byte_plane_weight(*layout[1:], generator, True)
        if layout[0] == "halves":
            return random_weight(*layout[1:], generator, planes=False)
        return random_weight(*layout, generator)
    activations = {1: SiluAndMul(), 2: GeluTanhAndMul()}
    eps, errors = 1e-5, {}
    for name, (tokens, first_layout, second_layout, gated) in NORMED_CASES.items():
        first, second = weight(first_layout), weight(second_layout)
        x = torch.randn(tokens, first.in_features, generator=generator)
        residual = torch.randn(tokens, first.out_features, generator=generator)
        norm_weight = torch.rand(first.out_features, generator=generator) + 0.5
        new_residual = F.linear(x, first.dequantize(torch.float32)) + residual
        normed = new_residual * torch.rsqrt(new_residual.pow(2).mean(-1, keepdim=True) + eps)
        expected = F.linear(normed * norm_weight, second.dequantize(torch.float32))
        if gated:
            expected = activations[gated].forward_native(expected)
        values, got_residual, squares = group_gemm_then_norm(x, first, residual, norm_weight)
        got = group_gemm(values, second, gated, normed=squares, norm_eps=eps)
        errors[name] = ((got - expected).abs() / (1 + expected.abs())).max().item()
        errors[f"{name}-residual"] = ((got_residual - new_residual).abs()
                                      / (1 + new_residual.abs())).max().item()
    return errors


def kernel_errors() -> dict[str, float]:
    """Max |kernel - dense| / (1 + |dense|) per case, float32 activations."""
    from pagoda.layers.quantization.triton_group_gemm import group_gemm
    generator = torch.Generator().manual_seed(0)
    errors = {}
    for name, (tokens, outputs, inputs, *layout) in CASES.items():
        weight = random_weight(outputs, inputs, *layout, generator)
        x = torch.randn(tokens, inputs, generator=generator)
        expected = F.linear(x, weight.dequantize(torch.float32))
        errors[name] = ((group_gemm(x, weight) - expected).abs()
                        / (1 + expected.abs())).max().item()
    for name in PLANE_CASES:
        tokens, outputs, inputs, *layout = CASES[name]
        weight = random_weight(outputs, inputs, *layout, generator, planes=False)
        x = torch.randn(tokens, inputs, generator=generator)
        expected = F.linear(x, weight.dequantize(torch.float32))
        errors[f"{name}-halves"] = ((group_gemm(x, weight) - expected).abs()
                                    / (1 + expected.abs())).max().item()
    for name in PLANE_CASES:  # planes without their step words: scaled weight by weight
        tokens, outputs, inputs, *layout = CASES[name]
        weight = random_weight(outputs, inputs, *layout, generator, step_sums=False)
        assert weight.step_words is None
        x = torch.randn(tokens, inputs, generator=generator)
        expected = F.linear(x, weight.dequantize(torch.float32))
        errors[f"{name}-weight-by-weight"] = ((group_gemm(x, weight) - expected).abs()
                                              / (1 + expected.abs())).max().item()
    for name in HALF_CASES:  # float16 activations: the decode without conversions
        tokens, outputs, inputs, *layout = CASES[name]
        weight = random_weight(outputs, inputs, *layout, generator,
                               step_sums=name not in HALF_WEIGHT_BY_WEIGHT)
        x = torch.randn(tokens, inputs, generator=generator).half()
        expected = x.float() @ weight.dequantize(torch.float32).t()
        errors[f"{name}-fp16"] = ((group_gemm(x, weight).float() - expected).norm()
                                  / expected.norm()).item()
    errors.update(float8_byte_errors(generator))
    errors.update(byte_plane_errors(generator))
    errors.update(gated_errors(generator))
    errors.update(factored_errors(generator))
    errors.update(normed_errors(generator))
    errors.update(column_errors(generator))
    errors["fp8-rows"] = fp8_rows_error(generator)
    errors["split-counters-left-nonzero"] = float(nonzero_counters())
    return errors


def float8_byte_errors(generator: torch.Generator) -> dict[str, float]:
    """The float8 cases again with the weights reaching the kernels as their bytes, as on a
    GPU before compute capability 8.9 (the capability query answers an A100's: there is no
    such GPU here), plus weights holding every finite E4M3 value (subnormals, both zeros)."""
    from pagoda.layers.quantization import triton_group_gemm
    from pagoda.layers.quantization.triton_group_gemm import group_gemm
    every_value = torch.arange(256, dtype=torch.uint8)
    every_value[(every_value & 0x7F) == 0x7F] = 0  # the two NaN bytes
    every_value = every_value.view(FP8)
    real_query = triton_group_gemm._capability
    triton_group_gemm._capability = lambda index: (8, 0)
    errors = {}
    try:
        for name in [*FLOAT8_CASES, "fp8-every-value", "fp8-every-value-fp16"]:
            tokens, outputs, inputs, *layout = CASES.get(name, EVERY_VALUE_CASE)
            weight = random_weight(outputs, inputs, *layout, generator)
            if name.startswith("fp8-every-value"):
                weight.codes.copy_(torch.stack([every_value.roll(7 * row)
                                                for row in range(outputs)]))
            x = torch.randn(tokens, inputs, generator=generator)
            if name.endswith("fp16"):
                x = x.half()
            expected = x.float() @ weight.dequantize(torch.float32).t()
            errors[f"{name}-bytes"] = ((group_gemm(x, weight).float() - expected).abs()
                                       / (1 + expected.abs())).max().item()
    finally:
        triton_group_gemm._capability = real_query
    return errors


# cases run again with float16 activations (relative error of the whole product, float16
# output). bfloat16 activations cannot run under the interpreter (its bfloat16 arithmetic is
# wrong): they run on the GPU.
HALF_CASES = ("int4-g32-split", "int4-g128-one-token-split", "int4-g128-nomin",
              "int4-g64-large", "int4-g32-tiles-split", "int4-planes-g128-tokens-100",
              "int4-halves-g32-tokens-5", "int8-g16", "fp8-per-row", "fp8-blocks",
              "fp8-blocks-many", "int4-planes-zero-points-g32-tokens-12",
              "int4-planes-zero-points-g128-one-token", "int8-g32-centred-tokens-5")
# of them, those run in planes without step words (GGUF Q4_0's mins taken from its scales)
HALF_WEIGHT_BY_WEIGHT = ("int4-planes-g32-centred-tokens-12",)
HALF_CASES += HALF_WEIGHT_BY_WEIGHT
HALF_TOLERANCE = 1e-3
FLOAT8_CASES = [name for name, case in CASES.items() if case[-1]]
# float8 weights, a scale per row, each row holding all 256 bytes but the NaNs (as CASES)
EVERY_VALUE_CASE = (3, 40, 256, 256, 8, False, True)


def fp8_rows_error(generator: torch.Generator) -> float:
    """The one-launch per-token FP8 quantization's scales against torch's (the interpreter
    rounds float32 to float8 unlike the GPU: the values are compared on the GPU, in
    tests/gpu/test_quantized_gpu.py)."""
    from pagoda.layers.quantization.fp8 import FP8_MAX
    from pagoda.layers.quantization.triton_group_gemm import fp8_rows
    x = torch.randn(5, 300, generator=generator) * 3
    _, scale = fp8_rows(x, FP8_MAX)
    return (scale - x.abs().amax(dim=1, keepdim=True) / FP8_MAX).abs().max().item()


def test_int4_planes_round_trip_and_fit_whole_steps_of_groups_of_32():
    codes = torch.randint(0, 16, (40, 384))
    packed = pack_int4_planes(codes)
    assert packed.dtype == torch.int16 and packed.shape == (96, 40)
    assert torch.equal(unpack_int4_planes(packed), codes.to(torch.uint8))
    # row j of a step holds inputs j, 32 + j, 64 + j and 96 + j in nibbles 0-3
    assert (int(packed[5, 0]) & 0xFFFF) == sum(int(codes[0, 32 * q + 5]) << (4 * q)
                                               for q in range(4))
    assert takes_planes(4096, 128, 4) and takes_planes(14336, 32, 4) and takes_planes(384, 64, 4)
    assert not takes_planes(576, 32, 4)  # not whole steps of 128 inputs
    assert not takes_planes(4096, 16, 8) and not takes_planes(4096, 128, 8)
    weight = GroupQuantWeight(codes, torch.ones(40, 3), None, 128, 4)
    assert weight.planes and weight.codes.shape == (96, 40)
    with pytest.raises(ValueError, match="do not fit planes"):
        GroupQuantWeight(codes[:, :320], torch.ones(40, 5), None, 64, 4, planes=True)


def test_byte_planes_round_trip_and_take_codes_of_at_most_7_bits():
    from pagoda.layers.quantization.group_gemm import (
        BYTE_PLANES,
        pack_byte_planes,
        takes_byte_planes,
        unpack_byte_planes,
    )
    codes = torch.randint(0, 128, (40, 96))
    packed = pack_byte_planes(codes)
    assert packed.dtype == torch.int16 and packed.shape == (48, 40)
    assert torch.equal(unpack_byte_planes(packed), codes.to(torch.uint8))
    # row j of a step of 32 inputs holds inputs j and 16 + j in bytes 0 and 1
    assert int(packed[21, 3]) == int(codes[3, 32 + 5]) | int(codes[3, 32 + 16 + 5]) << 8
    assert takes_byte_planes(codes, 16) and takes_byte_planes(codes, 32)
    assert not takes_byte_planes(codes[:, :80], 16)  # not whole steps of 32 inputs
    too_wide = codes.clone()
    too_wide[7, 9] = 128  # past a bfloat16 128 + code
    assert not takes_byte_planes(too_wide, 16)
    weight = GroupQuantWeight(codes, torch.ones(40, 6), None, 16, 8, planes=True)
    assert weight.planes and "8-bit codes in byte planes" in weight.kernel_name()
    default = GroupQuantWeight(codes, torch.ones(40, 6), None, 16, 8)
    assert default.planes == BYTE_PLANES  # (PAGODA_BYTE_PLANES)
    assert BYTE_PLANES or os.environ.get("PAGODA_BYTE_PLANES") == "0"  # on by default
    with pytest.raises(ValueError, match="do not fit planes"):
        GroupQuantWeight(too_wide, torch.ones(40, 6), None, 16, 8, planes=True)


def test_int4_halves_round_trip():
    codes = torch.randint(0, 16, (48, 192), generator=torch.Generator().manual_seed(1))
    packed = pack_int4_halves(codes)
    assert packed.shape == (96, 48) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4_halves(packed), codes.to(torch.uint8))
    # byte j of a chunk: input j low, input j + 32 high
    assert int(packed[0, 0]) == int(codes[0, 0]) | int(codes[0, 32]) << 4


def test_supported_layouts():
    assert supports(4096, 128, 4) and supports(4096, 32, 4) and supports(4096, 16, 8)
    assert not supports(4096, 16, 4)  # a 4-bit half of 32 inputs would span two groups
    assert not supports(96, 32, 4)  # not whole chunks of 64
    assert not supports(4096, 48, 8) and not supports(100, 32, 8)


def test_planes_hold_integer_zero_points_when_asked_and_other_mins_as_mins():
    generator = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (64, 256), generator=generator)
    scale = (torch.rand(64, 2, generator=generator) + 0.5).half().float()
    zeros = torch.randint(0, 16, (64, 2), generator=generator)
    assert not GroupQuantWeight(codes, scale, -zeros * scale, 128, 4).holds_zero_points
    decoded = (codes.float() - zeros.float().repeat_interleave(128, 1)) \
        * scale.repeat_interleave(128, 1)
    for step_sums in (True, False):
        awq = GroupQuantWeight(codes, scale, -zeros * scale, 128, 4, zero_points=True,
                               step_sums=step_sums)
        held_scale, low, held_zeros = awq.scales_and_mins()
        assert awq.holds_zero_points and not awq.holds_mins and low is None
        assert torch.equal(held_zeros.t().long(), zeros)
        assert torch.equal(held_scale.t().float(), scale)
        torch.testing.assert_close(awq.dequantize(torch.float32), decoded)
    for low in (-zeros * scale + 1e-3,  # a min that is no multiple of the scale (GGUF Q4_1)
                -200 * scale,  # past what the kernel subtracts exactly
                zeros * scale):  # negative zero points
        weight = GroupQuantWeight(codes, scale, low, 128, 4, zero_points=True)
        assert not weight.holds_zero_points and weight.holds_mins
    halves = GroupQuantWeight(codes, scale, -zeros * scale, 128, 4, planes=False,
                              zero_points=True)
    assert halves.zeros is None and halves.low is not None  # only planes take them
    from pagoda.layers.quantization.group_gemm import integer_zero_points
    zero_scale = torch.zeros(2, 1)  # a group of zero weights: zero point 0
    assert torch.equal(integer_zero_points(zero_scale, torch.zeros(2, 1)), torch.zeros(2, 1))
    assert integer_zero_points(zero_scale, torch.ones(2, 1)) is None


@pytest.mark.parametrize("with_min", [True, False])
def test_step_words_hold_the_scales_and_mins_bit_for_bit_in_place_of_them(with_min):
    """Planes in groups of whole steps hold one int32 word a group and output (the float16
    scale's bits low, the min's high), no separate scales; unpacked they are the same
    float16 values, negative and subnormal mins included."""
    generator = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 16, (48, 512), generator=generator)
    scale = torch.rand(48, 4, generator=generator) * 0.01 + 1e-3
    low = -torch.rand(48, 4, generator=generator) * 0.05 if with_min else None
    if low is not None:
        low[0, :2] = torch.tensor([-1e-7, 3e-6])  # float16 subnormals, either sign
    words = GroupQuantWeight(codes, scale, low, 128, 4)
    separate = GroupQuantWeight(codes, scale, low, 128, 4, step_sums=False)
    assert words.step_words.dtype == torch.int32 and words.step_words.shape == (4, 48)
    assert words.scale is None and words.low is None and separate.step_words is None
    assert words.holds_mins == with_min
    for held, expected in zip(words.scales_and_mins(), separate.scales_and_mins()):
        assert (held is None) == (expected is None)
        if held is not None:
            assert torch.equal(held.view(torch.int16), expected.view(torch.int16))
    weight_bytes = sum(p.numel() * p.element_size() for p in words.parameters())
    assert weight_bytes == 48 * 512 // 2 + 4 * 4 * 48
    assert GroupQuantWeight(codes[:, :384], scale[:, :3], None, 128, 4).step_words is not None
    smaller_groups = GroupQuantWeight(codes, torch.rand(48, 16), None, 32, 4)
    assert smaller_groups.step_words is None  # 4-bit groups smaller than a step
    asked = GroupQuantWeight(codes, torch.rand(48, 16), None, 32, 4, step_sums=True)
    assert asked.step_words.shape == (16, 48)


def test_byte_planes_of_one_zero_point_hold_only_their_scales_two_to_a_word(monkeypatch):
    """GGUF Q6_K's layout (byte planes in groups of 16, every min -32 times its scale)
    holds its scales two groups to an int32 and the zero point once: 9 bits a weight where
    step words take 10; unpacked they are the same float16 scales, float16 subnormals too
    (whose mins rounded to float16 are no multiple of them), and the weights (code - 32)
    times them. Mins of more than one zero point, scales scaled weight by weight, and
    PAGODA_PLANE_SCALE_PAIRS=0 keep the words."""
    from pagoda.layers.quantization import group_gemm
    generator = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 64, (40, 256), generator=generator)
    scale = torch.rand(40, 16, generator=generator) * 0.01 + 1e-3
    scale[0, :2] = torch.tensor([1e-7, 3e-5])  # float16 subnormals
    pairs = GroupQuantWeight(codes, scale, -32 * scale, 16, 8)
    assert pairs.shared_zero == 32 and pairs.holds_zero_points and not pairs.holds_mins
    assert pairs.step_words is None and pairs.scale_pairs.shape == (8, 40)
    assert "one zero point (32)" in pairs.kernel_name()
    weight_bytes = sum(p.numel() * p.element_size() for p in pairs.parameters())
    assert weight_bytes * 8 == 9 * 40 * 256
    held_scale, low, zeros = pairs.scales_and_mins()
    assert low is None and zeros.dtype == torch.uint8 and bool((zeros == 32).all())
    assert torch.equal(held_scale, scale.t().half())
    expected = (codes.float() - 32) * scale.half().float().repeat_interleave(16, dim=1)
    assert torch.equal(pairs.dequantize(torch.float32), expected)
    two_zeros = -32 * scale
    two_zeros[5, 3] = -31 * scale[5, 3]
    for other in (GroupQuantWeight(codes, scale, two_zeros, 16, 8),
                  GroupQuantWeight(codes, scale, -32 * scale, 16, 8, step_sums=False)):
        assert other.shared_zero is None and other.scale_pairs is None
    monkeypatch.setattr(group_gemm, "SCALE_PAIRS_IN_PLANES", False)
    switched_off = GroupQuantWeight(codes, scale, -32 * scale, 16, 8)
    assert switched_off.scale_pairs is None and switched_off.step_words.shape == (16, 40)


def test_byte_codes_of_lows_minus_128_scales_are_held_without_mins(monkeypatch):
    """GGUF Q8_0's blocks (signed bytes and a float16 scale a group of 32; pagoda's codes are
    them plus 128, their lows -128 times the scale) hold their codes and scales alone, the
    zero point 128 shared: 8.5 bits a weight, the blocks' own, where codes and mins took 9,
    the weights exactly gguf-py's. Lows of another multiple, byte planes in groups of 32, and
    PAGODA_CENTRED_CODES=0 keep their mins."""
    from pagoda.layers.quantization import group_gemm
    from pagoda.layers.quantization.gguf_blocks import byte_groups
    from tests.layers.quantization.test_gguf_blocks import gguf_py, random_rows
    raw = random_rows("Q8_0", 40, 256, seed=8)
    codes, scale, low, group = byte_groups(torch.from_numpy(raw), "Q8_0")
    centred = GroupQuantWeight(codes, scale, low, group, 8)
    assert centred.shared_zero == 128 and centred.codes.dtype == torch.uint8
    assert centred.low is None and not centred.holds_mins and not centred.holds_zero_points
    assert "with one zero point (128)" in centred.kernel_name()
    weight_bytes = sum(p.numel() * p.element_size() for p in centred.parameters())
    assert weight_bytes * 2 == 17 * 40 * 256 // 8  # 8.5 bits a weight
    assert torch.equal(centred.dequantize(torch.float32),
                       torch.from_numpy(gguf_py(raw, "Q8_0")).float())
    for other in (GroupQuantWeight(codes, scale, -127 * scale, group, 8),
                  GroupQuantWeight(codes // 2, scale, -128 * scale, group, 8)):  # planes
        assert other.shared_zero is None and other.holds_mins
    monkeypatch.setattr(group_gemm, "CENTRED_CODES", False)
    assert GroupQuantWeight(codes, scale, low, group, 8).holds_mins


@pytest.mark.parametrize("type_name", ["IQ4_NL", "IQ4_XS"])
def test_table_types_are_held_as_centred_byte_codes(type_name):
    """GGUF's IQ4_NL and IQ4_XS (a 4-bit index into 16 int8 values, a scale per 32 weights)
    as the GPU holds them: byte codes (the value plus 128) and a float16 scale a group, the
    zero point 128 shared: 8.5 bits a weight, as gguf.held_bits counts them; the weights
    gguf-py's (IQ4_NL's float16 scales exactly, IQ4_XS's products of a float16 and a
    sub-scale rounded to float16)."""
    from pagoda.layers.quantization.gguf import held_bits
    from pagoda.layers.quantization.gguf_blocks import byte_groups
    from tests.layers.quantization.test_gguf_blocks import gguf_py, random_rows
    raw = random_rows(type_name, 40, 512, seed=9)
    weight = GroupQuantWeight(*byte_groups(torch.from_numpy(raw), type_name), 8)
    assert weight.shared_zero == 128 and weight.low is None
    weight_bytes = sum(p.numel() * p.element_size() for p in weight.parameters())
    assert weight_bytes * 8 == 40 * 512 * held_bits(type_name, torch.device("cuda")) == \
        40 * 512 * 8.5
    expected = torch.from_numpy(gguf_py(raw, type_name)).float()
    tolerance = 0 if type_name == "IQ4_NL" else 2.0 ** -11
    torch.testing.assert_close(weight.dequantize(torch.float32), expected, rtol=tolerance,
                               atol=0)


# (bits, group, GroupQuantWeight's keywords, mins: None, "min", "zero" (integer zero
# points), "shared zero" (-32 x the scale: scale pairs) or "centred" (-2^(bits - 1) x the
# scale: no mins held))
ROW_LAYOUTS = {
    "int4-planes-step-words": (4, 128, {}, "min"),
    "int4-planes-g32": (4, 32, {}, "min"),
    "int4-planes-zero-points": (4, 128, {"zero_points": True}, "zero"),
    "int4-halves": (4, 64, {"planes": False}, None),
    "int8-byte-planes-g16": (8, 16, {}, "min"),
    "int8-byte-planes-g16-scale-pairs": (8, 16, {}, "shared zero"),
    "int8-bytes-centred": (8, 32, {"planes": False}, "centred"),
    "int4-planes-g32-centred": (4, 32, {}, "centred"),
    "int8-bytes": (8, 32, {"planes": False}, "min"),
    "float8-rows": (8, 256, {}, None),
}


@pytest.mark.parametrize("layout", sorted(ROW_LAYOUTS))
def test_rows_decode_the_outputs_looked_up_as_the_whole_weight_does(layout):
    """A table held as codes (a tied GGUF table on the GPU) looks rows up by their outputs'
    codes and scales alone: bit for bit the rows of `dequantize`, repeats and any order,
    times a scale where given."""
    bits, group, keywords, mins = ROW_LAYOUTS[layout]
    generator = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 2 ** (bits - 1), (48, 256), generator=generator)
    scale = torch.rand(48, 256 // group, generator=generator) + 0.5
    low = None
    if mins == "min":
        low = -torch.rand(48, 256 // group, generator=generator)
    elif mins == "zero":
        scale = scale.half().float()
        low = -torch.randint(0, 16, scale.shape, generator=generator) * scale
    elif mins == "shared zero":
        low = -32 * scale
    elif mins == "centred":
        low = -2 ** (bits - 1) * scale
    if layout.startswith("float8"):
        codes = torch.randn(48, 256, generator=generator).to(FP8)
    weight = GroupQuantWeight(codes, scale, low, group, bits, **keywords)
    assert weight.planes == ("planes" in layout)
    assert weight.holds_zero_points == (mins in ("zero", "shared zero"))
    assert (weight.scale_pairs is not None) == (mins == "shared zero")
    assert (weight.shared_zero == 2 ** (bits - 1)) == (mins == "centred")
    index = torch.tensor([7, 0, 47, 7, 20])
    whole = weight.dequantize(torch.float32)
    assert torch.equal(weight.rows(index), whole[index])
    assert torch.equal(weight.rows(index.reshape(1, 5), 2.5), whole[index] * 2.5)


def test_the_startup_log_names_the_4_bit_layout_and_the_one_token_gemv():
    def weight(outputs, inputs, group, bits, float8=False):
        codes = torch.zeros(outputs, inputs, dtype=torch.uint8)
        return GroupQuantWeight(codes.to(FP8) if float8 else codes,
                                torch.ones(outputs, inputs // group), None, group, bits)
    assert weight(200, 2048, 128, 4).kernel_name() == \
        "triton group gemm (4-bit codes in planes, groups of 128; from 1536 tokens: " \
        "decoded to 16 bits for cuBLAS)"
    assert weight(96, 1024, 32, 4).kernel_name() == \
        "triton group gemm (4-bit codes in planes, groups of 32; from 768 tokens: " \
        "decoded to 16 bits for cuBLAS)"
    with_zeros = GroupQuantWeight(torch.zeros(64, 256, dtype=torch.uint8), torch.ones(64, 2),
                                  torch.full((64, 2), -8.0), 128, 4, zero_points=True)
    assert with_zeros.kernel_name() == \
        "triton group gemm (4-bit codes in planes with zero points, groups of 128; from " \
        "1536 tokens: decoded to 16 bits for cuBLAS)"
    # halves (inputs not whole steps of 128): one token takes the GEMV where a chunk's two
    # halves lie in one group and the outputs are a multiple of 4
    assert weight(200, 1088, 64, 4).kernel_name() == \
        "triton group gemm (4-bit codes, groups of 64; one token: a CUDA-core GEMV)"
    assert weight(96, 576, 32, 4).kernel_name() == "triton group gemm (4-bit codes, groups of 32)"
    assert not weight(198, 1088, 64, 4).has_one_token_kernel
    assert not weight(200, 2048, 128, 4).has_one_token_kernel  # planes
    bytes_each = GroupQuantWeight(torch.full((200, 2048), 200, dtype=torch.uint8),
                                  torch.ones(200, 128), None, 16, 8)  # codes past byte planes
    assert bytes_each.kernel_name() == \
        "triton group gemm (8-bit codes, groups of 16; one token: a CUDA-core GEMV)"
    narrow = GroupQuantWeight(torch.full((198, 2048), 200, dtype=torch.uint8),
                              torch.ones(198, 128), None, 16, 8)
    assert narrow.kernel_name() == "triton group gemm (8-bit codes, groups of 16)"
    assert not weight(64, 256, 256, 8, float8=True).has_one_token_kernel
    assert weight(64, 256, 256, 8, float8=True).kernel_name() == "triton group gemm (fp8 weights)"
    from pagoda.layers.quantization.triton_group_gemm import takes_one_token_gemv
    gemv = weight(200, 1088, 64, 4)
    assert takes_one_token_gemv(1, gemv) and not takes_one_token_gemv(2, gemv)
    assert not takes_one_token_gemv(1, weight(96, 576, 32, 4))


def shaped_weight(outputs: int, inputs: int, group: int, bits: int,
                  planes: bool | None = None) -> GroupQuantWeight:
    """A weight of `outputs` x `inputs` for launch configurations, which read only its
    shape and layout (a few rows of zero codes are stored; out_features says the rest)."""
    weight = GroupQuantWeight(torch.zeros(4, inputs, dtype=torch.uint8),
                              torch.ones(4, inputs // group), None, group, bits, planes)
    weight.out_features = outputs
    return weight


def test_planes_calls_split_the_inputs_up_to_64_tokens():
    from pagoda.layers.quantization.triton_group_gemm import PLANES_LARGE, planes_config
    down = shaped_weight(4096, 14336, 128, 4)  # the 8B's down projection
    one = planes_config(1, down, 132)
    assert (one["BLOCK_N"], one["BLOCK_T"]) == (64, 8)
    assert one["splits"] > 1 and 14336 % (one["splits"] * 128) == 0
    assert planes_config(16, down, 132)["BLOCK_T"] == 16
    assert planes_config(32, down, 132)["BLOCK_T"] == 32
    assert planes_config(64, down, 132)["splits"] > 1
    large = planes_config(4096, down, 132)
    assert large["splits"] == 1 and (large["BLOCK_N"], large["BLOCK_T"]) == PLANES_LARGE[:2]


def test_byte_planes_take_their_own_tiles_up_to_8_tokens_and_above():
    from pagoda.layers.quantization.triton_group_gemm import (
        BYTE_PLANES_EIGHT,
        BYTE_PLANES_FEW,
        planes_config,
    )
    down = shaped_weight(4096, 14336, 16, 8, planes=True)
    for tokens, tile in ((1, BYTE_PLANES_EIGHT), (8, BYTE_PLANES_EIGHT), (9, BYTE_PLANES_FEW),
                         (32, BYTE_PLANES_FEW)):
        config = planes_config(tokens, down, 132)
        assert (config["BLOCK_N"], config["num_warps"], config["num_stages"]) == tile[:3]
        assert 14336 % (config["splits"] * 32) == 0  # whole steps of byte planes a split


def test_narrow_products_split_their_inputs_finer_to_reach_every_multiprocessor():
    """A product too narrow to give each multiprocessor a program in splits of
    MIN_SPLIT_INPUTS (the 8B's value projection as Q6_K byte planes: 16 tiles of 64) splits
    down to NARROW_MIN_SPLIT_INPUTS; one that does (the output projection) keeps its splits."""
    from pagoda.layers.quantization.triton_group_gemm import (
        MIN_SPLIT_INPUTS,
        NARROW_MIN_SPLIT_INPUTS,
        planes_config,
    )
    splits = planes_config(1, shaped_weight(1024, 4096, 16, 8, planes=True), 132)["splits"]
    assert 16 * splits >= 132 and 4096 // splits == NARROW_MIN_SPLIT_INPUTS
    output = shaped_weight(4096, 4096, 128, 4)
    assert 4096 // planes_config(1, output, 132)["splits"] == MIN_SPLIT_INPUTS


def test_a_kernel_tile_from_the_environment(monkeypatch):
    from pagoda.layers.quantization.triton_group_gemm import tile_from_environment

    monkeypatch.delenv("PAGODA_TEST_TILE", raising=False)
    assert tile_from_environment("PAGODA_TEST_TILE", (64, 4, 3, 8)) == (64, 4, 3, 8)
    monkeypatch.setenv("PAGODA_TEST_TILE", "32,1,3,16")
    assert tile_from_environment("PAGODA_TEST_TILE", (64, 4, 3, 8)) == (32, 1, 3, 16)
    for wrong in ("32,1,3", "32,0,3,16", "32,one,3,16", "32,1,3,16,8"):
        monkeypatch.setenv("PAGODA_TEST_TILE", wrong)
        with pytest.raises(ValueError, match="4 positive integers"):
            tile_from_environment("PAGODA_TEST_TILE", (64, 4, 3, 8))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("outputs", "inputs", "group"), [
    (4096, 14336, 128), (28672, 4096, 128), (6144, 4096, 128), (4096, 4096, 64),
    (2048, 5632, 64), (512, 4096, 4096), (100, 640, 320), (4, 128, 64), (28672, 4096, 32),
    (4096, 14336, 32)])
def test_one_token_splits_keep_each_period_in_one_group(outputs, inputs, group, bits):
    """A row of bytes holds two 4-bit inputs or one 8-bit input; the byte GEMV takes 64
    words a program, the 4-bit one 32."""
    from pagoda.layers.quantization.triton_group_gemm import (
        MIN_SPLIT_ROWS,
        one_token_gemv_config,
    )
    config = one_token_gemv_config(shaped_weight(outputs, inputs, group, bits), 132)
    assert config["BLOCK_W"] == (32 if bits == 4 else 64)
    inputs_a_row = 2 if bits == 4 else 1
    rows, split_rows, period = inputs // inputs_a_row, config["SPLIT_ROWS"], config["PERIOD"]
    group_rows = group // inputs_a_row
    assert split_rows * config["splits"] == rows
    assert split_rows % period == 0 and period % config["ROWS"] == 0
    assert group_rows % period == 0  # a period never crosses a group
    assert split_rows >= MIN_SPLIT_ROWS or config["splits"] == 1
    tiles = -(-outputs // 4 // config["BLOCK_W"])
    if tiles * 2 <= 8 * 132 and rows // group_rows >= 4:  # room to split: it does
        assert config["splits"] > 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_torch_path_is_codes_times_scale_plus_min(name):
    _, outputs, inputs, group, bits, with_min, float8 = CASES[name]
    generator = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 2 ** bits, (outputs, inputs), generator=generator)
    if float8:
        codes = codes.to(FP8)
    scale = torch.rand(outputs, inputs // group, generator=generator)
    low = torch.rand(outputs, inputs // group, generator=generator) if with_min else None
    weight = GroupQuantWeight(codes, scale, low, group, bits)
    held = scale if float8 else scale.half().float()  # float8 values keep float32 scales
    decoded = codes.float() * held.repeat_interleave(group, dim=1)
    if with_min:
        decoded += low.half().float().repeat_interleave(group, dim=1)
    torch.testing.assert_close(weight.dequantize(torch.float32), decoded)
    x = torch.randn(3, inputs, generator=generator)
    expected = x @ decoded.t()  # float32 sums of up to 2,048 terms: rounding by magnitude
    torch.testing.assert_close(weight(x), expected, rtol=1e-5,
                               atol=1e-6 * float(expected.abs().max()) + 1e-4)


def test_decode_calls_split_the_inputs_and_large_ones_do_not():
    from pagoda.layers.quantization.triton_group_gemm import (
        few_tokens_config,
        launch_config,
    )
    down = shaped_weight(4096, 14336, 128, 4)  # the 8B's down projection
    decode = few_tokens_config(1, down, 132)
    assert decode["BLOCK_T"] == 16 and decode["STEP"] == 32
    assert decode["splits"] > 1 and 14336 % (decode["splits"] * 64) == 0
    assert 14336 // decode["splits"] >= 512
    assert few_tokens_config(17, down, 132)["BLOCK_T"] == 32
    up = shaped_weight(28672, 4096, 128, 4)
    assert few_tokens_config(1, up, 132)["splits"] < decode["splits"]
    assert launch_config(33, 4096, 14336, 32, 132)["BLOCK_M"] == 64
    assert launch_config(33, 4096, 14336, 32, 132)["splits"] > 1
    assert launch_config(65, 4096, 14336, 32, 132)["BLOCK_M"] == 128
    assert launch_config(4096, 4096, 14336, 32, 132)["splits"] == 1
    assert launch_config(40, 4096, 576, 32, 132)["splits"] == 1  # 9 chunks: no even split


def test_float8_calls_of_up_to_8_tokens_take_tiles_of_8_tokens_by_2_warps():
    from pagoda.layers.quantization.triton_group_gemm import few_tokens_config
    weight = GroupQuantWeight(torch.zeros(64, 4096).to(FP8), torch.ones(64, 1), None, 4096, 8)
    for tokens, tile_tokens, warps in ((1, 8, 2), (8, 8, 2), (9, 16, 4), (16, 16, 4)):
        config = few_tokens_config(tokens, weight, 132)
        assert (config["BLOCK_T"], config["num_warps"]) == (tile_tokens, warps), tokens


def test_few_token_steps_divide_the_group():
    from pagoda.layers.quantization.triton_group_gemm import few_tokens_config
    for inputs, group, step in ((4096, 4096, 128), (320, 320, 64), (2880, 2880, 64),
                                (4096, 32, 32), (4096, 16, 16), (4096, 128, 128)):
        weight = GroupQuantWeight(torch.zeros(8, inputs, dtype=torch.uint8),
                                  torch.ones(8, inputs // group), None, group, 8)
        assert few_tokens_config(1, weight, 132)["STEP"] == step, (inputs, group)


def test_float8_and_8_bit_codes_multiply_in_float16_and_4_bit_codes_in_the_activations_type():
    from pagoda.layers.quantization.triton_group_gemm import _dot_type
    assert _dot_type(torch.bfloat16, True) == 3  # clamped to float16's range
    assert _dot_type(torch.bfloat16, False, 8) == 3  # bfloat16 holds 128 + codes to 127 only
    assert _dot_type(torch.float16, True) == _dot_type(torch.float16, False, 8) == 1
    assert _dot_type(torch.bfloat16, False) == 2
    assert _dot_type(torch.float16, False) == 1
    assert _dot_type(torch.float32, True) == _dot_type(torch.float32, False, 8) == 0


def test_gate_up_products_of_few_tokens_take_the_gated_activation(monkeypatch):
    from pagoda.layers.quantization import triton_group_gemm
    from pagoda.layers.quantization.triton_group_gemm import group_gemm, takes_gated
    generator = torch.Generator().manual_seed(0)
    planes = random_weight(40, 256, 128, 4, True, False, generator)
    halves = random_weight(200, 2048, 128, 4, False, False, generator, planes=False)
    assert [takes_gated(tokens, planes) for tokens in (1, 32, 33)] == [True, True, False]
    # one token on the 4-bit GEMV: gates and ups each a whole number of words of 4 outputs
    assert takes_gated(1, halves) and takes_gated(2, halves)
    narrow = random_weight(204, 2048, 128, 4, False, False, generator, planes=False)
    assert narrow.has_one_token_kernel and not takes_gated(1, narrow) and takes_gated(2, narrow)
    assert not takes_gated(1, random_weight(39, 256, 128, 4, True, False, generator))
    with pytest.raises(ValueError, match="33 tokens on outputs of 40 takes no gated"):
        group_gemm(torch.zeros(33, 256), planes, gated=1)
    monkeypatch.setattr(triton_group_gemm, "GATED_IN_PRODUCT", False)
    assert not takes_gated(1, planes)


def test_the_kernel_matches_the_dense_product_under_the_interpreter():
    errors = interpreter_report("tests.layers.quantization.test_group_gemm", MARKER)
    assert set(errors) == (set(CASES) | {f"{n}-fp16" for n in HALF_CASES}
                           | {f"{n}-halves" for n in PLANE_CASES}
                           | {f"{n}-weight-by-weight" for n in PLANE_CASES}
                           | {f"{n}-bytes" for n in FLOAT8_CASES}
                           | set(BYTE_PLANE_CASES) | {"bytes-g16-tokens-3-fp16",
                                                     "bytes-g16-shared-zero-tokens-3-fp16"}
                           | {f"{n}-weight-by-weight" for n in BYTE_PLANE_CASES}
                           | {f"{n}-gated" for n in (*GATED_CASES, *GATED_BYTE_PLANE_CASES,
                                                      *GATED_GEMV_CASES)}
                           | set(FACTORED_CASES) | set(NORMED_CASES)
                           | {f"{n}-residual" for n in NORMED_CASES}
                           | {f"{n}-columns" for n in COLUMN_CASES}
                           | {"fp8-every-value-bytes", "fp8-every-value-fp16-bytes",
                              "fp8-rows", "split-counters-left-nonzero"})
    for name, error in errors.items():
        half = name.endswith(("-fp16", "-fp16-bytes"))
        tolerance = FACTORED_TOLERANCE if name in FACTORED_CASES else \
            NORMED_TOLERANCE if name.startswith("normed-") else HALF_TOLERANCE if half else \
            GATED_GEMV_TOLERANCE if name.removesuffix("-gated") in GATED_GEMV_CASES else 5e-5
        assert error < tolerance, (name, error)


@pytest.mark.parametrize(("codes", "bits", "activations", "precision", "capability",
                          "shared_zero"), [
    ("u8", 4, "bf16", "tf32", 90, None), ("u8", 8, "fp16", "tf32", 90, None),
    ("fp8e4nv", 8, "bf16", "tf32", 90, None), ("u8", 4, "fp32", "ieee", 90, None),
    # an A100: 4-bit codes, and float8 weights as their bytes (Triton has no E4M3 there)
    ("u8", 4, "bf16", "tf32", 80, None), ("e4m3-bytes", 8, "bf16", "tf32", 80, None),
    ("e4m3-bytes", 8, "fp16", "tf32", 80, None),
    # mins taken from the scales (GGUF Q4_0's and Q8_0's)
    ("u8", 4, "bf16", "tf32", 90, 8), ("u8", 8, "bf16", "tf32", 90, 128)])
def test_the_kernels_compile_for_cuda(codes, bits, activations, precision, capability,
                                      shared_zero):
    from pagoda.layers.quantization.triton_group_gemm import (
        _dot_type,
        _few_tokens_kernel,
        _group_gemm_kernel,
    )
    as_bytes = codes == "e4m3-bytes"
    float8 = as_bytes or codes == "fp8e4nv"
    pointers = {"x_ptr": f"*{activations}", "codes_ptr": "*u8" if as_bytes else f"*{codes}",
                "scale_ptr": "*fp16", "low_ptr": "*fp16", "out_ptr": "*fp32"}
    strides = dict.fromkeys(["stride_ck", "stride_cn"], "i32")
    layout = {"K_SPLIT": 1024, "GROUP": 128 if bits == 4 else 16, "BITS": bits,
              "STEP": 32 if bits == 4 else 16, "HAS_LOW": shared_zero is None,
              "E4M3_BYTES": as_bytes, "PDL": capability >= 90, "SHARED_ZERO": shared_zero}
    counted = {**pointers, "partial_ptr": "*fp32", "count_ptr": "*i32"}
    compile_for_cuda(_group_gemm_kernel, {**counted, "M": "i32", "N": "i32",
                                          "stride_xm": "i32", **strides}, {
        **layout, "SPLITS": 4, "BLOCK_M": 16, "BLOCK_N": 64, "DOT_PRECISION": precision},
        capability)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[activations]
    for group, step in ((4096, 128), (128, 128)) if float8 else ((layout["GROUP"],
                                                                   layout["STEP"]),):
        compile_for_cuda(_few_tokens_kernel, {
            **counted, "scale_ptr": "*fp32" if float8 else "*fp16", "M": "i32", "N": "i32",
            "K": "i32", "stride_xm": "i32", "stride_om": "i32"}, {
            **layout, "GROUP": group, "STEP": step, "SPLITS": 2, "FLOAT8": float8,
            "ROW_SCALE": group == 4096, "GATED": 1 + (group == 4096),
            "BLOCK_N": 32, "BLOCK_T": 16, "DOT": _dot_type(dtype, float8, bits)}, capability)


@pytest.mark.parametrize(("activations", "dot", "asm", "group", "capability", "bits"), [
    ("bf16", 2, True, 128, 90, 4), ("bf16", 2, True, 32, 90, 4), ("fp16", 1, False, 64, 90, 4),
    ("fp32", 0, False, 128, 90, 4), ("bf16", 2, True, 128, 80, 4), ("bf16", 2, True, 16, 90, 8),
    ("bf16", 2, True, 32, 90, 8), ("fp16", 1, False, 16, 80, 8)])
def test_the_planes_kernel_compiles_for_cuda(activations, dot, asm, group, capability, bits):
    from pagoda.layers.quantization.group_gemm import BYTE_PLANE_STEP
    from pagoda.layers.quantization.triton_group_gemm import _planes_kernel
    step = PLANE_STEP if bits == 4 else BYTE_PLANE_STEP
    combinations = [(64, 8, 4, True, False, True, None), (64, 8, 4, True, False, False, None),
                    (128, 64, 1, False, False, True, None), (64, 8, 4, False, True, True, None),
                    (64, 8, 4, False, True, False, None), (128, 64, 1, False, True, True, None)]
    if bits == 8 and group == 16:  # scale pairs (GGUF Q6_K's): a plane's sums, and larger tiles
        combinations += [(64, 8, 4, False, True, True, 32), (128, 64, 1, False, True, True, 32)]
    if bits == 4 and group == 32:  # the scales alone, weight by weight (GGUF Q4_0's)
        combinations += [(64, 8, 4, False, False, False, 8), (128, 64, 1, False, False, False, 8)]
    for block_n, block_t, splits, has_low, zero_points, step_sums, shared_zero in combinations:
        compile_for_cuda(_planes_kernel, {
            "x_ptr": f"*{activations}", "codes_ptr": "*i16",
            "scale_ptr": "*i32" if step_sums else "*fp16",
            "low_ptr": "*u8" if zero_points else "*fp16", "out_ptr": f"*{activations}",
            "partial_ptr": "*fp32", "count_ptr": "*i32", "M": "i32", "N": "i32",
            "stride_xm": "i32", "stride_om": "i32"}, {
            "K_SPLIT": 1024, "SPLITS": splits, "GROUP": group,
            "STEP_IN_GROUP": group % step == 0, "HAS_LOW": has_low,
            "ZERO_POINTS": zero_points, "STEP_SUMS": step_sums,
            "BLOCK_N": block_n, "BLOCK_T": block_t, "DOT": dot, "ASM": asm,
            "PDL": capability >= 90, "PLANE_BITS": bits, "SHARED_ZERO": shared_zero,
            "GATED": (1 + bits // 8) if block_t == 8 and step_sums else 0}, capability)


# the W x^T kernels' norm_* arguments, typed for compile_for_cuda
NORM_ARGUMENTS = {"norm_ptr": "*bf16", "residual_ptr": "*bf16", "residual_out_ptr": "*bf16",
                  "squares_ptr": "*fp32", "norm_tiles": "i32", "norm_width": "i32",
                  "norm_eps": "fp32"}


def _norm_kernels_ptx(norm: int) -> list[str]:
    """The planes (4-bit and byte planes), few-token (float8 rows) and one-token GEMV (bytes)
    kernels with NORM `norm` (and the gated activation with 2), compiled for an H200 at one
    token in bfloat16."""
    from pagoda.layers.quantization.triton_group_gemm import (
        _few_tokens_kernel,
        _one_token_kernel,
        _planes_kernel,
    )
    counted = {"x_ptr": "*bf16", "out_ptr": "*bf16", "partial_ptr": "*fp32",
               "count_ptr": "*i32", **NORM_ARGUMENTS, "M": "i32", "N": "i32",
               "stride_xm": "i32", "stride_om": "i32"}
    shared = {"SPLITS": 2, "BLOCK_T": 8, "PDL": True, "GATED": 1 if norm == 2 else 0,
              "NORM": norm, "NORM_TILES": 64, "LAUNCH_LATE": norm == 1}
    assembly = [compile_for_cuda(_planes_kernel, {
        **counted, "codes_ptr": "*i16", "scale_ptr": "*i32", "low_ptr": "*i32"}, {
        **shared, "K_SPLIT": 1024, "GROUP": group, "STEP_IN_GROUP": group == 128,
        "HAS_LOW": True, "ZERO_POINTS": False, "STEP_SUMS": True, "BLOCK_N": 64, "DOT": 2,
        "ASM": True, "PLANE_BITS": bits}, 90)["ptx"] for group, bits in ((128, 4), (16, 8))]
    assembly.append(compile_for_cuda(_few_tokens_kernel, {
        **counted, "codes_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "low_ptr": "*fp32",
        "K": "i32"}, {
        **shared, "K_SPLIT": 2048, "GROUP": 4096, "BITS": 8, "FLOAT8": True,
        "ROW_SCALE": True, "HAS_LOW": False, "STEP": 128, "E4M3_BYTES": False,
        "BLOCK_N": 32, "DOT": 3}, 90)["ptx"])
    assembly.append(compile_for_cuda(_one_token_kernel, {
        **{name: kind for name, kind in counted.items() if name not in ("M", "stride_xm")},
        "words_ptr": "*i32", "scale_ptr": "*fp16", "low_ptr": "*fp16", "one_bits": "i32"}, {
        **{name: value for name, value in shared.items() if name != "BLOCK_T"},
        "SPLIT_ROWS": 256, "PERIOD": 32, "GROUP": 32, "HAS_LOW": False, "SHARED_ZERO": 128,
        "ROWS": 16, "BLOCK_W": 64, "ASM": True, "BITS": 8}, 90)["ptx"])
    return assembly


def test_products_that_start_a_norm_let_the_next_kernel_launch_after_their_loop():
    """_launches_late: where a product starts a norm, and only there."""
    from pagoda.layers.quantization import triton_group_gemm as kernels
    out, squares = torch.zeros(2, 8), torch.zeros(4, 2)
    starts = kernels._NormArguments.outputs(out, torch.ones(8), out)
    finishes = kernels._NormArguments.inputs(squares, 8, 1e-6, out)
    assert kernels._launches_late(starts)
    assert not kernels._launches_late(finishes) and not kernels._launches_late(None)


def test_the_kernels_that_norm_their_outputs_or_finish_a_norm_compile_for_hopper():
    """Compiled for an H200, the kernels that norm their outputs (NORM 1) store 16-bit
    values twice as often as without (the new residual and the normed values) and more
    float32s (the squares), and with LAUNCH_LATE let the next kernel launch only after their
    products (the others as they start); those that finish a norm (NORM 2) take a square
    root, which the kernels without take nowhere."""
    def count(ptx: str, pattern: str) -> int:
        return len(re.findall(pattern, ptx))

    def launched_after_products(ptx: str) -> bool:  # (the GEMV's products: fma, no mma)
        product = "mma." if "mma." in ptx else "fma.rn.f32"
        return ptx.index("griddepcontrol.launch_dependents") > ptx.index(product)
    for plain, storing, finishing in zip(_norm_kernels_ptx(0), _norm_kernels_ptx(1),
                                         _norm_kernels_ptx(2), strict=True):
        sixteen = r"st\.global(?:\.v\d)?\.b16"
        assert count(storing, sixteen) == 2 * count(plain, sixteen) > 0
        assert count(storing, r"st\.global\.b32") > count(plain, r"st\.global\.b32")
        assert count(finishing, r"sqrt") > 0 == count(plain, r"sqrt")
        assert launched_after_products(storing)
        assert not launched_after_products(plain) and not launched_after_products(finishing)


@pytest.mark.parametrize(("zero_points", "group", "bits"), [
    (False, 128, 4), (True, 128, 4), (False, 32, 4), (True, 32, 4), (False, 16, 8)])
def test_step_sums_take_x_sums_without_a_reduction_and_wait_for_no_load(zero_points, group,
                                                                        bits):
    """With a scale a step, the planes kernel takes the step's sums of x from a product with
    ones laid out as its sums (every row the same sums), not from 16 rows reduced across
    threads: its sm_90 code shuffles nothing between lanes (the reduction cost 11
    instructions a step). And each step's words are loaded (LDG) straight into the
    registers the loop carries them in, so no instruction of the step they are loaded in
    waits for them (a move or repacking of a loaded register at the loop's end did: `python
    bench/kernels/sass_census.py` counts the loop). The same in groups of 32 (GGUF's),
    whose four words a step scale each plane's sums, and for byte planes in groups of 16
    (GGUF Q6_K's, whose two planes' activations come in one load the pipeline copies)."""
    from bench.kernels.sass_census import planes_sass
    from pagoda.layers.quantization.triton_group_gemm import _planes_kernel
    ptx = compile_for_cuda(_planes_kernel, {
        "x_ptr": "*bf16", "codes_ptr": "*i16", "scale_ptr": "*i32",
        "low_ptr": "*u8" if zero_points else "*fp16", "out_ptr": "*bf16",
        "partial_ptr": "*fp32", "count_ptr": "*i32", "M": "i32", "N": "i32",
        "stride_xm": "i32", "stride_om": "i32"}, {
        "K_SPLIT": 2048, "SPLITS": 2, "GROUP": group,
        "STEP_IN_GROUP": group == 128 or (bits == 8 and group == 32), "PLANE_BITS": bits,
        "HAS_LOW": not zero_points, "ZERO_POINTS": zero_points, "STEP_SUMS": True,
        "BLOCK_N": 64, "BLOCK_T": 8, "DOT": 2, "ASM": True, "PDL": True})["ptx"]
    assert "griddepcontrol.wait" in ptx and "shfl.sync" not in ptx
    loop = loaded_in_loop(planes_sass(zero_points, True, 64, 4, 3, group, bits))
    assert loop["loaded"], "no synchronous load of the words in the loop"
    assert not loop["read_after_load"], loop["read_after_load"]


def test_scale_pairs_take_one_load_a_step_and_fewer_instructions_than_words():
    """Byte planes in groups of 16 with one zero point (GGUF Q6_K's): the step's two scales
    come in one int32 load an output (a thread's tile rows take two), half the loads of a
    word a group of scale and min, read by no instruction of the step they are loaded in;
    and the loop issues fewer instructions (115 against 132 a thread a step when
    written)."""
    from bench.kernels.sass_census import main_loop, planes_sass
    pairs = planes_sass(True, True, 64, 4, 3, 16, 8, shared_zero=32)
    words = planes_sass(False, True, 64, 4, 3, 16, 8)
    loop = loaded_in_loop(pairs)
    assert 2 * len(loop["loaded"]) == len(loaded_in_loop(words)["loaded"]) == 4
    assert not loop["read_after_load"], loop["read_after_load"]
    assert len(main_loop(pairs)) < len(main_loop(words))


@pytest.mark.parametrize(("group", "bits", "factored"), [(32, 4, 2), (16, 8, 1), (32, 8, 2)])
def test_factored_words_are_loaded_a_step_ahead_and_waited_for_by_no_instruction(
        group, bits, factored):
    """GGUF Q4_K's (nibble planes, sub-mins), Q6_K's and Q5_K's (byte planes) factored scales:
    whole int32 words loaded at the end of the step before theirs, read in no instruction
    of the step they are loaded in (16-bit sub-words were repacked with PRMT right after
    their load, a wait on memory every step)."""
    from bench.kernels.sass_census import planes_sass
    loop = loaded_in_loop(planes_sass(False, True, 64, 4, 3, group, bits, factored))
    assert loop["loaded"], "no synchronous load of the words in the loop"
    assert not loop["read_after_load"], loop["read_after_load"]


@pytest.mark.parametrize(("bits", "group", "factored", "step_in_group"), [
    (4, 32, 2, False), (8, 16, 1, False), (8, 16, 2, False), (8, 32, 2, True)])
def test_the_planes_kernel_compiles_for_cuda_with_factored_scales(bits, group, factored,
                                                                   step_in_group):
    """Every path of the planes kernel that reads factored scales (a plane's sums, a
    step's, weight by weight in larger tiles and without step sums) compiles for sm_90."""
    from pagoda.layers.quantization.triton_group_gemm import _planes_kernel
    for block_t, step_sums in ((8, True), (64, True), (8, False)):
        compile_for_cuda(_planes_kernel, {
            "x_ptr": "*bf16", "codes_ptr": "*i16", "scale_ptr": "*i32", "low_ptr": "*i32",
            "out_ptr": "*bf16", "partial_ptr": "*fp32", "count_ptr": "*i32", "M": "i32",
            "N": "i32", "stride_xm": "i32", "stride_om": "i32"}, {
            "K_SPLIT": 1024, "SPLITS": 2, "GROUP": group, "STEP_IN_GROUP": step_in_group,
            "HAS_LOW": True, "ZERO_POINTS": False, "STEP_SUMS": step_sums, "BLOCK_N": 64,
            "BLOCK_T": block_t, "DOT": 2, "ASM": True, "PDL": True, "PLANE_BITS": bits,
            "GATED": 1 if block_t == 8 and step_sums else 0, "FACTORED": factored,
            "SUPER": 256})


@pytest.fixture
def factored_scales(monkeypatch) -> None:
    """GGUF k-quants' scales held factored, as PAGODA_PLANE_FACTORED_SCALES=1 has it."""
    from pagoda.layers.quantization import group_gemm
    monkeypatch.setattr(group_gemm, "FACTORED_SCALES_IN_PLANES", True)


@pytest.mark.parametrize("type_name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_factored_words_hold_a_k_quants_scales_bit_for_bit_in_fewer_bytes(type_name,
                                                                         factored_scales):
    """A k-quant's scales and mins held as its blocks store them (int8 sub-scales and
    sub-mins four to a word, float16 factors a super-block) multiply out to byte_groups'
    float32 scales and mins exactly, for the whole weight and for looked-up rows, in
    fewer bytes than float16 scales and mins (words of them where the kernel scales sums)."""
    from pagoda.layers.quantization.gguf_blocks import byte_groups, scale_factors
    from tests.layers.quantization.test_gguf_blocks import random_rows
    rows = torch.from_numpy(random_rows(type_name, 24, 512, seed=6))
    codes, scale, low, group = byte_groups(rows, type_name)
    bits = 8 if type_name != "Q4_K" else 4
    factored = GroupQuantWeight(codes, scale, low, group, bits,
                                factors=scale_factors(rows, type_name))
    floats = GroupQuantWeight(codes, scale, low, group, bits)
    assert factored.sub_words.dtype == factored.factor_words.dtype == torch.int32
    assert factored.factored == (1 if type_name in ("Q3_K", "Q6_K") else 2)
    assert factored.step_sums and factored.scale is None and factored.step_words is None
    assert factored.factor_words.shape == (2, 24)  # two super-blocks of 256
    assert factored.sub_words.shape == (512 // group // 4 * factored.factored, 24)
    held_scale, held_low, zeros = factored.scales_and_mins()
    assert zeros is None
    assert torch.equal(held_scale, scale.t()) and torch.equal(held_low, low.t())
    index = torch.tensor([23, 0, 5, 5])
    assert torch.equal(factored.rows(index),
                       (codes.float().reshape(24, -1, group) * scale[..., None]
                        + low[..., None]).reshape(24, 512)[index])

    def bytes_of(weight: GroupQuantWeight) -> int:
        return sum(p.numel() * p.element_size() for p in weight.parameters())
    assert bytes_of(factored) < bytes_of(floats)
    assert bytes_of(factored) == codes.numel() * bits // 8 + factored.sub_words.numel() * 4 \
        + 2 * 24 * 4


def test_k_quant_scales_stay_float16s_where_a_factor_is_no_float16_or_when_switched_off(
        monkeypatch):
    """A low factor past float16's range (Q6_K's -32 d of a huge d) keeps the float16
    scales (Q6_K's in pairs, its mins all -32 times them), as
    PAGODA_PLANE_FACTORED_SCALES=0 (the default) does."""
    from pagoda.layers.quantization import group_gemm
    from pagoda.layers.quantization.gguf_blocks import byte_groups, scale_factors
    from tests.layers.quantization.test_gguf_blocks import random_rows
    rows = torch.from_numpy(random_rows("Q6_K", 8, 256, seed=7))
    codes, scale, low, group = byte_groups(rows, "Q6_K")
    factors = scale_factors(rows, "Q6_K")
    factors.low_factor[3, 0] = -32 * 4096.0  # d = 4096: -32 d is no float16
    monkeypatch.setattr(group_gemm, "FACTORED_SCALES_IN_PLANES", True)
    assert GroupQuantWeight(codes, scale, low, group, 8,
                            factors=scale_factors(rows, "Q6_K")).factored == 1
    held = GroupQuantWeight(codes, scale, low, group, 8, factors=factors)
    assert held.sub_words is None and held.scale_pairs is not None and not held.factored
    monkeypatch.setattr(group_gemm, "FACTORED_SCALES_IN_PLANES", False)
    off = GroupQuantWeight(codes, scale, low, group, 8, factors=scale_factors(rows, "Q6_K"))
    assert off.sub_words is None and off.scale_pairs is not None


@pytest.mark.parametrize("layout", ["int8-g16", "int8-g32-centred", "fp8-row"])
def test_the_census_finds_the_few_token_kernels_loop(layout):
    """`sass_census.py --few-tokens` counts a loop of tensor-core products that converts no
    code with an integer conversion (I2F, a quarter of the rate of the OR and subtraction
    that decode bytes; with it GGUF Q8_0 decoded an 8B at 4.61 ms a token on an H100,
    against 3.48 for FP8's bytes); the float8 one converts its codes in pairs (F2FP)."""
    from bench.kernels.sass_census import compile_few_tokens, cuobjdump, main_loop
    opcodes = main_loop(cuobjdump(compile_few_tokens(layout, 64, 16, 4, 3).asm["cubin"]))
    assert {"HMMA", "HGMMA"} & set(opcodes), opcodes
    assert "I2F" not in opcodes
    if layout == "fp8-row":
        assert "F2FP" in opcodes


def test_centred_bytes_load_no_mins_and_issue_fewer_instructions():
    """GGUF Q8_0's codes without mins, at the few-token tile of up to 16 tokens: the loop
    copies fewer bytes a step (no mins) and issues fewer instructions than the same codes
    with their mins (324 against 326 a thread a step, in float16 products)."""
    import collections

    from bench.kernels.sass_census import compile_few_tokens, cuobjdump, main_loop
    loops = {layout: main_loop(cuobjdump(compile_few_tokens(layout, 256, 16, 4, 5).asm["cubin"]))
             for layout in ("int8-g32", "int8-g32-centred")}
    copies = {layout: collections.Counter(loop)["LDGSTS"] for layout, loop in loops.items()}
    assert copies["int8-g32-centred"] < copies["int8-g32"], copies
    assert len(loops["int8-g32-centred"]) < len(loops["int8-g32"])


def loaded_in_loop(sass: str) -> dict[str, list[str]]:
    """The registers the planes loop loads synchronously (LDG), and the instructions after
    such a load, in the same pass of the loop, that read one of them."""
    from bench.kernels.sass_census import main_loop_lines
    loaded, read_after_load = [], []
    for line in (line.strip() for line in main_loop_lines(sass)):
        sources = line.split(",", 1)[-1]  # (the destination comes first)
        if loaded and any(re.search(rf"\b{register}\b", sources) for register in loaded):
            read_after_load.append(line)
        if (load := re.search(r"\bLDG\.E\S*\s+(R\d+)", line)):
            loaded.append(load.group(1))
    return {"loaded": loaded, "read_after_load": read_after_load}


@pytest.mark.parametrize("activations", ["fp32", "bf16"])
@pytest.mark.parametrize("group", [16, 32, 128, 4096])
def test_8_bit_few_token_tiles_fit_hoppers_shared_memory(activations, group):
    """The few-token kernel at the tiles few_tokens_config picks for 8-bit codes, compiled
    for sm_90 as the GPU compiles it (its integer arguments divisible by 16, so the loads
    are pipelined), asks for at most half the H200's 227 KiB of shared memory. (The tiles
    shipped before, 256 outputs in 5 stages of 128 inputs, ask for 299,008 bytes with float32
    activations here, the 292 KiB the H200 refused.)"""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pagoda.layers.quantization.triton_group_gemm import (
        _dot_type,
        _few_tokens_kernel,
        few_tokens_config,
    )
    weight = shaped_weight(4096, 4096, group, 8)
    config = few_tokens_config(1, weight, 132)
    dtype = torch.float32 if activations == "fp32" else torch.bfloat16
    signature = {"x_ptr": f"*{activations}", "codes_ptr": "*u8", "scale_ptr": "*fp16",
                 "low_ptr": "*fp16", "out_ptr": f"*{activations}", "partial_ptr": "*fp32",
                 "count_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
                 "stride_om": "i32"}
    constants = {"K_SPLIT": 4096 // config["splits"], "SPLITS": config["splits"],
                 "GROUP": group, "BITS": 8, "FLOAT8": False, "ROW_SCALE": False,
                 "STEP": config["STEP"], "HAS_LOW": True, "BLOCK_N": config["BLOCK_N"],
                 "BLOCK_T": config["BLOCK_T"], "DOT": _dot_type(dtype, False, 8),
                 "E4M3_BYTES": False, "PDL": True}
    # the divisibility by 16 Triton specializes at run time for these arguments: without it
    # the loads are not pipelined and the shared memory asked for is a fraction of the GPU's
    divisible = [name for name in signature if name != "M"]
    source = ASTSource(fn=_few_tokens_kernel, constexprs=constants,
                       signature={**signature, **dict.fromkeys(constants, "constexpr")},
                       attrs={(_few_tokens_kernel.arg_names.index(name),):
                              [["tt.divisibility", 16]] for name in divisible})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={
        "num_warps": config["num_warps"], "num_stages": config["num_stages"]})
    assert kernel.metadata.shared <= 232448 // 2, kernel.metadata.shared


def _one_token_int4_for_hopper(group: int) -> dict:
    from pagoda.layers.quantization.triton_group_gemm import _one_token_kernel
    return compile_for_cuda(_one_token_kernel, {
        "x_ptr": "*bf16", "words_ptr": "*i32", "scale_ptr": "*fp16", "low_ptr": "*fp16",
        "out_ptr": "*bf16", "partial_ptr": "*fp32", "count_ptr": "*i32", **NORM_ARGUMENTS,
        "N": "i32", "stride_om": "i32", "one_bits": "i32"}, {
        "SPLIT_ROWS": 256, "SPLITS": 4, "PERIOD": min(group // 2, 256), "GROUP": group,
        "HAS_LOW": True, "ROWS": 16, "BLOCK_W": 32, "PDL": True})


@pytest.mark.parametrize("group", [128, 4096])
def test_the_one_token_int4_kernel_compiles_for_hopper(group):
    _one_token_int4_for_hopper(group)


def test_the_one_token_int4_kernel_requests_weights_before_waiting():
    """With programmatic dependent launch, its first tile of weights (which no kernel
    writes) is loaded before the wait for the previous kernel; activations after it."""
    ptx = _one_token_int4_for_hopper(128)["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    first_load = re.search(r"\bld\.global", ptx).start()
    assert -1 < first_load < wait
    assert re.search(r"\bst\.global", ptx).start() > wait


def test_the_byte_units_prmt_puts_each_code_byte_in_the_mantissa_of_one():
    """PTX's prmt as documented (result byte i is byte selector nibble i of the eight bytes
    of b:a; a selector's fourth bit, sign replication, is never set here), run on the
    _byte_units_ptx strings: byte k of a word becomes 1 + code / ASM_BYTE_UNIT, as the
    interpreter's shift and mask make 1 + code / BYTE_UNIT."""
    import struct

    from pagoda.layers.quantization.triton_group_gemm import (
        ASM_BYTE_UNIT,
        _byte_units_ptx,
    )

    def prmt(a: int, b: int, selector: int) -> int:
        pool = (b << 32 | a).to_bytes(8, "little")
        assert not selector & 0x8888
        return int.from_bytes(bytes(pool[selector >> 4 * i & 7] for i in range(4)), "little")

    generator = torch.Generator().manual_seed(0)
    for word in torch.randint(0, 2 ** 32, (64,), generator=generator, dtype=torch.int64):
        word = int(word)
        for byte in range(4):
            b, selector = re.fullmatch(r"prmt\.b32 \$0, \$1, (0x[0-9A-F]+), (0x[0-9A-F]+);",
                                       _byte_units_ptx(byte)).groups()
            bits = prmt(word, int(b, 16), int(selector, 16))
            value = struct.unpack("<f", bits.to_bytes(4, "little"))[0]
            code = word >> 8 * byte & 0xFF
            assert value == 1 + code / ASM_BYTE_UNIT.value, (hex(word), byte)


@pytest.mark.parametrize(("group", "shared_zero"), [(32, 128), (128, None)])
def test_the_one_token_byte_kernel_decodes_each_code_in_one_prmt_on_hopper(group, shared_zero):
    """On a GPU (ASM) a code byte becomes a float in one PRMT, the byte and 1.0's upper bytes
    put in place at once: four a word of four codes, and no shift or mask of them."""
    from pagoda.layers.quantization.triton_group_gemm import _one_token_kernel
    asm = compile_for_cuda(_one_token_kernel, {
        "x_ptr": "*bf16", "words_ptr": "*i32", "scale_ptr": "*fp16", "low_ptr": "*fp16",
        "out_ptr": "*bf16", "partial_ptr": "*fp32", "count_ptr": "*i32", **NORM_ARGUMENTS,
        "N": "i32", "stride_om": "i32", "one_bits": "i32"}, {
        "SPLIT_ROWS": 256, "SPLITS": 4, "PERIOD": min(group, 256), "GROUP": group,
        "HAS_LOW": shared_zero is None, "SHARED_ZERO": shared_zero, "ROWS": 16,
        "BLOCK_W": 32, "ASM": True, "PDL": True, "BITS": 8})
    selectors = re.findall(r"prmt\.b32\s+%r\d+, %r\d+, 0x3F800000, (0x76[0-3]4);", asm["ptx"])
    assert sorted(set(selectors)) == ["0x7604", "0x7614", "0x7624", "0x7634"]
    assert "0x7F8000" not in asm["ptx"] and "8355840" not in asm["ptx"]  # no mask


def test_fp8_rows_compiles_for_hopper():
    from pagoda.layers.quantization.triton_group_gemm import _fp8_rows_kernel
    compile_for_cuda(_fp8_rows_kernel, {"x_ptr": "*bf16", "out_ptr": "*fp8e4nv",
                                        "scale_ptr": "*fp32", "K": "i32", "stride_x": "i32"},
                     {"FP8_MAX": 448.0, "BLOCK_K": 16384, "PDL": True})


if __name__ == "__main__":
    print(MARKER + json.dumps(kernel_errors()))
