"""KVCacheManager: the scheduler's only view of KV memory.

A request holds one block table per KV group (see kv_cache/groups.py), all drawn from one
pool and all as long as its sequence: entry i covers positions [i * block_size, (i + 1) *
block_size). A sliding-window group gives back the blocks no query will read again (their
entries become the null block) and keeps their hashes, so they stay prefix-cache hits until
evicted. Blocks are published under a hash salted with the group id: equal tokens in two
groups are different layers' K and V. The runner is not told of freed blocks: its copy of a
table keeps their ids, which no kernel reads (they lie wholly before every query's window);
a new or resumed request's tables carry the null block there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pagoda.kv_cache.block_pool import NULL_BLOCK_ID, BlockPool, KVBlock
from pagoda.kv_cache.groups import first_needed_block, seq_blocks
from pagoda.kv_cache.hashing import BlockHash, BlockHasher
from pagoda.request import Request

Tables = list[list[KVBlock]]  # one block table per group


@dataclass(slots=True)
class PrefixCacheStats:
    """Counters for prefix-cache lookups, in tokens (vLLM's queries/hits meaning)."""

    queries: int = 0
    hits: int = 0
    requests: int = 0


class FullAttentionGroup:
    """A group of full-attention layers: a request keeps every block until it ends."""

    def __init__(self, group_id: int, pool: BlockPool) -> None:
        self.pool = pool
        self.suffix = b"" if group_id == 0 else b"/g" + group_id.to_bytes(2, "little")

    def publish(self, table: list[KVBlock], hashes: Sequence[BlockHash], start: int,
                end: int) -> None:
        """Cache the table's blocks [start, end) under their hashes (salted with the group)."""
        for i in range(start, end):
            self.pool.cache_block(table[i], hashes[i] + self.suffix)

    def find_hit(self, hashes: Sequence[BlockHash], max_blocks: int) -> list[KVBlock]:
        """The longest cached prefix of at most max_blocks blocks, as the table it gives."""
        hits = []
        for block_hash in hashes[:max_blocks]:
            block = self.pool.lookup(block_hash + self.suffix)
            if block is None:
                break
            hits.append(block)
        return hits


class SlidingWindowGroup(FullAttentionGroup):
    """A group of sliding-window layers: a query at position p reads (p - window, p] only."""

    def __init__(self, group_id: int, pool: BlockPool, window: int, block_size: int) -> None:
        super().__init__(group_id, pool)
        self.window = window
        self.block_size = block_size
        self.null = pool.blocks[NULL_BLOCK_ID]
        # a hit of L tokens needs positions [L - window + 1, L) cached: this many blocks
        self.hit_blocks = -(-(window - 1) // block_size)

    def find_hit(self, hashes: Sequence[BlockHash], max_blocks: int) -> list[KVBlock]:
        """The longest hit of at most max_blocks blocks whose last `hit_blocks` blocks (or
        all of them, when it is that short) are cached; the blocks before are null."""
        if self.hit_blocks == 0:  # a window of one token reads nothing cached
            return [self.null] * max_blocks
        run: list[KVBlock] = []
        for i in range(max_blocks - 1, -1, -1):
            block = self.pool.lookup(hashes[i] + self.suffix)
            if block is None:
                run.clear()
                continue
            run.append(block)
            if len(run) >= self.hit_blocks:
                return [self.null] * i + run[::-1]
        return run[::-1]  # a run from block 0 holds the whole window before its end

    def publish(self, table: list[KVBlock], hashes: Sequence[BlockHash], start: int,
                end: int) -> None:
        """Cache the table's blocks [start, end) that it still holds."""
        for i in range(start, end):
            if table[i] is not self.null:
                self.pool.cache_block(table[i], hashes[i] + self.suffix)

    def free_skipped(self, table: list[KVBlock], num_computed: int) -> None:
        """Free the blocks before the window of the step starting at num_computed, newest
        first (stops at the first null entry: everything before it is gone already)."""
        skipped = []
        for i in range(first_needed_block(self.window, num_computed, self.block_size) - 1,
                       -1, -1):
            block = table[i]
            if block is self.null:
                break
            skipped.append(block)
            table[i] = self.null
        self.pool.free(reversed(skipped))  # the oldest becomes the first to evict


def _make_group(group_id: int, window: int | None, pool: BlockPool,
                block_size: int) -> FullAttentionGroup:
    if window is None:
        return FullAttentionGroup(group_id, pool)
    return SlidingWindowGroup(group_id, pool, window, block_size)


def _num_free(hits: Tables) -> int:
    """Hit blocks nobody holds (they come off the free list)."""
    return sum(1 for hit in hits for b in hit if b.ref_cnt == 0)


class KVCacheManager:
    """Finds cached prefixes, allocates slots for scheduled tokens, frees finished requests.
    `windows`: each KV group's sliding window (None: full attention), group 0 first."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 hasher: BlockHasher, windows: Sequence[int | None] = (None,)) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.hasher = hasher
        self.windows = tuple(windows)
        self.groups = [_make_group(g, w, self.pool, block_size) for g, w in enumerate(windows)]
        self._sliding = [(g, group) for g, group in enumerate(self.groups)
                         if isinstance(group, SlidingWindowGroup)]
        self.req_blocks: dict[str, Tables] = {}
        self._num_cached: dict[str, int] = {}  # leading blocks already published per request
        self.stats = PrefixCacheStats()

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def capacity_tokens(self, seq_len: int, chunk: int) -> int:
        """Tokens of context the cache holds in sequences of seq_len tokens run `chunk` tokens
        a step: the usable blocks' tokens, scaled by the blocks of all groups one block of
        such a sequence takes (exactly the usable blocks' tokens for one full group)."""
        per_seq = sum(seq_blocks(w, seq_len, chunk, self.block_size) for w in self.windows)
        full = self.blocks_needed(seq_len)
        return self.pool.num_usable_blocks * self.block_size * full // per_seq

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[Tables, int]:
        """The longest run of cached full blocks that prefixes the request in every group,
        as each group's table of it (empty: no hit), and its length in tokens. At least one
        token is always left to compute, so the model produces logits for the next one."""
        if request.sampling_params.prompt_logprobs is not None:
            return [], 0  # every prompt position's logits are needed
        self._update_hashes(request)
        hits = self._common_hit(request.block_hashes, (request.num_tokens - 1) // self.block_size)
        if not hits[0]:
            return [], 0
        return hits, len(hits[0]) * self.block_size

    def _common_hit(self, hashes: list[BlockHash], max_blocks: int) -> Tables:
        """Each group's hit at the longest length valid for all: groups take turns cutting
        the length (a sliding window's hits are not prefix-closed) until all agree."""
        n, hits = max_blocks, [[] for _ in self.groups]
        agreed, g = 0, 0
        while agreed < len(self.groups):
            hits[g] = self.groups[g].find_hit(hashes, n)
            agreed = agreed + 1 if len(hits[g]) == n else 1
            n = len(hits[g])
            g = (g + 1) % len(self.groups)
        return hits

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: Tables | None = None,
                       num_computed_hit_tokens: int = 0) -> list[list[int]] | None:
        """Reserve blocks so the request can hold num_new_tokens more tokens after its computed
        ones (plus any prefix hit). Returns each group's new block ids (an empty list when no
        group changed), or None if memory is short."""
        total = request.num_computed_tokens + num_computed_hit_tokens + num_new_tokens
        if not computed_blocks and self._fits_without_change(request.request_id, total):
            return []  # most decode steps: room in the last block, and no block fills
        tables = self.req_blocks.get(request.request_id)
        if tables is None:
            tables = [[] for _ in self.groups]
        elif self._sliding:
            self._free_skipped(tables, request.num_computed_tokens)
        num_hit = len(computed_blocks[0]) if computed_blocks else 0
        num_new_blocks = max(self.blocks_needed(total) - len(tables[0]) - num_hit, 0)
        reviving = _num_free(computed_blocks) if computed_blocks else 0
        if num_new_blocks * len(self.groups) + reviving > self.pool.num_free_blocks:
            return None
        self.req_blocks[request.request_id] = tables
        if computed_blocks:
            self._take_hits(tables, computed_blocks)
        new_ids = []
        for table in tables:
            new_blocks = self.pool.allocate(num_new_blocks)
            table.extend(new_blocks)
            new_ids.append([b.block_id for b in new_blocks])
        self._publish_full_blocks(request, tables, total)
        return new_ids

    def _take_hits(self, tables: Tables, hits: Tables) -> None:
        """Every group's hits off the free list, before any group allocates (one of them may
        be next in line)."""
        for table, hit in zip(tables, hits, strict=True):
            self.pool.touch(b for b in hit if b.block_id != NULL_BLOCK_ID)
            table.extend(hit)


    def _fits_without_change(self, request_id: str, total: int) -> bool:
        """Room in the allocated blocks and no block fills. A sliding window's blocks are
        freed on the next step that allocates or fills one: at most one block later, and
        never later than the next allocation, so a sequence never holds more than
        kv_cache.groups.seq_blocks."""
        tables = self.req_blocks.get(request_id)
        return tables is not None and total <= len(tables[0]) * self.block_size \
            and total // self.block_size <= self._num_cached.get(request_id, 0)

    def _free_skipped(self, tables: Tables, num_computed: int) -> None:
        for g, group in self._sliding:
            group.free_skipped(tables[g], num_computed)

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first in every group at once, so that shared
        prefixes are evicted last."""
        tables = self.req_blocks.pop(request.request_id, None)
        self._num_cached.pop(request.request_id, None)
        if tables is None:
            return
        if len(tables) == 1:
            self.pool.free(b for b in reversed(tables[0]) if b.block_id != NULL_BLOCK_ID)
            return
        self.pool.free(b for column in reversed(list(zip(*tables))) for b in column
                       if b.block_id != NULL_BLOCK_ID)

    def block_ids(self, request_id: str) -> list[list[int]]:
        """Each group's table of the request (0: the null block)."""
        return [[b.block_id for b in table] for table in self.req_blocks.get(request_id, [])]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def _update_hashes(self, request: Request) -> None:
        self.hasher.extend(request.block_hashes, request.all_token_ids, self._salt(request),
                           request.lora_id)

    def _salt(self, request: Request) -> str | None:
        # Without prefix caching, a private salt still lets a request's own `n` siblings
        # (which share its cache_salt) reuse its prompt blocks, and nobody else.
        if self.enable_prefix_caching:
            return request.cache_salt
        return f"private:{request.cache_salt}:{request.parent_id or request.request_id}"

    def _publish_full_blocks(self, request: Request, tables: Tables, total: int) -> None:
        """Register blocks that will be full once this step's tokens are written."""
        start = self._num_cached.get(request.request_id, 0)
        if total // self.block_size <= start:
            return  # no block fills this step (most decode steps)
        self._update_hashes(request)
        end = min(total // self.block_size, len(request.block_hashes))
        for group, table in zip(self.groups, tables, strict=True):
            group.publish(table, request.block_hashes, start, end)
        self._num_cached[request.request_id] = max(start, end)

    def record_lookup(self, request: Request, hit_tokens: int) -> None:
        """Count one admitted request's prefix lookup (failed admissions are not counted)."""
        if request.sampling_params.prompt_logprobs is not None:
            return
        self.stats.requests += 1
        self.stats.queries += request.num_tokens
        self.stats.hits += hit_tokens
