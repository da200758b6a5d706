"""The runner's adapters: which are known (id -> directory), which are loaded in host
memory (LRU, at most max_cpu_loras), which sit in the model's max_loras device slots (LRU),
and each step's per-token slot index."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from pagoda.config import LoRAConfig, resolve_dtype
from pagoda.logger import get_logger
from pagoda.lora.adapter import LoRAAdapter, load_adapter
from pagoda.lora.layers import (
    LoRAStepState,
    LoRAWeights,
    add_lora_layers,
    lora_torch_step,
    pack_step,
    shard_adapter,
)
from pagoda.lora.request import LoRAAdapterError, LoRARequest
from pagoda.models.interface import MissingLayer

logger = get_logger(__name__)


def pick_kernel(device: torch.device):
    """Triton shrink/expand on CUDA, the torch reference elsewhere."""
    if device.type == "cuda":
        from pagoda.lora.triton_ops import lora_triton
        return lora_triton
    return lora_torch_step


class LoRAManager:
    """Loads adapters into the model's slots as steps need them."""

    def __init__(self, model: nn.Module, config: LoRAConfig, device: torch.device,
                 model_dtype: torch.dtype, max_tokens: int, kernel=None) -> None:
        if not getattr(model, "supports_lora", False):
            raise LoRAAdapterError(f"{type(model).__name__} does not support LoRA adapters")
        self.config = config
        self.dtype = (model_dtype if config.lora_dtype == "auto"
                      else resolve_dtype(config.lora_dtype, device))
        self.state = LoRAStepState(max_tokens, config.max_loras, device)
        self.layers: list[LoRAWeights] = add_lora_layers(
            model, dict(model.packed_modules), config.max_loras, config.max_lora_rank,
            self.dtype, self.state, kernel or pick_kernel(device))
        self.shards = {m: s for layer in self.layers for m, s in layer.shards().items()}
        self.shapes = {m: shard.shape for m, shard in self.shards.items()}
        # the decoder layers other pipeline stages hold: their adapter modules are theirs
        self.elsewhere = tuple(f"{name}." for name, module in model.named_modules()
                               if isinstance(module, MissingLayer))
        self.known: dict[int, LoRARequest] = {}
        self.retiring: set[int] = set()  # removed, still used by live requests
        self.host: OrderedDict[int, LoRAAdapter] = OrderedDict()  # LRU first
        self.slots: list[int | None] = [None] * config.max_loras  # adapter id in each slot
        self.slot_lru: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, LRU first
        pinned = device.type == "cuda"
        # two host buffers used in turn (a step is prepared while the previous one's copy
        # may still be queued), and the events of their last copies
        size = LoRAStepState.packed_size(max_tokens, config.max_loras)
        self._staging = [torch.zeros(size, dtype=torch.int32, pin_memory=pinned)
                         for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    # ---- the adapters the engine knows ------------------------------------------------------
    def add(self, request: LoRARequest) -> int:
        """Read and check the adapter now (LoRAAdapterError if it does not fit); returns
        its host bytes."""
        adapter = self._read(request)
        self.known[request.lora_id] = request
        self._keep_in_host(adapter)
        logger.info("LoRA adapter %r (id %d): rank %d, %d modules, %.1f MiB", request.name,
                    request.lora_id, adapter.rank, len(adapter.weights),
                    adapter.num_bytes / 2**20)
        return adapter.num_bytes

    def remove(self, lora_id: int, live_ids: Iterable[int]) -> None:
        """Forget an adapter once no live request uses it (until then it keeps serving
        the requests that have it)."""
        if lora_id in self.known:
            self.retiring.add(lora_id)
            self.retire(live_ids)

    def retire(self, live_ids: Iterable[int]) -> None:
        """Drop the removed adapters no live request uses any more."""
        if not self.retiring:
            return
        done = self.retiring - set(live_ids)
        for lora_id in done:
            self.retiring.discard(lora_id)
            self.known.pop(lora_id, None)
            self.host.pop(lora_id, None)
            slot = self.slot_lru.pop(lora_id, None)
            if slot is not None:
                self.slots[slot] = None

    def _keep_in_host(self, adapter: LoRAAdapter) -> None:
        self.host[adapter.request.lora_id] = adapter
        self.host.move_to_end(adapter.request.lora_id)
        while len(self.host) > self.config.host_capacity:
            self.host.popitem(last=False)  # read from disk again when next needed

    def _adapter(self, lora_id: int) -> LoRAAdapter:
        adapter = self.host.get(lora_id)
        if adapter is None:
            adapter = self._read(self.known[lora_id])
        self._keep_in_host(adapter)
        return adapter

    def _read(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter from disk, checked whole, kept as this rank's shard of this stage's
        modules."""
        adapter = load_adapter(request, self.shapes, self.config.max_lora_rank, self.dtype,
                               self.elsewhere)
        return shard_adapter(adapter, self.shards)

    # ---- slots --------------------------------------------------------------------------------
    def activate(self, lora_ids: set[int]) -> dict[int, int]:
        """Put every adapter of the step in a slot (evicting the least recently used ones
        the step does not need); returns adapter id -> slot."""
        if len(lora_ids) > len(self.slots):
            raise RuntimeError(f"a step uses {len(lora_ids)} adapters; --max-loras is "
                               f"{len(self.slots)}")
        for lora_id in lora_ids:
            if lora_id in self.slot_lru:
                self.slot_lru.move_to_end(lora_id)
            else:
                self._load_into_slot(lora_id, self._free_slot(lora_ids))
        return {lora_id: self.slot_lru[lora_id] for lora_id in lora_ids}

    def _free_slot(self, needed: set[int]) -> int:
        if None in self.slots:
            return self.slots.index(None)
        victim = next(i for i in self.slot_lru if i not in needed)
        slot = self.slot_lru.pop(victim)
        self.slots[slot] = None
        return slot

    def _load_into_slot(self, lora_id: int, slot: int) -> None:
        adapter = self._adapter(lora_id)
        for layer in self.layers:
            layer.load(slot, adapter)
        self.slots[slot] = lora_id
        self.slot_lru[lora_id] = slot

    def set_step(self, row_lora_ids: Sequence[int], row_tokens: Sequence[int]) -> None:
        """Fill the step buffer (LoRAStepState) for a step whose rows have these adapters
        (0: none) and token counts: each token's slot (-1 past the step's tokens), the
        tokens grouped by slot and their tiles."""
        slot_of = self.activate({i for i in row_lora_ids if i})
        row_slots = np.fromiter((slot_of.get(i, -1) for i in row_lora_ids), np.int32,
                                len(row_lora_ids))
        self.state.active = bool(slot_of)
        tokens = np.repeat(row_slots, row_tokens)
        self._turn ^= 1
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()
        pack_step(self._staging[self._turn].numpy(), tokens, self.state.max_tokens)
        self.state.packed.copy_(self._staging[self._turn], non_blocking=True)
        if self.state.packed.is_cuda:
            self._copied[self._turn] = torch.cuda.Event()
            self._copied[self._turn].record()
