"""CudaGraphRunner: replays stay correct after the capture's temporaries are gone and their
memory has been handed out again (a graph must own every buffer it writes)."""

from __future__ import annotations

import gc

import torch
from torch import nn

from pagoda.layers.attention.metadata import StepKVGroups
from pagoda.layers.attention.triton_backend import TritonAttentionBackend
from pagoda.runner.cuda_graphs import CudaGraphRunner
from tests.layers.test_triton_attention import make_batch, reference_attention

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
SENTINEL = 7.0


class AttentionOnly(nn.Module):
    """A one-layer model for graph tests: store + paged attention of fixed q/k/v rows."""

    def __init__(self, backend, q, k, v, kv_cache, scale):
        super().__init__()
        self.backend, self.q, self.k, self.v = backend, q, k, v
        self.kv_cache, self.scale = kv_cache, scale

    def forward(self, input_ids, positions, attn):
        n = input_ids.shape[0]
        out = self.backend.forward(self.q[:n], self.k[:n], self.v[:n], self.kv_cache, attn[0],
                                   self.scale)
        return out.flatten(1)


def test_replay_writes_only_memory_the_graphs_own():
    contexts = [300, 17, 120]
    batch = make_batch([(c, 1) for c in contexts], block_size=BLOCK, heads=HEADS,
                       kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=torch.bfloat16,
                       device="cuda", seed=4)
    max_bs = 16  # every size up to 16 splits KV on a data-centre GPU: each has a workspace
    q = torch.zeros(max_bs, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    k = torch.zeros(max_bs, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
    v = torch.zeros_like(k)
    backend = TritonAttentionBackend()
    scale = HEAD_DIM ** -0.5
    model = AttentionOnly(backend, q, k, v, batch.kv_cache, scale)
    runner = CudaGraphRunner(model, backend, BLOCK, max_num_seqs=max_bs, max_model_len=512,
                             hidden_size=HEADS * HEAD_DIM, dtype=torch.bfloat16,
                             device=torch.device("cuda"))
    runner.capture()
    gc.collect()
    # take back whatever capture freed, in the shapes split-KV workspaces have
    sentinels = [torch.full(shape, SENTINEL, device="cuda")
                 for bs in runner.sizes for segments in (2, 4, 8, 16)
                 for shape in ((bs, HEADS, segments), (bs, HEADS, segments),
                               (bs, HEADS, segments, HEAD_DIM))]

    n = len(contexts)
    for t, src in ((q, batch.q), (k, batch.k), (v, batch.v)):
        t[:n].copy_(src)
    out = runner.run(torch.zeros(n, dtype=torch.long, device="cuda"),
                     torch.tensor(contexts, device="cuda"),
                     StepKVGroups.single(batch.meta)).clone()
    torch.cuda.synchronize()

    assert all(bool((s == SENTINEL).all()) for s in sentinels), "a replay wrote freed memory"
    for i in range(n):
        expected = reference_attention(batch.q[i:i + 1], batch.keys[i], batch.values[i], scale)
        torch.testing.assert_close(out[i].view(1, HEADS, HEAD_DIM).float(), expected,
                                   atol=2e-2, rtol=2e-2)


class WindowAndFull(nn.Module):
    """Two layers of one graph, as in Gemma 3: a sliding-window layer, then a full one, each
    with its own cache and q/k/v rows; returns both outputs side by side."""

    def __init__(self, backend, rows, caches, scale, window):
        super().__init__()
        self.backend, self.rows, self.caches = backend, rows, caches
        self.scale, self.windows = scale, (window, None)

    def forward(self, input_ids, positions, attn):
        n = input_ids.shape[0]
        outs = [self.backend.forward(q[:n], k[:n], v[:n], cache, attn[0], self.scale, window)
                for (q, k, v), cache, window in zip(self.rows, self.caches, self.windows)]
        return torch.cat(outs, dim=1).flatten(1)


def test_replay_mixes_window_and_full_layers():
    """The runner captures both layers' plans (each with its own split workspace) in one
    graph; a replay equals dense attention with and without the window."""
    window, contexts = 100, [300, 17, 120]
    batch = make_batch([(c, 1) for c in contexts], block_size=BLOCK, heads=HEADS,
                       kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=torch.bfloat16,
                       device="cuda", seed=6)
    full_cache = torch.randn_like(batch.kv_cache)
    full_cache[:, 0] = 0.0
    max_bs, n = 8, len(contexts)
    shapes = ((max_bs, HEADS, HEAD_DIM), (max_bs, KV_HEADS, HEAD_DIM), (max_bs, KV_HEADS, HEAD_DIM))
    rows = [[torch.zeros(s, dtype=torch.bfloat16, device="cuda") for s in shapes]
            for _ in range(2)]
    new_rows = [(batch.q, batch.k, batch.v),
                tuple(torch.randn_like(t) for t in (batch.q, batch.k, batch.v))]
    backend = TritonAttentionBackend()
    scale = HEAD_DIM ** -0.5
    model = WindowAndFull(backend, rows, [batch.kv_cache, full_cache], scale, window)
    runner = CudaGraphRunner(model, backend, BLOCK, max_num_seqs=max_bs, max_model_len=1024,
                             hidden_size=2 * HEADS * HEAD_DIM, dtype=torch.bfloat16,
                             device=torch.device("cuda"))
    runner.capture()
    for layer_rows, src in zip(rows, new_rows):
        for t, s in zip(layer_rows, src):
            t[:n].copy_(s)
    out = runner.run(torch.zeros(n, dtype=torch.long, device="cuda"),
                     torch.tensor(contexts, device="cuda"),
                     StepKVGroups.single(batch.meta)).clone()
    torch.cuda.synchronize()
    out = out.view(n, 2, HEADS, HEAD_DIM)
    for layer, ((q, k, v), cache, w) in enumerate(zip(new_rows, model.caches, model.windows)):
        flat = cache.flatten(1, 2)
        for i, c in enumerate(contexts):
            pos = torch.arange(c + 1, device="cuda")
            slots = batch.meta.block_tables[i, pos // BLOCK].long() * BLOCK + pos % BLOCK
            keys, values = flat[0, slots], flat[1, slots]
            assert torch.equal(keys[-1], k[i]), "new K not stored"
            expected = reference_attention(q[i:i + 1], keys, values, scale, window=w)
            torch.testing.assert_close(out[i, layer].view(1, HEADS, HEAD_DIM).float(), expected,
                                       atol=2e-2, rtol=2e-2)
