"""`pagoda bench serve`: flags (`vllm bench serve` names where they exist) and entry point."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

ENDPOINTS = {"openai": "/v1/completions", "vllm": "/v1/completions",
             "openai-chat": "/v1/chat/completions"}


def add_serve_parser(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser(
        "serve", help="online serving benchmark against any OpenAI-compatible server",
        description="Streams requests to an OpenAI-compatible endpoint (pagoda, vLLM, "
                    "llama.cpp, Ollama's /v1) and reports throughput and TTFT/TPOT/ITL/E2EL.")
    _add_target_args(parser)
    _add_dataset_args(parser)
    _add_traffic_args(parser)
    _add_output_args(parser)
    parser.set_defaults(func=run_serve, command_parser=parser)


def _add_target_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("target")
    g.add_argument("--base-url", default=None, help="server URL (default http://HOST:PORT)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--backend", choices=sorted(ENDPOINTS), default="openai",
                   help="openai/vllm: /v1/completions; openai-chat: /v1/chat/completions")
    g.add_argument("--endpoint", default=None, help="endpoint path (default from --backend)")
    g.add_argument("--model", default=None,
                   help="model name to request (default: the first one /v1/models lists)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer for building prompts (default: the model name, as a pulled "
                        "model, a directory or a cached Hugging Face name)")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default $OPENAI_API_KEY)")
    g.add_argument("--label", default=None, help="name of the system under test in results")
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds one request may take in all (default 600)")
    g.add_argument("--stall-timeout", type=float, default=60.0,
                   help="seconds without data after a request's first token before it "
                        "fails (default 60); waiting for the first token (queued) is bounded "
                        "only by --request-timeout")


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    from pagoda.bench.serve.datasets import DATASETS
    g = parser.add_argument_group("dataset")
    g.add_argument("--dataset-name", choices=DATASETS, default="random")
    g.add_argument("--dataset-path", default=None,
                   help="sharegpt: a ShareGPT JSON file; prompts: .txt (one per line) or "
                        ".jsonl ({\"prompt\": ..., \"max_tokens\": ...})")
    g.add_argument("--num-prompts", type=int, default=1000,
                   help="requests to send (shared-prefix: groups x prompts per group instead)")
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128)
    g.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]")
    g.add_argument("--random-prefix-len", type=int, default=0,
                   help="random tokens every random prompt starts with")
    g.add_argument("--shared-prefix-groups", type=int, default=4, help="K prefixes")
    g.add_argument("--shared-prefix-prompts-per-group", type=int, default=8, help="M prompts each")
    g.add_argument("--shared-prefix-len", type=int, default=512, help="P tokens of prefix")
    g.add_argument("--shared-prefix-suffix-len", type=int, default=64,
                   help="tokens each prompt adds after its prefix")
    g.add_argument("--output-len", "--sharegpt-output-len", type=int, default=None,
                   help="max_tokens for sharegpt (overrides the reply's length), "
                        "shared-prefix and prompts (default 128)")


def _add_traffic_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("traffic")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second (default inf: all at once)")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 is Poisson, lower is burstier")
    g.add_argument("--max-concurrency", type=int, default=None,
                   help="most requests in flight at once")
    g.add_argument("--num-warmups", type=int, default=0, help="untimed requests sent first")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--ignore-eos", action="store_true",
                   help="ask the server to generate max_tokens regardless of EOS")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--extra-body", type=_json_object, default=None,
                   help="JSON object merged into every request body")
    g.add_argument("--sweep", default=None,
                   help="request-rate=R1,R2,... or max-concurrency=C1,C2,...: one run per "
                        "value, one JSON and a throughput-latency plot")
    g.add_argument("--sweep-prompts-per-concurrency", type=int, default=None, metavar="K",
                   help="in a max-concurrency sweep, send K x concurrency prompts per point "
                        "instead of --num-prompts")


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("results")
    g.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el",
                   help="comma-separated subset of ttft,tpot,itl,e2el")
    g.add_argument("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    g.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                   help="SLOs, e.g. ttft:500 tpot:50 e2el:10000")
    g.add_argument("--save-result", action="store_true",
                   help="write the figures and every request's timings as JSON")
    g.add_argument("--result-dir", default=".", help="where results go (default .)")
    g.add_argument("--result-filename", default=None)
    g.add_argument("--plot", default=None, help="sweep plot path (default next to the JSON)")
    g.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def run_serve(args: argparse.Namespace) -> int:
    """Entry point of `pagoda bench serve`."""
    from pagoda.bench.serve.runner import BenchmarkAborted
    try:
        return _run(args)
    except (ValueError, BenchmarkAborted) as exc:
        print(f"pagoda bench serve: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from pagoda.bench.serve import benchmark, sweep
    from pagoda.bench.throughput import write_json

    cfg = serve_config(args)
    tokenizer = benchmark.load_benchmark_tokenizer(args.tokenizer, cfg.request.model)
    cfg.tokenizer = args.tokenizer or (cfg.request.model if tokenizer is not None else None)
    if args.sweep:
        parameter, values = sweep.parse_sweep(args.sweep)
        document = sweep.run_sweep(cfg, tokenizer, parameter, values,
                                   args.sweep_prompts_per_concurrency)
        json_path = _result_path(args, cfg, "sweep")
        write_json(document, json_path)
        plot = sweep.plot_sweep(document, Path(args.plot) if args.plot
                                else json_path.with_suffix(".png"))
        print(f"saved {json_path} and {plot}")
        return 0 if any(p["metrics"]["completed"] for p in document["points"]) else 1
    result = benchmark.run_once(cfg, benchmark.build_requests(cfg, tokenizer))
    benchmark.print_report(cfg, result)
    if args.save_result:
        path = _result_path(args, cfg, "serve")
        write_json(benchmark.result_document(cfg, result), path)
        print(f"saved {path}")
    return 0 if result.metrics["completed"] else 1


def serve_config(args: argparse.Namespace) -> Any:
    """Parsed flags → ServeBenchConfig (asks the server for its model when none is given)."""
    from pagoda.bench.serve.benchmark import ServeBenchConfig, discover_model
    from pagoda.bench.serve.client import RequestSettings
    from pagoda.bench.serve.datasets import DatasetSpec
    from pagoda.bench.serve.metrics import LATENCY_METRICS, parse_goodput
    from pagoda.bench.serve.runner import RunSettings
    from pagoda.cli.bench import canonical_command

    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    endpoint = args.endpoint or ENDPOINTS[args.backend]
    model = args.model or discover_model(base_url, args.api_key)
    metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    if unknown := set(metrics) - set(LATENCY_METRICS):
        raise ValueError(f"--percentile-metrics: unknown {', '.join(sorted(unknown))}")
    request = RequestSettings(
        url=base_url + endpoint, model=model, chat="chat/completions" in endpoint,
        api_key=args.api_key, ignore_eos=args.ignore_eos, temperature=args.temperature,
        top_p=args.top_p, extra_body=args.extra_body or {},
        request_timeout_s=args.request_timeout, stall_timeout_s=args.stall_timeout)
    dataset = DatasetSpec(
        name=args.dataset_name, num_prompts=args.num_prompts, seed=args.seed,
        path=args.dataset_path, random_input_len=args.random_input_len,
        random_output_len=args.random_output_len, random_range_ratio=args.random_range_ratio,
        random_prefix_len=args.random_prefix_len, num_prefix_groups=args.shared_prefix_groups,
        prompts_per_group=args.shared_prefix_prompts_per_group,
        shared_prefix_len=args.shared_prefix_len, shared_suffix_len=args.shared_prefix_suffix_len,
        output_len=args.output_len)
    run = RunSettings(
        request_rate=args.request_rate, burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, num_warmups=args.num_warmups, seed=args.seed,
        percentiles=_percentiles(args.metric_percentiles), metrics=metrics,
        slos=parse_goodput(args.goodput), show_progress=not args.disable_tqdm)
    if request.request_timeout_s <= 0 or request.stall_timeout_s <= 0:
        raise ValueError("--request-timeout and --stall-timeout must be positive")
    command = canonical_command(args.command_parser, args, ("pagoda", "bench", "serve"),
                                secret=("api_key",))
    return ServeBenchConfig(request, dataset, run, label=args.label, command=command)


def _percentiles(text: str) -> list[float]:
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"--metric-percentiles {text!r}: comma-separated numbers") from None


def _result_path(args: argparse.Namespace, cfg: Any, kind: str) -> Path:
    if args.result_filename:
        return Path(args.result_dir) / args.result_filename
    rate = cfg.run.request_rate
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    label = (cfg.label or cfg.request.model).replace("/", "_")
    what = kind if kind == "sweep" else f"qps{rate:g}-conc{cfg.run.max_concurrency or 'max'}"
    return Path(args.result_dir) / f"{label}-{what}-{stamp}.json"
