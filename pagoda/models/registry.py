"""HF architecture name -> pagoda model class."""

from __future__ import annotations

from typing import Any

from torch import nn

from pagoda.errors import UnsupportedModelError
from pagoda.models.llama import LlamaForCausalLM

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
}


def model_class(config: Any) -> type[nn.Module]:
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = getattr(config, "model_type", None)
    fallback = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}.get(model_type or "")
    if fallback:
        return ARCHITECTURES[fallback]
    supported = ", ".join(sorted(ARCHITECTURES))
    raise UnsupportedModelError(
        f"model architecture {names or model_type!r} is not supported (supported: {supported})")
