"""Sweep specifications."""

from __future__ import annotations

import math

import pytest

from pagoda.bench.serve.sweep import parse_sweep


def test_sweep_specs():
    assert parse_sweep("max-concurrency=1,4,16") == ("max-concurrency", [1, 4, 16])
    assert parse_sweep("request-rate=0.5,inf") == ("request-rate", [0.5, math.inf])
    for bad in ("concurrency=1", "max-concurrency=", "max-concurrency=1.5",
                "request-rate=0", "request-rate=a"):
        with pytest.raises(ValueError):
            parse_sweep(bad)
