"""The pure-torch paged backend equals dense causal attention on random paged layouts."""

from __future__ import annotations

import pytest
import torch

from pagoda.layers.attention.metadata import CommonAttentionMetadata
from pagoda.layers.attention.torch_ref import TorchAttentionBackend


def dense_attention(q, k, v, scale):
    """q [Lq, H, D] for the last Lq positions of k/v [L, KVH, D], causal."""
    lq, heads, _ = q.shape
    total, kv_heads, _ = k.shape
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    q_pos = torch.arange(total - lq, total).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(total).unsqueeze(0) > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).to(q.dtype)


def build_step(seqs, block_size, num_blocks, kv_heads, dim, generator):
    """seqs: (context_len, query_len) pairs. Returns metadata, cache and the full K/V."""
    cache = torch.randn(2, num_blocks, block_size, kv_heads, dim, generator=generator)
    free = torch.randperm(num_blocks - 1, generator=generator).add(1).tolist()
    tables, full_k, full_v, slots, qsl, lens = [], [], [], [], [0], []
    for context, query in seqs:
        total = context + query
        blocks = [free.pop() for _ in range(-(-total // block_size))]
        pos = torch.arange(total)
        seq_slots = torch.tensor(blocks)[pos // block_size] * block_size + pos % block_size
        k = torch.randn(total, kv_heads, dim, generator=generator)
        v = torch.randn(total, kv_heads, dim, generator=generator)
        flat = cache.flatten(1, 2)
        flat[0, seq_slots[:context]] = k[:context]  # the cached context is already written
        flat[1, seq_slots[:context]] = v[:context]
        tables.append(blocks)
        full_k.append(k)
        full_v.append(v)
        slots.append(seq_slots[context:])
        qsl.append(qsl[-1] + query)
        lens.append(total)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    meta = CommonAttentionMetadata(
        num_tokens=qsl[-1], num_seqs=len(seqs), max_query_len=max(q for _, q in seqs),
        max_seq_len=max(lens), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=table,
        slot_mapping=torch.cat(slots), query_start_loc_cpu=qsl, seq_lens_cpu=lens,
        block_size=block_size)
    return meta, cache, full_k, full_v


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (9, 3)])
def test_mixed_batch_matches_dense(block_size, heads, kv_heads):
    gen = torch.Generator().manual_seed(block_size * 100 + heads)
    dim = 16
    seqs = [(0, 1), (0, 13), (20, 1), (5, 7), (33, 1), (17, 30), (0, 2)]
    meta, cache, ks, vs = build_step(seqs, block_size, 256, kv_heads, dim, gen)
    q = torch.randn(meta.num_tokens, heads, dim, generator=gen)
    new_k = torch.cat([k[c:] for (c, _), k in zip(seqs, ks)])
    new_v = torch.cat([v[c:] for (c, _), v in zip(seqs, vs)])
    backend = TorchAttentionBackend()
    out = backend.forward(q, new_k, new_v, cache, backend.build_metadata(meta), dim ** -0.5)
    for i, ((context, query), k, v) in enumerate(zip(seqs, ks, vs)):
        rows = slice(meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1])
        torch.testing.assert_close(out[rows], dense_attention(q[rows], k, v, dim ** -0.5),
                                   rtol=1e-4, atol=1e-4)
    flat_k = cache[0].flatten(0, 1)
    torch.testing.assert_close(flat_k[meta.slot_mapping], new_k)  # new K/V were stored


def test_null_block_padding_is_harmless():
    """Padding slots of shorter decodes read the (zeroed) null block and are masked out."""
    gen = torch.Generator().manual_seed(0)
    meta, cache, ks, vs = build_step([(3, 1), (40, 1)], 4, 64, 2, 8, gen)
    cache[:, 0] = 0.0  # the runner zeroes the null block at startup
    q = torch.randn(2, 2, 8, generator=gen)
    backend = TorchAttentionBackend()
    out = backend.forward(q, torch.stack([ks[0][3], ks[1][40]]), torch.stack([vs[0][3], vs[1][40]]),
                          cache, backend.build_metadata(meta), 8 ** -0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0:1], dense_attention(q[0:1], ks[0], vs[0], 8 ** -0.5),
                               rtol=1e-4, atol=1e-4)
