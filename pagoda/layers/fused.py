"""Fused Triton kernels for the small per-token ops (RMSNorm with the residual add, RoPE on q
and k with their per-head RMSNorm and the KV store, gated activations). On a GPU each unfused
op is several tiny kernels, and at decode batch sizes their launch and latency cost rivals the
matmuls. The torch versions in the
layers stay the CPU path and the reference these are tested against."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from pagoda.layers.attention.backend import UNIT_SCALES, KVScales
from pagoda.layers.attention.triton_kv_store import cache_values
from pagoda.layers.dependent_launch import dependent_launch, wait_for_previous_kernel
from pagoda.layers.float8_rows import FLOAT8_MAX, Float8Rows

if TYPE_CHECKING:
    from pagoda.layers.norm import RMSNorm


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, scale_ptr, n_cols, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
                         FP8_MAX: tl.constexpr = 0.0):
    """One row's norm; FP8_MAX (non-zero): stored as float8_row's float8 values of the
    rounded normed row, its scale at scale_ptr + row."""
    wait_for_previous_kernel(PDL)
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
    normed = (xf * rstd * w).to(x.dtype)
    if FP8_MAX != 0.0:
        store_float8_row(normed, out_ptr + row * n_cols + cols, mask, scale_ptr + row, FP8_MAX)
    else:
        tl.store(out_ptr + row * n_cols + cols, normed, mask=mask)


@triton.jit
def float8_row(values, FP8_MAX: tl.constexpr):
    """A row of values (float32, any masked-off places 0) as float8 terms: each over the
    row's scale (its absolute max over FP8_MAX, at least 1e-12), clamped to +-FP8_MAX (to be
    cast), and that scale; IEEE divisions (Triton's `/` is approximate on GPUs), as torch
    rounds them."""
    peak = tl.max(tl.abs(values), axis=0)
    scale = tl.maximum(tl.math.div_rn(peak, tl.full([], FP8_MAX, tl.float32)), 1e-12)
    terms = tl.clamp(tl.math.div_rn(values, tl.zeros_like(values) + scale), -FP8_MAX, FP8_MAX)
    return terms, scale


@triton.jit
def store_float8_row(values, at, mask, scale_at, FP8_MAX: tl.constexpr):
    """float8_row of a row of values (in their own type, 0 where masked) stored at `at`
    (float8) and its scale at scale_at."""
    terms, scale = float8_row(values.to(tl.float32), FP8_MAX)
    tl.store(at, terms.to(at.dtype.element_ty), mask=mask)
    tl.store(scale_at, scale)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual) in one pass over [tokens, hidden]."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return out, _add_rms_norm(x, residual, weight, eps, out, None)


def add_rms_norm_float8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> tuple[Float8Rows, torch.Tensor]:
    """add_rms_norm's normed rows as Float8Rows (float8_rows of them: the quantization of
    an FP8 product's activations, in the norm's pass), and x + residual."""
    rows = Float8Rows.empty(x.shape[0], x.shape[1], x.dtype, x.device)
    return rows, _add_rms_norm(x, residual, weight, eps, rows.values, rows)


def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                  eps: float, out: torch.Tensor, rows: Float8Rows | None) -> torch.Tensor:
    """The norm's launch into `out` (rows: as those float8 rows); returns x + residual."""
    x = x.contiguous()
    n_rows, n_cols = x.shape
    res_out = torch.empty_like(x)
    has_res = residual is not None
    block = triton.next_power_of_2(n_cols)
    _add_rms_norm_kernel[(n_rows,)](
        x, residual.contiguous() if has_res else x, weight, out, res_out,
        rows.scale if rows is not None else res_out, n_cols, eps, HAS_RESIDUAL=has_res,
        BLOCK=block, num_warps=min(max(block // 256, 1), 16),
        FP8_MAX=FLOAT8_MAX if rows is not None else 0.0, **dependent_launch(x.device))
    return res_out


@triton.jit
def _norm_add_rms_norm_kernel(x_ptr, res_ptr, w_pre_ptr, w_ptr, out_ptr, res_out_ptr, n_cols,
                              eps_pre, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """rms_norm(x) * w_pre, rounded to x's dtype, added to the residual, then normed again."""
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps_pre)
    w_pre = tl.load(w_pre_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    h = (xf * rstd * w_pre).to(x.dtype)
    h = h + tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0)
    tl.store(res_out_ptr + row * n_cols + cols, h, mask=mask)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (hf * rstd * w).to(x.dtype), mask=mask)


def norm_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight_pre: torch.Tensor,
                      eps_pre: float, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h = rms_norm(x) * weight_pre + residual; (rms_norm(h) * weight, h) in one pass: a
    block's output norm, its residual add and the next pre-norm (Gemma)."""
    x = x.contiguous()
    n_rows, n_cols = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x)
    block = triton.next_power_of_2(n_cols)
    _norm_add_rms_norm_kernel[(n_rows,)](x, residual.contiguous(), weight_pre, weight, out,
                                         res_out, n_cols, eps_pre, eps, BLOCK=block,
                                         num_warps=min(max(block // 256, 1), 16),
                                         **dependent_launch(x.device))
    return out, res_out


@triton.jit
def _rope_kernel(pos_ptr, q_ptr, k_ptr, cos_sin_ptr, q_stride, k_stride, num_q_heads,
                 num_k_heads, HALF: tl.constexpr, ROT_HALF: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    _rope_token(token, pos_ptr, q_ptr, k_ptr, cos_sin_ptr, q_stride, k_stride, num_q_heads,
                num_k_heads, HALF, ROT_HALF, HEAD_DIM, BLOCK_H)


@triton.jit
def _rope_token(token, pos_ptr, q_ptr, k_ptr, cos_sin_ptr, q_stride, k_stride, num_q_heads,
                num_k_heads, HALF: tl.constexpr, ROT_HALF: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):
    """RoPE in place on every q and k head of one token."""
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
    tl.store(first, rope_rotation(x1f, x2f, c, -s).to(x1.dtype), mask=mask)
    tl.store(second, rope_rotation(x2f, x1f, c, s).to(x1.dtype), mask=mask)


@triton.jit
def rope_rotation(x, partner, c, signed_s):
    """One RoPE output, x * c + partner * signed_s in float32, rounded as every kernel
    that rotates rounds it (partner's product, then one fused multiply-add), so that a k row
    rotated here and one rotated in the attention kernel are the same bits: left to the
    compiler, the two sums contract differently."""
    return tl.fma(x, c, partner * signed_s)


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
        BLOCK_H=triton.next_power_of_2(max(num_q_heads, num_k_heads)), num_warps=4,
        **dependent_launch(q.device))


@triton.jit
def _gated_act_kernel(x_ptr, out_ptr, n_cols, GELU_TANH: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr):
    """act(gate) * up over one row's block of columns; act is SiLU, or GELU's tanh form."""
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK
    cols = start + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * n_cols + cols, gated_value(gate, up, GELU_TANH), mask=mask)


@triton.jit
def gated_value(gate, up, GELU_TANH: tl.constexpr):
    """act(gate) * up computed in float32 and rounded to up's type; act is SiLU, or GELU's
    tanh form (also read by the gate-up products that apply it to their outputs)."""
    gate = gate.to(tl.float32)
    if GELU_TANH:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)  # sqrt(2/pi)
        act = 0.5 * gate * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))  # tanh(inner)
    else:
        act = gate / (1.0 + tl.exp(-gate))
    return (act * up.to(tl.float32)).to(up.dtype)


def _gated_act(x: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    x = x.contiguous()
    n_rows, width = x.shape
    n_cols = width // 2
    out = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    block = 1024
    _gated_act_kernel[(n_rows, triton.cdiv(n_cols, block))](x, out, n_cols,
                                                            GELU_TANH=gelu_tanh, BLOCK=block,
                                                            num_warps=4,
                                                            **dependent_launch(x.device))
    return out


@triton.jit
def _gated_act_float8_kernel(x_ptr, out_ptr, scale_ptr, n_cols, GELU_TANH: tl.constexpr,
                             BLOCK: tl.constexpr, FP8_MAX: tl.constexpr, PDL: tl.constexpr):
    """act(gate) * up over one whole row, rounded to up's type, stored as float8_row's
    float8 values (its scale at scale_ptr + row)."""
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0)
    store_float8_row(gated_value(gate, up, GELU_TANH), out_ptr + row * n_cols + cols, mask,
                      scale_ptr + row, FP8_MAX)


def gated_act_float8(x: torch.Tensor, gelu_tanh: bool) -> Float8Rows:
    """act(x[:, :d]) * x[:, d:] (SiLU, or GELU's tanh form) as Float8Rows (the float8_rows
    of the rounded products, each row in one program: the quantization of an FP8 product's
    activations, in the activation's pass)."""
    x = x.contiguous()
    n_rows, width = x.shape
    n_cols = width // 2
    rows = Float8Rows.empty(n_rows, n_cols, x.dtype, x.device)
    block = triton.next_power_of_2(n_cols)
    _gated_act_float8_kernel[(n_rows,)](x, rows.values, rows.scale, n_cols,
                                        GELU_TANH=gelu_tanh, BLOCK=block, FP8_MAX=FLOAT8_MAX,
                                        num_warps=min(16, max(4, block // 1024)),
                                        **dependent_launch(x.device))
    return rows


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :d]) * x[:, d:] for x [tokens, 2d]."""
    return _gated_act(x, gelu_tanh=False)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x[:, :d]) * x[:, d:] for x [tokens, 2d] (Gemma's gelu_pytorch_tanh)."""
    return _gated_act(x, gelu_tanh=True)


@triton.jit
def _norm_heads(base, num_heads, w_ptr, eps, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """RMSNorm in place over each HEAD_DIM-wide head of one token (heads contiguous)."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HEAD_DIM)
    ptr = base + heads[:, None] * HEAD_DIM + dims[None, :]
    x = tl.load(ptr, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / HEAD_DIM + eps)
    w = tl.load(w_ptr + dims, mask=dims < HEAD_DIM, other=0.0).to(tl.float32)
    tl.store(ptr, (xf * rstd[:, None] * w[None, :]).to(x.dtype), mask=mask)


@triton.jit(do_not_specialize=["num_slots"])
def _rope_store_kv_kernel(pos_ptr, q_ptr, k_ptr, v_ptr, cos_sin_ptr, slot_ptr, key_cache_ptr,
                          value_cache_ptr, k_divisor, v_divisor, q_norm_ptr, k_norm_ptr, q_eps,
                          k_eps, q_stride, k_stride, v_stride, num_slots, num_q_heads,
                          num_k_heads, stride_kcb, stride_kcs, stride_vcb, stride_vcs,
                          QK_NORM: tl.constexpr,
                          HALF: tl.constexpr, ROT_HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_KH: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          SCALED: tl.constexpr, PDL: tl.constexpr):
    """With QK_NORM, each head of one token's q and k RMS-normed (in place); RoPE on them
    (in place), then its k and v rows into the paged cache (heads contiguous in a cache
    slot; with SCALED, divided by k_divisor and v_divisor); slot < 0, or a token past
    num_slots, stores nothing."""
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    if QK_NORM:
        _norm_heads(q_ptr + token * q_stride, num_q_heads, q_norm_ptr, q_eps, HEAD_DIM, BLOCK_H,
                    BLOCK_D)
        _norm_heads(k_ptr + token * k_stride, num_k_heads, k_norm_ptr, k_eps, HEAD_DIM, BLOCK_H,
                    BLOCK_D)
        tl.debug_barrier()  # the normed heads are in memory before RoPE reads their halves
    _rope_token(token, pos_ptr, q_ptr, k_ptr, cos_sin_ptr, q_stride, k_stride, num_q_heads,
                num_k_heads, HALF, ROT_HALF, HEAD_DIM, BLOCK_H)
    if token >= num_slots:
        return
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # CUDA-graph padding: this token has no KV slot
        return
    tl.debug_barrier()  # every thread's rotated k is in memory before the copy reads it
    kv_heads = tl.arange(0, BLOCK_KH)
    dims = tl.arange(0, BLOCK_D)
    mask = (kv_heads[:, None] < num_k_heads) & (dims[None, :] < HEAD_DIM)
    row = kv_heads[:, None] * HEAD_DIM + dims[None, :]
    k = tl.load(k_ptr + token * k_stride + row, mask=mask)
    v = tl.load(v_ptr + token * v_stride + row, mask=mask)
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    tl.store(key_cache_ptr + block * stride_kcb + offset * stride_kcs + row,
             cache_values(k, k_divisor, key_cache_ptr, SCALED), mask=mask)
    tl.store(value_cache_ptr + block * stride_vcb + offset * stride_vcs + row,
             cache_values(v, v_divisor, value_cache_ptr, SCALED), mask=mask)


def rope_store_kv_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   cos_sin: torch.Tensor, rotary_dim: int, key_cache: torch.Tensor,
                   value_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   qk_norm: tuple[RMSNorm, RMSNorm] | None = None,
                   kv_scales: KVScales = UNIT_SCALES) -> None:
    """rope_qk_ and the KV store in one launch: q and k [tokens, heads, dim] are rotated in
    place (after each head is normed by qk_norm's q and k norm, when given: Qwen3, Gemma 3),
    then each token's k and v rows (divided by kv_scales) go to caches [blocks, block_size,
    kv_heads, dim] at slot_mapping (negative slots and tokens past its length are
    skipped)."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_k_heads, cache_dim = key_cache.shape
    if k.shape[1:] != (num_k_heads, cache_dim) or v.shape[1:] != (num_k_heads, cache_dim) \
            or head_dim != cache_dim:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match the cache "
                         f"({num_k_heads} kv heads, head_dim {cache_dim})")
    if key_cache.stride()[2:] != (head_dim, 1) or value_cache.stride() != key_cache.stride() \
            or k.stride()[1:] != (head_dim, 1) or v.stride()[1:] != (head_dim, 1):
        raise ValueError("rope_store_kv_ needs each token's heads contiguous")
    if num_tokens == 0:
        return
    rot_half = rotary_dim // 2
    q_norm, k_norm = qk_norm or (None, None)
    _rope_store_kv_kernel[(num_tokens,)](
        positions, q, k, v, cos_sin, slot_mapping, key_cache, value_cache, kv_scales.k,
        kv_scales.v, q_norm.weight if q_norm else q, k_norm.weight if k_norm else k,
        q_norm.eps if q_norm else 0.0, k_norm.eps if k_norm else 0.0,
        q.stride(0), k.stride(0), v.stride(0), slot_mapping.shape[0], num_q_heads,
        num_k_heads, key_cache.stride(0), key_cache.stride(1), value_cache.stride(0),
        value_cache.stride(1), QK_NORM=qk_norm is not None,
        HALF=triton.next_power_of_2(rot_half), ROT_HALF=rot_half,
        HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(max(num_q_heads, num_k_heads)),
        BLOCK_KH=triton.next_power_of_2(num_k_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, SCALED=not kv_scales.is_unit, num_warps=4,
        **dependent_launch(q.device))
