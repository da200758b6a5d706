"""Loading a checkpoint's transformers tokenizer.

AutoTokenizer first parses the model's config through transformers' config classes, whose
import costs seconds (see pagoda.models.hf_config). For a Llama checkpoint whose
tokenizer_config.json names the generic tokenizers-library class, AutoTokenizer always ends
at transformers' TokenizersBackend: that class is loaded directly, and everything else goes
through AutoTokenizer (tests/tokenizer/test_hf_tokenizer.py compares the two).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# tokenizer_config.json `tokenizer_class` values AutoTokenizer maps to TokenizersBackend
GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
DIRECT_MODEL_TYPES = ("llama",)


def has_tokenizer_files(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def load_hf_tokenizer(path: Path) -> Any:
    """The tokenizer saved in directory `path`, as AutoTokenizer.from_pretrained loads it."""
    backend = direct_tokenizer_class(path)
    if backend is not None:
        return backend.from_pretrained(path)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def direct_tokenizer_class(path: Path) -> type | None:
    """TokenizersBackend where AutoTokenizer would pick it without doubt, else None."""
    tokenizer_config = _json_object(path / "tokenizer_config.json")
    model_config = _json_object(path / "config.json")
    if (tokenizer_config.get("tokenizer_class") not in GENERIC_CLASSES
            or "auto_map" in tokenizer_config or "auto_map" in model_config
            or model_config.get("model_type") not in DIRECT_MODEL_TYPES
            or not (path / "tokenizer.json").is_file()):
        return None
    try:
        from transformers import TokenizersBackend
    except ImportError:  # a transformers without it: AutoTokenizer decides
        return None
    return TokenizersBackend


def _json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
