"""Engine flags shared by every command that starts an engine (vLLM's names)."""

from __future__ import annotations

import argparse
from typing import Any

from pagoda.cli.vllm_flags import add_vllm_flags
from pagoda.config import KV_CACHE_DTYPES, parse_bytes


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
    g.add_argument("--kv-cache-memory", "--kv-cache-memory-bytes", type=parse_bytes,
                   default=None,
                   help="KV cache size in bytes (e.g. 2GiB); overrides the fraction")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="auto (the model's dtype; fp8 for a checkpoint calibrated for it), "
                        "bfloat16 (half a float32 model's cache: CPU) or fp8 (= fp8_e4m3) / "
                        "fp8_e5m2: K and V stored in one byte each (half a 16-bit cache), "
                        "divided by the checkpoint's k/v scales where it has them")
    g.add_argument("--load-format", default="auto",
                   choices=["auto", "safetensors", "gguf", "dummy"])
    g.add_argument("--quantization", "-q", default=None, metavar="FORMAT",
                   help="fp8, awq, gptq, compressed-tensors or gguf (default: what the "
                        "checkpoint holds; fp8 also quantizes a 16-bit checkpoint at load; "
                        "none dequantizes a GGUF at load; vLLM's awq_marlin and gptq_marlin "
                        "are taken as awq and gptq)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False,
                   help="disable CUDA graphs (and CPU plans)")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="prepare each step while the previous one runs (default: on for CUDA)")
    g.add_argument("--prefill-first", action=argparse.BooleanOptionalAction, default=False,
                   help="give newly admitted requests' prefills a step of their own before "
                        "the next decode step: first tokens sooner on average, fewer tokens "
                        "a second and longer gaps between the running requests' tokens")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer path or name (default: the model's)")
    g.add_argument("--attention-backend", default="auto", help="auto, torch or triton")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split every layer over this many devices (one worker process each; "
                        "gloo on CPU, NCCL on GPUs)")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="split the layers into this many stages, each on its own "
                        "--tensor-parallel-size devices")
    g.add_argument("--distributed-executor-backend", default="auto",
                   choices=["auto", "uni", "mp", "ray"],
                   help="how the ranks run: mp, one worker process each on this machine (the "
                        "default with more than one rank; needs no Ray); uni, the one worker "
                        "in the engine process; ray, one Ray actor each on a running Ray "
                        "cluster, across its nodes (`ray start --head`, then `ray start "
                        "--address=HEAD:6379` on the others; pip install pagoda[ray])")
    g.add_argument("--enable-expert-parallel", "-ep", action=argparse.BooleanOptionalAction,
                   default=False,
                   help="mixture-of-experts layers: split the experts over the tensor-parallel "
                        "ranks (whole experts each) instead of every expert's width")
    g.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=False,
                   help="accepted for vLLM compatibility; pagoda never runs checkpoint code")
    add_lora_args(parser)
    add_vllm_flags(parser)


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LoRA adapters")
    g.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=False,
                   help="serve LoRA adapters")
    g.add_argument("--max-loras", type=int, default=1,
                   help="adapters one batch may use (device slots)")
    g.add_argument("--max-lora-rank", type=int, default=16,
                   help="largest adapter rank: 1, 8, 16, 32, 64, 128, 256, 320 or 512")
    g.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters kept loaded in host memory (default: --max-loras); the "
                        "others are read from disk again when needed")
    g.add_argument("--lora-dtype", default="auto", help="auto (the model's), float16 or bfloat16")


def check_vllm_flags(args: argparse.Namespace) -> bool:
    """Log a startup line for each vLLM flag pagoda ignores; False (after one line on stderr)
    if a flag is refused on purpose: the caller exits with status 2."""
    import sys

    from pagoda.errors import ConfigError
    from pagoda.logger import get_logger
    try:
        notes = compat_notes(args)
    except ConfigError as exc:
        print(f"pagoda {args.command}: {exc}", file=sys.stderr)
        return False
    for note in notes:
        get_logger("pagoda.cli").warning(note)
    return True


def compat_notes(args: argparse.Namespace) -> list[str]:
    """One startup line per vLLM flag given that pagoda does not act on (ConfigError for a
    flag refused on purpose)."""
    from pagoda.cli.vllm_flags import vllm_flag_notes
    return vllm_flag_notes(args)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for LLM(...) from parsed engine flags."""
    return {
        "dtype": args.dtype, "device": args.device, "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "block_size": args.block_size, "gpu_memory_utilization": args.gpu_memory_utilization,
        "kv_cache_memory": args.kv_cache_memory,
        "enable_prefix_caching": args.enable_prefix_caching, "load_format": args.load_format,
        "kv_cache_dtype": args.kv_cache_dtype,
        "quantization": args.quantization, "seed": args.seed, "tokenizer": args.tokenizer,
        "attention_backend": args.attention_backend, "enforce_eager": args.enforce_eager,
        "async_scheduling": args.async_scheduling, "prefill_first": args.prefill_first,
        "enable_lora": args.enable_lora,
        "max_loras": args.max_loras, "max_lora_rank": args.max_lora_rank,
        "max_cpu_loras": args.max_cpu_loras, "lora_dtype": args.lora_dtype,
        "tensor_parallel_size": args.tensor_parallel_size,
        "pipeline_parallel_size": args.pipeline_parallel_size,
        "enable_expert_parallel": args.enable_expert_parallel,
        "distributed_executor_backend": args.distributed_executor_backend,
    }
