"""The Triton kernels behind GroupQuantWeight: y = x W^T with W held as codes and a scale (and
a min) per group of inputs, decoded in registers tile by tile (the weights are read once, in
their quantized bytes) and multiplied. Four kernels:

- 4-bit codes in planes (every call): each int16 holds four codes of one output, and one
  LOP3 turns two of them into two bfloat16 operands of the tensor-core product (no
  conversion instruction); per step of 128 inputs, four [outputs, 32] products. Up to
  FEW_TOKENS tokens the inputs are split over several programs as in the few-token kernel
  below; on the H200 1.4x the one-token GEMV at one token (groups of 128), 1.6x the
  few-token kernel at 1-16 tokens (groups of 32) and 1.5-2.0x the larger kernel at 512 and
  2048 tokens. Codes of at most 7 bits in byte planes (GGUF's 5 and 6-bit types; off with
  PAGODA_BYTE_PLANES=0) take the same kernel, two bytes to an int16 and steps of 32 inputs;
- one-token calls of 4-bit codes in halves, in groups of a multiple of 64: a GEMV on the
  CUDA cores (no tensor-core tile padded from one row), the codes read as int32 words, each
  nibble made a float by a shift and one LOP3 and multiplied into a sum of its own (no sums
  exchanged between threads until a group's end);
- calls of at most FEW_TOKENS tokens (decode): each program computes a tile of BLOCK_N
  outputs by the call's (up to 32) tokens, as W x^T, so the weights fill the wide side of
  the tensor-core product and the tokens (padded to 16) the narrow one. The inputs are split
  over several programs so that the weight reads spread over the whole GPU; the last program
  of a tile to finish adds the splits' float32 partial sums (no second launch). Float8
  values with a scale per row multiply in float16 (one conversion per weight, exact for
  E4M3) and are scaled once at the end; on the H200 this read an 8B layer's FP8 weights at
  1.5x the rate of the kernel below.
- larger calls: BLOCK_M tokens by BLOCK_N outputs per program, the decoded weights
  multiplied with the matching tile of x.

Calls of many tokens on codes in planes decode the weights first and multiply with cuBLAS
(`triton_plane_decode`). A gate-up product of few tokens on the planes or the few-token kernel
applies its gated activation itself (`takes_gated`): each tile holds gates and their ups, and
its last step stores act(gate) * up, in place of the activation's own launch. An RMSNorm
between two such products of few tokens runs in them (group_gemm_then_norm, then group_gemm's
`normed`): the first's last step stores the new residual, that times the norm's weight and
each row's sums of squares over its tile, and the second divides its sums by the rows' rms,
in place of the norm's own launch and the waits around it.

No autotuning and no host sync: the configuration is a function of the shapes, so CUDA
graphs capture it. Also here: per-token FP8 quantization of activations in one launch
(fp8_rows)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagoda.layers.dependent_launch import (
    dependent_launch,
    launch_next_kernel,
    wait_for_previous_kernel,
)
from pagoda.layers.fused import gated_value, store_float8_row
from pagoda.layers.quantization.group_gemm import (
    BYTE_PLANE_ROWS,
    CHUNK,
    FEW_TOKENS,
    FP8,
    HALF,
    PLANE_ROWS,
    SMALL_M,
    GroupQuantWeight,
)
from pagoda.layers.quantization.triton_plane_decode import decoded_product, decodes_first
from pagoda.layers.tile_counters import tile_counters
from pagoda.layers.triton_support import cuda_capability, has_e4m3

# few-token calls (and calls of at most SMALL_M tokens in the tile kernel) split the inputs
# into about TARGET_PROGRAMS programs per streaming multiprocessor, each split covering at
# least MIN_SPLIT_INPUTS inputs (a sweep on the H200 found this fastest at one token;
# PAGODA_MIN_SPLIT_INPUTS names another, a benchmark's way to time one; read once)
TARGET_PROGRAMS = 4
MIN_SPLIT_INPUTS = int(os.environ.get("PAGODA_MIN_SPLIT_INPUTS", "512"))
# ... and NARROW_MIN_SPLIT_INPUTS where too few output tiles leave multiprocessors idle
NARROW_MIN_SPLIT_INPUTS = 128
MIN_SPLIT_ROWS = 32  # the one-token 4-bit kernel's: rows of bytes (two inputs each) a split
# gate-up products of few tokens apply the gated activation to their outputs (takes_gated;
# PAGODA_GATED_IN_PRODUCT=0: a launch of its own after them); read once
GATED_IN_PRODUCT = os.environ.get("PAGODA_GATED_IN_PRODUCT", "1") != "0"


@triton.jit
def _decoded_step(acc, x_ptr, codes, k, m, m_ok, n, n_ok, N, stride_xm, scale_ptr, low_ptr,
                  GROUP: tl.constexpr, STEP: tl.constexpr, HAS_LOW: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, E4M3_BYTES: tl.constexpr,
                  SHARED_ZERO: tl.constexpr = None):
    """acc + x[m, k:k+STEP] @ decode(codes [STEP, BLOCK_N]); the STEP inputs lie in one group.
    SHARED_ZERO (no min held): each group's min is -SHARED_ZERO times its scale."""
    group = k // GROUP
    scale = tl.load(scale_ptr + group * N + n, mask=n_ok, other=0.0).to(tl.float32)
    weights = codes_as(codes, tl.float32, E4M3_BYTES) * scale[None, :]
    if HAS_LOW:
        low = tl.load(low_ptr + group * N + n, mask=n_ok, other=0.0).to(tl.float32)
        weights += low[None, :]
    elif SHARED_ZERO is not None:
        weights -= (scale * SHARED_ZERO)[None, :]
    columns = k + tl.arange(0, STEP)
    x = tl.load(x_ptr + m[:, None] * stride_xm + columns[None, :], mask=m_ok[:, None],
                other=0.0)
    return acc + tl.dot(x, weights.to(x.dtype), input_precision=DOT_PRECISION)


@triton.jit
def _group_gemm_kernel(x_ptr, codes_ptr, scale_ptr, low_ptr, out_ptr, partial_ptr, count_ptr,
                       M, N, stride_xm, stride_ck, stride_cn, K_SPLIT: tl.constexpr,
                       SPLITS: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                       STEP: tl.constexpr, HAS_LOW: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       E4M3_BYTES: tl.constexpr, PDL: tl.constexpr,
                       SHARED_ZERO: tl.constexpr = None):
    """out = x W^T for a [BLOCK_M, BLOCK_N] tile over one split of the inputs. Codes [K, N]
    (4 bits: [K / 2, N] packed halves); E4M3_BYTES: float8 values given as their bytes;
    SHARED_ZERO: see _decoded_step."""
    wait_for_previous_kernel(PDL)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    m_ok, n_ok = m < M, n < N
    rows = tl.arange(0, STEP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = split * K_SPLIT
    if BITS == 4:  # a chunk of 2 * STEP inputs per STEP rows of bytes
        for offset in range(0, K_SPLIT, 2 * STEP):
            k = first + offset
            packed = tl.load(codes_ptr + (k // 2 + rows)[:, None] * stride_ck
                             + n[None, :] * stride_cn,
                             mask=n_ok[None, :])
            acc = _decoded_step(acc, x_ptr, packed & 15, k, m, m_ok, n, n_ok, N, stride_xm,
                                scale_ptr, low_ptr, GROUP, STEP, HAS_LOW, DOT_PRECISION,
                                False, SHARED_ZERO)
            acc = _decoded_step(acc, x_ptr, packed >> 4, k + STEP, m, m_ok, n, n_ok, N,
                                stride_xm, scale_ptr, low_ptr, GROUP, STEP, HAS_LOW,
                                DOT_PRECISION, False, SHARED_ZERO)
    else:
        for offset in range(0, K_SPLIT, STEP):
            k = first + offset
            codes = tl.load(codes_ptr + (k + rows)[:, None] * stride_ck + n[None, :] * stride_cn,
                            mask=n_ok[None, :])
            acc = _decoded_step(acc, x_ptr, codes, k, m, m_ok, n, n_ok, N, stride_xm,
                                scale_ptr, low_ptr, GROUP, STEP, HAS_LOW, DOT_PRECISION,
                                E4M3_BYTES, SHARED_ZERO)
    # (columns past N load undefined codes: their sums are never stored)
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    _store_split_sums(acc, out_ptr, m[:, None] * N + n[None, :], m_ok[:, None] & n_ok[None, :],
                      partial_ptr, M * N, count_ptr, tile, split, SPLITS)


@triton.jit
def _outputs_by_tokens_tile(N, M, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                            GATED: tl.constexpr = 0):
    """A W x^T program's outputs n and tokens t (axes 0 and 1 of the grid), its split of the
    inputs (axis 2), and which of n and t exist. GATED: the outputs are [gate | up] halves
    of N / 2, and a tile's first BLOCK_N / 2 outputs are gates, its others their ups."""
    if GATED:
        HALF_N: tl.constexpr = BLOCK_N // 2
        i = tl.arange(0, BLOCK_N)
        gate = tl.program_id(0) * HALF_N + i % HALF_N
        n = gate + (i // HALF_N) * (N // 2)
        n_ok = gate < N // 2
    else:
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    return n, t, tl.program_id(2), n_ok, t < M


@triton.jit
def _few_tokens_kernel(x_ptr, codes_ptr, scale_ptr, low_ptr, out_ptr, partial_ptr, count_ptr,
                       norm_ptr, residual_ptr, residual_out_ptr, squares_ptr, norm_tiles,
                       norm_width, norm_eps,
                       M, N, K, stride_xm, stride_om, K_SPLIT: tl.constexpr,
                       SPLITS: tl.constexpr,
                       GROUP: tl.constexpr, BITS: tl.constexpr, FLOAT8: tl.constexpr,
                       ROW_SCALE: tl.constexpr, STEP: tl.constexpr, HAS_LOW: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, DOT: tl.constexpr,
                       E4M3_BYTES: tl.constexpr, PDL: tl.constexpr, GATED: tl.constexpr = 0,
                       NORM: tl.constexpr = 0, NORM_TILES: tl.constexpr = 1,
                       LAUNCH_LATE: tl.constexpr = 0, SHARED_ZERO: tl.constexpr = None):
    """out[t, n] for BLOCK_N outputs n by BLOCK_T tokens t over one split of the inputs,
    accumulated as W x^T ([BLOCK_N, BLOCK_T]). Codes by layout: 4-bit [K / 2, N] packed
    halves, 8-bit integers [K, N], float8 values [N, K] (ROW_SCALE: one scale per row,
    applied once to the sums; E4M3_BYTES: given as their bytes). SHARED_ZERO (integer
    codes, no min held): each group's min is -SHARED_ZERO times its scale. GATED: see
    _store_output; NORM (and the norm_* arguments) and LAUNCH_LATE: see _store_products."""
    wait_for_previous_kernel(PDL, not LAUNCH_LATE)
    n, t, split, n_ok, t_ok = _outputs_by_tokens_tile(N, M, BLOCK_N, BLOCK_T, GATED)
    steps = tl.arange(0, STEP)
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    first = split * K_SPLIT
    tl.static_assert(FLOAT8 or BITS == 4 or DOT != 2, "bfloat16 holds 4-bit codes only")
    if BITS == 4:  # a chunk of 2 * STEP inputs per STEP rows of bytes
        for offset in range(0, K_SPLIT, 2 * STEP):
            k = first + offset
            packed = tl.load(codes_ptr + (k // 2 + steps)[None, :] * N + n[:, None],
                             mask=n_ok[:, None])
            acc = _few_tokens_step(acc, packed & 15, k, x_ptr, t, t_ok, n, n_ok, N, stride_xm,
                                   scale_ptr, low_ptr, GROUP, STEP, HAS_LOW, FLOAT8, ROW_SCALE, DOT,
                                   False, SHARED_ZERO)
            acc = _few_tokens_step(acc, packed >> 4, k + STEP, x_ptr, t, t_ok, n, n_ok, N,
                                   stride_xm, scale_ptr, low_ptr, GROUP, STEP, HAS_LOW, FLOAT8,
                                   ROW_SCALE, DOT, False, SHARED_ZERO)
    else:
        for offset in range(0, K_SPLIT, STEP):
            k = first + offset
            if FLOAT8:
                at = n[:, None] * K + (k + steps)[None, :]
            else:
                at = (k + steps)[None, :] * N + n[:, None]
            codes = tl.load(codes_ptr + at, mask=n_ok[:, None])
            acc = _few_tokens_step(acc, codes, k, x_ptr, t, t_ok, n, n_ok, N, stride_xm,
                                   scale_ptr, low_ptr, GROUP, STEP, HAS_LOW, FLOAT8, ROW_SCALE, DOT,
                                   E4M3_BYTES, SHARED_ZERO)
    if ROW_SCALE:
        acc *= tl.load(scale_ptr + n, mask=n_ok, other=0.0)[:, None]
    # (outputs past N load undefined codes: their sums are never stored)
    _store_products(acc, out_ptr, stride_om, n, t, n_ok, t_ok, N, M, partial_ptr, count_ptr,
                    split, SPLITS, GATED, NORM, norm_ptr, residual_ptr, residual_out_ptr,
                    squares_ptr, norm_tiles, norm_width, norm_eps, NORM_TILES, PDL,
                    LAUNCH_LATE)


@triton.jit
def _few_tokens_step(acc, codes, k, x_ptr, t, t_ok, n, n_ok, N, stride_xm, scale_ptr, low_ptr,
                     GROUP: tl.constexpr, STEP: tl.constexpr, HAS_LOW: tl.constexpr,
                     FLOAT8: tl.constexpr, ROW_SCALE: tl.constexpr, DOT: tl.constexpr,
                     E4M3_BYTES: tl.constexpr, SHARED_ZERO: tl.constexpr = None):
    """acc + decode(codes [BLOCK_N, STEP]) @ x[t, k:k+STEP]^T; the STEP inputs lie in one
    group. DOT: the product's type, 0 float32, 1 float16, 2 bfloat16, 3 float16 from wider
    activations (saturated to its range). SHARED_ZERO: see _few_tokens_kernel (its min,
    -SHARED_ZERO times the scale in the product's type: exact, a power of two)."""
    x = tl.load(x_ptr + t[None, :] * stride_xm + (k + tl.arange(0, STEP))[:, None],
                mask=t_ok[None, :], other=0.0)
    dot_type = tl.float32 if DOT == 0 else tl.bfloat16 if DOT == 2 else tl.float16
    x = _half_saturating(x.to(tl.float32)) if DOT == 3 else x.to(dot_type)
    if ROW_SCALE:  # scaled after the sums
        acc = tl.dot(codes_as(codes, dot_type, E4M3_BYTES), x, acc, input_precision="ieee")
    elif FLOAT8:
        scale = tl.load(scale_ptr + (k // GROUP) * N + n, mask=n_ok, other=0.0)
        acc += tl.dot(codes_as(codes, dot_type, E4M3_BYTES), x,
                      input_precision="ieee") * scale[:, None]
    else:
        group = k // GROUP
        scale = tl.load(scale_ptr + group * N + n, mask=n_ok, other=0.0).to(dot_type)
        weights = _centred_codes(codes, DOT, SHARED_ZERO) * scale[:, None]
        if HAS_LOW:
            weights += tl.load(low_ptr + group * N + n, mask=n_ok,
                               other=0.0).to(dot_type)[:, None]
        acc = tl.dot(weights, x, acc, input_precision="ieee")
    return acc


@triton.jit
def _centred_codes(codes, DOT: tl.constexpr, SHARED_ZERO: tl.constexpr):
    """Integer codes less SHARED_ZERO (none: 0) in the product's type (DOT), exactly. The
    16-bit types take no conversion instruction (on a GPU a conversion from an integer
    issues at a quarter of the rate of the OR and subtraction that replace it): each code
    is OR-ed into the mantissa of 1024 (float16, whose mantissa holds 8-bit codes) or 128
    (bfloat16: codes to 7 bits, as 4-bit codes are), which is subtracted with the zero
    point."""
    ZERO: tl.constexpr = 0 if SHARED_ZERO is None else SHARED_ZERO
    if DOT == 0:
        centred = codes.to(tl.float32) - ZERO
    elif DOT == 2:
        centred = (codes.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True) - (128.0 + ZERO)
    else:
        centred = (codes.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + ZERO)
    return centred


HALF_T: tl.constexpr = tl.constexpr(HALF)  # HALF inside kernels
PLANE_ROWS_T: tl.constexpr = tl.constexpr(PLANE_ROWS)  # PLANE_ROWS inside kernels
BYTE_PLANE_ROWS_T: tl.constexpr = tl.constexpr(BYTE_PLANE_ROWS)  # BYTE_PLANE_ROWS inside


@triton.jit
def _planes_kernel(x_ptr, codes_ptr, scale_ptr, low_ptr, out_ptr, partial_ptr, count_ptr,
                   norm_ptr, residual_ptr, residual_out_ptr, squares_ptr, norm_tiles, norm_width,
                   norm_eps, M, N, stride_xm, stride_om, K_SPLIT: tl.constexpr,
                   SPLITS: tl.constexpr,
                   GROUP: tl.constexpr,
                   STEP_IN_GROUP: tl.constexpr, HAS_LOW: tl.constexpr,
                   ZERO_POINTS: tl.constexpr, STEP_SUMS: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_T: tl.constexpr, DOT: tl.constexpr, ASM: tl.constexpr,
                   PDL: tl.constexpr, PLANE_BITS: tl.constexpr = 4, GATED: tl.constexpr = 0,
                   FACTORED: tl.constexpr = 0, SUPER: tl.constexpr = 0,
                   NORM: tl.constexpr = 0, NORM_TILES: tl.constexpr = 1,
                   LAUNCH_LATE: tl.constexpr = 0, SHARED_ZERO: tl.constexpr = None):
    """out[t, n] for BLOCK_N outputs by BLOCK_T tokens over one split of the inputs, as W x^T, from
    4-bit codes in planes (int16 [K / 4, N]): per step of PLANE_STEP inputs one [PLANE_ROWS,
    BLOCK_N] tile of int16, and per plane q (nibble q: inputs q PLANE_ROWS + j) the decoded weights
    times those inputs' activations. PLANE_BITS 8: codes in byte planes (int16 [K / 2, N]), the same
    with steps of BYTE_PLANE_STEP inputs, BYTE_PLANE_ROWS rows and two planes (bytes). DOT: the
    product's type (0 float32, 1 float16, 2 bfloat16); ASM: bfloat16 planes by inline PTX (a GPU).
    STEP_IN_GROUP: the groups are whole steps (a scale a step), else a scale a plane (each lies in
    one group, as takes_planes requires). ZERO_POINTS: the mins are integer zero points (uint8), and
    the weights' scale multiplies the sums, not the weights: a plane's sums of the codes minus the
    biased zero points (exact). STEP_SUMS, where a scale covers the step: scale_ptr holds the
    weight's step_words (scale and min or zero point in one int32), and in tiles of up to 32 tokens
    a step's sums of the biased codes as decoded are multiplied by the scale and added to (min -
    bias x scale) or -(zero point + bias) x scale times the step's sums of x (a product with ones),
    in float32 once a step: no arithmetic a weight but the decoding. Else, and in larger tiles
    (whose sums a step outnumber a thread's weights: a 1024-token prefill took twice as long so on
    an H100), the weights are scaled (and their min added) one by one in the product's type.
    STEP_SUMS in groups of one plane or two (GGUF's 32; 64): scale_ptr holds a word a group, and in
    tiles of up to 32 tokens each plane's sums are scaled and its sums of x weighted so (the step's
    words loaded at the end of the step before); in other groups smaller than a step the words are
    applied weight by weight. SHARED_ZERO (where given): every group's zero point, scale_ptr
    holding only the scales; with ZERO_POINTS and STEP_SUMS, in groups of one plane, two
    groups' float16s to a word (group_gemm.scale_pairs: a step's one word in byte planes);
    without STEP_SUMS, as float16s, each min -SHARED_ZERO times its scale (GGUF Q4_0's).
    FACTORED (a GGUF k-quant's scales as its blocks store them,
    group_gemm.factored_words; 1: sub-scales, 2: sub-scales and sub-mins): scale_ptr holds
    the sub-words (four groups' a word) and low_ptr the factor words a super-block of SUPER
    inputs, each group's scale and min their products in float32 (_factored), loaded where
    the words they stand for are. GATED: see _store_output; NORM (and the norm_*
    arguments) and LAUNCH_LATE: see _store_products."""
    wait_for_previous_kernel(PDL, not LAUNCH_LATE)
    n, t, split, n_ok, t_ok = _outputs_by_tokens_tile(N, M, BLOCK_N, BLOCK_T, GATED)
    ROWS: tl.constexpr = PLANE_ROWS_T if PLANE_BITS == 4 else BYTE_PLANE_ROWS_T
    PLANES: tl.constexpr = 16 // PLANE_BITS  # a plane a nibble or a byte of an int16
    STEP: tl.constexpr = PLANES * ROWS
    rows = tl.arange(0, ROWS)
    dot_type = tl.float32 if DOT == 0 else tl.float16 if DOT == 1 else tl.bfloat16
    SUMS_A_STEP: tl.constexpr = STEP_IN_GROUP and STEP_SUMS and BLOCK_T <= 32
    SUMS_A_PLANE: tl.constexpr = (not STEP_IN_GROUP and (GROUP == ROWS or GROUP == 2 * ROWS)
                                  and STEP_SUMS and BLOCK_T <= 32)
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    if SUMS_A_PLANE:  # the first step's four words (a plane's group each), then each
        # step's loaded at the end of the step before, as SUMS_A_STEP's
        last_k = split * K_SPLIT + K_SPLIT - STEP
        if FACTORED:
            scales, lows, factors = _factored_words(scale_ptr, low_ptr, split * K_SPLIT,
                                                    GROUP, SUPER, n, n_ok, N, FACTORED)
        else:
            word0, word1, word2, word3 = _plane_words(scale_ptr, split * K_SPLIT, GROUP, ROWS,
                                                      PLANES, n, n_ok, N, SHARED_ZERO is not None)
    if SUMS_A_STEP:  # scale_ptr: a word a group and output (see _step_scales), each loaded
        # at the end of the step before its own: the pipeline's copies take only what feeds
        # a product, and a load waited for in its own step would stall it
        last_k = split * K_SPLIT + K_SPLIT - STEP
        if FACTORED:
            scales, lows, factors = _factored_words(scale_ptr, low_ptr, split * K_SPLIT,
                                                    GROUP, SUPER, n, n_ok, N, FACTORED)
        else:
            words = _step_words(scale_ptr, split * K_SPLIT // GROUP, n, n_ok, N)
    for offset in range(0, K_SPLIT, STEP):
        k = split * K_SPLIT + offset
        first_row = tl.multiple_of(k // PLANES, ROWS)
        packed = tl.load(codes_ptr + (first_row + rows)[None, :] * N + n[:, None],
                         mask=n_ok[:, None])
        if SUMS_A_STEP:
            sums = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
            # x's sums in the sums' layout (every row the same: no reduction across threads)
            x_sums = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        elif FACTORED and not SUMS_A_PLANE:  # weight by weight: the step's groups' words,
            # loaded once (each plane's group scaled from them below)
            scales, lows, factors = _factored_words(scale_ptr, low_ptr, k, GROUP, SUPER, n,
                                                    n_ok, N, FACTORED)
        elif STEP_IN_GROUP:  # one scale and min a step, applied weight by weight
            scale, low = _plane_scale_and_low(scale_ptr, low_ptr, k // GROUP, n, n_ok, N,
                                              HAS_LOW, ZERO_POINTS, STEP_SUMS, DOT,
                                              SHARED_ZERO)
        if PLANES == 2:  # both planes' activations in one load (one plane's, 2 bytes a
            # thread, are too few for the pipeline's asynchronous copies)
            x_first, x_second = _two_planes_of_x(x_ptr, k, t, t_ok, stride_xm, ROWS)
        for q in tl.static_range(PLANES):
            if FACTORED and not SUMS_A_PLANE and not SUMS_A_STEP:  # weight by weight
                scale, low = _factored(scales, lows, factors, (k + q * ROWS) // GROUP)
                scale, low = scale.to(dot_type), low.to(dot_type)
            elif not STEP_IN_GROUP and not SUMS_A_PLANE:  # one a plane
                scale, low = _plane_scale_and_low(scale_ptr, low_ptr, (k + q * ROWS) // GROUP,
                                                  n, n_ok, N, HAS_LOW, ZERO_POINTS, STEP_SUMS,
                                                  DOT, SHARED_ZERO)
            if PLANES == 2:
                x = (x_first if q == 0 else x_second).to(dot_type)
            else:
                x = tl.load(x_ptr + t[None, :] * stride_xm + (k + q * ROWS + rows)[:, None],
                            mask=t_ok[None, :], other=0.0).to(dot_type)
            plane = biased_plane(packed, q, DOT, ASM, PLANE_BITS)
            if SUMS_A_PLANE:  # the plane's biased codes' sums, its bias and min off at once
                ones = tl.full((BLOCK_N, ROWS), 1.0, dot_type)
                if FACTORED:
                    scale, low = _factored(scales, lows, factors, (k + q * ROWS) // GROUP)
                    scale, x_sums_weight = _sums_scales(scale, low, False, DOT)
                else:
                    word = word0 if q == 0 else word1 if q == 1 else word2 if q == 2 else word3
                    scale, x_sums_weight = _step_scales(word, ZERO_POINTS, DOT, SHARED_ZERO)
                sums = tl.dot(plane, x, input_precision="ieee")
                x_sums = tl.dot(ones, x, input_precision="ieee")
                acc += sums * scale[:, None]
                acc += x_sums * x_sums_weight[:, None]
            elif SUMS_A_STEP:  # the biased codes' sums; bias and min come off once a step
                sums = tl.dot(plane, x, sums, input_precision="ieee")
                ones = tl.full((BLOCK_N, ROWS), 1.0, dot_type)
                x_sums = tl.dot(ones, x, x_sums, input_precision="ieee")
            elif not ZERO_POINTS:
                weights = _unbiased(plane, DOT) * scale[:, None]
                if HAS_LOW or SHARED_ZERO is not None:
                    weights += low[:, None]
                acc = tl.dot(weights, x, acc, input_precision="ieee")
            else:
                codes = plane - low[:, None]
                acc += tl.dot(codes, x, input_precision="ieee") * scale[:, None]
        if SUMS_A_PLANE:
            if FACTORED:
                scales, lows, factors = _factored_words(
                    scale_ptr, low_ptr, tl.minimum(k + STEP, last_k), GROUP, SUPER, n, n_ok,
                    N, FACTORED)
            else:
                word0, word1, word2, word3 = _plane_words(
                    scale_ptr, tl.minimum(k + STEP, last_k), GROUP, ROWS, PLANES, n, n_ok, N,
                    SHARED_ZERO is not None)
        if SUMS_A_STEP:
            if FACTORED:
                scale, low = _factored(scales, lows, factors, k // GROUP)
                scale, x_sums_weight = _sums_scales(scale, low, False, DOT)
            else:
                scale, x_sums_weight = _step_scales(words, ZERO_POINTS, DOT)
            acc += sums * scale[:, None] + x_sums_weight[:, None] * x_sums
            if FACTORED:  # (the next step's words loaded after the sums, as they must be)
                scales, lows, factors = _factored_words(
                    scale_ptr, low_ptr, tl.minimum(k + STEP, last_k), GROUP, SUPER, n, n_ok,
                    N, FACTORED)
            else:
                words = _step_words(scale_ptr, tl.minimum(k + STEP, last_k) // GROUP, n,
                                    n_ok, N)
    # (outputs past N load undefined codes: their sums are never stored)
    _store_products(acc, out_ptr, stride_om, n, t, n_ok, t_ok, N, M, partial_ptr, count_ptr,
                    split, SPLITS, GATED, NORM, norm_ptr, residual_ptr, residual_out_ptr,
                    squares_ptr, norm_tiles, norm_width, norm_eps, NORM_TILES, PDL,
                    LAUNCH_LATE)


@triton.jit
def _two_planes_of_x(x_ptr, k, t, t_ok, stride_xm, ROWS: tl.constexpr):
    """Tokens t's activations at inputs k + j and k + ROWS + j (j < ROWS): two [ROWS,
    BLOCK_T] tiles from one load."""
    rows = tl.arange(0, ROWS)
    planes = tl.arange(0, 2)
    at = (x_ptr + t[None, :, None] * stride_xm
          + (k + planes[None, None, :] * ROWS + rows[:, None, None]))
    return tl.split(tl.load(at, mask=t_ok[None, :, None], other=0.0))


@triton.jit
def _plane_scale_and_low(scale_ptr, low_ptr, group, n, n_ok, N, HAS_LOW: tl.constexpr,
                         ZERO_POINTS: tl.constexpr, WORDS: tl.constexpr, DOT: tl.constexpr,
                         SHARED_ZERO: tl.constexpr = None):
    """Outputs n's scale and min in `group` in the product's type; with ZERO_POINTS, the
    scale in float32 and, for the min, the zero point plus the planes' bias (exact). WORDS:
    scale_ptr holds step words (low_ptr unread), or with SHARED_ZERO (where given, the zero
    point of every group) scale pairs; SHARED_ZERO without WORDS: the scales alone, each
    min -SHARED_ZERO times its scale (a power of two: exact)."""
    dot_type = tl.float32 if DOT == 0 else tl.float16 if DOT == 1 else tl.bfloat16
    if SHARED_ZERO is not None and WORDS:  # scale pairs
        pair = _step_words(scale_ptr, group // 2, n, n_ok, N)
        scale, _ = _word_halves(pair >> (16 * (group % 2)), ZERO_POINTS)
        low = tl.zeros_like(scale.to(tl.float32)) + SHARED_ZERO
    elif WORDS:
        scale, low = _word_halves(_step_words(scale_ptr, group, n, n_ok, N), ZERO_POINTS)
        if not ZERO_POINTS:
            low = low.to(dot_type)
    elif ZERO_POINTS:
        scale = tl.load(scale_ptr + group * N + n, mask=n_ok, other=0.0)
        low = tl.load(low_ptr + group * N + n, mask=n_ok, other=0).to(tl.float32)
    else:
        scale, low = _group_scale_and_low(scale_ptr, low_ptr, group, n, n_ok, N, HAS_LOW,
                                          dot_type)
        if SHARED_ZERO is not None:
            low = scale * -SHARED_ZERO
    if ZERO_POINTS:
        scale, low = scale.to(tl.float32), biased(low, DOT).to(dot_type)
    else:
        scale = scale.to(dot_type)
    return scale, low


@triton.jit
def _plane_words(words_ptr, k, GROUP: tl.constexpr, ROWS: tl.constexpr, PLANES: tl.constexpr,
                 n, n_ok, N, PAIRS: tl.constexpr = False):
    """Outputs n's words (int32) in the groups of the (up to four) planes of the step at
    input k, in groups of one plane (of ROWS inputs) or two; four words whatever PLANES
    (those past the step's planes repeat, loading nothing past it). PAIRS (byte planes in
    groups of one plane): scale pairs, the step's one word, its second plane's scale
    shifted into the low half of that plane's word."""
    if PAIRS:
        pair = tl.load(words_ptr + (k // (2 * GROUP)) * N + n, mask=n_ok, other=0)
        return pair, pair >> 16, pair, pair >> 16
    at = words_ptr + (k // GROUP) * N + n
    first = tl.load(at, mask=n_ok, other=0)
    second = tl.load(at + N, mask=n_ok, other=0)
    if GROUP == ROWS and PLANES == 4:
        return first, second, tl.load(at + 2 * N, mask=n_ok, other=0), \
            tl.load(at + 3 * N, mask=n_ok, other=0)
    if GROUP == ROWS:
        return first, second, first, second
    return first, first, second, second


@triton.jit
def _step_words(words_ptr, group, n, n_ok, N):
    """Outputs n's words (int32) in `group`: float16 scale in the low half, float16 min or
    uint8 zero point in the high."""
    return tl.load(words_ptr + group * N + n, mask=n_ok, other=0)


@triton.jit
def _word_halves(words, ZERO_POINTS: tl.constexpr):
    """A word's float16 scale (its low half) and, from its high half, the float16 min or
    the uint8 zero point (as float32)."""
    scale = (words & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    if ZERO_POINTS:
        low = (words >> 16).to(tl.float32)
    else:
        low = (words >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return scale, low


@triton.jit
def _step_scales(words, ZERO_POINTS: tl.constexpr, DOT: tl.constexpr,
                 SHARED_ZERO: tl.constexpr = None):
    """From a step's words, _sums_scales of its scale and min (or zero point; SHARED_ZERO
    where given, the words' high halves unread)."""
    scale, low = _word_halves(words, ZERO_POINTS)
    if SHARED_ZERO is not None:
        low = tl.zeros_like(low) + SHARED_ZERO
    return _sums_scales(scale.to(tl.float32), low, ZERO_POINTS, DOT)


@triton.jit
def _sums_scales(scale, low, ZERO_POINTS: tl.constexpr, DOT: tl.constexpr):
    """From a group's (float32) scale and min (or zero point), what multiplies its biased
    codes' sums (the scale) and what multiplies its sums of x: -(zero point + bias) x
    scale, or min - bias x scale."""
    bias = biased(tl.zeros_like(scale), DOT)
    if ZERO_POINTS:
        x_sums_weight = -(low + bias) * scale
    else:
        x_sums_weight = low - bias * scale
    return scale, x_sums_weight


@triton.jit
def _factored_words(sub_ptr, factors_ptr, k, GROUP: tl.constexpr, SUPER: tl.constexpr, n, n_ok,
                    N, FACTORED: tl.constexpr):
    """Outputs n's words for the group holding input k (group_gemm.factored_words): the
    word of its sub-scales, that of its sub-mins (FACTORED 2; else the sub-scales' again)
    and its super-block's factor word, each a whole int32 load."""
    row = (k // GROUP // 4) * FACTORED
    scales = tl.load(sub_ptr + row * N + n, mask=n_ok, other=0)
    lows = tl.load(sub_ptr + (row + 1) * N + n, mask=n_ok, other=0) if FACTORED == 2 \
        else scales
    factors = tl.load(factors_ptr + (k // SUPER) * N + n, mask=n_ok, other=0)
    return scales, lows, factors


@triton.jit
def _factored(scales, lows, factors, group):
    """Group `group`'s scale and min (float32; exact) from _factored_words: its int8
    sub-scale (byte group % 4 of `scales`) times the float16 scale factor (the low half of
    `factors`), its sub-min (of `lows`) times the low factor (the high half)."""
    shift = 24 - 8 * (group % 4)
    sub_scale = ((scales << shift) >> 24).to(tl.float32)
    sub_low = ((lows << shift) >> 24).to(tl.float32)
    scale_factor = (factors & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    low_factor = (factors >> 16).to(tl.int16).to(tl.float16, bitcast=True)
    return sub_scale * scale_factor.to(tl.float32), sub_low * low_factor.to(tl.float32)


@triton.jit
def _group_scale_and_low(scale_ptr, low_ptr, group, n, n_ok, N, HAS_LOW: tl.constexpr,
                         dtype: tl.constexpr):
    """Outputs n's scale and min in `group`, as dtype (a zero min without one)."""
    scale = tl.load(scale_ptr + group * N + n, mask=n_ok, other=0.0).to(dtype)
    if HAS_LOW:
        low = tl.load(low_ptr + group * N + n, mask=n_ok, other=0.0).to(dtype)
    else:
        low = tl.zeros_like(scale)
    return scale, low


@triton.jit
def biased(values, DOT: tl.constexpr):
    """values plus what biased_plane adds to each code: 0 (float32), 1024 (float16), 128
    (bfloat16)."""
    if DOT == 1:
        values += 1024.0
    elif DOT == 2:
        values += 128.0
    return values


@triton.jit
def _unbiased(values, DOT: tl.constexpr):
    """biased's inverse (exact for the codes)."""
    if DOT == 1:
        values -= 1024.0
    elif DOT == 2:
        values -= 128.0
    return values


@triton.jit
def biased_plane(packed, Q: tl.constexpr, DOT: tl.constexpr, ASM: tl.constexpr,
                  PLANE_BITS: tl.constexpr = 4):
    """Nibble (PLANE_BITS 8: byte) Q of each int16 plus biased's bias, as the product's
    type. The 16-bit types take no conversion instruction: the code is OR-ed into the
    mantissa of 1024 (float16) or 128 (bfloat16: exact for codes up to 127, as byte planes
    hold); on a GPU one LOP3 makes two bfloat16s (a shift first for all but plane 0)."""
    MASK: tl.constexpr = (1 << PLANE_BITS) - 1
    code = (packed >> (PLANE_BITS * Q)) & MASK
    if DOT == 0:
        plane = code.to(tl.float32)
    elif DOT == 1:
        plane = (code | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    elif ASM:
        plane = tl.inline_asm_elementwise(_bfloat16_plane_ptx(PLANE_BITS * Q, MASK), "=r,r",
                                          [packed], dtype=tl.bfloat16, is_pure=True, pack=2)
    else:
        plane = (code | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return plane


@triton.constexpr_function
def _bfloat16_plane_ptx(shift: int, mask: int) -> str:
    """The PTX that makes bfloat16 128 + (int16 >> shift) & mask of both halves of a 32-bit
    register: the mask keeps those bits of each half, the OR puts them in 128's mantissa."""
    lop3 = f"lop3.b32 $0, {{}}, 0x{mask:04X}{mask:04X}, 0x43004300, 0xea;"
    if shift == 0:
        return lop3.format("$1")
    return f"{{ .reg .b32 t; shr.b32 t, $1, {shift}; {lop3.format('t')} }}"


@triton.jit
def codes_as(codes, dtype: tl.constexpr, E4M3_BYTES: tl.constexpr):
    """codes converted to dtype. With E4M3_BYTES they are float8 E4M3 values given as their
    bytes (Triton types E4M3 only from compute capability 8.9 on): the sign bit and the other
    seven bits moved into float16's sign and into its exponent and mantissa fields read as
    the value / 256 (float16 holds E4M3's three mantissa bits and, at that offset, every one
    of its exponents, subnormals included), so one exact multiplication by 256 restores it.
    (A NaN byte, which weights do not hold, would read as 480.)"""
    if E4M3_BYTES:
        bits = codes.to(tl.uint16)
        half = (((bits & 0x80) << 8) | ((bits & 0x7F) << 7)).to(tl.float16, bitcast=True)
        return (half.to(tl.float32) * 256.0).to(dtype)
    return codes.to(dtype)


@triton.jit
def _one_token_kernel(x_ptr, words_ptr, scale_ptr, low_ptr, out_ptr, partial_ptr, count_ptr,
                      norm_ptr, residual_ptr, residual_out_ptr, squares_ptr, norm_tiles,
                      norm_width, norm_eps, N, stride_om, one_bits, SPLIT_ROWS: tl.constexpr,
                      SPLITS: tl.constexpr, PERIOD: tl.constexpr, GROUP: tl.constexpr,
                      HAS_LOW: tl.constexpr, ROWS: tl.constexpr, BLOCK_W: tl.constexpr,
                      PDL: tl.constexpr, BITS: tl.constexpr = 4,
                      SHARED_ZERO: tl.constexpr = None, ASM: tl.constexpr = False,
                      GATED: tl.constexpr = 0, NORM: tl.constexpr = 0,
                      NORM_TILES: tl.constexpr = 1, LAUNCH_LATE: tl.constexpr = 0):
    """out[n] for one token on the CUDA cores (a GEMV: no tensor-core tile padded from one
    row), from 4-bit codes in halves in groups of a multiple of CHUNK (BITS 4) or 8-bit
    codes a byte each (BITS 8). The codes' bytes are read as int32 words [in / 2, out / 4]
    (8 bits: [in, out / 4]), byte b of word w holding output 4 w + b. A program takes
    BLOCK_W words over SPLIT_ROWS rows of bytes, ROWS rows a step (one load of the whole
    [ROWS, BLOCK_W] tile, the next step's load in flight while this one's weights are
    decoded), in periods of PERIOD rows that lie in one group. Every weight costs its
    decoding (_nibble_products, _byte_units) and one multiply-add into a sum of its own
    place in the tile; the sums are added across the tile's rows (and threads) once a
    period, then scaled. SHARED_ZERO (no min held): each group's min is -SHARED_ZERO times
    its scale. With PDL the first tile of weights (which no kernel writes) is requested
    before the wait for the previous kernel. The grid is [tiles, 1, splits], as the W x^T
    kernels' of one token tile, and the end theirs (_store_products: GATED, the tile's
    first half of words a gate's and the other its ups'; NORM, LAUNCH_LATE)."""
    INPUTS_A_ROW: tl.constexpr = 2 if BITS == 4 else 1
    UNIT: tl.constexpr = ASM_BYTE_UNIT if ASM else BYTE_UNIT  # (bytes)
    words_per_row = N // 4
    w, w_ok = _one_token_words(words_per_row, BLOCK_W, GATED)
    steps = tl.arange(0, ROWS)
    zeros = tl.zeros((BLOCK_W,), dtype=tl.float32)
    total0, total1, total2, total3 = zeros, zeros, zeros, zeros
    tile = tl.zeros((ROWS, BLOCK_W), dtype=tl.float32)
    sums0, sums1, sums2, sums3 = tile, tile, tile, tile  # each byte's, this period
    # this period's sums of x times the units it multiplies (4 bits: LOW_UNIT and
    # HIGH_UNIT, the low and high nibbles'; 8 bits: UNIT, in x_low_sum)
    x_low_sum = tl.zeros((), dtype=tl.float32)
    x_high_sum = tl.zeros((), dtype=tl.float32)
    first = tl.program_id(2) * SPLIT_ROWS
    at = words_ptr + (first + steps)[:, None] * words_per_row + w[None, :]
    words = tl.load(at, mask=w_ok[None, :], other=0, eviction_policy="evict_first")
    wait_for_previous_kernel(PDL, not LAUNCH_LATE)
    for offset in range(0, SPLIT_ROWS, ROWS):
        row = first + offset
        at += ROWS * words_per_row
        following = tl.load(at, mask=w_ok[None, :] & (offset + ROWS < SPLIT_ROWS), other=0,
                            eviction_policy="evict_first")
        if BITS == 4:
            k = (row // HALF_T) * (2 * HALF_T) + row % HALF_T  # the low nibbles' first input
            x_low = tl.load(x_ptr + k + steps).to(tl.float32) * LOW_UNIT
            x_high = tl.load(x_ptr + k + HALF_T + steps).to(tl.float32) * HIGH_UNIT
            x_low_sum += tl.sum(x_low, axis=0)
            x_high_sum += tl.sum(x_high, axis=0)
            x_low, x_high = x_low[:, None], x_high[:, None]
            sums0 = _nibble_products(sums0, words, 0, x_low, x_high, one_bits)
            sums1 = _nibble_products(sums1, words, 1, x_low, x_high, one_bits)
            sums2 = _nibble_products(sums2, words, 2, x_low, x_high, one_bits)
            sums3 = _nibble_products(sums3, words, 3, x_low, x_high, one_bits)
        else:
            x_units = tl.load(x_ptr + row + steps).to(tl.float32) * UNIT
            x_low_sum += tl.sum(x_units, axis=0)
            x_units = x_units[:, None]
            sums0 += _byte_units(words, 0, ASM, one_bits) * x_units
            sums1 += _byte_units(words, 1, ASM, one_bits) * x_units
            sums2 += _byte_units(words, 2, ASM, one_bits) * x_units
            sums3 += _byte_units(words, 3, ASM, one_bits) * x_units
        words = following
        if (offset + ROWS) % PERIOD == 0:  # the period's last step: add its sums, scaled
            group = row // (GROUP // INPUTS_A_ROW)  # (4 bits: chunk after chunk)
            # the units' sums of x come off, and x's own sum times the shared zero point
            # (exact: powers of two)
            offset_sum = x_low_sum + x_high_sum
            if BITS == 4:
                x_sum = x_low_sum / LOW_UNIT + x_high_sum / HIGH_UNIT
            else:
                x_sum = x_low_sum / UNIT
            if SHARED_ZERO is not None:
                offset_sum += x_sum * SHARED_ZERO
            total0 = _scaled(total0, sums0, offset_sum, x_sum, group, 4 * w, w_ok, N,
                             scale_ptr, low_ptr, HAS_LOW)
            total1 = _scaled(total1, sums1, offset_sum, x_sum, group, 4 * w + 1, w_ok, N,
                             scale_ptr, low_ptr, HAS_LOW)
            total2 = _scaled(total2, sums2, offset_sum, x_sum, group, 4 * w + 2, w_ok, N,
                             scale_ptr, low_ptr, HAS_LOW)
            total3 = _scaled(total3, sums3, offset_sum, x_sum, group, 4 * w + 3, w_ok, N,
                             scale_ptr, low_ptr, HAS_LOW)
            sums0, sums1, sums2, sums3 = tile, tile, tile, tile
            x_low_sum = tl.zeros((), dtype=tl.float32)
            x_high_sum = tl.zeros((), dtype=tl.float32)
    # [BLOCK_W, 4] in output order (n = 4 w + b), flattened, as one token's tile
    total = tl.reshape(tl.join(tl.join(total0, total2), tl.join(total1, total3)),
                       (4 * BLOCK_W, 1))
    n, t, split, n_ok, t_ok = _outputs_by_tokens_tile(N, 1, 4 * BLOCK_W, 1, GATED)
    _store_products(total, out_ptr, stride_om, n, t, n_ok, t_ok, N, 1, partial_ptr, count_ptr,
                    split, SPLITS, GATED, NORM, norm_ptr, residual_ptr, residual_out_ptr,
                    squares_ptr, norm_tiles, norm_width, norm_eps, NORM_TILES, PDL,
                    LAUNCH_LATE)


@triton.jit
def _one_token_words(words_per_row, BLOCK_W: tl.constexpr, GATED: tl.constexpr):
    """A one-token program's words of a row and which exist: BLOCK_W in a row; GATED, the
    outputs [gate | up] halves, BLOCK_W / 2 of the gates' and the same of their ups' (as
    _outputs_by_tokens_tile's tile of 4 BLOCK_W outputs holds them)."""
    i = tl.arange(0, BLOCK_W)
    if GATED:
        HALF_W: tl.constexpr = BLOCK_W // 2
        gate = tl.program_id(0) * HALF_W + i % HALF_W
        return gate + (i // HALF_W) * (words_per_row // 2), gate < words_per_row // 2
    w = tl.program_id(0) * BLOCK_W + i
    return w, w < words_per_row


# A byte's two nibbles become floats by bit operations alone: the byte shifted so that its
# low nibble lies in mantissa bits 15-18 and its high one in bits 19-22, each masked and
# OR-ed into 1.0's bits (one LOP3: 1.0's bits come as a kernel argument, so they reach the
# instruction in a register; two immediates would cost two instructions), giving
# 1 + code / LOW_UNIT and 1 + code / HIGH_UNIT. The activations are scaled up by
# LOW_UNIT = 256 and HIGH_UNIT = 16 before the products, so that x' (1 + code / unit) =
# x' + code x: a period's sum is sum code x plus the period's sums of x' (taken off once a
# period). The products are exact in float32; the offsets cost at most 8 bits of the sums'
# 24.
LOW_UNIT: tl.constexpr = tl.constexpr(256.0)
HIGH_UNIT: tl.constexpr = tl.constexpr(16.0)
ONE_BITS = 0x3F800000  # float32 1.0


@triton.jit
def _nibble_products(sums, words, byte: tl.constexpr, x_low, x_high, one_bits):
    """sums + byte `byte`'s products: its low nibble times x_low and its high nibble times
    x_high (the activations scaled by LOW_UNIT and HIGH_UNIT)."""
    moved = _byte_at_bit_15(words, byte)
    low_units = ((moved & 0x78000) | one_bits).to(tl.float32, bitcast=True)
    high_units = ((moved & 0x780000) | one_bits).to(tl.float32, bitcast=True)
    return sums + low_units * x_low + high_units * x_high


@triton.jit
def _byte_at_bit_15(words, byte: tl.constexpr):
    """The words shifted so that byte `byte` of each lies in bits 15-22 (float32's mantissa
    bits below its first seven)."""
    if byte == 0:
        moved = words << 15
    elif byte == 1:
        moved = words << 7
    elif byte == 2:
        moved = words >> 1
    else:
        moved = words >> 9
    return moved


# A code byte becomes a float by bit operations alone, as nibbles do above: in mantissa
# bits 15-22 of 1.0 (a shift and a LOP3), 1 + code / BYTE_UNIT; on a GPU in bits 8-15 (one
# PRMT: the byte and 1.0's upper bytes put in place at once), 1 + code / ASM_BYTE_UNIT.
# Each product with the activations times the unit is exact in float32 for activations of
# up to 15 (ASM: 8, bfloat16's) significant bits; wider ones (float16, float32) are
# rounded once, at most 2^-24 of unit x, against the code's code x.
BYTE_UNIT: tl.constexpr = tl.constexpr(256.0)
ASM_BYTE_UNIT: tl.constexpr = tl.constexpr(32768.0)


@triton.constexpr_function
def _byte_units_ptx(byte: int) -> str:
    """The PTX that makes float32 1 + (byte `byte` of an int32) / ASM_BYTE_UNIT: a PRMT whose
    result bytes are 1.0's byte 0 (0x00), the code byte, and 1.0's bytes 2 and 3."""
    return f"prmt.b32 $0, $1, 0x3F800000, 0x{0x7604 + 16 * byte:04X};"


@triton.jit
def _byte_units(words, byte: tl.constexpr, ASM: tl.constexpr, one_bits):
    """1 + (byte `byte` of each word) / the unit, as float32."""
    if ASM:
        units = tl.inline_asm_elementwise(_byte_units_ptx(byte), "=r,r", [words],
                                          dtype=tl.float32, is_pure=True, pack=1)
    else:
        units = ((_byte_at_bit_15(words, byte) & 0x7F8000) | one_bits).to(tl.float32,
                                                                         bitcast=True)
    return units


@triton.jit
def _scaled(total, sums, offset_sum, x_sum, group, n, ok, N, scale_ptr, low_ptr,
            HAS_LOW: tl.constexpr):
    """total + scale (sums added over the tile's rows - offset_sum) (+ low x_sum): one
    period's part of outputs n, in `group`."""
    scale = tl.load(scale_ptr + group * N + n, mask=ok, other=0.0).to(tl.float32)
    total += scale * (tl.sum(sums, axis=0) - offset_sum)
    if HAS_LOW:
        total += tl.load(low_ptr + group * N + n, mask=ok, other=0.0).to(tl.float32) * x_sum
    return total


@triton.jit
def _half_saturating(x):
    """float32 -> float16, values past float16's range to +-65504 (not infinity), in one
    saturating conversion instruction per pair of values (a clamp first would add two
    instructions per value)."""
    return tl.inline_asm_elementwise("cvt.rn.satfinite.f16x2.f32 $0, $2, $1;", "=r,r,r", [x],
                                     dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _store_split_sums(total, out_ptr, at, ok, partial_ptr, split_stride, count_ptr, tile, split,
                      SPLITS: tl.constexpr):
    """Store a program's float32 sums over its split of the inputs at out_ptr + at, once
    every split's are in (_summed_splits)."""
    total, last = _summed_splits(total, at, ok, partial_ptr, split_stride, count_ptr, tile,
                                 split, SPLITS)
    if last:
        _store_output(total, out_ptr, at, ok, 0, 0)


@triton.jit
def _summed_splits(total, at, ok, partial_ptr, split_stride, count_ptr, tile, split,
                   SPLITS: tl.constexpr):
    """A program's float32 sums over its split of the inputs added to the other splits',
    and whether this program holds them all (the last of its tile's to finish). With
    several splits, each program stores its sums as partials at partial_ptr + at
    (split_stride apart) and counts itself done on its tile's counter; the last one adds the
    partials in split order and resets the counter for the next call (no second launch)."""
    if SPLITS == 1:
        return total, True
    tl.store(partial_ptr + split * split_stride + at, total, mask=ok)
    tl.debug_barrier()  # every thread's partial sums stored before the count
    last = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLITS - 1
    if last:
        total = tl.zeros_like(total)
        for part in tl.static_range(SPLITS):
            total += tl.load(partial_ptr + part * split_stride + at, mask=ok, other=0.0,
                             cache_modifier=".cg")
        tl.atomic_xchg(count_ptr + tile, 0)
    return total, last


@triton.jit
def _store_products(total, out_ptr, stride_om, n, t, n_ok, t_ok, N, M, partial_ptr, count_ptr,
                    split, SPLITS: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr,
                    norm_ptr, residual_ptr, residual_out_ptr, squares_ptr, norm_tiles,
                    norm_width, norm_eps, NORM_TILES: tl.constexpr, PDL: tl.constexpr,
                    LAUNCH_LATE: tl.constexpr):
    """The W x^T kernels' end: sums [BLOCK_N outputs n, BLOCK_T tokens t] over a split of
    the inputs, stored as _store_split_sums stores them, in rows stride_om apart (gated with
    GATED: _store_output, in rows of their own width; with LAUNCH_LATE, the next kernel let
    launch first: _launches_late), and with NORM:

    - 1 (the outputs feed an RMSNorm that the next product applies): the rounded outputs
      plus the residual are stored as the new residual, and that sum times the norm's
      weight (norm_ptr) in place of the outputs, with each token's sum of the new residual's
      squares over the tile's outputs at squares_ptr [output tiles, M];
    - 2 (the inputs are such a product's, of width norm_width): each token's sums are
      multiplied by its 1 / rms (_inverse_rms of the norm_tiles rows of squares at
      squares_ptr; NORM_TILES a power of two at least norm_tiles) before they are stored."""
    if LAUNCH_LATE:
        launch_next_kernel(PDL)
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    at = t[None, :] * N + n[:, None]
    ok = t_ok[None, :] & n_ok[:, None]
    total, last = _summed_splits(total, at, ok, partial_ptr, M * N, count_ptr, tile, split,
                                 SPLITS)
    if last:
        if NORM == 2:
            total *= _inverse_rms(squares_ptr, norm_tiles, t, t_ok, M, norm_width, norm_eps,
                                  NORM_TILES)[None, :]
        if NORM == 1:
            _store_normed(total, out_ptr, at, ok, n_ok, t, t_ok, norm_ptr + n, residual_ptr,
                          residual_out_ptr, squares_ptr + tl.program_id(0) * M)
        elif GATED:
            _store_output(total, out_ptr, at, ok, GATED, N // 2)
        else:
            _store_output(total, out_ptr, t[None, :] * stride_om + n[:, None], ok, 0, 0)


@triton.jit
def _store_normed(total, out_ptr, at, ok, n_ok, t, t_ok, weight_ptrs, residual_ptr,
                  residual_out_ptr, squares_ptr):
    """Outputs [n, t] rounded to out's type plus the residual (the new residual, rounded as
    fused.add_rms_norm rounds it) stored at residual_out_ptr, that times the norm's weight
    at out_ptr, and each token's sum of the new residual's squares over these outputs at
    squares_ptr + t."""
    dtype = out_ptr.dtype.element_ty
    residual = (total.to(dtype) + tl.load(residual_ptr + at, mask=ok, other=0.0)).to(dtype)
    tl.store(residual_out_ptr + at, residual, mask=ok)
    values = tl.where(ok, residual.to(tl.float32), 0.0)
    tl.store(squares_ptr + t, tl.sum(values * values, axis=0), mask=t_ok)
    weight = tl.load(weight_ptrs, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + at, (values * weight[:, None]).to(dtype), mask=ok)


@triton.jit
def _inverse_rms(squares_ptr, norm_tiles, t, t_ok, M, width, eps, NORM_TILES: tl.constexpr):
    """Each token t's 1 / sqrt(mean square + eps) over a row of `width` values, from its
    sums of squares by output tile [norm_tiles, M] at squares_ptr (added in tile order), as
    fused.add_rms_norm computes it from the whole row."""
    tiles = tl.arange(0, NORM_TILES)
    squares = tl.load(squares_ptr + tiles[:, None] * M + t[None, :],
                      mask=(tiles < norm_tiles)[:, None] & t_ok[None, :], other=0.0)
    return 1.0 / tl.sqrt(tl.sum(squares, axis=0) / width + eps)


@triton.jit
def _store_output(total, out_ptr, at, ok, GATED: tl.constexpr, gated_width):
    """total at out_ptr + at in out's type. GATED (1 SiLU, 2 GELU's tanh form): total's rows
    are a tile of gates and then their ups (as _outputs_by_tokens_tile lays them out) of
    outputs [gate | up] 2 gated_width wide, and act(gate) * up is stored instead, in rows
    gated_width wide, computed from the rounded outputs as the separate kernel computes it
    (fused.gated_value)."""
    dtype = out_ptr.dtype.element_ty
    if GATED:
        gate, up = _tile_halves(total.to(dtype))
        at, _ = _tile_halves(at)
        ok, _ = _tile_halves(ok.to(tl.int8))
        tl.store(out_ptr + at - (at // (2 * gated_width)) * gated_width,
                 gated_value(gate, up, GATED == 2), mask=ok != 0)
    else:
        tl.store(out_ptr + at, total.to(dtype), mask=ok)


@triton.jit
def _tile_halves(x):
    """The first and second halves of the rows of x [ROWS, COLUMNS]."""
    ROWS: tl.constexpr = x.shape[0]
    halves = tl.reshape(x, (2, ROWS // 2, x.shape[1]))
    return tl.split(tl.permute(halves, (1, 2, 0)))


def _capability(device_index: int | None) -> tuple[int, int] | None:
    """The compute capability of a CUDA device; None for the CPU interpreter."""
    return None if device_index is None else cuda_capability(device_index)


def float8_codes(codes: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, bool]:
    """Float8 codes as the kernels take them on `device`, and whether those are bytes: on
    GPUs where Triton has no E4M3 type the kernels decode the bytes by bit operations."""
    index = device.index if device.type == "cuda" else None
    if codes.dtype == FP8 and not has_e4m3(_capability(index)):
        return codes.view(torch.uint8), True
    return codes, False


@functools.cache
def multiprocessor_count(device_index: int | None) -> int:
    if device_index is None:  # the CPU interpreter: an H200's count
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(tokens: int, out_features: int, in_features: int, step: int,
                  multiprocessors: int) -> dict[str, int]:
    """Tile sizes, input splits and warps for a call of `tokens` (more than FEW_TOKENS) rows
    in the larger kernel."""
    large = tokens > SMALL_M
    block_m, block_n, splits = (128 if large else 64), 128, 1
    if not large:
        splits = _splits(triton.cdiv(tokens, block_m) * triton.cdiv(out_features, block_n),
                         in_features, max(step, CHUNK), multiprocessors)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "splits": splits,
            "num_warps": 8 if large else 4, "num_stages": 3 if large else 4}


def _splits(tiles: int, in_features: int, unit: int, multiprocessors: int,
            target: int = TARGET_PROGRAMS) -> int:
    """Input splits (a power of two) for `tiles` output tiles: about `target` programs per
    multiprocessor, each split a whole number of `unit`s of inputs and at least
    MIN_SPLIT_INPUTS; or NARROW_MIN_SPLIT_INPUTS where that leaves fewer programs than
    multiprocessors (a GGUF's Q6_K value projection of the 8B, 16 tiles: on an H100 7.5 us
    in 32 splits against 12.5 in 8)."""
    splits = _splits_of_at_least(MIN_SPLIT_INPUTS, tiles, in_features, unit,
                                 target * multiprocessors)
    if target and tiles * splits < multiprocessors:
        splits = _splits_of_at_least(NARROW_MIN_SPLIT_INPUTS, tiles, in_features, unit,
                                     target * multiprocessors)
    return splits


def _splits_of_at_least(inputs: int, tiles: int, in_features: int, unit: int,
                        programs: int) -> int:
    """The most splits (a power of two) of at least `inputs` inputs each, a whole number of
    `unit`s, whose tiles x splits stay within `programs`."""
    splits = 1
    while (tiles * splits * 2 <= programs
           and in_features % (2 * splits * unit) == 0
           and in_features // (2 * splits) >= inputs):
        splits *= 2
    return splits


def _step(weight: GroupQuantWeight) -> int:
    """Inputs per decoded tile: a 4-bit half chunk, or a group if shorter."""
    return min(HALF, weight.group_size)


def few_tokens_config(tokens: int, weight: GroupQuantWeight,
                      multiprocessors: int) -> dict[str, int]:
    """The few-token kernel's tiles, steps, input splits and warps for a call of `tokens`
    (at most FEW_TOKENS) rows (from a sweep on the H200 at the 8B's shapes)."""
    float8 = weight.codes.dtype == FP8
    block_t = 16 if tokens <= 16 else 32
    warps = 4
    step = HALF if weight.bits == 4 else _largest_step(weight.group_size)
    if float8:
        block_n, target, stages = (32, TARGET_PROGRAMS, 4) if tokens <= 16 else (64, 2, 3)
        if tokens <= 8:  # tiles of 8 tokens by 2 warps: on an H100 87.8 / 88.4 / 89.8
            # against 90.0 / 91.5 / 91.7 us an 8B layer at 1 / 4 / 8 tokens
            block_t, warps = 8, 2
    elif tokens > 16:
        block_n, target, stages = 64, TARGET_PROGRAMS, 4
    elif weight.bits == 4:  # up to 16 tokens: the fastest in `quant_bench.py --sweep` at
        # one token (twice the programs)
        block_n, target, stages = 64, 8, 3
    elif step > 32:  # 8-bit codes in steps of 64 or 128 (GPTQ-Int8, int8 rows): the tiles
        # below asked the H200 for 292 KiB of shared memory with float32 activations
        block_n, target, stages = 128, 8, 3
    else:  # 8-bit codes in steps of 16 or 32 (GGUF): the fastest of that sweep (wide
        # tiles, deep pipeline)
        block_n, target, stages = 256, 8, 5
    tiles = triton.cdiv(tokens, block_t) * triton.cdiv(weight.out_features, block_n)
    splits = _splits(tiles, weight.in_features, CHUNK if weight.bits == 4 else step,
                     multiprocessors, target)
    return {"BLOCK_N": block_n, "BLOCK_T": block_t, "STEP": step, "splits": splits,
            "num_warps": warps, "num_stages": stages}


def _largest_step(group_size: int) -> int:
    """Inputs per step of 8-bit codes: the longest of 128, 64, 32 and 16 that divides a group
    (every supported group is a multiple of 16; a step never crosses a group)."""
    return next(step for step in (128, 64, 32, 16) if group_size % step == 0)


def _dot_type(x: torch.dtype, float8: bool, bits: int = 4) -> int:
    """The few-token kernel's DOT: float32 activations multiply in float32; float8 values
    and 8-bit codes in float16 (wider activations saturated to its range: bfloat16 holds
    integers to 256 only, `_centred_codes`); 4-bit codes in x's type."""
    if x == torch.float32:
        return 0
    if float8 or bits == 8:
        return 1 if x == torch.float16 else 3
    return 1 if x == torch.float16 else 2


def group_gemm(x: torch.Tensor, weight: GroupQuantWeight, gated: int = 0,
               normed: torch.Tensor | None = None, norm_eps: float = 0.0,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight^T -> [..., out] in x's dtype. gated (1 SiLU, 2 GELU's tanh form;
    calls `takes_gated` allows): the outputs are [gate | up] halves, and act(gate) * up
    [..., out / 2] comes out, computed by the product's last step. normed (calls
    `takes_norm` allows): x is a row times an RMSNorm's weight, not yet divided by its rms,
    and `normed` holds each row's sums of squares by output tile [tiles, rows] of the product
    that wrote it (group_gemm_then_norm); the product divides its sums by the rms (with the
    norm's `norm_eps`). out (neither gated nor normed): a [rows, out] tensor of x's type whose
    rows may lie further apart than their width (columns of a wider output), written in
    place and returned; the kernels of few tokens store into it directly."""
    flat = x.reshape(-1, weight.in_features)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    tokens = flat.shape[0]
    if gated and not takes_gated(tokens, weight):
        raise ValueError(f"a call of {tokens} tokens on outputs of {weight.out_features}"
                         " takes no gated activation")
    if normed is not None and not takes_norm(tokens, weight):
        raise ValueError(f"a call of {tokens} tokens takes no normed inputs")
    multiprocessors = multiprocessor_count(x.device.index if x.is_cuda else None)
    if gated or normed is not None:
        if out is not None:
            raise ValueError("a gated or normed product makes its own output")
        out = torch.empty(tokens, weight.out_features // (2 if gated else 1), dtype=x.dtype,
                          device=x.device)
        norm = None if normed is None else _NormArguments.inputs(normed, weight.in_features,
                                                                 norm_eps, out)
        _product(tokens, weight)(flat, weight, out, multiprocessors, gated, norm)
        return out.reshape(*x.shape[:-1], out.shape[-1])
    if out is not None:
        _check_output(out, tokens, weight.out_features, x)
    product = _product(tokens, weight)
    into = out if out is not None and product in (_planes, _few_tokens, _one_token_gemv) \
        else torch.empty(tokens, weight.out_features, dtype=x.dtype, device=x.device)
    product(flat, weight, into, multiprocessors)
    if out is not None:
        return out if into is out else out.copy_(into)
    return into.reshape(*x.shape[:-1], weight.out_features)


def _product(tokens: int, weight: GroupQuantWeight):
    """The launcher of a call of `tokens` rows. Each takes flat x, the weight, the output
    and the multiprocessor count; the planes, one-token GEMV and few-token launchers (the
    calls `takes_norm` allows reach only these) also take a gated kind and _NormArguments."""
    if decodes_first(tokens, weight):
        return _decoded_first
    if weight.planes:
        return _planes
    if takes_one_token_gemv(tokens, weight):
        return _one_token_gemv
    return _few_tokens if tokens <= FEW_TOKENS else _many_tokens


def _decoded_first(flat: torch.Tensor, weight: GroupQuantWeight, out: torch.Tensor,
                   multiprocessors: int) -> None:
    """decoded_product as a launcher of _product's form (it needs no multiprocessor count)."""
    decoded_product(flat, weight, out)


def _check_output(out: torch.Tensor, tokens: int, outputs: int, x: torch.Tensor) -> None:
    if out.shape != (tokens, outputs) or out.dtype != x.dtype or out.device != x.device \
            or out.stride(-1) != 1:
        raise ValueError(f"an output {tuple(out.shape)} ({out.dtype}, strides "
                         f"{out.stride()}) does not take [{tokens}, {outputs}] rows of "
                         f"{x.dtype} with unit column stride")


def group_gemm_then_norm(x: torch.Tensor, weight: GroupQuantWeight, residual: torch.Tensor,
                         norm_weight: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An RMSNorm of x W^T plus `residual` (calls `takes_norm` allows), but for its division
    by the rms, which the next product applies (group_gemm's `normed`): the new residual
    times the norm's weight [..., out], the new residual [..., out], and each row's sums of
    the new residual's squares by output tile [tiles, rows] (float32), all from the
    product's last step."""
    flat = x.reshape(-1, weight.in_features)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    tokens = flat.shape[0]
    if not takes_norm(tokens, weight):
        raise ValueError(f"a call of {tokens} tokens takes no norm of its outputs")
    shape = (*x.shape[:-1], weight.out_features)
    if residual.shape != shape or residual.dtype != x.dtype or norm_weight.shape != shape[-1:]:
        raise ValueError(f"a residual {tuple(residual.shape)} ({residual.dtype}) and norm "
                         f"weight {tuple(norm_weight.shape)} do not fit outputs {shape} "
                         f"({x.dtype})")
    out = torch.empty(tokens, weight.out_features, dtype=x.dtype, device=x.device)
    norm = _NormArguments.outputs(residual.reshape(tokens, -1).contiguous(), norm_weight, out)
    _product(tokens, weight)(
        flat, weight, out, multiprocessor_count(x.device.index if x.is_cuda else None), 0,
        norm)
    return out.view(shape), norm.residual_out.view(shape), norm.squares


def takes_norm(tokens: int, weight: GroupQuantWeight) -> bool:
    """Whether a call of `tokens` can norm its outputs for the next product
    (group_gemm_then_norm) or take inputs so normed (group_gemm's `normed`): one of up to
    FEW_TOKENS tokens on the planes, the one-token GEMV or the few-token kernel (not
    decoded first), whose last step these are done in."""
    return tokens <= FEW_TOKENS and not decodes_first(tokens, weight)


def takes_gated(tokens: int, weight: GroupQuantWeight) -> bool:
    """Whether a call of `tokens` on a gate-up weight can apply the gated activation to its
    outputs: one `takes_norm` allows, whose tiles hold a gate's and its up's sums (the
    one-token GEMV's, words of four outputs: each half a multiple of 4), and not with
    PAGODA_GATED_IN_PRODUCT=0."""
    multiple = 8 if takes_one_token_gemv(tokens, weight) else 2
    return (GATED_IN_PRODUCT and weight.out_features % multiple == 0
            and takes_norm(tokens, weight))


@dataclass(slots=True)
class _NormArguments:
    """The norm_* arguments of the W x^T kernels (their NORM: see _store_products): 1, the
    outputs feed an RMSNorm (its weight, the residual, the new residual and the squares
    written, one row a program along the outputs); 2, the inputs came from such a product
    (its squares read)."""

    kind: int
    squares: torch.Tensor
    weight: torch.Tensor
    residual: torch.Tensor
    residual_out: torch.Tensor
    width: int = 0
    eps: float = 0.0

    @classmethod
    def outputs(cls, residual: torch.Tensor, weight: torch.Tensor,
                out: torch.Tensor) -> _NormArguments:
        """For a product whose outputs `out` feed the norm (squares allocated at launch)."""
        return cls(1, out, weight, residual, torch.empty_like(residual))

    @classmethod
    def inputs(cls, squares: torch.Tensor, width: int, eps: float,
               out: torch.Tensor) -> _NormArguments:
        """For a product whose inputs (of `width`) such a product normed."""
        return cls(2, squares, out, out, out, width, eps)

    def launch(self, output_tiles: int, tokens: int) -> dict:
        """The kernel's arguments for a grid of `output_tiles` programs along the outputs."""
        if self.kind == 1:
            self.squares = torch.empty(output_tiles, tokens, dtype=torch.float32,
                                       device=self.weight.device)
        tiles = self.squares.shape[0]
        return {"norm_ptr": self.weight, "residual_ptr": self.residual,
                "residual_out_ptr": self.residual_out, "squares_ptr": self.squares,
                "norm_tiles": tiles, "norm_width": self.width, "norm_eps": self.eps,
                "NORM": self.kind, "NORM_TILES": triton.next_power_of_2(tiles)}


def _launches_late(norm: _NormArguments | None) -> bool:
    """Whether a W x^T product lets the next kernel launch (PDL) only once its programs are
    past their products, not as they start: where it starts a norm (launched as it starts,
    the next product's programs took the multiprocessors' free places while it ran, and an
    H100 decoded an 8B's AWQ at 2.84 ms a token against 2.64 so; bench/results/README.md).
    Every product launched so was slower on an H100 (AWQ 2.63 against 2.56 ms a token, FP8
    3.53 against 3.48), so the others let it launch as they start."""
    return norm is not None and norm.kind == 1


def _norm_launch(norm: _NormArguments | None, out: torch.Tensor, output_tiles: int,
                 tokens: int) -> dict:
    """A W x^T kernel launch's norm_* arguments (unread placeholders without a norm)."""
    if norm is not None:
        return norm.launch(output_tiles, tokens)
    return {"norm_ptr": out, "residual_ptr": out, "residual_out_ptr": out, "squares_ptr": out,
            "norm_tiles": 0, "norm_width": 0, "norm_eps": 0.0}


def _partials(out: torch.Tensor, splits: int, outputs: int | None = None) -> torch.Tensor:
    """Float32 partial sums of `outputs` (out's own by default) for each split (none needed
    for one)."""
    if splits == 1:
        return out
    return torch.empty(splits, out.shape[0], outputs or out.shape[1], dtype=torch.float32,
                       device=out.device)


def _few_tokens(flat: torch.Tensor, weight: GroupQuantWeight, out: torch.Tensor,
                multiprocessors: int, gated: int = 0, norm: _NormArguments | None = None
                ) -> None:
    tokens, out_features = out.shape[0], weight.out_features
    config = few_tokens_config(tokens, weight, multiprocessors)
    splits, block_t = config.pop("splits"), config["BLOCK_T"]
    grid = (_output_tiles(out_features, config["BLOCK_N"], gated), triton.cdiv(tokens, block_t),
            splits)
    float8 = weight.codes.dtype == FP8
    codes, as_bytes = float8_codes(weight.codes, flat.device)
    _few_tokens_kernel[grid](
        flat, codes, weight.scale, weight.low if weight.low is not None else weight.scale,
        out, _partials(out, splits, out_features), tile_counters(out.device, grid[0] * grid[1]),
        M=tokens, N=out_features, K=weight.in_features, stride_xm=flat.stride(0),
        stride_om=out.stride(0), K_SPLIT=weight.in_features // splits, SPLITS=splits,
        GROUP=weight.group_size, BITS=weight.bits, FLOAT8=float8,
        ROW_SCALE=float8 and weight.group_size == weight.in_features,
        HAS_LOW=weight.low is not None, SHARED_ZERO=weight.shared_zero,
        DOT=_dot_type(flat.dtype, float8, weight.bits), E4M3_BYTES=as_bytes, GATED=gated,
        **config, **_norm_launch(norm, out, grid[0], tokens),
        LAUNCH_LATE=_launches_late(norm),
        **dependent_launch(flat.device))


def _output_tiles(out_features: int, block_n: int, gated: int) -> int:
    """Programs along the outputs: gated, each holds block_n / 2 gates and their ups."""
    return triton.cdiv(out_features // 2, block_n // 2) if gated else \
        triton.cdiv(out_features, block_n)


def planes_config(tokens: int, weight: GroupQuantWeight,
                  multiprocessors: int) -> dict[str, int]:
    """The planes kernel's tiles, input splits and warps for a call of `tokens` rows. Up to
    FEW_TOKENS: PLANES_FEW's outputs by 8, 16 or 32 tokens; more: PLANES_LARGE's tiles, the
    inputs split only up to SMALL_M tokens."""
    if tokens <= FEW_TOKENS:
        block_t = 8 if tokens <= 8 else 16 if tokens <= 16 else 32
        if weight.bits == 4:
            block_n, warps, stages, target = PLANES_FEW
        else:
            block_n, warps, stages, target = BYTE_PLANES_EIGHT if block_t == 8 \
                else BYTE_PLANES_FEW
    else:
        block_n, block_t, warps, stages = PLANES_LARGE
        target = TARGET_PROGRAMS if tokens <= SMALL_M else 0
    tiles = triton.cdiv(tokens, block_t) * triton.cdiv(weight.out_features, block_n)
    splits = _splits(tiles, weight.in_features, weight.plane_step, multiprocessors, target)
    return {"BLOCK_N": block_n, "BLOCK_T": block_t, "splits": splits, "num_warps": warps,
            "num_stages": stages}


def parse_tile(given: str, length: int) -> tuple[int, ...]:
    """A kernel tile written as `length` comma-separated positive integers ("64,4,3,8")."""
    parts = given.split(",")
    if len(parts) != length or not all(part.strip().isdigit() and int(part) > 0
                                       for part in parts):
        raise ValueError(f"{given!r}: {length} positive integers expected")
    return tuple(int(part) for part in parts)


def tile_from_environment(name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    """A kernel tile given in environment variable `name` (a benchmark's way to time
    another tile end to end; see parse_tile), else `default`."""
    given = os.environ.get(name)
    if not given:
        return default
    try:
        return parse_tile(given, len(default))
    except ValueError as wrong:
        raise ValueError(f"{name}={wrong}") from None


# the planes kernel's outputs, warps, stages and programs a multiprocessor (the inputs split
# towards it) for calls of at most FEW_TOKENS tokens (the fastest of
# `bench/kernels/int4_planes.py` on the H200 at the 8B's layers, 1-16 tokens, groups of 32
# and 128); PAGODA_PLANES_FEW_TILE=64,4,3,8 names another
PLANES_FEW = tile_from_environment("PAGODA_PLANES_FEW_TILE", (64, 4, 3, 8))
# the same for codes in byte planes, in calls of up to 8 tokens and of 9 to FEW_TOKENS
# (PAGODA_BYTE_PLANES_FEW_TILE names one for both): the fastest of five tiles on an H100 at
# one and at 16 tokens, Q6_K's layout, us a layer: (64, 4, 3, 8) 122.0 and 231.2, (128, 2,
# 3, 8) 129.9 and 151.9, (128, 4, 3, 8) 124.1 and 181.2 (the few-token kernel: 133.2 and
# 151.7); bench/results/README.md
BYTE_PLANES_EIGHT = tile_from_environment("PAGODA_BYTE_PLANES_FEW_TILE", (64, 4, 3, 8))
BYTE_PLANES_FEW = tile_from_environment("PAGODA_BYTE_PLANES_FEW_TILE", (128, 2, 3, 8))
# its outputs, tokens, warps and stages a program for calls of more than FEW_TOKENS tokens
PLANES_LARGE = (128, 128, 8, 3)


def _planes(flat: torch.Tensor, weight: GroupQuantWeight, out: torch.Tensor,
            multiprocessors: int, gated: int = 0, norm: _NormArguments | None = None) -> None:
    tokens, out_features = out.shape[0], weight.out_features
    config = planes_config(tokens, weight, multiprocessors)
    splits = config.pop("splits")
    grid = (_output_tiles(out_features, config["BLOCK_N"], gated),
            triton.cdiv(tokens, config["BLOCK_T"]), splits)
    words = weight.step_words if weight.scale_pairs is None else weight.scale_pairs
    if weight.factored:
        scale, mins = weight.sub_words, weight.factor_words
    elif words is None:
        mins = weight.zeros if weight.zeros is not None else weight.low
        scale, mins = weight.scale, mins if mins is not None else weight.scale
    else:  # (low_ptr unread)
        scale, mins = words, words
    _planes_kernel[grid](
        flat, weight.codes, scale, mins, out, _partials(out, splits, out_features),
        tile_counters(out.device, grid[0] * grid[1]), M=tokens, N=out_features,
        stride_xm=flat.stride(0), stride_om=out.stride(0),
        K_SPLIT=weight.in_features // splits, SPLITS=splits, GROUP=weight.group_size,
        STEP_IN_GROUP=weight.groups_of_whole_steps,
        HAS_LOW=weight.holds_mins, ZERO_POINTS=weight.holds_zero_points,
        STEP_SUMS=weight.step_sums, DOT=_dot_type(flat.dtype, False),
        ASM=flat.is_cuda, PLANE_BITS=weight.bits, GATED=gated, FACTORED=weight.factored,
        SUPER=weight.group_size * weight.groups_per_super,
        SHARED_ZERO=weight.shared_zero, **config,
        **_norm_launch(norm, out, grid[0], tokens), LAUNCH_LATE=_launches_late(norm),
        **dependent_launch(flat.device))


def takes_one_token_gemv(tokens: int, weight: GroupQuantWeight) -> bool:
    """Whether a call goes to a one-token GEMV (the 4-bit or the byte kernel): one token
    and a weight it takes (`GroupQuantWeight.has_one_token_kernel`). On the H200,
    alternated in one run: 78.0 against the few-token kernel's 105.3 us per 8B layer of
    4-bit codes in groups of 128. 4-bit groups of 32 (a chunk's halves in two groups, two
    sums a byte) were no faster than the few-token kernel and stay there. GGUF Q8_0's
    bytes, an 8B layer on an H100 (`one_token_ab.py --layout int8-g32-centred --pdl`,
    `quant_bench.py --sweep-one-token`): the few-token kernel 125.6 us, this at the 4-bit
    kernel's tile 148.9, at its own (64 words) 101.2."""
    return tokens == 1 and weight.has_one_token_kernel


def one_token_gemv_config(weight: GroupQuantWeight, multiprocessors: int,
                          words: int | None = None, rows: int = 16, num_warps: int = 1,
                          programs_per_sm: int = 8) -> dict[str, int]:
    """A one-token GEMV's words per program (default 32 of 4-bit codes, 64 of bytes), rows a
    step (a row of bytes: two 4-bit inputs, or one 8-bit), input splits, periods and warps:
    about `programs_per_sm` programs per multiprocessor, each over a whole number of steps
    and of periods (a period lies in one group: a split is a whole number of groups or a
    whole fraction of one) and at least MIN_SPLIT_ROWS rows. The defaults were the fastest
    of `quant_bench.py --sweep-one-token` at an 8B layer (4-bit groups of 128 on the H200,
    or within 3 % of it; GGUF Q8_0's bytes on an H100, 101.2 us against 112.2 for the
    next)."""
    words = words or (32 if weight.bits == 4 else 64)
    tiles = triton.cdiv(weight.out_features // 4, words)
    inputs_a_row = 2 if weight.bits == 4 else 1
    byte_rows = weight.in_features // inputs_a_row
    group_rows = weight.group_size // inputs_a_row
    target = programs_per_sm * multiprocessors
    splits = 1
    for candidate in range(2, byte_rows // MIN_SPLIT_ROWS + 1):
        split_rows = byte_rows // candidate
        if byte_rows % candidate or split_rows % rows:
            continue
        if split_rows % group_rows and group_rows % split_rows:
            continue
        if abs(tiles * candidate - target) < abs(tiles * splits - target):
            splits = candidate
    split_rows = byte_rows // splits
    return {"BLOCK_W": words, "ROWS": rows, "splits": splits, "num_warps": num_warps,
            "SPLIT_ROWS": split_rows, "PERIOD": min(split_rows, group_rows)}


def _one_token_gemv(flat: torch.Tensor, weight: GroupQuantWeight, out: torch.Tensor,
                    multiprocessors: int, gated: int = 0,
                    norm: _NormArguments | None = None) -> None:
    config = one_token_gemv_config(weight, multiprocessors)
    splits = config.pop("splits")
    grid = (_output_tiles(weight.out_features, 4 * config["BLOCK_W"], gated), 1, splits)
    _one_token_kernel[grid](
        flat, weight.codes.view(torch.int32), weight.scale,
        weight.low if weight.low is not None else weight.scale, out,
        _partials(out, splits, weight.out_features), tile_counters(out.device, grid[0]),
        **_norm_launch(norm, out, grid[0], 1), N=weight.out_features,
        stride_om=out.stride(0), one_bits=ONE_BITS, SPLITS=splits, GROUP=weight.group_size,
        HAS_LOW=weight.low is not None, BITS=weight.bits, SHARED_ZERO=weight.shared_zero,
        ASM=flat.is_cuda, GATED=gated, LAUNCH_LATE=_launches_late(norm), **config,
        **dependent_launch(flat.device))


def _many_tokens(flat: torch.Tensor, weight: GroupQuantWeight, out: torch.Tensor,
                 multiprocessors: int) -> None:
    tokens, out_features = out.shape
    config = launch_config(tokens, out_features, weight.in_features, _step(weight),
                           multiprocessors)
    splits, block_m = config.pop("splits"), config.pop("BLOCK_M")
    grid = (triton.cdiv(tokens, block_m), triton.cdiv(out_features, config["BLOCK_N"]), splits)
    codes, as_bytes = float8_codes(weight.codes_by_input(), flat.device)
    _group_gemm_kernel[grid](
        flat, codes, weight.scale, weight.low if weight.low is not None else weight.scale,
        out, _partials(out, splits), tile_counters(out.device, grid[0] * grid[1]), tokens,
        out_features, flat.stride(0), codes.stride(0), codes.stride(1),
        K_SPLIT=weight.in_features // splits, SPLITS=splits, GROUP=weight.group_size,
        BITS=weight.bits, STEP=_step(weight), HAS_LOW=weight.low is not None,
        BLOCK_M=block_m, DOT_PRECISION="ieee" if flat.dtype == torch.float32 else "tf32",
        E4M3_BYTES=as_bytes, SHARED_ZERO=weight.shared_zero, **config,
        **dependent_launch(flat.device))


@triton.jit
def _fp8_rows_kernel(x_ptr, out_ptr, scale_ptr, K, stride_x, FP8_MAX: tl.constexpr,
                     BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)
    ok = k < K
    x = tl.load(x_ptr + row * stride_x + k, mask=ok, other=0.0)
    store_float8_row(x, out_ptr + row * K + k, ok, scale_ptr + row, FP8_MAX)


def fp8_rows(x: torch.Tensor, fp8_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[tokens, K] -> float8 values and a float32 scale per token [tokens, 1] (the row's
    absolute max over `fp8_max`), in one launch."""
    tokens, width = x.shape
    values = torch.empty(tokens, width, dtype=FP8, device=x.device)
    scale = torch.empty(tokens, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(width)
    _fp8_rows_kernel[(tokens,)](x, values, scale, width, x.stride(0), FP8_MAX=fp8_max,
                                BLOCK_K=block, num_warps=min(16, max(4, block // 1024)),
                                **dependent_launch(x.device))
    return values, scale
