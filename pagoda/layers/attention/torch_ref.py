"""Pure-torch paged attention: gather each sequence's pages, then SDPA. The CPU path and
the oracle the GPU kernels are tested against."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from pagoda.layers.attention.backend import AttentionBackend
from pagoda.layers.attention.metadata import CommonAttentionMetadata


@dataclass(slots=True)
class PrefillSeq:
    """One sequence with several query tokens: where its queries sit and its KV slots."""

    query_start: int
    query_len: int
    slots: torch.Tensor  # [seq_len] int64
    mask: torch.Tensor | None  # [query_len, seq_len] bool; None when plain causal suffices


@dataclass(slots=True)
class DecodeGroup:
    """All single-token sequences of the step, attended in one padded SDPA call."""

    token_index: torch.Tensor  # [n] positions of their query tokens in the flat batch
    slots: torch.Tensor  # [n, max_len] int64, padding points at the null block
    mask: torch.Tensor  # [n, 1, 1, max_len] bool


@dataclass(slots=True)
class TorchAttentionMetadata:
    """The step's metadata as the torch backend consumes it."""

    slot_mapping: torch.Tensor
    decodes: DecodeGroup | None
    prefills: list[PrefillSeq]


def _block_slots(block_table: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """KV slot index of each of a sequence's first seq_len tokens."""
    pos = torch.arange(seq_len, device=block_table.device)
    return block_table[pos // block_size].long() * block_size + pos % block_size


class TorchAttentionBackend(AttentionBackend):
    """Reference backend; device-agnostic, no custom kernels."""

    name = "torch"

    def build_metadata(self, common: CommonAttentionMetadata) -> TorchAttentionMetadata:
        query_lens = common.query_lens_cpu
        decode_rows = [i for i, n in enumerate(query_lens) if n == 1]
        prefills = [self._prefill_seq(common, i) for i, n in enumerate(query_lens) if n > 1]
        decodes = self._decode_group(common, decode_rows) if decode_rows else None
        return TorchAttentionMetadata(common.slot_mapping, decodes, prefills)

    def _prefill_seq(self, common: CommonAttentionMetadata, i: int) -> PrefillSeq:
        start, seq_len = common.query_start_loc_cpu[i], common.seq_lens_cpu[i]
        q_len = common.query_start_loc_cpu[i + 1] - start
        slots = _block_slots(common.block_tables[i], seq_len, common.block_size)
        mask = None
        if q_len != seq_len:  # queries continue a cached context: causal with an offset
            device = common.block_tables.device
            q_pos = torch.arange(q_len, device=device).unsqueeze(1) + (seq_len - q_len)
            mask = torch.arange(seq_len, device=device).unsqueeze(0) <= q_pos
        return PrefillSeq(start, q_len, slots, mask)

    def _decode_group(self, common: CommonAttentionMetadata, rows: list[int]) -> DecodeGroup:
        device, bs = common.block_tables.device, common.block_size
        lens = torch.tensor([common.seq_lens_cpu[i] for i in rows], device=device)
        max_len = int(max(common.seq_lens_cpu[i] for i in rows))
        pos = torch.arange(max_len, device=device)
        valid = pos.unsqueeze(0) < lens.unsqueeze(1)
        tables = common.block_tables[rows].long()
        block = torch.gather(tables, 1, (pos // bs).clamp(max=tables.shape[1] - 1)
                             .unsqueeze(0).expand(len(rows), -1))
        slots = torch.where(valid, block * bs + pos % bs, torch.zeros_like(block))
        index = torch.tensor([common.query_start_loc_cpu[i] for i in rows], device=device)
        return DecodeGroup(index, slots, valid[:, None, None, :])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, metadata: TorchAttentionMetadata,
                scale: float) -> torch.Tensor:
        key_cache, value_cache = kv_cache[0].flatten(0, 1), kv_cache[1].flatten(0, 1)
        key_cache.index_copy_(0, metadata.slot_mapping, k.to(key_cache.dtype))
        value_cache.index_copy_(0, metadata.slot_mapping, v.to(value_cache.dtype))
        out = torch.empty_like(q)
        if metadata.decodes is not None:
            self._decode(q, key_cache, value_cache, metadata.decodes, scale, out)
        for seq in metadata.prefills:
            self._prefill(q, key_cache, value_cache, seq, scale, out)
        return out

    @staticmethod
    def _decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                group: DecodeGroup, scale: float, out: torch.Tensor) -> None:
        keys = key_cache[group.slots].transpose(1, 2)  # [n, kv_heads, len, dim]
        values = value_cache[group.slots].transpose(1, 2)
        queries = q[group.token_index].unsqueeze(2)  # [n, heads, 1, dim]
        res = F.scaled_dot_product_attention(queries, keys.to(q.dtype), values.to(q.dtype),
                                             attn_mask=group.mask, scale=scale, enable_gqa=True)
        out[group.token_index] = res.squeeze(2)

    @staticmethod
    def _prefill(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 seq: PrefillSeq, scale: float, out: torch.Tensor) -> None:
        end = seq.query_start + seq.query_len
        queries = q[seq.query_start:end].transpose(0, 1).unsqueeze(0)
        keys = key_cache[seq.slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
        values = value_cache[seq.slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
        res = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=seq.mask, is_causal=seq.mask is None,
            scale=scale, enable_gqa=True)
        out[seq.query_start:end] = res.squeeze(0).transpose(0, 1)
