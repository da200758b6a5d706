"""The memory planner: minimums first, the rest by demand, never beyond what a model uses."""

from __future__ import annotations

import pytest

from pagoda.fleet.planner import (
    GIB,
    DevicePlan,
    DoesNotFit,
    ModelNeed,
    PlanEntry,
    divide_kv,
)


def need(name: str, weights: float, kv_min: float, demand: float) -> ModelNeed:
    return ModelNeed(name, int(weights * GIB), 0, 0, int(kv_min * GIB), int(demand * GIB))


def test_everyone_gets_the_minimum_then_a_share_by_demand():
    a, b = need("a", 10, 1, 31), need("b", 5, 1, 11)  # demands beyond minimum: 30 and 10
    kv = divide_kv(37 * GIB, [a, b])  # 37 - 17 = 20 GiB spare
    assert kv["a"] == pytest.approx(1 * GIB + 20 * GIB * 31 / 42, abs=2)
    assert kv["b"] == pytest.approx(1 * GIB + 20 * GIB * 11 / 42, abs=2)
    assert sum(kv.values()) + 15 * GIB <= 37 * GIB


def test_a_capped_model_leaves_its_share_to_the_others():
    small, big = need("small", 1, 0.5, 1), need("big", 10, 1, 100)
    budget = int(92.5 * GIB)  # 80 GiB spare: small's share (80/101 GiB) is over its room
    kv = divide_kv(budget, [small, big])
    assert kv["small"] == 1 * GIB  # its whole demand
    assert kv["big"] == pytest.approx(budget - 11 * GIB - 1 * GIB, abs=4)


def test_everyone_capped_leaves_memory_free():
    kv = divide_kv(100 * GIB, [need("a", 1, 1, 2), need("b", 1, 1, 3)])
    assert kv == {"a": 2 * GIB, "b": 3 * GIB}


def test_minimums_that_do_not_fit_are_refused():
    with pytest.raises(DoesNotFit, match="a, b need 22.00 GiB"):
        divide_kv(20 * GIB, [need("a", 10, 1, 5), need("b", 10, 1, 5)])


def test_plan_reports_what_is_held():
    plan = DevicePlan("cuda:0", 140 * GIB, 126 * GIB, [
        PlanEntry("a", 0, "loaded", 16 * GIB, 2 * GIB, GIB, 30 * GIB, 49 * GIB, True),
        PlanEntry("b", 0, "sleeping", 2 * GIB, GIB, GIB, 4 * GIB, GIB, False)])
    assert plan.used_bytes == 50 * GIB and plan.free_bytes == 76 * GIB
    text = plan.format()
    assert "budget 126.00 GiB of 140.00 GiB" in text and "(estimated)" in text
    assert plan.to_json()["models"][1]["state"] == "sleeping"
