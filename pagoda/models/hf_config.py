"""A checkpoint's config.json as pagoda reads it, without transformers.

Importing transformers' config classes pulls in torch._dynamo, torch.distributed and, where
installed, torchvision and scikit-learn: 6-9 s on a GPU host, paid by every engine start.
pagoda's models read a few dozen fields, so the file is read as plain JSON, with the
defaults transformers gives the supported model types for fields the file leaves out
(tests/models/test_hf_config.py holds them to transformers' own).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import Any

from pagoda.errors import UnsupportedModelError

CONFIG_NAME = "config.json"
DEFAULT_ROPE_THETA = 10000.0

# transformers' defaults for the fields pagoda's models read, per model_type
_LLAMA_DEFAULTS: Mapping[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "pad_token_id": None,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}
_MISTRAL_DEFAULTS: Mapping[str, Any] = {
    **{k: v for k, v in _LLAMA_DEFAULTS.items() if k not in ("attention_bias", "mlp_bias")},
    "intermediate_size": 14336,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096 * 32,
    "sliding_window": 4096,
}
MODEL_TYPE_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "llama": MappingProxyType(_LLAMA_DEFAULTS),
    "mistral": MappingProxyType(_MISTRAL_DEFAULTS),
})


class HFConfig(SimpleNamespace):
    """A Hugging Face model config as attributes (`config.hidden_size`), from plain data."""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> HFConfig:
        """The config `values` describe, completed with its model type's defaults."""
        merged = dict(MODEL_TYPE_DEFAULTS.get(values.get("model_type") or "", {}))
        merged.update(values)
        if merged.get("dtype") is None and merged.get("torch_dtype") is not None:
            merged["dtype"] = merged["torch_dtype"]  # the field's older name
        merged.pop("torch_dtype", None)
        if "num_attention_heads" in merged:
            _fill_head_shape(merged)
        if merged.get("model_type") in MODEL_TYPE_DEFAULTS:
            _merge_rope_fields(merged)
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


def _merge_rope_fields(values: dict[str, Any]) -> None:
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
