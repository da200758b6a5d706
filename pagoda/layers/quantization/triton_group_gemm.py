"""The Triton kernel behind GroupQuantWeight: y = x W^T with W held as codes and a scale (and
a min) per group of inputs. Each program computes a BLOCK_M x BLOCK_N tile of y over one
split of the inputs: it loads a tile of codes (4-bit: a 32-byte-row tile of packed bytes,
both nibbles used), decodes it in registers with the group's scale and min, and multiplies
it with the matching tile of x on the tensor cores (one-token calls too: on the H200 this
beat a kernel without tensor cores for every layout but 4-bit groups of 32). Few-token
calls (decode) split the inputs over several programs so that the weight reads spread over
the whole GPU; the last program of a tile to finish adds the splits' float32 partial sums
(no second launch). No autotuning and no host sync: the configuration is a function of the
shapes, so CUDA graphs capture it. Also here: per-token FP8 quantization of activations in
one launch (fp8_rows)."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pagoda.layers.quantization.group_gemm import (
    CHUNK,
    FP8,
    HALF,
    SMALL_M,
    GroupQuantWeight,
)

# calls of at most SMALL_M tokens split the inputs into about TARGET_PROGRAMS programs per
# streaming multiprocessor, each split covering at least MIN_SPLIT_INPUTS inputs (a sweep on
# the H200 found 8-16 splits of the 8B's projections fastest at one token)
TARGET_PROGRAMS = 4
MIN_SPLIT_INPUTS = 512


@triton.jit
def _decoded_step(acc, x_ptr, codes, k, m, m_ok, n, n_ok, N, stride_xm, scale_ptr, low_ptr,
                  GROUP: tl.constexpr, STEP: tl.constexpr, HAS_LOW: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """acc + x[m, k:k+STEP] @ decode(codes [STEP, BLOCK_N]); the STEP inputs lie in one group."""
    group = k // GROUP
    scale = tl.load(scale_ptr + group * N + n, mask=n_ok, other=0.0).to(tl.float32)
    weights = codes.to(tl.float32) * scale[None, :]
    if HAS_LOW:
        low = tl.load(low_ptr + group * N + n, mask=n_ok, other=0.0).to(tl.float32)
        weights += low[None, :]
    columns = k + tl.arange(0, STEP)
    x = tl.load(x_ptr + m[:, None] * stride_xm + columns[None, :], mask=m_ok[:, None],
                other=0.0)
    return acc + tl.dot(x, weights.to(x.dtype), input_precision=DOT_PRECISION)


@triton.jit
def _group_gemm_kernel(x_ptr, codes_ptr, scale_ptr, low_ptr, out_ptr, partial_ptr, count_ptr,
                       M, N, stride_xm, stride_ck, stride_cn, K_SPLIT: tl.constexpr,
                       SPLITS: tl.constexpr, GROUP: tl.constexpr, BITS: tl.constexpr,
                       STEP: tl.constexpr, HAS_LOW: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
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
                                scale_ptr, low_ptr, GROUP, STEP, HAS_LOW, DOT_PRECISION)
            acc = _decoded_step(acc, x_ptr, packed >> 4, k + STEP, m, m_ok, n, n_ok, N,
                                stride_xm, scale_ptr, low_ptr, GROUP, STEP, HAS_LOW,
                                DOT_PRECISION)
    else:
        for offset in range(0, K_SPLIT, STEP):
            k = first + offset
            codes = tl.load(codes_ptr + (k + rows)[:, None] * stride_ck + n[None, :] * stride_cn,
                            mask=n_ok[None, :])
            acc = _decoded_step(acc, x_ptr, codes, k, m, m_ok, n, n_ok, N, stride_xm,
                                scale_ptr, low_ptr, GROUP, STEP, HAS_LOW, DOT_PRECISION)
    # (columns past N load undefined codes: their sums are never stored)
    tile = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    _store_split_sums(acc, out_ptr, m[:, None] * N + n[None, :], m_ok[:, None] & n_ok[None, :],
                      partial_ptr, M * N, count_ptr, tile, split, SPLITS)


@triton.jit
def _store_split_sums(total, out_ptr, at, ok, partial_ptr, split_stride, count_ptr, tile, split,
                      SPLITS: tl.constexpr):
    """Store a program's float32 sums over its split of the inputs at out_ptr + at. With
    several splits: each program stores them as partials (split_stride apart) and counts
    itself done on its tile's counter; the last one adds the partials in split order, stores
    the output and resets the counter for the next call (no second launch)."""
    if SPLITS == 1:
        tl.store(out_ptr + at, total.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(partial_ptr + split * split_stride + at, total, mask=ok)
        tl.debug_barrier()  # every thread's partial sums stored before the count
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLITS - 1:
            total = tl.zeros_like(total)
            for part in tl.static_range(SPLITS):
                total += tl.load(partial_ptr + part * split_stride + at, mask=ok, other=0.0,
                                 cache_modifier=".cg")
            tl.store(out_ptr + at, total.to(out_ptr.dtype.element_ty), mask=ok)
            tl.atomic_xchg(count_ptr + tile, 0)


@functools.cache
def _multiprocessors(device_index: int | None) -> int:
    if device_index is None:  # the CPU interpreter: an H200's count
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(tokens: int, out_features: int, in_features: int, step: int,
                  multiprocessors: int) -> dict[str, int]:
    """Tile sizes, input splits and warps for a call of `tokens` rows."""
    block_m = 16 if tokens <= 16 else 32 if tokens <= 32 else 64 if tokens <= 64 else 128
    block_n = 128
    splits = 1
    if tokens <= SMALL_M:
        splits = _splits(triton.cdiv(tokens, block_m) * triton.cdiv(out_features, block_n),
                         in_features, max(step, CHUNK), multiprocessors)
    large = tokens > SMALL_M
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "splits": splits,
            "num_warps": 8 if large else 4, "num_stages": 3 if large else 4}


def _splits(tiles: int, in_features: int, unit: int, multiprocessors: int) -> int:
    """Input splits (a power of two) for `tiles` output tiles: about TARGET_PROGRAMS
    programs per multiprocessor, each split a whole number of `unit`s of inputs and at
    least MIN_SPLIT_INPUTS."""
    splits = 1
    while (tiles * splits * 2 <= TARGET_PROGRAMS * multiprocessors
           and in_features % (2 * splits * unit) == 0
           and in_features // (2 * splits) >= MIN_SPLIT_INPUTS):
        splits *= 2
    return splits


def _step(weight: GroupQuantWeight) -> int:
    """Inputs per decoded tile: a 4-bit half chunk, or a group if shorter."""
    return min(HALF, weight.group_size)


def group_gemm(x: torch.Tensor, weight: GroupQuantWeight) -> torch.Tensor:
    """x [..., in] @ weight^T -> [..., out] in x's dtype."""
    flat = x.reshape(-1, weight.in_features)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    tokens, out_features = flat.shape[0], weight.out_features
    config = launch_config(tokens, out_features, weight.in_features, _step(weight),
                           _multiprocessors(x.device.index if x.is_cuda else None))
    splits, block_m = config.pop("splits"), config.pop("BLOCK_M")
    out = torch.empty(tokens, out_features, dtype=x.dtype, device=x.device)
    partial = out if splits == 1 else torch.empty(splits, tokens, out_features,
                                                  dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(tokens, block_m), triton.cdiv(out_features, config["BLOCK_N"]), splits)
    codes = weight.codes_by_input()
    _group_gemm_kernel[grid](
        flat, codes, weight.scale, weight.low if weight.low is not None else weight.scale,
        out, partial, _split_counters(x.device, grid[0] * grid[1]), tokens, out_features,
        flat.stride(0), codes.stride(0), codes.stride(1), K_SPLIT=weight.in_features // splits,
        SPLITS=splits, GROUP=weight.group_size, BITS=weight.bits, STEP=_step(weight),
        HAS_LOW=weight.low is not None, BLOCK_M=block_m,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **config)
    return out.reshape(*x.shape[:-1], out_features)


# every counter set ever handed out, per device: a captured CUDA graph keeps the address of
# the one it was captured with, so none may be freed (they are a few KiB)
_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def _split_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 counters, one per output tile, for the kernel's in-kernel reduction of
    split inputs; every launch leaves them zero again, so one set per device serves every
    layer of a stream. A larger call gets a larger set; a call under CUDA-graph capture
    that needs a new one gets it from the graph's memory, zeroed in the graph."""
    held = _COUNTERS.setdefault(device, [])
    if held and held[-1].numel() >= tiles:
        return held[-1]
    held.append(torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device))
    return held[-1]


@triton.jit
def _fp8_rows_kernel(x_ptr, out_ptr, scale_ptr, K, stride_x, FP8_MAX: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)
    ok = k < K
    x = tl.load(x_ptr + row * stride_x + k, mask=ok, other=0.0).to(tl.float32)
    # IEEE divisions (Triton's `/` is approximate on GPUs), as torch rounds them
    peak = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(tl.math.div_rn(peak, tl.full([], FP8_MAX, tl.float32)), 1e-12)
    values = tl.clamp(tl.math.div_rn(x, tl.zeros_like(x) + scale), -FP8_MAX, FP8_MAX)
    tl.store(out_ptr + row * K + k, values.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(scale_ptr + row, scale)


def fp8_rows(x: torch.Tensor, fp8_max: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[tokens, K] -> float8 values and a float32 scale per token [tokens, 1] (the row's
    absolute max over `fp8_max`), in one launch."""
    tokens, width = x.shape
    values = torch.empty(tokens, width, dtype=FP8, device=x.device)
    scale = torch.empty(tokens, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(width)
    _fp8_rows_kernel[(tokens,)](x, values, scale, width, x.stride(0), FP8_MAX=fp8_max,
                                BLOCK_K=block, num_warps=min(16, max(4, block // 1024)))
    return values, scale
