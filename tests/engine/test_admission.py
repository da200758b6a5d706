"""Admission by work: requests, sequences, tokens owed, and the expected wait to start."""

from __future__ import annotations

import time

import pytest

from pagoda.engine.admission import (
    Admission,
    AdmissionLimits,
    EngineOverloadedError,
    Work,
)


def admission(**limits) -> Admission:
    resolved = AdmissionLimits(**limits).resolve(max_num_seqs=4, kv_capacity_tokens=1000)
    return Admission(resolved, max_num_seqs=4)


def test_defaults_follow_the_engine():
    limits = AdmissionLimits().resolve(max_num_seqs=64, kv_capacity_tokens=10_000)
    assert (limits.max_sequences, limits.max_tokens) == (256, 40_000)


def test_an_idle_engine_admits_any_single_request():
    adm = admission(max_sequences=2, max_tokens=10)
    adm.check(Work(8, 100, 512))


def test_sequences_with_n_are_bounded():
    adm = admission(max_sequences=6)
    adm.admit(["a0", "a1", "a2", "a3"], Work(4, 10, 10))
    adm.check(Work(2, 10, 10))
    with pytest.raises(EngineOverloadedError, match="sequences"):
        adm.check(Work(3, 10, 10))


def test_tokens_owed_shrink_as_sequences_progress_and_finish():
    adm = admission(max_tokens=1000)
    adm.admit(["a"], Work(1, 100, 600))
    with pytest.raises(EngineOverloadedError, match="tokens"):
        adm.check(Work(1, 100, 300))
    adm.record_batch([("a", 10)], at=1.0)  # prompt computed, 10 of 600 outputs done
    assert adm.tokens_owed == 590
    adm.check(Work(1, 100, 300))
    adm.finish_sequence("a", completed=True)
    adm.finish_request()
    assert (adm.tokens_owed, adm.sequences, adm.requests) == (0, 0, 0)


def test_a_request_that_would_wait_too_long_is_shed_with_the_wait_as_retry_after():
    adm = admission(max_queue_wait=2.0, max_sequences=100, max_tokens=10**9)
    now = time.monotonic()
    adm.finished.extend([now - 9, now - 6, now - 3, now])  # about 0.4 sequences/s
    adm.admit([f"s{i}" for i in range(4)], Work(4, 1, 1))  # every slot busy
    assert adm.expected_wait(1) == pytest.approx(1 / (4 / 9), rel=0.05)
    with pytest.raises(EngineOverloadedError, match="wait about") as info:
        adm.check(Work(1, 1, 1))
    assert 2.0 < info.value.retry_after <= 60


def test_unknown_rate_admits_within_the_other_bounds():
    adm = admission(max_queue_wait=0.01)
    adm.admit([f"s{i}" for i in range(4)], Work(4, 1, 1))
    assert adm.expected_wait(1) is None
    adm.check(Work(1, 1, 1))


def running(adm: Admission, owed_outputs: list[int], at: float = 100.0) -> None:
    """Sequences that produced their first token (sent by the engine `at`) and still owe
    `owed_outputs`."""
    for i, owed in enumerate(owed_outputs):
        adm.admit([f"r{i}"], Work(1, 10, owed + 1))
    adm.record_batch([(f"r{i}", 1) for i in range(len(owed_outputs))], at)


def test_slots_free_as_running_sequences_finish_their_owed_tokens():
    adm = admission()
    running(adm, [10, 20, 30, 40])  # every one of the 4 slots busy
    assert adm.steps_to_start(1) == 10
    assert adm.steps_to_start(2) == 20
    adm.admit(["w0"], Work(1, 10, 5))  # waiting: takes the slot freed at 10, until 16
    adm.admit(["w1"], Work(1, 10, 5))  # ... then that one, at 16, until 22
    assert adm.steps_to_start(1) == 20  # the new one: the slot freed at 20


def test_the_step_time_comes_from_the_tokens_streaming_back(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    adm = admission(max_queue_wait=1.0, max_sequences=100, max_tokens=10**9)
    running(adm, [100, 100, 100, 100])
    assert adm.step_time is None  # a first token says nothing about the step time
    clock[0] += 0.2
    adm.record_batch([(f"r{i}", 4) for i in range(4)], clock[0])  # 4 tokens in 0.2 s
    assert adm.step_time == pytest.approx(0.05)
    # they owe 96 more each: the step in flight (just begun) and 95 more
    assert adm.expected_wait(1) == pytest.approx(96 * 0.05)
    with pytest.raises(EngineOverloadedError, match="wait about 4.8 s") as info:
        adm.check(Work(1, 1, 1))
    assert info.value.retry_after == pytest.approx(4.8)
    clock[0] += 0.03  # 20 ms left of the step in flight
    assert adm.expected_wait(1) == pytest.approx(0.02 + 95 * 0.05)


def test_a_free_slot_still_waits_for_the_step_in_flight(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    adm = admission(max_queue_wait=0.02, max_sequences=100, max_tokens=10**9)
    running(adm, [100, 100])  # two of the four slots
    clock[0] += 0.2
    adm.record_batch([("r0", 4), ("r1", 4)], clock[0])  # a step takes 50 ms; one has just begun
    assert adm.expected_wait(1) == pytest.approx(0.05)
    with pytest.raises(EngineOverloadedError, match="wait about"):
        adm.check(Work(1, 1, 1))
    clock[0] += 0.04  # 10 ms left
    assert adm.expected_wait(1) == pytest.approx(0.01)
    adm.check(Work(1, 1, 1))
    clock[0] += 1.0  # no tokens for a while: no step known to be in flight
    assert adm.expected_wait(1) == 0.0


def test_batches_read_late_and_at_once_still_measure_the_engine_step(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    adm = admission(max_sequences=100, max_tokens=10**9)
    running(adm, [100, 100, 100], at=100.0)
    # the engine sent a batch every 50 ms; a busy API process reads all five 0.3 s later
    clock[0] = 100.55
    for step in range(1, 6):
        adm.record_batch([(f"r{i}", 1) for i in range(3)], at=100.0 + 0.05 * step)
    assert adm.step_time == pytest.approx(0.05)
    assert adm.step_remainder() == 0.0  # the last step ended 0.3 s ago on the engine's clock
    assert adm.tokens_owed == 3 * 95


def test_the_step_sample_is_the_batch_median_not_a_stray_sequence():
    adm = admission(max_sequences=100, max_tokens=10**9)
    running(adm, [100, 100, 100], at=100.0)
    adm.record_batch([("r2", 1)], at=100.01)  # one sequence's extra batch (10 ms)
    adm.step_time = None
    adm.record_batch([("r0", 1), ("r1", 1), ("r2", 1)], at=100.05)
    assert adm.step_time == pytest.approx(0.05)  # r2's 40 ms gap is not the median
