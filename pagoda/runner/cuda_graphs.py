"""CUDA graphs for decode-only steps, captured at startup over a ladder of padded batch
sizes. Replay copies the step's inputs into static buffers (each KV group's block tables and
slot mapping, stacked; on a pipeline stage after the first, the previous stage's hidden states
and residual); padded rows write nothing (slot -1) and attend nothing (query length 0). A
stage before the last captures its (hidden, residual) as the graph's outputs; the transfers
between stages stay outside the graphs."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from pagoda.layers.attention.backend import AttentionBackend
from pagoda.layers.attention.metadata import CommonAttentionMetadata, StepKVGroups
from pagoda.layers.parallel import WHOLE, PipelineStage
from pagoda.logger import get_logger

logger = get_logger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_num_seqs (which is always included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sorted(set(sizes + [max_num_seqs]))


class StaticInputs:
    """Device buffers a captured graph reads and writes; sized for the largest batch. Every
    KV group has its own block tables and slot mapping (rows of the stacked buffers).
    `intermediate`: the (hidden, residual) a stage after the first receives; `outputs`: the
    hidden states, and on a stage before the last the residual too."""

    def __init__(self, max_bs: int, max_blocks: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, num_kv_groups: int = 1,
                 stage: PipelineStage = WHOLE) -> None:
        i32, i64 = torch.int32, torch.int64

        def activations(count: int) -> tuple[torch.Tensor, ...]:
            return tuple(torch.zeros(max_bs, hidden_size, dtype=dtype, device=device)
                         for _ in range(count))

        self.input_ids = torch.zeros(max_bs, dtype=i64, device=device)
        self.positions = torch.zeros(max_bs, dtype=i64, device=device)
        self.slot_mapping = torch.full((num_kv_groups, max_bs), -1, dtype=i64, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=i32, device=device)
        self.seq_lens = torch.zeros(max_bs, dtype=i32, device=device)
        self.block_tables = torch.zeros(num_kv_groups, max_bs, max_blocks, dtype=i32,
                                        device=device)
        self.intermediate = None if stage.is_first else activations(2)
        self.outputs = activations(1 if stage.is_last else 2)

    def metadata(self, bs: int, max_seq_len: int,
                 block_size: int) -> list[CommonAttentionMetadata]:
        """Each KV group's metadata of a batch of bs decodes."""
        return [CommonAttentionMetadata(
            num_tokens=bs, num_seqs=bs, max_query_len=1, max_seq_len=max_seq_len,
            query_start_loc=self.query_start_loc[:bs + 1], seq_lens=self.seq_lens[:bs],
            block_tables=tables[:bs], slot_mapping=slots[:bs],
            query_start_loc_cpu=list(range(bs + 1)), seq_lens_cpu=[max_seq_len] * bs,
            block_size=block_size) for tables, slots in zip(self.block_tables, self.slot_mapping)]

    def load(self, n: int, bs: int, input_ids: torch.Tensor, positions: torch.Tensor,
             groups: StepKVGroups, intermediate: tuple[torch.Tensor, ...] | None = None) -> None:
        """Copy a real decode step of n sequences in; rows n..bs become inert padding."""
        attn = groups.metadata[0]
        if self.intermediate is not None:
            for static, received in zip(self.intermediate, intermediate, strict=True):
                static[:n].copy_(received, non_blocking=True)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:, :n].copy_(groups.slot_mapping, non_blocking=True)
        self.slot_mapping[:, n:bs].fill_(-1)
        self.query_start_loc[:n + 1].copy_(attn.query_start_loc, non_blocking=True)
        self.query_start_loc[n + 1:bs + 1].fill_(n)  # padded sequences have no queries
        self.seq_lens[:n].copy_(attn.seq_lens, non_blocking=True)
        self.seq_lens[n:bs].zero_()
        width = attn.block_tables.shape[1]
        self.block_tables[:, :n, :width].copy_(groups.block_tables, non_blocking=True)


class CudaGraphRunner:
    """Owns the captured graphs; run() replays the smallest one that fits the batch."""

    def __init__(self, model: nn.Module, backend: AttentionBackend, block_size: int,
                 max_num_seqs: int, max_model_len: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, num_kv_groups: int = 1,
                 stage: PipelineStage = WHOLE) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        max_blocks = -(-max_model_len // block_size)
        self.inputs = StaticInputs(self.sizes[-1], max_blocks, hidden_size, dtype, device,
                                   num_kv_groups, stage)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # each graph's capture-time metadata: its attention plans own the split-KV workspace
        # the graph writes to, which must live (and stay unshared) as long as the graph does
        self.graph_metadata: dict[int, Any] = {}
        self.pool = None

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        for bs in reversed(self.sizes):  # largest first: smaller ones reuse its memory pool
            self.graphs[bs], self.graph_metadata[bs] = self._capture_one(bs)
        torch.cuda.synchronize()
        logger.info("captured %d CUDA graphs (batch sizes %d..%d) in %.1fs", len(self.graphs),
                    self.sizes[0], self.sizes[-1], time.perf_counter() - start)

    def _capture_one(self, bs: int) -> tuple[torch.cuda.CUDAGraph, Any]:
        inputs = self.inputs
        attn = self.backend.build_group_metadata(
            inputs.metadata(bs, self.max_model_len, self.block_size))
        for _ in range(2):  # warm up: compile kernels outside the capture
            self._forward(bs, attn)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._forward(bs, attn)
        if self.pool is None:
            self.pool = graph.pool()
        return graph, attn

    def _forward(self, bs: int, attn: Any) -> None:
        """The model over the static inputs' first bs rows, into the static outputs."""
        inputs = self.inputs
        args = (inputs.input_ids[:bs], inputs.positions[:bs], attn)
        if inputs.intermediate is not None:
            args += (tuple(t[:bs] for t in inputs.intermediate),)
        out = self.model(*args)
        for static, value in zip(inputs.outputs, out if isinstance(out, tuple) else (out,),
                                 strict=True):
            static[:bs] = value

    def can_run(self, attn: CommonAttentionMetadata) -> bool:
        return attn.max_query_len == 1 and attn.num_seqs <= self.sizes[-1] \
            and attn.block_tables.shape[1] <= self.inputs.block_tables.shape[2]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, groups: StepKVGroups,
            intermediate: tuple[torch.Tensor, ...] | None = None
            ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Replay a decode step: the hidden states, or on a stage before the last its
        (hidden, residual), as views of the static outputs (the next replay overwrites
        them). `intermediate`: what a stage after the first received."""
        n = groups.metadata[0].num_seqs
        bs = next(s for s in self.sizes if s >= n)
        self.inputs.load(n, bs, input_ids, positions, groups, intermediate)
        self.graphs[bs].replay()
        outputs = tuple(t[:n] for t in self.inputs.outputs)
        return outputs[0] if len(outputs) == 1 else outputs
