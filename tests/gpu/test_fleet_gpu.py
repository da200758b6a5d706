"""Several models on GPUs through a real `pagoda serve --config`: a model replicated over two
GPUs (each replica on its own card, both serving), and two models that cannot both be awake
swapping by sleep and wake with unchanged greedy outputs."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from pagoda.bench.word_tokenizer import with_word_tokenizer
from tests.utils import RemoteServer

CONFIG_1B = "bench/configs/llama-3.2-1b"


@pytest.fixture(scope="module")
def model_1b(tmp_path_factory):
    return with_word_tokenizer(Path(CONFIG_1B), tmp_path_factory.mktemp("b1w"))


def serve(tmp_path, yaml_text: str) -> RemoteServer:
    path = tmp_path / "models.yaml"
    path.write_text(yaml_text)
    return RemoteServer(f"--config={path}", startup_timeout=600)


def complete(server: RemoteServer, model: str, prompt: list[int]) -> list[int]:
    r = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0,
        "ignore_eos": True, "logprobs": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["logprobs"]["tokens"]


def ps(server: RemoteServer) -> list[dict]:
    return httpx.get(f"{server.url}/pagoda/ps", timeout=10).json()["models"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_replicated_over_two_gpus(tmp_path, model_1b, gpu_report):
    server = serve(tmp_path, f"""
defaults: {{max_model_len: 1024, dtype: bfloat16, load_format: dummy}}
models:
  - {{model: {model_1b}, name: small, replicas: 2, devices: [cuda:0, cuda:1]}}
""")
    try:
        prompts = [[(7 * i + j) % 1000 + 10 for j in range(64)] for i in range(32)]
        with ThreadPoolExecutor(32) as pool:
            outputs = list(pool.map(lambda p: complete(server, "small", p), prompts))
        assert all(len(o) == 16 for o in outputs)
        rows = ps(server)
        assert [r["device"] for r in rows] == ["cuda:0", "cuda:1"]
        assert all(r["state"] == "loaded" and r["requests_routed"] > 0 for r in rows)
        plan = httpx.get(f"{server.url}/pagoda/plan").json()["devices"]
        assert [d["device"] for d in plan] == ["cuda:0", "cuda:1"]
        gpu_report(replicas=2, routed=[r["requests_routed"] for r in rows],
                   kv_gib=[round(r["kv_cache_bytes"] / 2**30, 2) for r in rows])
    finally:
        assert server.stop() == 0


def test_two_models_swap_by_sleep_and_wake_on_one_gpu(tmp_path, model_1b, gpu_report):
    # a 1B needs ~2.3 GiB of weights, ~0.6 GiB of activations and 0.75 GiB of process
    # overhead: 6 GiB holds one awake beside the other asleep, never both awake
    server = serve(tmp_path, f"""
memory_limit: 6GiB
defaults: {{max_model_len: 1024, dtype: bfloat16, load_format: dummy}}
models:
  - {{model: {model_1b}, name: a}}
  - {{model: {model_1b}, name: b}}
""")
    try:
        prompt = list(range(100, 164))
        first = {m: complete(server, m, prompt) for m in "ab"}
        for model in "abab":
            assert complete(server, model, prompt) == first[model]
            states = {r["model"]: r["state"] for r in ps(server)}
            assert states[model] == "loaded" and states["ab".replace(model, "")] == "sleeping"
        rows = ps(server)
        assert all(r["wake_seconds"] is not None for r in rows)
        gpu_report(wake_s=[round(r["wake_seconds"], 3) for r in rows],
                   kv_gib=[round(r["kv_cache_bytes"] / 2**30, 2) for r in rows])
    finally:
        assert server.stop() == 0
