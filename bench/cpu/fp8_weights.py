"""Float8 weights on CPU: a model quantized to FP8 at load (`--quantization fp8`, a scale per
output row) on pagoda's float8 kernel, the same with the kernel off (the weights decoded at
load back to float32, PAGODA_CPU_FP8_DOT=0), and the float32 model, each in a process of its
own on this machine: output tok/s of greedy decodes at 1 and 16 concurrent sequences (token-id
prompts, the engine in process), the weight bytes the engine holds and the process's RSS.

    python bench/cpu/fp8_weights.py --output bench/results/cpu-fp8-weights.json

The model is a config with dummy weights (default bench/configs/llama-3.2-1b: its tied
embedding table stays float32 in every mode)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

# mode -> (--quantization, environment)
MODES = {"fp8-kernel": ("fp8", {}),
         "fp8-decoded-at-load": ("fp8", {"PAGODA_CPU_FP8_DOT": "0"}),
         "float32": (None, {})}
# (concurrent sequences, prompt tokens, output tokens)
WORKLOADS = ((1, 16, 16), (16, 16, 32))


def run_mode(model: str, quantization: str | None) -> dict:
    """This process's figures for one mode (run by main in a child process)."""
    import psutil
    import torch

    from pagoda import LLM, SamplingParams
    start = time.perf_counter()
    llm = LLM(model, max_model_len=256, kv_cache_memory=256 << 20, load_format="dummy",
              dtype="float32", quantization=quantization)
    result = {"load_seconds": time.perf_counter() - start,
              "weight_bytes": llm.engine.model_info.weight_bytes,
              "threads": torch.get_num_threads()}
    rng = random.Random(0)
    for sequences, prompt_len, output_len in WORKLOADS:
        prompts = [{"prompt_token_ids": [rng.randrange(100, 30000) for _ in range(prompt_len)]}
                   for _ in range(sequences)]
        llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
        params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0)
        start = time.perf_counter()
        llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        result[f"sequences_{sequences}"] = {
            "prompt_len": prompt_len, "output_len": output_len, "seconds": seconds,
            "output_tok_per_s": sequences * output_len / seconds}
    result["rss_bytes"] = psutil.Process().memory_info().rss
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--model", default="bench/configs/llama-3.2-1b")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # a child's
    args = parser.parse_args()
    if args.mode:
        quantization, _ = MODES[args.mode]
        Path(args.output).write_text(json.dumps(run_mode(args.model, quantization)))
        return
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    report = {"benchmark": "cpu-fp8-weights", "model": args.model,
              "command": [sys.executable, *sys.argv], "git": commit,
              "workloads": [dict(zip(("sequences", "prompt_len", "output_len"), w))
                            for w in WORKLOADS],
              "machine": {"cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
                          "platform": platform.platform()},
              "modes": {}}
    for mode, (_, env) in MODES.items():
        part = Path(f"{args.output}.{mode}.part")
        subprocess.run([sys.executable, __file__, "--model", args.model, "--mode", mode,
                        "--output", str(part)], check=True, env={**os.environ, **env},
                       stdout=subprocess.DEVNULL)
        report["modes"][mode] = json.loads(part.read_text())
        part.unlink()
        print(mode, json.dumps(report["modes"][mode]), flush=True)
    report["machine"]["loadavg_end"] = os.getloadavg()
    base = report["modes"]["float32"]
    report["ratios_over_float32"] = {
        mode: {**{f"output_tok_per_s_sequences_{s}": figures[f"sequences_{s}"]["output_tok_per_s"]
                  / base[f"sequences_{s}"]["output_tok_per_s"] for s, _, _ in WORKLOADS},
               "weight_bytes": figures["weight_bytes"] / base["weight_bytes"],
               "rss": figures["rss_bytes"] / base["rss_bytes"]}
        for mode, figures in report["modes"].items() if mode != "float32"}
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["ratios_over_float32"], indent=1))


if __name__ == "__main__":
    main()
