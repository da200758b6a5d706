"""Long calls on codes in planes: the weights decoded to x's type, a slice of outputs at a
time, and multiplied by cuBLAS.

A call of many tokens is bound by its multiply-adds, not by the bytes of its weights: there
the planes kernel's decoding in every tile (each weight decoded once per 128 tokens) and its
Triton tensor-core loop cost more than writing the weights out once in 16 bits and reading
them back into cuBLAS's GEMM. `decodes_first` says which calls go that way (from
`GroupQuantWeight.decoded_from`: group_gemm.DECODE_FROM, measured on an H100);
`decoded_product` runs them. The slice a call decodes is at most group_gemm's
DECODED_SLICE_BYTES, reused slice after slice, so a layer of any width takes a bounded
workspace."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.layers.quantization import group_gemm
from pagoda.layers.quantization.group_gemm import GroupQuantWeight

DECODE_BLOCK_N = 128  # outputs a decoding program writes (one step of inputs each)


def decodes_first(tokens: int, weight: GroupQuantWeight) -> bool:
    """Whether a call of `tokens` rows on `weight` decodes the weights and multiplies with
    cuBLAS rather than in the planes kernel (GroupQuantWeight.decoded_from)."""
    start = weight.decoded_from
    return start is not None and tokens >= start


@triton.jit
def _decode_planes_kernel(codes_ptr, scale_ptr, low_ptr, zeros_ptr, w_ptr, N, first, width,
                          GROUP: tl.constexpr, PLANE_BITS: tl.constexpr, HAS_LOW: tl.constexpr,
                          HAS_ZEROS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """w[k, j] = the weight of output first + j at input k (j < width; w is [K, width]), for
    BLOCK_N outputs and the inputs of one step (program_id 1) of the planes (PLANE_BITS 4:
    four nibbles an int16, rows of ROWS inputs each; 8: two bytes) as scale x code + min, or
    scale x (code - zero point). Each plane's rows lie in one group (as planes require), so
    a plane loads one scale (and min) an output."""
    PLANES: tl.constexpr = 16 // PLANE_BITS
    MASK: tl.constexpr = (1 << PLANE_BITS) - 1
    local = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n = first + local
    n_ok = local < width
    ok = n_ok[None, :]
    step = tl.program_id(1)
    rows = tl.arange(0, ROWS)
    packed = tl.load(codes_ptr + (step * ROWS + rows)[:, None] * N + n[None, :], mask=ok,
                     other=0).to(tl.int32)
    for q in tl.static_range(PLANES):
        first_input = step * PLANES * ROWS + q * ROWS
        at = (first_input // GROUP) * N + n  # a plane lies in one group
        code = ((packed >> (PLANE_BITS * q)) & MASK).to(tl.float32)
        if HAS_ZEROS:
            code -= tl.load(zeros_ptr + at, mask=n_ok, other=0).to(tl.float32)[None, :]
        weight = code * tl.load(scale_ptr + at, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_LOW:
            weight += tl.load(low_ptr + at, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(w_ptr + (first_input + rows)[:, None] * width + local[None, :],
                 weight.to(w_ptr.dtype.element_ty), mask=ok)


def decode_slice(weight: GroupQuantWeight, first: int, width: int, into: torch.Tensor,
                 scales: tuple) -> torch.Tensor:
    """Outputs [first, first + width) of `weight` decoded into `into`'s leading in x width
    elements, returned as that [in, width] view; `scales`: weight.scales_and_mins()."""
    scale, low, zeros = scales
    decoded = into.view(-1)[:weight.in_features * width].view(weight.in_features, width)
    grid = (triton.cdiv(width, DECODE_BLOCK_N), weight.in_features // weight.plane_step)
    _decode_planes_kernel[grid](
        weight.codes, scale, low if low is not None else scale,
        zeros if zeros is not None else scale, decoded, weight.out_features, first, width,
        GROUP=weight.group_size, PLANE_BITS=weight.bits, HAS_LOW=low is not None,
        HAS_ZEROS=zeros is not None, ROWS=weight.plane_rows, BLOCK_N=DECODE_BLOCK_N, num_warps=4)
    return decoded


def slice_width(weight: GroupQuantWeight, element_bytes: int) -> int:
    """Outputs a slice decodes: all of them, or the most whole DECODE_BLOCK_Ns whose weights
    fit group_gemm.DECODED_SLICE_BYTES."""
    fits = group_gemm.DECODED_SLICE_BYTES // (weight.in_features * element_bytes)
    fits = max(DECODE_BLOCK_N, fits // DECODE_BLOCK_N * DECODE_BLOCK_N)
    return min(weight.out_features, fits)


def decoded_product(flat: torch.Tensor, weight: GroupQuantWeight, out: torch.Tensor) -> None:
    """out [tokens, out] = flat [tokens, in] @ W^T, W decoded slice by slice (slice_width)
    into one workspace and multiplied into its columns of `out` by torch.mm (cuBLAS)."""
    width = slice_width(weight, flat.element_size())
    workspace = torch.empty(weight.in_features * width, dtype=flat.dtype, device=flat.device)
    scales = weight.scales_and_mins()
    for first in range(0, weight.out_features, width):
        columns = min(width, weight.out_features - first)
        decoded = decode_slice(weight, first, columns, workspace, scales)
        torch.mm(flat, decoded, out=out[:, first:first + columns])
