"""The tokenizer and chat template a GGUF file embeds."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import gguf

from pagoda.errors import ModelNotFoundError


def gguf_chat_template(gguf_file: Path) -> str | None:
    """The file's `tokenizer.chat_template` metadata, if it has one."""
    field = gguf.GGUFReader(gguf_file, "r").fields.get("tokenizer.chat_template")
    return None if field is None else str(field.contents())


def tokenizer_from_gguf(gguf_file: Path) -> Any:
    """Convert the tokenizer embedded in a GGUF file (slow: seconds for a 50k vocabulary).
    It is read from a directory holding (a link to) the GGUF alone: transformers would also
    read tokenizer files lying next to it, such as an earlier conversion's, and mix them in.
    A file that embeds no tokenizer transformers can build raises ModelNotFoundError."""
    from transformers import AutoTokenizer
    if "tokenizer.ggml.tokens" not in gguf.GGUFReader(gguf_file, "r").fields:
        raise ModelNotFoundError(f"{gguf_file} embeds no tokenizer (no tokenizer.ggml.tokens)")
    with tempfile.TemporaryDirectory(prefix="pagoda-gguf-") as alone:
        (Path(alone) / gguf_file.name).symlink_to(gguf_file.resolve())
        try:
            tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=gguf_file.name)
        except ValueError as exc:  # transformers' word for a missing or unknown tokenizer
            raise ModelNotFoundError(f"{gguf_file} embeds no usable tokenizer: {exc}") from None
    if tokenizer.chat_template is None:
        tokenizer.chat_template = gguf_chat_template(gguf_file)
    return tokenizer
