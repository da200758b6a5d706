"""Serving figures from hand-made records, checked against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from pagoda.bench.serve.client import RequestRecord
from pagoda.bench.serve.metrics import (
    compute_metrics,
    error_counts,
    is_good,
    max_concurrency_seen,
    parse_goodput,
    request_tpot_s,
)


def _ok(index, start, ttft, itl, e2el, prompt, output):
    return RequestRecord(index, output, prompt, start_s=start, success=True, ttft_s=ttft,
                         itl_s=list(itl), e2el_s=e2el, prompt_tokens=prompt,
                         output_tokens=output, finish_reason="length")


def _failed(index, error):
    return RequestRecord(index, 8, None, success=False, error=error)


RECORDS = [
    _ok(0, 0.0, 0.100, [0.05, 0.05, 0.05], 0.250, 10, 4),  # TPOT 0.05
    _ok(1, 0.1, 0.300, [0.10], 0.500, 20, 2),  # TPOT 0.2
    _ok(2, 0.6, 0.200, [], 0.200, 30, 1),  # one token: no TPOT
    _failed(3, "HTTP 400: too long"),
    _failed(4, "HTTP 400: too long"),
]


def test_summary_figures():
    m = compute_metrics(RECORDS, duration_s=2.0, percentiles=(50, 100))
    assert (m["completed"], m["failed"]) == (3, 2)
    assert m["total_input_tokens"] == 60 and m["total_output_tokens"] == 7
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_token_throughput"] == pytest.approx(33.5)
    assert m["ttft"]["mean_ms"] == pytest.approx(200.0)
    assert m["ttft"]["median_ms"] == pytest.approx(200.0)
    assert m["ttft"]["std_ms"] == pytest.approx(math.sqrt((100**2 + 0 + 100**2) / 3))
    assert m["ttft"]["p100_ms"] == pytest.approx(300.0)
    assert m["tpot"]["mean_ms"] == pytest.approx(125.0)
    assert m["itl"]["mean_ms"] == pytest.approx(62.5)
    assert m["e2el"]["p50_ms"] == pytest.approx(250.0)
    assert m["max_concurrency_seen"] == 2


def test_tpot_needs_two_tokens():
    assert request_tpot_s(RECORDS[0]) == pytest.approx(0.05)
    assert request_tpot_s(RECORDS[2]) is None
    assert request_tpot_s(RECORDS[3]) is None


def test_goodput_counts_requests_within_every_slo():
    slos = parse_goodput(["ttft:250", "tpot:100"])
    assert slos == {"ttft": 250.0, "tpot": 100.0}
    assert [is_good(r, slos) for r in RECORDS] == [True, False, True, False, False]
    m = compute_metrics(RECORDS, 2.0, slos=slos)
    assert m["goodput"]["good_requests"] == 2
    assert m["goodput"]["request_goodput"] == pytest.approx(1.0)


@pytest.mark.parametrize("spec", [["ttft"], ["latency:5"], ["ttft:abc"], ["tpot:-1"]])
def test_bad_goodput_specs(spec):
    with pytest.raises(ValueError):
        parse_goodput(spec)


def test_no_successes_still_summarizes():
    m = compute_metrics([_failed(0, "x")], 1.0)
    assert m["completed"] == 0 and m["output_throughput"] == 0 and m["ttft"]["mean_ms"] == 0


def test_error_counts_and_peak_concurrency():
    assert error_counts(RECORDS) == {"HTTP 400: too long": 2}
    back_to_back = [_ok(0, 0.0, 0.1, [], 1.0, 1, 1), _ok(1, 1.0, 0.1, [], 1.0, 1, 1)]
    assert max_concurrency_seen(back_to_back) == 1  # an end and a start at once do not overlap

