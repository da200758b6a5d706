"""A model's tokenizer: its checkpoint's files, the one its GGUF embeds, or an explicit one;
with its architecture's default chat template when it has none of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pagoda.errors import ModelNotFoundError, UnsupportedModelError
from pagoda.logger import get_logger
from pagoda.models.registry import arch_spec
from pagoda.models.source import ModelSource, resolve_model
from pagoda.tokenizer.default_templates import read_default_template
from pagoda.tokenizer.gguf import gguf_chat_template, tokenizer_from_gguf
from pagoda.tokenizer.hf_tokenizer import (
    TOKENIZER_FILES,
    has_tokenizer_files,
    load_hf_tokenizer,
)

logger = get_logger(__name__)


def load_tokenizer(source: ModelSource) -> Any:
    """The model's transformers tokenizer, with the GGUF's chat template when its files lack
    one (a current pull saved it with them: the GGUF is not read), else the architecture's."""
    if source.tokenizer_path is not None:
        tokenizer = load_hf_tokenizer(source.tokenizer_path)
        if tokenizer.chat_template is None and source.gguf_file is not None \
                and not source.converted:
            tokenizer.chat_template = gguf_chat_template(source.gguf_file)
    elif source.gguf_file is not None:
        tokenizer = tokenizer_from_gguf(source.gguf_file)
    else:
        raise ModelNotFoundError(f"{source.path} has no tokenizer files "
                                 f"({', '.join(TOKENIZER_FILES)})")
    return with_default_chat_template(tokenizer, source.hf_config, source.name)


def with_default_chat_template(tokenizer: Any, hf_config: Any, name: str) -> Any:
    """`tokenizer`, given its architecture's default chat template if it has none (logged)."""
    if tokenizer.chat_template is not None:
        return tokenizer
    try:
        template = arch_spec(hf_config).default_chat_template
    except UnsupportedModelError:
        return tokenizer
    if template is not None:
        logger.info("%s has no chat template: using pagoda's default for its architecture (%s)",
                    name, template)
        tokenizer.chat_template = read_default_template(template)
    return tokenizer


def get_tokenizer(source: ModelSource, tokenizer: str | None = None) -> Any | None:
    """`tokenizer` (a path or pulled name) if given, else the model's. A checkpoint without
    tokenizer files gets None and runs on token ids alone (text prompts are then refused)."""
    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        if path.is_dir() and has_tokenizer_files(path):  # a tokenizer alone, no weights
            return with_default_chat_template(load_hf_tokenizer(path), source.hf_config,
                                              tokenizer)
        return load_tokenizer(resolve_model(tokenizer))
    try:
        return load_tokenizer(source)
    except ModelNotFoundError:
        logger.warning("%s has no tokenizer: only token-id prompts will work", source.name)
        return None
