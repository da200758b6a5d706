"""Every command reports a bad model or setting in one line on stderr (no traceback), with
the documented exit status: 1 for an error, 2 for a bad command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _run(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagoda.cli.main", *argv], input=stdin,
                          capture_output=True, text=True, timeout=120, check=False)


def _error_lines(proc: subprocess.CompletedProcess, command: str) -> list[str]:
    assert "Traceback" not in proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith(f"pagoda {command}:")]


@pytest.fixture(scope="module")
def unsupported_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mamba")
    (path / "config.json").write_text(json.dumps(
        {"architectures": ["MambaForCausalLM"], "model_type": "mamba"}))
    (path / "model.safetensors").write_bytes(b"")
    return path


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_unknown_model_is_one_line(command):
    argv = ["generate", "hi"] if command == "generate" else ["chat"]
    proc = _run(*argv, "--model", "no-such-model")
    assert proc.returncode == 1
    lines = _error_lines(proc, command)
    assert len(lines) == 1 and "model 'no-such-model' not found" in lines[0]


def test_unsupported_architecture_is_one_line(unsupported_checkpoint):
    proc = _run("generate", "hi", "--model", str(unsupported_checkpoint))
    assert proc.returncode == 1
    lines = _error_lines(proc, "generate")
    assert len(lines) == 1 and "'MambaForCausalLM' is not supported" in lines[0]


def test_too_long_max_model_len_is_one_line(smollm2_dir):
    proc = _run("generate", "hi", "--model", str(smollm2_dir), "--max-model-len", "100000")
    assert proc.returncode == 1
    assert _error_lines(proc, "generate") == [(
        "pagoda generate: max_model_len=100000 exceeds the model's limit of 8192 "
        "(max_position_embeddings in its config)")]


def test_serve_reports_a_load_failure_once_and_never_after_listening(tmp_path, smollm2_dir):
    (tmp_path / "config.json").write_text((smollm2_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    proc = _run("serve", str(tmp_path), "--port", "0")
    assert proc.returncode == 1
    lines = _error_lines(proc, "serve")
    assert len(lines) == 1 and lines[0].startswith("pagoda serve: the engine failed to load "
                                                   "the model: ")
    assert lines[0].endswith("model.safetensors: truncated safetensors header")
    assert proc.stderr.splitlines()[-1] == lines[0]  # nothing after it, no second report
    assert proc.stderr.count("truncated safetensors header") == 1


def test_serve_unknown_model_is_reported_once():
    proc = _run("serve", "no-such-model", "--port", "0")
    assert proc.returncode == 1
    assert proc.stderr.count("not found") == 1
    assert "listening" not in proc.stderr


def test_version():
    from pagoda import __version__
    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"pagoda {__version__}"


def test_a_bad_chat_template_stops_serve_before_the_engine_starts():
    proc = _run("serve", "smollm2", "--port", "0", "--chat-template", "{% for %}")
    assert proc.returncode == 1
    lines = _error_lines(proc, "serve")
    assert len(lines) == 1 and lines[0].startswith("pagoda serve: --chat-template:")
    assert "starting the engine" not in proc.stderr and "loading" not in proc.stderr


def test_a_bad_chat_template_in_a_models_file_stops_serve_before_any_engine(tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text('models:\n  - {model: smollm2, name: smol, chat_template: "{% for %}"}\n')
    proc = _run("serve", "--config", str(models), "--port", "0")
    assert proc.returncode == 1
    lines = _error_lines(proc, "serve")
    assert len(lines) == 1 and lines[0].startswith("pagoda serve: model 'smol': chat_template:")
    assert "starting the engine" not in proc.stderr and "loading" not in proc.stderr


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "foo"], "unknown dtype 'foo'"),
    (["--tool-call-parser", "foo"], "unknown --tool-call-parser 'foo'"),
    (["--reasoning-parser", "foo"], "unknown --reasoning-parser 'foo'"),
])
def test_bad_settings_stop_serve_before_the_engine_starts(flags, message):
    proc = _run("serve", "smollm2", "--port", "0", *flags)
    assert proc.returncode == 1
    lines = _error_lines(proc, "serve")
    assert len(lines) == 1 and message in lines[0]
    assert "starting the engine" not in proc.stderr


def test_a_too_long_max_model_len_stops_serve_before_it_listens():
    proc = _run("serve", "smollm2", "--port", "0", "--max-model-len", "100000")
    assert proc.returncode == 1
    lines = _error_lines(proc, "serve")
    assert len(lines) == 1 and "exceeds the model's limit of 8192" in lines[0]
    assert "listening" not in proc.stderr and proc.stderr.splitlines()[-1] == lines[0]
