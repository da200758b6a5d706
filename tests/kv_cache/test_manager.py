"""KVCacheManager: prefix hits, allocation accounting, freeing."""

from pagoda.kv_cache.hashing import BlockHasher
from pagoda.kv_cache.manager import KVCacheManager
from pagoda.request import EngineCoreRequest, Request
from pagoda.sampling_params import SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int], **params) -> Request:
    core = EngineCoreRequest(rid, tokens, SamplingParams(max_tokens=8, **params))
    return Request.from_core_request(core, 8, 0)


def manager(num_blocks: int = 16, caching: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks, BS, caching, BlockHasher(BS, "m"))


def run_prefill(kv: KVCacheManager, req: Request) -> list[int]:
    blocks, hit = kv.get_computed_blocks(req)
    ids = kv.allocate_slots(req, req.num_tokens - hit, blocks, hit)
    assert ids is not None
    req.num_computed_tokens = req.num_tokens
    return kv.block_ids(req.request_id)[0]


def test_second_request_hits_shared_prefix():
    kv = manager()
    a = make_request("a", list(range(10)))
    a_blocks = run_prefill(kv, a)
    b = make_request("b", list(range(8)) + [99, 98, 97])
    blocks, hit = kv.get_computed_blocks(b)
    assert hit == 8 and [blk.block_id for blk in blocks[0]] == a_blocks[:2]


def test_hit_leaves_at_least_one_token_to_compute():
    kv = manager()
    run_prefill(kv, make_request("a", list(range(8))))
    _, hit = kv.get_computed_blocks(make_request("b", list(range(8))))
    assert hit == 4


def test_hit_after_owner_finished_until_evicted():
    kv = manager(num_blocks=5)
    a = make_request("a", list(range(9)))
    run_prefill(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 4
    _, hit = kv.get_computed_blocks(make_request("b", list(range(9))))
    assert hit == 8
    filler = make_request("c", [7] * 16)
    assert kv.allocate_slots(filler, 16) is not None  # takes every block, evicting the cache
    kv.free(filler)
    _, hit = kv.get_computed_blocks(make_request("d", list(range(9))))
    assert hit == 0


def test_allocation_fails_cleanly_when_full():
    kv = manager(num_blocks=3)
    a = make_request("a", list(range(8)))
    assert kv.allocate_slots(a, 8) is not None
    b = make_request("b", list(range(100, 105)))
    assert kv.allocate_slots(b, 5) is None
    assert kv.num_free_blocks == 0 and "b" not in kv.req_blocks
    kv.free(a)
    assert kv.num_free_blocks == 2


def test_reviving_free_cached_blocks_counts_against_free_space():
    kv = manager(num_blocks=4)
    a = make_request("a", list(range(8)))
    run_prefill(kv, a)
    kv.free(a)
    b = make_request("b", list(range(8)) + [5] * 5)
    blocks, hit = kv.get_computed_blocks(b)
    assert hit == 8
    # 13 tokens need 4 blocks: 2 revived hits + 2 new, but only 3 are free in total
    assert kv.allocate_slots(b, 5, blocks, hit) is None
    assert kv.num_free_blocks == 3


def test_prompt_logprobs_requests_skip_the_cache():
    kv = manager()
    run_prefill(kv, make_request("a", list(range(10))))
    _, hit = kv.get_computed_blocks(make_request("b", list(range(10)), prompt_logprobs=1))
    assert hit == 0


def test_without_prefix_caching_only_siblings_share():
    kv = manager(caching=False)
    core = EngineCoreRequest("p#0", list(range(10)), SamplingParams(max_tokens=4),
                             parent_id="p")
    run_prefill(kv, Request.from_core_request(core, 4, 0))
    sibling = Request.from_core_request(
        EngineCoreRequest("p#1", list(range(10)), SamplingParams(max_tokens=4), parent_id="p"),
        4, 1)
    assert kv.get_computed_blocks(sibling)[1] == 8
    stranger = make_request("x", list(range(10)))
    assert kv.get_computed_blocks(stranger)[1] == 0


# ---- KV groups: a full-attention group and sliding-window groups ---------------------------
WINDOW = 8  # with BS = 4: a hit needs the 2 blocks before its end cached in a local group


def hybrid(num_blocks: int = 64, windows=(None, WINDOW), caching: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks, BS, caching, BlockHasher(BS, "m"), windows)


def run_chunks(kv: KVCacheManager, req: Request, chunk: int, check=None) -> None:
    """Prefill (and decode) the request `chunk` tokens a step, as the scheduler would."""
    if req.num_computed_tokens == 0 and req.request_id not in kv.req_blocks:
        blocks, hit = kv.get_computed_blocks(req)
        n = min(chunk, req.num_tokens - hit)
        assert kv.allocate_slots(req, n, blocks, hit) is not None
        req.num_computed_tokens = hit + n
    while req.num_computed_tokens < req.num_tokens:
        n = min(chunk, req.num_tokens - req.num_computed_tokens)
        assert kv.allocate_slots(req, n) is not None
        req.num_computed_tokens += n
        if check is not None:
            check(req)


def held(kv: KVCacheManager, rid: str, group: int) -> list[int]:
    return [b for b in kv.block_ids(rid)[group] if b != 0]


def test_local_blocks_are_freed_as_the_window_slides():
    kv = hybrid()
    req = make_request("a", list(range(40)))
    peak = []
    run_chunks(kv, req, 8, lambda r: peak.append(len(held(kv, "a", 1))))
    tables = kv.block_ids("a")
    assert len(tables[0]) == len(tables[1]) == 10
    assert 0 not in tables[0]  # full attention keeps everything
    # the last step started at 32: its first query sees 25.. -> blocks 0..5 are gone
    assert tables[1][:6] == [0] * 6 and 0 not in tables[1][6:]
    assert max(peak) <= 5  # the window before a chunk and the chunk: seq_blocks(8, 40, 8, 4)
    assert kv.num_free_blocks == 63 - 10 - 4


def test_decode_holds_at_most_the_window_plus_one_block():
    kv = hybrid()
    req = make_request("a", list(range(64)))
    peak = []
    run_chunks(kv, req, 1, lambda r: peak.append(len(held(kv, "a", 1))))
    assert max(peak) == 3 and len(held(kv, "a", 0)) == 16


def test_freed_local_blocks_stay_hits_and_the_hit_needs_only_the_window():
    kv = hybrid()
    a = make_request("a", list(range(40)))
    run_chunks(kv, a, 8)
    a_tables = kv.block_ids("a")
    kv.free(a)
    assert kv.num_free_blocks == 63
    b = make_request("b", list(range(40)) + [99])
    blocks, hit = kv.get_computed_blocks(b)
    assert hit == 40
    assert [x.block_id for x in blocks[0]] == a_tables[0]
    local = [x.block_id for x in blocks[1]]
    assert local[:8] == [0] * 8  # out of the window of the first new token (position 40)
    assert local[8:] == a_tables[1][8:]
    assert kv.allocate_slots(b, 1, blocks, hit) is not None
    assert kv.num_free_blocks == 63 - 11 - 3  # 10 revived + 1 new, 2 revived + 1 new


def test_the_same_tokens_are_cached_once_per_group():
    kv = hybrid()
    a = make_request("a", list(range(40)))
    run_chunks(kv, a, 40)
    assert len(kv.pool.cached) == 2 * 10
    ids = kv.block_ids("a")
    assert set(ids[0]).isdisjoint(ids[1])


def evict(kv: KVCacheManager, rid_tables: list[list[int]], group: int, index: int) -> None:
    """Drop one cached block of a group from the prefix cache (as eviction would)."""
    block = kv.pool.blocks[rid_tables[group][index]]
    del kv.pool.cached[block.block_hash]
    block.block_hash = None


def test_a_missing_window_block_moves_the_hit_back_for_every_group():
    kv = hybrid()
    a = make_request("a", list(range(40)))
    run_chunks(kv, a, 40)  # one step: every local block stays until the end
    tables = kv.block_ids("a")
    kv.free(a)
    evict(kv, tables, 1, 9)
    blocks, hit = kv.get_computed_blocks(make_request("b", list(range(41))))
    assert hit == 36  # blocks 7 and 8 hold the window before position 36
    assert [x.block_id for x in blocks[0]] == tables[0][:9]
    assert [x.block_id for x in blocks[1]] == [0] * 7 + tables[1][7:9]


def test_groups_agree_on_the_longest_hit_valid_for_all():
    kv = hybrid(windows=(None, WINDOW, WINDOW))
    a = make_request("a", list(range(40)))
    run_chunks(kv, a, 40)
    tables = kv.block_ids("a")
    kv.free(a)
    for group, index in ((1, 9), (1, 5), (2, 7)):
        evict(kv, tables, group, index)
    # group 1 cuts 10 -> 9, group 2 cuts 9 -> 7, then group 1 must cut 7 -> 5
    blocks, hit = kv.get_computed_blocks(make_request("b", list(range(41))))
    assert hit == 20
    assert [[x.block_id for x in g] for g in blocks] == [
        tables[0][:5], [0] * 3 + tables[1][3:5], [0] * 3 + tables[2][3:5]]


def test_a_short_hit_keeps_every_block_of_the_local_group():
    kv = hybrid()
    a = make_request("a", list(range(40)))
    run_chunks(kv, a, 40)
    tables = kv.block_ids("a")
    kv.free(a)
    evict(kv, tables, 0, 1)
    blocks, hit = kv.get_computed_blocks(make_request("b", list(range(41))))
    assert hit == 4 and [x.block_id for x in blocks[1]] == tables[1][:1]


def test_preempted_request_recomputes_from_its_own_cached_blocks():
    kv = hybrid(num_blocks=32)
    a = make_request("a", list(range(40)))
    run_chunks(kv, a, 8)
    kv.free(a)  # preempted: everything goes back, hashes kept
    assert kv.num_free_blocks == 31 and not kv.req_blocks
    a.num_computed_tokens = 0
    blocks, hit = kv.get_computed_blocks(a)
    assert hit == 36
    assert kv.allocate_slots(a, 4, blocks, hit) is not None
    assert len(held(kv, "a", 0)) == 10 and len(held(kv, "a", 1)) == 3


def test_allocation_failure_leaves_nothing_behind_in_any_group():
    kv = hybrid(num_blocks=12)
    a = make_request("a", list(range(16)))
    assert kv.allocate_slots(a, 16) is not None  # 4 blocks in each group
    b = make_request("b", list(range(100, 116)))
    assert kv.allocate_slots(b, 16) is None  # needs 8, 3 free
    assert "b" not in kv.req_blocks and kv.num_free_blocks == 3
    kv.free(a)
    assert kv.num_free_blocks == 11


def test_siblings_share_the_prompt_window_without_prefix_caching():
    kv = hybrid(caching=False)
    prompt = list(range(40))
    first = Request.from_core_request(EngineCoreRequest(
        "p#0", prompt, SamplingParams(max_tokens=4), parent_id="p"), 4, 0)
    run_chunks(kv, first, 8)
    sibling = Request.from_core_request(EngineCoreRequest(
        "p#1", prompt, SamplingParams(max_tokens=4), parent_id="p"), 4, 1)
    blocks, hit = kv.get_computed_blocks(sibling)
    assert hit == 36
    # the window before position 36 is still held by the first sibling: shared, not copied
    assert [x.block_id for x in blocks[1]][7:] == kv.block_ids("p#0")[1][7:9]
    free_before = kv.num_free_blocks
    assert kv.allocate_slots(sibling, 4, blocks, hit) is not None
    assert kv.num_free_blocks == free_before - 2  # one new block per group
    stranger = make_request("x", prompt)
    assert kv.get_computed_blocks(stranger)[1] == 0


def test_freed_window_blocks_let_more_requests_run_at_once():
    """Three 40-token prompts in 8-token chunks: without freeing each holds 10 + 10 blocks
    (60 in all), with it 10 + at most 5."""
    kv = hybrid(num_blocks=46)
    reqs = [make_request(f"r{i}", [i] * 40) for i in range(3)]
    for req in reqs:
        kv.allocate_slots(req, 8)
        req.num_computed_tokens = 8
    for _ in range(4):
        for req in reqs:
            assert kv.allocate_slots(req, 8) is not None
            req.num_computed_tokens += 8
    assert all(len(held(kv, r.request_id, 1)) <= 5 for r in reqs)
    unfreed = hybrid(num_blocks=46, windows=(None, None))
    for req in reqs:
        req.num_computed_tokens = 0
    assert [unfreed.allocate_slots(r, 40) is not None for r in reqs] == [True, True, False]


def test_every_groups_hits_are_taken_before_any_group_allocates():
    """A hit of one group may sit at the head of the free list: another group's new blocks
    must not be taken from under it."""
    kv = hybrid(num_blocks=21)
    a = make_request("a", list(range(40)))
    run_chunks(kv, a, 40)
    kv.free(a)  # every free block is one of a's, the tails (both groups' hits) first in line
    b = make_request("b", list(range(41)))
    blocks, hit = kv.get_computed_blocks(b)
    assert hit == 40 and kv.allocate_slots(b, 1, blocks, hit) is not None
    held_ids = held(kv, "b", 0) + held(kv, "b", 1)
    assert len(set(held_ids)) == len(held_ids) == 11 + 3
    assert all(kv.pool.blocks[i].ref_cnt == 1 for i in held_ids)


def test_a_window_of_one_token_needs_no_cached_block_for_a_hit():
    """Each query then reads only its own K and V: any prefix is a hit, with null blocks."""
    kv = hybrid(windows=(1,))
    blocks, hit = kv.get_computed_blocks(make_request("b", list(range(100, 141))))
    assert hit == 40 and {x.block_id for x in blocks[0]} == {0}
    a = make_request("a", list(range(40)))
    a.num_computed_tokens = 8
    kv.allocate_slots(a, 8)  # not a hit: a chunk [8, 16) after a computed [0, 8)
    a.num_computed_tokens = 16
    kv.allocate_slots(a, 8)
    assert kv.block_ids("a")[0] == [0, 0, 0, 0] + held(kv, "a", 0) and len(held(kv, "a", 0)) == 2
