"""`pagoda serve [MODEL]`: the OpenAI-compatible HTTP server (vLLM's flags)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pagoda.cli.engine_args import add_engine_args, engine_kwargs
from pagoda.config import parse_bytes


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve a model over the OpenAI-compatible HTTP API")
    p.add_argument("model", nargs="*", default=[],
                   help="model name or path (default: smollm2); several share one endpoint")
    p.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--ollama-port", type=int, default=None, metavar="PORT",
                   help="also listen on this port (Ollama's is 11434), so Ollama's clients "
                        "work with their default address; every API answers on both ports")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="names the API answers to (the first is reported)")
    g.add_argument("--api-key", action="append", default=None,
                   help="require this bearer key (repeatable; env PAGODA_API_KEY, or vLLM's "
                        "VLLM_API_KEY, also works)")
    g.add_argument("--chat-template", default=None, help="a Jinja chat template, file or inline")
    g.add_argument("--trust-request-chat-template", action=argparse.BooleanOptionalAction,
                   default=False,
                   help="allow requests to bring their own chat template")
    g.add_argument("--tool-call-parser", default="auto", metavar="FORMAT",
                   help="tool-call format of the model's output: auto (from the chat template, "
                        "else hermes), hermes, llama3_json, mistral or pythonic")
    g.add_argument("--enable-auto-tool-choice", action=argparse.BooleanOptionalAction,
                   default=False,
                   help="accepted for vLLM compatibility. Unlike vLLM, which refuses "
                        "tool_choice auto without it, pagoda always parses tool calls in "
                        "the model's output (--tool-call-parser)")
    g.add_argument("--reasoning-parser", default="auto", metavar="FORMAT",
                   help="split <think> reasoning from the answer: auto (from the chat "
                        "template), none, deepseek_r1 or qwen3")
    g.add_argument("--disable-log-requests", action="store_true")
    g.add_argument("--enable-log-requests", action=argparse.BooleanOptionalAction,
                   default=None, help=argparse.SUPPRESS)
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests before aborting them")
    g.add_argument("--max-pending-requests", type=int, default=1024,
                   help="in-flight requests beyond this get 503 with Retry-After")
    g.add_argument("--max-pending-sequences", type=int, default=None,
                   help="sequences in flight (each request's n counted) beyond this get 503 "
                        "(default: 4 x --max-num-seqs)")
    g.add_argument("--max-pending-tokens", type=int, default=None,
                   help="tokens owed (prompts not yet computed + outputs up to max_tokens) "
                        "beyond this get 503 (default: 4 x the KV cache's tokens)")
    g.add_argument("--max-queue-wait", type=float, default=10.0,
                   help="seconds a new request may be expected to wait before it starts, from "
                        "the rate sequences finish; beyond it the request gets 503 (default 10)")
    g.add_argument("--engine-stall-timeout", type=float, default=10.0,
                   help="seconds without a heartbeat from the engine loop before /health and "
                        "/live answer 503 (default 10)")
    g.add_argument("--max-request-body", type=parse_bytes, default=32 << 20)
    g.add_argument("--uvicorn-log-level", default="warning")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="run this many engine replicas of the model behind the endpoint, "
                        "routed by prompt prefix and load (one GPU each, else all on the "
                        "device given)")
    g.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="priority",
                   help="priority (default): lower `priority` values run first, FCFS among "
                        "equals; fcfs: request priorities are ignored")
    lora = p.add_argument_group("LoRA adapters (with --enable-lora)")
    lora.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                      help="adapters to serve: name=path, or JSON "
                           "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'")
    lora.add_argument("--lora-dir", default=None,
                      help="the only directory runtime-loaded adapters may come from "
                           "(default: the model store)")
    lora.add_argument("--allow-runtime-lora-updating", action="store_true",
                      help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
                           "(env VLLM_ALLOW_RUNTIME_LORA_UPDATING=True also does)")
    m = p.add_argument_group("several models (given more than one model, or --config)")
    m.add_argument("--config", default=None, metavar="YAML",
                   help="a models file (a 'models:' list): per-model names, aliases, pinning, "
                        "keep-alive, priority, replicas and engine options. A YAML of serve "
                        "flags instead (vLLM's --config: port: 8000, max-model-len: 4096, "
                        "model: ...) is read as those flags; the command line's win")
    m.add_argument("--keep-alive", default="-1",
                   help="how long an idle model stays loaded: a duration (5m), 0 or -1 "
                        "(forever, the default); requests may set keep_alive too")
    m.add_argument("--memory-limit", type=parse_bytes, default=None,
                   help="device memory the models may share (default: 90%% of each GPU, 80%% "
                        "of available RAM on CPU)")
    m.add_argument("--host-memory-limit", type=parse_bytes, default=None,
                   help="host memory for sleeping models' weights (default: half the "
                        "available RAM); beyond it idle models are unloaded instead")
    m.add_argument("--swap-timeout", type=float, default=120.0,
                   help="seconds a request waits for its model to load before a 503")
    m.add_argument("--max-waiting-requests", type=int, default=256,
                   help="requests waiting for models to load beyond this get a 503")
    add_engine_args(p)
    p.set_defaults(func=run_serve)


def read_chat_template(value: str | None, origin: str = "--chat-template") -> str | None:
    """The chat template text: the file ``value`` names, else ``value`` itself when it looks
    like Jinja (has '{' or a newline). It is compiled here, so a bad one fails at startup,
    before any weight loads; ``origin`` (the flag, or a models-file entry) names it."""
    if value is None:
        return None
    from pagoda.errors import ConfigError, InvalidRequestError
    from pagoda.tokenizer.chat_template import compile_template
    text = _template_file_text(value, origin)
    if text is None and "{" not in value and "\n" not in value:
        raise ConfigError(f"{origin} {value!r} is neither a file nor a Jinja template")
    text = value if text is None else text
    try:
        compile_template(text)
    except InvalidRequestError as exc:
        raise ConfigError(f"{origin}: {exc.message}") from None
    return text


def _template_file_text(value: str, origin: str) -> str | None:
    """The text of the file ``value`` names, or None if it names none."""
    from pagoda.errors import ConfigError
    try:
        path = Path(value).expanduser()
        if not path.is_file():
            return None
    except (OSError, RuntimeError, ValueError):  # too long for a path, unknown ~user, NUL byte
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{origin}: cannot read {value}: {exc}") from None


def run_serve(args: argparse.Namespace) -> int:
    from pagoda.cli.engine_args import check_vllm_flags
    from pagoda.logger import configure_logging
    configure_logging()
    if not check_vllm_flags(args):
        return 2
    from pagoda.errors import PagodaError
    problem = _parallel_problem(args)
    if problem:
        print(f"pagoda serve: {problem}", file=sys.stderr)
        return 2
    if args.config or len(args.model) > 1 or args.data_parallel_size > 1:
        try:
            return _serve_fleet(args)
        except PagodaError as exc:
            print(f"pagoda serve: {exc}", file=sys.stderr)
            return 1
    model = (args.model[0] if args.model else None) or args.model_flag or "smollm2"
    check_before_loading(args)
    engine_starting = _start_engine_early(model, engine_kwargs(args))
    try:
        return _serve(args, model, keys_from(args), engine_starting)
    except PagodaError as exc:
        _stop(engine_starting)  # first, so that the error is the last line
        print(f"pagoda serve: {exc}", file=sys.stderr)
        return 1


def check_before_loading(args: argparse.Namespace) -> None:
    """Settings that are wrong whatever the model: refused before any engine starts (and so
    before any weight loads), each as a ConfigError."""
    from pagoda.config import check_dtype_name
    from pagoda.entrypoints.openai.output_parsers import check_parser_names
    read_chat_template(args.chat_template)
    check_parser_names(args.tool_call_parser, args.reasoning_parser)
    check_dtype_name(args.dtype)


def keys_from(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_key or [])
    for variable in ("PAGODA_API_KEY", "VLLM_API_KEY"):  # vLLM guides set the second
        if os.environ.get(variable):
            keys.append(os.environ[variable])
    return keys


def _serve(args: argparse.Namespace, model: str, keys: list[str], engine_starting) -> int:
    from pagoda.entrypoints.openai.server import serve
    return serve(model, engine_kwargs(args),
                 server_config(args, args.served_model_name or [model], keys),
                 listen_options(args), engine_starting=engine_starting)


def server_config(args: argparse.Namespace, names: list[str], keys: list[str]):
    from pagoda.entrypoints.openai.app import ServerConfig
    return ServerConfig(
        names, keys, args.max_request_body, read_chat_template(args.chat_template),
        args.trust_request_chat_template, log_requests=not args.disable_log_requests,
        honor_priority=args.scheduling_policy == "priority",
        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
        lora=lora_server_config(args))


def lora_server_config(args: argparse.Namespace):
    """The server's LoRA settings; adapters without --enable-lora are a startup error."""
    from pagoda.entrypoints.openai.serving_lora import (
        LoRAServerConfig,
        parse_lora_module,
    )
    from pagoda.errors import ConfigError
    if (args.lora_modules or args.allow_runtime_lora_updating) and not args.enable_lora:
        raise ConfigError("--lora-modules and --allow-runtime-lora-updating need --enable-lora")
    return LoRAServerConfig(
        [parse_lora_module(v) for v in args.lora_modules],
        Path(args.lora_dir).expanduser() if args.lora_dir else None,
        args.allow_runtime_lora_updating, args.max_loras if args.enable_lora else 0)


def listen_options(args: argparse.Namespace):
    from pagoda.entrypoints.openai.server import ListenOptions
    return ListenOptions(args.host, args.port, args.shutdown_timeout, args.uvicorn_log_level,
                         args.max_pending_requests, args.max_pending_sequences,
                         args.max_pending_tokens, args.max_queue_wait,
                         args.engine_stall_timeout,
                         ollama_port=args.ollama_port)


def _serve_fleet(args: argparse.Namespace) -> int:
    from pagoda.entrypoints.openai.server import serve_fleet
    from pagoda.fleet.spec import fleet_from_args, fleet_from_yaml, parse_keep_alive
    check_before_loading(args)
    kwargs = engine_kwargs(args)
    if args.config:
        fleet = fleet_from_yaml(args.config)
        if args.model:
            print("pagoda serve: give models either on the command line or in --config",
                  file=sys.stderr)
            return 2
    else:
        models = args.model or [args.model_flag or "smollm2"]
        replicas = args.data_parallel_size
        fleet = fleet_from_args(models, {}, args.served_model_name, args.keep_alive,
                                replicas=replicas, devices=replica_devices(args, replicas))
    if args.memory_limit is not None:
        fleet.memory_limit = args.memory_limit
    if args.kv_cache_memory is not None:
        from pagoda.logger import get_logger
        get_logger("pagoda.cli").warning(
            "--kv-cache-memory ignored: with several models, replicas or --config the memory "
            "planner sizes each KV cache (bound what they share with --memory-limit)")
    if args.keep_alive != "-1":  # the flag wins over the file
        fleet.keep_alive = parse_keep_alive(args.keep_alive)
    for spec in fleet.models:
        spec.chat_template = read_chat_template(
            spec.chat_template, f"model {spec.name!r}: chat_template")
    return serve_fleet(fleet, kwargs, server_config(args, [], keys_from(args)),
                       listen_options(args), max_waiting=args.max_waiting_requests,
                       swap_timeout=args.swap_timeout, host_memory_limit=args.host_memory_limit)


def _parallel_problem(args: argparse.Namespace) -> str | None:
    """Why these parallel sizes cannot be served together, if they cannot."""
    split = args.tensor_parallel_size != 1 or args.pipeline_parallel_size != 1
    if args.data_parallel_size < 1:
        return "--data-parallel-size must be at least 1"
    if split and (args.config or len(args.model) > 1):
        return ("--tensor-parallel-size and --pipeline-parallel-size need a single model "
                "(several models share a device each)")
    if args.data_parallel_size > 1 and (args.config or len(args.model) > 1):
        return "--data-parallel-size serves one model; in a models file, set `replicas`"
    return None


def replica_devices(args: argparse.Namespace, replicas: int) -> list[str]:
    """Each replica's first GPU where --device allows and there are enough: cuda:0, cuda:S,
    cuda:2S ... for replicas of S = tensor x pipeline ranks (a replica's ranks take the GPUs
    from its first on). Else none named: every replica on the default device; on a GPU
    machine too few GPUs for split replicas is a ConfigError (they would overlap)."""
    if replicas == 1 or args.device not in ("auto", "cuda"):
        return []
    from pagoda.errors import ConfigError
    from pagoda.fleet.devices import gpus
    found = gpus()
    span = args.tensor_parallel_size * args.pipeline_parallel_size
    if len(found) < replicas * span:
        if span > 1 and found:
            raise ConfigError(f"--data-parallel-size {replicas} with {span} ranks per replica "
                              f"needs {replicas * span} GPUs; {len(found)} visible")
        return []
    return [f"cuda:{replica * span}" for replica in range(replicas)]


def _stop(engine_starting) -> None:
    try:
        engine_starting.result().shutdown()
    except Exception:  # it failed to start too; nothing to stop
        pass


def _start_engine_early(model: str, kwargs: dict):
    """Spawn the engine process before importing the server: its startup (imports, CUDA,
    weights) then overlaps ours."""
    from pagoda.config import engine_config
    from pagoda.engine.client import start_in_background
    return start_in_background(engine_config(model, **kwargs))
