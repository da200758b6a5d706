"""InputBatch with KV groups: each group's block table grows from the scheduler's per-group
diffs, and a step has one block table and slot mapping per group (stacked), sharing the rest."""

from __future__ import annotations

import torch

from pagoda.runner.input_batch import GroupedInputBatch, InputBatch, make_input_batch
from pagoda.sampling_params import SamplingParams
from pagoda.scheduler.output import CachedRequestData, NewRequestData, SchedulerOutput

BS = 4
CPU = torch.device("cpu")


def new(rid: str, prompt_len: int, tables: list[list[int]], computed: int = 0) -> NewRequestData:
    return NewRequestData(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=4),
                          None, tables, computed)


def step(out: SchedulerOutput, scheduled: dict[str, int]) -> SchedulerOutput:
    out.num_scheduled_tokens = scheduled
    out.total_num_scheduled_tokens = sum(scheduled.values())
    return out


def expected_slots(table: list[int], positions: range) -> list[int]:
    return [table[p // BS] * BS + p % BS for p in positions]


def test_each_group_gets_its_own_tables_and_slots():
    batch = make_input_batch(CPU, BS, 2)
    out = step(SchedulerOutput(new_requests=[new("a", 6, [[3, 4], [7, 8]]),
                                             new("b", 3, [[5], [9]])]), {"a": 6, "b": 3})
    batch.update(out)
    s = batch.prepare(out)
    groups = s.kv_groups
    assert groups.block_tables.shape == (2, 2, 2)
    assert groups.block_tables[1].tolist() == [[7, 8], [9, 0]]
    assert s.attn is groups.metadata[0]
    for g, tables in enumerate(([[3, 4], [5]], [[7, 8], [9]])):
        meta = groups.metadata[g]
        assert meta.block_tables.data_ptr() == groups.block_tables[g].data_ptr()
        assert meta.slot_mapping.tolist() == expected_slots(tables[0], range(6)) \
            + expected_slots(tables[1], range(3))
        assert meta.seq_lens_cpu == [6, 3] and meta.query_start_loc is s.attn.query_start_loc


def test_diffs_extend_replace_or_leave_every_groups_table():
    batch = make_input_batch(CPU, BS, 2)
    batch.update(step(SchedulerOutput(new_requests=[new("a", 4, [[3], [7]])]), {"a": 4}))
    batch.update(step(SchedulerOutput(cached_requests=[
        CachedRequestData("a", [[4], [8]], 4)]), {"a": 1}))
    assert batch.requests["a"].block_ids == [[3, 4], [7, 8]]
    batch.update(step(SchedulerOutput(cached_requests=[
        CachedRequestData("a", [], 5)]), {"a": 1}))
    assert batch.requests["a"].block_ids == [[3, 4], [7, 8]]
    batch.update(step(SchedulerOutput(cached_requests=[  # resumed with a hit: null entries
        CachedRequestData("a", [[3, 4], [0, 8]], 4, resumed_from_preemption=True)]), {"a": 2}))
    assert batch.requests["a"].block_ids == [[3, 4], [0, 8]]


def test_one_group_is_the_plain_table():
    batch = make_input_batch(CPU, BS, 1)
    assert type(batch) is InputBatch and isinstance(make_input_batch(CPU, BS, 2),
                                                    GroupedInputBatch)
    out = step(SchedulerOutput(new_requests=[new("a", 5, [[3, 4]])]), {"a": 5})
    batch.update(out)
    s = batch.prepare(out)
    assert s.kv_groups.metadata == (s.attn,) and s.kv_groups.block_tables is s.attn.block_tables
    assert s.attn.block_tables.tolist() == [[3, 4]]
    assert s.attn.slot_mapping.tolist() == expected_slots([3, 4], range(5))
