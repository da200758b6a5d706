"""Server overhead: the same workload offline (LLM.generate) and through a real
`pagoda serve` over HTTP, in one run; reports HTTP throughput as a fraction of offline."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import time
from typing import Any

import httpx

from pagoda.bench.datasets import BenchRequest
from pagoda.bench.throughput import (
    SystemFigures,
    ThroughputConfig,
    build_llm,
    environment,
    git_info,
    make_requests,
    run_pagoda,
    warm_up,
)


def server_command(cfg: ThroughputConfig, port: int) -> list[str]:
    """`pagoda serve` with the same engine settings as the offline run."""
    cmd = [sys.executable, "-m", "pagoda.cli.main", "serve", cfg.model, "--host", "127.0.0.1",
           "--port", str(port), "--disable-log-requests", "--seed", str(cfg.seed),
           "--max-pending-requests", str(max(1024, cfg.num_prompts))]
    for key, value in cfg.engine_kwargs.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    return cmd


def start_server(cfg: ThroughputConfig, port: int, timeout: float = 600.0) -> subprocess.Popen:
    proc = subprocess.Popen(server_command(cfg, port), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_healthy(proc, f"http://127.0.0.1:{port}", timeout)
    return proc


def wait_healthy(proc: subprocess.Popen, base_url: str, timeout: float) -> None:
    """Wait for a `pagoda serve` process to answer /health with 200; kill it if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pagoda serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise TimeoutError("pagoda serve did not become ready")


async def _one(http: httpx.AsyncClient, url: str, request: BenchRequest,
               cfg: ThroughputConfig, index: int) -> dict[str, Any]:
    body = {"prompt": request.prompt_token_ids, "max_tokens": request.output_len,
            "ignore_eos": True, "temperature": cfg.temperature}
    if cfg.temperature > 0:
        body["seed"] = cfg.seed + index
    response = await http.post(url, json=body)
    response.raise_for_status()
    return response.json()["usage"]


async def _run_http(port: int, cfg: ThroughputConfig,
                    requests: list[BenchRequest]) -> tuple[float, list[dict[str, Any]]]:
    url = f"http://127.0.0.1:{port}/v1/completions"
    limits = httpx.Limits(max_connections=len(requests) + 1)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
        await _one(http, url, BenchRequest(requests[0].prompt_token_ids, 4), cfg, 0)  # warm-up
        start = time.perf_counter()
        usages = await asyncio.gather(*[_one(http, url, r, cfg, i)
                                        for i, r in enumerate(requests)])
        return time.perf_counter() - start, usages


def run_http(cfg: ThroughputConfig, requests: list[BenchRequest], port: int) -> SystemFigures:
    """All requests at once through HTTP; token counts from the server's usage."""
    proc = start_server(cfg, port)
    try:
        elapsed, usages = asyncio.run(_run_http(port, cfg, requests))
    finally:
        proc.terminate()
        proc.wait(60)
    return SystemFigures("pagoda-http", elapsed, len(requests),
                         sum(u["prompt_tokens"] for u in usages),
                         sum(u["completion_tokens"] for u in usages))


def run_overhead(cfg: ThroughputConfig, port: int = 8199) -> dict[str, Any]:
    llm = build_llm(cfg)
    requests = make_requests(cfg, llm.engine.model_info.vocab_size, llm.get_tokenizer())
    warm_up(llm, cfg, requests[0])
    offline = run_pagoda(llm, cfg, requests)
    del llm
    gc.collect()
    http = run_http(cfg, requests, port)
    return {
        "benchmark": "http-overhead", "model": cfg.model, "git": git_info(),
        "environment": environment(), "command": cfg.command, "notes": cfg.notes,
        "workload": {"num_prompts": cfg.num_prompts, "input_len": cfg.input_len,
                     "output_len": cfg.output_len, "temperature": cfg.temperature},
        "engine_kwargs": cfg.engine_kwargs,
        "systems": {"offline": _figures(offline), "http": _figures(http)},
        "http_over_offline": {
            "output_tokens_per_s": http.output_tokens_per_s / offline.output_tokens_per_s,
            "requests_per_s": http.requests_per_s / offline.requests_per_s},
    }


def _figures(f: SystemFigures) -> dict[str, Any]:
    return {"elapsed_s": f.elapsed_s, "requests": f.num_requests,
            "prompt_tokens": f.prompt_tokens, "output_tokens": f.output_tokens,
            "requests_per_s": f.requests_per_s, "output_tokens_per_s": f.output_tokens_per_s,
            "total_tokens_per_s": f.total_tokens_per_s}
