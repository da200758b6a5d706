"""Unified Triton paged attention: one launch serves a mixed batch of prefill chunks (with
cached context) and decodes; a split-KV variant plus a reduce kernel serve small decode
batches with long contexts; `plan_attention` picks the variant and `unified_attention` runs it.

Layout. q/out are packed [tokens, heads, dim]; sequence s owns tokens
[query_start_loc[s], query_start_loc[s+1]) and has seq_lens[s] tokens of KV in total, the last
q_len of which are its queries (query j sits at position seq_len - q_len + j). KV caches are
[num_blocks, block_size, kv_heads, dim], addressed through block_tables[s, pos // block_size].

Grid. A program owns BLOCK_Q consecutive query tokens of one sequence times the GROUP query
heads of one KV head: BLOCK_M = BLOCK_Q * GROUP rows (padded up to a power of two), so a decode
still fills a tensor-core tile with the heads that share its KV. Dimension 0 is the host-free
upper bound `num_tokens // BLOCK_Q + num_seqs` on the number of q-blocks: sequence s owns
programs [query_start_loc[s] // BLOCK_Q + s, query_start_loc[s+1] // BLOCK_Q + s + 1), found by
binary search; programs past a sequence's queries (or past the last sequence) exit. Decode-only
batches skip the search (program = sequence). Dimension 1 is the KV head; the split variant
adds dimension 2, the KV segment.

Sliding window (SLIDING, a constexpr: False compiles exactly the full-attention kernel; the
window itself is a runtime argument, so every window shares one variant). As transformers'
`sliding_window_causal_mask_function` (`q_idx - window < kv_idx <= q_idx`), the query at
position p sees the keys at positions (p - window, p]. A program's KV loop starts at the tile
holding kv_start = max(0, first query position - window + 1): the tiles wholly before it, and
the positions before it inside that tile (their block-table entries too), are never read. The
split variant divides the tiles [kv_start // TILE, cdiv(kv_end, TILE)) among the segments.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from pagoda.layers.dependent_launch import dependent_launch, wait_for_previous_kernel
from pagoda.layers.fused import rope_rotation

LOG2E = 1.4426950408889634

# Split-KV heuristic (see choose_num_segments).
SPLIT_MAX_QUERY_LEN = 16  # decode and speculative-decode batches only
# Tuned on an H200 by `attention_bench.py --graph-sweep` (decode replayed in CUDA graphs over
# 32 layers' caches, planned at a 4096 capture length): batch 1 at 1.1k context took 9.6 ->
# 7.8 us per layer going from 16 segments of 3 pipeline stages to 32 segments of one stage;
# batch 8 stays at 8 segments (more were no faster there). Gemma 3 4B's shape (4 kv heads,
# dim 256), batch 1 at 1.1k context: a 1024-token window split 8 ways took 14.6 us per layer,
# 32 ways (one 32-token tile per segment) 9.1 us: the grid, not the partials, is what costs
# when there are few kv heads, so a segment need only hold one KV tile.
MAX_SEGMENTS = 32
PROGRAMS_PER_SM = 2  # the split grid aims for this many programs per multiprocessor
UNPIPELINED_TILES = 2  # segments of at most this many KV tiles skip software pipelining
# decode steps rotate q and k by RoPE and store k and v in the attention kernel (NewToken;
# PAGODA_ROPE_IN_ATTENTION=0: in the fused store kernel before it), read once
ROPE_IN_ATTENTION = os.environ.get("PAGODA_ROPE_IN_ATTENTION", "1") != "0"
# ... in split launches (a few sequences), and in unsplit ones of at most this many
# programs a multiprocessor. Compiled for sm_90 (8 kv heads, dim 128, bfloat16, 4 warps)
# the plain decode takes 117-124 registers a thread, room for 4 programs a multiprocessor;
# the unsplit one with NewToken 190, room for 2, and the split one 151-161, 3 (at dim 256:
# 142-149, 3; 255, 2; 221, 2). So a split NewToken launch of more programs than this many a
# multiprocessor caps its registers at the plain decode's room (new_token_max_registers:
# 128, and 168 at dim 256), for at most 8 bytes a thread spilled (40 at dim 256, one
# pipeline stage). On an H100, RoPE, store and attention of 8 and 16 decodes at 4k contexts
# (512 programs) took 0.94 and 0.96x the separate launches' time capped, 1.05 and 1.10x
# uncapped; 32 unsplit decodes 0.89-0.94x; 64 and 256, 0.98-1.06x (which is why they keep
# the separate launch): bench/results/README.md.
NEW_TOKEN_PROGRAMS_PER_SM = 2
REGISTERS_PER_SM = 65536


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, pid, BLOCK_Q: tl.constexpr):
    """The largest s in [0, num_seqs] with query_start_loc[s] // BLOCK_Q + s <= pid."""
    lo = pid * 0
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= pid, mid, lo)
        hi = tl.where(first <= pid, hi, mid - 1)
    return lo


@triton.jit
def _attend_tiles(
    q, acc, l_i, m_i, k_base, v_base, table_ptr, q_pos, tile_lo, tile_hi, kv_start, kv_end,
    window, qk_scale, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr, DOT_PRECISION: tl.constexpr, SLIDING: tl.constexpr,
):
    """Online softmax of q's rows over KV tiles [tile_lo, tile_hi); scores in log2 units.
    With SLIDING, positions before kv_start are not loaded and row r sees (q_pos[r] - window,
    q_pos[r]]; without, kv_start and window are unused."""
    for tile in range(tile_lo, tile_hi):
        pos, pos_ok, k, v = _kv_tile(k_base, v_base, table_ptr, tile, True, kv_start, kv_end,
                                     stride_kb, stride_ks, stride_kd, stride_vb, stride_vs,
                                     stride_vd, HEAD_DIM, HEAD_DIM_P, BLOCK_SIZE, TILE,
                                     SLIDING)
        acc, l_i, m_i = _attend_tile(q, acc, l_i, m_i, pos, pos_ok, k, v, q_pos, window,
                                     qk_scale, DOT_PRECISION, SLIDING)
    return acc, l_i, m_i


@triton.jit
def _kv_tile(k_base, v_base, table_ptr, tile, tile_ok, kv_start, kv_end, stride_kb, stride_ks,
             stride_kd, stride_vb, stride_vs, stride_vd, HEAD_DIM: tl.constexpr,
             HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
             SLIDING: tl.constexpr):
    """KV tile `tile`: its positions, which of them are read (none unless tile_ok), and
    their K [HEAD_DIM_P, TILE] and V [TILE, HEAD_DIM_P] through the block table."""
    pos = tile * TILE + tl.arange(0, TILE)
    dims = tl.arange(0, HEAD_DIM_P)
    dim_ok = dims < HEAD_DIM
    if SLIDING:
        pos_ok = (pos < kv_end) & (pos >= kv_start) & tile_ok
    else:
        pos_ok = (pos < kv_end) & tile_ok
    block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
    in_block = pos % BLOCK_SIZE
    k = tl.load(k_base + block[None, :] * stride_kb + in_block[None, :] * stride_ks
                + dims[:, None] * stride_kd,
                mask=pos_ok[None, :] & dim_ok[:, None], other=0.0)
    v = tl.load(v_base + block[:, None] * stride_vb + in_block[:, None] * stride_vs
                + dims[None, :] * stride_vd,
                mask=pos_ok[:, None] & dim_ok[None, :], other=0.0)
    return pos, pos_ok, k, v


@triton.jit
def _attend_tile(q, acc, l_i, m_i, pos, pos_ok, k, v, q_pos, window, qk_scale,
                 DOT_PRECISION: tl.constexpr, SLIDING: tl.constexpr):
    """The online softmax of q's rows taking in one loaded KV tile (_kv_tile)."""
    s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale
    # (kv_end may stop short of the causal limit: a decode's new position, NEW_TOKEN)
    if SLIDING:
        visible = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] > q_pos[:, None] - window)
    else:
        visible = pos[None, :] <= q_pos[:, None]
    s = tl.where(visible & pos_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _rope_factors(cos_sin_ptr, pos, dims, ROT_HALF: tl.constexpr):
    """RoPE's cos and sin at position `pos` for each of `dims` (1 and 0 past the first
    2 * ROT_HALF dims, which it leaves as they are); cos_sin is [positions, 2 * ROT_HALF] =
    [cos | sin]."""
    turned = dims < 2 * ROT_HALF
    half = tl.where(dims < ROT_HALF, dims, dims - ROT_HALF)
    c = tl.load(cos_sin_ptr + pos * (2 * ROT_HALF) + half, mask=turned, other=1.0)
    s = tl.load(cos_sin_ptr + pos * (2 * ROT_HALF) + ROT_HALF + half, mask=turned, other=0.0)
    return c, s


@triton.jit
def _rotated(row_ptr, dims, mask, c, s, stride_d, ROT_HALF: tl.constexpr):
    """The values at row_ptr + dims * stride_d (row_ptr: one row's pointer or a column of
    them) rotated by RoPE with _rope_factors' c and s (of dims' shape), rotate-half on the
    first 2 * ROT_HALF dims (as fused.rope_qk_: in float32, rounded to the values' type)."""
    x = tl.load(row_ptr + dims * stride_d, mask=mask, other=0.0)
    first = dims < ROT_HALF
    turned = dims < 2 * ROT_HALF
    half = tl.where(first, dims, dims - ROT_HALF)
    partner = tl.load(row_ptr + tl.where(first, dims + ROT_HALF, half) * stride_d,
                      mask=mask & turned, other=0.0).to(tl.float32)
    xf = x.to(tl.float32)
    out = rope_rotation(xf, partner, c, tl.where(first, -s, s))
    return tl.where(turned, out, xf).to(x.dtype)


@triton.jit
def _window_tiles(first_tile, num_tiles, num_segments, SPLIT: tl.constexpr):
    """The KV tiles [lo, hi) a sliding-window program walks: [first_tile, num_tiles), or with
    SPLIT this segment's share of them."""
    if SPLIT:
        per_segment = tl.cdiv(num_tiles - first_tile, num_segments)
        tile_lo = first_tile + tl.program_id(2) * per_segment
        tile_hi = tl.minimum(tile_lo + per_segment, num_tiles)
    else:
        tile_lo = first_tile
        tile_hi = num_tiles
    return tile_lo, tile_hi


@triton.jit
def _new_position(q, acc, l_i, m_i, token, kv_head, qk_scale, new_k_ptr, new_v_ptr, c, s,
                  slot, stride_nkt, stride_nvt, k_base, v_base, stride_kb, stride_ks,
                  stride_kd, stride_vb, stride_vs, stride_vd, dims, dim_ok,
                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, ROT_HALF: tl.constexpr):
    """The online softmax of q's rows taking in the step's own position (its k rotated by
    RoPE with the position's factors c and s, its v as given), and that k and v written into
    the cache at `slot` (none for a slot < 0)."""
    k = _rotated(new_k_ptr + token * stride_nkt + kv_head * HEAD_DIM, dims, dim_ok, c, s, 1,
                 ROT_HALF)
    v = tl.load(new_v_ptr + token * stride_nvt + kv_head * HEAD_DIM + dims, mask=dim_ok,
                other=0.0)
    scores = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], 1) * qk_scale
    m_new = tl.maximum(m_i, scores)
    p = tl.math.exp2(scores - m_new)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + p
    acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)[None, :]
    if slot >= 0:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        tl.store(k_base + block * stride_kb + offset * stride_ks + dims * stride_kd, k,
                 mask=dim_ok)
        tl.store(v_base + block * stride_vb + offset * stride_vs + dims * stride_vd, v,
                 mask=dim_ok)
    return acc, l_i, m_new


@triton.jit
def _wait_if(EARLY: tl.constexpr, PDL: tl.constexpr):
    """A program of a kernel that has not yet waited for the previous kernel (EARLY) waits
    for it before it ends."""
    if EARLY:
        wait_for_previous_kernel(PDL)


# Integers that only size the launch or index the small split-KV workspace are not
# specialized on: each value class would otherwise compile its own variant at startup. Nor is
# the window (0 for full layers, where it is unused): one variant serves every window.
@triton.jit(do_not_specialize=["num_seqs", "num_segments", "stride_wt", "stride_wh", "window"])
def _unified_attention_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, out_ptr, seg_max_ptr, seg_sum_ptr, seg_acc_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    num_seqs, num_segments, qk_scale, value_scale,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt, stride_wt, stride_wh, window,
    new_k_ptr, new_v_ptr, pos_ptr, cos_sin_ptr, slot_ptr, stride_nkt, stride_nvt, num_slots,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    DECODE_ONLY: tl.constexpr, SPLIT: tl.constexpr, SLIDING: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HALF_PRODUCTS: tl.constexpr, SCALE_V: tl.constexpr,
    NEW_TOKEN: tl.constexpr, ROT_HALF: tl.constexpr, PDL: tl.constexpr,
):
    """One (q-block, kv head[, segment]): the output rows (times value_scale with SCALE_V),
    or with SPLIT the partial (max, sum, acc) of this segment. With HALF_PRODUCTS (a float8
    cache under 16-bit queries) both products take float16 operands: q once, saturated to
    float16's range, and every float8 K and V element in one conversion per pair (a float8
    value to bfloat16 would take a second, slower conversion through float16).

    NEW_TOKEN (decodes over a cache of q's type): q, and the step's k and v rows at
    new_k_ptr and new_v_ptr ([tokens, kv heads, HEAD_DIM]), are as the qkv product left
    them. Each program rotates its q rows by RoPE at pos_ptr's position (see _rotated); the
    KV tiles stop short of the new position, and the first segment's program (or the only
    one) rotates the new k, adds the new position to its sums from registers and writes k
    and v into the cache at slot_ptr's slot (none for a slot < 0 or a token past
    num_slots): the launch of fused.rope_store_kv_ saved, no program waiting on its own
    writes. With PDL such a decode reads what no kernel of the step writes before its wait
    for the previous kernel (EARLY): the sequence's lengths, block table, position and slot,
    RoPE's factors and its first KV tile (every cached position is older than the step),
    so that only q's loads, the products and the stores follow the qkv product's end."""
    EARLY: tl.constexpr = NEW_TOKEN
    if not EARLY:
        wait_for_previous_kernel(PDL)
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    if DECODE_ONLY:
        seq = pid
    else:
        seq = _find_sequence(query_start_loc_ptr, num_seqs, pid, BLOCK_Q)
    if seq >= num_seqs:
        _wait_if(EARLY, PDL)
        return
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if DECODE_ONLY:
        q_block_start = q_len * 0
    else:
        q_block_start = (pid - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if q_block_start >= q_len:
        _wait_if(EARLY, PDL)
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    q_local = q_block_start + rows // GROUP
    row_ok = (rows // GROUP < BLOCK_Q) & (q_local < q_len)
    heads = kv_head * GROUP + rows % GROUP
    tokens = (q_start + q_local).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM_P)
    dim_ok = dims < HEAD_DIM
    q_rows = q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh
    if NEW_TOKEN:
        rope_cos, rope_sin = _rope_factors(cos_sin_ptr, tl.load(pos_ptr + q_start), dims,
                                           ROT_HALF)
        slot = tl.load(slot_ptr + q_start, mask=q_start < num_slots, other=-1).to(tl.int64)
    else:
        q = tl.load(q_rows + dims[None, :] * stride_qd, mask=row_ok[:, None] & dim_ok[None, :],
                    other=0.0)
        if HALF_PRODUCTS:
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    # Padding rows borrow the last query's position so that no row is ever fully masked.
    q_pos = context + tl.minimum(q_local, q_len - 1)
    kv_end = context + tl.minimum(q_block_start + BLOCK_Q, q_len)  # causal limit of the block
    num_tiles = tl.cdiv(kv_end, TILE)
    if SLIDING:  # the window of the block's first query starts at kv_start
        kv_start = tl.maximum(context + q_block_start - window + 1, 0)
        tile_lo, tile_hi = _window_tiles(kv_start // TILE, num_tiles, num_segments, SPLIT)
    else:
        kv_start = 0
        if SPLIT:
            per_segment = tl.cdiv(num_tiles, num_segments)
            tile_lo = tl.program_id(2) * per_segment
            tile_hi = tl.minimum(tile_lo + per_segment, num_tiles)
        else:
            tile_lo = 0
            tile_hi = num_tiles
    kv_cached_end = kv_end - 1 if NEW_TOKEN else kv_end  # (the new position from registers)
    k_base = key_cache_ptr + kv_head * stride_kh
    v_base = value_cache_ptr + kv_head * stride_vh
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    if EARLY:
        first_pos, first_ok, first_k, first_v = _kv_tile(
            k_base, v_base, table, tile_lo, tile_lo < tile_hi, kv_start, kv_cached_end,
            stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, HEAD_DIM,
            HEAD_DIM_P, BLOCK_SIZE, TILE, SLIDING)
        wait_for_previous_kernel(PDL)
    if NEW_TOKEN:
        q = _rotated(q_rows, dims[None, :], row_ok[:, None] & dim_ok[None, :],
                     rope_cos[None, :], rope_sin[None, :], stride_qd, ROT_HALF)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    if EARLY:
        acc, l_i, m_i = _attend_tile(q, acc, l_i, m_i, first_pos, first_ok, first_k, first_v,
                                     q_pos, window, qk_scale, DOT_PRECISION, SLIDING)
        tile_lo += 1
    # A split launch's first segment takes in the new position before its walk, which then
    # holds neither RoPE's factors nor the slot (spilling nothing under the register cap);
    # an unsplit program after it, so that its walk's first loads do not wait behind the
    # store into the cache they read.
    NEW_FIRST: tl.constexpr = NEW_TOKEN and SPLIT
    if NEW_FIRST:
        if tl.program_id(2) == 0:
            acc, l_i, m_i = _new_position(
                q, acc, l_i, m_i, q_start, kv_head, qk_scale, new_k_ptr, new_v_ptr, rope_cos,
                rope_sin, slot, stride_nkt, stride_nvt, k_base, v_base, stride_kb, stride_ks,
                stride_kd, stride_vb, stride_vs, stride_vd, dims, dim_ok, HEAD_DIM,
                BLOCK_SIZE, ROT_HALF)
    acc, l_i, m_i = _attend_tiles(
        q, acc, l_i, m_i, k_base, v_base, table, q_pos, tile_lo, tile_hi, kv_start,
        kv_cached_end, window, qk_scale,
        stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
        HEAD_DIM, HEAD_DIM_P, BLOCK_SIZE, TILE, DOT_PRECISION, SLIDING)
    if NEW_TOKEN and not NEW_FIRST:
        acc, l_i, m_i = _new_position(
            q, acc, l_i, m_i, q_start, kv_head, qk_scale, new_k_ptr, new_v_ptr, rope_cos,
            rope_sin, slot, stride_nkt, stride_nvt, k_base, v_base, stride_kb, stride_ks,
            stride_kd, stride_vb, stride_vs, stride_vd, dims, dim_ok, HEAD_DIM, BLOCK_SIZE,
            ROT_HALF)

    if SPLIT:
        w = tokens * stride_wt + heads * stride_wh + tl.program_id(2)
        tl.store(seg_max_ptr + w, m_i, mask=row_ok)
        tl.store(seg_sum_ptr + w, l_i, mask=row_ok)
        tl.store(seg_acc_ptr + w[:, None] * HEAD_DIM_P + dims[None, :], acc,
                 mask=row_ok[:, None])
    else:
        out = acc / l_i[:, None]
        if SCALE_V:
            out *= value_scale
        tl.store(out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh
                 + dims[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit(do_not_specialize=["num_seqs", "num_segments", "stride_wt", "stride_wh"])
def _reduce_segments_kernel(
    out_ptr, seg_max_ptr, seg_sum_ptr, seg_acc_ptr, query_start_loc_ptr,
    num_seqs, num_segments, value_scale, stride_wt, stride_wh, stride_ot, stride_oh,
    stride_od, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, SEG_P: tl.constexpr,
    SCALE_V: tl.constexpr, PDL: tl.constexpr,
):
    """Combine one (token, head)'s segment partials into its output row (times value_scale
    with SCALE_V). (The batch's token count, which no kernel writes, is read before the wait
    for the previous kernel.)"""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    num_tokens = tl.load(query_start_loc_ptr + num_seqs)
    wait_for_previous_kernel(PDL)
    if token >= num_tokens:  # padding past the last sequence
        return
    segs = tl.arange(0, SEG_P)
    seg_ok = segs < num_segments
    dims = tl.arange(0, HEAD_DIM_P)
    dim_ok = dims < HEAD_DIM
    w = token * stride_wt + head * stride_wh + segs
    m = tl.load(seg_max_ptr + w, mask=seg_ok, other=float("-inf"))
    s = tl.load(seg_sum_ptr + w, mask=seg_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.math.exp2(m - m_max)
    total = tl.sum(s * weight, 0)
    acc = tl.load(seg_acc_ptr + w[:, None] * HEAD_DIM_P + dims[None, :],
                  mask=seg_ok[:, None] & dim_ok[None, :], other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / total
    if SCALE_V:
        out *= value_scale
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=dim_ok)


@dataclass(frozen=True, slots=True)
class NewToken:
    """A decode step's own k and v rows ([tokens, kv heads, dim], as the qkv product left
    them: not rotated, not stored) and what their RoPE and KV store take, for the attention
    kernel to do both (its NEW_TOKEN)."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos_sin: torch.Tensor  # [positions, rotary_dim] = [cos | sin]
    rotary_dim: int
    slot_mapping: torch.Tensor


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """Tile shape and launch parameters of the attention kernel."""

    block_m: int  # rows per program: block_q query tokens x the GQA group (power of two)
    tile: int  # KV positions per inner-loop step (power of two, >= 16)
    num_warps: int
    num_stages: int


@dataclass(slots=True)
class AttentionPlan:
    """How one step's attention is launched for one (heads, kv_heads, head_dim) shape;
    holds the split-KV workspace so that layers (and CUDA-graph replays) reuse it."""

    config: KernelConfig
    decode_only: bool  # every sequence has exactly one query: program = sequence
    num_segments: int  # 1 = the unsplit kernel
    rope_inside: bool  # split, or unsplit of few programs (NEW_TOKEN_PROGRAMS_PER_SM)
    new_token_capped: bool  # split NewToken's registers capped (NEW_TOKEN_PROGRAMS_PER_SM)
    workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def segment_buffers(self, num_tokens: int, num_heads: int, head_dim_p: int,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(max, sum, acc) partials: [tokens, heads, segments] x2 and [..., head_dim_p] fp32."""
        shape = (num_tokens, num_heads, self.num_segments)
        ws = self.workspace
        if ws is None or ws[0].shape != shape or ws[0].device != device:
            ws = (torch.empty(shape, dtype=torch.float32, device=device),
                  torch.empty(shape, dtype=torch.float32, device=device),
                  torch.empty(shape + (head_dim_p,), dtype=torch.float32, device=device))
            self.workspace = ws
        return ws


def padded_head_dim(head_dim: int) -> int:
    """Head dims are padded (and masked) to a power of two of at least 16 for tl.dot."""
    return max(16, triton.next_power_of_2(head_dim))


def default_config(group: int, head_dim: int, max_query_len: int,
                   dtype: torch.dtype = torch.bfloat16) -> KernelConfig:
    """Small row tiles for decode-like batches (few queries per sequence), 64-row tiles for
    prefill so each KV tile loaded serves more queries. fp32 (no tensor cores, a correctness
    dtype) always takes the small tiles, which compile without register spills."""
    head_dim_p = padded_head_dim(head_dim)
    small = max_query_len * group <= 16 or dtype == torch.float32
    block_m = max(16 if small else 64, triton.next_power_of_2(group))
    tile = 64 if head_dim_p <= 128 else 32
    num_warps = 4 if block_m * head_dim_p <= 64 * 128 else 8
    # A third stage of 256-wide K and V tiles costs shared memory (and so occupancy) more
    # than it hides latency: at dim 256 two stages measured 17.4 us per layer against 23.3
    # (batch 8, 16 segments, H200).
    stages = 3 if small and head_dim_p <= 128 else 2
    return KernelConfig(block_m, tile, num_warps, stages)


def choose_num_segments(num_programs: int, max_query_len: int, max_seq_len: int,
                        num_sms: int, tile: int) -> int:
    """Split KV only when the unsplit grid is less than one wave (num_programs < num_sms) and
    queries are short (max_query_len <= SPLIT_MAX_QUERY_LEN). Segments = the power of two that
    brings the grid to PROGRAMS_PER_SM * num_sms, capped by MAX_SEGMENTS and by giving each
    segment at least one KV tile of the longest context. 1 means unsplit."""
    if num_programs <= 0 or num_programs >= num_sms or max_query_len > SPLIT_MAX_QUERY_LEN:
        return 1
    wanted = triton.next_power_of_2(triton.cdiv(PROGRAMS_PER_SM * num_sms, num_programs))
    fits = max_seq_len // tile
    fits = 1 << (fits.bit_length() - 1) if fits >= 1 else 1
    segments = min(MAX_SEGMENTS, wanted, fits)
    return segments if segments >= 2 else 1


def plan_attention(num_heads: int, num_kv_heads: int, head_dim: int, query_lens: Sequence[int],
                   max_seq_len: int, num_sms: int, num_segments: int | None = None,
                   config: KernelConfig | None = None,
                   dtype: torch.dtype = torch.bfloat16,
                   sliding_window: int | None = None,
                   cache_dtype: torch.dtype | None = None) -> AttentionPlan:
    """Choose kernel config and split-KV for a step (host ints only, no device sync).
    num_segments / config override the heuristics (tests, benchmarks, CUDA-graph capture).
    A sliding window bounds the KV a query block reads, which is what the split is sized by.
    cache_dtype: the KV cache's element type when it differs from the queries' (float8)."""
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    group = num_heads // num_kv_heads
    max_query_len = max(query_lens, default=0)
    chosen = config or default_config(group, head_dim, max_query_len, dtype)
    _check_config(chosen, group)
    kv_len = max_seq_len
    if sliding_window is not None:
        kv_len = min(max_seq_len, sliding_window + max_query_len - 1)
    block_q = chosen.block_m // group
    num_programs = sum(-(-n // block_q) for n in query_lens) * num_kv_heads
    if num_segments is None:
        num_segments = choose_num_segments(num_programs, max_query_len, kv_len, num_sms,
                                           chosen.tile)
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    if config is None:
        chosen = _stages_for_segments(chosen, kv_len, num_segments)
        if cache_dtype is not None and cache_dtype.itemsize == 1 and num_segments == 1:
            chosen = _float8_cache_config(chosen, head_dim)
    few = NEW_TOKEN_PROGRAMS_PER_SM * num_sms
    rope_inside = num_segments > 1 or num_programs <= few
    capped = num_segments > 1 and num_programs * num_segments > few \
        and _capped_shape(chosen, head_dim, dtype)
    return AttentionPlan(chosen, max_query_len == 1, num_segments, rope_inside, capped)


def _capped_shape(config: KernelConfig, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether new_token_max_registers was counted for this kernel: 16-row tiles of 16-bit
    queries at head dims up to 256 (wider tiles and float32 hold more in registers, and
    would spill under the cap)."""
    return config.block_m == 16 and dtype.itemsize == 2 and padded_head_dim(head_dim) <= 256


def _float8_cache_config(config: KernelConfig, head_dim: int) -> KernelConfig:
    """An unsplit decode over a one-byte cache at head dims up to 128 reads 128-position
    tiles five stages deep (a 64-position tile of one-byte values is half the bytes of a
    16-bit one). Measured on an H200 (8 kv heads, dim 128, batch 32-256 at 1-4k context):
    1.28-1.43x faster than the 64-position, three-stage tiles. Prefill tiles, split segments
    and wider heads keep their settings (not measured with a float8 cache)."""
    if config.block_m > 16 or padded_head_dim(head_dim) > 128:
        return config
    return replace(config, tile=128, num_stages=5)


def _stages_for_segments(config: KernelConfig, max_seq_len: int,
                         num_segments: int) -> KernelConfig:
    """One pipeline stage when a split segment walks so few tiles that prefetching the next
    one has nothing to overlap with (it only lengthens the prologue)."""
    if num_segments > 1 and triton.cdiv(max_seq_len, config.tile * num_segments) \
            <= UNPIPELINED_TILES:
        return replace(config, num_stages=1)
    return config


def _check_config(config: KernelConfig, group: int) -> None:
    for name in ("block_m", "tile"):
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    if config.block_m < group:
        raise ValueError(f"block_m {config.block_m} is smaller than the GQA group {group}")


def _check_inputs(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"unsupported query dtype {q.dtype} (float16, bfloat16, float32)")
    if key_cache.shape != value_cache.shape or key_cache.dim() != 4:
        raise ValueError(f"key/value caches must both be [blocks, block_size, kv_heads, dim], "
                         f"got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    if key_cache.shape[3] != q.shape[2]:
        raise ValueError(f"query head_dim {q.shape[2]} != cache head_dim {key_cache.shape[3]}")
    if q.shape[1] % key_cache.shape[2]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of "
                         f"{key_cache.shape[2]} kv heads")


def _half_products(query: torch.dtype, cache: torch.dtype) -> bool:
    """Whether a step's products run in float16: a float8 cache read by bfloat16 queries."""
    return cache.itemsize == 1 and query == torch.bfloat16


def takes_new_token(plan: AttentionPlan, q: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Whether a step's RoPE and KV store run in its attention kernel (NewToken): where
    `_fits_new_token` and the plan's launch suits it (`rope_inside`: split, or unsplit
    with at most NEW_TOKEN_PROGRAMS_PER_SM programs a multiprocessor), unless
    PAGODA_ROPE_IN_ATTENTION=0.
    On an H100 the 8B's FP8 decode-1 took 3.63 ms a token this way against 3.68 with the
    separate RoPE-and-store launch (bench/results/README.md)."""
    return ROPE_IN_ATTENTION and plan.rope_inside and _fits_new_token(plan, q, key_cache)


def _fits_new_token(plan: AttentionPlan, q: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Every sequence decoding one token, over a cache of q's type."""
    return plan.decode_only and key_cache.dtype == q.dtype


def _check_new_token(new: NewToken, plan: AttentionPlan, q: torch.Tensor,
                     key_cache: torch.Tensor) -> None:
    if not _fits_new_token(plan, q, key_cache):
        raise ValueError("the new token's RoPE and store run in decode-only steps over a "
                         "cache of the queries' type")
    head_dim = q.shape[2]
    if new.k.shape[1:] != key_cache.shape[2:] or new.v.shape[1:] != key_cache.shape[2:] \
            or new.k.stride()[1:] != (head_dim, 1) or new.v.stride()[1:] != (head_dim, 1):
        raise ValueError(f"new k {tuple(new.k.shape)} / v {tuple(new.v.shape)} do not match the "
                         "cache's heads, each token's heads contiguous")


def unified_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      block_tables: torch.Tensor, scale: float, num_seqs: int,
                      plan: AttentionPlan, out: torch.Tensor | None = None,
                      sliding_window: int | None = None,
                      value_scale: float = 1.0, new_token: NewToken | None = None
                      ) -> torch.Tensor:
    """Causal paged attention of q [tokens, heads, dim] over the cached KV of each sequence;
    with sliding_window W the query at position p sees only the keys at (p - W, p]. The
    outputs are multiplied by value_scale (a float8 cache's V scale). With `new_token` (a
    decode step, `takes_new_token`), q and the step's k are rotated by RoPE and k and v
    stored here, and seq_lens count the new position.
    Launch shapes depend only on q.shape, num_seqs and the plan, so the call is CUDA-graph
    capturable; output rows of tokens past query_start_loc[num_seqs] are left unwritten."""
    _check_inputs(q, key_cache, value_cache)
    if new_token is not None:
        _check_new_token(new_token, plan, q, key_cache)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    cfg = plan.config
    block_q = cfg.block_m // group
    head_dim_p = padded_head_dim(head_dim)
    grid_q = num_seqs if plan.decode_only else num_tokens // block_q + num_seqs
    split = plan.num_segments > 1
    scale_v = value_scale != 1.0
    if split:
        seg_max, seg_sum, seg_acc = plan.segment_buffers(num_tokens, num_heads, head_dim_p,
                                                         q.device)
        grid = (grid_q, num_kv_heads, plan.num_segments)
    else:
        seg_max = seg_sum = seg_acc = out  # unused
        grid = (grid_q, num_kv_heads)
    _unified_attention_kernel[grid](
        q, key_cache, value_cache, out, seg_max, seg_sum, seg_acc,
        query_start_loc, seq_lens, block_tables,
        num_seqs, plan.num_segments, scale * LOG2E, value_scale,
        *q.stride(), *key_cache.stride(), *value_cache.stride(), *out.stride(),
        block_tables.stride(0), num_heads * plan.num_segments, plan.num_segments,
        sliding_window or 0, *_new_token_arguments(new_token, q),
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p,
        BLOCK_SIZE=key_cache.shape[1], TILE=cfg.tile, BLOCK_M=cfg.block_m, BLOCK_Q=block_q,
        DECODE_ONLY=plan.decode_only, SPLIT=split, SLIDING=sliding_window is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        HALF_PRODUCTS=_half_products(q.dtype, key_cache.dtype), SCALE_V=scale_v,
        NEW_TOKEN=new_token is not None,
        ROT_HALF=new_token.rotary_dim // 2 if new_token is not None else 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dependent_launch(q.device),
        **_register_cap(new_token is not None and plan.new_token_capped, head_dim_p,
                        cfg.num_warps, q.device),
    )
    if split:
        _reduce_segments_kernel[(num_tokens, num_heads)](
            out, seg_max, seg_sum, seg_acc, query_start_loc,
            num_seqs, plan.num_segments, value_scale, num_heads * plan.num_segments,
            plan.num_segments, *out.stride(), HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p,
            # one lane width for every heuristic segment count: one compiled variant
            SEG_P=max(MAX_SEGMENTS, triton.next_power_of_2(plan.num_segments)),
            SCALE_V=scale_v, num_warps=4,
            **dependent_launch(q.device),
        )
    return out


def decode_programs_per_sm(head_dim_p: int) -> int:
    """Programs of the 4-warp decode kernel a multiprocessor's registers hold (the plain
    decode's, and a split NewToken's under new_token_max_registers) at a padded head dim."""
    return 4 if head_dim_p <= 128 else 3


def new_token_max_registers(head_dim_p: int, num_warps: int) -> int:
    """The registers a thread of a NewToken decode is held to: the most (a warp's come in
    8s) that keep decode_programs_per_sm programs of num_warps warps a multiprocessor."""
    per_thread = REGISTERS_PER_SM // (decode_programs_per_sm(head_dim_p) * num_warps * 32)
    return per_thread // 8 * 8


def _register_cap(capped: bool, head_dim_p: int, num_warps: int,
                  device: torch.device) -> dict[str, int]:
    """The launch option of a capped NewToken decode (`capped`) on an NVIDIA GPU
    (new_token_max_registers); none elsewhere."""
    if not capped or device.type != "cuda" or torch.version.hip is not None:
        return {}
    return {"maxnreg": new_token_max_registers(head_dim_p, num_warps)}


def _new_token_arguments(new: NewToken | None, q: torch.Tensor) -> tuple:
    """The kernel's new_k_ptr ... num_slots (unread placeholders without a new token)."""
    if new is None:
        return q, q, q, q, q, 0, 0, 0
    return (new.k, new.v, new.positions, new.cos_sin, new.slot_mapping, new.k.stride(0),
            new.v.stride(0), new.slot_mapping.shape[0])
