"""Scheduler: token budget, chunked prefill, joining, preemption, abort, priority.

Driven by a fake runner whose 'model' emits a token that depends on the whole sequence, so
any scheduling mistake (lost or repeated tokens) changes the outputs.
"""

from __future__ import annotations

from collections import deque

import pytest

from pagoda.config import SchedulerConfig
from pagoda.kv_cache.groups import first_needed_block
from pagoda.kv_cache.hashing import BlockHasher
from pagoda.kv_cache.manager import KVCacheManager
from pagoda.request import EngineCoreRequest, RequestStatus
from pagoda.sampling_params import SamplingParams
from pagoda.scheduler.output import ModelRunnerOutput, SchedulerOutput
from pagoda.scheduler.scheduler import Scheduler

BS = 4


class FakeRunner:
    """Tracks per-request tokens from the scheduler diff and 'samples' sum(tokens) % 97."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for rid in out.finished_request_ids:
            self.tokens.pop(rid, None)
        for new in out.new_requests:
            self.tokens[new.request_id] = list(new.prompt_token_ids)
            self.computed[new.request_id] = new.num_computed_tokens
        for cached in out.cached_requests:
            assert self.computed[cached.request_id] == cached.num_computed_tokens or \
                cached.resumed_from_preemption
            self.computed[cached.request_id] = cached.num_computed_tokens
        result = ModelRunnerOutput()
        for rid, n in out.num_scheduled_tokens.items():
            self.computed[rid] += n
            toks = self.tokens[rid]
            assert self.computed[rid] <= len(toks)
            if self.computed[rid] == len(toks):
                token = sum(toks) % 97
                toks.append(token)
                result.sampled_token_ids[rid] = [token]
        return result


def make_scheduler(num_blocks=64, budget=64, max_seqs=8, max_len=256, caching=True,
                   windows=(None,), pipeline_depth=1, prefill_first=False):
    kv = KVCacheManager(num_blocks, BS, caching, BlockHasher(BS, "m"), windows)
    return Scheduler(SchedulerConfig(budget, max_seqs, prefill_first=prefill_first), kv,
                     max_len, pipeline_depth=pipeline_depth)


def add(sched, rid, prompt, max_tokens=8, priority=0, **params):
    sched.add_request(EngineCoreRequest(
        rid, prompt, SamplingParams(max_tokens=max_tokens, **params), eos_token_id=None,
        priority=priority))


def run(sched, runner=None, max_steps=10_000, on_step=None, overlap=False, depth=None,
        busy=None):
    """Step until done. With overlap, each step is scheduled (and 'run') before the previous
    step's results reach the scheduler, as the engine's async scheduling does; `depth`: up to
    that many steps are in flight (a pipeline's stages), the oldest delivered first. `busy`:
    a list to append, after each launch, how many steps in flight compute something."""
    runner = runner or FakeRunner()
    depth = depth or (2 if overlap else 1)
    outputs: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    steps = 0
    in_flight: deque = deque()
    while (sched.has_unfinished_requests() or in_flight) and steps < max_steps:
        if sched.has_unfinished_requests():
            out = sched.schedule()
            assert out.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
            assert len(out.num_scheduled_tokens) <= sched.config.max_num_seqs
            if sched.pipelined:  # no request's token is still on its way
                assert not any(out.num_scheduled_tokens.keys() & result.sampled_token_ids.keys()
                               for _, result in in_flight)
            in_flight.append((out, runner.execute(out)))
            if busy is not None:
                busy.append(sum(not step.is_empty for step, _ in in_flight))
            leave = depth - 1
        else:
            leave = len(in_flight) - 1  # nothing to schedule: deliver the oldest
        while len(in_flight) > leave:
            for o in sched.update_from_output(*in_flight.popleft()):
                outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.finished:
                    reasons[o.request_id] = o.finish_reason
        steps += 1
        if on_step:
            on_step(sched, steps)
    return outputs, reasons, steps


def prompts(n, base_len=10):
    return {f"r{i}": [(i * 7 + j) % 50 + 1 for j in range(base_len + 3 * i)] for i in range(n)}


def reference_outputs(ps, max_tokens=8):
    out = {}
    for rid, p in ps.items():
        sched = make_scheduler(budget=4096, num_blocks=256)
        add(sched, rid, p, max_tokens)
        out[rid] = run(sched)[0][rid]
    return out


def test_token_budget_and_chunked_prefill():
    sched = make_scheduler(budget=16)
    add(sched, "long", list(range(1, 50)))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"long": 16}
    assert [r.request_id for r in out.new_requests] == ["long"]


def test_new_requests_join_a_running_batch():
    sched = make_scheduler(budget=64)
    runner = FakeRunner()
    add(sched, "a", list(range(1, 9)), max_tokens=20)
    first = sched.schedule()
    sched.update_from_output(first, runner.execute(first))
    add(sched, "b", list(range(1, 5)))
    second = sched.schedule()
    assert second.num_scheduled_tokens == {"a": 1, "b": 4}


def test_prefill_first_gives_new_requests_a_step_of_their_own():
    sched = make_scheduler(budget=64, prefill_first=True)
    runner = FakeRunner()
    add(sched, "a", list(range(1, 9)), max_tokens=20)
    first = sched.schedule()  # nothing running: an ordinary step
    sched.update_from_output(first, runner.execute(first))
    add(sched, "b", list(range(1, 5)))
    add(sched, "c", list(range(2, 7)))
    second = sched.schedule()
    assert second.num_scheduled_tokens == {"b": 4, "c": 5}  # a's decode waits one step
    sched.update_from_output(second, runner.execute(second))
    add(sched, "d", list(range(3, 6)))
    third = sched.schedule()  # never two prefill-only steps in a row: everyone runs
    assert third.num_scheduled_tokens == {"a": 1, "b": 1, "c": 1, "d": 3}


def test_prefill_first_waits_for_a_free_seat():
    sched = make_scheduler(budget=64, max_seqs=1, prefill_first=True)
    runner = FakeRunner()
    add(sched, "a", list(range(1, 9)), max_tokens=5)
    first = sched.schedule()
    sched.update_from_output(first, runner.execute(first))
    add(sched, "b", list(range(1, 5)))
    second = sched.schedule()  # no seat for b: a decodes
    assert second.num_scheduled_tokens == {"a": 1}


@pytest.mark.parametrize("overlap", [False, True])
def test_prefill_first_keeps_every_output(overlap):
    ps = prompts(6)
    sched = make_scheduler(budget=32, max_seqs=3, prefill_first=True)
    for rid, p in ps.items():
        add(sched, rid, p)
    assert run(sched, overlap=overlap)[0] == reference_outputs(ps)


@pytest.mark.parametrize("overlap", [False, True])
def test_batched_outputs_equal_solo_outputs(overlap):
    ps = prompts(12)
    sched = make_scheduler(budget=24)
    for rid, p in ps.items():
        add(sched, rid, p)
    outputs, reasons, _ = run(sched, overlap=overlap)
    assert outputs == reference_outputs(ps)
    assert set(reasons.values()) == {"length"}


@pytest.mark.parametrize("overlap", [False, True])
def test_preemption_keeps_outputs_identical_and_frees_everything(overlap):
    ps = prompts(8)
    sched = make_scheduler(num_blocks=14, budget=64)  # too few blocks for all at once
    for rid, p in ps.items():
        add(sched, rid, p, max_tokens=12)
    outputs, _, _ = run(sched, overlap=overlap)
    assert sched.num_preemptions > 0
    assert outputs == reference_outputs(ps, max_tokens=12)
    assert sched.kv.num_free_blocks == sched.kv.pool.num_usable_blocks


@pytest.mark.parametrize("depth", [2, 3])
def test_a_pipeline_keeps_steps_of_other_requests_in_flight(depth):
    """Pipelined: up to `depth` steps in flight, never two sampling the same request (run()
    checks it), and the outputs those of each request alone, with and without preemption."""
    for n, num_blocks, max_tokens in ((12, 64, 8), (8, 14, 12)):
        ps = prompts(n)
        sched = make_scheduler(num_blocks=num_blocks, budget=24, pipeline_depth=depth)
        for rid, p in ps.items():
            add(sched, rid, p, max_tokens=max_tokens)
        busy = []
        outputs, reasons, _ = run(sched, depth=depth, busy=busy)
        if num_blocks == 64:  # room for everyone: every stage had a step of its own
            assert max(busy) == depth
        assert outputs == reference_outputs(ps, max_tokens=max_tokens)
        assert set(reasons.values()) == {"length"}
        assert sched.kv.num_free_blocks == sched.kv.pool.num_usable_blocks
    assert sched.num_preemptions > 0


def test_a_pipelined_step_skips_requests_whose_token_is_on_its_way():
    sched = make_scheduler(pipeline_depth=2)
    runner = FakeRunner()
    add(sched, "a", [1, 2, 3], max_tokens=4)
    first = sched.schedule()
    add(sched, "b", [4, 5])
    second = sched.schedule()  # a's token is not back: only b runs
    assert second.num_scheduled_tokens == {"b": 2}
    assert sched.schedule().is_empty  # both in flight
    sched.update_from_output(first, runner.execute(first))
    assert sched.schedule().num_scheduled_tokens == {"a": 1}


def test_overlapped_steps_count_the_token_in_flight():
    sched = make_scheduler()
    runner = FakeRunner()
    add(sched, "a", [1, 2, 3], max_tokens=2)
    first = sched.schedule()
    request = sched.requests["a"]
    assert request.num_pending_tokens == 1  # sampled by the prefill, not back yet
    second = sched.schedule()  # decodes that pending token
    assert second.num_scheduled_tokens == {"a": 1} and request.num_pending_tokens == 2
    assert sched.schedule().num_scheduled_tokens == {}  # its second token ends it: max_tokens
    sched.update_from_output(first, runner.execute(first))
    assert request.num_pending_tokens == 1 and request.output_token_ids == [6]
    outputs = sched.update_from_output(second, runner.execute(second))
    assert outputs[0].finish_reason == "length" and not sched.requests


def test_abort_at_any_step_frees_all_blocks():
    for abort_step in range(1, 8):
        sched = make_scheduler(budget=8)
        for rid, p in prompts(4).items():
            add(sched, rid, p)

        def abort(s, step):
            if step == abort_step:
                s.finish_requests(["r1", "r3"])
        outputs, reasons, _ = run(sched, on_step=abort)
        assert "r1" not in reasons and "r3" not in reasons
        assert reasons["r0"] == "length" and reasons["r2"] == "length"
        assert sched.kv.num_free_blocks == sched.kv.pool.num_usable_blocks
        assert not sched.requests


def test_abort_of_waiting_request():
    sched = make_scheduler(max_seqs=1)
    add(sched, "a", [1, 2, 3])
    add(sched, "b", [4, 5, 6])
    sched.schedule()
    sched.finish_requests(["b"])
    assert len(sched.waiting) == 0 and "b" in sched.schedule().finished_request_ids


def test_max_num_seqs_limits_running():
    sched = make_scheduler(max_seqs=2, budget=1000)
    for rid, p in prompts(5).items():
        add(sched, rid, p)
    assert len(sched.schedule().num_scheduled_tokens) == 2


def test_priority_orders_admission_and_preemption():
    sched = make_scheduler(max_seqs=1, budget=1000)
    add(sched, "low", [1, 2, 3], priority=5)
    add(sched, "high", [4, 5, 6], priority=-1)
    assert list(sched.schedule().num_scheduled_tokens) == ["high"]

    sched = make_scheduler(num_blocks=5, budget=1000)  # 4 usable blocks
    add(sched, "important", [1] * 6, priority=0, max_tokens=20)
    add(sched, "meh", [2] * 6, priority=9, max_tokens=20)
    runner = FakeRunner()
    preempted = set()
    for _ in range(6):
        out = sched.schedule()
        preempted |= out.preempted_request_ids
        sched.update_from_output(out, runner.execute(out))
    assert preempted == {"meh"}


def test_a_request_ended_by_its_pending_token_gives_up_its_seat_at_once():
    sched = make_scheduler(max_seqs=1)
    add(sched, "a", [1, 2, 3], max_tokens=1)
    add(sched, "b", [4, 5, 6])
    assert list(sched.schedule().num_scheduled_tokens) == ["a"]  # its token is still pending
    # that token is a's last: b takes the seat before a's result is back, as it would after
    assert list(sched.schedule().num_scheduled_tokens) == ["b"]


@pytest.mark.parametrize("overlap", [False, True])
def test_stop_conditions(overlap):
    sched = make_scheduler()
    # the fake model's first token for prompt [1, 2] is 3
    add(sched, "eos", [1, 2], max_tokens=8)
    sched.requests["eos"].eos_token_id = 3
    add(sched, "stop_id", [1, 2], max_tokens=8, stop_token_ids=[3])
    add(sched, "min", [1, 2], max_tokens=8, min_tokens=2, stop_token_ids=[3])
    add(sched, "ignore", [1, 2], max_tokens=3, ignore_eos=True)
    sched.requests["ignore"].eos_token_id = 3
    outputs, reasons, _ = run(sched, overlap=overlap)
    assert outputs["eos"] == [3] and reasons["eos"] == "stop"
    assert outputs["stop_id"] == [3] and reasons["stop_id"] == "stop"
    assert len(outputs["min"]) >= 2
    assert len(outputs["ignore"]) == 3 and reasons["ignore"] == "length"


@pytest.mark.parametrize("overlap", [False, True])
def test_max_model_len_ends_generation(overlap):
    sched = make_scheduler(max_len=12)
    add(sched, "a", list(range(1, 11)), max_tokens=100)
    outputs, reasons, _ = run(sched, overlap=overlap)
    assert len(outputs["a"]) == 2 and reasons["a"] == "length"


def test_prefix_hit_skips_computation():
    sched = make_scheduler(budget=1000)
    runner = FakeRunner()
    prompt = list(range(1, 30))
    add(sched, "a", prompt, max_tokens=1)
    run(sched, runner)
    add(sched, "b", prompt + [5, 6], max_tokens=1)
    out = sched.schedule()
    assert out.num_scheduled_tokens["b"] == 31 - 28
    assert out.new_requests[0].num_computed_tokens == 28


def test_finished_status_is_reported():
    sched = make_scheduler()
    add(sched, "a", [1, 2], max_tokens=1)
    run(sched)
    assert RequestStatus.FINISHED_LENGTH.finish_reason == "length"
    assert "a" in sched.schedule().finished_request_ids


# ---- KV groups ---------------------------------------------------------------------------
class TableCheckingRunner(FakeRunner):
    """Also keeps each request's block tables from the diffs, as the model runner does, and
    checks every step that each block it reads (from the first its window sees) or writes is
    one the request holds in the manager, and that the blocks it writes are its alone."""

    def __init__(self, sched) -> None:
        super().__init__()
        self.kv = sched.kv
        self.tables: dict[str, list[list[int]]] = {}

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for new in out.new_requests:
            self.tables[new.request_id] = [list(t) for t in new.block_ids]
        for cached in out.cached_requests:
            if cached.resumed_from_preemption:
                self.tables[cached.request_id] = [list(t) for t in cached.new_block_ids]
            else:
                for table, ids in zip(self.tables[cached.request_id], cached.new_block_ids):
                    table.extend(ids)
        starts = {r.request_id: r.num_computed_tokens
                  for r in (*out.new_requests, *out.cached_requests)}
        for rid, n in out.num_scheduled_tokens.items():
            self._check(rid, starts[rid], n)
        return super().execute(out)

    def _check(self, rid: str, start: int, n: int) -> None:
        held = self.kv.req_blocks[rid]
        for g, group in enumerate(self.kv.groups):
            window = getattr(group, "window", None)
            first = 0 if window is None else first_needed_block(window, start, BS)
            for i in range(first, (start + n - 1) // BS + 1):
                block_id = self.tables[rid][g][i]
                assert block_id != 0 and held[g][i].block_id == block_id, (rid, g, i)
                if i >= start // BS:  # written this step
                    assert self.kv.pool.blocks[block_id].ref_cnt == 1, (rid, g, i)


def local_run(sched, overlap=False):
    return run(sched, TableCheckingRunner(sched), overlap=overlap)


@pytest.mark.parametrize("overlap", [False, True])
def test_window_groups_read_only_blocks_they_hold_and_change_no_output(overlap):
    ps = prompts(12, base_len=30)
    sched = make_scheduler(budget=24, num_blocks=128, windows=(None, 8, 8))
    for rid, p in ps.items():
        add(sched, rid, p, max_tokens=20)
    outputs, _, _ = local_run(sched, overlap)
    assert outputs == reference_outputs(ps, max_tokens=20)
    assert sched.kv.num_free_blocks == sched.kv.pool.num_usable_blocks


@pytest.mark.parametrize("overlap", [False, True])
def test_window_groups_survive_preemption_and_prefix_hits(overlap):
    ps = prompts(8, base_len=30)
    ps.update({f"again-{rid}": p for rid, p in list(ps.items())[:3]})  # prefix hits
    sched = make_scheduler(num_blocks=40, budget=64, windows=(None, 6))
    for rid, p in ps.items():
        add(sched, rid, p, max_tokens=16)
    outputs, _, _ = local_run(sched, overlap)
    assert sched.num_preemptions > 0 and sched.kv.stats.hits > 0
    expected = reference_outputs({rid: p for rid, p in ps.items()}, max_tokens=16)
    assert outputs == expected
    assert sched.kv.num_free_blocks == sched.kv.pool.num_usable_blocks


def test_freeing_the_window_avoids_preemption_where_full_tables_would_not_fit():
    """Four 60-token prompts decoding 20 tokens in 16-token chunks, on 60 blocks: with every
    block kept each needs 20, with a window of 8 only 5 or 6."""
    ps = {f"r{i}": [(i * 13 + j) % 50 + 1 for j in range(60)] for i in range(4)}
    counts = {}
    for windows in ((8,), (None,)):
        sched = make_scheduler(num_blocks=61, budget=64, windows=windows)
        for rid, p in ps.items():
            add(sched, rid, p, max_tokens=20)
        outputs, _, _ = local_run(sched)
        assert outputs == reference_outputs(ps, max_tokens=20)
        counts[windows] = sched.num_preemptions
    assert counts[(8,)] == 0 and counts[(None,)] > 0
