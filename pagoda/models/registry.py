"""The architectures pagoda serves: HF architecture name or model_type -> its declaration."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pagoda.errors import UnsupportedModelError
from pagoda.models.arch.base import ArchSpec, GGUFLayout
from pagoda.models.arch.gemma3 import GEMMA3
from pagoda.models.arch.llama import LLAMA
from pagoda.models.arch.moe import MIXTRAL, QWEN3_MOE
from pagoda.models.arch.qwen import QWEN2, QWEN3

# Extension point: one entry per architecture file under models/arch/.
ARCH_SPECS: tuple[ArchSpec, ...] = (LLAMA, QWEN2, QWEN3, GEMMA3, QWEN3_MOE, MIXTRAL)


def supported_architectures() -> list[str]:
    return sorted(name for spec in ARCH_SPECS for name in spec.architectures)


def arch_spec(config: Any) -> ArchSpec:
    """The declaration of the architecture `config` names (its `architectures`, else its
    `model_type`); an unknown one is one clear error listing the supported ones."""
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        for spec in ARCH_SPECS:
            if name in spec.architectures:
                return spec
    model_type = getattr(config, "model_type", None)
    spec = spec_for_model_type(model_type)
    if spec is not None:
        return spec
    raise UnsupportedModelError(
        f"model architecture {', '.join(names) or model_type!r} is not supported "
        f"(supported: {', '.join(supported_architectures())})")


def spec_for_model_type(model_type: str | None) -> ArchSpec | None:
    return next((spec for spec in ARCH_SPECS if model_type in spec.model_types), None)


def model_class(config: Any) -> type:
    """The torch model class for `config` (imports torch)."""
    return arch_spec(config).load_class()


def gguf_layouts() -> Mapping[str, GGUFLayout]:
    """GGUF `general.architecture` -> how pagoda reads it."""
    return {arch: layout for spec in ARCH_SPECS for arch, layout in spec.gguf.items()}
