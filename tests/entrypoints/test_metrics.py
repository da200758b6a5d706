"""EngineMetrics: several models in one registry, each under its model_name label; the
replicas of one model add up in its gauges, and a replica that goes away leaves them."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from pagoda.core_outputs import SchedulerStats
from pagoda.entrypoints.metrics import EngineMetrics


def samples(metrics: EngineMetrics, name: str) -> dict[str, float]:
    for family in text_string_to_metric_families(metrics.render().decode()):
        if family.name == name:
            return {s.labels["model_name"]: s.value for s in family.samples}
    raise KeyError(name)


def stats(running: int, waiting: int, usage: float) -> SchedulerStats:
    s = SchedulerStats()
    s.num_running, s.num_waiting, s.kv_cache_usage = running, waiting, usage
    return s


def test_models_and_replicas_share_one_registry():
    root = EngineMetrics("a")
    replica0, replica1, other = root.for_model("b"), root.for_model("b"), root.for_model("c")
    replica0.on_stats(stats(3, 1, 0.5))
    replica1.on_stats(stats(4, 0, 0.25))
    other.on_stats(stats(2, 5, 0.75))
    assert samples(root, "vllm:num_requests_running") == {"b": 7, "c": 2}
    assert samples(root, "vllm:num_requests_waiting") == {"b": 1, "c": 5}
    assert samples(root, "vllm:kv_cache_usage_perc") == {"b": 0.375, "c": 0.75}
    replica1.forget()
    assert samples(root, "vllm:num_requests_running")["b"] == 3
    replica0.forget()
    assert samples(root, "vllm:num_requests_running")["b"] == 0
    assert samples(root, "vllm:kv_cache_usage_perc")["b"] == 0.0
    assert set(samples(root, "vllm:request_success")) == {"a", "b", "c"}
