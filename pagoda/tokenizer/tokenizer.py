"""The tokenizer an engine's frontend uses: the model's own, an explicit one, or none."""

from __future__ import annotations

from typing import Any

from pagoda.errors import ModelNotFoundError
from pagoda.models.source import ModelSource, load_tokenizer


def get_tokenizer(source: ModelSource, tokenizer: str | None = None) -> Any | None:
    """`tokenizer` (a path or pulled name) if given, else the model's. Random-weight models
    without tokenizer files get None and run on token ids alone."""
    if tokenizer is not None:
        from pagoda.models.source import resolve_model
        return load_tokenizer(resolve_model(tokenizer))
    try:
        return load_tokenizer(source)
    except ModelNotFoundError:
        if source.format != "dummy":
            raise
        return None
