"""The CUDA graphs' static buffers, on any device: a pipeline stage's received activations
land in the rows a replay reads, and each stage holds the outputs it hands on (the captures
and replays themselves run in tests/gpu)."""

from __future__ import annotations

import torch

from pagoda.layers.attention.metadata import CommonAttentionMetadata, StepKVGroups
from pagoda.layers.parallel import WHOLE, PipelineStage
from pagoda.runner.cuda_graphs import StaticInputs

HIDDEN, MAX_BS, MAX_BLOCKS, BLOCK = 8, 4, 3, 16


def buffers(stage: PipelineStage) -> StaticInputs:
    return StaticInputs(MAX_BS, MAX_BLOCKS, HIDDEN, torch.float32, torch.device("cpu"),
                        stage=stage)


def decode_groups(n: int) -> StepKVGroups:
    seq_lens = [5 + i for i in range(n)]
    return StepKVGroups.single(CommonAttentionMetadata(
        num_tokens=n, num_seqs=n, max_query_len=1, max_seq_len=max(seq_lens),
        query_start_loc=torch.arange(n + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.ones(n, 1, dtype=torch.int32),
        slot_mapping=torch.tensor([BLOCK + s - 1 for s in seq_lens]),
        query_start_loc_cpu=list(range(n + 1)), seq_lens_cpu=seq_lens, block_size=BLOCK))


def test_each_stage_holds_what_it_receives_and_hands_on():
    whole, first = buffers(WHOLE), buffers(PipelineStage(0, 3, 0, 1))
    middle, last = buffers(PipelineStage(1, 3, 1, 2)), buffers(PipelineStage(2, 3, 2, 3))
    assert whole.intermediate is None and first.intermediate is None
    assert len(middle.intermediate) == len(last.intermediate) == 2
    assert [len(b.outputs) for b in (whole, first, middle, last)] == [1, 2, 2, 1]
    assert all(t.shape == (MAX_BS, HIDDEN) for t in middle.intermediate + middle.outputs)


def test_a_load_puts_the_received_rows_before_the_padding():
    inputs = buffers(PipelineStage(1, 2, 1, 2))
    hidden, residual = torch.randn(2, HIDDEN), torch.randn(2, HIDDEN)
    inputs.load(2, 4, torch.tensor([3, 4]), torch.tensor([5, 6]), decode_groups(2),
                (hidden, residual))
    assert torch.equal(inputs.intermediate[0][:2], hidden)
    assert torch.equal(inputs.intermediate[1][:2], residual)
    assert inputs.slot_mapping[0].tolist() == [BLOCK + 4, BLOCK + 5, -1, -1]
    assert inputs.query_start_loc[:5].tolist() == [0, 1, 2, 2, 2]  # padding asks nothing
