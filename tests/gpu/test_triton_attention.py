"""Triton attention kernels on CUDA at real sizes vs a dense fp32 reference and torch_ref.

Tolerances (max abs and rel vs fp32 attention on the same rounded inputs): bf16 2e-2,
fp16 5e-3 (see tests.layers.test_triton_attention.tolerance). Run from the repo root:
    PYTHONPATH=. python -m pytest -q tests/gpu/test_triton_attention.py
"""

from __future__ import annotations

import pytest
import torch

from tests.layers.test_triton_attention import (
    Batch, check_against_dense, check_cache_written, dense_outputs, make_batch,
    reference_attention, run_triton, tolerance)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_CONTEXT = 8300  # "8k+": crosses 8192


def _contexts(batch: int, seed: int) -> list[int]:
    """Decode contexts: random in [0, MAX_CONTEXT), the first one always MAX_CONTEXT."""
    gen = torch.Generator().manual_seed(seed)
    return [MAX_CONTEXT] + torch.randint(0, MAX_CONTEXT, (batch - 1,), generator=gen).tolist()


def _plan_name(batch: Batch, num_segments: int | None) -> str:
    from pagoda.layers.attention.triton_backend import TritonAttentionBackend
    meta = TritonAttentionBackend(num_segments).build_metadata(batch.meta)
    plan = meta.plan(batch.q.shape[1], batch.k.shape[1], batch.q.shape[2], batch.q.dtype)
    return f"split{plan.num_segments}" if plan.num_segments > 1 else "unsplit"


def _run_and_check(batch: Batch, num_segments: int | None, scale: float,
                   expected: list[torch.Tensor]) -> float:
    """Max abs error vs dense of one forward (store + attention); checks the cache too."""
    before = batch.kv_cache.clone()
    out = run_triton(batch, scale, num_segments)
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
