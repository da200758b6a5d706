"""Engine flags shared by every command that starts an engine (vLLM's names)."""

from __future__ import annotations

import argparse
from typing import Any

from pagoda.config import parse_bytes


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of device memory this engine may use (CPU: of available RAM)")
    g.add_argument("--kv-cache-memory", type=parse_bytes, default=None,
                   help="KV cache size in bytes (e.g. 2GiB); overrides the fraction")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "gguf", "dummy"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="prepare each step while the previous one runs (default: on for CUDA)")
    g.add_argument("--tokenizer", default=None, help="tokenizer path or name (default: the model's)")
    g.add_argument("--attention-backend", default="auto", help="auto, torch or triton")
    add_compat_args(parser)


# vLLM flags that guides pass but that have nothing to configure here (yet): accepted so
# their command lines run unchanged; a non-default value is reported at startup.
COMPAT_FLAGS: dict[str, dict[str, Any]] = {
    "--enable-chunked-prefill": {"action": argparse.BooleanOptionalAction, "default": None},
    "--disable-log-stats": {"action": "store_true"},
    "--swap-space": {"type": float, "default": None},
    "--download-dir": {"default": None},
    "--revision": {"default": None},
    "--kv-cache-dtype": {"default": "auto"},
    "--quantization": {"default": None},
    "--max-log-len": {"type": int, "default": None},
    "--disable-custom-all-reduce": {"action": "store_true"},
    "--distributed-executor-backend": {"default": None},
}


def add_compat_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("accepted for vLLM compatibility")
    for flag, spec in COMPAT_FLAGS.items():
        g.add_argument(flag, help=argparse.SUPPRESS, **spec)


def compat_notes(args: argparse.Namespace) -> list[str]:
    """One line per compatibility flag that was given a value pagoda does not act on."""
    notes = []
    if args.kv_cache_dtype not in ("auto", None):
        notes.append(f"--kv-cache-dtype {args.kv_cache_dtype} is not supported; using the model dtype")
    if args.quantization not in (None, "gguf"):
        notes.append(f"--quantization {args.quantization} is not supported; weights load as stored")
    if args.enable_chunked_prefill is False:
        notes.append("--no-enable-chunked-prefill ignored: chunked prefill is always on")
    return notes


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for LLM(...) from parsed engine flags."""
    return {
        "dtype": args.dtype, "device": args.device, "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "block_size": args.block_size, "gpu_memory_utilization": args.gpu_memory_utilization,
        "kv_cache_memory": args.kv_cache_memory,
        "enable_prefix_caching": args.enable_prefix_caching, "load_format": args.load_format,
        "seed": args.seed, "tokenizer": args.tokenizer,
        "attention_backend": args.attention_backend, "enforce_eager": args.enforce_eager,
        "async_scheduling": args.async_scheduling,
    }
