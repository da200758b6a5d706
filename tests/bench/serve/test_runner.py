"""Arrival schedules: all at once, Poisson, and bursty gamma gaps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pagoda.bench.serve.runner import RunSettings, arrival_times


def test_arrivals():
    assert arrival_times(5, math.inf, 1.0, 0).tolist() == [0.0] * 5
    times = arrival_times(20000, rate=50.0, burstiness=1.0, seed=0)
    assert times[0] == 0 and np.all(np.diff(times) >= 0)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.05)
    assert gaps.std() == pytest.approx(1 / 50, rel=0.05)  # exponential: std == mean
    bursty = np.diff(arrival_times(20000, rate=50.0, burstiness=0.25, seed=0))
    assert bursty.mean() == pytest.approx(1 / 50, rel=0.1)
    assert bursty.std() == pytest.approx(2 / 50, rel=0.1)  # gamma: std = mean / sqrt(shape)



@pytest.mark.parametrize("field, value", [("request_rate", 0.0), ("burstiness", -1.0),
                                          ("max_concurrency", 0), ("num_warmups", -1),
                                          ("percentiles", (101,))])
def test_run_settings_are_checked(field, value):
    with pytest.raises(ValueError):
        RunSettings(**{field: value}).check()
