"""SmolLM2 (the built-in Q4_1 GGUF) served by pagoda and by llama.cpp's own server
(`llama-server`, continuous batching over parallel slots, as Ollama runs it) from the same
file on this machine, one after the other: `pagoda bench serve` at 1 and 16 concurrent
streams (64 tokens in, 64 out, EOS ignored) against each, and each server's resident memory.
Both run at their defaults for this machine's cores and hold 4,096 tokens of KV cache:
llama-server in 16 slots of 256 (its default float16 cache), pagoda in a float32 cache of
4,096 tokens (`--kv-cache-memory`; its CPU default dtype), which a long run touches whole.

    python bench/cpu/against_llama_cpp.py --llama-server PATH/llama-server \\
        --output bench/results/cpu-smollm2-against-llama-cpp.json

llama-server is not a pagoda dependency: build it from llama.cpp's source (the
llama-cpp-python sdist on PyPI vendors it: `cmake -B build -DLLAMA_CURL=OFF && cmake --build
build --target llama-server`)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
from quantized_smollm2 import bench, engine_rss, git_commit, start_server, wait_healthy

from pagoda.models.source import resolve_model

STREAMS = ((1, 4), (16, 32))  # concurrency, prompts
CACHE_TOKENS = 16 * 256  # both servers' KV cache, in tokens
FIGURES = ("output_throughput", "total_token_throughput", "mean_tpot_ms", "mean_ttft_ms",
           "completed", "total_output_tokens", "duration")


def start_llama_server(binary: str, gguf: Path, port: int) -> subprocess.Popen:
    argv = [binary, "--model", str(gguf), "--port", str(port), "--parallel", "16",
            "--ctx-size", str(CACHE_TOKENS), "--no-webui"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_healthy(proc, port, 120)


def measure(port: int, out_dir: Path, extra: tuple[str, ...]) -> dict:
    result = {}
    for concurrency, prompts in STREAMS:
        figures = bench(port, concurrency, prompts, out_dir, extra)
        result[f"streams_{concurrency}"] = {k: figures.get(k) for k in FIGURES}
    return result


def pagoda_cache_bytes(tokens: int) -> int:
    """Bytes of pagoda's float32 KV cache for `tokens` tokens of the built-in SmolLM2."""
    config = resolve_model("smollm2").hf_config
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    return tokens * config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4


def run_pagoda(port: int, out_dir: Path) -> dict:
    extra = ["--kv-cache-memory", str(pagoda_cache_bytes(CACHE_TOKENS))]
    server = start_server(port, extra, {})
    try:
        result = {"argv_extra": extra, **measure(port, out_dir, ())}
        result["rss_bytes"] = engine_rss(server)
        return result
    finally:
        server.terminate()
        server.wait(60)


def run_llama_server(binary: str, gguf: Path, port: int, out_dir: Path) -> dict:
    server = start_llama_server(binary, gguf, port)
    try:
        version = subprocess.run([binary, "--version"], capture_output=True, text=True)
        result = {"version": (version.stdout + version.stderr).strip().splitlines()[-2:],
                  **measure(port, out_dir, ("--model", "smollm2", "--tokenizer", "smollm2"))}
        result["rss_bytes"] = psutil.Process(server.pid).memory_info().rss
        return result
    finally:
        server.terminate()
        server.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", required=True, help="path of llama.cpp's llama-server")
    parser.add_argument("--output", required=True)
    parser.add_argument("--notes", default="")
    args = parser.parse_args()
    gguf = resolve_model("smollm2").gguf_file
    report = {"benchmark": "cpu-pagoda-against-llama-cpp", "model": str(gguf.name),
              "command": [sys.executable, *sys.argv], "notes": args.notes, "git": git_commit(),
              "machine": {"cpu": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
                          "platform": platform.platform()},
              "workload": {"input_len": 64, "output_len": 64,
                           "streams": {str(c): n for c, n in STREAMS}},
              "systems": {}}
    with tempfile.TemporaryDirectory() as tmp:
        report["systems"]["pagoda"] = run_pagoda(8941, Path(tmp))
        report["systems"]["llama.cpp"] = run_llama_server(args.llama_server, gguf, 8942,
                                                          Path(tmp))
    report["machine"]["loadavg_end"] = os.getloadavg()
    ours, theirs = report["systems"]["pagoda"], report["systems"]["llama.cpp"]
    report["ratios_pagoda_over_llama_cpp"] = {
        **{f"output_tok_per_s_streams_{c}": ours[f"streams_{c}"]["output_throughput"]
           / theirs[f"streams_{c}"]["output_throughput"] for c, _ in STREAMS},
        "rss": ours["rss_bytes"] / theirs["rss_bytes"]}
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["ratios_pagoda_over_llama_cpp"], indent=1))


if __name__ == "__main__":
    main()
