"""The GPU attention backend: a Triton KV-store kernel (or, for rotary models, RoPE fused into
the store; in decode steps, both inside the attention kernel) plus the unified paged-attention
kernel (split-KV for small decode batches with long contexts)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from pagoda.layers.attention.backend import UNIT_SCALES, AttentionBackend, KVScales
from pagoda.layers.attention.metadata import CommonAttentionMetadata
from pagoda.layers.attention.triton_kv_store import store_kv
from pagoda.layers.attention.triton_unified import (
    AttentionPlan,
    NewToken,
    plan_attention,
    takes_new_token,
    unified_attention,
)
from pagoda.layers.fused import rope_store_kv_

if TYPE_CHECKING:
    from pagoda.layers.norm import RMSNorm

# Multiprocessor count assumed off-GPU (the Triton interpreter): an H100 SXM's.
_DEFAULT_NUM_SMS = 132


@dataclass(slots=True)
class TritonAttentionMetadata:
    """One step's device tensors plus the host facts the launch plans are derived from.
    Plans are made once per (heads, kv_heads, head_dim, dtype, sliding window) and shared by
    every layer of that shape and window."""

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    num_seqs: int
    max_seq_len: int
    query_lens: list[int]
    num_sms: int
    num_segments: int | None  # forced split (None: heuristic)
    plans: dict[tuple, AttentionPlan] = field(default_factory=dict)

    def plan(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
             sliding_window: int | None = None,
             cache_dtype: torch.dtype | None = None) -> AttentionPlan:
        key = (num_heads, num_kv_heads, head_dim, dtype, sliding_window, cache_dtype)
        plan = self.plans.get(key)
        if plan is None:
            plan = plan_attention(num_heads, num_kv_heads, head_dim, self.query_lens,
                                  self.max_seq_len, self.num_sms, self.num_segments, dtype=dtype,
                                  sliding_window=sliding_window, cache_dtype=cache_dtype)
            self.plans[key] = plan
        return plan


class TritonAttentionBackend(AttentionBackend):
    """Triton paged attention. `num_segments` forces the split-KV choice (1 = never split);
    None lets `choose_num_segments` decide from the step's host-side lengths.

    CUDA graphs: forward launches two or three kernels whose shapes depend only on q's shape
    and the metadata's host ints, and the split workspace lives in the metadata, so a decode
    step replays as captured. The split decision is frozen at capture: capture with metadata
    whose max_seq_len is representative (e.g. max_model_len) or force num_segments; results
    are exact either way, only speed differs. A sliding-window layer gets its own plan (split
    for the window's length, not the context's) and its own workspace; the window is a kernel
    argument, fixed per layer, so replays of a graph spanning both kinds of layer are exact."""

    name = "triton"

    def __init__(self, num_segments: int | None = None) -> None:
        self.num_segments = num_segments
        self._num_sms: dict[torch.device, int] = {}

    def build_metadata(self, common: CommonAttentionMetadata) -> TritonAttentionMetadata:
        return TritonAttentionMetadata(
            slot_mapping=common.slot_mapping, query_start_loc=common.query_start_loc,
            seq_lens=common.seq_lens, block_tables=common.block_tables,
            num_seqs=common.num_seqs, max_seq_len=common.max_seq_len,
            query_lens=common.query_lens_cpu, num_sms=self._sm_count(common.seq_lens.device),
            num_segments=self.num_segments)

    def build_group_metadata(self, groups: Sequence[CommonAttentionMetadata]
                             ) -> list[TritonAttentionMetadata]:
        """The groups share the first one's plans (hence its split workspaces: layers run one
        after another, and every layer's reduce consumes its workspace before the next)."""
        first = self.build_metadata(groups[0])
        return [first] + [replace(first, block_tables=c.block_tables, slot_mapping=c.slot_mapping)
                          for c in groups[1:]]

    def _sm_count(self, device: torch.device) -> int:
        if device.type != "cuda":
            return _DEFAULT_NUM_SMS
        count = self._num_sms.get(device)
        if count is None:
            count = torch.cuda.get_device_properties(device).multi_processor_count
            self._num_sms[device] = count
        return count

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata: TritonAttentionMetadata, scale: float,
                sliding_window: int | None = None,
                kv_scales: KVScales = UNIT_SCALES) -> torch.Tensor:
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        store_kv(k, v, key_cache, value_cache, metadata.slot_mapping, kv_scales)
        return self._attend(q, key_cache, value_cache, metadata, scale, sliding_window,
                            kv_scales)

    def forward_rotary(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, rotary: Any, kv_cache: torch.Tensor,
                       metadata: TritonAttentionMetadata, scale: float,
                       sliding_window: int | None = None,
                       qk_norm: tuple[RMSNorm, RMSNorm] | None = None,
                       kv_scales: KVScales = UNIT_SCALES) -> torch.Tensor:
        """The q/k head norms, RoPE and the KV store in one kernel (one or two launches per
        layer fewer); in decode steps without head norms over a cache of the queries' type,
        RoPE and the store in the attention kernel itself (NewToken: one launch fewer
        again)."""
        key_cache, value_cache = kv_cache[0], kv_cache[1]
        if qk_norm is None:
            plan = metadata.plan(q.shape[1], key_cache.shape[2], q.shape[2], q.dtype,
                                 sliding_window, key_cache.dtype)
            if takes_new_token(plan, q, key_cache):
                new = NewToken(k, v, positions, rotary.cos_sin, rotary.rotary_dim,
                               metadata.slot_mapping)
                return unified_attention(q, key_cache, value_cache, metadata.query_start_loc,
                                         metadata.seq_lens, metadata.block_tables, scale,
                                         metadata.num_seqs, plan, sliding_window=sliding_window,
                                         new_token=new)
        rope_store_kv_(positions, q, k, v, rotary.cos_sin, rotary.rotary_dim, key_cache,
                       value_cache, metadata.slot_mapping, qk_norm, kv_scales)
        return self._attend(q, key_cache, value_cache, metadata, scale, sliding_window,
                            kv_scales)

    @staticmethod
    def _attend(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                metadata: TritonAttentionMetadata, scale: float,
                sliding_window: int | None, kv_scales: KVScales) -> torch.Tensor:
        plan = metadata.plan(q.shape[1], key_cache.shape[2], q.shape[2], q.dtype, sliding_window,
                             key_cache.dtype)
        return unified_attention(q, key_cache, value_cache, metadata.query_start_loc,
                                 metadata.seq_lens, metadata.block_tables,
                                 scale * kv_scales.k, metadata.num_seqs, plan,
                                 sliding_window=sliding_window, value_scale=kv_scales.v)
