"""A model's chat template: the GGUF's, else its architecture's default; a pull saves it with
the converted tokenizer, so loading a pulled model never reads the GGUF for it."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import gguf
import pytest

from pagoda.models import registry, store
from pagoda.models.arch.llama import LLAMA
from pagoda.models.loader.gguf import GGUF_CONFIG_VERSION
from pagoda.models.loader.tokenizer import get_tokenizer, load_tokenizer
from pagoda.models.source import resolve_model
from pagoda.tokenizer.default_templates import read_default_template
from tests.models.test_store import CHAT_TEMPLATE, write_tiny_gguf
from tests.utils import logged_messages

GEMMA3_TEMPLATE = read_default_template("gemma3.jinja")
LOGGER = "pagoda.models.loader.tokenizer"


@pytest.fixture(scope="module")
def bare_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TINY's llama GGUF without a chat template."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "add_chat_template", lambda self, template: None)
        return write_tiny_gguf(tmp_path_factory.mktemp("bare") / "bare.gguf")


@pytest.fixture(scope="module")
def templated_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("templated") / "tiny.gguf")


@pytest.fixture
def llama_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Llama declares Gemma 3's template as its default (no real architecture without a
    template is small enough to write here)."""
    specs = tuple(dataclasses.replace(spec, default_chat_template="gemma3.jinja")
                  if spec is LLAMA else spec for spec in registry.ARCH_SPECS)
    monkeypatch.setattr(registry, "ARCH_SPECS", specs)


def pulled(directory: Path, gguf_file: Path, version: int = GGUF_CONFIG_VERSION) -> Path:
    """`directory` as `pagoda pull` leaves it (converted by the pagoda of `version`)."""
    directory.mkdir()
    target = shutil.copy(gguf_file, directory / gguf_file.name)
    store._write_converted_files(directory, Path(target))
    data = Path(target).read_bytes()
    manifest = store.Manifest(directory.name, "test==1", gguf_file.name,
                              hashlib.sha256(data).hexdigest(), len(data), version)
    (directory / store.MANIFEST_NAME).write_text(manifest.to_json())
    return directory


def unreadable_gguf(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF was read")
    monkeypatch.setattr(gguf, "GGUFReader", refuse)


@pytest.mark.usefixtures("llama_default")
def test_a_pull_saves_the_default_and_loads_skip_the_gguf(bare_gguf, tmp_path, monkeypatch):
    directory = pulled(tmp_path / "bare", bare_gguf)
    assert (directory / "chat_template.jinja").read_text() == GEMMA3_TEMPLATE
    source = resolve_model(str(directory))
    assert source.converted
    unreadable_gguf(monkeypatch)
    with logged_messages(LOGGER) as messages:
        tokenizer = load_tokenizer(source)
    assert tokenizer.chat_template == GEMMA3_TEMPLATE
    assert messages == []  # the default was announced at pull time


def test_a_pull_saves_the_ggufs_own_template(templated_gguf, tmp_path, monkeypatch,
                                             llama_default):
    source = resolve_model(str(pulled(tmp_path / "tiny", templated_gguf)))
    unreadable_gguf(monkeypatch)
    assert load_tokenizer(source).chat_template == CHAT_TEMPLATE


def test_without_a_default_a_pulled_model_has_no_template_and_the_gguf_is_not_read(
        bare_gguf, tmp_path, monkeypatch):
    source = resolve_model(str(pulled(tmp_path / "bare", bare_gguf)))
    assert not (source.path / "chat_template.jinja").exists()
    unreadable_gguf(monkeypatch)
    assert load_tokenizer(source).chat_template is None


@pytest.mark.usefixtures("llama_default")
def test_an_older_pull_reads_the_ggufs_template_then_the_default(bare_gguf, templated_gguf,
                                                                  tmp_path):
    old = pulled(tmp_path / "old", templated_gguf, GGUF_CONFIG_VERSION - 1)
    (old / "chat_template.jinja").unlink()  # older pulls saved no template of their own
    source = resolve_model(str(old))
    assert not source.converted
    assert load_tokenizer(source).chat_template == CHAT_TEMPLATE
    old_bare = pulled(tmp_path / "old-bare", bare_gguf, GGUF_CONFIG_VERSION - 1)
    (old_bare / "chat_template.jinja").unlink()
    with logged_messages(LOGGER) as messages:
        tokenizer = load_tokenizer(resolve_model(str(old_bare)))
    assert tokenizer.chat_template == GEMMA3_TEMPLATE
    assert messages == [(f"{old_bare} has no chat template: using pagoda's default for its "
                         "architecture (gemma3.jinja)")]


@pytest.mark.usefixtures("llama_default")
def test_a_gguf_file_or_tokenizer_directory_without_a_template_gets_the_default(
        bare_gguf, tmp_path):
    with logged_messages(LOGGER) as messages:
        tokenizer = load_tokenizer(resolve_model(str(bare_gguf)))
    assert tokenizer.chat_template == GEMMA3_TEMPLATE and len(messages) == 1
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    explicit = get_tokenizer(resolve_model(str(bare_gguf)), str(tmp_path / "tokenizer"))
    assert explicit.chat_template == GEMMA3_TEMPLATE


def test_pulled_gemma3_270m_loads_its_default_template_without_reading_the_gguf(
        gemma3_270m_dir, monkeypatch):
    source = resolve_model(str(gemma3_270m_dir))
    assert source.converted, "run `pagoda pull gemma3-270m` to redo an older conversion"
    unreadable_gguf(monkeypatch)
    tokenizer = load_tokenizer(source)
    assert tokenizer.chat_template == GEMMA3_TEMPLATE, \
        "the pulled copy is not pagoda's template: bump GGUF_CONFIG_VERSION, pull again"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True,
                                           add_generation_prompt=True, return_dict=True)
    assert tokenizer.convert_ids_to_tokens(prompt["input_ids"]) == [
        "<bos>", "<start_of_turn>", "user", "\n", "Hi", "<end_of_turn>", "\n", "<start_of_turn>",
        "model", "\n"]
