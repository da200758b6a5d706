"""Triton LoRA kernels, punica-style: every token reads its own adapter slot on the device,
so adapters and base-model tokens mix freely in one launch and nothing syncs with the host
(CUDA-graph capturable: the slot buffer and the weights have fixed addresses).

shrink: u[t, piece, :] = A[slot_t, piece] @ x[t]           (a batched GEMV, fp32 out)
expand: y[t, n]      += B[slot_t, :, n] . u[t, piece(n), :] (n's piece from the fused layout)
Tokens with slot -1 (the base model) are skipped by both."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.lora.layers import LoRAWeights

_NO_PIECE = 1 << 30  # the start column of a piece the layer does not have


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, u_ptr, slots_ptr, RANK, stride_x,
                   stride_as, stride_ap, stride_ar, K: tl.constexpr, NUM_PIECES: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0)
    piece = tl.program_id(1)
    slot = tl.load(slots_ptr + token)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if slot >= 0:
        a_base = a_ptr + slot.to(tl.int64) * stride_as + piece * stride_ap
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + token.to(tl.int64) * stride_x + k, mask=k < K, other=0.0)
            a = tl.load(a_base + r[:, None] * stride_ar + k[None, :],
                        mask=(r[:, None] < RANK) & (k[None, :] < K), other=0.0)
            acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    tl.store(u_ptr + (token.to(tl.int64) * NUM_PIECES + piece) * BLOCK_R + r, acc)


@triton.jit
def _expand_kernel(u_ptr, b_ptr, y_ptr, slots_ptr, N, RANK, stride_y, stride_bs, stride_br,
                   OFF1, OFF2, NUM_PIECES: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token)
    if slot >= 0:
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, BLOCK_R)
        piece = (n >= OFF1).to(tl.int32) + (n >= OFF2).to(tl.int32)
        u = tl.load(u_ptr + (token.to(tl.int64) * NUM_PIECES + piece[:, None]) * BLOCK_R
                    + r[None, :], mask=(r[None, :] < RANK), other=0.0)
        b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + r[None, :] * stride_br
                    + n[:, None], mask=(r[None, :] < RANK) & (n[:, None] < N), other=0.0)
        delta = tl.sum(u * b.to(tl.float32), axis=1)
        y_row = y_ptr + token.to(tl.int64) * stride_y + n
        y = tl.load(y_row, mask=n < N, other=0.0)
        tl.store(y_row, (y.to(tl.float32) + delta).to(y.dtype), mask=n < N)


def lora_triton(weights: LoRAWeights, x: torch.Tensor, y: torch.Tensor,
                token_slots: torch.Tensor) -> None:
    """y[t] += B[s_t] A[s_t] x[t] for every token whose slot s_t >= 0 (two launches)."""
    num_tokens = x.shape[0]
    if num_tokens == 0:
        return
    _, pieces, rank, k = weights.a.shape
    if pieces > 3:
        raise ValueError("the expand kernel handles layers of at most 3 pieces")
    x = x.to(weights.a.dtype).contiguous()
    block_r = triton.next_power_of_2(rank)
    u = torch.empty(num_tokens, pieces, block_r, dtype=torch.float32, device=x.device)
    _shrink_kernel[(num_tokens, pieces)](
        x, weights.a, u, token_slots, rank, x.stride(0), weights.a.stride(0),
        weights.a.stride(1), weights.a.stride(2), K=k, NUM_PIECES=pieces, BLOCK_R=block_r,
        BLOCK_K=max(16, min(128, 4096 // block_r)))
    offsets = list(weights.offsets[1:]) + [_NO_PIECE] * (3 - pieces)
    n = y.shape[1]
    block_n = max(16, min(128, 4096 // block_r))
    _expand_kernel[(num_tokens, triton.cdiv(n, block_n))](
        u, weights.b, y, token_slots, n, rank, y.stride(0), weights.b.stride(0),
        weights.b.stride(1), offsets[0], offsets[1], NUM_PIECES=pieces, BLOCK_R=block_r,
        BLOCK_N=block_n)
