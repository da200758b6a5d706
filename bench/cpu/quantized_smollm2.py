"""SmolLM2 (Q4_1 GGUF) served with its weights kept quantized (on pagoda's CPU block-dot
kernel where it runs, and on torch's kernels with PAGODA_CPU_BLOCK_DOT=0) against the same
model dequantized to float32 at load (`--quantization none`), and the block-dot model
without CPU plans (`--enforce-eager`: every decode step through the model's Python), in one
run on this machine: `pagoda bench serve` at 1 and 16 concurrent streams against each server
in turn, the engine process's resident memory (RSS) and the weight bytes the server reports
(`/pagoda/ps`).

    python bench/cpu/quantized_smollm2.py --output bench/results/cpu-smollm2-quantized.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

# mode -> (extra serve arguments, environment): the quantized model on pagoda's CPU block-dot
# kernel (where it runs; decode steps replayed from CPU plans), the same without plans, on
# torch's kernels, with a bfloat16 KV cache of as many tokens in half the bytes, and
# dequantized to float32 at load
MODES = {"quantized": ([], {}),
         "quantized-eager": (["--enforce-eager"], {}),
         "quantized-torch-kernels": ([], {"PAGODA_CPU_BLOCK_DOT": "0"}),
         "quantized-bf16-kv": (["--kv-cache-dtype", "bfloat16", "--kv-cache-memory", "128MiB"],
                               {}),
         "dequantized": (["--quantization", "none"], {})}


def git_commit() -> dict:
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()
    return {"commit": run("rev-parse", "HEAD") or None, "dirty": bool(run("status", "--porcelain"))}


def start_server(port: int, extra: list[str], env: dict[str, str]) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pagoda.cli.main", "serve", "smollm2", "--port", str(port),
            "--max-model-len", "512", "--kv-cache-memory", "256MiB", *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **env})
    return wait_healthy(proc, port, 300)


def wait_healthy(proc: subprocess.Popen, port: int, seconds: float) -> subprocess.Popen:
    """`proc` once its /health on `port` answers 200 (terminated, and an error, after
    `seconds` without)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"the server on port {port} did not become healthy")


def engine_rss(server: subprocess.Popen) -> int:
    """Resident bytes of the server's engine process (its largest child)."""
    children = psutil.Process(server.pid).children(recursive=True)
    return max(child.memory_info().rss for child in children)


def bench(port: int, concurrency: int, prompts: int, out_dir: Path,
          extra: tuple[str, ...] = ()) -> dict:
    """`pagoda bench serve` at `concurrency` streams (64 in / 64 out) against the server on
    `port` (extra: more flags, e.g. the tokenizer of a server that is not pagoda)."""
    name = f"c{concurrency}-{port}.json"
    subprocess.run([sys.executable, "-m", "pagoda.cli.main", "bench", "serve", "--port", str(port),
                    "--dataset-name", "random", "--random-input-len", "64",
                    "--random-output-len", "64", "--ignore-eos", "--num-prompts", str(prompts),
                    "--max-concurrency", str(concurrency), "--num-warmups", "1",
                    "--save-result", "--result-dir", str(out_dir), "--result-filename", name,
                    "--disable-tqdm", *extra], check=True, stdout=subprocess.DEVNULL)
    return json.loads((out_dir / name).read_text())


def run_mode(mode: str, port: int, out_dir: Path) -> dict:
    extra, env = MODES[mode]
    server = start_server(port, extra, env)
    try:
        ps = httpx.get(f"http://127.0.0.1:{port}/pagoda/ps", timeout=10).json()
        result = {"argv_extra": extra, "env": env, "ps": ps}
        for concurrency, prompts in ((1, 4), (16, 32)):
            figures = bench(port, concurrency, prompts, out_dir)
            result[f"streams_{concurrency}"] = {
                k: figures.get(k) for k in ("output_throughput", "total_token_throughput",
                                            "mean_tpot_ms", "mean_ttft_ms", "completed",
                                            "total_output_tokens", "duration")}
        result["engine_rss_bytes"] = engine_rss(server)
        return result
    finally:
        server.terminate()
        server.wait(60)


def ratios(system: dict, baseline: dict) -> dict:
    """Output tok/s at each stream count and engine RSS, system over baseline."""
    return {**{f"output_tok_per_s_streams_{c}": system[f"streams_{c}"]["output_throughput"]
               / baseline[f"streams_{c}"]["output_throughput"] for c in (1, 16)},
            "engine_rss": system["engine_rss_bytes"] / baseline["engine_rss_bytes"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--notes", default="")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    args = parser.parse_args()
    report = {"benchmark": "cpu-quantized-vs-dequantized", "model": "smollm2",
              "command": [sys.executable, *sys.argv], "notes": args.notes, "git": git_commit(),
              "machine": {"cpu": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
                          "platform": platform.platform()},
              "workload": {"input_len": 64, "output_len": 64, "streams": {"1": 4, "16": 32}},
              "systems": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for port, mode in enumerate(args.modes, start=8931):
            report["systems"][mode] = run_mode(mode, port, Path(tmp))
    report["machine"]["loadavg_end"] = os.getloadavg()
    systems = report["systems"]
    for mode, baseline in (("quantized", "dequantized"), ("quantized-torch-kernels",
                                                          "dequantized"),
                           ("quantized", "quantized-eager"),
                           ("quantized-bf16-kv", "quantized")):
        if mode in systems and baseline in systems:
            report[f"ratios_{mode}_over_{baseline}"] = ratios(systems[mode], systems[baseline])
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k.startswith("ratios_")}, indent=1))


if __name__ == "__main__":
    main()
