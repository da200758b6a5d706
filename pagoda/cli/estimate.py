"""`pagoda estimate MODEL`: weight, KV and peak memory from the config and the safetensors or
GGUF headers, before any weight is read."""

from __future__ import annotations

import argparse
import json
import sys

from pagoda.config import KV_CACHE_DTYPES


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "estimate", help="memory a model needs, from its config and weight headers",
        description="Weights, KV cache for --concurrency sequences of --max-model-len tokens, "
                    "an activation allowance, and whether it fits --device, from the config and "
                    "the safetensors or GGUF headers; no weight is read.")
    p.add_argument("model", help="pulled name, checkpoint directory, .gguf file or config dir")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length (default: the model's)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--pp", "--pipeline-parallel-size", dest="pp", type=int, default=1,
                   help="pipeline stages: figures for the largest (every stage also holds "
                        "the embedding and LM head)")
    p.add_argument("--device", default=None,
                   help="a GPU (H100, A100, RTX 4090, MI300X, ...: any spelling) or cpu; "
                        "default: this machine's available RAM")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", "-q", default=None,
                   help="as serve's (default: what the checkpoint holds; fp8 quantizes a "
                        "16-bit checkpoint, none dequantizes a GGUF)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="as serve's (fp8: K and V in one byte each)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pagoda.errors import PagodaError
    from pagoda.models.estimate import estimate
    try:
        source = _source(args.model)
        max_model_len = args.max_model_len or int(
            getattr(source.hf_config, "max_position_embeddings", None) or 2048)
        result = estimate(source, max_model_len, args.concurrency,
                          args.tp, args.dtype, args.device, args.max_num_batched_tokens,
                          args.max_num_seqs, args.gpu_memory_utilization, args.pp,
                          args.quantization, args.kv_cache_dtype)
    except PagodaError as exc:
        print(f"pagoda estimate: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_estimate(result))
    return 0 if result.fits is not False else 3


def _source(spec: str):
    """The checkpoint, or a config-only directory (its weights are not needed here)."""
    from pagoda.errors import ModelNotFoundError
    from pagoda.models.source import resolve_model
    try:
        return resolve_model(spec)
    except ModelNotFoundError:
        return resolve_model(spec, "dummy")


def format_estimate(e) -> str:
    def gib(n: int) -> str:
        return f"{n / 2**30:8.2f} GiB"

    per_gpu = " per GPU" if e.tensor_parallel > 1 or e.pipeline_parallel > 1 else ""
    kv_shape = (f"{e.concurrency} x {e.max_model_len} tokens, "
                f"{e.kv_bytes_per_token / 1024:.0f} KiB per token"
                + (f", {e.kv_dtype}" if e.kv_dtype else ""))
    tp = f", tensor parallel {e.tensor_parallel}" if e.tensor_parallel > 1 else ""
    if e.pipeline_parallel > 1:
        tp += f", pipeline parallel {e.pipeline_parallel} (the first stage's figures)"
    active = ("" if e.active_parameters is None
              else f" ({e.active_parameters / 1e9:.2f} B active per token)")
    held = f", {e.quantization} weights" if e.quantization else ""
    lines = [f"{e.model}: {e.num_parameters / 1e9:.2f} B parameters{active}, {e.dtype}{held}{tp}",
             f"  weights{per_gpu:9s} {gib(e.weight_bytes)}  (from {e.weights_from})",
             f"  KV cache         {gib(e.kv_bytes)}  ({kv_shape})"]
    if e.kv_bytes_without_freeing != e.kv_bytes:
        lines.append(f"                   (local layers: min(window + {e.token_budget}, context)"
                     f" tokens; {e.kv_bytes_without_freeing / 2**30:.2f} GiB if they kept all)")
    lines += [f"  activations      {gib(e.activation_bytes)}  (allowance for one full step)",
              f"  overhead         {gib(e.overhead_bytes)}",
              f"  peak             {gib(e.peak_bytes)}"]
    if e.fits is not None:
        verdict = "fits" if e.fits else "does NOT fit"
        lines.append(f"  {e.device}: {gib(e.usable_bytes)} usable -> {verdict}")
        if e.suggestions:
            lines.append("  would fit with: " + "; or ".join(e.suggestions))
    return "\n".join(lines)
