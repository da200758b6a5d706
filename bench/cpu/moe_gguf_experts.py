"""A Qwen3-MoE GGUF on CPU with its experts kept in their blocks (codes on the block-dot
kernel) against the same file decoded to float32 at load (`--quantization none`), in one run
on this machine: the weight bytes and the process's resident memory after loading, and the
output tokens a second decoding 1 and 8 streams (prompts of 32 token ids, 64 tokens out,
EOS ignored), each mode in a fresh process.

The file: `pagoda.bench.dummy_gguf`'s Q4_K_M mix of Qwen3-30B-A3B's layer shapes (hidden
2048, 128 experts of 768, top 8, 32 query and 4 KV heads of 128) with `--layers` of its 48
layers and a vocabulary of `--vocab` (the LM head stays float32 in both modes and would
dominate a step at the real 151,936).

With `--fp8` the same model's config with dummy weights under `--quantization fp8` (every
linear layer and expert float8 with a scale a row, on the CPU float8 kernel) against its
float32 weights instead.

    python bench/cpu/moe_gguf_experts.py [--fp8] --output bench/results/cpu-qwen3moe-....json
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

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "qwen3-30b-a3b"
MODES = {"kept": "gguf", "decoded": "none"}  # GGUF: its blocks kept, or decoded at load
FP8_MODES = {"kept": "fp8", "decoded": "none"}  # --fp8: float8 at load, or float32
PROMPT_TOKENS, OUTPUT_TOKENS = 32, 64


def write_model(directory: Path, layers: int, vocab: int) -> Path:
    from pagoda.bench.dummy_gguf import write_dummy_gguf
    return write_dummy_gguf(write_config(directory, layers, vocab),
                            directory / "qwen3moe.gguf")


def write_config(directory: Path, layers: int, vocab: int) -> Path:
    """The model's config alone (--fp8: dummy weights)."""
    config = json.loads((CONFIG / "config.json").read_text())
    config.update(num_hidden_layers=layers, vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def measure(path: str, quantization: str) -> dict:
    """One mode, in this process: load, then decode 1 and 8 streams (a directory: its
    config with dummy weights; "none" there: floats)."""
    import psutil

    from pagoda import LLM, SamplingParams
    started = time.perf_counter()
    dummy = Path(path).is_dir()
    llm = LLM(path, quantization=None if dummy and quantization == "none" else quantization,
              load_format="dummy" if dummy else "auto", kv_cache_memory=256 << 20,
              max_model_len=256)
    figures = {"load_s": round(time.perf_counter() - started, 2),
               "weight_bytes": llm.engine.model_info.weight_bytes,
               "rss_bytes": psutil.Process().memory_info().rss}
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, ignore_eos=True, temperature=0)
    llm.generate([{"prompt_token_ids": list(range(3, 3 + PROMPT_TOKENS))}], params)  # warm-up
    for streams in (1, 8):
        prompts = [{"prompt_token_ids": [3 + (7 * s + i) % 500 for i in range(PROMPT_TOKENS)]}
                   for s in range(streams)]
        started = time.perf_counter()
        outputs = llm.generate(prompts, params)
        seconds = time.perf_counter() - started
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        figures[f"streams_{streams}"] = {"seconds": round(seconds, 3), "output_tokens": tokens,
                                         "output_tok_per_s": round(tokens / seconds, 2)}
    return figures


def git_commit() -> dict:
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()
    return {"commit": run("rev-parse", "HEAD") or None, "dirty": bool(run("status", "--porcelain"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--fp8", action="store_true",
                        help="float8 at load against float32, dummy weights (not a GGUF)")
    parser.add_argument("--measure", nargs=2, metavar=("MODEL", "QUANTIZATION"),
                        help=argparse.SUPPRESS)  # one mode, in a child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    modes = FP8_MODES if args.fp8 else MODES
    report = {"benchmark": "cpu-moe-fp8-experts-vs-float32" if args.fp8 else
              "cpu-moe-gguf-experts-kept-vs-decoded",
              "command": [sys.executable, *sys.argv], "git": git_commit(),
              "machine": {"cpu": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "platform": platform.platform()},
              "workload": {"config": str(CONFIG.name), "layers": args.layers,
                           "vocab": args.vocab, "mix": "fp8 at load" if args.fp8 else "q4_k_m",
                           "prompt_tokens": PROMPT_TOKENS,
                           "output_tokens": OUTPUT_TOKENS, "streams": [1, 8]},
              "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.fp8:
            path = write_config(Path(tmp), args.layers, args.vocab)
        else:
            path = write_model(Path(tmp), args.layers, args.vocab)
            report["workload"]["file_bytes"] = path.stat().st_size
        for mode, quantization in modes.items():
            child = subprocess.run([sys.executable, __file__, "--measure", str(path),
                                    quantization], capture_output=True, text=True, check=True)
            report["modes"][mode] = json.loads(child.stdout.strip().splitlines()[-1])
    kept, decoded = report["modes"]["kept"], report["modes"]["decoded"]
    report["ratios_kept_over_decoded"] = {
        "weight_bytes": kept["weight_bytes"] / decoded["weight_bytes"],
        "rss_bytes": kept["rss_bytes"] / decoded["rss_bytes"],
        **{f"output_tok_per_s_streams_{s}": kept[f"streams_{s}"]["output_tok_per_s"]
           / decoded[f"streams_{s}"]["output_tok_per_s"] for s in (1, 8)}}
    text = json.dumps(report, indent=1) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
