"""`pagoda bench`: benchmark commands, with `vllm bench` flag names."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pagoda.bench import fleet as fleet_bench
from pagoda.bench.reliability import suite as reliability_suite
from pagoda.cli.bench_serve import add_serve_parser
from pagoda.config import KV_CACHE_DTYPES, parse_bytes

# flag dest -> LLM keyword argument; only passed on when the flag was given
_ENGINE_FLAGS = ("dtype", "device", "max_model_len", "load_format", "max_num_seqs",
                 "max_num_batched_tokens", "kv_cache_memory", "gpu_memory_utilization",
                 "enable_prefix_caching", "block_size", "enforce_eager", "attention_backend",
                 "tokenizer", "async_scheduling", "tensor_parallel_size",
                 "pipeline_parallel_size", "distributed_executor_backend", "quantization",
                 "kv_cache_dtype")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `bench` and its sub-subcommands."""
    bench = subparsers.add_parser("bench", help="benchmark the engine")
    kinds = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    throughput = kinds.add_parser(
        "throughput", help="offline throughput: every request submitted at once",
        description="Offline throughput on random prompts with fixed output lengths "
                    "(ignore_eos), optionally against transformers in the same process.")
    add_throughput_args(throughput)
    throughput.set_defaults(func=run_throughput, command_parser=throughput)
    overhead = kinds.add_parser(
        "http-overhead", help="the same workload offline and through `pagoda serve` over HTTP",
        description="Measures the HTTP server's overhead: throughput through a real "
                    "`pagoda serve` as a fraction of the offline engine's, same workload.")
    _add_workload_args(overhead)
    _add_engine_args(overhead)
    overhead.add_argument("--port", type=int, default=8199)
    overhead.add_argument("--output-json", default=None, help="write the full result here")
    overhead.add_argument("--notes", default=None, help="free text stored in the result")
    overhead.set_defaults(func=run_http_overhead, command_parser=overhead, compare=None,
                          hf_max_batch_size=16)
    structured = kinds.add_parser(
        "structured", help="the cost of grammar-constrained output (same tokens, with and "
                           "without the grammar)",
        description="Runs the workload under an output constraint, then free with the same "
                    "output lengths, and reports the throughput ratio.")
    _add_workload_args(structured)
    _add_engine_args(structured)
    structured.add_argument("--constraint", choices=["json-schema", "json-object"],
                            default="json-schema")
    structured.add_argument("--output-json", default=None, help="write the full result here")
    structured.add_argument("--notes", default=None, help="free text stored in the result")
    structured.set_defaults(func=run_structured, command_parser=structured, compare=None,
                            hf_max_batch_size=16)
    add_serve_parser(kinds)
    fleet = kinds.add_parser(
        "fleet", help="several models on one device: throughput alone and all busy, wake "
                      "time from sleep", description=fleet_bench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    fleet_bench.add_arguments(fleet)
    fleet.set_defaults(func=run_fleet)
    reliability = kinds.add_parser(
        "reliability", help="a live server under fuzzing, 2x overload, faults and model swaps",
        description=reliability_suite.__doc__)
    reliability_suite.add_arguments(reliability)
    reliability.set_defaults(func=reliability_suite.run)
    bench.set_defaults(func=lambda args: _help(bench))


def run_fleet(args: argparse.Namespace) -> int:
    return fleet_bench.run(args)


def add_throughput_args(parser: argparse.ArgumentParser) -> None:
    """The workload, engine and comparison flags of `bench throughput`."""
    _add_workload_args(parser)
    _add_engine_args(parser)
    parser.add_argument("--compare", choices=["hf"], default=None,
                        help="also run the workload through transformers' generate and "
                             "print pagoda/reference ratios")
    parser.add_argument("--hf-max-batch-size", type=int, default=16,
                        help="batch size of the transformers comparison (default 16)")
    parser.add_argument("--hf-num-prompts", type=int, default=None,
                        help="run the transformers references on the first N requests only "
                             "(rates are compared; the floor is computed for N requests)")
    parser.add_argument("--gpu-busy", action="store_true",
                        help="rerun the workload under the profiler: GPU busy fraction")
    parser.add_argument("--single-stream", action="store_true",
                        help="also time the first request alone: TTFT and time per token")
    parser.add_argument("--output-json", default=None, help="write the full result here")
    parser.add_argument("--notes", default=None,
                        help="free text stored in the result (machine conditions, purpose)")


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=64, help="number of requests")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens per request")
    parser.add_argument("--random-range-ratio", type=float, default=0.0,
                        help="lengths uniform in [len*(1-r), len*(1+r)]")
    parser.add_argument("--input-len-range", type=int, nargs=2, metavar=("MIN", "MAX"),
                        help="prompt lengths uniform in [MIN, MAX] (overrides --input-len)")
    parser.add_argument("--output-len-range", type=int, nargs=2, metavar=("MIN", "MAX"),
                        help="output lengths uniform in [MIN, MAX] (overrides --output-len)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature (default 0: greedy)")
    parser.add_argument("--seed", type=int, default=0, help="workload, sampling and weight seed")
    parser.add_argument("--disable-detokenize", action="store_true",
                        help="skip detokenizing outputs (measures the engine alone)")


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2",
                        help="pulled name, .gguf file, safetensors directory or config dir")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer path or pulled name (default: the model's)")
    parser.add_argument("--load-format", default=None,
                        choices=["auto", "safetensors", "gguf", "dummy"])
    parser.add_argument("--dtype", default=None, help="auto, float32, float16 or bfloat16")
    parser.add_argument("--quantization", "-q", default=None,
                        help="weight format, as pagoda serve's flag (the roofline then counts "
                             "the bytes the engine holds)")
    parser.add_argument("--device", default=None, help="auto, cpu or cuda")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--kv-cache-memory", "--kv-cache-memory-bytes", type=parse_bytes,
                        default=None,
                        help="KV cache bytes (suffixes K, M, G, T, e.g. 4G)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES,
                        help="as pagoda serve's flag (fp8: K and V in one byte each)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                        default=None)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="disable CUDA graphs (and CPU plans)")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                        default=None, help="overlap step preparation with the device")
    parser.add_argument("--attention-backend", default=None, help="auto, torch or triton")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=None,
                        help="split the model over this many devices (worker processes)")
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=None,
                        help="split the layers into this many stages (worker processes)")
    parser.add_argument("--distributed-executor-backend", default=None,
                        choices=["auto", "uni", "mp", "ray"],
                        help="uni: the worker in the engine process; mp: one worker process "
                             "per rank (the default with more than one); ray: one actor per "
                             "rank on a running Ray cluster")


def canonical_command(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      prefix: tuple[str, ...] = ("pagoda", "bench", "throughput"),
                      secret: tuple[str, ...] = ()) -> list[str]:
    """The command line that reproduces `args`: flags that differ from their defaults
    (the `secret` ones left out)."""
    command = list(prefix)
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or value is None or value == action.default \
                or action.dest in secret:
            continue
        command += _render_flag(action, value)
    return command


def _render_flag(action: argparse.Action, value: Any) -> list[str]:
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag if value else "--no-" + flag.removeprefix("--")]
    if action.nargs == 0:
        return [flag]
    values = value if isinstance(value, (list, tuple)) else [value]
    return [flag, *(str(v) for v in values)]


def throughput_config(args: argparse.Namespace, command: list[str] | None = None) -> Any:
    """Map parsed flags onto a ThroughputConfig."""
    from pagoda.bench.throughput import ThroughputConfig

    engine = {name: getattr(args, name) for name in _ENGINE_FLAGS
              if getattr(args, name) is not None}
    return ThroughputConfig(
        model=args.model, num_prompts=args.num_prompts, input_len=args.input_len,
        output_len=args.output_len, range_ratio=args.random_range_ratio,
        input_len_range=tuple(args.input_len_range) if args.input_len_range else None,
        output_len_range=tuple(args.output_len_range) if args.output_len_range else None,
        temperature=args.temperature, seed=args.seed, detokenize=not args.disable_detokenize,
        compare=args.compare, hf_max_batch_size=args.hf_max_batch_size,
        hf_num_prompts=getattr(args, "hf_num_prompts", None),
        gpu_busy=getattr(args, "gpu_busy", False),
        single_stream=getattr(args, "single_stream", False), engine_kwargs=engine,
        command=command, notes=args.notes)


def run_throughput(args: argparse.Namespace) -> int:
    """Entry point of `pagoda bench throughput`."""
    from pagoda.bench import throughput
    from pagoda.errors import PagodaError
    from pagoda.logger import configure_logging

    configure_logging()
    try:
        command = canonical_command(args.command_parser, args)
        throughput.main(throughput_config(args, command), args.output_json)
    except (PagodaError, ValueError) as exc:
        print(f"pagoda bench throughput: {exc}", file=sys.stderr)
        return 1
    return 0


def run_http_overhead(args: argparse.Namespace) -> int:
    """Entry point of `pagoda bench http-overhead`."""
    from pagoda.bench.http_overhead import run_overhead

    result = run_overhead(_config(args, "http-overhead"), args.port)
    for name, figures in result["systems"].items():
        print(f"{name:8s} {figures['output_tokens_per_s']:10.1f} output tok/s "
              f"{figures['requests_per_s']:8.2f} req/s  ({figures['elapsed_s']:.1f} s)")
    print(f"HTTP / offline output tok/s: {result['http_over_offline']['output_tokens_per_s']:.3f}")
    _save(result, args.output_json)
    return 0


def run_structured(args: argparse.Namespace) -> int:
    """Entry point of `pagoda bench structured`."""
    from pagoda.bench.structured import print_result, run_structured

    result = run_structured(_config(args, "structured"), args.constraint)
    print_result(result)
    _save(result, args.output_json)
    return 0


def _config(args: argparse.Namespace, benchmark: str) -> Any:
    """Logging on, and the ThroughputConfig of `pagoda bench BENCHMARK`'s flags."""
    from pagoda.logger import configure_logging

    configure_logging()
    return throughput_config(args, canonical_command(args.command_parser, args,
                                                     ("pagoda", "bench", benchmark)))


def _save(result: dict[str, Any], path: str | None) -> None:
    if path:
        from pagoda.bench.throughput import write_json
        write_json(result, path)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
