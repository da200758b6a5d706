"""PEFT LoRA adapters on disk: read `adapter_config.json` + `adapter_model.safetensors`,
check every tensor against the model's layers, and fold the scaling into B."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from pagoda.lora.request import LoRAAdapterError, LoRARequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS = "adapter_model.bin"
MAX_CONFIG_BYTES = 1 << 20
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj")
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True, slots=True)
class ModuleShape:
    """What an adapted module must look like: its input and output features."""

    in_features: int
    out_features: int


@dataclass(slots=True)
class LoRAAdapter:
    """An adapter's weights per checkpoint module ("model.layers.0.self_attn.q_proj"):
    A [rank, in] and B [out, rank] with the scaling already folded into B."""

    request: LoRARequest
    rank: int
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b in self.weights.values())


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    """The fields of adapter_config.json pagoda acts on."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    base_model: str | None

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def read_adapter_config(directory: Path, max_rank: int) -> AdapterConfig:
    """Parse and check adapter_config.json (LoRAAdapterError if it is not a plain LoRA
    pagoda can serve)."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise LoRAAdapterError(f"no {CONFIG_FILE} in {directory.name!r}: not a PEFT adapter")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise LoRAAdapterError(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise LoRAAdapterError(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise LoRAAdapterError(f"{CONFIG_FILE} must hold a JSON object")
    return _check_config(raw, max_rank)


def _check_config(raw: Mapping[str, Any], max_rank: int) -> AdapterConfig:
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoRAAdapterError(f"peft_type {peft_type!r} is not supported (only LORA)")
    for key in ("use_dora", "fan_in_fan_out"):
        if raw.get(key):
            raise LoRAAdapterError(f"{key}=true adapters are not supported")
    if raw.get("bias", "none") != "none":
        raise LoRAAdapterError("adapters that train biases are not supported (bias must be "
                               "'none')")
    if raw.get("target_parameters"):
        raise LoRAAdapterError(
            f"LoRA on parameters (target_parameters {raw['target_parameters']!r}, as PEFT "
            "makes for mixture-of-experts experts) is not supported: only the q/k/v/o and "
            "dense gate/up/down projections take adapters")
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            raise LoRAAdapterError(f"per-module ranks ({key}) are not supported")
    if raw.get("modules_to_save"):
        raise LoRAAdapterError("adapters with modules_to_save (fully trained layers) are not "
                               "supported")
    rank, alpha = raw.get("r"), raw.get("lora_alpha", raw.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise LoRAAdapterError("adapter_config.json needs a positive integer rank 'r'")
    if rank > max_rank:
        raise LoRAAdapterError(f"adapter rank {rank} exceeds --max-lora-rank {max_rank}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise LoRAAdapterError("lora_alpha must be a number")
    targets = raw.get("target_modules") or []
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(rank, float(alpha), bool(raw.get("use_rslora", False)), targets,
                         base if isinstance(base, str) else None)


def load_adapter(request: LoRARequest, shapes: Mapping[str, ModuleShape], max_rank: int,
                 dtype: torch.dtype, elsewhere: tuple[str, ...] = ()) -> LoRAAdapter:
    """Read the adapter in request.path and check it against `shapes` (checkpoint module
    name -> the shape it must have). Modules under a prefix in `elsewhere` (the decoder
    layers another pipeline stage holds, "model.layers.7.") are left out unread: that
    stage checks them. Raises LoRAAdapterError naming the first problem."""
    directory = Path(request.path)
    if not directory.is_dir():
        raise LoRAAdapterError(f"adapter directory {request.path!r} does not exist")
    config = read_adapter_config(directory, max_rank)
    tensors = _read_weights(directory)
    adapter = LoRAAdapter(request, config.rank, config.scaling)
    pairs = _pair_tensors(tensors)
    if not pairs:
        raise LoRAAdapterError(f"{WEIGHTS_FILE} holds no lora_A/lora_B weights")
    for module, (a, b) in sorted(pairs.items()):
        if elsewhere and module.startswith(elsewhere):
            continue
        _check_module(module, a, b, shapes, config.rank)
        adapter.weights[module] = (a.to(dtype), (b.float() * config.scaling).to(dtype))
    return adapter


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        if (directory / PICKLED_WEIGHTS).is_file():
            raise LoRAAdapterError(
                f"{PICKLED_WEIGHTS} (a pickle) is refused: it can run code when loaded. "
                f"Convert the adapter to {WEIGHTS_FILE} (PEFT's save_pretrained(..., "
                "safe_serialization=True))")
        raise LoRAAdapterError(f"no {WEIGHTS_FILE} in the adapter directory")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 -- safetensors' own error type is not exported
        raise LoRAAdapterError(f"cannot read {WEIGHTS_FILE}: {exc}") from None


def _pair_tensors(tensors: Mapping[str, torch.Tensor]
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) from PEFT's names ("base_model.model.<module>.lora_A.weight")."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        stem = name.removeprefix(_PEFT_PREFIX)
        for half in ("lora_A", "lora_B"):
            suffix = f".{half}.weight"
            if stem.endswith(suffix):
                halves.setdefault(stem.removesuffix(suffix), {})[half] = tensor
                break
        else:
            raise LoRAAdapterError(f"unsupported adapter tensor {name!r} (only lora_A/lora_B "
                                   "weights of linear layers are served)")
    pairs = {}
    for module, parts in halves.items():
        if len(parts) != 2:
            raise LoRAAdapterError(f"module {module!r} has only one of lora_A and lora_B")
        pairs[module] = (parts["lora_A"], parts["lora_B"])
    return pairs


def _check_module(module: str, a: torch.Tensor, b: torch.Tensor,
                  shapes: Mapping[str, ModuleShape], rank: int) -> None:
    leaf = module.rsplit(".", 1)[-1]
    if leaf not in SUPPORTED_MODULES:
        raise LoRAAdapterError(f"module {module!r}: LoRA on {leaf!r} is not supported (only "
                               f"{', '.join(SUPPORTED_MODULES)})")
    shape = shapes.get(module)
    if shape is None and ".experts." in module:
        raise LoRAAdapterError(f"module {module!r}: LoRA on mixture-of-experts experts is not "
                               "supported (attention and dense MLP projections only)")
    if shape is None:
        raise LoRAAdapterError(f"module {module!r} does not exist in the base model")
    want_a, want_b = (rank, shape.in_features), (shape.out_features, rank)
    if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise LoRAAdapterError(
            f"module {module!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
            f"the base model (expected {want_a} / {want_b}): an adapter for another model?")
