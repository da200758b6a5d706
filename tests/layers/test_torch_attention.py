"""The pure-torch paged backend equals dense causal attention on random paged layouts, its
decodes on CPU through pagoda's decode-attention kernel and through torch's SDPA; a CPU
plan's static decode metadata gives what the step's own does."""

from __future__ import annotations

import pytest
import torch

from pagoda.layers.attention import cpu_decode_attention
from pagoda.layers.attention.metadata import CommonAttentionMetadata
from pagoda.layers.attention.torch_ref import (
    TorchAttentionBackend,
    fill_decode_firsts,
    static_decode_metadata,
)


@pytest.fixture(autouse=True, params=["kernel", "sdpa"])
def decode_path(request, monkeypatch):
    """Each CPU path of decodes: the kernel (skipped where it does not build) and the gather
    into a padded copy with one SDPA call (PAGODA_CPU_DECODE_ATTENTION=0)."""
    if request.param == "sdpa":
        monkeypatch.setenv(cpu_decode_attention.VARIABLE, "0")
    cpu_decode_attention._library.cache_clear()
    if request.param == "kernel" and cpu_decode_attention._library() is None:
        pytest.skip("the CPU decode-attention kernel does not build here")
    yield request.param
    cpu_decode_attention._library.cache_clear()


def hf_visible(q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """transformers' own mask functions (the oracle of the semantics) on index grids."""
    from transformers.masking_utils import (
        causal_mask_function,
        sliding_window_causal_mask_function,
    )
    fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    return fn(0, 0, q_pos, kv_pos)


def dense_attention(q, k, v, scale, window=None):
    """q [Lq, H, D] for the last Lq positions of k/v [L, KVH, D], causal (and windowed)."""
    lq, heads, _ = q.shape
    total, kv_heads, _ = k.shape
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    q_pos = torch.arange(total - lq, total).unsqueeze(1)
    visible = hf_visible(q_pos, torch.arange(total).unsqueeze(0), window)
    scores = scores.masked_fill(~visible, float("-inf"))
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


def test_a_decode_only_step_matches_dense_from_a_strided_q():
    """Every token a decode: the backend reads q (a view into a fused qkv, as the models
    pass it) and writes its output without index copies; the same values as dense."""
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, dim = 9, 3, 64
    seqs = [(0, 1), (20, 1), (33, 1), (47, 1)]
    meta, cache, ks, vs = build_step(seqs, 16, 64, kv_heads, dim, gen)
    qkv = torch.randn(len(seqs), (heads + 2 * kv_heads) * dim, generator=gen)
    q = qkv[:, :heads * dim].view(len(seqs), heads, dim)
    backend = TorchAttentionBackend()
    metadata = backend.build_metadata(meta)
    out = backend.forward(q, torch.stack([k[-1] for k in ks]), torch.stack([v[-1] for v in vs]),
                          cache, metadata, dim ** -0.5)
    assert metadata.gathers(None).decodes.whole_batch
    for i, (k, v) in enumerate(zip(ks, vs)):
        torch.testing.assert_close(out[i:i + 1], dense_attention(q[i:i + 1], k, v, dim ** -0.5),
                                   rtol=1e-4, atol=1e-4)


def test_a_mixed_steps_decodes_are_not_the_whole_batch():
    meta, _, _, _ = build_step([(5, 1), (0, 3)], 16, 16, 2, 16, torch.Generator().manual_seed(0))
    gathers = TorchAttentionBackend().build_metadata(meta).gathers(None)
    assert not gathers.decodes.whole_batch


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


def _poison_invisible(cache, meta, seqs, window):
    """inf into every cached K/V no query of its sequence may see: a read of one shows."""
    flat = cache.flatten(1, 2)
    for i, (context, _) in enumerate(seqs):
        first = max(0, context - window + 1)
        pos = torch.arange(first)
        slots = meta.block_tables[i, pos // meta.block_size].long() * meta.block_size \
            + pos % meta.block_size
        flat[:, slots] = float("inf")


def _check_window_step(seqs, window, block_size, heads, kv_heads, seed, windows=()):
    """One step's metadata serves layers of several windows; each equals the dense oracle."""
    gen = torch.Generator().manual_seed(seed)
    dim = 16
    meta, cache, ks, vs = build_step(seqs, block_size, 512, kv_heads, dim, gen)
    q = torch.randn(meta.num_tokens, heads, dim, generator=gen)
    new_k = torch.cat([k[c:] for (c, _), k in zip(seqs, ks)])
    new_v = torch.cat([v[c:] for (c, _), v in zip(seqs, vs)])
    _poison_invisible(cache, meta, seqs, window)
    backend = TorchAttentionBackend()
    attn_meta = backend.build_metadata(meta)
    for w in (window, *windows):
        out = backend.forward(q, new_k, new_v, cache, attn_meta, dim ** -0.5, sliding_window=w)
        for i, ((context, query), k, v) in enumerate(zip(seqs, ks, vs)):
            rows = slice(meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1])
            torch.testing.assert_close(out[rows], dense_attention(q[rows], k, v, dim ** -0.5, w),
                                       rtol=1e-4, atol=1e-4, msg=lambda m: f"window {w}: {m}")
    assert set(attn_meta.windows) == {window, *windows}  # one gather per window


WINDOW_STEPS = {
    "prefill_longer_than_window": [(0, 40)],
    "chunk_context_past_window": [(30, 12), (9, 5)],
    "decode": [(40, 1), (3, 1), (7, 1), (8, 1), (100, 1)],
    "mixed": [(0, 40), (30, 12), (40, 1), (3, 1), (0, 2), (7, 9), (100, 1)],
}


@pytest.mark.parametrize("window", [1, 5, 8, 16])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("step", list(WINDOW_STEPS))
def test_sliding_window_matches_dense(step, block_size, window):
    """Keys before the window are masked and never read (their slots hold inf)."""
    _check_window_step(WINDOW_STEPS[step], window, block_size, 8, 2, seed=block_size + window)


def test_window_and_full_layers_share_one_step():
    """Full (None) and windowed layers, and a window wider than every sequence, on one
    metadata object; a window wider than the context equals full attention."""
    _check_window_step(WINDOW_STEPS["mixed"], 300, 4, 9, 3, seed=1, windows=(None, 8, 1000))


def test_window_semantics_match_transformers():
    """The query at position p sees exactly the keys at (p - window, p]."""
    from tests.layers.test_triton_attention import visible_mask
    q_pos = torch.arange(40).unsqueeze(1)
    kv_pos = torch.arange(40).unsqueeze(0)
    for window in (None, 1, 2, 7, 16, 64):
        expected = hf_visible(q_pos, kv_pos, window)
        assert torch.equal(visible_mask(q_pos, kv_pos, window), expected)
        if window is not None:
            assert torch.equal(expected, (kv_pos <= q_pos) & (q_pos - kv_pos < window))
            assert int(expected[39].sum()) == min(window, 40)  # counting the query itself


def test_layer_passes_its_window_and_its_kv_groups_metadata():
    """Attention(sliding_window=W) hands W to its backend on every call, with the step
    metadata of the KV group it is bound to; W < 1 is refused."""
    from pagoda.layers.attention.layer import Attention
    calls = []

    class Recorder(TorchAttentionBackend):
        def forward_rotary(self, positions, q, k, v, rotary, kv_cache, metadata, scale,
                           sliding_window=None, qk_norm=None, kv_scales=None):
            calls.append((sliding_window, metadata))
            return q
    for group, window in ((0, None), (1, 512)):
        layer = Attention(4, 2, 8, 0.5, sliding_window=window)
        layer.kv_cache, layer.backend = torch.zeros(2, 1, 1, 2, 8), Recorder()
        layer.kv_group = group
        layer(torch.zeros(3, 32), torch.zeros(3, 16), torch.zeros(3, 16), ["full", "local"],
              torch.zeros(3, dtype=torch.long), None)
    assert calls == [(None, "full"), (512, "local")]
    with pytest.raises(ValueError, match="sliding_window"):
        Attention(4, 2, 8, 0.5, sliding_window=0)


def test_a_scaled_float8_cache_holds_k_and_v_divided_and_reads_them_back():
    """With a checkpoint's KV scales the cache holds K / k and V / v in float8; attention is
    that over k (K / k) and v (V / v): the dense attention of those values. With values
    beyond float8's range (448), only the scales keep them."""
    from pagoda.layers.attention.backend import KVScales
    gen = torch.Generator().manual_seed(5)
    fp8, scales, dim = torch.float8_e4m3fn, KVScales(k=8.0, v=2.0), 16
    seqs = [(20, 1), (0, 9), (33, 1)]
    meta, cache, ks, vs = build_step(seqs, 16, 64, 2, dim, gen)
    ks, vs = [k * 600 for k in ks], [v * 300 for v in vs]  # up to ~2000 and ~1000
    flat = cache.flatten(1, 2)
    for (context, _), k, v, slots in zip(seqs, ks, vs, _context_slots(meta, seqs)):
        flat[0, slots] = k[:context]
        flat[1, slots] = v[:context]
    q = torch.randn(meta.num_tokens, 4, dim, generator=gen) * 0.05
    new_k = torch.cat([k[c:] for (c, _), k in zip(seqs, ks)])
    new_v = torch.cat([v[c:] for (c, _), v in zip(seqs, vs)])
    held = torch.stack([(cache[0] / scales.k).to(fp8), (cache[1] / scales.v).to(fp8)])
    backend = TorchAttentionBackend()
    out = backend.forward(q, new_k, new_v, held, backend.build_metadata(meta), dim ** -0.5,
                          kv_scales=scales)
    stored = held.flatten(1, 2)[:, meta.slot_mapping].float()
    assert torch.equal(stored[0], (new_k / scales.k).to(fp8).float())
    assert torch.equal(stored[1], (new_v / scales.v).to(fp8).float())
    for i, ((context, query), k, v) in enumerate(zip(seqs, ks, vs)):
        rows = slice(meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1])
        k_held = (k / scales.k).to(fp8).float() * scales.k
        v_held = (v / scales.v).to(fp8).float() * scales.v
        torch.testing.assert_close(out[rows], dense_attention(q[rows], k_held, v_held,
                                                              dim ** -0.5),
                                   rtol=1e-4, atol=1e-3)
    unscaled = backend.forward(q, new_k, new_v, torch.stack([c.to(fp8) for c in cache]),
                               backend.build_metadata(meta), dim ** -0.5)
    assert not torch.allclose(unscaled, out, rtol=0.05, atol=1.0), "448 held them anyway"


def _context_slots(meta, seqs):
    """Each sequence's context slots (the positions before its new tokens)."""
    for i, (context, _) in enumerate(seqs):
        table = meta.block_tables[i].long()
        pos = torch.arange(context)
        yield table[pos // meta.block_size] * meta.block_size + pos % meta.block_size


def test_the_layer_hands_its_kv_scales_to_a_float8_cache_only():
    from pagoda.layers.attention.backend import UNIT_SCALES, KVScales
    from pagoda.layers.attention.layer import Attention
    seen = []

    class Recorder(TorchAttentionBackend):
        def forward_rotary(self, positions, q, k, v, rotary, kv_cache, metadata, scale,
                           sliding_window=None, qk_norm=None, kv_scales=UNIT_SCALES):
            seen.append(kv_scales)
            return q
    layer = Attention(4, 2, 8, 0.5)
    layer.load_kv_scale("k", torch.tensor(0.5), "k_scale")
    layer.load_kv_scale("v", torch.tensor([0.25]), "v_scale")
    assert layer.kv_scales == KVScales(0.5, 0.25) and "kv_scales=(0.5, 0.25)" in repr(layer)
    layer.backend = Recorder()
    for dtype in (torch.float8_e4m3fn, torch.float32):
        layer.kv_cache = torch.zeros(2, 1, 1, 2, 8, dtype=dtype)
        layer(torch.zeros(3, 32), torch.zeros(3, 16), torch.zeros(3, 16), ["meta"],
              torch.zeros(3, dtype=torch.long), None)
    assert seen == [KVScales(0.5, 0.25), UNIT_SCALES]


def test_a_per_head_kv_scale_serves_every_head_by_its_largest():
    from pagoda.layers.attention.layer import Attention
    layer = Attention(4, 2, 8, 0.5)
    layer.load_kv_scale("k", torch.tensor([0.1, 0.3]), "k_scale")
    assert layer.kv_scales.k == pytest.approx(0.3) and layer.kv_scales.v == 1.0


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_kv_scale_must_be_positive_and_finite(bad):
    from pagoda.errors import UnsupportedModelError
    from pagoda.layers.attention.layer import Attention
    with pytest.raises(UnsupportedModelError, match="model.layers.3.self_attn.v_scale"):
        Attention(4, 2, 8, 0.5).load_kv_scale("v", torch.tensor(bad),
                                              "model.layers.3.self_attn.v_scale")


@pytest.mark.parametrize("window", [None, 1, 8, 30])
def test_static_decode_metadata_reads_what_the_steps_own_does(decode_path, window):
    """The buffers a CPU plan refills (its firsts set by fill_decode_firsts) give the same
    output, bit for bit, as the metadata built from the step; the kernel path only."""
    if decode_path == "sdpa":
        pytest.skip("static decode metadata is for the decode-attention kernel")
    gen = torch.Generator().manual_seed(11)
    seqs = [(40, 1), (3, 1), (7, 1), (100, 1)]
    meta, cache, ks, vs = build_step(seqs, 4, 128, 2, 16, gen)
    q = torch.randn(len(seqs), 8, 16, generator=gen)
    new_k, new_v = torch.stack([k[-1] for k in ks]), torch.stack([v[-1] for v in vs])
    backend = TorchAttentionBackend()
    expected = backend.forward(q, new_k, new_v, cache.clone(), backend.build_metadata(meta),
                               0.25, sliding_window=window)
    firsts = {None: torch.zeros(len(seqs), dtype=torch.int32)}
    if window is not None:
        firsts[window] = torch.full((len(seqs),), -1, dtype=torch.int32)
    fill_decode_firsts(firsts, meta.seq_lens)
    if window is not None:
        assert firsts[window].tolist() == [max(0, n - window) for n in meta.seq_lens_cpu]
    static = static_decode_metadata(meta, firsts)
    got = backend.forward(q, new_k, new_v, cache.clone(), static, 0.25, sliding_window=window)
    assert torch.equal(got, expected)
