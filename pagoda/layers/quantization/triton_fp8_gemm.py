"""FP8 x FP8 products on tensor cores in Triton, for calls of 33 to 64 tokens: y = (a
W^T) * a_scale[token] * w_scale[output], a and W float8 (E4M3) rows of K inputs, summed in
float32 by the tensor cores' FP8 instructions (fast accumulation, as torch._scaled_mm with
use_fast_accum).

Why a kernel of our own beside cuBLAS: at 33 to 64 tokens (decode batches of that many
sequences) the products with few outputs (the 8B's o and down, 4,096) make too few of
cuBLAS's tiles to occupy the GPU. Here tiles of 64 x 64 and, where they are still too few,
the inputs split over several programs, the last of each tile adding the others' float32
sums (no second launch). A program's tile index runs over the tokens first, so the programs
that read the same weights run side by side and the weights come from DRAM once."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pagoda.layers.dependent_launch import dependent_launch, wait_for_previous_kernel
from pagoda.layers.quantization.triton_group_gemm import (
    _partials,
    _store_split_sums,
    multiprocessor_count,
)
from pagoda.layers.tile_counters import tile_counters


@triton.jit
def _fp8_gemm_kernel(a_ptr, w_ptr, a_scale_ptr, w_scale_ptr, out_ptr, partial_ptr, count_ptr,
                     M, N, K, K_SPLIT: tl.constexpr, SPLITS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PDL: tl.constexpr):
    """out[m, n] for a BLOCK_M x BLOCK_N tile over one split of the inputs (axis 1 of the
    grid); a [M, K] and w [N, K] row-major float8, a_scale [M] and w_scale [N] float32."""
    wait_for_previous_kernel(PDL)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tile = tl.program_id(0)
    m = (tile % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = (tile // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    k = tl.program_id(1) * K_SPLIT + tl.arange(0, BLOCK_K)
    a_at = a_ptr + m[:, None] * K + k[None, :]
    w_at = w_ptr + n[:, None] * K + k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K_SPLIT, BLOCK_K):
        a = tl.load(a_at, mask=m_ok[:, None], other=0.0)
        w = tl.load(w_at, mask=n_ok[:, None], other=0.0)
        acc = tl.dot(a, tl.trans(w), acc)
        a_at += BLOCK_K
        w_at += BLOCK_K
    a_scale = tl.load(a_scale_ptr + m, mask=m_ok, other=0.0)
    w_scale = tl.load(w_scale_ptr + n, mask=n_ok, other=0.0)
    acc = acc * a_scale[:, None] * w_scale[None, :]
    _store_split_sums(acc, out_ptr, m[:, None] * N + n[None, :], m_ok[:, None] & n_ok[None, :],
                      partial_ptr, M * N, count_ptr, tile, tl.program_id(1), SPLITS)


# the tile (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) and the calls it takes: on an H100, the
# 8B layer's four products in 104.4 us against cuBLAS's 112.6 at 48 tokens, 103.7 against
# 113.5 at 64 (the o and down products gain most); at 128 tokens no setting of a 36-setting
# sweep beat cuBLAS by more than 2 % over the layer, and from 256 on cuBLAS was faster
# (bench/kernels/fp8_gemm.py, bench/results/README.md)
FP8_TILE = (64, 64, 128, 4, 4)
FROM_TOKENS, UP_TO_TOKENS = 33, 64
MAX_SPLITS = 4
# PAGODA_FP8_GEMM=triton sends every call this kernel takes here, cublas none (read once)
CHOSEN = os.environ.get("PAGODA_FP8_GEMM", "")


def takes(tokens: int, in_features: int) -> bool:
    """Whether a call goes to this kernel rather than torch._scaled_mm: FROM_TOKENS to
    UP_TO_TOKENS tokens (or as CHOSEN says) over inputs a whole number of the tile's
    steps."""
    return _allowed(in_features) and (CHOSEN == "triton" or FROM_TOKENS <= tokens <= UP_TO_TOKENS)


def _allowed(in_features: int) -> bool:
    """Whether any call of `in_features` inputs may come here (not PAGODA_FP8_GEMM=cublas,
    inputs a whole number of the tile's steps)."""
    return CHOSEN != "cublas" and in_features % FP8_TILE[2] == 0


def kernels_above_few_tokens(in_features: int) -> str:
    """What multiplies calls of more than FEW_TOKENS tokens (as `takes` chooses), for the
    startup log."""
    if not _allowed(in_features):
        return "torch._scaled_mm"
    if CHOSEN == "triton":
        return "triton fp8 tensor-core kernel"
    return f"triton fp8 tensor-core kernel to {UP_TO_TOKENS} tokens, torch._scaled_mm above"


def fp8_config(tokens: int, out_features: int, in_features: int,
               multiprocessors: int) -> dict[str, int]:
    """FP8_TILE, and the inputs split (up to MAX_SPLITS ways) while the programs stay within
    one per multiprocessor."""
    block_m, block_n, block_k, warps, stages = FP8_TILE
    tiles = triton.cdiv(tokens, block_m) * triton.cdiv(out_features, block_n)
    splits = 1
    while (splits < MAX_SPLITS and tiles * splits * 2 <= multiprocessors
           and in_features % (2 * splits * block_k) == 0):
        splits *= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps,
            "num_stages": stages, "splits": splits}


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
             out_dtype: torch.dtype, config: dict[str, int] | None = None) -> torch.Tensor:
    """(a [M, K] float8 @ w [N, K]^T float8) * a_scale [M] * w_scale [N] -> [M, N] of
    `out_dtype`; `config` as fp8_config's (default: fp8_config's choice)."""
    tokens, in_features = a.shape
    out_features = w.shape[0]
    config = dict(config or fp8_config(tokens, out_features, in_features,
                                       multiprocessor_count(a.device.index)))
    splits = config.pop("splits")
    if in_features % (splits * config["BLOCK_K"]):
        raise ValueError(f"{in_features} inputs are not {splits} splits of whole steps")
    out = torch.empty(tokens, out_features, dtype=out_dtype, device=a.device)
    tiles = triton.cdiv(tokens, config["BLOCK_M"]) * triton.cdiv(out_features,
                                                                  config["BLOCK_N"])
    _fp8_gemm_kernel[(tiles, splits)](
        a, w, a_scale, w_scale, out, _partials(out, splits), tile_counters(a.device, tiles),
        tokens, out_features, in_features, K_SPLIT=in_features // splits, SPLITS=splits,
        **config, **dependent_launch(a.device))
    return out
