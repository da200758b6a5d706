"""KV groups on CUDA: a graph replay with a static block table per group, local groups whose
stale table entries (blocks freed once out of the window) point at poisoned memory, and the
engine on a random Gemma 3 checkpoint (a full group and local groups) with graphs, eager and
torch backends, a KV budget that fits only with window freeing, and sleep/wake."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Gemma3TextConfig

from pagoda import LLM, SamplingParams
from pagoda.kv_cache.groups import group_layers
from pagoda.layers.attention.metadata import CommonAttentionMetadata, StepKVGroups
from pagoda.layers.attention.triton_backend import TritonAttentionBackend
from pagoda.models.arch.base import LayerAttention, layer_windows
from pagoda.runner.cuda_graphs import CudaGraphRunner
from tests.layers.test_triton_attention import make_batch, reference_attention
from tests.utils import save_random_checkpoint

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 4, 128, 16
WINDOWS = (None, 100, 100)  # a full group and two local groups of the same window


class OneLayerPerGroup(nn.Module):
    """Three layers sharing one KV slab (as a block of one slot holds one layer per group),
    each reading its own group's metadata; returns the outputs side by side."""

    def __init__(self, backend, rows, kv_slab, scale):
        super().__init__()
        self.backend, self.rows, self.kv_slab, self.scale = backend, rows, kv_slab, scale

    def forward(self, input_ids, positions, attn):
        n = input_ids.shape[0]
        outs = [self.backend.forward(q[:n], k[:n], v[:n], self.kv_slab, attn[g], self.scale,
                                     WINDOWS[g])
                for g, (q, k, v) in enumerate(self.rows)]
        return torch.cat(outs, dim=1).flatten(1)


def grouped_batch(contexts: list[int]):
    """One decode batch per group on disjoint blocks of one slab; a local group's entries
    for blocks wholly before its window point at a NaN-filled block (a freed block, reused)."""
    batches = [make_batch([(c, 1) for c in contexts], block_size=BLOCK, heads=HEADS,
                          kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=torch.bfloat16,
                          device="cuda", seed=10 + g) for g in range(len(WINDOWS))]
    per_batch = batches[0].kv_cache.shape[1]
    poison = torch.full_like(batches[0].kv_cache[:, :1], float("nan"))
    slab = torch.cat([b.kv_cache for b in batches] + [poison], dim=1)
    poisoned_id = slab.shape[1] - 1
    tables, slots = [], []
    for g, (batch, window) in enumerate(zip(batches, WINDOWS)):
        table = batch.meta.block_tables + g * per_batch
        table[batch.meta.block_tables == 0] = 0
        if window is not None:
            for i, c in enumerate(contexts):
                first_needed = max(c - window + 1, 0) // BLOCK
                table[i, :first_needed] = poisoned_id
        tables.append(table)
        slots.append(batch.meta.slot_mapping + g * per_batch * BLOCK)
    block_tables, slot_mapping = torch.stack(tables), torch.stack(slots)
    metas = tuple(CommonAttentionMetadata(
        num_tokens=b.meta.num_tokens, num_seqs=b.meta.num_seqs, max_query_len=1,
        max_seq_len=b.meta.max_seq_len, query_start_loc=b.meta.query_start_loc,
        seq_lens=b.meta.seq_lens, block_tables=block_tables[g], slot_mapping=slot_mapping[g],
        query_start_loc_cpu=b.meta.query_start_loc_cpu, seq_lens_cpu=b.meta.seq_lens_cpu,
        block_size=BLOCK) for g, b in enumerate(batches))
    return batches, slab, StepKVGroups(metas, block_tables, slot_mapping)


def test_replay_with_a_block_table_per_group():
    contexts = [300, 17, 120, 700]
    batches, slab, groups = grouped_batch(contexts)
    max_bs, n = 8, len(contexts)
    shapes = ((max_bs, HEADS, HEAD_DIM), (max_bs, KV_HEADS, HEAD_DIM),
              (max_bs, KV_HEADS, HEAD_DIM))
    rows = [[torch.zeros(s, dtype=torch.bfloat16, device="cuda") for s in shapes]
            for _ in WINDOWS]
    backend = TritonAttentionBackend()
    scale = HEAD_DIM ** -0.5
    model = OneLayerPerGroup(backend, rows, slab, scale)
    runner = CudaGraphRunner(model, backend, BLOCK, max_num_seqs=max_bs, max_model_len=1024,
                             hidden_size=len(WINDOWS) * HEADS * HEAD_DIM, dtype=torch.bfloat16,
                             device=torch.device("cuda"), num_kv_groups=len(WINDOWS))
    runner.capture()
    for layer_rows, batch in zip(rows, batches):
        for t, src in zip(layer_rows, (batch.q, batch.k, batch.v)):
            t[:n].copy_(src)
    out = runner.run(torch.zeros(n, dtype=torch.long, device="cuda"),
                     torch.tensor(contexts, device="cuda"), groups).clone()
    torch.cuda.synchronize()
    assert not out.isnan().any(), "a replay read a block out of its window"
    out = out.view(n, len(WINDOWS), HEADS, HEAD_DIM)
    flat = slab.flatten(1, 2)
    for g, (batch, window) in enumerate(zip(batches, WINDOWS)):
        for i, c in enumerate(contexts):
            slot = groups.slot_mapping[g, i]
            assert torch.equal(flat[0, slot], batch.k[i]), "new K not stored in its group"
            expected = reference_attention(batch.q[i:i + 1], batch.keys[i], batch.values[i],
                                           scale, window=window)
            torch.testing.assert_close(out[i, g].view(1, HEADS, HEAD_DIM).float(), expected,
                                       atol=2e-2, rtol=2e-2)


GEMMA = Gemma3TextConfig(
    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
    hidden_size=256, intermediate_size=512, vocab_size=4096, max_position_embeddings=4096,
    sliding_window=64, sliding_window_pattern=4, initializer_range=0.1)
PROMPTS = [[(7 * i + 3 * j) % 4000 + 5 for j in range(n)] for i, n in
           enumerate((3, 17, 64, 200, 511, 1000, 9, 333))]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return str(save_random_checkpoint(GEMMA, tmp_path_factory.mktemp("gpu-gemma3"), None))


def greedy(llm: LLM, n: int = 48) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [o.outputs[0].token_ids for o in outs]


def make(checkpoint: str, **kwargs) -> LLM:
    kwargs = {"kv_cache_memory": 256 << 20, "dtype": "float32", **kwargs}
    return LLM(checkpoint, device="cuda", max_num_seqs=16, max_num_batched_tokens=256,
               max_model_len=2048, **kwargs)


def test_gemma3_graphs_equal_eager_and_the_torch_backend(gemma):
    graphed = make(gemma)
    runner = graphed.engine.core.executor.worker.runner
    assert runner.graphs is not None and runner.kv_layout.windows == (None, 64, 64, 64)
    expected = greedy(make(gemma, enforce_eager=True))
    assert greedy(graphed) == expected
    assert greedy(make(gemma, attention_backend="torch")) == expected
    kv = graphed.engine.core.kv_manager
    assert kv.num_free_blocks == kv.pool.num_usable_blocks


def test_gemma3_fits_a_budget_only_with_window_freeing(gemma):
    """A budget of exactly the blocks the batch holds at most with window freeing: no
    preemption, the same tokens, while the running requests' full tables would not fit."""
    reference = greedy(make(gemma))
    layout = group_layers([LayerAttention(GEMMA.num_key_value_heads, GEMMA.head_dim, w)
                           for w in layer_windows(GEMMA)])
    block_bytes = 2 * layout.slots * layout.num_kv_heads * layout.head_dim * 16 * 4
    needed = sum(layout.blocks_per_seq(len(p) + 48, 256, 16) for p in PROMPTS)
    tight = make(gemma, kv_cache_memory=(needed + 1) * block_bytes)
    core = tight.engine.core
    peaks = track_unfreed_blocks(core)
    assert greedy(tight) == reference
    assert core.scheduler.num_preemptions == 0
    assert max(peaks) > core.kv_manager.pool.num_usable_blocks


def track_unfreed_blocks(core) -> list[int]:
    """After every schedule: the blocks the running requests would hold if no group freed any."""
    peaks, schedule, kv = [], core.scheduler.schedule, core.kv_manager

    def tracked():
        out = schedule()
        peaks.append(sum(len(t[0]) * len(t) for t in kv.req_blocks.values()))
        return out
    core.scheduler.schedule = tracked
    return peaks


def test_gemma3_sleep_and_wake_keep_graph_outputs(gemma):
    llm = make(gemma)
    before = greedy(llm, 16)
    llm.engine.core.sleep()
    llm.engine.core.wake_up()
    assert greedy(llm, 16) == before
