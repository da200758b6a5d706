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
    return kv.block_ids(req.request_id)


def test_second_request_hits_shared_prefix():
    kv = manager()
    a = make_request("a", list(range(10)))
    a_blocks = run_prefill(kv, a)
    b = make_request("b", list(range(8)) + [99, 98, 97])
    blocks, hit = kv.get_computed_blocks(b)
    assert hit == 8 and [blk.block_id for blk in blocks] == a_blocks[:2]


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
