"""Per-step attention inputs shared by every backend (built once, read by every layer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class CommonAttentionMetadata:
    """A flat batch: sequence i owns query tokens [query_start_loc[i], query_start_loc[i+1]),
    has seq_lens[i] tokens in total after this step, and its KV lives in block_tables[i]."""

    num_tokens: int
    num_seqs: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, device
    seq_lens: torch.Tensor  # [num_seqs] int32, device
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, device
    slot_mapping: torch.Tensor  # [num_tokens] int64, device; where each new K/V is written
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    block_size: int

    @property
    def query_lens_cpu(self) -> list[int]:
        q = self.query_start_loc_cpu
        return [q[i + 1] - q[i] for i in range(self.num_seqs)]


@dataclass(slots=True)
class StepKVGroups:
    """One step's metadata for each KV group (they differ only in block tables and slot
    mappings, stacked here [groups, ...] so that a CUDA graph replay copies them at once).
    A model's forward gets each group's backend metadata, in group order; an attention
    layer reads the entry of its group."""

    metadata: tuple[CommonAttentionMetadata, ...]
    # [groups, num_seqs, max_blocks] int32 and [groups, num_tokens] int64, device; with one
    # group, its own tables and slots (what a copy into [1, ...] buffers broadcasts)
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor

    @classmethod
    def single(cls, common: CommonAttentionMetadata) -> StepKVGroups:
        """The groups of a model with one KV group."""
        return cls((common,), common.block_tables, common.slot_mapping)
