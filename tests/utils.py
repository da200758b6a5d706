"""Test helpers shared across test modules."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def save_random_checkpoint(config, path: Path, tokenizer_dir: Path | None, seed: int = 0) -> Path:
    """A random-weight HF checkpoint (safetensors + config [+ tokenizer]) for any config."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     "special_tokens_map.json"):
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, path / name)
    return path
