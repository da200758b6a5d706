"""One model served by several engine replicas behind one name.

`ReplicaSet` looks like one AsyncEngine to the endpoints. Each request goes to the replica
most likely to hold its prompt's prefix in its KV cache, unless that replica is busier than
the least-loaded one by more than `slack` requests; then it goes to the least-loaded one.
Which prefixes a replica holds is remembered here (a bounded LRU of prompt block hashes per
replica), so routing needs no round trip to the engines.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from pagoda.engine.async_engine import AsyncEngine
from pagoda.engine.input_processor import ProcessedPrompt
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams

PREFIX_BLOCK = 16  # tokens per remembered prefix block (the engines' default block size)
PREFIX_ENTRIES = 65536  # remembered blocks per replica


def prefix_hashes(token_ids: list[int], block: int = PREFIX_BLOCK) -> list[int]:
    """A chained hash per full block: equal hashes mean equal prompts up to that block."""
    hashes, running = [], 0
    for start in range(0, len(token_ids) - block + 1, block):
        running = hash((running, tuple(token_ids[start:start + block])))
        hashes.append(running)
    return hashes


class PrefixIndex:
    """The prompt prefixes recently sent to one replica (bounded LRU of block hashes)."""

    def __init__(self, capacity: int = PREFIX_ENTRIES) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def matched_blocks(self, hashes: list[int]) -> int:
        """How many leading blocks of the prompt this replica has seen."""
        count = 0
        for h in hashes:
            if h not in self._blocks:
                break
            count += 1
        return count

    def remember(self, hashes: list[int]) -> None:
        for h in hashes:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()


class ReplicaSet:
    """The endpoints' engine for a replicated model: tokenization and checks use the
    first replica (they share the tokenizer and model facts); generate() picks one."""

    def __init__(self, engines: list[AsyncEngine], indexes: list[PrefixIndex],
                 slack: int = 8) -> None:
        self.engines = engines
        self.indexes = indexes
        self.slack = slack
        self.routed = [0] * len(engines)  # requests sent to each replica
        first = engines[0]
        self.tokenizer = first.tokenizer
        self.model_info = first.model_info
        self.input_processor = first.input_processor

    def __getattr__(self, name: str) -> Any:  # tokenize, render_chat, check_* ...
        return getattr(self.engines[0], name)

    def check_alive(self) -> None:
        for engine in self.engines:
            engine.check_alive()

    def choose(self, token_ids: list[int]) -> int:
        """The replica index for a prompt (see the module docstring)."""
        if len(self.engines) == 1:
            return 0
        hashes = prefix_hashes(token_ids)
        loads = [e.num_in_flight for e in self.engines]
        least = min(range(len(loads)), key=loads.__getitem__)
        matches = [index.matched_blocks(hashes) for index in self.indexes]
        best = max(range(len(matches)), key=lambda i: (matches[i], -loads[i]))
        chosen = best if matches[best] and loads[best] <= loads[least] + self.slack else least
        self.indexes[chosen].remember(hashes)
        return chosen

    def generate(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                 priority: int = 0, arrival: float | None = None,
                 lora_name: str | None = None) -> AsyncIterator[RequestOutput]:
        index = self.choose(prompt.token_ids)
        self.routed[index] += 1
        return self.engines[index].generate(request_id, prompt, params, priority, arrival,
                                            lora_name)
