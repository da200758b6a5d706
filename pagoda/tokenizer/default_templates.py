"""pagoda's own chat templates, shipped as package data under pagoda/tokenizer/templates/,
for architectures whose checkpoints may come without one (see ArchSpec.default_chat_template).

A pull saves the default with the converted tokenizer: changing a template here reaches
pulled models when GGUF_CONFIG_VERSION is bumped (`pagoda pull` then redoes the conversion)."""

from __future__ import annotations

from functools import cache
from importlib import resources

TEMPLATES_DIR = "templates"


@cache
def read_default_template(name: str) -> str:
    """The text of template file `name` (e.g. "gemma3.jinja") shipped with pagoda."""
    return (resources.files("pagoda.tokenizer") / TEMPLATES_DIR / name).read_text(encoding="utf-8")
