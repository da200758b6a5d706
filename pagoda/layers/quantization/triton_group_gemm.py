"""The Triton kernel behind GroupQuantWeight: y = x W^T with W held as codes and a scale (and
a min) per group of inputs. Each program computes a BLOCK_M x BLOCK_N tile of y over one
split of the inputs: it loads a tile of codes (4-bit: a 32-byte-row tile of packed bytes,
both nibbles used), decodes it in registers with the group's scale and min, and multiplies
it with the matching tile of x on the tensor cores. Few-token calls (decode) split the inputs
over several programs so that the weight reads spread over the whole GPU; their partial
sums add up in float32. No autotuning and no host sync: the configuration is a function of
the shapes, so CUDA graphs capture it."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pagoda.layers.quantization.group_gemm import CHUNK, HALF, SMALL_M, GroupQuantWeight

# calls of at most SMALL_M tokens split the inputs into about TARGET_PROGRAMS programs per
# streaming multiprocessor, each split covering at least MIN_SPLIT_INPUTS inputs
TARGET_PROGRAMS = 2
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
def _group_gemm_kernel(x_ptr, codes_ptr, scale_ptr, low_ptr, out_ptr, M, N, stride_xm,
                       stride_ck, stride_cn, stride_om, stride_os, K_SPLIT: tl.constexpr, GROUP: tl.constexpr,
                       BITS: tl.constexpr, STEP: tl.constexpr, HAS_LOW: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
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
    out = out_ptr + split * stride_os + m[:, None] * stride_om + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@functools.cache
def _multiprocessors(device_index: int | None) -> int:
    if device_index is None:  # the CPU interpreter: an H200's count
        return 132
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(tokens: int, out_features: int, in_features: int, step: int,
                  multiprocessors: int) -> dict[str, int]:
    """Tile sizes, input splits and warps for a call of `tokens` rows."""
    block_m = 16 if tokens <= 16 else 32 if tokens <= 32 else 64 if tokens <= 64 else 128
    block_n = 64 if tokens <= SMALL_M else 128
    splits = 1
    if tokens <= SMALL_M:
        tiles = triton.cdiv(tokens, block_m) * triton.cdiv(out_features, block_n)
        unit = max(step, CHUNK)
        while (tiles * splits * 2 <= TARGET_PROGRAMS * multiprocessors
               and in_features % (2 * splits * unit) == 0
               and in_features // (2 * splits) >= MIN_SPLIT_INPUTS):
            splits *= 2
    large = tokens > SMALL_M
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "splits": splits,
            "num_warps": 8 if large else 4, "num_stages": 3 if large else 4}


def group_gemm(x: torch.Tensor, weight: GroupQuantWeight,
               config: dict[str, int] | None = None) -> torch.Tensor:
    """x [..., in] @ weight^T -> [..., out] in x's dtype; `config` overrides launch_config's
    (a benchmark's sweep)."""
    flat = x.reshape(-1, weight.in_features)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    tokens, out_features = flat.shape[0], weight.out_features
    step = min(HALF, weight.group_size)
    config = dict(config or launch_config(tokens, out_features, weight.in_features, step,
                                          _multiprocessors(x.device.index if x.is_cuda else None)))
    splits = config.pop("splits")
    if splits == 1:
        out = torch.empty(tokens, out_features, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(splits, tokens, out_features, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(tokens, config["BLOCK_M"]), triton.cdiv(out_features, config["BLOCK_N"]),
            splits)
    codes = weight.codes_by_input()
    _group_gemm_kernel[grid](
        flat, codes, weight.scale, weight.low if weight.low is not None else weight.scale,
        out, tokens, out_features, flat.stride(0), codes.stride(0), codes.stride(1), out_features,
        tokens * out_features, K_SPLIT=weight.in_features // splits, GROUP=weight.group_size,
        BITS=weight.bits, STEP=step, HAS_LOW=weight.low is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **config)
    if splits > 1:
        out = out.sum(0).to(x.dtype)
    return out.reshape(*x.shape[:-1], out_features)
