"""The experts on GPU: tokens grouped by expert, then one grouped GEMM for gate/up (with the
SiLU-and-mul fused into its epilogue) and one for down (with the routing weight fused), and
the top-k rows of each token summed (for a few tokens, by the down GEMM's last program of
each output tile: no launch of its own).

Grouping ("alignment"): each (token, slot) assignment gets a row in a list sorted by expert,
each expert's rows padded to a multiple of BLOCK_M, so that every BLOCK_M-row block of the
list belongs to one expert; padding rows hold a sentinel (tokens * top_k) that loads
nothing and stores nothing. Three small kernels do it with no host sync: a count with atomic
adds (each assignment's rank within its expert is the counter's old value; the order inside
an expert does not change any result, each row being computed alone), the padded offsets
with each block's expert, and the scatter of assignments to their rows.

Every buffer is sized for the worst case of the token count (each of min(experts, tokens *
top_k) experts hit padding up to BLOCK_M - 1 rows), so shapes depend on the token count alone
and the whole layer can be captured in a CUDA graph. Blocks past the real rows see expert -1
and return at once.

Experts held as integer codes, in tiles of few rows (decode), split their inputs among
programs (`split_count`): each program stores its float32 sums, and the last of a block's
splits to finish (a counter a block and tile, as the dense kernels' splits) adds them in
split order and finishes the block.

Loop bounds (hidden and intermediate sizes) are compile-time constants: one compilation per
layer shape, and Triton's CPU interpreter (which tests run on) cannot take a runtime bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagoda.layers.dependent_launch import dependent_launch, wait_for_previous_kernel
from pagoda.layers.moe.expert_codes import ExpertCodes
from pagoda.layers.quantization.triton_group_gemm import (
    biased,
    biased_plane,
    codes_as,
    float8_codes,
    fp8_rows,
    multiprocessor_count,
)
from pagoda.layers.tile_counters import tile_counters
from pagoda.layers.triton_support import cuda_capability, has_e4m3

# calls of at most this many tokens add each token's top-k rows inside the down GEMM
MAX_SUMMED_TOKENS = 8
# expert blocks of at least this many rows decode integer codes (and float8 ones in several
# groups a row) to weights before each product: compiled for sm_90, the 128-row tile's second
# accumulator for a group's product spilled registers (the int4 down product 155 local loads
# and stores a thread)
DECODED_FROM_ROWS = tl.constexpr(64)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


@dataclass(frozen=True, slots=True)
class MoEConfig:
    """Tile sizes and launch shape of the grouped GEMMs for one batch size."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def moe_config(num_tokens: int, top_k: int, num_experts: int) -> MoEConfig:
    """Tiles by the rows each expert gets on average: decode batches (a few rows per expert,
    the weights streamed once) want small M tiles and many N tiles to spread the weight
    reads over every SM; prefill batches (hundreds of rows per expert) want large tiles."""
    rows_per_expert = num_tokens * top_k / num_experts
    if rows_per_expert <= 16:
        return MoEConfig(16, 64, 128, 4, 4)
    if rows_per_expert <= 48:
        return MoEConfig(32, 64, 128, 4, 3)
    if rows_per_expert <= 128:
        return MoEConfig(64, 128, 64, 8, 3)
    return MoEConfig(128, 128, 64, 8, 3)


# an expert projection's weights: floats [experts, rows, inputs], or their codes
Experts = torch.Tensor | ExpertCodes


@dataclass(frozen=True, slots=True)
class ExpertBlocks:
    """Assignments grouped by expert: `sorted_ids` [max_blocks * block_m] (assignment index
    t * top_k + j, or the sentinel), `expert_ids` [max_blocks] (-1: nothing to do) and
    `num_padded` [1] (rows in use)."""

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_padded: torch.Tensor
    block_m: int


def max_blocks(num_assignments: int, num_experts: int, block_m: int) -> int:
    """Blocks the padded list can need: every hit expert wastes at most block_m - 1 rows."""
    worst = num_assignments + min(num_experts, num_assignments) * (block_m - 1)
    return triton.cdiv(worst, block_m)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, ranks_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ids = tl.load(ids_ptr + offs, mask=mask, other=-1)
    rank = tl.atomic_add(counts_ptr + ids, 1, mask=mask & (ids >= 0))
    tl.store(ranks_ptr + offs, rank, mask=mask)


@triton.jit
def _pad_blocks(counts_ptr, starts_ptr, expert_ids_ptr, num_padded_ptr, sorted_ids_ptr,
                sentinel, n_blocks, blocks, STORE_STARTS: tl.constexpr,
                NUM_EXPERTS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    """The padded expert offsets (stored if STORE_STARTS), then for `blocks` the owning
    expert (-1 past the end) and sentinel-filled rows."""
    experts = tl.arange(0, BLOCK_E)
    # .cg: read at L2, where the atomics counted (the one-program kernel reads it after a
    # block barrier)
    counts = tl.load(counts_ptr + experts, mask=experts < NUM_EXPERTS, other=0,
                     cache_modifier=".cg")
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    if STORE_STARTS:
        tl.store(starts_ptr + experts, ends - padded, mask=experts < NUM_EXPERTS)
        tl.store(num_padded_ptr, total)
    first_row = blocks * BLOCK_M
    owner = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
    owner = tl.where(first_row < total, owner, -1)
    tl.store(expert_ids_ptr + blocks, owner, mask=blocks < n_blocks)
    rows = first_row[:, None] + tl.arange(0, BLOCK_M)[None, :]
    tl.store(sorted_ids_ptr + rows, tl.zeros_like(rows) + sentinel,
             mask=(blocks < n_blocks)[:, None])


@triton.jit
def _pad_kernel(counts_ptr, starts_ptr, expert_ids_ptr, num_padded_ptr, sorted_ids_ptr,
                sentinel, n_blocks, NUM_EXPERTS: tl.constexpr, BLOCK_E: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, PDL: tl.constexpr):
    """Each program recomputes the offsets (program 0 stores them) for its BLOCK_B blocks."""
    wait_for_previous_kernel(PDL)
    pid = tl.program_id(0)
    blocks = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    if pid == 0:
        _pad_blocks(counts_ptr, starts_ptr, expert_ids_ptr, num_padded_ptr, sorted_ids_ptr,
                    sentinel, n_blocks, blocks, True, NUM_EXPERTS, BLOCK_E, BLOCK_M)
    else:
        _pad_blocks(counts_ptr, starts_ptr, expert_ids_ptr, num_padded_ptr, sorted_ids_ptr,
                    sentinel, n_blocks, blocks, False, NUM_EXPERTS, BLOCK_E, BLOCK_M)


@triton.jit
def _scatter_kernel(ids_ptr, ranks_ptr, starts_ptr, sorted_ids_ptr, n, BLOCK: tl.constexpr,
                    PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    ids = tl.load(ids_ptr + offs, mask=mask, other=-1)
    hit = mask & (ids >= 0)
    rank = tl.load(ranks_ptr + offs, mask=hit, other=0)
    start = tl.load(starts_ptr + ids, mask=hit, other=0)
    tl.store(sorted_ids_ptr + start + rank, offs, mask=hit)


ALIGN_BLOCK = 256  # assignments per program of the count and scatter kernels


def align_to_experts(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Group the assignments of `topk_ids` [tokens, top_k] (local expert ids, -1: not on
    this rank) by expert in blocks of block_m rows."""
    flat = topk_ids.reshape(-1)
    if flat.dtype != torch.int32:
        flat = flat.to(torch.int32)
    n = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
    ranks = torch.empty(n, dtype=torch.int32, device=flat.device)
    _count_kernel[(triton.cdiv(n, ALIGN_BLOCK),)](flat, counts, ranks, n, BLOCK=ALIGN_BLOCK,
                                                  **dependent_launch(flat.device))
    return _blocks_from_counts(flat, counts, ranks, block_m)


def _blocks_from_counts(flat_ids: torch.Tensor, counts: torch.Tensor, ranks: torch.Tensor,
                        block_m: int) -> ExpertBlocks:
    """The padded blocks, given each expert's count and each assignment's rank in it."""
    n, num_experts, device = flat_ids.numel(), counts.numel(), flat_ids.device
    n_blocks = max_blocks(n, num_experts, block_m)
    starts = torch.empty(num_experts, dtype=torch.int32, device=device)
    sorted_ids = torch.empty(n_blocks * block_m, dtype=torch.int32, device=device)
    expert_ids = torch.empty(n_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    block_b = 16
    _pad_kernel[(triton.cdiv(n_blocks, block_b),)](
        counts, starts, expert_ids, num_padded, sorted_ids, n, n_blocks,
        NUM_EXPERTS=num_experts, BLOCK_E=triton.next_power_of_2(num_experts),
        BLOCK_M=block_m, BLOCK_B=block_b, **dependent_launch(device))
    _scatter_kernel[(triton.cdiv(n, ALIGN_BLOCK),)](flat_ids, ranks, starts, sorted_ids, n,
                                                    BLOCK=ALIGN_BLOCK, **dependent_launch(device))
    return ExpertBlocks(sorted_ids, expert_ids, num_padded, block_m)


@triton.jit
def _route_tile(logits_ptr, weights_ptr, ids_ptr, counts_ptr, ranks_ptr, tokens, n_tokens,
                stride_t, expert_start, NUM_EXPERTS: tl.constexpr, LOCAL_EXPERTS: tl.constexpr,
                TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    """select_experts and the count of _count_kernel for `tokens`: float32 softmax over the
    experts, the top k by repeated arg-max (the lowest expert among equal probabilities),
    optionally renormalised; ids stored as local indices (-1: another rank's expert), each
    local assignment counted and ranked in its expert. Returns (local ids, assignment
    indices, mask of local assignments), [BLOCK_T, BLOCK_K]."""
    t_ok = tokens < n_tokens
    experts = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_ptr + tokens[:, None].to(tl.int64) * stride_t + experts[None, :],
                     mask=t_ok[:, None] & (experts[None, :] < NUM_EXPERTS),
                     other=float("-inf")).to(tl.float32)
    logits = tl.where(t_ok[:, None], logits, 0.0)  # rows past the end: no NaN
    probs = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = probs / tl.sum(probs, axis=1)[:, None]
    slots = tl.arange(0, BLOCK_K)
    top_w = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    top_id = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(probs, axis=1)
        pick = tl.min(tl.where(probs == best[:, None], experts[None, :], BLOCK_E), axis=1)
        top_w = tl.where(slots[None, :] == j, best[:, None], top_w)
        top_id = tl.where(slots[None, :] == j, pick[:, None], top_id)
        probs = tl.where(experts[None, :] == pick[:, None], -1.0, probs)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]
    local = top_id - expert_start
    here = (local >= 0) & (local < LOCAL_EXPERTS)
    local = tl.where(here, local, -1)
    out = tokens[:, None] * TOP_K + slots[None, :]
    ok = t_ok[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out, top_w, mask=ok)
    tl.store(ids_ptr + out, local, mask=ok)
    rank = tl.atomic_add(counts_ptr + local, 1, mask=ok & here)
    tl.store(ranks_ptr + out, rank, mask=ok)
    return local, out, ok & here


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, counts_ptr, ranks_ptr, n_tokens,
                  stride_t, expert_start, NUM_EXPERTS: tl.constexpr,
                  LOCAL_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                  PDL: tl.constexpr):
    wait_for_previous_kernel(PDL)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    _route_tile(logits_ptr, weights_ptr, ids_ptr, counts_ptr, ranks_ptr, tokens, n_tokens,
                stride_t, expert_start, NUM_EXPERTS, LOCAL_EXPERTS, TOP_K, RENORMALIZE,
                BLOCK_T, BLOCK_E, BLOCK_K)


@triton.jit
def _route_align_one_kernel(logits_ptr, weights_ptr, ids_ptr, counts_ptr, ranks_ptr,
                            starts_ptr, expert_ids_ptr, num_padded_ptr, sorted_ids_ptr,
                            n_tokens, stride_t, expert_start, n_blocks,
                            NUM_EXPERTS: tl.constexpr, LOCAL_EXPERTS: tl.constexpr,
                            TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_LE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, PDL: tl.constexpr):
    """Decode batches (all tokens in one program): zero the counts, route and count, pad,
    scatter, in one launch instead of four."""
    wait_for_previous_kernel(PDL)
    _route_align_one(logits_ptr, weights_ptr, ids_ptr, counts_ptr, ranks_ptr, starts_ptr,
                     expert_ids_ptr, num_padded_ptr, sorted_ids_ptr, n_tokens, stride_t,
                     expert_start, n_blocks, NUM_EXPERTS, LOCAL_EXPERTS, TOP_K, RENORMALIZE,
                     BLOCK_T, BLOCK_E, BLOCK_K, BLOCK_LE, BLOCK_M, BLOCK_B)


@triton.jit
def _router_route_align_kernel(x_ptr, router_ptr, partial_ptr, count_ptr, logits_ptr,
                               weights_ptr, ids_ptr, counts_ptr, ranks_ptr, starts_ptr,
                               expert_ids_ptr, num_padded_ptr, sorted_ids_ptr, n_tokens,
                               stride_x, expert_start, n_blocks, K: tl.constexpr,
                               K_SPLIT: tl.constexpr, SPLITS: tl.constexpr,
                               DOT_PRECISION: tl.constexpr, NUM_EXPERTS: tl.constexpr,
                               LOCAL_EXPERTS: tl.constexpr, TOP_K: tl.constexpr,
                               RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                               BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                               BLOCK_LE: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_B: tl.constexpr, PDL: tl.constexpr):
    """Decode batches from the hidden states: each of SPLITS programs multiplies K_SPLIT of
    the inputs by the router's weights [NUM_EXPERTS, K] and stores its float32 part of the
    logits; the last to finish adds the parts in split order, rounds the logits to x's
    dtype (as the router's own product would), and routes and groups as
    _route_align_one_kernel does."""
    wait_for_previous_kernel(PDL)
    split = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    e = tl.arange(0, BLOCK_E)
    k = split * K_SPLIT + tl.arange(0, K_SPLIT)
    x = tl.load(x_ptr + t[:, None] * stride_x + k[None, :], mask=(t < n_tokens)[:, None],
                other=0.0)
    w = tl.load(router_ptr + e[:, None] * K + k[None, :], mask=(e < NUM_EXPERTS)[:, None],
                other=0.0)
    part = tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    at = t[:, None] * BLOCK_E + e[None, :]
    tl.store(partial_ptr + split * (BLOCK_T * BLOCK_E) + at, part)
    tl.debug_barrier()  # every thread's part stored before the count
    if tl.atomic_add(count_ptr, 1, sem="acq_rel") == SPLITS - 1:
        total = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            total += tl.load(partial_ptr + s * (BLOCK_T * BLOCK_E) + at, cache_modifier=".cg")
        tl.store(logits_ptr + t[:, None] * NUM_EXPERTS + e[None, :],
                 total.to(logits_ptr.dtype.element_ty),
                 mask=(t < n_tokens)[:, None] & (e < NUM_EXPERTS)[None, :])
        tl.debug_barrier()
        _route_align_one(logits_ptr, weights_ptr, ids_ptr, counts_ptr, ranks_ptr, starts_ptr,
                         expert_ids_ptr, num_padded_ptr, sorted_ids_ptr, n_tokens, NUM_EXPERTS,
                         expert_start, n_blocks, NUM_EXPERTS, LOCAL_EXPERTS, TOP_K,
                         RENORMALIZE, BLOCK_T, BLOCK_E, BLOCK_K, BLOCK_LE, BLOCK_M, BLOCK_B)
        tl.atomic_xchg(count_ptr, 0)


@triton.jit
def _route_align_one(logits_ptr, weights_ptr, ids_ptr, counts_ptr, ranks_ptr, starts_ptr,
                     expert_ids_ptr, num_padded_ptr, sorted_ids_ptr, n_tokens, stride_t,
                     expert_start, n_blocks, NUM_EXPERTS: tl.constexpr,
                     LOCAL_EXPERTS: tl.constexpr, TOP_K: tl.constexpr,
                     RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_LE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_B: tl.constexpr):
    """Zero the counts, route and count, pad, scatter, all tokens in this program; barriers
    order the phases within the block."""
    local_experts = tl.arange(0, BLOCK_LE)
    tl.store(counts_ptr + local_experts, tl.zeros_like(local_experts),
             mask=local_experts < LOCAL_EXPERTS)
    tl.debug_barrier()
    local, out, hit = _route_tile(logits_ptr, weights_ptr, ids_ptr, counts_ptr, ranks_ptr,
                                  tl.arange(0, BLOCK_T), n_tokens, stride_t, expert_start,
                                  NUM_EXPERTS, LOCAL_EXPERTS, TOP_K, RENORMALIZE, BLOCK_T,
                                  BLOCK_E, BLOCK_K)
    tl.debug_barrier()
    _pad_blocks(counts_ptr, starts_ptr, expert_ids_ptr, num_padded_ptr, sorted_ids_ptr,
                n_tokens * TOP_K, n_blocks, tl.arange(0, BLOCK_B), True, LOCAL_EXPERTS,
                BLOCK_LE, BLOCK_M)
    tl.debug_barrier()
    rank = tl.load(ranks_ptr + out, mask=hit, other=0, cache_modifier=".cg")
    start = tl.load(starts_ptr + local, mask=hit, other=0, cache_modifier=".cg")
    tl.store(sorted_ids_ptr + start + rank, out, mask=hit)


ONE_PROGRAM_TOKENS = 16  # up to this many tokens route and group in a single launch


def _block(n: int) -> int:
    """A power-of-two tile of at least 2 holding n."""
    return max(2, triton.next_power_of_2(n))


@dataclass(frozen=True, slots=True)
class _Routing:
    """The outputs of routing `tokens` tokens, and the one-program kernels' work buffers."""

    weights: torch.Tensor  # [tokens, top_k] float32
    ids: torch.Tensor  # [tokens, top_k] int32, local (-1: another rank's expert)
    ranks: torch.Tensor  # [tokens * top_k] int32
    counts: torch.Tensor  # [local experts] int32
    starts: torch.Tensor
    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_padded: torch.Tensor

    @classmethod
    def empty(cls, tokens: int, top_k: int, local_experts: int, block_m: int,
              device: torch.device) -> _Routing:
        n_blocks = max_blocks(tokens * top_k, local_experts, block_m)

        def ints(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, dtype=torch.int32, device=device)
        return cls(torch.empty(tokens, top_k, dtype=torch.float32, device=device),
                   ints(tokens, top_k), ints(tokens * top_k), ints(local_experts),
                   ints(local_experts), ints(n_blocks * block_m), ints(n_blocks), ints(1))

    def one_program_args(self) -> tuple[torch.Tensor, ...]:
        return (self.weights, self.ids, self.counts, self.ranks, self.starts, self.expert_ids,
                self.num_padded, self.sorted_ids)

    def blocks(self, block_m: int) -> ExpertBlocks:
        return ExpertBlocks(self.sorted_ids, self.expert_ids, self.num_padded, block_m)


def _route_constants(tokens: int, num_experts: int, local_experts: int, top_k: int,
                     renormalize: bool, block_m: int, n_blocks: int, min_block: int = 2) -> dict:
    """The one-program routing's compile-time constants (tiles of at least min_block)."""
    return {"NUM_EXPERTS": num_experts, "LOCAL_EXPERTS": local_experts, "TOP_K": top_k,
            "RENORMALIZE": renormalize, "BLOCK_T": max(min_block, _block(tokens)),
            "BLOCK_E": max(min_block, _block(num_experts)), "BLOCK_K": _block(top_k),
            "BLOCK_LE": _block(local_experts), "BLOCK_M": block_m, "BLOCK_B": _block(n_blocks)}


def route_to_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                     expert_start: int, local_experts: int,
                     block_m: int) -> tuple[torch.Tensor, torch.Tensor, ExpertBlocks]:
    """select_experts, the global -> local id map and align_to_experts: (float32 weights,
    local ids or -1) [tokens, top_k] and the expert blocks. Decode batches take one launch,
    larger ones four (zeroed counts, route and count, pad, scatter)."""
    tokens, num_experts = router_logits.shape
    device = router_logits.device
    if tokens <= ONE_PROGRAM_TOKENS:
        routing = _Routing.empty(tokens, top_k, local_experts, block_m, device)
        n_blocks = routing.expert_ids.numel()
        _route_align_one_kernel[(1,)](
            router_logits, *routing.one_program_args(), tokens, router_logits.stride(0),
            expert_start, n_blocks, num_warps=4, **dependent_launch(device),
            **_route_constants(tokens, num_experts, local_experts, top_k, renormalize,
                               block_m, n_blocks))
        return routing.weights, routing.ids, routing.blocks(block_m)
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=device)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=device)
    ranks = torch.empty(tokens * top_k, dtype=torch.int32, device=device)
    counts = torch.zeros(local_experts, dtype=torch.int32, device=device)
    block_e = _block(num_experts)
    block_t = max(1, min(16, 4096 // block_e))
    _route_kernel[(triton.cdiv(tokens, block_t),)](
        router_logits, weights, ids, counts, ranks, tokens, router_logits.stride(0),
        expert_start, NUM_EXPERTS=num_experts, LOCAL_EXPERTS=local_experts, TOP_K=top_k,
        RENORMALIZE=renormalize, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=_block(top_k),
        num_warps=4, **dependent_launch(device))
    return weights, ids, _blocks_from_counts(ids.view(-1), counts, ranks, block_m)


ROUTER_K_SPLIT = 128  # inputs each program of the router's product takes


def takes_router(tokens: int, in_features: int) -> bool:
    """Whether route_from_router takes a call of this shape."""
    return tokens <= ONE_PROGRAM_TOKENS and in_features % ROUTER_K_SPLIT == 0


def route_from_router(x: torch.Tensor, router_weight: torch.Tensor, top_k: int,
                      renormalize: bool, expert_start: int, local_experts: int,
                      block_m: int) -> tuple[torch.Tensor, torch.Tensor, ExpertBlocks]:
    """route_to_experts from the hidden states x [tokens, K] (at most ONE_PROGRAM_TOKENS)
    and the router's weights [experts, K] (x's dtype, no bias), the router's product in the
    same launch: its programs each take ROUTER_K_SPLIT inputs, the last routes."""
    tokens, k = x.shape
    num_experts = router_weight.shape[0]
    if not takes_router(tokens, k):
        raise ValueError(f"the router's launch takes at most {ONE_PROGRAM_TOKENS} tokens "
                         f"and a multiple of {ROUTER_K_SPLIT} inputs")
    x = x.contiguous()
    routing = _Routing.empty(tokens, top_k, local_experts, block_m, x.device)
    n_blocks = routing.expert_ids.numel()
    constants = _route_constants(tokens, num_experts, local_experts, top_k, renormalize,
                                 block_m, n_blocks, min_block=16)  # tl.dot's least tile
    splits = k // ROUTER_K_SPLIT
    partial = torch.empty(splits, constants["BLOCK_T"], constants["BLOCK_E"],
                          dtype=torch.float32, device=x.device)
    logits = torch.empty(tokens, num_experts, dtype=x.dtype, device=x.device)
    _router_route_align_kernel[(splits,)](
        x, router_weight.contiguous(), partial, tile_counters(x.device, 1), logits,
        *routing.one_program_args(), tokens, x.stride(0), expert_start, n_blocks, K=k,
        K_SPLIT=ROUTER_K_SPLIT, SPLITS=splits,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4,
        **constants, **dependent_launch(x.device))
    return routing.weights, routing.ids, routing.blocks(block_m)


@triton.jit
def _moe_gemm_kernel(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, b_low_ptr, c_ptr, weights_ptr,
                     sorted_ids_ptr, expert_ids_ptr, sum_ptr, count_ptr, partial_ptr,
                     split_count_ptr, num_assignments, num_blocks, N: tl.constexpr,
                     K: tl.constexpr, A_ROW_DIV: tl.constexpr, GATED: tl.constexpr,
                     MUL_WEIGHT: tl.constexpr, SUM_TOP_K: tl.constexpr,
                     SUM_TOKENS: tl.constexpr, CODES: tl.constexpr, BITS: tl.constexpr,
                     GROUPS: tl.constexpr, E4M3_BYTES: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, DOT: tl.constexpr, PDL: tl.constexpr):
    """C[row] = A[row // A_ROW_DIV] @ B[expert]^T for the rows of one expert block (with
    SPLITS > 1, over one of SPLITS equal splits of the inputs, program_id(1): see
    _finish_split).

    A: [*, K] contiguous; B: [experts, N or 2N, K] contiguous; C: [assignments, N]. GATED:
    B holds gate rows [0, N) and up rows [N, 2N); C gets silu(gate) * up. MUL_WEIGHT: each
    row is scaled by its assignment's routing weight. SUM_TOP_K (> 0): C's rows are each
    token's SUM_TOP_K assignments in turn, and the last of the num_blocks programs of an N
    tile to finish adds them into sum_ptr [tokens, N] (at most SUM_TOKENS tokens).

    CODES: what B holds (ExpertCodes): 0 floats; 1 float8 values (their bytes with
    E4M3_BYTES), each row's K inputs in GROUPS groups of one float32 scale ([experts, rows,
    GROUPS] at b_scale_ptr); 2 integer codes of BITS bits (4: two a byte, byte j of each 64
    inputs holding inputs j and j + 32), weight = code * scale + low with a float16 scale and
    low a row and group. Codes are converted to A's type exactly (4-bit ones with no
    conversion instruction: biased_plane, by DOT: 0 float32, 1 float16, 2 bfloat16 A), the
    scales applied to the products of each group (a step of inputs lies in one group); in
    blocks of DECODED_FROM_ROWS rows or more each weight is decoded to A's type before the
    product (float8 in several groups a row too). 3: float8 values as 1, and A float8 too with a
    float32 scale a row, or a row and group of B's (a_scale_ptr [rows, GROUPS]: a block-scaled
    checkpoint's 1 x 128 activation blocks): products on FP8 tensor cores (K a whole number of
    steps)."""
    wait_for_previous_kernel(PDL)
    pid = tl.program_id(0)
    n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    expert = tl.load(expert_ids_ptr + pid_m)
    if SUM_TOP_K == 0:
        if expert < 0:
            return
    if expert >= 0:
        _expert_block(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, b_low_ptr, c_ptr, weights_ptr,
                      sorted_ids_ptr, sum_ptr, count_ptr + pid_n, partial_ptr,
                      split_count_ptr + pid, expert, pid_m, offs_n, n_ok, num_assignments,
                      num_blocks, N, K, A_ROW_DIV, GATED, MUL_WEIGHT, SUM_TOP_K, SUM_TOKENS,
                      CODES, BITS, GROUPS, E4M3_BYTES, BLOCK_M, BLOCK_N, BLOCK_K, SPLITS,
                      DOT_PRECISION, DOT)
    else:  # with SUM_TOP_K, a block past the real rows still counts itself done (once)
        if SUM_TOP_K > 0:
            if tl.program_id(1) == 0:
                _sum_top_k_last(c_ptr, sum_ptr, count_ptr + pid_n,
                                num_assignments // SUM_TOP_K, num_blocks, offs_n, n_ok, N,
                                SUM_TOP_K, SUM_TOKENS)


@triton.jit
def _expert_block(a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, b_low_ptr, c_ptr, weights_ptr,
                  sorted_ids_ptr, sum_ptr, count_ptr, partial_ptr, split_count_ptr, expert,
                  pid_m, offs_n, n_ok, num_assignments, num_blocks, N: tl.constexpr,
                  K: tl.constexpr, A_ROW_DIV: tl.constexpr, GATED: tl.constexpr,
                  MUL_WEIGHT: tl.constexpr, SUM_TOP_K: tl.constexpr, SUM_TOKENS: tl.constexpr,
                  CODES: tl.constexpr, BITS: tl.constexpr, GROUPS: tl.constexpr,
                  E4M3_BYTES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  DOT: tl.constexpr):
    """Block pid_m's rows of C, columns offs_n, for `expert` over this program's split of
    the inputs (see _moe_gemm_kernel); the block's C stored by the last of its splits, which
    then counts the block done on its N tile (SUM_TOP_K)."""
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < num_assignments
    a_rows = (rows // A_ROW_DIV).to(tl.int64)
    NIBBLES: tl.constexpr = CODES == 2 and BITS == 4  # 64-input steps, two codes a byte
    DECODE: tl.constexpr = BLOCK_M >= DECODED_FROM_ROWS  # integer weights decoded first
    ROW_BYTES: tl.constexpr = K // 2 if NIBBLES else K
    offs_k = tl.arange(0, BLOCK_K)
    offs_kb = tl.arange(0, BLOCK_K // 2 if NIBBLES else BLOCK_K)
    b_rows = N * (2 if GATED else 1)
    b_base = b_ptr + expert.to(tl.int64) * (b_rows * ROW_BYTES)
    a_base = a_ptr + a_rows[:, None] * K  # each row's first input
    K_SPLIT: tl.constexpr = K // SPLITS
    k_first = tl.program_id(1) * K_SPLIT
    b_ptrs = (b_base + offs_n[None, :].to(tl.int64) * ROW_BYTES + offs_kb[:, None]
              + (k_first // 2 if NIBBLES else k_first))
    # each column's scales and lows: its gate row's, and N rows on its up row's
    s_at = (expert.to(tl.int64) * b_rows + offs_n) * GROUPS
    up_b, up_s = N * ROW_BYTES, N * GROUPS  # the up rows' offsets
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for offset in range(0, K_SPLIT, BLOCK_K):
        k0 = k_first + offset
        if NIBBLES:  # a step's two halves of inputs, and their rows' sums, shared by gate, up
            half = k0 + tl.arange(0, 32)[None, :]
            a_low = tl.load(a_base + half, mask=row_ok[:, None], other=0.0)
            a_high = tl.load(a_base + 32 + half, mask=row_ok[:, None], other=0.0)
            sums_low = tl.sum(a_low.to(tl.float32), axis=1)
            sums_high = tl.sum(a_high.to(tl.float32), axis=1)
            acc = _nibbles_step(acc, a_low, a_high, sums_low, sums_high, b_ptrs, b_scale_ptr,
                                b_low_ptr, s_at, k0, n_ok, K, GROUPS, DOT_PRECISION, DECODE,
                                DOT)
            if GATED:
                acc_up = _nibbles_step(acc_up, a_low, a_high, sums_low, sums_high,
                                       b_ptrs + up_b, b_scale_ptr, b_low_ptr, s_at + up_s, k0,
                                       n_ok, K, GROUPS, DOT_PRECISION, DECODE, DOT)
        else:
            k_ok = offs_k < K - k0
            if CODES == 3:  # (no float8 `other`: a row left out is stored nowhere)
                a = tl.load(a_base + k0 + offs_k[None, :], mask=row_ok[:, None])
            else:
                a = tl.load(a_base + k0 + offs_k[None, :],
                            mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            group = k0 // (K // max(GROUPS, 1))
            a_group_scale = 1.0
            if CODES == 3 and GROUPS > 1:  # each row's activation scale in this group
                a_group_scale = tl.load(a_scale_ptr + a_rows * GROUPS + group, mask=row_ok,
                                        other=0.0)[:, None]
            acc = _step(acc, a, a_group_scale, b_ptrs, b_scale_ptr, b_low_ptr, s_at + group,
                        k_ok, n_ok, CODES, GROUPS, E4M3_BYTES, DOT_PRECISION, DECODE)
            if GATED:
                acc_up = _step(acc_up, a, a_group_scale, b_ptrs + up_b, b_scale_ptr,
                               b_low_ptr, s_at + up_s + group, k_ok, n_ok, CODES, GROUPS,
                               E4M3_BYTES, DOT_PRECISION, DECODE)
        b_ptrs += BLOCK_K // 2 if NIBBLES else BLOCK_K
    if SPLITS == 1:
        _finish_block(acc, acc_up if GATED else acc, a_scale_ptr, b_scale_ptr, c_ptr,
                      weights_ptr, sum_ptr, count_ptr, rows, row_ok, a_rows, s_at, offs_n, n_ok,
                      num_assignments, num_blocks, N, GATED, MUL_WEIGHT, SUM_TOP_K,
                      SUM_TOKENS, CODES, GROUPS)
    else:
        _finish_split(acc, acc_up if GATED else acc, partial_ptr, split_count_ptr, a_scale_ptr,
                      b_scale_ptr, c_ptr, weights_ptr, sum_ptr, count_ptr, rows, row_ok,
                      a_rows, s_at, offs_n, n_ok, num_assignments, num_blocks, N, GATED,
                      MUL_WEIGHT, SUM_TOP_K, SUM_TOKENS, CODES, GROUPS, BLOCK_M, BLOCK_N,
                      SPLITS)


@triton.jit
def _finish_split(acc, acc_up, partial_ptr, split_count_ptr, a_scale_ptr, b_scale_ptr, c_ptr,
                  weights_ptr, sum_ptr, count_ptr, rows, row_ok, a_rows, s_at, offs_n, n_ok,
                  num_assignments, num_blocks, N: tl.constexpr, GATED: tl.constexpr,
                  MUL_WEIGHT: tl.constexpr, SUM_TOP_K: tl.constexpr, SUM_TOKENS: tl.constexpr,
                  CODES: tl.constexpr, GROUPS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, SPLITS: tl.constexpr):
    """Store this split's float32 sums (partial_ptr [SPLITS, assignments, N or 2N: gate
    then up]) and count it done on the block's counter; the last of the block's splits adds
    them all in split order, finishes the block (_finish_block) and resets the counter."""
    width: tl.constexpr = 2 * N if GATED else N
    at = rows.to(tl.int64)[:, None] * width + offs_n[None, :]
    ok = row_ok[:, None] & n_ok[None, :]
    split_stride = num_assignments * width
    mine = partial_ptr + tl.program_id(1) * split_stride + at
    tl.store(mine, acc, mask=ok)
    if GATED:
        tl.store(mine + N, acc_up, mask=ok)
    tl.debug_barrier()  # every thread's partial sums stored before the count
    if tl.atomic_add(split_count_ptr, 1, sem="acq_rel") == SPLITS - 1:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for part in tl.static_range(SPLITS):  # in split order: the same sums every time
            acc += tl.load(partial_ptr + part * split_stride + at, mask=ok, other=0.0,
                           cache_modifier=".cg")
            if GATED:
                acc_up += tl.load(partial_ptr + part * split_stride + at + N, mask=ok,
                                  other=0.0, cache_modifier=".cg")
        _finish_block(acc, acc_up, a_scale_ptr, b_scale_ptr, c_ptr, weights_ptr, sum_ptr,
                      count_ptr, rows, row_ok, a_rows, s_at, offs_n, n_ok, num_assignments,
                      num_blocks, N, GATED, MUL_WEIGHT, SUM_TOP_K, SUM_TOKENS, CODES, GROUPS)
        tl.atomic_xchg(split_count_ptr, 0)


@triton.jit
def _finish_block(acc, acc_up, a_scale_ptr, b_scale_ptr, c_ptr, weights_ptr, sum_ptr,
                  count_ptr, rows, row_ok, a_rows, s_at, offs_n, n_ok, num_assignments,
                  num_blocks, N: tl.constexpr, GATED: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                  SUM_TOP_K: tl.constexpr, SUM_TOKENS: tl.constexpr, CODES: tl.constexpr,
                  GROUPS: tl.constexpr):
    """A block's C from its products' whole sums (acc, and acc_up with GATED): float8's
    scales a row, the gated activation and the routing weight applied, C stored and, with
    SUM_TOP_K, the block counted done on its N tile (see _moe_gemm_kernel)."""
    if (CODES == 1 or CODES == 3) and GROUPS == 1:  # float8's one scale a row: applied once
        acc = acc * tl.load(b_scale_ptr + s_at, mask=n_ok, other=0.0)[None, :]
        if GATED:
            acc_up = acc_up * tl.load(b_scale_ptr + s_at + N, mask=n_ok, other=0.0)[None, :]
    if CODES == 3 and GROUPS == 1:  # each row's activation scale
        a_scale = tl.load(a_scale_ptr + a_rows, mask=row_ok, other=0.0)[:, None]
        acc = acc * a_scale
        if GATED:
            acc_up = acc_up * a_scale
    if GATED:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_WEIGHT:
        w = tl.load(weights_ptr + rows, mask=row_ok, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + rows[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])
    if SUM_TOP_K > 0:
        _sum_top_k_last(c_ptr, sum_ptr, count_ptr, num_assignments // SUM_TOP_K, num_blocks,
                        offs_n, n_ok, N, SUM_TOP_K, SUM_TOKENS)


@triton.jit
def _step(acc, a, a_scale, b_ptrs, scale_ptr, low_ptr, s_at, k_ok, n_ok, CODES: tl.constexpr,
          GROUPS: tl.constexpr, E4M3_BYTES: tl.constexpr, DOT_PRECISION: tl.constexpr,
          DECODE: tl.constexpr):
    """acc + a @ b for one step of inputs (in one group, its scales at s_at): b as stored;
    float8 values converted to a's type and, with several groups a row, scaled by their
    group's (on FP8 tensor cores, and by a's rows' scales in the group, `a_scale`
    [BLOCK_M, 1]); or byte codes times their scale plus their low."""
    if CODES == 0:
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :])  # (no float8 `other`)
    if CODES != 2:
        if CODES == 1 and GROUPS > 1 and DECODE:  # scaled before one product into acc
            scale = tl.load(scale_ptr + s_at, mask=n_ok, other=0.0)
            b = codes_as(b, tl.float32, E4M3_BYTES) * scale[None, :]
            b = tl.where(k_ok[:, None], b, 0.0).to(a.dtype)
            return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if CODES == 1:  # converted to a's type; on FP8 tensor cores (3) as they are
            b = tl.where(k_ok[:, None], codes_as(b, a.dtype, E4M3_BYTES), 0.0).to(a.dtype)
        if GROUPS == 1:
            return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        scale = tl.load(scale_ptr + s_at, mask=n_ok, other=0.0)
        return acc + tl.dot(a, b, input_precision=DOT_PRECISION) * scale[None, :] * a_scale
    b = tl.where(k_ok[:, None], b.to(a.dtype), 0.0).to(a.dtype)  # (a is 0 past K)
    sums = tl.sum(a.to(tl.float32), axis=1)
    return _scaled_group(acc, a, b, sums, scale_ptr, low_ptr, s_at, n_ok, DOT_PRECISION,
                         DECODE, 0)


@triton.jit
def _nibbles_step(acc, a_low, a_high, sums_low, sums_high, b_ptrs, scale_ptr, low_ptr, s_at,
                  k0, n_ok, K: tl.constexpr, GROUPS: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, DECODE: tl.constexpr, DOT: tl.constexpr):
    """acc + a @ b for inputs k0..k0+63 of 4-bit codes ([32, BLOCK_N] bytes at b_ptrs):
    the low nibbles are inputs k0..k0+31 (a_low, each row's sum sums_low), the high ones
    k0+32..k0+63 (a_high), each half in one group; the codes biased_plane's (no conversion
    instruction), their bias taken off with the group's low. Both halves in one group: the
    second product accumulates onto the first, scaled once."""
    packed = tl.load(b_ptrs, mask=n_ok[None, :], other=0).to(tl.int16)
    group_size: tl.constexpr = K // GROUPS
    low_codes = biased_plane(packed, 0, DOT, False)
    high_codes = biased_plane(packed, 1, DOT, False)
    s_low, s_high = s_at + k0 // group_size, s_at + (k0 + 32) // group_size
    if group_size % 64 == 0 and not DECODE:
        scale, low = _group_scale_low(scale_ptr, low_ptr, s_low, n_ok, DOT)
        products = tl.dot(a_high, high_codes, tl.dot(a_low, low_codes,
                                                     input_precision=DOT_PRECISION),
                          input_precision=DOT_PRECISION)
        return acc + products * scale[None, :] + (sums_low + sums_high)[:, None] * low[None, :]
    acc = _scaled_group(acc, a_low, low_codes, sums_low, scale_ptr, low_ptr, s_low, n_ok,
                        DOT_PRECISION, DECODE, DOT)
    return _scaled_group(acc, a_high, high_codes, sums_high, scale_ptr, low_ptr, s_high, n_ok,
                         DOT_PRECISION, DECODE, DOT)


@triton.jit
def _group_scale_low(scale_ptr, low_ptr, s_at, n_ok, DOT: tl.constexpr):
    """A group's float32 scale a column, and its low less biased_plane's bias (DOT's; 0:
    none) times the scale: code * scale + low = (code + bias) * scale + that."""
    scale = tl.load(scale_ptr + s_at, mask=n_ok, other=0.0).to(tl.float32)
    low = tl.load(low_ptr + s_at, mask=n_ok, other=0.0).to(tl.float32)
    return scale, low - biased(tl.zeros_like(scale), DOT) * scale


@triton.jit
def _scaled_group(acc, a, codes, sums, scale_ptr, low_ptr, s_at, n_ok,
                  DOT_PRECISION: tl.constexpr, DECODE: tl.constexpr, DOT: tl.constexpr):
    """acc + a @ (codes * scale + low) for inputs of one group (codes plus DOT's bias, see
    _group_scale_low): its scale and low a column (float16); the low times each row's sum
    of a (`sums`), or (DECODE: tiles of many rows, where a second product's accumulator
    would not fit the registers) each weight decoded to a's type before one product into
    acc."""
    scale, low = _group_scale_low(scale_ptr, low_ptr, s_at, n_ok, DOT)
    if DECODE:
        weights = codes.to(tl.float32) * scale[None, :] + low[None, :]
        return tl.dot(a, weights.to(a.dtype), acc, input_precision=DOT_PRECISION)
    return acc + tl.dot(a, codes, input_precision=DOT_PRECISION) * scale[None, :] \
        + sums[:, None] * low[None, :]


@triton.jit
def _sum_top_k_last(c_ptr, sum_ptr, counter_ptr, tokens, num_blocks, offs_n, n_ok,
                    N: tl.constexpr, TOP_K: tl.constexpr, TOKENS: tl.constexpr):
    """Count this program done on its N tile's counter; the last of the tile's num_blocks
    programs adds each token's TOP_K rows of C (stored, rounded, by all of them) in float32
    into sum_ptr, and resets the counter for the next launch."""
    tl.debug_barrier()  # every thread's rows stored before the count
    if tl.atomic_add(counter_ptr, 1, sem="acq_rel") == num_blocks - 1:
        t = tl.arange(0, TOKENS)
        mask = (t < tokens)[:, None] & n_ok[None, :]
        first = (t * TOP_K).to(tl.int64)[:, None] * N + offs_n[None, :]
        total = tl.load(c_ptr + first, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        for j in tl.static_range(1, TOP_K):
            total += tl.load(c_ptr + first + j * N, mask=mask, other=0.0,
                             cache_modifier=".cg").to(tl.float32)
        tl.store(sum_ptr + t[:, None] * N + offs_n[None, :],
                 total.to(sum_ptr.dtype.element_ty), mask=mask)
        tl.atomic_xchg(counter_ptr, 0)


def launch_tile(config: MoEConfig, gated: bool, codes: int, bits: int, groups: int,
                k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of a grouped GEMM over `k` inputs with experts held as `codes`
    (_moe_gemm_kernel's CODES, BITS, GROUPS): half the config's outputs where a tile holds two
    accumulators (gated: gate and up; float8 on FP8 tensor cores in several groups a row,
    each group's product scaled apart); steps of 64 inputs for 4-bit codes (a byte's two
    halves), else within one group."""
    two_accumulators = gated or (codes == 3 and groups > 1)
    block_n = config.block_n // 2 if two_accumulators else config.block_n
    block_k = max(16, min(config.block_k, triton.next_power_of_2(k)))
    if codes == 2 and bits == 4:
        block_k = 64
    elif groups > 1:
        block_k = min(block_k, k // groups)
    return block_n, block_k


def _split_k_from_environment() -> int | None:
    given = os.environ.get("PAGODA_MOE_SPLIT_K", "")
    if given == "":
        return None
    if not given.isdigit() or int(given) < 1:
        raise ValueError(f"PAGODA_MOE_SPLIT_K={given!r}: a number of splits (1: none) expected")
    return int(given)


# integer-coded experts in tiles of few rows (decode) split their inputs among programs
# until about SPLIT_PROGRAMS_PER_SM programs a multiprocessor are busy: at one token
# Qwen3-30B-A3B's gate-up product has 192 programs of 4 warps walking 2,048 inputs each (the
# 8 experts hit by 24 tiles), too few to hide the latency of their decoding; the last
# program of each block adds the splits' sums. PAGODA_MOE_SPLIT_K=S asks for S splits (the
# largest count up to S that divides the steps; 1: none) in every tile of few rows, float
# and float8 experts' too (to time them so).
SPLIT_PROGRAMS_PER_SM = 8
SPLIT_K = _split_k_from_environment()


def split_count(kind: int, config: MoEConfig, busy_programs: int, k: int, block_k: int,
                multiprocessors: int) -> int:
    """Splits of the inputs for a grouped GEMM of `kind` (_moe_gemm_kernel's CODES) whose
    unsplit grid keeps `busy_programs` programs busy: in tiles of fewer than
    DECODED_FROM_ROWS rows only, integer codes only unless SPLIT_K says, a count dividing
    k's steps of block_k inputs."""
    if config.block_m >= DECODED_FROM_ROWS or k % block_k or (kind != 2 and SPLIT_K is None):
        return 1
    wanted = SPLIT_K or triton.cdiv(SPLIT_PROGRAMS_PER_SM * multiprocessors,
                                    max(busy_programs, 1))
    steps = k // block_k
    return max(s for s in range(1, min(wanted, steps) + 1) if steps % s == 0)


def _grouped_gemm(a: torch.Tensor, b: Experts, out: torch.Tensor, blocks: ExpertBlocks,
                  weights: torch.Tensor | None, a_row_div: int, gated: bool,
                  config: MoEConfig, sums: torch.Tensor | None = None,
                  a_scale: torch.Tensor | None = None) -> None:
    """`sums` [tokens, N]: each token's rows of `out` added there too, in the same launch.
    `a_scale` [rows of a x b's groups of inputs]: a holds float8 values with these scales,
    b float8 codes (FP8 tensor cores)."""
    n, k = out.shape[1], a.shape[1]
    wide = a.dtype == torch.float32  # twice the shared memory per stage
    codes, scale, low, kind, bits, groups, e4m3_bytes = b, out, out, 0, 8, 0, False
    if isinstance(b, ExpertCodes):
        codes, scale, groups = b.codes, b.scale, b.scale.shape[-1]
        kind, bits, low = (1, 8, out) if b.low is None else (2, b.bits, b.low)
        if kind == 1 and a_scale is not None:
            kind = 3
        elif kind == 1:
            codes, e4m3_bytes = float8_codes(codes, codes.device)
    block_n, block_k = launch_tile(config, gated, kind, bits, groups, k)
    n_tiles = triton.cdiv(n, block_n)
    num_blocks = blocks.expert_ids.numel()
    # the blocks with rows: about one an expert hit, at the few rows a split is for
    busy_blocks = min(num_blocks, out.shape[0], b.shape[0])
    device_index = a.device.index if a.device.type == "cuda" else None
    splits = split_count(kind, config, busy_blocks * n_tiles, k, block_k,
                         multiprocessor_count(device_index))
    grid = (num_blocks * n_tiles, splits)
    # top-k sums' counters first (one an N tile), then the splits' (one a block and tile);
    # a launch reading none of them takes any int32 tensor
    counters = blocks.expert_ids
    if sums is not None or splits > 1:
        counters = tile_counters(out.device, n_tiles + num_blocks * n_tiles)
    partials = out  # (unread with one split)
    if splits > 1:
        partials = torch.empty(splits, out.shape[0], n * (2 if gated else 1),
                               dtype=torch.float32, device=out.device)
    _moe_gemm_kernel[grid](
        a, a_scale if a_scale is not None else out, codes, scale, low, out,
        weights if weights is not None else out, blocks.sorted_ids,
        blocks.expert_ids, sums if sums is not None else out, counters, partials,
        counters[n_tiles:] if splits > 1 else counters, out.shape[0], num_blocks, N=n, K=k,
        A_ROW_DIV=a_row_div, GATED=gated, MUL_WEIGHT=weights is not None,
        SUM_TOP_K=0 if sums is None else out.shape[0] // sums.shape[0],
        SUM_TOKENS=1 if sums is None else triton.next_power_of_2(sums.shape[0]),
        CODES=kind, BITS=bits, GROUPS=groups, E4M3_BYTES=e4m3_bytes,
        BLOCK_M=config.block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLITS=splits,
        DOT_PRECISION="ieee" if wide else "tf32",  # float32 exact, as the torch path
        DOT=0 if wide else 1 if a.dtype == torch.float16 else 2,
        num_warps=config.num_warps, num_stages=min(config.num_stages, 2) if wide else
        config.num_stages, **dependent_launch(a.device))


def fused_moe_triton(x: torch.Tensor, w13: Experts, w2: Experts,
                     topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     config: MoEConfig | None = None, partial: bool = False) -> torch.Tensor:
    """The same sum as fused_moe_native, given the routing: four small launches to group
    the assignments, two grouped GEMMs and the top-k sum (inside the second for a few
    tokens). `partial`: some ids are -1 (experts on other ranks), whose rows add nothing.
    w13 and w2: floats, or codes (ExpertCodes)."""
    tokens, top_k = topk_ids.shape
    config = config or moe_config(tokens, top_k, w13.shape[0])
    blocks = align_to_experts(topk_ids, w13.shape[0], config.block_m)
    return experts_forward(x, w13, w2, topk_weights, blocks, top_k, config, partial)


def fused_moe_routed(x: torch.Tensor, router_logits: torch.Tensor, w13: Experts,
                     w2: Experts, top_k: int, renormalize: bool, expert_start: int = 0,
                     partial: bool = False) -> torch.Tensor:
    """The whole layer from the router's logits: routing and grouping in three kernels
    (route_to_experts), then the experts. Experts [expert_start, expert_start + w13.shape[0])
    live here."""
    config = moe_config(x.shape[0], top_k, w13.shape[0])
    weights, _, blocks = route_to_experts(router_logits, top_k, renormalize, expert_start,
                                          w13.shape[0], config.block_m)
    return experts_forward(x, w13, w2, weights, blocks, top_k, config, partial)


def fused_moe_from_router(x: torch.Tensor, router_weight: torch.Tensor, w13: Experts,
                          w2: Experts, top_k: int, renormalize: bool,
                          expert_start: int = 0, partial: bool = False) -> torch.Tensor:
    """fused_moe_routed from the hidden states and the router's weights, for a decode
    batch: the router's product, routing and grouping in one launch (route_from_router)."""
    config = moe_config(x.shape[0], top_k, w13.shape[0])
    weights, _, blocks = route_from_router(x, router_weight, top_k, renormalize, expert_start,
                                           w13.shape[0], config.block_m)
    return experts_forward(x, w13, w2, weights, blocks, top_k, config, partial)


def _fp8_tensor_cores_from() -> int | None:
    """PAGODA_MOE_FP8_FROM: the fewest tokens of a call whose float8 experts run on FP8
    tensor cores (activations quantized per row, or per row and 128 inputs where the weights
    have block scales); unset: every call (on an H100 Qwen3-30B-A3B's
    MoE layer ran 1.2-1.6x faster than weight-only from 1 to 4,096 tokens); "off": none."""
    given = os.environ.get("PAGODA_MOE_FP8_FROM", "1")
    return None if given == "off" else int(given)


FP8_TENSOR_CORES_FROM = _fp8_tensor_cores_from()


def takes_fp8_tensor_cores(tokens: int, w13: Experts, w2: Experts) -> bool:
    """Whether a call's products run on FP8 tensor cores: float8 experts over inputs a
    whole number of 128-input steps, a device with float8 (compute capability 8.9 on; the
    CPU interpreter), and at least FP8_TENSOR_CORES_FROM tokens."""
    if FP8_TENSOR_CORES_FROM is None or tokens < FP8_TENSOR_CORES_FROM:
        return False
    if not all(isinstance(w, ExpertCodes) and w.low is None and w.shape[2] % 128 == 0
               for w in (w13, w2)):
        return False
    device = w13.codes.device
    return has_e4m3(cuda_capability(device.index) if device.type == "cuda" else None)


def _activations(x: torch.Tensor, float8: bool,
                 weights: Experts) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A grouped GEMM's activations: as they are, or (FP8 tensor cores) float8 values with
    a float32 scale a row, or a row and group of the weights' inputs where their scales
    have several groups a row (block scales: the activations in 1 x 128 blocks, as such
    checkpoints' dynamic activation scheme has them)."""
    if not float8:
        return x, None
    tokens, inputs = x.shape
    groups = weights.scale.shape[-1]
    values, scale = fp8_rows(x.reshape(tokens * groups, inputs // groups), FP8_MAX)
    return values.view(tokens, inputs), scale.view(-1)


def experts_forward(x: torch.Tensor, w13: Experts, w2: Experts,
                    topk_weights: torch.Tensor, blocks: ExpertBlocks, top_k: int,
                    config: MoEConfig, partial: bool) -> torch.Tensor:
    """gate/up with SiLU-and-mul, down with the routing weight, then each token's top-k
    rows summed (float32 accumulation). Each row is rounded to x's dtype before the sum."""
    tokens, hidden = x.shape
    x = x.contiguous()
    inter2 = w13.shape[1]
    act = torch.empty(tokens * top_k, inter2 // 2, dtype=x.dtype, device=x.device)
    on_tensor_cores = takes_fp8_tensor_cores(tokens, w13, w2)
    x_in, x_scale = _activations(x, on_tensor_cores, w13)
    _grouped_gemm(x_in, w13, act, blocks, None, top_k, True, config, a_scale=x_scale)
    # rows of experts on other ranks are never written: zeroed, they add nothing
    alloc = torch.zeros if partial else torch.empty
    down = alloc(tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).to(torch.float32).contiguous()
    # few tokens (decode): the down GEMM's last program of each tile adds the top-k rows,
    # saving a launch; more: one torch reduction (which also adds in float32)
    sums = None
    if 1 < top_k and tokens <= MAX_SUMMED_TOKENS:
        sums = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    act_in, act_scale = _activations(act, on_tensor_cores, w2)
    _grouped_gemm(act_in, w2, down, blocks, weights, 1, False, config, sums, act_scale)
    if top_k == 1:
        return down
    return sums if sums is not None else down.view(tokens, top_k, hidden).sum(dim=1)
