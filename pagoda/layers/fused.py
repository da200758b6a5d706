"""Fused Triton kernels for the small per-token ops (RMSNorm with the residual add, RoPE on
q and k, SiLU-and-multiply). On a GPU each unfused op is several tiny kernels, and at decode
batch sizes their launch and latency cost rivals the matmuls. The torch versions in the
layers stay the CPU path and the reference these are tested against."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0)
    tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (xf * rstd * w).to(x.dtype), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual) in one pass over [tokens, hidden]."""
    x = x.contiguous()
    n_rows, n_cols = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x)
    has_res = residual is not None
    _add_rms_norm_kernel[(n_rows,)](
        x, residual.contiguous() if has_res else x, weight, out, res_out, n_cols, eps,
        HAS_RESIDUAL=has_res, BLOCK=triton.next_power_of_2(n_cols),
        num_warps=min(max(triton.next_power_of_2(n_cols) // 256, 1), 16))
    return out, res_out


@triton.jit
def _rope_kernel(pos_ptr, q_ptr, k_ptr, cos_sin_ptr, q_stride, k_stride, num_q_heads,
                 num_k_heads, HALF: tl.constexpr, ROT_HALF: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token)
    offs = tl.arange(0, HALF)
    rot = offs < ROT_HALF
    cos = tl.load(cos_sin_ptr + pos * (2 * ROT_HALF) + offs, mask=rot, other=1.0)
    sin = tl.load(cos_sin_ptr + pos * (2 * ROT_HALF) + ROT_HALF + offs, mask=rot, other=0.0)
    heads = tl.arange(0, BLOCK_H)
    _rope_heads(q_ptr + token * q_stride, heads, num_q_heads, offs, rot, cos, sin, ROT_HALF,
                HEAD_DIM)
    _rope_heads(k_ptr + token * k_stride, heads, num_k_heads, offs, rot, cos, sin, ROT_HALF,
                HEAD_DIM)


@triton.jit
def _rope_heads(base, heads, num_heads, offs, rot, cos, sin, ROT_HALF: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    """Rotate-half RoPE in place on the first 2*ROT_HALF dims of each head."""
    mask = (heads[:, None] < num_heads) & rot[None, :]
    first = base + heads[:, None] * HEAD_DIM + offs[None, :]
    second = first + ROT_HALF
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(second, mask=mask, other=0.0)
    c, s = cos[None, :], sin[None, :]
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(first, (x1f * c - x2f * s).to(x1.dtype), mask=mask)
    tl.store(second, (x2f * c + x1f * s).to(x1.dtype), mask=mask)


def rope_qk_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor,
             rotary_dim: int) -> None:
    """RoPE in place on q [tokens, heads, dim] and k [tokens, kv_heads, dim] (token-major,
    contiguous within a token); cos_sin is [max_pos, rotary_dim] = [cos | sin]."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    rot_half = rotary_dim // 2
    _rope_kernel[(num_tokens,)](
        positions, q, k, cos_sin, q.stride(0), k.stride(0), num_q_heads, num_k_heads,
        HALF=triton.next_power_of_2(rot_half), ROT_HALF=rot_half, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(max(num_q_heads, num_k_heads)), num_warps=4)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK
    cols = start + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0)
    out = gate / (1.0 + tl.exp(-gate)) * up.to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, out.to(up.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :d]) * x[:, d:] for x [tokens, 2d]."""
    x = x.contiguous()
    n_rows, width = x.shape
    n_cols = width // 2
    out = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(n_rows, triton.cdiv(n_cols, block))](x, out, n_cols, BLOCK=block,
                                                           num_warps=4)
    return out
