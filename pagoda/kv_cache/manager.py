"""KVCacheManager: the scheduler's only view of KV memory."""

from __future__ import annotations

from dataclasses import dataclass

from pagoda.kv_cache.block_pool import BlockPool, KVBlock
from pagoda.kv_cache.hashing import BlockHasher
from pagoda.request import Request


@dataclass(slots=True)
class PrefixCacheStats:
    """Counters for prefix-cache lookups, in tokens (vLLM's queries/hits meaning)."""

    queries: int = 0
    hits: int = 0
    requests: int = 0


class KVCacheManager:
    """Finds cached prefixes, allocates slots for scheduled tokens, frees finished requests."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 hasher: BlockHasher) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.hasher = hasher
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self._num_cached: dict[str, int] = {}  # leading blocks already published per request
        self.stats = PrefixCacheStats()

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_usable_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest run of cached full blocks that prefixes the request (at least one token
        is always left to compute, so the model produces logits for the next one)."""
        if request.sampling_params.prompt_logprobs is not None:
            return [], 0  # every prompt position's logits are needed
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None,
                       num_computed_hit_tokens: int = 0) -> list[int] | None:
        """Reserve blocks so the request can hold num_new_tokens more tokens after its computed
        ones (plus any prefix hit). Returns the new block ids, or None if memory is short."""
        total = request.num_computed_tokens + num_computed_hit_tokens + num_new_tokens
        if not computed_blocks and self._fits_without_change(request.request_id, total):
            return []  # most decode steps: room in the last block, and no block fills
        computed_blocks = computed_blocks or []
        blocks = self.req_blocks.setdefault(request.request_id, [])
        num_new_blocks = self.blocks_needed(total) - len(blocks) - len(computed_blocks)
        reviving = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if max(num_new_blocks, 0) + reviving > self.pool.num_free_blocks:
            if not blocks:
                self.req_blocks.pop(request.request_id, None)
            return None
        self.pool.touch(computed_blocks)
        blocks.extend(computed_blocks)
        new_blocks = self.pool.allocate(max(num_new_blocks, 0))
        blocks.extend(new_blocks)
        self._publish_full_blocks(request, blocks, total)
        return [b.block_id for b in new_blocks]

    def _fits_without_change(self, request_id: str, total: int) -> bool:
        blocks = self.req_blocks.get(request_id)
        return blocks is not None and total <= len(blocks) * self.block_size \
            and total // self.block_size <= self._num_cached.get(request_id, 0)

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first so shared prefixes are evicted last."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self._num_cached.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def _update_hashes(self, request: Request) -> None:
        self.hasher.extend(request.block_hashes, request.all_token_ids, self._salt(request))

    def _salt(self, request: Request) -> str | None:
        # Without prefix caching, a private salt still lets a request's own `n` siblings
        # (which share its cache_salt) reuse its prompt blocks, and nobody else.
        if self.enable_prefix_caching:
            return request.cache_salt
        return f"private:{request.cache_salt}:{request.parent_id or request.request_id}"

    def _publish_full_blocks(self, request: Request, blocks: list[KVBlock], total: int) -> None:
        """Register blocks that will be full once this step's tokens are written."""
        start = self._num_cached.get(request.request_id, 0)
        if total // self.block_size <= start:
            return  # no block fills this step (most decode steps)
        self._update_hashes(request)
        end = min(total // self.block_size, len(request.block_hashes))
        for i in range(start, end):
            self.pool.cache_block(blocks[i], request.block_hashes[i])
        self._num_cached[request.request_id] = max(start, end)

    def record_lookup(self, request: Request, hit_tokens: int) -> None:
        """Count one admitted request's prefix lookup (failed admissions are not counted)."""
        if request.sampling_params.prompt_logprobs is not None:
            return
        self.stats.requests += 1
        self.stats.queries += request.num_tokens
        self.stats.hits += hit_tokens
