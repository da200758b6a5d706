"""Triton LoRA kernels over the step's tiles: each program takes up to TILE_TOKENS tokens
of one adapter (LoRAStepState.tiles), so an adapter's A and B are read once per tile rather
than once per token, and the products run as tile matmuls (tensor cores for 16-bit
weights). Adapters and base-model tokens mix freely in one launch and nothing syncs with
the host: the grid depends on the token count alone (CUDA-graph capturable; tiles past the
step's have count 0 and return at once).

shrink: u[split, t, piece, :] = A[slot, piece][:, K range of split] @ x[t]   (fp32)
expand: y[t, n] += sum over splits of u[., t, piece(n), :] . B[slot, :, n]
Shrink splits the input dimension over SPLIT_K programs when the step has few tokens, so
that a decode step's reads spread over more of the GPU; expand adds the partial sums.
Tokens with no adapter belong to no tile and are left alone."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.lora.layers import TILE_TOKENS, LoRAStepState, LoRAWeights, max_tiles

_NO_PIECE = 1 << 30  # the start column of a piece the layer does not have
SPLIT_K_TOKENS = 256  # steps of at most this many tokens split shrink's input dimension
SPLIT_K_COLUMNS = 512  # ... into parts of about this many columns (at most MAX_SPLIT_K)
MAX_SPLIT_K = 8


@triton.jit
def _tile(tiles_ptr, sorted_ptr, BLOCK_M: tl.constexpr):
    """The tile's slot, its tokens' indices and their mask (count 0: nothing to do)."""
    tile = tl.program_id(0)
    slot = tl.load(tiles_ptr + tile * 3)
    start = tl.load(tiles_ptr + tile * 3 + 1)
    count = tl.load(tiles_ptr + tile * 3 + 2)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < count
    rows = tl.load(sorted_ptr + start + m, mask=m_ok, other=0).to(tl.int64)
    return slot, count, rows, m_ok


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, u_ptr, sorted_ptr, tiles_ptr, num_tokens, rank, stride_x,
                   stride_as, stride_ap, stride_ar, K: tl.constexpr, K_SPLIT: tl.constexpr,
                   NUM_PIECES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    slot, count, rows, m_ok = _tile(tiles_ptr, sorted_ptr, BLOCK_M)
    if count == 0:
        return
    piece = tl.program_id(1)
    split = tl.program_id(2)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < rank
    a_base = a_ptr + slot.to(tl.int64) * stride_as + piece * stride_ap
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K_SPLIT, BLOCK_K):
        k = split * K_SPLIT + k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_base + r[None, :] * stride_ar + k[:, None],
                    mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
    u_rows = (split * num_tokens + rows) * NUM_PIECES + piece
    tl.store(u_ptr + u_rows[:, None] * BLOCK_R + r[None, :], acc, mask=m_ok[:, None])


@triton.jit
def _expand_kernel(u_ptr, b_ptr, y_ptr, sorted_ptr, tiles_ptr, num_tokens, N, rank, stride_y,
                   stride_bs, stride_br, OFF1, OFF2, NUM_PIECES: tl.constexpr,
                   SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    slot, count, rows, m_ok = _tile(tiles_ptr, sorted_ptr, BLOCK_M)
    if count == 0:
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    r = tl.arange(0, BLOCK_R)
    b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + r[:, None] * stride_br + n[None, :],
                mask=(r[:, None] < rank) & n_ok[None, :], other=0.0)
    piece_of_n = (n >= OFF1).to(tl.int32) + (n >= OFF2).to(tl.int32)
    delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for piece in tl.static_range(NUM_PIECES):
        u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for split in tl.static_range(SPLIT_K):
            u_rows = (split * num_tokens + rows) * NUM_PIECES + piece
            u += tl.load(u_ptr + u_rows[:, None] * BLOCK_R + r[None, :], mask=m_ok[:, None],
                         other=0.0)
        # a tile's columns may straddle two pieces: each piece's u meets only its columns
        b_piece = tl.where((piece_of_n == piece)[None, :], b, tl.zeros_like(b))
        delta = tl.dot(u.to(b.dtype), b_piece, delta, input_precision=DOT_PRECISION)
    y_ptrs = y_ptr + rows[:, None] * stride_y + n[None, :]
    y_ok = m_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=y_ok, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=y_ok)


def split_k(num_tokens: int, k: int) -> int:
    """Shrink's input-dimension parts: several for steps of few tokens (decode), one
    otherwise (the tiles alone fill the GPU)."""
    if num_tokens > SPLIT_K_TOKENS:
        return 1
    return max(1, min(MAX_SPLIT_K, k // SPLIT_K_COLUMNS))


def lora_triton(weights: LoRAWeights, x: torch.Tensor, y: torch.Tensor,
                state: LoRAStepState) -> None:
    """y[t] += B[s_t] A[s_t] x[t] for every token with an adapter slot s_t (two launches
    over the step's tiles)."""
    num_tokens = x.shape[0]
    if num_tokens == 0:
        return
    num_slots, pieces, rank, k = weights.a.shape
    if pieces > 3:
        raise ValueError("the expand kernel handles layers of at most 3 pieces")
    x = x.to(weights.a.dtype).contiguous()
    precision = "ieee" if weights.a.dtype == torch.float32 else "tf32"  # fp32: exact
    block_r = max(16, triton.next_power_of_2(rank))
    block_k = max(16, min(128, triton.next_power_of_2(k)))
    splits = split_k(num_tokens, k)
    k_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_split)
    u = torch.empty(splits, num_tokens, pieces, block_r, dtype=torch.float32, device=x.device)
    tiles = max_tiles(num_tokens, num_slots)
    _shrink_kernel[(tiles, pieces, splits)](
        x, weights.a, u, state.sorted_tokens, state.tiles, num_tokens, rank, x.stride(0),
        weights.a.stride(0), weights.a.stride(1), weights.a.stride(2), K=k, K_SPLIT=k_split,
        NUM_PIECES=pieces, BLOCK_M=TILE_TOKENS, BLOCK_R=block_r, BLOCK_K=block_k,
        DOT_PRECISION=precision)
    offsets = list(weights.offsets[1:]) + [_NO_PIECE] * (3 - pieces)
    n = y.shape[1]
    block_n = 64 if n <= 4096 else 128
    _expand_kernel[(tiles, triton.cdiv(n, block_n))](
        u, weights.b, y, state.sorted_tokens, state.tiles, num_tokens, n, rank, y.stride(0),
        weights.b.stride(0), weights.b.stride(1), offsets[0], offsets[1], NUM_PIECES=pieces,
        SPLIT_K=splits, BLOCK_M=TILE_TOKENS, BLOCK_R=block_r, BLOCK_N=block_n,
        DOT_PRECISION=precision)
