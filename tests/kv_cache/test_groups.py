"""KV groups: layers grouped by window into groups of equal block size, and the blocks a
sequence holds per group."""

from __future__ import annotations

import pytest

from pagoda.kv_cache.groups import first_needed_block, group_layers, seq_blocks
from pagoda.models.arch.base import LayerAttention


def layers(windows: list[int | None], heads: int = 2, dim: int = 8) -> list[LayerAttention]:
    return [LayerAttention(heads, dim, w) for w in windows]


def test_full_only_model_is_one_group_with_every_layer_in_a_block():
    layout = group_layers(layers([None] * 30))
    assert layout.windows == (None,) and layout.slots == 30
    assert layout.groups[0].layers == tuple(range(30))


def test_windowed_on_every_layer_is_one_local_group():
    layout = group_layers(layers([4096] * 32))
    assert layout.windows == (4096,) and layout.slots == 32


def test_gemma3_1b_pattern_splits_local_layers_into_groups_of_the_global_count():
    windows = ([512] * 5 + [None]) * 4 + [512] * 2  # 26 layers: 4 global, 22 local
    layout = group_layers(layers(windows))
    assert layout.slots == 4
    assert layout.windows == (None,) + (512,) * 6
    assert layout.groups[0].layers == (5, 11, 17, 23)
    assert layout.groups[1].layers == (0, 1, 2, 3)
    assert layout.groups[-1].layers == (24, 25)  # two slots of its blocks stay unused
    places = layout.places()
    assert sorted(places) == list(range(26))
    assert places[11] == (0, 1) and places[25] == (6, 1)


def test_near_equal_kinds_share_the_larger_size():
    layout = group_layers(layers([None] * 4 + [64] * 5))
    assert layout.slots == 5 and layout.windows == (None, 64)


def test_different_kv_shapes_are_refused():
    with pytest.raises(ValueError, match="different KV shapes"):
        group_layers([LayerAttention(2, 8), LayerAttention(4, 8)])


def test_blocks_per_sequence():
    assert seq_blocks(None, 100, 8, 16) == 7
    # window 512 with 2048-token chunks: the window before the chunk plus the chunk
    assert seq_blocks(512, 32768, 2048, 16) == -(-(511 + 2048) // 16) + 1
    assert seq_blocks(512, 300, 2048, 16) == 19  # never more than the whole sequence
    assert seq_blocks(8, 1000, 1, 4) == 3  # decode: the window straddles at most 3 blocks


def test_first_needed_block():
    assert first_needed_block(8, 0, 4) == 0
    assert first_needed_block(8, 11, 4) == 1  # the query at 11 sees 4..11
    assert first_needed_block(8, 12, 4) == 1  # the query at 12 sees 5..12: block 1 still
    assert first_needed_block(8, 15, 4) == 2
