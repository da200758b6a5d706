"""Triton kernel that writes a step's new K/V rows into the paged cache at slot_mapping."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.layers.attention.backend import UNIT_SCALES, KVScales
from pagoda.layers.dependent_launch import dependent_launch, wait_for_previous_kernel

# A program copies at most this many elements of one token's K (and as many of its V).
_MAX_ELEMS_PER_PROGRAM = 2048


@triton.jit
def cache_values(x, divisor, cache_ptr, SCALED: tl.constexpr):
    """x as the cache at cache_ptr holds it: in its element type, divided by `divisor` first
    with SCALED (IEEE division in float32, as torch divides)."""
    if SCALED:
        x = tl.math.div_rn(x.to(tl.float32), tl.zeros_like(x.to(tl.float32)) + divisor)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _kv_store_kernel(
    k_ptr, v_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr, k_divisor, v_divisor,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kcs, stride_kch, stride_kcd,
    stride_vcb, stride_vcs, stride_vch, stride_vcd,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, SCALED: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (t, c) copies heads [c*BLOCK_H, (c+1)*BLOCK_H) of token t (with SCALED, K
    divided by k_divisor and V by v_divisor); slot < 0 = skip."""
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # CUDA-graph padding: this token has no KV slot
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)

    k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh
                + dims[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh
                + dims[None, :] * stride_vd, mask=mask)
    k_dst = (key_cache_ptr + block * stride_kcb + offset * stride_kcs
             + heads[:, None] * stride_kch + dims[None, :] * stride_kcd)
    v_dst = (value_cache_ptr + block * stride_vcb + offset * stride_vcs
             + heads[:, None] * stride_vch + dims[None, :] * stride_vcd)
    tl.store(k_dst, cache_values(k, k_divisor, key_cache_ptr, SCALED), mask=mask)
    tl.store(v_dst, cache_values(v, v_divisor, value_cache_ptr, SCALED), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor,
             kv_scales: KVScales = UNIT_SCALES) -> None:
    """Write k/v [tokens, kv_heads, dim] (divided by kv_scales) into caches [num_blocks,
    block_size, kv_heads, dim] at slot_mapping [tokens] (slot = block * block_size + offset);
    negative slots are skipped. Tokens past slot_mapping's length are ignored. No host
    synchronisation."""
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    if k.shape[0] < num_tokens or v.shape[0] < num_tokens:
        raise ValueError(f"{num_tokens} slots but only {k.shape[0]} keys / {v.shape[0]} values")
    _, block_size, num_kv_heads, head_dim = key_cache.shape
    if k.shape[1:] != (num_kv_heads, head_dim) or v.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match the cache "
                         f"({num_kv_heads} kv heads, head_dim {head_dim})")
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, _MAX_ELEMS_PER_PROGRAM // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _kv_store_kernel[grid](
        k, v, key_cache, value_cache, slot_mapping, kv_scales.k, kv_scales.v,
        *k.stride(), *v.stride(), *key_cache.stride(), *value_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_H=block_h, BLOCK_D=block_d, SCALED=not kv_scales.is_unit,
        num_warps=max(1, min(4, block_h * block_d // 256)),
        **dependent_launch(k.device),
    )
