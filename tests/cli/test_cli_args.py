"""Command lines from vLLM guides parse unchanged with only the program name changed."""

from __future__ import annotations

import shlex

import pytest

from pagoda.cli.engine_args import compat_notes, engine_kwargs
from pagoda.cli.main import build_parser
from pagoda.config import parse_bytes

VLLM_LINES = [
    "serve meta-llama/Llama-3.1-8B-Instruct --host 0.0.0.0 --port 8000 "
    "--gpu-memory-utilization 0.9 --max-model-len 8192 --dtype auto --trust-remote-code",
    "serve smollm2 --served-model-name my-model --api-key secret --max-num-seqs 128 "
    "--max-num-batched-tokens 8192 --enable-prefix-caching --enable-chunked-prefill "
    "--disable-log-requests --disable-log-stats --seed 0 --tensor-parallel-size 1",
    "serve --model smollm2 --enforce-eager --kv-cache-dtype auto "
    "--chat-template ./template.jinja --uvicorn-log-level info --block-size 16",
]


@pytest.mark.parametrize("line", VLLM_LINES)
def test_vllm_serve_lines_parse(line):
    argv = shlex.split(line)
    args = build_parser(argv).parse_args(argv)
    assert args.func.__name__ == "run_serve"
    kwargs = engine_kwargs(args)
    assert kwargs["max_num_seqs"] > 0 and kwargs["dtype"] == "auto"
    assert compat_notes(args) == []


def test_unsupported_values_are_reported_not_silently_ignored():
    argv = shlex.split("serve smollm2 --kv-cache-dtype fp8 --calculate-kv-scales "
                       "--quantization awq")
    args = build_parser(argv).parse_args(argv)
    notes = compat_notes(args)
    assert len(notes) == 1 and "--calculate-kv-scales" in notes[0] and "unscaled" in notes[0]
    assert engine_kwargs(args)["quantization"] == "awq"  # acted on, not a note
    assert engine_kwargs(args)["kv_cache_dtype"] == "fp8"


@pytest.mark.parametrize("text, value", [("1024", 1024), ("4KiB", 4096), ("2G", 2 << 30),
                                         ("1.5m", 3 << 19), ("512MiB", 512 << 20)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_enable_auto_tool_choice_is_accepted_and_its_difference_documented():
    """vLLM refuses tool_choice auto without the flag; pagoda parses tool calls either way,
    and says so in --help and the README."""
    from pathlib import Path

    from pagoda.cli.main import _subparsers
    argv = ["serve", "smollm2", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    parser = build_parser(argv)
    assert parser.parse_args(argv).enable_auto_tool_choice is True
    help_text = " ".join(_subparsers(parser)["serve"].format_help().split())
    assert "Unlike vLLM, which refuses tool_choice auto without it, pagoda always parses " \
           "tool calls" in help_text
    readme = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    assert 'tool_choice: "auto"` works without `--enable-auto-tool-choice`' in readme


@pytest.mark.parametrize("command", [["generate", "hi"], ["chat"], ["serve", "smollm2"]])
def test_trust_remote_code_is_accepted_by_every_model_command(command):
    argv = [*command, "--trust-remote-code"]
    assert build_parser(argv).parse_args(argv).trust_remote_code is True


def test_vllm_api_key_from_the_environment_guards_the_server_too(monkeypatch):
    """A vLLM guide sets VLLM_API_KEY: pagoda must not then serve without a key."""
    from pagoda.cli.serve import keys_from
    argv = ["serve", "smollm2", "--api-key", "flag"]
    args = build_parser(argv).parse_args(argv)
    monkeypatch.delenv("PAGODA_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert keys_from(args) == ["flag", "from-vllm"]
