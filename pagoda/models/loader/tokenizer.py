"""A model's tokenizer: its checkpoint's files, the one its GGUF embeds, or an explicit one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pagoda.errors import ModelNotFoundError
from pagoda.logger import get_logger
from pagoda.models.source import ModelSource, resolve_model
from pagoda.tokenizer.gguf import gguf_chat_template, tokenizer_from_gguf
from pagoda.tokenizer.hf_tokenizer import (
    TOKENIZER_FILES,
    has_tokenizer_files,
    load_hf_tokenizer,
)

logger = get_logger(__name__)


def load_tokenizer(source: ModelSource) -> Any:
    """The model's transformers tokenizer, with its chat template set when the GGUF has one."""
    if source.tokenizer_path is not None:
        tokenizer = load_hf_tokenizer(source.tokenizer_path)
        if tokenizer.chat_template is None and source.gguf_file is not None:
            tokenizer.chat_template = gguf_chat_template(source.gguf_file)
        return tokenizer
    if source.gguf_file is not None:
        return tokenizer_from_gguf(source.gguf_file)
    raise ModelNotFoundError(f"{source.path} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")


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
