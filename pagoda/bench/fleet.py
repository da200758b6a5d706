"""`pagoda bench fleet`: several models sharing one device, measured.

1. Serves every `--model NAME=CONFIG_DIR` from one `pagoda serve --config` (dummy weights and
   a word tokenizer, so text flows; no memory fraction is given) and records its memory plan.
2. Runs `pagoda bench serve` against each model alone, then against all of them at once,
   and reports each model's output throughput busy-together as a fraction of alone.
3. Measures sleep and wake of each `--wake NAME=CONFIG_DIR` engine in this process: the first
   wake (which re-captures CUDA graphs once their addresses moved) and the later ones, and
   checks that greedy outputs after waking equal those before.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from pagoda.bench.http_overhead import wait_healthy
from pagoda.bench.word_tokenizer import with_word_tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=[], metavar="NAME=CONFIG_DIR",
                   help="a model to serve (repeat); a config.json directory")
    p.add_argument("--wake", action="append", default=[], metavar="NAME=CONFIG_DIR",
                   help="a model whose sleep and wake to time (repeat)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--wake-repeats", type=int, default=3)
    p.add_argument("--swap", action="append", default=[], metavar="NAME=CONFIG_DIR",
                   help="two models served under --swap-limit, asked in turn (each request "
                        "then wakes its model)")
    p.add_argument("--swap-limit", default="20GiB",
                   help="the memory limit of the --swap server: room for one model awake")
    p.add_argument("--swap-rounds", type=int, default=4)
    p.add_argument("--port", type=int, default=8311)
    p.add_argument("--output-json", default=None)


def _pairs(specs: list[str]) -> list[tuple[str, Path]]:
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=CONFIG_DIR, got {spec!r}")
        pairs.append((name, Path(path)))
    return pairs


def write_models_file(models: list[tuple[str, Path]], args: argparse.Namespace,
                      work: Path, memory_limit: str | None = None) -> Path:
    import yaml
    entries = []
    for name, config_dir in models:
        served = with_word_tokenizer(config_dir, work / name)
        entries.append({"model": str(served), "name": name, "load_format": "dummy"})
    document = {"defaults": {"dtype": args.dtype, "max_model_len": args.max_model_len,
                             "max_num_seqs": args.max_num_seqs},
                "models": entries}
    if memory_limit is not None:
        document["memory_limit"] = memory_limit
    path = work / f"models-{len(list(work.glob('models-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


class FleetServer:
    """`pagoda serve --config` in a subprocess, with its log in the work directory."""

    def __init__(self, models_file: Path, port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log.open("w")
        start = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagoda.cli.main", "serve", "--config", str(models_file),
             "--host", "127.0.0.1", "--port", str(port), "--disable-log-requests"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_healthy(self.proc, self.url, 900)
        self.startup_seconds = time.monotonic() - start

    def get(self, path: str) -> Any:
        return httpx.get(self.url + path, timeout=30).json()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(120)
        self.log.close()


def bench_serve(server: FleetServer, name: str, tokenizer: Path, args: argparse.Namespace,
                out: Path) -> subprocess.Popen:
    """Start one `pagoda bench serve` against one model; its result lands in `out`."""
    port = server.url.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", "pagoda.cli.main", "bench", "serve", "--port", port,
           "--model", name, "--tokenizer", str(tokenizer), "--random-input-len",
           str(args.input_len), "--random-output-len", str(args.output_len), "--ignore-eos",
           "--num-prompts", str(args.num_prompts), "--max-concurrency",
           str(args.max_concurrency), "--num-warmups", "4", "--disable-tqdm", "--save-result",
           "--result-dir", str(out.parent), "--result-filename", out.name]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def throughput_of(path: Path) -> dict[str, float]:
    metrics = json.loads(path.read_text())["metrics"]
    return {"output_throughput": metrics["output_throughput"], "completed": metrics["completed"],
            "failed": metrics["failed"], "median_tpot_ms": metrics["tpot"]["median_ms"],
            "median_ttft_ms": metrics["ttft"]["median_ms"]}


def measure_sharing(models: list[tuple[str, Path]], args: argparse.Namespace,
                    work: Path) -> dict[str, Any]:
    server = FleetServer(write_models_file(models, args, work), args.port, work / "server.log")
    try:
        plan = server.get("/pagoda/plan")
        alone, together = {}, {}
        for name, _ in models:
            out = work / f"{name}-alone.json"
            bench_serve(server, name, work / name, args, out).wait()
            alone[name] = throughput_of(out)
        procs = {name: bench_serve(server, name, work / name, args, work / f"{name}-all.json")
                 for name, _ in models}
        for name, proc in procs.items():
            proc.wait()
            together[name] = throughput_of(work / f"{name}-all.json")
        ps = server.get("/pagoda/ps")
    finally:
        server.stop()
        if args.output_json:
            shutil.copy(work / "server.log", Path(args.output_json).with_suffix(".server.log"))
    ratios = {name: together[name]["output_throughput"] / alone[name]["output_throughput"]
              for name in alone}
    return {"startup_seconds": server.startup_seconds, "plan": plan, "ps": ps,
            "alone": alone, "together": together, "together_over_alone": ratios}


def measure_swaps(models: list[tuple[str, Path]], args: argparse.Namespace,
                  work: Path) -> dict[str, Any]:
    """Ask two models that cannot both be awake in turn: every request wakes its model."""
    models_file = write_models_file(models, args, work, args.swap_limit)
    server = FleetServer(models_file, args.port + 1, work / "swap-server.log")
    requests = []
    try:
        for round_ in range(args.swap_rounds):
            for name, _ in models:
                start = time.monotonic()
                response = httpx.post(server.url + "/v1/completions", timeout=300, json={
                    "model": name, "prompt": "word " * 64, "max_tokens": 16,
                    "ignore_eos": True, "temperature": 0})
                response.raise_for_status()
                requests.append({"round": round_, "model": name,
                                 "seconds": time.monotonic() - start})
        ps = server.get("/pagoda/ps")
        plan = server.get("/pagoda/plan")
    finally:
        server.stop()
        if args.output_json:
            shutil.copy(work / "swap-server.log",
                        Path(args.output_json).with_suffix(".swap-server.log"))
    return {"memory_limit": args.swap_limit, "requests": requests, "ps": ps, "plan": plan}


def measure_wake(name: str, config_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from pagoda import LLM, SamplingParams
    llm = LLM(str(config_dir), load_format="dummy", dtype=args.dtype,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              kv_cache_memory=8 << 30)
    core = llm.engine.core
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    prompt = [{"prompt_token_ids": list(range(1, 1 + min(256, args.max_model_len // 2)))}]
    before = llm.generate(prompt, params)[0].outputs[0].token_ids
    sleeps, wakes, same = [], [], True
    for _ in range(args.wake_repeats):
        sleeps.append(core.sleep())
        wakes.append(core.wake_up())
        same &= llm.generate(prompt, params)[0].outputs[0].token_ids == before
    info = core.model_info
    result = {"model": name, "weight_bytes": info.weight_bytes,
              "kv_cache_bytes": info.kv_cache_bytes, "sleep_seconds": sleeps,
              "wake_seconds": wakes, "first_wake_seconds": wakes[0],
              "later_wake_seconds_max": max(wakes[1:]) if len(wakes) > 1 else None,
              "outputs_equal_after_wake": same}
    del llm, core
    import gc

    import torch
    gc.collect()
    torch.cuda.empty_cache()
    return result


def run(args: argparse.Namespace) -> int:
    result: dict[str, Any] = {"benchmark": "fleet", "command": sys.argv}
    with tempfile.TemporaryDirectory(prefix="pagoda-fleet-") as tmp:
        models = _pairs(args.model)
        if models:
            result["sharing"] = measure_sharing(models, args, Path(tmp))
            for name, ratio in result["sharing"]["together_over_alone"].items():
                print(f"{name}: alone {result['sharing']['alone'][name]['output_throughput']:.0f}"
                      f" tok/s, all busy "
                      f"{result['sharing']['together'][name]['output_throughput']:.0f}"
                      f" tok/s ({ratio:.2f}x)")
        if args.swap:
            result["swap"] = measure_swaps(_pairs(args.swap), args, Path(tmp))
            for r in result["swap"]["requests"]:
                print(f"swap round {r['round']} {r['model']}: {r['seconds']:.2f} s")
        result["wake"] = [measure_wake(name, path, args) for name, path in _pairs(args.wake)]
        for w in result["wake"]:
            print(f"{w['model']}: wake {', '.join(f'{s:.3f}' for s in w['wake_seconds'])} s, "
                  f"outputs equal after wake: {w['outputs_equal_after_wake']}")
    text = json.dumps(result, indent=2)
    if args.output_json:
        Path(args.output_json).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="pagoda bench fleet", description=__doc__)
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
