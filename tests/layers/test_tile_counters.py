"""The kernels' tile counters: one zeroed set per device, reused while it is large enough, a
larger one added (never freed: captured graphs hold their addresses) when a call needs more."""

from __future__ import annotations

import torch

from pagoda.layers import tile_counters as counters


def test_a_set_is_reused_until_a_call_needs_more(monkeypatch):
    monkeypatch.setattr(counters, "COUNTERS", {})
    cpu = torch.device("cpu")
    first = counters.tile_counters(cpu, 10)
    assert first.dtype == torch.int32 and first.numel() >= 10 and counters.nonzero_counters() == 0
    assert counters.tile_counters(cpu, first.numel()) is first
    larger = counters.tile_counters(cpu, first.numel() + 1)
    assert larger is not first and larger.numel() > first.numel()
    assert [id(t) for t in counters.COUNTERS[cpu]] == [id(first), id(larger)]  # both kept
    larger[3] = 1  # a launch that did not reset its counter
    assert counters.nonzero_counters() == 1
