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
    argv = shlex.split("serve smollm2 --kv-cache-dtype fp8 --quantization awq")
    args = build_parser(argv).parse_args(argv)
    notes = compat_notes(args)
    assert len(notes) == 1 and "fp8" in notes[0]
    assert engine_kwargs(args)["quantization"] == "awq"  # acted on, not a note


@pytest.mark.parametrize("text, value", [("1024", 1024), ("4KiB", 4096), ("2G", 2 << 30),
                                         ("1.5m", 3 << 19), ("512MiB", 512 << 20)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value
