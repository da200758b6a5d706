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
    adm.progress("a", 10)  # prompt computed, 10 of 600 outputs done
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
