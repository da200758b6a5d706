"""A table's lookup in one launch: the rows of a GroupQuantWeight at a few indices (an
embedding's tokens), decoded from its codes and scales straight into the activations' type.
The torch form of the same (`GroupQuantWeight.rows` off CUDA) takes some thirty launches a
lookup (unpacking, gathering, scaling, converting); this takes one, which a decode step of a
GGUF model makes once. Codes in planes (4-bit nibbles or byte planes) and codes a byte each
held by input, with scales and mins as step words or as their own arrays, integer zero
points (or one for every group: the scales then in pairs in byte planes, alone for bytes a
code) or none; other forms (halves, float8, factored scales) keep the torch path."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.layers.quantization.group_gemm import FP8, GroupQuantWeight
from pagoda.layers.quantization.triton_group_gemm import (
    BYTE_PLANE_ROWS_T,
    PLANE_ROWS_T,
    _word_halves,
)

BLOCK_INPUTS = 1024  # inputs a program decodes


def takes_rows(weight: GroupQuantWeight) -> bool:
    """Whether the kernel decodes lookups of `weight`'s rows: codes in planes or a byte each
    (not halves, float8 or factored scales)."""
    if weight.factored or weight.codes.dtype == FP8:
        return False
    return weight.planes or weight.bits == 8


def looked_up_rows(weight: GroupQuantWeight, index: torch.Tensor, scale: float | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """Rows `index` of `weight` ([len(index), in] of `dtype`), times `scale` where given,
    decoded in float32 as GroupQuantWeight.rows decodes them (as `takes_rows` allows)."""
    outputs = index.reshape(-1).contiguous()
    out = torch.empty(outputs.numel(), weight.in_features, dtype=dtype, device=index.device)
    if outputs.numel() == 0:
        return out
    words = weight.step_words if weight.scale_pairs is None else weight.scale_pairs
    scales = words if words is not None else weight.scale
    lows = weight.zeros if weight.holds_zero_points else weight.low
    grid = (outputs.numel(), triton.cdiv(weight.in_features, BLOCK_INPUTS))
    _rows_kernel[grid](
        weight.codes, scales, lows if lows is not None else scales, outputs, out,
        weight.out_features, weight.in_features, 1.0 if scale is None else scale,
        PLANE_BITS=weight.bits if weight.planes else 0, GROUP=weight.group_size,
        WORDS=words is not None, HAS_LOW=weight.holds_mins,
        ZERO_POINTS=weight.holds_zero_points, SCALED=scale is not None,
        SHARED_ZERO=weight.shared_zero, BLOCK=BLOCK_INPUTS)
    return out


@triton.jit
def _rows_kernel(codes_ptr, scale_ptr, low_ptr, index_ptr, out_ptr, N, K, table_scale,
                 PLANE_BITS: tl.constexpr, GROUP: tl.constexpr, WORDS: tl.constexpr,
                 HAS_LOW: tl.constexpr, ZERO_POINTS: tl.constexpr, SCALED: tl.constexpr,
                 SHARED_ZERO: tl.constexpr, BLOCK: tl.constexpr):
    """out[i, k] for BLOCK inputs k of looked-up row i (output index[i] of the weight):
    (code - zero point) * scale + min, times table_scale with SCALED. Codes: PLANE_BITS 4,
    int16 [K / 4, N] nibble planes; 8, int16 [K / 2, N] byte planes; 0, uint8 [K, N]. The
    scales: WORDS, int32 [groups, N] step words (a float16 scale in the low half, the min's
    float16 or the zero point's byte in the high), or with SHARED_ZERO (where given: every
    group's zero point) int32 [groups / 2, N] scale pairs (group 2 j's float16 in the low
    half of word j, 2 j + 1's in the high); else scale_ptr [groups, N] and low_ptr (mins,
    or uint8 zero points with ZERO_POINTS; neither with SHARED_ZERO)."""
    row = tl.program_id(0)
    k = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = k < K
    n = tl.load(index_ptr + row).to(tl.int64)
    code = _code(codes_ptr, k, ok, n, N, PLANE_BITS).to(tl.float32)
    at = (k // GROUP) * N + n
    if SHARED_ZERO is not None and WORDS:  # scale pairs
        pair = tl.load(scale_ptr + (k // (2 * GROUP)) * N + n, mask=ok, other=0)
        scale, _ = _word_halves(pair >> (16 * ((k // GROUP) % 2)), True)
        value = (code - SHARED_ZERO) * scale.to(tl.float32)
    elif WORDS:
        scale, low = _word_halves(tl.load(scale_ptr + at, mask=ok, other=0), ZERO_POINTS)
        if ZERO_POINTS:
            code -= low
        value = code * scale.to(tl.float32)
        if HAS_LOW:
            value += low
    else:
        if ZERO_POINTS:
            code -= tl.load(low_ptr + at, mask=ok, other=0).to(tl.float32)
        elif SHARED_ZERO is not None:
            code -= SHARED_ZERO
        value = code * tl.load(scale_ptr + at, mask=ok, other=0.0).to(tl.float32)
        if HAS_LOW:
            value += tl.load(low_ptr + at, mask=ok, other=0.0).to(tl.float32)
    if SCALED:
        value *= table_scale
    tl.store(out_ptr + row.to(tl.int64) * K + k, value.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _code(codes_ptr, k, ok, n, N, PLANE_BITS: tl.constexpr):
    """The codes of output n at inputs k (as _rows_kernel lays them out), as int32."""
    if PLANE_BITS == 0:
        code = tl.load(codes_ptr + k.to(tl.int64) * N + n, mask=ok, other=0).to(tl.int32)
    else:
        ROWS: tl.constexpr = PLANE_ROWS_T if PLANE_BITS == 4 else BYTE_PLANE_ROWS_T
        STEP: tl.constexpr = (16 // PLANE_BITS) * ROWS
        in_step = k % STEP
        row = (k // STEP) * ROWS + in_step % ROWS
        word = tl.load(codes_ptr + row.to(tl.int64) * N + n, mask=ok, other=0).to(tl.int32)
        code = (word >> ((in_step // ROWS) * PLANE_BITS)) & ((1 << PLANE_BITS) - 1)
    return code
