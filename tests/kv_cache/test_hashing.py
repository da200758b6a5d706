"""Block hashes: chained, seeded, salted."""

from pagoda.kv_cache.hashing import BlockHasher


def test_only_full_blocks_are_hashed_and_extension_is_incremental():
    hasher = BlockHasher(4, "m")
    hashes: list[bytes] = []
    hasher.extend(hashes, list(range(10)), None)
    assert len(hashes) == 2
    hasher.extend(hashes, list(range(12)), None)
    assert len(hashes) == 3
    fresh: list[bytes] = []
    hasher.extend(fresh, list(range(12)), None)
    assert fresh == hashes


def test_chain_depends_on_the_whole_prefix():
    hasher = BlockHasher(2, "m")
    a: list[bytes] = []
    b: list[bytes] = []
    hasher.extend(a, [1, 2, 3, 4], None)
    hasher.extend(b, [9, 2, 3, 4], None)
    assert a[1] != b[1]  # same second block, different parent


def test_seed_model_and_salt_separate_hashes():
    tokens = [1, 2, 3, 4]
    base = BlockHasher(4, "m", seed=b"s" * 32)
    variants = [BlockHasher(4, "m", seed=b"t" * 32), BlockHasher(4, "other", seed=b"s" * 32)]
    ref: list[bytes] = []
    base.extend(ref, tokens, None)
    for hasher in variants:
        out: list[bytes] = []
        hasher.extend(out, tokens, None)
        assert out != ref
    salted: list[bytes] = []
    base.extend(salted, tokens, "tenant-a")
    assert salted != ref
    again: list[bytes] = []
    base.extend(again, tokens, None)
    assert again == ref


def test_token_ids_beyond_32_bits_do_not_collide():
    hasher = BlockHasher(1, "m")
    a: list[bytes] = []
    b: list[bytes] = []
    hasher.extend(a, [1], None)
    hasher.extend(b, [1 + (1 << 32)], None)
    assert a != b
