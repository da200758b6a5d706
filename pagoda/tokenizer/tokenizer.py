"""The tokenizer an engine's frontend uses: the model's own, an explicit one, or none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pagoda.errors import ModelNotFoundError
from pagoda.logger import get_logger
from pagoda.models.source import (
    ModelSource,
    has_tokenizer_files,
    load_tokenizer,
    resolve_model,
)
from pagoda.tokenizer.hf_tokenizer import load_hf_tokenizer

logger = get_logger(__name__)


def get_tokenizer(source: ModelSource, tokenizer: str | None = None) -> Any | None:
    """`tokenizer` (a path or pulled name) if given, else the model's. A checkpoint without
    tokenizer files gets None and runs on token ids alone (text prompts are then refused)."""
    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        if path.is_dir() and has_tokenizer_files(path):  # a tokenizer alone, no weights
            return load_hf_tokenizer(path)
        return load_tokenizer(resolve_model(tokenizer))
    try:
        return load_tokenizer(source)
    except ModelNotFoundError:
        logger.warning("%s has no tokenizer: only token-id prompts will work", source.name)
        return None
