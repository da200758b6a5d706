"""The Triton attention kernels (KV store, unified, split-KV) equal dense causal attention and
the torch_ref backend on random paged layouts (full and sliding-window), run on CPU by
Triton's interpreter.

TRITON_INTERPRET=1 must be set before triton is first imported, so the kernel checks run in
one subprocess (`python -m tests.layers.test_triton_attention`, which prints a JSON verdict
per case) and each case is a pytest test asserting its verdict. The batch builders and checks
here are shared with tests/gpu/test_triton_attention.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pagoda.layers.attention.metadata import CommonAttentionMetadata

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULT_MARKER = "TRITON-INTERPRETER-RESULTS "


@dataclass
class Batch:
    """A step: new q/k/v of every sequence, a paged cache holding their cached context, and
    the full per-sequence K/V (context + new) the reference attends over."""

    meta: CommonAttentionMetadata
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, kv_heads, dim]
    q: torch.Tensor  # [tokens (+ padding), heads, dim]
    k: torch.Tensor  # [tokens (+ padding), kv_heads, dim]
    v: torch.Tensor
    keys: list[torch.Tensor]  # per sequence [seq_len, kv_heads, dim]
    values: list[torch.Tensor]

    @property
    def num_real_tokens(self) -> int:
        return self.meta.query_start_loc_cpu[-1]


def make_batch(seqs: list[tuple[int, int]], *, block_size: int, heads: int, kv_heads: int,
               head_dim: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
               seed: int = 0, pad_tokens: int = 0) -> Batch:
    """seqs: (cached context, new query tokens) per sequence. The cache is filled with random
    values (the context is whatever its slots hold); padding tokens get slot -1."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)
    blocks_per_seq = [-(-(c + n) // block_size) for c, n in seqs]
    num_blocks = 1 + sum(blocks_per_seq) + 4
    kv_cache = randn(2, num_blocks, block_size, kv_heads, head_dim)
    kv_cache[:, 0] = 0.0  # the null block
    order = torch.randperm(num_blocks - 1, generator=gen, device=device) + 1
    width = max(blocks_per_seq)
    tables = torch.zeros(len(seqs), width, dtype=torch.int32, device=device)
    flat = kv_cache.flatten(1, 2)
    keys, values, new_k, new_v, slots, qsl, lens, used = [], [], [], [], [], [0], [], 0
    for i, (context, query) in enumerate(seqs):
        total = context + query
        blocks = order[used:used + blocks_per_seq[i]]
        used += blocks_per_seq[i]
        tables[i, :len(blocks)] = blocks.int()
        pos = torch.arange(total, device=device)
        seq_slots = blocks[pos // block_size].long() * block_size + pos % block_size
        k, v = randn(query, kv_heads, head_dim), randn(query, kv_heads, head_dim)
        keys.append(torch.cat([flat[0, seq_slots[:context]], k]))
        values.append(torch.cat([flat[1, seq_slots[:context]], v]))
        new_k.append(k)
        new_v.append(v)
        slots.append(seq_slots[context:])
        qsl.append(qsl[-1] + query)
        lens.append(total)
    num_tokens = qsl[-1] + pad_tokens
    slots.append(torch.full((pad_tokens,), -1, dtype=torch.long, device=device))
    new_k.append(randn(pad_tokens, kv_heads, head_dim))
    new_v.append(randn(pad_tokens, kv_heads, head_dim))
    meta = CommonAttentionMetadata(
        num_tokens=num_tokens, num_seqs=len(seqs), max_query_len=max(n for _, n in seqs),
        max_seq_len=max(lens), query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device), block_tables=tables,
        slot_mapping=torch.cat(slots), query_start_loc_cpu=qsl, seq_lens_cpu=lens,
        block_size=block_size)
    return Batch(meta, kv_cache, randn(num_tokens, heads, head_dim), torch.cat(new_k),
                 torch.cat(new_v), keys, values)


def visible_mask(q_pos: torch.Tensor, kv_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys each query sees: causal, and with a window W only kv in (q - W, q]
    (checked against transformers' mask functions in test_torch_attention)."""
    visible = kv_pos <= q_pos
    return visible if window is None else visible & (kv_pos > q_pos - window)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                        chunk: int = 512, window: int | None = None) -> torch.Tensor:
    """Dense causal (optionally sliding-window) attention of q [Lq, H, D] as the last Lq
    positions of k/v [L, KVH, D]; float64 on CPU, float32 on GPU, queries in chunks to bound
    memory."""
    acc_dtype = torch.float64 if q.device.type == "cpu" else torch.float32
    lq, heads, _ = q.shape
    total, kv_heads, _ = k.shape
    k = k.to(acc_dtype).repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
    v = v.to(acc_dtype).repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
    out = torch.empty(lq, heads, q.shape[2], dtype=acc_dtype, device=q.device)
    key_pos = torch.arange(total, device=q.device)
    for start in range(0, lq, chunk):
        qc = q[start:start + chunk].to(acc_dtype).transpose(0, 1)  # [H, c, D]
        scores = qc @ k.transpose(1, 2) * scale
        q_pos = torch.arange(start, start + qc.shape[1], device=q.device) + (total - lq)
        visible = visible_mask(q_pos[:, None], key_pos[None, :], window)
        scores.masked_fill_(~visible[None], float("-inf"))
        out[start:start + qc.shape[1]] = (scores.softmax(-1) @ v).transpose(0, 1)
    return out


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """Kernel output vs the fp32/fp64 reference on the same (rounded) inputs."""
    return {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=5e-3, rtol=5e-3),
            torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}[dtype]


def run_triton(batch: Batch, scale: float, num_segments: int | None = None,
               config=None, window: int | None = None) -> torch.Tensor:
    """Store the new K/V and attend with the Triton kernels (config overrides the tile shape)."""
    from pagoda.layers.attention.triton_backend import TritonAttentionBackend
    from pagoda.layers.attention.triton_kv_store import store_kv
    from pagoda.layers.attention.triton_unified import plan_attention, unified_attention
    if config is None:
        backend = TritonAttentionBackend(num_segments=num_segments)
        return backend.forward(batch.q, batch.k, batch.v, batch.kv_cache,
                               backend.build_metadata(batch.meta), scale, window)
    meta, (_, heads, dim), kv_heads = batch.meta, batch.q.shape, batch.k.shape[1]
    store_kv(batch.k, batch.v, batch.kv_cache[0], batch.kv_cache[1], meta.slot_mapping)
    plan = plan_attention(heads, kv_heads, dim, meta.query_lens_cpu, meta.max_seq_len, 132,
                          num_segments, config, batch.q.dtype, sliding_window=window)
    return unified_attention(batch.q, batch.kv_cache[0], batch.kv_cache[1], meta.query_start_loc,
                             meta.seq_lens, meta.block_tables, scale, meta.num_seqs, plan,
                             sliding_window=window)


def dense_outputs(batch: Batch, scale: float, window: int | None = None) -> list[torch.Tensor]:
    """The reference output rows of each sequence."""
    qsl = batch.meta.query_start_loc_cpu
    return [reference_attention(batch.q[qsl[i]:qsl[i + 1]], keys, values, scale, window=window)
            for i, (keys, values) in enumerate(zip(batch.keys, batch.values))]


def poison_out_of_window(batch: Batch, window: int) -> None:
    """inf into each sequence's cached K/V that none of its queries sees (positions before
    context - window + 1): the kernels must not read them (0 * inf would show as NaN).
    The reference keeps the original values in batch.keys/values."""
    meta, flat = batch.meta, batch.kv_cache.flatten(1, 2)
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        q_len = meta.query_start_loc_cpu[i + 1] - meta.query_start_loc_cpu[i]
        pos = torch.arange(max(0, seq_len - q_len - window + 1), device=flat.device)
        table = meta.block_tables[i].long()
        flat[:, table[pos // meta.block_size] * meta.block_size + pos % meta.block_size] = \
            float("inf")


def check_against_dense(batch: Batch, out: torch.Tensor, scale: float,
                        expected_rows: list[torch.Tensor] | None = None,
                        window: int | None = None) -> float:
    """Assert each sequence's rows equal dense attention; returns the max abs error."""
    worst = 0.0
    qsl = batch.meta.query_start_loc_cpu
    expected_rows = expected_rows or dense_outputs(batch, scale, window)
    for i, expected in enumerate(expected_rows):
        if expected.numel() == 0:  # a padding sequence without queries
            continue
        got = out[qsl[i]:qsl[i + 1]].to(expected.dtype)
        torch.testing.assert_close(got, expected, **tolerance(batch.q.dtype),
                                   msg=lambda m, i=i: f"sequence {i}: {m}")
        worst = max(worst, (got - expected).abs().max().item())
    return worst


def check_cache_written(batch: Batch, before: torch.Tensor) -> None:
    """The cache equals `before` with exactly the non-negative slots overwritten by k/v."""
    expected = before.clone().flatten(1, 2)
    slots = batch.meta.slot_mapping
    keep = slots >= 0
    expected[0, slots[keep]] = batch.k[keep].to(expected.dtype)
    expected[1, slots[keep]] = batch.v[keep].to(expected.dtype)
    assert torch.equal(batch.kv_cache.flatten(1, 2), expected), "KV cache contents differ"


def check_triton_vs_references(batch: Batch, scale: float, num_segments: int | None = None,
                               config=None, compare_torch_ref: bool = True,
                               window: int | None = None) -> float:
    """Triton output == dense reference (and == torch_ref backend); cache written correctly."""
    from pagoda.layers.attention.torch_ref import TorchAttentionBackend
    before = batch.kv_cache.clone()
    out = run_triton(batch, scale, num_segments, config, window)
    check_cache_written(batch, before)
    worst = check_against_dense(batch, out, scale, window=window)
    if compare_torch_ref and batch.q.shape[0] == batch.num_real_tokens:
        ref_cache = before.clone()
        backend = TorchAttentionBackend()
        ref = backend.forward(batch.q, batch.k, batch.v, ref_cache,
                              backend.build_metadata(batch.meta), scale, window)
        torch.testing.assert_close(out, ref, **tolerance(batch.q.dtype))
    return worst


MIXED = [(0, 1), (0, 13), (20, 1), (5, 7), (33, 1), (17, 30), (0, 2)]
DECODES = [(0, 1), (5, 1), (40, 1), (100, 1), (300, 1), (17, 1)]
# Sliding-window steps: prefills longer than the window, chunks whose context reaches past it,
# decodes inside and past it (windows below are deliberately not multiples of 16 or 64).
WINDOW_MIXED = [(0, 70), (150, 40), (130, 1), (5, 1), (0, 2), (60, 9), (300, 1)]
WINDOW_LONG_DECODES = [(1500, 1), (700, 1), (150, 1), (3, 1), (37, 1)]


def _mixed(block_size: int, heads: int, kv_heads: int, head_dim: int, dtype=torch.float32,
           num_segments: int | None = None, config=None, seqs=MIXED, pad_tokens: int = 0,
           scale: float | None = None, strided: bool = False,
           window: int | None = None) -> Callable[[], None]:
    def case() -> None:
        batch = make_batch(seqs, block_size=block_size, heads=heads, kv_heads=kv_heads,
                           head_dim=head_dim, dtype=dtype, seed=heads * 7 + block_size,
                           pad_tokens=pad_tokens)
        if strided:  # q, k, v as views into one fused qkv projection output
            fused = torch.cat([batch.q, batch.k, batch.v], dim=1)
            batch.q, batch.k, batch.v = (fused[:, :heads], fused[:, heads:heads + kv_heads],
                                         fused[:, heads + kv_heads:])
        if window is not None:
            poison_out_of_window(batch, window)
        check_triton_vs_references(batch, scale or head_dim ** -0.5, num_segments, config,
                                   window=window)
    return case


def _store_case() -> None:
    """Slots -1 are skipped, strided (non-contiguous) k/v and fp32 -> fp16 casts work."""
    from pagoda.layers.attention.triton_kv_store import store_kv
    gen = torch.Generator().manual_seed(3)
    cache = torch.randn(2, 6, 16, 3, 24, generator=gen).half()
    qkv = torch.randn(10, 9, 24, generator=gen)  # k, v are strided views into a fused buffer
    k, v = qkv[:, 3:6], qkv[:, 6:9]
    slots = torch.tensor([17, -1, 18, 95, -1, 40, 41, 16, -1, 0])
    before = cache.clone()
    store_kv(k, v, cache[0], cache[1], slots)
    expected = before.flatten(1, 2)
    keep = slots >= 0
    expected[0, slots[keep]] = k[keep].half()
    expected[1, slots[keep]] = v[keep].half()
    assert torch.equal(cache.flatten(1, 2), expected)


def _rotary(qk_norm: bool) -> Callable[[], None]:
    return lambda: _rotary_case(qk_norm)


def _rotary_case(with_qk_norm: bool) -> None:
    """forward_rotary (RoPE, and the q/k head norms when given, fused into the KV store)
    equals the torch backend's norms, RoPE, store and attention, on views into one qkv
    buffer, with graph padding."""
    from pagoda.layers.attention.torch_ref import TorchAttentionBackend
    from pagoda.layers.attention.triton_backend import TritonAttentionBackend
    from pagoda.layers.norm import GemmaRMSNorm
    from pagoda.layers.rotary import RotaryEmbedding
    heads, kv_heads, dim = 8, 2, 32
    batch = make_batch([(40, 1), (10, 20), (0, 3)], block_size=16, heads=heads,
                       kv_heads=kv_heads, head_dim=dim, seed=11, pad_tokens=2)
    rope = RotaryEmbedding(dim, 256, {"rope_type": "default", "rope_theta": 1e4})
    qk_norm = None
    if with_qk_norm:
        qk_norm = (GemmaRMSNorm(dim, 1e-6), GemmaRMSNorm(dim, 1e-6))
        for norm, seed in zip(qk_norm, (1, 2)):
            norm.weight.data = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    positions = torch.cat([torch.tensor([40]), torch.arange(10, 30), torch.arange(0, 3),
                           torch.zeros(2, dtype=torch.long)])
    qkv = torch.cat([batch.q, batch.k, batch.v], dim=1)
    outputs = {}
    for name, backend in (("torch", TorchAttentionBackend()), ("triton", TritonAttentionBackend())):
        cache, fused = batch.kv_cache.clone(), qkv.clone()
        q, k, v = fused[:, :heads], fused[:, heads:heads + kv_heads], fused[:, heads + kv_heads:]
        real = batch.num_real_tokens if name == "torch" else fused.shape[0]  # no padding there
        meta = batch.meta if name == "triton" else _without_padding(batch.meta)
        out = backend.forward_rotary(positions[:real], q[:real], k[:real], v[:real], rope, cache,
                                     backend.build_metadata(meta), dim ** -0.5, None, qk_norm)
        outputs[name] = (out[:batch.num_real_tokens], cache)
    torch.testing.assert_close(outputs["triton"][0], outputs["torch"][0],
                               **tolerance(torch.float32))
    if with_qk_norm:  # the kernel's fp32 norm may sum in another order
        torch.testing.assert_close(outputs["triton"][1], outputs["torch"][1],
                                   **tolerance(torch.float32))
    else:
        assert torch.equal(outputs["triton"][1], outputs["torch"][1]), "KV cache contents differ"


def _rotary_decode(num_segments: int | None = None, window: int | None = None,
                   rotary_dim: int | None = None,
                   dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    return lambda: _rotary_decode_case(num_segments, window, rotary_dim, dtype)


def _rotary_decode_case(num_segments: int | None, window: int | None, rotary_dim: int | None,
                        dtype: torch.dtype, decodes: list[tuple[int, int]] = DECODES,
                        shape: tuple[int, int, int] = (8, 2, 32), device: str = "cpu") -> None:
    """A decode step's RoPE and KV store run inside the attention kernel (NewToken; the
    fused store kernel is not called): its outputs are the torch backend's, and its cache
    holds exactly what the same step with PAGODA_ROPE_IN_ATTENTION=0 stores (and, in
    float32, the torch backend's), on views into one qkv buffer with the CUDA-graph runner's
    padding (empty sequences, slot -1 tokens). `shape`: heads, kv heads and head dim."""
    from pagoda.layers.attention import triton_backend, triton_unified
    from pagoda.layers.attention.torch_ref import TorchAttentionBackend
    from pagoda.layers.rotary import RotaryEmbedding
    heads, kv_heads, dim = shape
    batch = make_batch(decodes + [(0, 0)] * 2, block_size=16, heads=heads, kv_heads=kv_heads,
                       head_dim=dim, dtype=dtype, device=device, seed=15, pad_tokens=2)
    longest = max(context for context, _ in decodes) + 1
    rope = RotaryEmbedding(dim, max(512, longest), {"rope_type": "default", "rope_theta": 1e4},
                           rotary_dim).to(device)
    positions = torch.tensor([context for context, _ in decodes] + [0, 0], device=device)
    qkv = torch.cat([batch.q, batch.k, batch.v], dim=1)
    real = batch.num_real_tokens

    def run(backend, meta, tokens: int):
        cache, fused = batch.kv_cache.clone(), qkv.clone()
        q, k, v = fused[:, :heads], fused[:, heads:heads + kv_heads], fused[:, heads + kv_heads:]
        out = backend.forward_rotary(positions[:tokens], q[:tokens], k[:tokens], v[:tokens],
                                     rope, cache, backend.build_metadata(meta), dim ** -0.5,
                                     window)
        return out[:real], cache

    def refuse(*args, **kwargs):
        raise AssertionError("a decode step called the fused RoPE-and-store kernel")
    store = triton_backend.rope_store_kv_
    triton_backend.rope_store_kv_ = refuse
    try:
        inside = run(triton_backend.TritonAttentionBackend(num_segments), batch.meta,
                     qkv.shape[0])
    finally:
        triton_backend.rope_store_kv_ = store
    switch, triton_unified.ROPE_IN_ATTENTION = triton_unified.ROPE_IN_ATTENTION, False
    try:  # as with PAGODA_ROPE_IN_ATTENTION=0
        apart = run(triton_backend.TritonAttentionBackend(num_segments), batch.meta,
                    qkv.shape[0])
    finally:
        triton_unified.ROPE_IN_ATTENTION = switch
    reference = run(TorchAttentionBackend(), _without_padding(batch.meta), real)
    torch.testing.assert_close(inside[0], reference[0], **tolerance(dtype))
    torch.testing.assert_close(inside[0], apart[0], **tolerance(dtype))
    assert torch.equal(inside[1], apart[1]), "KV cache contents differ from the store kernel's"
    if dtype == torch.float32:
        assert torch.equal(inside[1], reference[1]), "KV cache contents differ from torch's"


def _rotary_window_case() -> None:
    """forward_rotary passes the layer's window through (Triton vs torch_ref, padded)."""
    from pagoda.layers.attention.torch_ref import TorchAttentionBackend
    from pagoda.layers.attention.triton_backend import TritonAttentionBackend
    from pagoda.layers.rotary import RotaryEmbedding
    heads, kv_heads, dim, window = 8, 2, 32, 13
    batch = make_batch([(40, 1), (10, 20), (0, 3)], block_size=16, heads=heads,
                       kv_heads=kv_heads, head_dim=dim, seed=12, pad_tokens=2)
    rope = RotaryEmbedding(dim, 256, {"rope_type": "default", "rope_theta": 1e4})
    positions = torch.cat([torch.tensor([40]), torch.arange(10, 30), torch.arange(0, 3),
                           torch.zeros(2, dtype=torch.long)])
    real = batch.num_real_tokens
    outputs = []
    for backend, meta, n in ((TorchAttentionBackend(), _without_padding(batch.meta), real),
                             (TritonAttentionBackend(), batch.meta, batch.q.shape[0])):
        cache = batch.kv_cache.clone()
        q, k, v = batch.q.clone(), batch.k.clone(), batch.v.clone()
        out = backend.forward_rotary(positions[:n], q[:n], k[:n], v[:n], rope, cache,
                                     backend.build_metadata(meta), dim ** -0.5, window)
        outputs.append(out[:real])
    torch.testing.assert_close(outputs[1], outputs[0], **tolerance(torch.float32))
    full = TorchAttentionBackend()
    out = full.forward_rotary(positions[:real], batch.q[:real].clone(), batch.k[:real].clone(),
                              batch.v[:real].clone(), rope, batch.kv_cache.clone(),
                              full.build_metadata(_without_padding(batch.meta)), dim ** -0.5)
    assert not torch.allclose(out, outputs[0]), "the window changed nothing"


def round_kv_to(batch: Batch, element: torch.dtype) -> None:
    """Round the step's new K/V and the reference's K/V to `element`'s values (kept in their
    own dtype): a cache of `element` then holds exactly what the reference attends over."""
    def rounded(t: torch.Tensor) -> torch.Tensor:
        return t.to(element).to(t.dtype)
    batch.k.copy_(rounded(batch.k))
    batch.v.copy_(rounded(batch.v))
    batch.keys = [rounded(t) for t in batch.keys]
    batch.values = [rounded(t) for t in batch.values]


def _float8_cache_case() -> None:
    """float16 queries over a float8 cache: 20 unsplit decodes, which read it in the float8
    tile setting (K and V are rounded to float8 first, so the store writes them exactly)."""
    fp8 = torch.float8_e4m3fn
    seqs = [(c, 1) for c in (5, 130, 300, 17, 64, 250, 1, 90, 400, 33) * 2]
    batch = make_batch(seqs, block_size=16, heads=8, kv_heads=2, head_dim=32,
                       dtype=torch.float16, seed=9)
    round_kv_to(batch, fp8)
    scale = 32 ** -0.5
    expected = dense_outputs(batch, scale)
    batch.kv_cache = batch.kv_cache.to(fp8)
    check_against_dense(batch, run_triton(batch, scale, num_segments=1), scale, expected)


def scale_kv_to_float8(batch: Batch, element: torch.dtype, scales) -> None:
    """Make every K (V) the scale k (v) times an `element` value, and turn the cache into
    `element` holding K / k and V / v: a scaled float8 cache then holds exactly what the
    reference attends over."""
    def rounded(t: torch.Tensor, scale: float) -> torch.Tensor:
        return (t / scale).to(element).to(t.dtype) * scale
    batch.k.copy_(rounded(batch.k, scales.k))
    batch.v.copy_(rounded(batch.v, scales.v))
    batch.keys = [rounded(t, scales.k) for t in batch.keys]
    batch.values = [rounded(t, scales.v) for t in batch.values]
    batch.kv_cache = torch.stack([(batch.kv_cache[0] / scales.k).to(element),
                                  (batch.kv_cache[1] / scales.v).to(element)])


def _float8_scaled_cache(num_segments: int) -> Callable[[], None]:
    """A float8 cache with a checkpoint's scales (k 4, v 0.5): the new K and V are stored
    divided by them, and both Triton kernels (unsplit, and split with its reduce) and the
    torch backend attend as over the unscaled values."""
    def case() -> None:
        from pagoda.layers.attention.backend import KVScales
        from pagoda.layers.attention.torch_ref import TorchAttentionBackend
        from pagoda.layers.attention.triton_backend import TritonAttentionBackend
        fp8, scales, scale = torch.float8_e4m3fn, KVScales(k=4.0, v=0.5), 32 ** -0.5
        seqs = [(c, 1) for c in (5, 130, 300, 17, 64, 250, 1, 90)] + [(20, 6)]
        batch = make_batch(seqs, block_size=16, heads=8, kv_heads=2, head_dim=32,
                           dtype=torch.float16, seed=13)
        scale_kv_to_float8(batch, fp8, scales)
        expected = dense_outputs(batch, scale)
        before = batch.kv_cache.clone()
        backend = TritonAttentionBackend(num_segments=num_segments)
        out = backend.forward(batch.q, batch.k, batch.v, batch.kv_cache,
                              backend.build_metadata(batch.meta), scale, kv_scales=scales)
        check_against_dense(batch, out, scale, expected)
        slots = batch.meta.slot_mapping
        stored = batch.kv_cache.flatten(1, 2)[:, slots].float()
        assert torch.equal(stored[0], (batch.k.float() / scales.k).to(fp8).float())
        assert torch.equal(stored[1], (batch.v.float() / scales.v).to(fp8).float())
        reference = TorchAttentionBackend()
        ref = reference.forward(batch.q, batch.k, batch.v, before,
                                reference.build_metadata(batch.meta), scale, kv_scales=scales)
        torch.testing.assert_close(out, ref, **tolerance(torch.float16))
    return case


def _rotary_scaled_case() -> None:
    """forward_rotary with KV scales: the fused RoPE-and-store kernel writes what the torch
    backend writes (rotated K / k, V / v) and the outputs agree. The cache is float32 here
    (the backends take scales only for a float8 cache, but divide whatever they are given):
    Triton's interpreter rounds float32 to float8 otherwise than the GPU and torch do (ties
    away from zero, no saturation), so rotated keys would not round alike."""
    from pagoda.layers.attention.backend import KVScales
    from pagoda.layers.attention.torch_ref import TorchAttentionBackend
    from pagoda.layers.attention.triton_backend import TritonAttentionBackend
    from pagoda.layers.rotary import RotaryEmbedding
    heads, kv_heads, dim, scales = 8, 2, 32, KVScales(k=0.25, v=3.0)
    batch = make_batch([(40, 1), (10, 20), (0, 3)], block_size=16, heads=heads,
                       kv_heads=kv_heads, head_dim=dim, seed=14)
    rope = RotaryEmbedding(dim, 256, {"rope_type": "default", "rope_theta": 1e4})
    positions = torch.cat([torch.tensor([40]), torch.arange(10, 30), torch.arange(0, 3)])
    outputs = []
    for backend in (TorchAttentionBackend(), TritonAttentionBackend()):
        cache = batch.kv_cache.clone()
        out = backend.forward_rotary(positions, batch.q.clone(), batch.k.clone(),
                                     batch.v.clone(), rope, cache,
                                     backend.build_metadata(batch.meta), dim ** -0.5,
                                     kv_scales=scales)
        outputs.append((out, cache))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], **tolerance(torch.float32))
    assert torch.equal(outputs[1][1], outputs[0][1]), "KV cache contents differ"
    unscaled = TritonAttentionBackend().forward_rotary(
        positions, batch.q.clone(), batch.k.clone(), batch.v.clone(), rope,
        batch.kv_cache.clone(), TritonAttentionBackend().build_metadata(batch.meta),
        dim ** -0.5)
    assert not torch.allclose(unscaled, outputs[1][0]), "the scales changed nothing"


def _without_padding(meta: CommonAttentionMetadata) -> CommonAttentionMetadata:
    real = meta.query_start_loc_cpu[-1]
    return CommonAttentionMetadata(
        num_tokens=real, num_seqs=meta.num_seqs, max_query_len=meta.max_query_len,
        max_seq_len=meta.max_seq_len, query_start_loc=meta.query_start_loc,
        seq_lens=meta.seq_lens, block_tables=meta.block_tables,
        slot_mapping=meta.slot_mapping[:real], query_start_loc_cpu=meta.query_start_loc_cpu,
        seq_lens_cpu=meta.seq_lens_cpu, block_size=meta.block_size)


def _interpreter_cases() -> dict[str, Callable[[], None]]:
    from pagoda.layers.attention.triton_unified import KernelConfig
    return {
        "store_skips_negative_slots": _store_case,
        "rotary_store_fused": _rotary(qk_norm=False),
        "qk_norm_rotary_store_fused": _rotary(qk_norm=True),
        "mixed_bs16_mha": _mixed(16, 4, 4, 32),
        "mixed_bs32_gqa4": _mixed(32, 8, 2, 16),
        "mixed_bs16_gqa3_smollm2": _mixed(16, 9, 3, 64),
        "mixed_bs64_gqa8_dim24": _mixed(64, 16, 2, 24),
        "mixed_bs16_gqa18": _mixed(16, 18, 1, 16),
        "mixed_split3": _mixed(16, 8, 2, 32, num_segments=3),
        "decode_unsplit": _mixed(16, 8, 2, 32, seqs=DECODES, num_segments=1),
        "decode_split4_gqa3": _mixed(32, 9, 3, 16, seqs=DECODES, num_segments=4),
        "decode_auto_split": _mixed(16, 4, 1, 16, seqs=[(600, 1), (1000, 1)]),
        "long_prefill_with_context": _mixed(16, 8, 2, 32, dtype=torch.float16,
                                           seqs=[(200, 150), (0, 1), (90, 70)]),
        "dim128_strided_qkv": _mixed(32, 4, 2, 128, strided=True, seqs=[(40, 1), (10, 20)]),
        "tile16_bs64": _mixed(64, 8, 2, 16, config=KernelConfig(64, 16, 4, 2)),
        "tile64_bs16_blockm16": _mixed(16, 8, 2, 16, config=KernelConfig(16, 64, 4, 2)),
        "blockm128_tile32": _mixed(16, 4, 2, 16, config=KernelConfig(128, 32, 8, 2)),
        "fp16": _mixed(16, 8, 2, 32, dtype=torch.float16),
        # bf16 runs on GPU only: the interpreter's tl.dot multiplies bf16's raw uint16 bits.
        "fp16_split2": _mixed(16, 8, 2, 32, dtype=torch.float16, seqs=DECODES, num_segments=2),
        "fp16_float8_cache_decodes": _float8_cache_case,
        "fp16_float8_scaled_cache": _float8_scaled_cache(num_segments=1),
        "fp16_float8_scaled_cache_split2": _float8_scaled_cache(num_segments=2),
        "rotary_store_scaled": _rotary_scaled_case,
        "rotary_decode_in_attention_unsplit": _rotary_decode(num_segments=1),
        "rotary_decode_in_attention_split4": _rotary_decode(num_segments=4),
        "rotary_decode_in_attention_auto_split": _rotary_decode(),
        "rotary_decode_in_attention_window13_split2": _rotary_decode(num_segments=2,
                                                                     window=13),
        "rotary_decode_in_attention_partial_fp16": _rotary_decode(
            num_segments=2, rotary_dim=16, dtype=torch.float16),
        "padding_tokens_slot_minus1": _mixed(16, 8, 2, 16, pad_tokens=5, scale=0.3),
        "padding_decode_split": _mixed(16, 8, 2, 16, seqs=DECODES, pad_tokens=3,
                                       num_segments=2),
        # The CUDA-graph runner's decode padding: empty sequences plus slot -1 tokens.
        "graph_padding_unsplit": _mixed(16, 8, 2, 16, seqs=DECODES + [(0, 0)] * 2,
                                        pad_tokens=2, num_segments=1),
        "graph_padding_split": _mixed(16, 8, 2, 16, seqs=DECODES + [(0, 0)] * 2,
                                      pad_tokens=2, num_segments=4),
        **_window_cases(KernelConfig),
    }


def _window_cases(KernelConfig) -> dict[str, Callable[[], None]]:
    """Sliding-window cases; out-of-window K/V hold inf, so any read of them fails."""
    return {
        "rotary_store_fused_window": _rotary_window_case,
        "window24_mixed_bs16": _mixed(16, 8, 2, 32, seqs=WINDOW_MIXED, window=24),
        "window1_mixed": _mixed(16, 4, 4, 16, seqs=WINDOW_MIXED, window=1),
        "window_wider_than_context": _mixed(16, 8, 2, 16, seqs=WINDOW_MIXED, window=5000),
        # tiles of 16 inside 32-token blocks: whole tiles and blocks before the window skipped
        "window20_tile16_bs32": _mixed(32, 8, 2, 16, seqs=WINDOW_MIXED, window=20,
                                       config=KernelConfig(16, 16, 4, 2)),
        "window40_tile16_bs64": _mixed(64, 8, 2, 16, seqs=WINDOW_MIXED, window=40,
                                       config=KernelConfig(64, 16, 4, 2)),
        # 16 queries per program, window 10: rows of one program start their windows apart
        "window10_blockm64_gqa4": _mixed(16, 8, 2, 16, seqs=WINDOW_MIXED, window=10,
                                         config=KernelConfig(64, 32, 4, 2)),
        "window200_decode_split4": _mixed(16, 8, 2, 32, seqs=WINDOW_LONG_DECODES,
                                          window=200, num_segments=4),
        "window100_decode_split16_gqa3": _mixed(32, 9, 3, 16, seqs=WINDOW_LONG_DECODES,
                                                window=100, num_segments=16),
        "window300_decode_auto_split": _mixed(16, 4, 1, 16, seqs=[(3000, 1), (1000, 1)],
                                              window=300),
        "window37_speculative_split3": _mixed(16, 8, 2, 16, seqs=[(500, 4), (90, 3), (2, 5)],
                                              window=37, num_segments=3),
        "window50_fp16_split2": _mixed(16, 8, 2, 32, dtype=torch.float16,
                                       seqs=WINDOW_LONG_DECODES, window=50, num_segments=2),
        "window50_graph_padding_split": _mixed(16, 8, 2, 16, seqs=DECODES + [(0, 0)] * 2,
                                               pad_tokens=2, num_segments=4, window=50),
        "window50_graph_padding_unsplit": _mixed(16, 8, 2, 16, seqs=DECODES + [(0, 0)] * 2,
                                                 pad_tokens=2, num_segments=1, window=50),
    }


# Names only (no triton import in the pytest process); must match _interpreter_cases().
INTERPRETER_CASES = [
    "store_skips_negative_slots", "rotary_store_fused", "qk_norm_rotary_store_fused",
    "mixed_bs16_mha", "mixed_bs32_gqa4", "mixed_bs16_gqa3_smollm2",
    "mixed_bs64_gqa8_dim24", "mixed_bs16_gqa18", "mixed_split3", "decode_unsplit",
    "decode_split4_gqa3", "decode_auto_split", "long_prefill_with_context", "dim128_strided_qkv",
    "tile16_bs64", "tile64_bs16_blockm16",
    "blockm128_tile32", "fp16", "fp16_split2", "fp16_float8_cache_decodes",
    "fp16_float8_scaled_cache", "fp16_float8_scaled_cache_split2", "rotary_store_scaled",
    "rotary_decode_in_attention_unsplit", "rotary_decode_in_attention_split4",
    "rotary_decode_in_attention_auto_split", "rotary_decode_in_attention_window13_split2",
    "rotary_decode_in_attention_partial_fp16",
    "padding_tokens_slot_minus1",
    "padding_decode_split", "graph_padding_unsplit", "graph_padding_split",
    "rotary_store_fused_window", "window24_mixed_bs16", "window1_mixed",
    "window_wider_than_context", "window20_tile16_bs32", "window40_tile16_bs64",
    "window10_blockm64_gqa4", "window200_decode_split4", "window100_decode_split16_gqa3",
    "window300_decode_auto_split", "window37_speculative_split3", "window50_fp16_split2",
    "window50_graph_padding_split", "window50_graph_padding_unsplit",
]


def _patch_interpreter_for_numpy_2_4() -> None:
    """triton 3.6's interpreter calls int() on 1-element arrays, which numpy >= 2.4 refuses
    (triton-lang/triton#9171): tensor loop bounds (`range(lo, hi)`) then fail."""
    from triton.runtime import interpreter
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    interpreter._patch_lang_tensor = patched


def _run_interpreter_cases() -> None:
    """Subprocess entry: run every case under the interpreter, print one JSON line."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    _patch_interpreter_for_numpy_2_4()
    results = {}
    for name, case in _interpreter_cases().items():
        start = time.perf_counter()
        try:
            case()
            results[name] = {"ok": True, "seconds": round(time.perf_counter() - start, 2)}
        except Exception:  # report every failure, not just the first
            results[name] = {"ok": False, "error": traceback.format_exc()}
    print(RESULT_MARKER + json.dumps(results), flush=True)


@pytest.fixture(scope="module")
def interpreter_results() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "tests.layers.test_triton_attention"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"interpreter subprocess failed (rc {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len(RESULT_MARKER):])


def test_triton_is_installed():
    """triton is a test dependency: without it this fails rather than skips."""
    import triton
    assert triton.__version__


def test_case_names_match(interpreter_results):
    assert sorted(interpreter_results) == sorted(INTERPRETER_CASES)


@pytest.mark.parametrize("name", INTERPRETER_CASES)
def test_kernel_under_interpreter(name, interpreter_results):
    result = interpreter_results.get(name)
    assert result is not None, f"case {name} did not run"
    assert result["ok"], result.get("error")


def test_split_heuristic():
    from pagoda.layers.attention.triton_unified import (
        choose_num_segments,
        plan_attention,
    )
    # Llama-3.1-8B decode (8 kv heads) on 132 SMs.
    assert choose_num_segments(8, 1, 8192, 132, 64) == 32  # batch 1: split as far as allowed
    assert choose_num_segments(8, 1, 1024, 132, 64) == 16  # ... but a whole tile per segment
    assert choose_num_segments(64, 1, 4096, 132, 64) == 8  # batch 8
    assert choose_num_segments(512, 1, 4096, 132, 64) == 1  # batch 64 fills the GPU already
    assert choose_num_segments(8, 1, 100, 132, 64) == 1  # context shorter than two tiles
    assert choose_num_segments(8, 512, 8192, 132, 64) == 1  # prefill never splits
    decode = plan_attention(32, 8, 128, [1] * 8, 4096, 132)
    assert decode.decode_only and decode.num_segments == 8 and decode.config.block_m == 16
    assert decode.config.num_stages == 3  # 8 tiles of 64 per segment: pipelined
    single = plan_attention(32, 8, 128, [1], 4096, 132)
    assert single.num_segments == 32 and single.config.num_stages == 1  # 2 tiles per segment
    forced = plan_attention(32, 8, 128, [1], 4096, 132, config=decode.config)
    assert forced.num_segments == 32 and forced.config == decode.config  # given configs stay
    prefill = plan_attention(32, 8, 128, [1, 2048], 8192, 132)
    assert not prefill.decode_only and prefill.num_segments == 1 and prefill.config.block_m == 64
    assert plan_attention(9, 3, 64, [1, 1], 4096, 132, num_segments=1).num_segments == 1
    fp32 = plan_attention(32, 8, 128, [1, 2048], 8192, 132, dtype=torch.float32)
    assert fp32.config.block_m == 16  # no tensor cores: small tiles, no register spills


def test_float8_cache_plans():
    """An unsplit decode over a one-byte cache reads 128-position tiles, five stages deep;
    split decodes, prefill tiles and head dims past 128 keep the 16-bit settings."""
    from pagoda.layers.attention.triton_unified import plan_attention
    fp8 = torch.float8_e4m3fn
    wide = plan_attention(32, 8, 128, [1] * 64, 4096, 132, cache_dtype=fp8)
    assert wide.num_segments == 1 and (wide.config.tile, wide.config.num_stages) == (128, 5)
    assert plan_attention(32, 8, 128, [1] * 64, 4096, 132).config.tile == 64
    assert plan_attention(32, 8, 128, [1], 4096, 132, cache_dtype=fp8) \
        == plan_attention(32, 8, 128, [1], 4096, 132)
    assert plan_attention(32, 8, 128, [1, 2048], 8192, 132, cache_dtype=fp8) \
        == plan_attention(32, 8, 128, [1, 2048], 8192, 132)
    assert plan_attention(8, 4, 256, [1] * 64, 4096, 132, cache_dtype=fp8).config.tile == 32


def test_window_plans():
    """A local layer's split is sized by its window, not the context; one plan per window."""
    from pagoda.layers.attention.metadata import CommonAttentionMetadata
    from pagoda.layers.attention.triton_backend import TritonAttentionBackend
    from pagoda.layers.attention.triton_unified import plan_attention
    # Gemma 3 1B (4 heads, 1 kv head, dim 256), batch-1 decode at 8k
    assert plan_attention(4, 1, 256, [1], 8192, 132).num_segments == 32
    local = plan_attention(4, 1, 256, [1], 8192, 132, sliding_window=512)
    assert local.num_segments == 16 and local.decode_only  # one 32-token tile each
    assert local.config.num_stages == 1 and local.config.tile == 32
    assert plan_attention(4, 1, 256, [1], 8192, 132, sliding_window=40).num_segments == 1
    # dim 256 keeps two pipeline stages where dim 128 takes three (shared memory)
    assert plan_attention(8, 4, 256, [1] * 8, 4096, 132).config.num_stages == 2
    assert plan_attention(4, 1, 256, [1], 300, 132, sliding_window=4096) \
        == plan_attention(4, 1, 256, [1], 300, 132)  # a window wider than the context
    common = CommonAttentionMetadata(
        num_tokens=1, num_seqs=1, max_query_len=1, max_seq_len=8192,
        query_start_loc=torch.tensor([0, 1]), seq_lens=torch.tensor([8192]),
        block_tables=torch.zeros(1, 512, dtype=torch.int32), slot_mapping=torch.tensor([5]),
        query_start_loc_cpu=[0, 1], seq_lens_cpu=[8192], block_size=16)
    meta = TritonAttentionBackend().build_metadata(common)
    full = meta.plan(4, 1, 256, torch.bfloat16)
    assert meta.plan(4, 1, 256, torch.bfloat16, None) is full
    assert meta.plan(4, 1, 256, torch.bfloat16, 512) is meta.plan(4, 1, 256, torch.bfloat16, 512)
    assert meta.plan(4, 1, 256, torch.bfloat16, 512).num_segments == 16 != full.num_segments


def test_plan_rejects_bad_shapes():
    from pagoda.layers.attention.triton_unified import KernelConfig, plan_attention
    with pytest.raises(ValueError, match="multiple"):
        plan_attention(10, 3, 64, [1], 10, 132)
    with pytest.raises(ValueError, match="power of two"):
        plan_attention(8, 2, 64, [1], 10, 132, config=KernelConfig(48, 32, 4, 2))
    with pytest.raises(ValueError, match="GQA group"):
        plan_attention(64, 1, 64, [1], 10, 132, config=KernelConfig(32, 32, 4, 2))


def test_products_run_in_float16_for_a_float8_cache_under_bfloat16_queries():
    from pagoda.layers.attention.triton_unified import _half_products
    assert _half_products(torch.bfloat16, torch.float8_e4m3fn)
    assert _half_products(torch.bfloat16, torch.float8_e5m2)
    assert not _half_products(torch.bfloat16, torch.bfloat16)
    assert not _half_products(torch.float16, torch.float8_e4m3fn)  # float16 already
    assert not _half_products(torch.float32, torch.float8_e4m3fn)


# the float scalars the attention kernels take (every other scalar is an integer)
FLOAT_ARGS = {"qk_scale", "value_scale", "k_divisor", "v_divisor", "q_eps", "k_eps"}


def _ptx(kernel, constants: dict, pointers: dict[str, str], capability: int = 90,
         stage: str = "ptx", **options) -> str | bytes:
    """`kernel` compiled for a CUDA compute capability here (no GPU needed): pointers typed
    by `pointers` (others int32; split workspaces float32), scalars int32 or FLOAT_ARGS;
    the strides but the block table's and the workspace's multiples of 16, as Triton
    specializes them at run time for the caches and q; `options` as a launch's. Its PTX, or
    `stage`'s assembly."""
    from tests.utils import compile_for_cuda
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            continue
        if name.startswith("seg_"):
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name, "i32")
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    divisible = tuple(name for name in signature if name.startswith("stride_")
                      and name not in ("stride_bt", "stride_wt", "stride_wh"))
    return compile_for_cuda(kernel, signature, constants, capability, divisible,
                            **options)[stage]


def _decode_kernel_ptx(query: str, cache: str, half_products: bool, scale_v: bool = False,
                       split: bool = False, capability: int = 90,
                       new_token: bool = False, unit_strides: bool = False,
                       stage: str = "ptx", **options) -> str | bytes:
    """The decode kernel compiled here (its PTX, or `stage`'s assembly): q [*, 32, 128], 8
    KV heads (with new_token, RoPE over all 128 dims and the KV store in the kernel; with
    unit_strides, the head dims' strides of 1 as Triton specializes them at run time);
    `options` as a launch's (num_stages, maxnreg)."""
    from pagoda.layers.attention import triton_unified
    constants = dict(GROUP=4, HEAD_DIM=128, HEAD_DIM_P=128, BLOCK_SIZE=16, TILE=64,
                     BLOCK_M=16, BLOCK_Q=4, DECODE_ONLY=True, SPLIT=split, SLIDING=False,
                     DOT_PRECISION="tf32", HALF_PRODUCTS=half_products, SCALE_V=scale_v,
                     NEW_TOKEN=new_token, ROT_HALF=64 if new_token else 0,
                     PDL=capability >= 90)
    if unit_strides:
        constants.update(stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1)
    return _ptx(triton_unified._unified_attention_kernel, constants,
                {"q_ptr": query, "out_ptr": query, "key_cache_ptr": cache,
                 "value_cache_ptr": cache, "new_k_ptr": query, "new_v_ptr": query,
                 "pos_ptr": "i64", "cos_sin_ptr": "fp32", "slot_ptr": "i64"}, capability,
                stage, **options)


@pytest.mark.parametrize("split", [False, True])
def test_a_decode_s_rope_and_store_in_the_attention_kernel_compile_for_hopper(split):
    """NEW_TOKEN with bfloat16 queries and cache (the interpreter runs no bfloat16 dots):
    compiled for an H200, the kernel stores 16-bit values (the new K and V rows) where
    without it a split decode stores only float32 partials."""
    with_new = _decode_kernel_ptx("bf16", "bf16", half_products=False, split=split,
                                  new_token=True)
    without = _decode_kernel_ptx("bf16", "bf16", half_products=False, split=split)
    assert with_new.count("st.global.b16") > without.count("st.global.b16")


def test_rope_in_attention_is_taken_by_split_decodes_and_unsplit_ones_of_few_programs():
    """A decode takes its RoPE and KV store in the attention kernel where its launch is
    split (1-16 sequences over 8 KV heads on 132 multiprocessors) or has at most
    NEW_TOKEN_PROGRAMS_PER_SM programs a multiprocessor (up to 33 sequences unsplit); a batch
    of 34 or 256 does not, and neither does a prefill or a float8 cache."""
    from pagoda.layers.attention.triton_unified import plan_attention, takes_new_token
    cache = torch.empty(1, 16, 8, 128, dtype=torch.bfloat16)

    def takes(query_lens, cache=cache):
        q = torch.empty(sum(query_lens), 32, 128, dtype=torch.bfloat16)
        plan = plan_attention(32, 8, 128, query_lens, 1100, 132, dtype=torch.bfloat16,
                              cache_dtype=cache.dtype)
        return takes_new_token(plan, q, cache)
    assert takes([1]) and takes([1] * 2) and takes([1] * 16) and takes([1] * 33)
    assert not takes([1] * 34) and not takes([1] * 256)
    assert not takes([5]) and not takes([1], cache.to(torch.float8_e4m3fn))


def test_rope_in_attention_caps_its_registers_in_split_launches_of_many_programs():
    """A split NewToken decode's registers are capped (to the plain decode's programs a
    multiprocessor) where its launch has more than NEW_TOKEN_PROGRAMS_PER_SM programs a
    multiprocessor: 8 decodes (8 kv heads x 8 segments), not 1 (16 segments), and no
    unsplit one; where the cap was counted (16-row tiles of 16-bit queries)."""
    from pagoda.layers.attention.triton_unified import plan_attention

    def capped(decodes: int) -> tuple[int, bool]:
        plan = plan_attention(32, 8, 128, [1] * decodes, 1100, 132)
        return plan.num_segments, plan.new_token_capped
    assert capped(1) == (16, False) and capped(8) == (8, True)
    assert capped(32) == (1, False) and capped(256) == (1, False)
    # only the shapes the cap was counted for (16-row tiles of 16-bit queries): not float32
    # queries, nor a GQA group of 32 (64-row tiles), though both launch 512 programs
    wide = plan_attention(64, 2, 128, [1] * 16, 1100, 132)
    float32 = plan_attention(32, 8, 128, [1] * 8, 1100, 132, dtype=torch.float32)
    assert 16 * 2 * wide.num_segments == 8 * 8 * float32.num_segments == 512
    assert not wide.new_token_capped and not float32.new_token_capped


def _registers_and_stack(split: bool, new_token: bool, **options) -> tuple[int, int]:
    """The decode kernel's registers a thread and stack bytes, compiled for an H200."""
    from bench.kernels.sass_census import registers_and_stack
    return registers_and_stack(_decode_kernel_ptx(
        "bf16", "bf16", half_products=False, split=split, new_token=new_token,
        unit_strides=True, stage="cubin", **options))


def _programs_a_multiprocessor(registers: int, warps: int = 4) -> int:
    return 65536 // (-(-registers // 8) * 8 * warps * 32)  # a warp's registers come in 8s


def test_rope_in_attention_costs_the_registers_that_bound_its_programs_a_multiprocessor():
    """What NEW_TOKEN_PROGRAMS_PER_SM stands on, compiled for an H200 with no GPU: the
    unsplit decode of 4 warps fits 4 programs in a multiprocessor's 64k registers, and
    with RoPE and the store in the kernel only NEW_TOKEN_PROGRAMS_PER_SM."""
    from pagoda.layers.attention.triton_unified import NEW_TOKEN_PROGRAMS_PER_SM
    plain, _ = _registers_and_stack(False, False)
    with_new, _ = _registers_and_stack(False, True)
    assert _programs_a_multiprocessor(plain) == 4
    assert _programs_a_multiprocessor(with_new) == NEW_TOKEN_PROGRAMS_PER_SM


@pytest.mark.parametrize("stages", [1, 3])
def test_split_rope_in_attention_is_held_to_the_plain_decode_s_programs_a_multiprocessor(
        stages):
    """Compiled for an H200: a split decode with RoPE and the store in the kernel would
    take more registers than the plain one's 4 programs a multiprocessor leave; the cap
    its launch takes (new_token_max_registers) keeps decode_programs_per_sm of them for at
    most 8 bytes a thread spilled to the stack."""
    from pagoda.layers.attention.triton_unified import (
        decode_programs_per_sm,
        new_token_max_registers,
    )
    cap = new_token_max_registers(128, 4)
    plain, _ = _registers_and_stack(True, False, num_stages=stages)
    uncapped, _ = _registers_and_stack(True, True, num_stages=stages)
    capped, stack = _registers_and_stack(True, True, num_stages=stages, maxnreg=cap)
    assert _programs_a_multiprocessor(plain) >= decode_programs_per_sm(128) == 4
    assert _programs_a_multiprocessor(uncapped) < 4
    assert capped <= cap and _programs_a_multiprocessor(capped) == 4 and stack <= 8


# bytes a PTX global load reads, by its type suffix
LOAD_BYTES = {"b8": 1, "b16": 2, "b32": 4, "b64": 8, "v2.b32": 8, "v4.b32": 16, "v2.b64": 16}


def _global_access_before_wait(ptx: str) -> tuple[int, int]:
    """Bytes a thread loads and number of stores in the code before the kernel's first
    `griddepcontrol.wait` (its main path's)."""
    head = ptx[:ptx.index("griddepcontrol.wait")]
    loaded = sum(LOAD_BYTES[kind] for kind in re.findall(r"ld\.global\.(?:nc\.)?([\w.]+?)\s",
                                                         head))
    return loaded, len(re.findall(r"st\.global", head))


@pytest.mark.parametrize("split", [False, True])
def test_a_decode_reads_its_cached_keys_and_values_before_waiting_for_the_qkv_product(split):
    """With PDL, a decode whose RoPE and KV store run in the attention kernel reads what no
    kernel of its step writes (its first KV tile, through the block table) before it waits
    for the previous kernel, and stores nothing before it; other decodes wait first.
    Compiled for an H200: each of the 128 threads' share of a 64-position tile of K and V
    (256 bytes) is loaded before the wait."""
    early = _decode_kernel_ptx("bf16", "bf16", half_products=False, split=split,
                               new_token=True, unit_strides=True)
    loaded, stores = _global_access_before_wait(early)
    assert loaded >= 2 * 64 * 128 * 2 // 128 and stores == 0
    late = _decode_kernel_ptx("bf16", "bf16", half_products=False, split=split,
                              unit_strides=True)
    assert _global_access_before_wait(late) == (0, 0)


def test_the_segment_reduction_reads_only_the_batch_s_token_count_before_its_wait():
    """The split decode's reduce kernel reads the token count (one 4-byte load) before
    waiting for the attention kernel's partials."""
    from pagoda.layers.attention import triton_unified
    reduce = _ptx(triton_unified._reduce_segments_kernel, dict(
        HEAD_DIM=128, HEAD_DIM_P=128, SEG_P=32, SCALE_V=False, PDL=True), {"out_ptr": "bf16"})
    assert _global_access_before_wait(reduce) == (4, 0)


@pytest.mark.parametrize("cache", ["fp8e4nv", "fp8e5"])
def test_the_kernels_of_a_scaled_float8_cache_compile_for_hopper(cache):
    """The stores divide K and V by their scales (IEEE division), the attention kernels
    (unsplit, split and its reduce) multiply the outputs by V's; compiled for an H200.
    (Not for an A100 here: in a process that has compiled float8 kernels for sm_90,
    Triton 3.6 then emits sm_89 float8 conversions for sm_80 too; in a fresh process
    these kernels compile for sm_80 with an E5M2 cache.)"""
    capability = 90
    from pagoda.layers import fused
    from pagoda.layers.attention import triton_kv_store, triton_unified
    caches = {"key_cache_ptr": cache, "value_cache_ptr": cache, "k_ptr": "bf16",
              "v_ptr": "bf16", "q_ptr": "bf16", "slot_mapping_ptr": "i64", "slot_ptr": "i64",
              "pos_ptr": "i64", "cos_sin_ptr": "fp32", "q_norm_ptr": "bf16",
              "k_norm_ptr": "bf16"}
    pdl = capability >= 90
    store = _ptx(triton_kv_store._kv_store_kernel, dict(
        NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_H=8, BLOCK_D=128, SCALED=True,
        PDL=pdl), caches, capability)
    rope = _ptx(fused._rope_store_kv_kernel, dict(
        QK_NORM=False, HALF=64, ROT_HALF=64, HEAD_DIM=128, BLOCK_H=32, BLOCK_KH=8,
        BLOCK_D=128, BLOCK_SIZE=16, SCALED=True, PDL=pdl), caches, capability)
    assert "div.rn.f32" in store and "div.rn.f32" in rope
    for split in (False, True):
        _decode_kernel_ptx("bf16", cache, half_products=True, scale_v=True, split=split,
                           capability=capability)
    _ptx(triton_unified._reduce_segments_kernel, dict(
        HEAD_DIM=128, HEAD_DIM_P=128, SEG_P=16, SCALE_V=True, PDL=pdl),
        {"out_ptr": "bf16"}, capability)


def test_a_float8_cache_converts_each_pair_of_values_once():
    """In float16 products a pair of float8 K or V values takes one conversion; bfloat16
    products would add one float16 -> bfloat16 conversion per value."""
    half = _decode_kernel_ptx("bf16", "fp8e4nv", half_products=True)
    assert half.count("cvt.rn.f16x2.e4m3x2") > 0 and half.count("cvt.bf16.f16") == 0
    bf16 = _decode_kernel_ptx("bf16", "fp8e4nv", half_products=False)
    assert bf16.count("cvt.bf16.f16") == 2 * bf16.count("cvt.rn.f16x2.e4m3x2") > 0


def test_an_e4m3_cache_needs_triton_s_e4m3_type():
    from pagoda.layers.attention.selector import float8_cache_error
    error = float8_cache_error((8, 0), torch.float8_e4m3fn)
    assert "8.9 or later" in error and "8.0" in error and "fp8_e5m2" in error
    assert float8_cache_error((8, 0), torch.float8_e5m2) is None
    assert float8_cache_error((8, 0), None) is None  # the model's dtype
    assert float8_cache_error((9, 0), torch.float8_e4m3fn) is None


def test_which_backends_hold_an_e4m3_cache(monkeypatch):
    from pagoda.layers.attention.selector import holds_e4m3_cache
    from pagoda.layers.triton_support import cuda_capability
    assert holds_e4m3_cache("auto", "cpu")
    for capability, held in (((8, 0), False), ((9, 0), True)):
        cuda_capability.cache_clear()  # the pretended device's answer, not a cached one
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
        assert holds_e4m3_cache("auto", "cuda:0") == held == holds_e4m3_cache("triton", "cuda:0")
        assert holds_e4m3_cache("torch", "cuda:0")
    cuda_capability.cache_clear()


def test_selector():
    from pagoda.errors import ConfigError
    from pagoda.layers.attention.selector import select_backend
    assert select_backend("auto", torch.device("cpu")).name == "torch"
    assert select_backend("torch", "cpu").name == "torch"
    with pytest.raises(ConfigError, match="CUDA"):
        select_backend("triton", "cpu")
    with pytest.raises(ConfigError, match="unknown attention backend"):
        select_backend("flash", "cpu")


if __name__ == "__main__":
    _run_interpreter_cases()
