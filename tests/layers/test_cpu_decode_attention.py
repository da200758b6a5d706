"""pagoda's CPU decode-attention kernel, each build this CPU runs (AVX-512, AVX2, generic),
against attention computed in float64 from the same cache: float32, bfloat16 and float8
caches (every float8 byte read as torch reads it), head dims, query heads per KV head, block
sizes, lengths around a block, windows, thread counts, queries read in place from a qkv
row; the KV store (index_copy_'s writes, a negative slot skipped); and where they step aside
(no compiler, float16 or strided caches, the variable)."""

from __future__ import annotations

import pytest
import torch

from pagoda.layers.attention import cpu_decode_attention
from pagoda.layers.attention.cpu_decode_attention import decode_attention
from tests.utils import on_thread_counts, pick_cpu_kernel_build


@pytest.fixture(params=list(cpu_decode_attention.BUILDS))
def build(request, monkeypatch):
    return pick_cpu_kernel_build(cpu_decode_attention, request, monkeypatch)


def paged_step(lengths, firsts, block_size, kv_heads, dim, dtype, seed=0):
    """A cache of [slots, kv_heads, dim] with each sequence's positions in shuffled blocks,
    and its block tables; slots no sequence sees hold NaN (a read of one shows)."""
    gen = torch.Generator().manual_seed(seed)
    blocks_each = [-(-n // block_size) for n in lengths]
    order = torch.randperm(sum(blocks_each) + 3, generator=gen).tolist()
    cache = torch.full((2, len(order) * block_size, kv_heads, dim), float("nan"))
    width = max(blocks_each)
    tables = torch.zeros(len(lengths), width, dtype=torch.int32)
    contexts = []
    for row, (n, first) in enumerate(zip(lengths, firsts)):
        tables[row, :blocks_each[row]] = torch.tensor(order[:blocks_each[row]])
        del order[:blocks_each[row]]
        pos = torch.arange(first, n)
        slots = tables[row, pos // block_size].long() * block_size + pos % block_size
        context = torch.randn(2, n - first, kv_heads, dim, generator=gen)
        cache[:, slots] = context
        contexts.append(context.to(dtype).double())
    return cache.to(dtype), tables, contexts


def expected_attention(q, contexts, scale):
    """q [n, heads, dim] over each row's context ([2, len, kv_heads, dim]), in float64."""
    rows = []
    for query, (k, v) in zip(q.double(), contexts):
        group = query.shape[0] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        weights = (torch.einsum("hd,lhd->hl", query, k) * scale).softmax(-1)
        rows.append(torch.einsum("hl,lhd->hd", weights, v))
    return torch.stack(rows)


def run_kernel(q, cache, tables, lengths, firsts, block_size, scale):
    return decode_attention(q, cache[0], cache[1], tables,
                            torch.tensor(lengths, dtype=torch.int32),
                            torch.tensor(firsts, dtype=torch.int32), block_size, scale)


@pytest.mark.parametrize("dtype", list(cpu_decode_attention.CACHE_TYPES))
@pytest.mark.parametrize("dim", [16, 64, 80, 128, 256])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (9, 3), (16, 2)])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_it_matches_float64_attention(build, dtype, dim, heads, kv_heads, block_size):
    lengths = [1, block_size - 1 or 1, block_size, block_size + 1, 70, 133]
    firsts = [0, 0, 0, 0, 0, 9]  # the last row in a window of 124
    cache, tables, contexts = paged_step(lengths, firsts, block_size, kv_heads, dim, dtype,
                                         seed=dim + heads + block_size)
    q = torch.randn(len(lengths), heads, dim, generator=torch.Generator().manual_seed(1))
    got = run_kernel(q, cache, tables, lengths, firsts, block_size, dim ** -0.5)
    assert got.dtype == torch.float32 and got.shape == q.shape
    torch.testing.assert_close(got.double(), expected_attention(q, contexts, dim ** -0.5),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("positions", [1, 16])  # one row; a run of 16 (AVX-512's own path)
def test_every_float8_byte_reads_as_torch_reads_it(build, dtype, positions):
    """Equal keys weigh equal values equally, so the output is the value row: every byte."""
    values = torch.arange(256, dtype=torch.uint8).view(dtype)
    cache = torch.zeros(2, 16, 1, 256, dtype=torch.uint8).view(dtype)
    cache[1, :positions, 0] = values
    tables = torch.zeros(1, 1, dtype=torch.int32)
    got = run_kernel(torch.randn(1, 1, 256), cache, tables, [positions], [0], 16, 0.0625)
    finite = values.float().isfinite()
    assert torch.equal(got[0, 0][finite], values.float()[finite])


def test_large_scores_do_not_overflow(build):
    """Scores in the thousands: the running maximum keeps every exponent finite (float32
    scores that large are within ~1e-4 of float64's, hence the wider bound)."""
    lengths, firsts = [50, 200], [0, 0]
    cache, tables, contexts = paged_step(lengths, firsts, 16, 2, 64, torch.float32)
    q = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(2)) * 100
    got = run_kernel(q, cache, tables, lengths, firsts, 16, 1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected_attention(q, contexts, 1.0),
                               rtol=1e-3, atol=1e-3)


def test_thread_count_never_changes_a_bit(build):
    lengths, firsts = [300, 17, 64, 5, 129], [0, 0, 0, 0, 100]
    cache, tables, _ = paged_step(lengths, firsts, 16, 4, 64, torch.float32)
    q = torch.randn(5, 8, 64, generator=torch.Generator().manual_seed(3))
    one, two = on_thread_counts(lambda: run_kernel(q, cache, tables, lengths, firsts, 16, 0.125))
    assert torch.equal(one, two)


def test_a_query_is_read_in_place_from_its_qkv_row(build):
    lengths, firsts = [40, 3, 17], [0, 0, 9]
    cache, tables, _ = paged_step(lengths, firsts, 16, 2, 64, torch.float32)
    qkv = torch.randn(3, (8 + 2 * 2) * 64, generator=torch.Generator().manual_seed(5))
    q = qkv[:, :8 * 64].view(3, 8, 64)  # rows 768 floats apart
    assert not q.is_contiguous()
    assert torch.equal(run_kernel(q, cache, tables, lengths, firsts, 16, 0.125),
                       run_kernel(q.contiguous(), cache, tables, lengths, firsts, 16, 0.125))


@pytest.mark.parametrize("dtype", cpu_decode_attention.STORED_TYPES)
def test_store_rows_writes_as_index_copy_and_skips_negative_slots(build, dtype):
    gen = torch.Generator().manual_seed(7)
    kv = torch.randn(4, 3 * 2 * 16, generator=gen) * 100
    rows = kv[:, 32:64].view(4, 2, 16)  # the k of a qkv row: rows 96 floats apart
    slots = torch.tensor([5, -1, 0, 9])
    cache = torch.randn(12, 2, 16, generator=gen).to(dtype)
    expected = cache.clone()
    expected.index_copy_(0, slots[slots >= 0], rows[slots >= 0].to(dtype))
    assert cpu_decode_attention.stores(cache, slots, rows)
    cpu_decode_attention.store_rows(cache, slots, rows)
    assert torch.equal(cache.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       expected.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_store_rows_takes_float32_rows_into_float32_or_bfloat16_caches_only():
    if cpu_decode_attention._library() is None:
        pytest.skip("the CPU decode-attention kernel does not build here")
    rows, slots = torch.zeros(2, 2, 8), torch.tensor([0, 1])
    assert cpu_decode_attention.stores(torch.zeros(4, 2, 8), slots, rows)
    assert not cpu_decode_attention.stores(torch.zeros(4, 2, 8, dtype=torch.float16), slots,
                                           rows)
    assert not cpu_decode_attention.stores(torch.zeros(4, 2, 8), slots.int(), rows)
    assert not cpu_decode_attention.stores(torch.zeros(4, 2, 8), slots, rows.bfloat16())
    assert not cpu_decode_attention.stores(torch.zeros(4, 2, 16)[..., ::2], slots, rows)
    assert not cpu_decode_attention.stores(torch.zeros(4, 2, 8), slots[:0], rows[:0])


def test_it_takes_cpu_float32_bfloat16_and_float8_caches_only():
    q = torch.zeros(1, 2, 8)
    if cpu_decode_attention._library() is None:
        pytest.skip("the CPU decode-attention kernel does not build here")
    for dtype in (torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        cache = torch.zeros(4, 2, 8, dtype=dtype)
        assert cpu_decode_attention.runs(q, cache, cache)
    half = torch.zeros(4, 2, 8, dtype=torch.float16)
    assert not cpu_decode_attention.runs(q, half, half)
    strided = torch.zeros(4, 2, 16)[..., ::2]
    assert not cpu_decode_attention.runs(q, strided, strided)


def test_the_variable_turns_it_off(monkeypatch):
    monkeypatch.setenv(cpu_decode_attention.VARIABLE, "0")
    cpu_decode_attention._library.cache_clear()
    try:
        cache = torch.zeros(4, 2, 8)
        assert not cpu_decode_attention.runs(torch.zeros(1, 2, 8), cache, cache)
    finally:
        cpu_decode_attention._library.cache_clear()


@pytest.mark.parametrize("compiler", ["no-such-compiler", "false"])
def test_without_a_working_compiler_decodes_use_sdpa(compiler, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", compiler)
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path))
    cpu_decode_attention._library.cache_clear()
    try:
        with caplog.at_level("INFO", logger=cpu_decode_attention.__name__):
            cache = torch.zeros(4, 2, 8)
            assert not cpu_decode_attention.runs(torch.zeros(1, 2, 8), cache, cache)
    finally:
        cpu_decode_attention._library.cache_clear()
    assert "torch's SDPA" in caplog.text
    assert not list(tmp_path.glob("kernels/*.so"))
