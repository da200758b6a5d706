"""EngineMetrics: several models in one registry, each under its model_name label; the
replicas of one model add up in its gauges, and a replica that goes away leaves them; vLLM's
names as a real server exports them, counting tokens while requests run."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagoda.core_outputs import SchedulerStats
from pagoda.entrypoints.metrics import EngineMetrics
from tests.utils import RemoteServer


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
    assert samples(root, "vllm:num_requests_running") == {"a": 0, "b": 7, "c": 2}
    assert samples(root, "vllm:num_requests_waiting") == {"a": 0, "b": 1, "c": 5}
    assert samples(root, "vllm:kv_cache_usage_perc") == {"a": 0, "b": 0.375, "c": 0.75}
    replica1.forget()
    assert samples(root, "vllm:num_requests_running")["b"] == 3
    replica0.forget()
    assert samples(root, "vllm:num_requests_running")["b"] == 0
    assert samples(root, "vllm:kv_cache_usage_perc")["b"] == 0.0
    assert set(samples(root, "vllm:request_success")) == {"a", "b", "c"}


def test_a_new_model_exports_every_series_at_zero_and_no_created_families():
    root = EngineMetrics("a")
    other = root.for_model("b")
    other.on_stats(stats(0, 0, 0.0))
    text = root.render().decode()
    assert "_created" not in text
    assert samples(root, "vllm:num_preemptions") == {"a": 0.0, "b": 0.0}
    assert samples(root, "vllm:generation_tokens") == {"a": 0.0, "b": 0.0}
    assert samples(root, "vllm:gpu_cache_usage_perc") == {"a": 0.0, "b": 0.0}
    root.record_model_event("b", "sleep")
    events = {(s.labels["model_name"], s.labels["event"]): s.value
              for s in samples_of(root, "pagoda:model_events")}
    assert events[("b", "sleep")] == 1 and events[("a", "wake")] == 0 and len(events) == 8


def test_cache_config_info_follows_the_loaded_engine():
    from pagoda.engine.model_info import ModelInfo
    metrics = EngineMetrics("a")
    info = ModelInfo("a", 2048, 100, 1, [], num_kv_blocks=64, block_size=16,
                     kv_capacity_tokens=1024)
    metrics.on_model_info(info)
    info.num_kv_blocks = 80  # reloaded with another budget: one series, the new one
    metrics.on_model_info(info)
    family = next(f for f in text_string_to_metric_families(metrics.render().decode())
                  if f.name == "vllm:cache_config_info")
    assert [(s.labels["num_gpu_blocks"], s.labels["block_size"], s.labels["cache_dtype"],
             s.value) for s in family.samples] == [("80", "16", "auto", 1.0)]


def test_phases_and_tokens_of_one_request():
    from pagoda.engine.async_engine import RequestTiming
    metrics = EngineMetrics("a")
    timing = RequestTiming(arrival=100.0, num_prompt_tokens=7, max_tokens=50, queue_time=0.5)
    for now, new in ((101.0, 1), (101.5, 2), (102.5, 1)):
        timing.first_token = timing.first_token or now
        timing.last_token = now
        timing.num_generation_tokens += new
        metrics.on_tokens(timing, new)
    assert samples(metrics, "vllm:prompt_tokens") == {"a": 7}
    assert samples(metrics, "vllm:generation_tokens") == {"a": 4}
    metrics.on_request_finished("stop", timing)

    def total(name):
        return next(s for s in samples_of(metrics, name) if s.name.endswith("_sum")).value
    assert total("vllm:request_prefill_time_seconds") == 0.5
    assert total("vllm:request_decode_time_seconds") == 1.5
    assert total("vllm:request_inference_time_seconds") == 2.0
    assert total("vllm:time_per_output_token_seconds") == 0.5
    assert total("vllm:request_max_num_generation_tokens") == 50


def samples_of(metrics: EngineMetrics, name: str):
    for family in text_string_to_metric_families(metrics.render().decode()):
        if family.name == name:
            return family.samples
    raise KeyError(name)


# ---- against a real `pagoda serve` ---------------------------------------------------------------

NEW_VLLM_NAMES = ("vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
                  "vllm:request_inference_time_seconds", "vllm:time_per_output_token_seconds",
                  "vllm:request_max_num_generation_tokens", "vllm:iteration_tokens_total",
                  "vllm:cache_config_info", "vllm:gpu_cache_usage_perc")


@pytest.fixture(scope="module")
def server(smollm2_dir):
    srv = RemoteServer(str(smollm2_dir), "--served-model-name", "smollm2", "--max-model-len",
                       "1024", "--kv-cache-memory", "64MiB", "--max-num-seqs", "8")
    yield srv
    assert srv.stop() == 0


def scrape(server) -> dict[str, list]:
    text = httpx.get(f"{server.url}/metrics").text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(families: dict[str, list], sample_name: str) -> float:
    family = sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_sum")
    return sum(s.value for s in families[family] if s.name == sample_name)


def test_served_metrics_exist_from_the_start_without_created_series(server):
    families = scrape(server)
    assert all(name in families for name in NEW_VLLM_NAMES), set(NEW_VLLM_NAMES) - set(families)
    assert value(families, "vllm:num_preemptions_total") == 0
    assert not [name for name in families if name.endswith("_created")]
    (info,) = families["vllm:cache_config_info"]
    assert int(info.labels["num_gpu_blocks"]) > 0 and info.labels["model_name"] == "smollm2"


def test_generation_tokens_count_while_the_request_runs(server):
    body = {"model": "smollm2", "prompt": "Count slowly:", "max_tokens": 64,
            "ignore_eos": True, "stream": True, "temperature": 0}
    before = scrape(server)
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 16:  # eight tokens in (SSE events are separated by blank lines)
                during = scrape(server)
        # still streaming: the generated tokens are counted, the request is not finished
        assert value(during, "vllm:generation_tokens_total") - \
            value(before, "vllm:generation_tokens_total") >= 8
        assert value(during, "vllm:request_success_total") == \
            value(before, "vllm:request_success_total")
        assert value(during, "vllm:iteration_tokens_total_count") > \
            value(before, "vllm:iteration_tokens_total_count")
    after = scrape(server)
    assert value(after, "vllm:generation_tokens_total") - \
        value(before, "vllm:generation_tokens_total") == 64
    for name in ("vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
                 "vllm:request_inference_time_seconds", "vllm:time_per_output_token_seconds",
                 "vllm:request_max_num_generation_tokens"):
        assert value(after, name + "_count") - value(before, name + "_count") == 1, name
    assert value(after, "vllm:request_max_num_generation_tokens_sum") - \
        value(before, "vllm:request_max_num_generation_tokens_sum") == 64
    decode = value(after, "vllm:request_decode_time_seconds_sum") - \
        value(before, "vllm:request_decode_time_seconds_sum")
    inference = value(after, "vllm:request_inference_time_seconds_sum") - \
        value(before, "vllm:request_inference_time_seconds_sum")
    assert 0 < decode <= inference
