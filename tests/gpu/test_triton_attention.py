"""Triton attention kernels on CUDA at real sizes vs a dense fp32 reference and torch_ref.

Tolerances (max abs and rel vs fp32 attention on the same rounded inputs): bf16 2e-2,
fp16 5e-3 (see tests.layers.test_triton_attention.tolerance). Run from the repo root:
    PYTHONPATH=. python -m pytest -q tests/gpu/test_triton_attention.py
"""

from __future__ import annotations

import pytest
import torch

from tests.layers.test_triton_attention import (
    Batch,
    check_against_dense,
    check_cache_written,
    dense_outputs,
    make_batch,
    poison_out_of_window,
    reference_attention,
    run_triton,
    tolerance,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_CONTEXT = 8300  # "8k+": crosses 8192


def _contexts(batch: int, seed: int) -> list[int]:
    """Decode contexts: random in [0, MAX_CONTEXT), the first one always MAX_CONTEXT."""
    gen = torch.Generator().manual_seed(seed)
    return [MAX_CONTEXT] + torch.randint(0, MAX_CONTEXT, (batch - 1,), generator=gen).tolist()


def _plan_name(batch: Batch, num_segments: int | None, window: int | None = None) -> str:
    from pagoda.layers.attention.triton_backend import TritonAttentionBackend
    meta = TritonAttentionBackend(num_segments).build_metadata(batch.meta)
    plan = meta.plan(batch.q.shape[1], batch.k.shape[1], batch.q.shape[2], batch.q.dtype,
                     window)
    return f"split{plan.num_segments}" if plan.num_segments > 1 else "unsplit"


def _run_and_check(batch: Batch, num_segments: int | None, scale: float,
                   expected: list[torch.Tensor], window: int | None = None) -> float:
    """Max abs error vs dense of one forward (store + attention); checks the cache too."""
    before = batch.kv_cache.clone()
    out = run_triton(batch, scale, num_segments, window=window)
    check_cache_written(batch, before)
    return check_against_dense(batch, out, scale, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads", [(32, 8), (32, 4)], ids=["gqa4", "gqa8"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("batch_size", [1, 8, 64, 256])
def test_decode_batches(batch_size, head_dim, heads, kv_heads, dtype, gpu_report):
    """Decode-only batches, unsplit, split and the heuristic's choice, contexts up to 8k+."""
    seqs = [(c, 1) for c in _contexts(batch_size, seed=batch_size)]
    batch = make_batch(seqs, block_size=16, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       dtype=DTYPES[dtype], device="cuda", seed=batch_size + head_dim)
    scale = head_dim ** -0.5
    expected = dense_outputs(batch, scale)
    for variant, segments in (("auto", None), ("unsplit", 1), ("split8", 8), ("split32", 32)):
        err = float("nan")
        try:
            err = _run_and_check(batch, segments, scale, expected)
        finally:
            gpu_report(kind="decode", variant=variant, plan=_plan_name(batch, segments),
                       dtype=dtype, B=batch_size, D=head_dim, H=heads, KVH=kv_heads,
                       max_ctx=max(c for c, _ in seqs) + 1, max_err=err,
                       tol=tolerance(batch.q.dtype)["atol"])


MIXED_PREFILLS = [(0, 2048), (6000, 2048), (8192, 512), (300, 1000), (0, 7), (100, 33)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads", [(32, 8), (32, 4)], ids=["gqa4", "gqa8"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_prefill_and_decode(head_dim, heads, kv_heads, dtype, gpu_report):
    """Prefill chunks up to 2048 tokens over cached context plus 60 decodes, one launch;
    also equal to the torch_ref backend."""
    from pagoda.layers.attention.torch_ref import TorchAttentionBackend
    seqs = MIXED_PREFILLS + [(c, 1) for c in _contexts(60, seed=head_dim)]
    batch = make_batch(seqs, block_size=16, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       dtype=DTYPES[dtype], device="cuda", seed=head_dim + kv_heads)
    scale = head_dim ** -0.5
    before = batch.kv_cache.clone()
    err = ref_err = float("nan")
    try:
        out = run_triton(batch, scale)
        check_cache_written(batch, before)
        err = check_against_dense(batch, out, scale)
        backend = TorchAttentionBackend()
        ref = backend.forward(batch.q, batch.k, batch.v, before, backend.build_metadata(batch.meta),
                              scale)
        ref_err = (out.float() - ref.float()).abs().max().item()
        tol = {key: 2 * value for key, value in tolerance(batch.q.dtype).items()}
        torch.testing.assert_close(out, ref, **tol)  # both sides carry rounding error
    finally:
        gpu_report(kind="mixed", variant="auto", plan=_plan_name(batch, None), dtype=dtype,
                   B=len(seqs), D=head_dim, H=heads, KVH=kv_heads, tokens=batch.num_real_tokens,
                   max_err=err, err_vs_torch_ref=ref_err, tol=tolerance(batch.q.dtype)["atol"])


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (16, 2, 96), (8, 8, 128)],
                         ids=["smollm2", "gqa8_dim96", "mha"])
def test_other_shapes(heads, kv_heads, head_dim, block_size, gpu_report):
    """GQA 3 (SmolLM2), a non-power-of-two head dim, MHA; larger pages; split and unsplit."""
    seqs = [(0, 300), (1000, 129), (5, 1), (4000, 1), (70, 1)]
    batch = make_batch(seqs, block_size=block_size, heads=heads, kv_heads=kv_heads,
                       head_dim=head_dim, dtype=torch.bfloat16, device="cuda", seed=block_size)
    expected = dense_outputs(batch, head_dim ** -0.5)
    for variant, segments in (("auto", None), ("split4", 4)):
        err = float("nan")
        try:
            err = _run_and_check(batch, segments, head_dim ** -0.5, expected)
        finally:
            gpu_report(kind="shape", variant=variant, plan=_plan_name(batch, segments),
                       dtype="bf16", B=len(seqs), D=head_dim, H=heads, KVH=kv_heads,
                       block=block_size, max_err=err, tol=2e-2)


def test_padding_tokens_are_skipped(gpu_report):
    """CUDA-graph padding: extra tokens with slot -1 write nothing and do not disturb others."""
    seqs = [(c, 1) for c in _contexts(13, seed=5)]
    batch = make_batch(seqs, block_size=16, heads=32, kv_heads=8, head_dim=128,
                       dtype=torch.bfloat16, device="cuda", seed=1, pad_tokens=19)
    expected = dense_outputs(batch, 128 ** -0.5)
    for segments in (1, 4):
        err = _run_and_check(batch, segments, 128 ** -0.5, expected)
        gpu_report(kind="padding", variant=f"segments={segments}", dtype="bf16", B=13,
                   max_err=err, tol=2e-2)


def test_store_kv_real_size(gpu_report):
    """4096 tokens into a 16-token-page cache, every 7th slot -1, k/v strided views."""
    from pagoda.layers.attention.triton_kv_store import store_kv
    gen = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.randn(2, 4096, 16, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    qkv = torch.randn(4096, 48, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = qkv[:, 32:40], qkv[:, 40:48]
    slots = torch.randperm(4095 * 16, device="cuda", generator=gen)[:4096] + 16
    slots[::7] = -1
    before = cache.clone()
    store_kv(k, v, cache[0], cache[1], slots)
    expected = before.flatten(1, 2)
    keep = slots >= 0
    expected[0, slots[keep]] = k[keep]
    expected[1, slots[keep]] = v[keep]
    ok = torch.equal(cache.flatten(1, 2), expected)
    gpu_report(kind="store", variant="slot -1 skipped", B=4096, max_err=0.0 if ok else 1.0)
    assert ok


@pytest.mark.parametrize("batch_size", [4, 64])
def test_decode_cuda_graph_replay(batch_size, gpu_report):
    """Capture store + attention for a decode batch, then replay with new q/k/v and shorter
    contexts written into the same tensors: results track the new data."""
    from pagoda.layers.attention.triton_backend import TritonAttentionBackend
    contexts = _contexts(batch_size, seed=9)
    seqs = [(c, 1) for c in contexts]
    batch = make_batch(seqs, block_size=16, heads=32, kv_heads=8, head_dim=128,
                       dtype=torch.bfloat16, device="cuda", seed=2)
    backend = TritonAttentionBackend()
    meta = backend.build_metadata(batch.meta)
    scale = 128 ** -0.5
    q, k, v, cache = batch.q, batch.k, batch.v, batch.kv_cache
    backend.forward(q, k, v, cache, meta, scale)  # compile and allocate outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, cache, meta, scale)

    gen = torch.Generator(device="cuda").manual_seed(3)
    new_lens = [max(1, (c + 1) // (2 if i % 2 else 1)) for i, c in enumerate(contexts)]
    pos = torch.tensor(new_lens, device="cuda") - 1
    rows = torch.arange(batch_size, device="cuda")
    table = batch.meta.block_tables.long()
    batch.meta.slot_mapping.copy_(table[rows, pos // 16] * 16 + pos % 16)
    batch.meta.seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32, device="cuda"))
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape, generator=gen, device="cuda", dtype=t.dtype))
    graph.replay()
    torch.cuda.synchronize()
    err = 0.0
    for i, n in enumerate(new_lens):
        keys = torch.cat([batch.keys[i][:n - 1], k[i:i + 1]])
        values = torch.cat([batch.values[i][:n - 1], v[i:i + 1]])
        expected = reference_attention(q[i:i + 1], keys, values, scale)
        err = max(err, (out[i:i + 1].float() - expected).abs().max().item())
        torch.testing.assert_close(out[i:i + 1].float(), expected, atol=2e-2, rtol=2e-2)
    gpu_report(kind="cuda-graph", variant=_plan_name(batch, None), dtype="bf16", B=batch_size,
               max_err=err, tol=2e-2)


# Sliding window. (heads, kv_heads, head_dim, window): Gemma 3 1B (local layers of 512),
# Gemma 3 12B with a window that is no multiple of the block (16) or the tile (64/32), and
# Mistral 7B (4096). Every K/V no query may see holds inf, so reading one fails the test.
WINDOW_SHAPES = [(4, 1, 256, 512), (16, 8, 256, 1000), (32, 8, 128, 4096)]
WINDOW_IDS = ["gemma3_1b_w512", "gemma3_12b_w1000", "mistral_w4096"]


@pytest.mark.parametrize("heads, kv_heads, head_dim, window", WINDOW_SHAPES, ids=WINDOW_IDS)
@pytest.mark.parametrize("batch_size", [1, 8, 64])
def test_sliding_window_decode(batch_size, heads, kv_heads, head_dim, window, gpu_report):
    """Decode batches with contexts up to 8k+ (far past the window), unsplit, split (the
    segments divide only the window's tiles; with 32, many are empty) and the heuristic."""
    seqs = [(c, 1) for c in _contexts(batch_size, seed=batch_size + window)]
    batch = make_batch(seqs, block_size=16, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       dtype=torch.bfloat16, device="cuda", seed=batch_size + head_dim)
    poison_out_of_window(batch, window)
    scale = head_dim ** -0.5
    expected = dense_outputs(batch, scale, window)
    for variant, segments in (("auto", None), ("unsplit", 1), ("split3", 3), ("split32", 32)):
        err = float("nan")
        try:
            err = _run_and_check(batch, segments, scale, expected, window)
        finally:
            gpu_report(kind="window-decode", variant=variant,
                       plan=_plan_name(batch, segments, window), dtype="bf16", B=batch_size,
                       D=head_dim, H=heads, KVH=kv_heads, window=window,
                       max_ctx=max(c for c, _ in seqs) + 1, max_err=err, tol=2e-2)


WINDOW_PREFILLS = [(0, 2048), (6000, 2048), (8192, 512), (300, 1000), (0, 7), (100, 33),
                   (1500, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim, window", WINDOW_SHAPES, ids=WINDOW_IDS)
def test_sliding_window_mixed(heads, kv_heads, head_dim, window, dtype, gpu_report):
    """Prefill chunks longer than the window, chunks whose cached context reaches past it,
    plus 40 decodes, one launch; also equal to the torch_ref backend with the same window."""
    from pagoda.layers.attention.torch_ref import TorchAttentionBackend
    seqs = WINDOW_PREFILLS + [(c, 1) for c in _contexts(40, seed=head_dim + window)]
    batch = make_batch(seqs, block_size=16, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       dtype=DTYPES[dtype], device="cuda", seed=head_dim + window)
    poison_out_of_window(batch, window)
    scale = head_dim ** -0.5
    before = batch.kv_cache.clone()
    err = ref_err = float("nan")
    try:
        out = run_triton(batch, scale, window=window)
        check_cache_written(batch, before)
        err = check_against_dense(batch, out, scale, window=window)
        backend = TorchAttentionBackend()
        ref = backend.forward(batch.q, batch.k, batch.v, before, backend.build_metadata(batch.meta),
                              scale, window)
        ref_err = (out.float() - ref.float()).abs().max().item()
        tol = {key: 2 * value for key, value in tolerance(batch.q.dtype).items()}
        torch.testing.assert_close(out, ref, **tol)  # both sides carry rounding error
    finally:
        gpu_report(kind="window-mixed", variant="auto", plan=_plan_name(batch, None, window),
                   dtype=dtype, B=len(seqs), D=head_dim, H=heads, KVH=kv_heads, window=window,
                   tokens=batch.num_real_tokens, max_err=err, err_vs_torch_ref=ref_err,
                   tol=tolerance(batch.q.dtype)["atol"])


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("window", [1, 100, 777])
def test_sliding_window_blocks(block_size, window, gpu_report):
    """Windows of one token, below a tile, and unaligned, over larger pages; with speculative
    (4-query) rows split into segments too."""
    seqs = [(0, 300), (1000, 129), (5, 1), (4000, 1), (70, 1), (2000, 4)]
    batch = make_batch(seqs, block_size=block_size, heads=9, kv_heads=3, head_dim=64,
                       dtype=torch.bfloat16, device="cuda", seed=block_size + window)
    poison_out_of_window(batch, window)
    expected = dense_outputs(batch, 64 ** -0.5, window)
    for variant, segments in (("auto", None), ("split4", 4)):
        err = float("nan")
        try:
            err = _run_and_check(batch, segments, 64 ** -0.5, expected, window)
        finally:
            gpu_report(kind="window-shape", variant=variant,
                       plan=_plan_name(batch, segments, window), dtype="bf16", B=len(seqs),
                       block=block_size, window=window, max_err=err, tol=2e-2)


def _cached_kv(kv_cache: torch.Tensor, table: torch.Tensor, seq_len: int,
               block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's K and V at positions [0, seq_len), gathered from the cache."""
    pos = torch.arange(seq_len, device=kv_cache.device)
    slots = table[pos // block_size].long() * block_size + pos % block_size
    flat = kv_cache.flatten(1, 2)
    return flat[0, slots], flat[1, slots]


def test_window_and_full_layers_in_one_graph(gpu_report):
    """One CUDA graph holding a sliding-window layer and a full layer (own caches and q/k/v,
    one step's metadata), as a Gemma 3 step does; replayed with new q/k/v and new lengths,
    both layers stay exact."""
    from pagoda.layers.attention.triton_backend import TritonAttentionBackend
    window, scale, batch_size = 512, 256 ** -0.5, 8
    contexts = _contexts(batch_size, seed=21)
    batch = make_batch([(c, 1) for c in contexts], block_size=16, heads=4, kv_heads=1,
                       head_dim=256, dtype=torch.bfloat16, device="cuda", seed=3)
    full_cache = torch.randn_like(batch.kv_cache)
    full_cache[:, 0] = 0.0
    layers = [(batch.q, batch.k, batch.v, batch.kv_cache, window),
              (torch.randn_like(batch.q), torch.randn_like(batch.k), torch.randn_like(batch.v),
               full_cache, None)]
    backend = TritonAttentionBackend()
    meta = backend.build_metadata(batch.meta)

    def step() -> list[torch.Tensor]:
        return [backend.forward(q, k, v, cache, meta, scale, w) for q, k, v, cache, w in layers]
    step()  # compile and allocate (both plans and their workspaces) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()

    gen = torch.Generator(device="cuda").manual_seed(5)
    new_lens = [max(1, (c + 1) // (3 if i % 2 else 1)) for i, c in enumerate(contexts)]
    pos = torch.tensor(new_lens, device="cuda") - 1
    table = batch.meta.block_tables
    batch.meta.slot_mapping.copy_(table[torch.arange(batch_size, device="cuda"), pos // 16]
                                  .long() * 16 + pos % 16)
    batch.meta.seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32, device="cuda"))
    for q, k, v, _, _ in layers:
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, generator=gen, device="cuda", dtype=t.dtype))
    graph.replay()
    torch.cuda.synchronize()
    err = 0.0
    for (q, k, v, cache, w), out in zip(layers, outs):
        for i, n in enumerate(new_lens):
            keys, values = _cached_kv(cache, table[i], n, 16)
            assert torch.equal(keys[-1], k[i]) and torch.equal(values[-1], v[i]), "not stored"
            expected = reference_attention(q[i:i + 1], keys, values, scale, window=w)
            err = max(err, (out[i:i + 1].float() - expected).abs().max().item())
            torch.testing.assert_close(out[i:i + 1].float(), expected, atol=2e-2, rtol=2e-2)
    gpu_report(kind="cuda-graph", variant="window512+full",
               plan=f"{_plan_name(batch, None, window)}+{_plan_name(batch, None)}",
               dtype="bf16", B=batch_size, max_err=err, tol=2e-2)


# (decodes, (heads, kv heads, head dim)): on 132 multiprocessors split (1), split and
# capped (8: 512 programs), unsplit (24 at dim 128, 48 at dim 256: 192 programs)
NEW_TOKEN_CASES = [(1, (32, 8, 128)), (8, (32, 8, 128)), (24, (32, 8, 128)),
                   (1, (8, 4, 256)), (8, (8, 4, 256)), (48, (8, 4, 256))]


@pytest.mark.parametrize("batch_size, shape", NEW_TOKEN_CASES,
                         ids=[f"{b}-dim{s[2]}" for b, s in NEW_TOKEN_CASES])
def test_decode_rope_and_store_in_the_attention_kernel(batch_size, shape):
    """NewToken on the GPU, where it reads its first KV tile before the PDL wait, split,
    split with its registers capped, and unsplit, at head dims 128 and 256, bfloat16,
    contexts up to 8k+: outputs within bfloat16's tolerance of the torch backend's and of
    the separate RoPE-and-store launch's, the cache exactly the latter's (both kernels round
    RoPE alike: fused.rope_rotation)."""
    from tests.layers.test_triton_attention import _rotary_decode_case
    decodes = [(c, 1) for c in _contexts(batch_size, seed=batch_size + shape[2])]
    _rotary_decode_case(None, None, None, torch.bfloat16, decodes, shape, device="cuda")
