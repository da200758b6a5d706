"""`pagoda generate` (one prompt), `pagoda chat` (interactive) and Ollama's `pagoda run MODEL
[PROMPT]` (either), streaming tokens."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from pagoda.cli.engine_args import add_engine_args, engine_kwargs


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="complete a prompt, streaming the output")
    gen.add_argument("prompt", help="the prompt text ('-' reads standard input)")
    _common(gen)
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.set_defaults(func=run_generate)
    chat = subparsers.add_parser("chat", help="chat with a model in the terminal")
    _common(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(func=run_chat)
    run = subparsers.add_parser("run", help="Ollama's run: chat with MODEL, or answer PROMPT "
                                            "once (through the chat template)")
    run.add_argument("run_model", metavar="MODEL", help="model name or path")
    run.add_argument("prompt", nargs="?", default=None,
                     help="answer this and exit ('-' reads standard input); without it, chat")
    _common(run)
    run.add_argument("--system", default=None, help="system prompt (chat)")
    run.set_defaults(func=run_model, raw=False)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default="smollm2", help="model name or path")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--stop", action="append", default=None, type=_unescape,
                        help="stop at this text (repeatable; \\n and \\t are understood)")
    add_engine_args(parser)


def _unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _sampling_params(args: argparse.Namespace):
    from pagoda.sampling_params import SamplingParams
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.seed, stop=args.stop)


def _load(args: argparse.Namespace):
    """The engine, or None after one line on stderr if a vLLM flag was refused."""
    from pagoda.cli.engine_args import check_vllm_flags
    from pagoda.logger import configure_logging
    configure_logging()
    if not check_vllm_flags(args):
        return None
    from pagoda.engine.llm import LLM
    return LLM(args.model, **engine_kwargs(args))


def stream_to(out: TextIO, outputs) -> str:
    """Write each new piece of text as it arrives; return the full text."""
    text = ""
    for request_output in outputs:
        new = request_output.outputs[0].text
        out.write(new[len(text):])
        out.flush()
        text = new
    out.write("\n")
    return text


def run_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = _load(args)
    if llm is None:
        return 2
    params = _sampling_params(args)
    if args.raw or not getattr(llm.get_tokenizer(), "chat_template", None):
        stream_to(sys.stdout, llm.stream(prompt, params))
    else:
        stream_to(sys.stdout, llm.stream_chat([{"role": "user", "content": prompt}], params))
    return 0


def _quiet_info_logs() -> None:
    """Once the model is loaded, INFO lines would land in the middle of the prompt: show only
    warnings from now on (unless PAGODA_LOG_LEVEL asks for more)."""
    import logging
    import os
    if "PAGODA_LOG_LEVEL" not in os.environ:
        logging.getLogger("pagoda").setLevel(logging.WARNING)


def run_chat(args: argparse.Namespace) -> int:
    llm = _load(args)
    if llm is None:
        return 2
    params = _sampling_params(args)
    _quiet_info_logs()
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Type a message; an empty line or Ctrl-D ends the chat.", file=sys.stderr)
    while True:
        try:
            user = input("> ")
        except EOFError:
            break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        reply = stream_to(sys.stdout, llm.stream_chat(messages, params))
        messages.append({"role": "assistant", "content": reply})
    return 0


def run_model(args: argparse.Namespace) -> int:
    """`pagoda run MODEL [PROMPT]`: a prompt is answered once, else the chat starts."""
    args.model = args.run_model
    return run_chat(args) if args.prompt is None else run_generate(args)
