"""`pagoda bench serve`: one serving benchmark against any OpenAI-compatible endpoint."""

from __future__ import annotations

import asyncio
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from pagoda.bench.serve.client import RequestSettings
from pagoda.bench.serve.datasets import DatasetSpec, ServeRequest, build_dataset
from pagoda.bench.serve.metrics import error_counts
from pagoda.bench.serve.report import format_report
from pagoda.bench.serve.runner import RunResult, RunSettings, run_benchmark


@dataclass(slots=True)
class ServeBenchConfig:
    """A whole benchmark: target, workload and arrival settings."""

    request: RequestSettings
    dataset: DatasetSpec
    run: RunSettings
    tokenizer: str | None = None
    label: str | None = None  # the system under test, as results and plots name it
    command: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_benchmark_tokenizer(name: str | None, model: str) -> Any | None:
    """`name` (or else the served model's name) as a tokenizer: a pulled pagoda model, a
    checkpoint directory, or a name in the local Hugging Face cache. None if not found
    and none was asked for explicitly."""
    from pagoda.errors import PagodaError
    from pagoda.models.loader.tokenizer import load_tokenizer
    from pagoda.models.source import resolve_model

    spec = name or model
    try:
        return load_tokenizer(resolve_model(spec))
    except (PagodaError, OSError, ValueError):
        pass
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError):
        if name is not None:
            raise ValueError(f"cannot load tokenizer {name!r}") from None
        return None


def discover_model(base_url: str, api_key: str | None, timeout_s: float = 30.0) -> str:
    """The first model the server lists at /v1/models."""
    import httpx
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=timeout_s)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"could not list the models at {base_url}/v1/models ({exc}); "
                         f"pass --model") from None


def build_requests(cfg: ServeBenchConfig, tokenizer: Any | None,
                   seed_offset: int = 0) -> list[ServeRequest]:
    spec = cfg.dataset
    if seed_offset:
        spec = DatasetSpec(**{**asdict(spec), "seed": spec.seed + seed_offset})
    return build_dataset(spec, tokenizer)


def run_once(cfg: ServeBenchConfig, requests: list[ServeRequest]) -> RunResult:
    return asyncio.run(run_benchmark(cfg.request, cfg.run, requests))


def result_document(cfg: ServeBenchConfig, result: RunResult) -> dict[str, Any]:
    """The saved JSON: settings, summary figures, errors and every request's timings, plus
    the flat keys `vllm bench serve --save-result` writes (mean_ttft_ms, ttfts, itls, ...)
    so vLLM's tools and notebooks read it unchanged. Their `errors` is a list with one entry
    per request; pagoda's counts by error are `error_counts`."""
    document = {**describe(cfg), **result.to_json()}
    document["error_counts"] = document.pop("errors")
    return {**document, **vllm_flat_keys(cfg, result)}


def vllm_flat_keys(cfg: ServeBenchConfig, result: RunResult) -> dict[str, Any]:
    """The run as vLLM's flat result layout: seconds for per-request lists, ms for stats."""
    m, records = result.metrics, result.records
    flat: dict[str, Any] = {
        "backend": "openai-chat" if cfg.request.chat else "openai",
        "model_id": cfg.request.model, "tokenizer_id": cfg.tokenizer or cfg.request.model,
        "num_prompts": len(records), "request_rate": _json_rate(cfg.run.request_rate),
        "burstiness": cfg.run.burstiness, "max_concurrency": cfg.run.max_concurrency,
        "duration": m["duration_s"], "completed": m["completed"], "failed": m["failed"],
        "total_input_tokens": m["total_input_tokens"],
        "total_output_tokens": m["total_output_tokens"],
        "request_throughput": m["request_throughput"],
        "output_throughput": m["output_throughput"],
        "total_token_throughput": m["total_token_throughput"],
        "input_lens": [r.prompt_tokens or 0 for r in records],
        "output_lens": [r.output_tokens or 0 if r.success else 0 for r in records],
        "ttfts": [r.ttft_s or 0.0 if r.success else 0.0 for r in records],
        "itls": [list(r.itl_s) if r.success else [] for r in records],
        "errors": ["" if r.success else (r.error or "unknown") for r in records],
    }
    if "goodput" in m:
        flat["request_goodput"] = m["goodput"]["request_goodput"]
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat, value in (m.get(name) or {}).items():  # mean_ms, median_ms, std_ms, p99_ms
            kind, unit = stat.rsplit("_", 1)
            flat[f"{kind}_{name}_{unit}"] = value
    return flat


def describe(cfg: ServeBenchConfig) -> dict[str, Any]:
    request = asdict(cfg.request)
    request.pop("api_key", None)
    run = asdict(cfg.run)
    run["request_rate"] = _json_rate(cfg.run.request_rate)
    return {
        "benchmark": "serve", "label": cfg.label,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": cfg.command, "tokenizer": cfg.tokenizer, "client_host": platform.node(),
        "request_settings": request, "dataset": asdict(cfg.dataset), "run_settings": run,
        **cfg.extra,
    }


def _json_rate(rate: float) -> float | str:
    return "inf" if rate == float("inf") else rate


def print_report(cfg: ServeBenchConfig, result: RunResult) -> None:
    print(format_report(result.metrics, error_counts(result.records),
                        cfg.run.max_concurrency, cfg.run.request_rate))
