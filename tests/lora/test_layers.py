"""The torch LoRA path against a per-token loop of y += B A x (scaling folded into B)."""

from __future__ import annotations

import numpy as np
import torch

from pagoda.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagoda.layers.parallel import ParallelGroup
from pagoda.lora.adapter import LoRAAdapter
from pagoda.lora.layers import (
    TILE_TOKENS,
    LoRAStepState,
    LoRAWeights,
    ModuleShard,
    layer_shards,
    lora_torch,
    max_tiles,
    pack_step,
    shard_adapter,
)
from pagoda.lora.request import LoRARequest


def random_adapter(lora_id: int, modules: list[str], sizes: list[int], rank: int,
                   in_features: int, seed: int) -> LoRAAdapter:
    gen = torch.Generator().manual_seed(seed)
    adapter = LoRAAdapter(LoRARequest(lora_id, f"a{lora_id}", ""), rank, 1.0)
    for module, size in zip(modules, sizes):
        adapter.weights[module] = (torch.randn(rank, in_features, generator=gen),
                                   torch.randn(size, rank, generator=gen))
    return adapter


def per_token(adapters: list[LoRAAdapter | None], x: torch.Tensor, modules: list[str],
              sizes: list[int]) -> torch.Tensor:
    rows = []
    for token, adapter in zip(x, adapters):
        pieces = []
        for module, size in zip(modules, sizes):
            if adapter is None or module not in adapter.weights:
                pieces.append(torch.zeros(size))
            else:
                a, b = adapter.weights[module]
                pieces.append(b @ (a @ token))
        rows.append(torch.cat(pieces))
    return torch.stack(rows)


def test_fused_layer_mixed_adapters_and_base_tokens():
    modules, sizes, in_features = ["q", "k", "v"], [12, 4, 4], 10
    weights = LoRAWeights(modules, [ModuleShard.whole(in_features, n) for n in sizes],
                          max_loras=3, max_rank=8, dtype=torch.float32,
                          device=torch.device("cpu"))
    rank8 = random_adapter(1, modules, sizes, 8, in_features, seed=1)
    q_and_v_rank4 = random_adapter(2, ["q", "v"], [12, 4], 4, in_features, seed=2)
    weights.load(0, rank8)
    weights.load(2, q_and_v_rank4)
    slots = torch.tensor([0, -1, 2, 2, 0, -1], dtype=torch.int32)
    by_slot = {0: rank8, 2: q_and_v_rank4, -1: None}
    x = torch.randn(6, in_features)
    y = torch.zeros(6, sum(sizes))
    lora_torch(weights, x, y, slots)
    expected = per_token([by_slot[int(s)] for s in slots], x, modules, sizes)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[1], torch.zeros(20))  # base tokens are untouched


def test_reloading_a_slot_clears_the_previous_adapter():
    weights = LoRAWeights(["q"], [ModuleShard.whole(4, 4)], 1, 8, torch.float32,
                          torch.device("cpu"))
    weights.load(0, random_adapter(1, ["q"], [4], 8, 4, seed=1))
    weights.load(0, random_adapter(2, ["q"], [4], 2, 4, seed=2))
    assert torch.count_nonzero(weights.a[0, 0, 2:]) == 0
    assert torch.count_nonzero(weights.b[0, 2:]) == 0


def sharded_delta(layer, modules: list[str], adapter: LoRAAdapter, x: torch.Tensor
                  ) -> torch.Tensor:
    """One rank's delta of `layer` (its input slice of x when row-parallel)."""
    weights = LoRAWeights(modules, layer_shards(layer), 1, 8, torch.float32,
                          torch.device("cpu"))
    weights.load(0, shard_adapter(adapter, weights.shards()))
    shard = weights.module_shards[0]
    x_local = x.narrow(1, shard.in_start, shard.in_size)
    y = torch.zeros(x.shape[0], sum(weights.piece_sizes))
    lora_torch(weights, x_local, y, torch.zeros(x.shape[0], dtype=torch.int32))
    return y


def test_tensor_parallel_shards_add_up_to_the_whole_delta():
    """Two ranks: q/k/v with one KV head (k and v whole on both ranks) and gate/up keep
    their pieces' output slices; down keeps its input slice, the ranks' deltas summing to
    the whole (as the layer's all-reduce sums them)."""
    ranks = [ParallelGroup(rank, 2) for rank in range(2)]
    x = torch.randn(5, 16)
    qkv = ["q", "k", "v"]
    adapter = random_adapter(1, qkv, [16, 4, 4], 8, 16, seed=3)
    parts = [sharded_delta(QKVParallelLinear(16, 4, 4, 1, group=g), qkv, adapter, x)
             for g in ranks]
    whole = per_token([adapter] * 5, x, qkv, [16, 4, 4])
    for rank, part in enumerate(parts):
        q, kv = whole[:, :16].chunk(2, dim=1)[rank], whole[:, 16:]
        torch.testing.assert_close(part, torch.cat([q, kv], dim=1))
    gate_up = ["gate", "up"]
    adapter = random_adapter(2, gate_up, [12, 12], 8, 16, seed=4)
    whole = per_token([adapter] * 5, x, gate_up, [12, 12])
    for rank, g in enumerate(ranks):
        part = sharded_delta(MergedColumnParallelLinear(16, [12, 12], group=g), gate_up,
                             adapter, x)
        expected = torch.cat([whole[:, :12].chunk(2, 1)[rank], whole[:, 12:].chunk(2, 1)[rank]],
                             dim=1)
        torch.testing.assert_close(part, expected)
    adapter = random_adapter(3, ["down"], [10], 8, 16, seed=5)
    total = sum(sharded_delta(RowParallelLinear(16, 10, group=g), ["down"], adapter, x)
                for g in ranks)
    torch.testing.assert_close(total, per_token([adapter] * 5, x, ["down"], [10]))


def test_a_step_packs_each_adapters_tokens_into_tiles():
    """Tokens grouped by slot in token order, tiles of at most TILE_TOKENS covering every
    adapted token exactly once, nothing for base tokens, and empty tiles after the last."""
    rows = [(0, 3), (-1, 5), (2, 40), (0, 20), (-1, 2), (1, 1)]  # (slot, tokens) per request
    token_slots = np.repeat([s for s, _ in rows], [n for _, n in rows]).astype(np.int32)
    max_tokens, max_loras = 128, 4
    packed = np.full(LoRAStepState.packed_size(max_tokens, max_loras), 7, dtype=np.int32)
    pack_step(packed, token_slots, max_tokens)
    n = len(token_slots)
    assert (packed[:n] == token_slots).all() and (packed[n:max_tokens] == -1).all()
    grouped = packed[max_tokens:2 * max_tokens]
    tiles = packed[2 * max_tokens:].reshape(-1, 3)
    covered = []
    for slot, start, count in tiles[tiles[:, 2] > 0]:
        assert 0 < count <= TILE_TOKENS
        members = grouped[start:start + count]
        assert (token_slots[members] == slot).all()
        covered += members.tolist()
    adapted = np.flatnonzero(token_slots >= 0)
    assert sorted(covered) == adapted.tolist() and len(covered) == len(set(covered))
    in_slot_order = [t for slot in range(max_loras) for t in adapted if token_slots[t] == slot]
    assert grouped[:len(adapted)].tolist() == in_slot_order
    used = int((tiles[:, 2] > 0).sum())
    assert used == 2 + 1 + 3 <= max_tiles(n, max_loras)  # slot 0: 23, 1: 1, 2: 40 tokens
    assert (tiles[used:] == 0).all()
