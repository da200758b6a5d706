"""A checkpoint's config.json as pagoda reads it, without transformers.

Importing transformers' config classes pulls in torch._dynamo, torch.distributed and, where
installed, torchvision and scikit-learn: 6-9 s on a GPU host, paid by every engine start.
pagoda's models read a few dozen fields, so the file is read as plain JSON, with the
defaults transformers gives the supported model types for fields the file leaves out (each
architecture declares them in models/arch/; tests/models/test_hf_config.py holds them to
transformers' own).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pagoda.errors import UnsupportedModelError

CONFIG_NAME = "config.json"
DEFAULT_ROPE_THETA = 10000.0


class HFConfig(SimpleNamespace):
    """A Hugging Face model config as attributes (`config.hidden_size`), from plain data."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> HFConfig:
        """The config `values` describe, completed with its model type's defaults."""
        from pagoda.models.registry import spec_for_model_type
        spec = spec_for_model_type(values.get("model_type"))
        merged = dict(spec.config_defaults.get(values["model_type"], {}) if spec else {})
        merged.update(values)
        if merged.get("dtype") is None and merged.get("torch_dtype") is not None:
            merged["dtype"] = merged["torch_dtype"]  # the field's older name
        merged.pop("torch_dtype", None)
        if "num_attention_heads" in merged:
            _fill_head_shape(merged)
        if spec is not None:
            (spec.complete_config or merge_rope_fields)(merged)
        return cls(**merged)

    @classmethod
    def from_dir(cls, path: Path) -> HFConfig:
        """The config.json in directory `path`."""
        try:
            values = json.loads((path / CONFIG_NAME).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnsupportedModelError(f"cannot read {path / CONFIG_NAME}: {exc}") from None
        if not isinstance(values, dict):
            raise UnsupportedModelError(f"{path / CONFIG_NAME} is not a JSON object")
        return cls.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def save(self, directory: Path) -> None:
        """Write it as `directory`/config.json, which transformers reads too."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        (directory / CONFIG_NAME).write_text(text + "\n")

    def to_transformers(self) -> Any:
        """The same config as a transformers object (for running transformers' model on it)."""
        from transformers import AutoConfig
        values = self.to_dict()
        return AutoConfig.for_model(values.pop("model_type"), **values)


def _fill_head_shape(values: dict[str, Any]) -> None:
    """KV heads default to the query heads, and head_dim to hidden_size / heads."""
    values["num_key_value_heads"] = (values.get("num_key_value_heads")
                                     or values["num_attention_heads"])
    if values.get("head_dim") is None and "hidden_size" in values:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]


def merge_rope_fields(values: dict[str, Any]) -> None:
    """rope_theta and rope_scaling folded into rope_parameters, as transformers 5 keeps them."""
    values["rope_parameters"] = rope_parameters(SimpleNamespace(**values))
    values.pop("rope_scaling", None)
    values.pop("rope_theta", None)


def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's rope settings as one dict (transformers 5 `rope_parameters`, or the
    older `rope_theta` + `rope_scaling` pair)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    for key, value in scaling.items():
        params.setdefault(key, value)
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or DEFAULT_ROPE_THETA)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_type", "default")
    return params
