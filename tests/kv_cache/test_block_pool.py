"""Block pool: ref counts, LRU free order, lazy eviction of cached blocks."""

import pytest

from pagoda.kv_cache.block_pool import NULL_BLOCK_ID, BlockPool


def test_null_block_is_never_handed_out():
    pool = BlockPool(4)
    assert pool.num_free_blocks == 3
    blocks = pool.allocate(3)
    assert NULL_BLOCK_ID not in [b.block_id for b in blocks]
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_free_order_is_lru():
    pool = BlockPool(5)
    a, b, c, d = pool.allocate(4)
    pool.free([c, a])
    pool.free([d, b])
    assert [blk.block_id for blk in pool.allocate(4)] == [c.block_id, a.block_id, d.block_id,
                                                            b.block_id]


def test_ref_counts_and_double_free():
    pool = BlockPool(3)
    (a,) = pool.allocate(1)
    pool.touch([a])
    assert a.ref_cnt == 2
    pool.free([a])
    assert pool.num_free_blocks == 1
    pool.free([a])
    assert pool.num_free_blocks == 2
    with pytest.raises(RuntimeError):
        pool.free([a])


def test_cached_block_survives_free_until_reused():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"h1")
    pool.free([a, b])
    assert pool.lookup(b"h1") is a
    pool.touch([a])  # a prefix hit revives it off the free list
    assert a.ref_cnt == 1 and pool.num_free_blocks == 1
    pool.free([a])
    pool.allocate(2)  # reuse evicts the hash lazily
    assert pool.lookup(b"h1") is None and a.block_hash is None


def test_first_writer_wins_for_duplicate_hash():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    pool.cache_block(a, b"h")
    pool.cache_block(b, b"h")
    assert pool.lookup(b"h") is a and b.block_hash is None


def test_reset_prefix_cache_only_when_idle():
    pool = BlockPool(3)
    (a,) = pool.allocate(1)
    pool.cache_block(a, b"h")
    assert not pool.reset_prefix_cache()
    pool.free([a])
    assert pool.reset_prefix_cache() and pool.lookup(b"h") is None
