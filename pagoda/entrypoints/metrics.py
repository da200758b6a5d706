"""Prometheus metrics under vLLM's names and meanings, labelled by model, so existing
dashboards work unchanged."""

from __future__ import annotations

import copy
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric

from pagoda.core_outputs import SchedulerStats
from pagoda.engine.async_engine import RequestTiming
from pagoda.engine.model_info import ModelInfo

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
_STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
FINISH_REASONS = ("stop", "length", "abort", "error")
MODEL_EVENTS = ("load", "sleep", "wake", "unload")  # what a multi-model server does to a model


class _Registry(CollectorRegistry):
    """A registry that leaves out the `_created` timestamp series prometheus_client adds to
    counters and histograms (vLLM exports none; they show up as stray gauge families)."""

    def collect(self):
        for family in super().collect():
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield kept


class EngineMetrics:
    """One registry per server; implements the AsyncEngine's EngineObserver."""

    def __init__(self, model_name: str) -> None:
        self.registry = _Registry()
        self.model_name = model_name
        self._last = SchedulerStats()
        self._part = object()
        self._cache_info: dict[str, str] | None = None
        self._gauge_parts: dict[str, dict[object, SchedulerStats]] = {}  # shared by copies
        self._gauges()
        self._counters()
        self._histograms()
        self._export_zeros()

    def for_model(self, model_name: str) -> EngineMetrics:
        """An observer for another model (or replica) that reports into the same registry
        under its own model_name label."""
        other = copy.copy(self)
        other.model_name = model_name
        other._last = SchedulerStats()
        other._part = object()  # this observer's share of the model's gauges
        other._cache_info = None
        other._export_zeros()
        return other

    def _export_zeros(self) -> None:
        """Give every series of this model a sample from the start, so queries and rate()
        see 0 rather than nothing before the first request."""
        for metric in (self.running, self.waiting, self.kv_usage, self.gpu_cache_usage,
                       self.prompt_tokens, self.generation_tokens, self.preemptions,
                       self.prefix_queries, self.prefix_hits, self.iteration_tokens,
                       *self._request_histograms()):
            self._labels(metric)
        for reason in FINISH_REASONS:
            self._labels(self.success, finished_reason=reason)
        for event in MODEL_EVENTS:
            self._labels(self.model_events, event=event)

    def _labels(self, metric, **extra):
        return metric.labels(model_name=self.model_name, **extra)

    def _gauges(self) -> None:
        r, lbl = self.registry, ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests in the running batch",
                             lbl, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled",
                             lbl, registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc",
                              "KV-cache usage (1 = every block in use)", lbl, registry=r)
        self.gpu_cache_usage = Gauge("vllm:gpu_cache_usage_perc",
                                     "KV-cache usage (older name of vllm:kv_cache_usage_perc)",
                                     lbl, registry=r)
        self.cache_config = Gauge("vllm:cache_config_info", "The KV cache's configuration",
                                  ["model_name", "block_size", "num_gpu_blocks", "device",
                                   "cache_dtype"],
                                  registry=r)
        self.parallel_config = Gauge(
            "pagoda:parallel_config_info", "How the model is split over devices (value 1)",
            ["model_name", "tensor_parallel_size", "pipeline_parallel_size"], registry=r)
        self.lora_info = Gauge("vllm:lora_requests_info", "Running and waiting LoRA adapters "
                               "(value: the time of the update)",
                               ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
                               registry=r)
        self.max_loras = 0  # set by the server when LoRA is on

    def _counters(self) -> None:
        r, lbl = self.registry, ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed", lbl,
                                     registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens", lbl,
                                         registry=r)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason",
                               ["model_name", "finished_reason"], registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Cumulative preemptions", lbl,
                                   registry=r)
        self.prefix_queries = Counter("vllm:prefix_cache_queries",
                                      "Prefix-cache lookups, in tokens", lbl, registry=r)
        self.prefix_hits = Counter("vllm:prefix_cache_hits", "Prefix-cache hits, in tokens", lbl,
                                   registry=r)
        self.model_events = Counter("pagoda:model_events", "Model loads, sleeps, wakes and unloads",
                                    ["model_name", "event"], registry=r)
        lora = ["model_name", "lora_name"]
        self.lora_success = Counter("pagoda:lora_request_success", "Finished requests per "
                                    "LoRA adapter and finish reason",
                                    lora + ["finished_reason"], registry=r)
        self.lora_prompt_tokens = Counter("pagoda:lora_prompt_tokens", "Prompt tokens per "
                                          "LoRA adapter", lora, registry=r)
        self.lora_generation_tokens = Counter("pagoda:lora_generation_tokens",
                                              "Generated tokens per LoRA adapter", lora,
                                              registry=r)

    def _histograms(self) -> None:
        r, lbl = self.registry, ["model_name"]

        def hist(name: str, doc: str, buckets=_LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, lbl, buckets=buckets, registry=r)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token")
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between output tokens")
        self.e2e = hist("vllm:e2e_request_latency_seconds", "End-to-end request latency")
        self.queue = hist("vllm:request_queue_time_seconds", "Time waiting before scheduling")
        self.req_prompt = hist("vllm:request_prompt_tokens", "Prompt tokens per request",
                               _TOKEN_BUCKETS)
        self.req_gen = hist("vllm:request_generation_tokens", "Generated tokens per request",
                            _TOKEN_BUCKETS)
        self.req_max_gen = hist("vllm:request_max_num_generation_tokens",
                                "The most tokens each request may generate", _TOKEN_BUCKETS)
        self.prefill = hist("vllm:request_prefill_time_seconds",
                            "From first scheduling to the first token")
        self.decode = hist("vllm:request_decode_time_seconds",
                           "From the first token to the last")
        self.inference = hist("vllm:request_inference_time_seconds",
                              "From first scheduling to the last token")
        self.tpot = hist("vllm:time_per_output_token_seconds",
                         "Mean time per output token after the first, per request")
        self.iteration_tokens = hist("vllm:iteration_tokens_total",
                                     "Tokens computed per engine step", _STEP_TOKEN_BUCKETS)

    def _request_histograms(self) -> tuple[Histogram, ...]:
        return (self.ttft, self.itl, self.e2e, self.queue, self.req_prompt, self.req_gen,
                self.req_max_gen, self.prefill, self.decode, self.inference, self.tpot)

    def record_model_event(self, model_name: str, event: str) -> None:
        """The fleet loaded, put to sleep, woke or unloaded a model (one of MODEL_EVENTS)."""
        self.model_events.labels(model_name=model_name, event=event).inc()

    # ---- EngineObserver ------------------------------------------------------------------------
    def on_model_info(self, info: ModelInfo) -> None:
        if self._cache_info is not None:
            self.cache_config.remove(*self._cache_info.values())
        self._cache_info = {"model_name": self.model_name, "block_size": str(info.block_size),
                            "num_gpu_blocks": str(info.num_kv_blocks), "device": info.device,
                            "cache_dtype": info.kv_cache_dtype}
        self.cache_config.labels(**self._cache_info).set(1)
        self.parallel_config.labels(
            model_name=self.model_name, tensor_parallel_size=str(info.tensor_parallel_size),
            pipeline_parallel_size=str(info.pipeline_parallel_size)).set(1)

    def on_stats(self, stats: SchedulerStats) -> None:
        # the replicas of one model report under one label: the gauges show their sum
        self._gauge_parts.setdefault(self.model_name, {})[self._part] = stats
        self._publish_gauges()
        last = self._last
        self._inc(self.preemptions, stats.num_preemptions - last.num_preemptions)
        self._inc(self.prefix_queries, stats.prefix_cache_queries - last.prefix_cache_queries)
        self._inc(self.prefix_hits, stats.prefix_cache_hits - last.prefix_cache_hits)
        step_tokens = stats.num_computed_tokens_total - last.num_computed_tokens_total
        if step_tokens > 0:
            self._labels(self.iteration_tokens).observe(step_tokens)
        self._last = stats
        if self.max_loras:
            self._publish_lora_info(stats)

    def _publish_lora_info(self, stats: SchedulerStats) -> None:
        """vLLM's info gauge: one series, the current adapters in its labels."""
        self.lora_info.clear()
        self.lora_info.labels(max_lora=str(self.max_loras),
                              waiting_lora_adapters=",".join(stats.waiting_lora_adapters),
                              running_lora_adapters=",".join(stats.running_lora_adapters)
                              ).set(time.time())

    def forget(self) -> None:
        """This observer's engine is gone: its share leaves the model's gauges."""
        self._gauge_parts.get(self.model_name, {}).pop(self._part, None)
        self._publish_gauges()
        self._last = SchedulerStats()  # a reloaded engine counts from zero again

    def _publish_gauges(self) -> None:
        parts = list(self._gauge_parts.get(self.model_name, {}).values())
        self._labels(self.running).set(sum(p.num_running for p in parts))
        self._labels(self.waiting).set(sum(p.num_waiting for p in parts))
        usage = sum(p.kv_cache_usage for p in parts) / len(parts) if parts else 0.0
        self._labels(self.kv_usage).set(usage)
        self._labels(self.gpu_cache_usage).set(usage)

    def on_tokens(self, timing: RequestTiming, num_new_tokens: int) -> None:
        if timing.num_generation_tokens == num_new_tokens:  # the first tokens: prefill is done
            self._inc(self.prompt_tokens, timing.num_prompt_tokens)
        self._inc(self.generation_tokens, num_new_tokens)

    def on_request_finished(self, finish_reason: str, timing: RequestTiming) -> None:
        now = time.monotonic()
        self._labels(self.success, finished_reason=finish_reason).inc()
        self._labels(self.req_prompt).observe(timing.num_prompt_tokens)
        self._labels(self.req_gen).observe(timing.num_generation_tokens)
        self._labels(self.req_max_gen).observe(timing.max_tokens)
        self._labels(self.e2e).observe(now - timing.arrival)
        if timing.first_token is not None:
            self._labels(self.ttft).observe(timing.first_token - timing.arrival)
        if timing.queue_time is not None:
            self._labels(self.queue).observe(timing.queue_time)
        itl = self._labels(self.itl)
        for latency in timing.inter_token_latencies:
            itl.observe(latency)
        self._observe_phases(timing)
        if timing.lora_name is not None:
            self._count_lora(finish_reason, timing)

    def _observe_phases(self, timing: RequestTiming) -> None:
        """Prefill, decode and inference time, and the request's mean time per output token."""
        scheduled, first, last = timing.scheduled, timing.first_token, timing.last_token
        if first is None or last is None:
            return
        decode = last - first
        self._labels(self.decode).observe(decode)
        if timing.num_generation_tokens > 1:
            self._labels(self.tpot).observe(decode / (timing.num_generation_tokens - 1))
        if scheduled is not None:
            self._labels(self.prefill).observe(max(first - scheduled, 0.0))
            self._labels(self.inference).observe(max(last - scheduled, 0.0))

    def _count_lora(self, finish_reason: str, timing: RequestTiming) -> None:
        """LoRA traffic on its own (it is in the model's counters too)."""
        name = timing.lora_name
        self._labels(self.lora_success, lora_name=name, finished_reason=finish_reason).inc()
        self._labels(self.lora_prompt_tokens, lora_name=name).inc(timing.num_prompt_tokens)
        self._labels(self.lora_generation_tokens, lora_name=name).inc(
            timing.num_generation_tokens)

    def _inc(self, counter: Counter, amount: float) -> None:
        if amount > 0:
            self._labels(counter).inc(amount)

    def render(self) -> bytes:
        return generate_latest(self.registry)
