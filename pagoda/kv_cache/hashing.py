"""Chained, collision-resistant block hashes for automatic prefix caching.

A block's hash covers its parent's hash and its own token ids, so equal hashes mean equal
prefixes. The chain root mixes a per-process random seed (hashes cannot be predicted or
forged from outside), the model identity, the LoRA adapter (an adapter's KV is its own), and
an optional salt that isolates tenants or requests from each other.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

BlockHash = bytes


@dataclass(frozen=True, slots=True)
class BlockHasher:
    """Computes the chain of full-block hashes of a token sequence."""

    block_size: int
    model_id: str = ""
    seed: bytes = field(default_factory=lambda: os.urandom(32))

    def root(self, salt: str | None = None, adapter: int = 0) -> BlockHash:
        h = hashlib.sha256(self.seed)
        h.update(self.model_id.encode())
        h.update(b"\x00")
        h.update(adapter.to_bytes(8, "little"))  # fixed width: cannot run into the salt
        if salt is not None:
            h.update(salt.encode())
        return h.digest()

    def hash_block(self, parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
        h = hashlib.sha256(parent)
        h.update(array("q", tokens).tobytes())
        return h.digest()

    def extend(self, hashes: list[BlockHash], token_ids: Sequence[int], salt: str | None,
               adapter: int = 0) -> None:
        """Append the hashes of every full block of token_ids not hashed yet (`adapter`:
        the LoRA adapter's engine id, 0 for the base model)."""
        bs = self.block_size
        parent = hashes[-1] if hashes else self.root(salt, adapter)
        for start in range(len(hashes) * bs, len(token_ids) - bs + 1, bs):
            parent = self.hash_block(parent, token_ids[start:start + bs])
            hashes.append(parent)
