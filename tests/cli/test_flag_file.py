"""`pagoda serve --config FILE`: a models file stays one; a YAML of flags (vLLM's --config)
is read as those flags, the command line winning; anything else is one clean error."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagoda.cli.main import build_parser, dashed, parse_command_line
from pagoda.errors import ConfigError


def serve_args(*argv: str):
    argv = dashed(["serve", *argv])
    return parse_command_line(build_parser(argv), argv)


VLLM_CONFIG = """\
model: ./my-llama
host: 127.0.0.1
port: 6379
max-model-len: 4096
max_num_seqs: 8
enable-prefix-caching: false
served-model-name: [llama, gpt-4o]
api-key: [one, two]
uvicorn-log-level: info
swap-space: 4
"""


def test_a_vllm_config_is_read_as_flags(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(VLLM_CONFIG)
    args = serve_args("--config", str(path))
    assert args.config is None  # not a models file: the server serves one model
    assert (args.model_flag, args.host, args.port, args.max_model_len, args.max_num_seqs) == \
        ("./my-llama", "127.0.0.1", 6379, 4096, 8)
    assert args.enable_prefix_caching is False and args.uvicorn_log_level == "info"
    assert args.served_model_name == ["llama", "gpt-4o"] and args.api_key == ["one", "two"]
    assert args.vllm_swap_space == "4"  # a vLLM flag pagoda notes at startup


def test_the_command_line_wins_over_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(VLLM_CONFIG)
    args = serve_args("smollm2", "--config", str(path), "--port", "9000")
    assert (args.model, args.port, args.max_model_len) == (["smollm2"], 9000, 4096)


def test_a_models_file_stays_a_models_file(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - {model: smollm2, name: smol}\n")
    args = serve_args("--config", str(path), "--port", "9000")
    assert args.config == str(path) and args.port == 9000


@pytest.mark.parametrize("text, message", [
    ("modles:\n  - {model: smollm2}\nport: 1\n", "not a flag: modles"),
    ("config: other.yaml\n", "not a flag: config"),
    ("- smollm2\n", "neither a models file"),
    ("port: [unclosed\n", "cannot read"),
])
def test_a_file_that_is_neither_is_refused_saying_why(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        serve_args("--config", str(path))


def test_the_refusal_is_one_line_and_status_1(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("no-such-flag: 1\n")
    proc = subprocess.run([sys.executable, "-m", "pagoda.cli.main", "serve", "--config",
                           str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"pagoda serve: --config {path}: neither a models file (it has no 'models' list) nor "
        f"a YAML of `pagoda serve` flags (vLLM's --config): not a flag: no-such-flag"]
