"""Every flag of `vllm serve` (tests/cli/data/vllm_serve_flags.tsv) is accepted by `pagoda serve`,
acted on or with a one-line startup note, or refused on purpose with a reason."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pagoda.cli.engine_args import compat_notes, engine_kwargs
from pagoda.cli.main import build_parser, dashed, parse
from pagoda.cli.vllm_flags import VLLM_FLAGS
from pagoda.errors import ConfigError

FLAGS_FILE = Path(__file__).parent / "data" / "vllm_serve_flags.tsv"


def _vllm_flags() -> list[tuple[str, list[str], str]]:
    rows = []
    for line in FLAGS_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            flag, aliases, arity = line.split("\t")
            rows.append((flag, [] if aliases == "-" else aliases.split(","), arity))
    return rows


VLLM_SERVE_FLAGS = _vllm_flags()
SERVE = build_parser(["serve"])
SERVE_PARSER = next(a for a in SERVE._actions
                    if isinstance(a, argparse._SubParsersAction)).choices["serve"]


def _sample(flag: str, arity: str) -> list[str]:
    """A command-line value this flag takes in pagoda's parser (non-default where it can)."""
    if arity.startswith("switch"):
        return []
    action = SERVE_PARSER._option_string_actions[flag]
    if action.choices:
        return [list(action.choices)[-1]]
    if action.type in (int, float):
        return ["2"]
    if getattr(action.type, "__name__", "") == "parse_bytes":
        return ["1GiB"]
    return ["7"]


def _parse(argv: list[str]) -> argparse.Namespace:
    return parse(SERVE, ["serve", "smollm2", *argv])


def test_the_recorded_list_names_its_vllm_version_and_is_whole():
    header = FLAGS_FILE.read_text().splitlines()[0]
    assert "vLLM 0.19.1" in header
    assert len(VLLM_SERVE_FLAGS) > 250
    assert len({flag for flag, _, _ in VLLM_SERVE_FLAGS}) == len(VLLM_SERVE_FLAGS)


@pytest.mark.parametrize("flag, aliases, arity", VLLM_SERVE_FLAGS, ids=lambda v: str(v))
def test_each_vllm_serve_flag_is_accepted_or_refused_on_purpose(flag, aliases, arity):
    for name in [flag, *aliases]:
        assert name in SERVE_PARSER._option_string_actions, f"{name} unknown to pagoda serve"
    args = _parse([flag, *_sample(flag, arity)])
    entry = VLLM_FLAGS.get(flag)
    if entry is None:  # one of pagoda's own flags: acted on, so no note
        assert not SERVE_PARSER._option_string_actions[flag].dest.startswith("vllm_")
        assert not any(flag in note for note in compat_notes(args))
        return
    if entry.refused:
        with pytest.raises(ConfigError, match=f"{flag}.*not supported: {re.escape(entry.reason)}"):
            compat_notes(args)
        return
    notes = [note for note in compat_notes(args) if note.startswith(flag)]
    if notes:  # given with a value pagoda does not act on: one line saying what it does
        assert notes == [f"{' '.join([flag, *_sample(flag, arity)])} ignored: {entry.reason}"]
    else:  # the sample value is what pagoda does anyway
        assert (_sample(flag, arity) or ["true"])[0] in entry.quiet


@pytest.mark.parametrize("flag", [f for f, _, arity in VLLM_SERVE_FLAGS if arity.endswith("+no")])
def test_negated_switches_parse(flag):
    _parse(["--no-" + flag[2:]])


@pytest.mark.parametrize("flag", ["--use-v2-block-manager", "--pipeline-parallel-size 2",
                                  "--cpu-offload-gb 4", "--max-parallel-loading-workers 2",
                                  "--disable-cascade-attn", "--enable-expert-parallel"])
def test_the_six_flags_from_common_guides_parse(flag):
    _parse(flag.split())


@pytest.mark.parametrize("line, note", [
    ("--swap-space 16", "--swap-space 16 ignored: preempted requests are recomputed"),
    ("--disable-custom-all-reduce", "--disable-custom-all-reduce ignored: pagoda has no"),
    ("--decode-context-parallel-size 2",
     "--decode-context-parallel-size 2 ignored: pagoda runs engines on this machine only"),
    ("--cpu-offload-gb 4", "--cpu-offload-gb 4 ignored: weights stay on the device"),
])
def test_flags_pagoda_does_not_act_on_get_a_startup_note(line, note):
    notes = compat_notes(_parse(line.split()))
    assert len(notes) == 1 and notes[0].startswith(note)


@pytest.mark.parametrize("line", ["--pipeline-parallel-size 1", "--distributed-executor-backend mp",
                                  "--use-v2-block-manager", "--disable-cascade-attn",
                                  "--enable-chunked-prefill", "--kv-cache-dtype auto"])
def test_values_pagoda_already_honours_are_quiet(line):
    assert compat_notes(_parse(line.split())) == []


def test_tensor_parallel_flags_are_acted_on():
    args = _parse(["-tp", "2", "--distributed-executor-backend", "mp"])
    assert engine_kwargs(args)["tensor_parallel_size"] == 2
    assert engine_kwargs(args)["distributed_executor_backend"] == "mp"
    assert engine_kwargs(_parse([]))["distributed_executor_backend"] == "auto"
    ray = _parse(["--distributed-executor-backend", "ray"])
    assert engine_kwargs(ray)["distributed_executor_backend"] == "ray"
    assert compat_notes(ray) == []
    assert engine_kwargs(_parse(["-pp", "2"]))["pipeline_parallel_size"] == 2
    assert compat_notes(_parse(["-tp", "2", "-pp", "2"])) == []


def test_underscored_spellings_are_accepted_like_vllm():
    args = _parse(dashed(["--max_model_len=512", "--gpu_memory_utilization", "0.5"]))
    assert args.max_model_len == 512 and args.gpu_memory_utilization == 0.5


def test_kv_cache_memory_bytes_is_acted_on():
    assert _parse(["--kv-cache-memory-bytes", "2GiB"]).kv_cache_memory == 2 << 30


def _run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagoda.cli.main", *argv],
                          capture_output=True, text=True, timeout=60, check=False)


def test_an_unknown_flag_is_reported_with_the_subcommands_usage():
    proc = _run_cli("serve", "smollm2", "--no-such-flag", "3")
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: pagoda serve")
    assert "unrecognized arguments: --no-such-flag 3" in proc.stderr


def test_a_refused_flag_stops_serve_with_one_line_and_status_2():
    proc = _run_cli("serve", "smollm2", "--ssl-keyfile", "key.pem", "--port", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "pagoda serve: --ssl-keyfile key.pem is not supported: pagoda serves plain HTTP; "
        "put a TLS-terminating proxy in front")
    assert "listening" not in proc.stderr
