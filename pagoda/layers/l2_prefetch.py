"""Asking the L2 cache for a product's weights while the kernels before it run (Hopper and
later, decode batches).

At a few tokens the small products of a layer read their weights well below the device's
copy rate, and the decode attention before the output projection reads little of its own.
A one-warp-a-program kernel launched before that attention issues bulk prefetches
(`cp.async.bulk.prefetch.L2`, one instruction a 16 KiB chunk) for the projection's
weights, which no kernel writes, and then waits for the kernel before it (programmatic
dependent launch), so the weights stream into L2 while the attention runs and the
projection reads them from there; likewise the next layer's qkv projection's ahead of the
down projection. A hint: the bytes read are the same either way, and nothing waits for the
prefetches. On CUDA devices of compute capability 9.0 and later, at the points
PAGODA_L2_PREFETCH names ("o", "qkv", comma-separated; "1" both; off by default)
(bench/kernels/l2_prefetch_bench.py measures what it can save).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import nn

from pagoda.layers.dependent_launch import dependent_launch, wait_for_previous_kernel
from pagoda.layers.triton_support import cuda_capability

CHUNK_BYTES = 16 << 10  # one bulk prefetch
LANES = 32  # prefetches a program (one warp, one each)
MAX_TOKENS = 16  # calls of more tokens read their weights at a rate that needs no help
MAX_TENSORS = 4  # a weight's tensors one launch asks for (codes, scales, mins, bias)


@triton.jit
def _ask_l2(base, nbytes, lane, CHUNK: tl.constexpr):
    """Ask L2 for bytes [lane CHUNK, (lane + 1) CHUNK) of `base`'s first `nbytes` (whole
    16-byte units: a bulk prefetch's)."""
    start = lane.to(tl.int64) * CHUNK
    size = (tl.minimum(nbytes - start, CHUNK) // 16 * 16).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0;\n\t"
        "@p cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0; }",
        "=r,l,r", [base.to(tl.pointer_type(tl.int8)) + start, size], dtype=tl.int32,
        is_pure=False, pack=1)


@triton.jit
def _prefetch_kernel(a, a_bytes, b, b_bytes, c, c_bytes, d, d_bytes, a_end, b_end, c_end,
                     CHUNK: tl.constexpr, LANES: tl.constexpr, PDL: tl.constexpr):
    """Programs [0, a_end) ask for `a`'s chunks, [a_end, b_end) `b`'s, and so on; then,
    with PDL, wait for the kernel before."""
    program = tl.program_id(0)
    lane = tl.arange(0, LANES)
    if program < a_end:
        _ask_l2(a, a_bytes, program * LANES + lane, CHUNK)
    elif program < b_end:
        _ask_l2(b, b_bytes, (program - a_end) * LANES + lane, CHUNK)
    elif program < c_end:
        _ask_l2(c, c_bytes, (program - b_end) * LANES + lane, CHUNK)
    else:
        _ask_l2(d, d_bytes, (program - c_end) * LANES + lane, CHUNK)
    wait_for_previous_kernel(PDL)


POINTS = ("o", "qkv")


def enabled(device: torch.device, point: str) -> bool:
    """Whether the product at `point` ("o": the output projection, ahead of the attention;
    "qkv": the next layer's, ahead of the down projection) has its weights asked of L2 on
    `device`: PAGODA_L2_PREFETCH names it, on CUDA compute capability 9.0 and later."""
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return point in _points(index)


@functools.cache
def _points(device_index: int) -> frozenset[str]:
    named = os.environ.get("PAGODA_L2_PREFETCH", "0")
    points = POINTS if named == "1" else [p for p in named.split(",") if p in POINTS]
    return frozenset(points) if cuda_capability(device_index) >= (9, 0) else frozenset()


def weight_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a product reads of `module` (its own parameters and buffers, largest
    first; at most MAX_TENSORS)."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.numel()]
    tensors.sort(key=lambda t: t.numel() * t.element_size(), reverse=True)
    return tensors[:MAX_TENSORS]


def prefetch(module: nn.Module, tokens: int, point: str) -> None:
    """Ask L2 for `module`'s weights ahead of its product at `point`, where that helps:
    where `enabled`, for calls of at most MAX_TOKENS tokens."""
    if tokens > MAX_TOKENS:
        return
    tensors = weight_tensors(module)
    if tensors and enabled(tensors[0].device, point):
        launch(tensors)


def program_ends(sizes: list[int]) -> list[int]:
    """The end of each tensor's programs in a launch (a program asks for LANES chunks),
    for tensors of `sizes` bytes, padded to MAX_TENSORS with the last end."""
    ends, end = [], 0
    for nbytes in sizes:
        end += triton.cdiv(triton.cdiv(nbytes, CHUNK_BYTES), LANES)
        ends.append(end)
    return ends + [end] * (MAX_TENSORS - len(ends))


def launch(tensors: list[torch.Tensor]) -> None:
    """One launch asking L2 for every byte of up to MAX_TENSORS tensors of one device."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    ends = program_ends(sizes)
    empty = MAX_TENSORS - len(tensors)
    args = [value for pair in zip(tensors + [tensors[0]] * empty, sizes + [0] * empty)
            for value in pair]
    _prefetch_kernel[(ends[-1],)](*args, *ends[:3], CHUNK=CHUNK_BYTES, LANES=LANES,
                                  num_warps=1, **dependent_launch(tensors[0].device))
