"""The direct tokenizer load gives what AutoTokenizer gives, and is taken only where safe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from pagoda.bench.word_tokenizer import with_word_tokenizer
from pagoda.tokenizer.hf_tokenizer import direct_tokenizer_class, load_hf_tokenizer

BENCH_1B = Path(__file__).parents[2] / "bench" / "configs" / "llama-3.2-1b"
TEXTS = ["Hello, world!", "  spaces\tand\nnewlines ", "naïve café 日本語 🙂", "w5 w6 w7", ""]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pulled model's tokenizer and config files, without its weights."""
    directory = tmp_path_factory.mktemp("smollm2-tokenizer")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_dir / name).is_file():
            shutil.copy(smollm2_dir / name, directory / name)
    return directory


@pytest.fixture(scope="module")
def word_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_word_tokenizer(BENCH_1B, tmp_path_factory.mktemp("word-tokenizer"))


def behaviour(tokenizer: Any) -> dict[str, Any]:
    """What the server relies on: ids both ways, special tokens, the chat template."""
    return {
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "specials": {name: getattr(tokenizer, name) for name in
                     ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")},
        "added": {i: str(t) for i, t in tokenizer.added_tokens_decoder.items()},
        "encoded": [tokenizer.encode(text) for text in TEXTS],
        "decoded": [tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True)
                    for text in TEXTS],
        "chat": tokenizer.apply_chat_template(MESSAGES, tokenize=False,
                                              add_generation_prompt=True),
    }


@pytest.mark.parametrize("name", ["smollm2_tokenizer_dir", "word_tokenizer_dir"])
def test_direct_load_behaves_as_auto_tokenizer(name: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(name)
    assert direct_tokenizer_class(path) is not None
    assert behaviour(load_hf_tokenizer(path)) == behaviour(AutoTokenizer.from_pretrained(path))


def edit_json(path: Path, **changes: Any) -> None:
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values))


@pytest.mark.parametrize("file, changes", [
    ("config.json", {"model_type": "mistral"}),
    ("config.json", {"auto_map": {"AutoConfig": "custom.Config"}}),
    ("tokenizer_config.json", {"tokenizer_class": "LlamaTokenizer"}),
    ("tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["custom.Tok", None]}}),
])
def test_other_checkpoints_go_through_auto_tokenizer(smollm2_tokenizer_dir: Path, tmp_path: Path,
                                                     file: str, changes: dict) -> None:
    path = Path(shutil.copytree(smollm2_tokenizer_dir, tmp_path / "copy"))
    edit_json(path / file, **changes)
    assert direct_tokenizer_class(path) is None


def test_missing_files_go_through_auto_tokenizer(smollm2_tokenizer_dir: Path,
                                                 tmp_path: Path) -> None:
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        path = Path(shutil.copytree(smollm2_tokenizer_dir, tmp_path / name))
        (path / name).unlink()
        assert direct_tokenizer_class(path) is None, name


def test_fallback_loads_through_auto_tokenizer(smollm2_tokenizer_dir: Path,
                                               tmp_path: Path) -> None:
    path = Path(shutil.copytree(smollm2_tokenizer_dir, tmp_path / "copy"))
    edit_json(path / "config.json", model_type="mistral")
    assert behaviour(load_hf_tokenizer(path)) == behaviour(AutoTokenizer.from_pretrained(path))
