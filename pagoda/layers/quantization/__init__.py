"""Quantized weights: each `--quantization` format as a config that picks the linear method
of every layer by name; binding those methods to a model built with deferred linear
methods, and finishing the layers once the checkpoint is loaded."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from pagoda.layers.embedding import LMHead, VocabEmbedding
from pagoda.layers.linear import LinearBase, UnquantizedLinearMethod
from pagoda.layers.moe.layer import FusedMoE
from pagoda.layers.quantization.base import QuantizationConfig


def get_quantization_config(name: str, hf_config: Any) -> QuantizationConfig:
    """The config of format `name` (a name `pagoda.models.quantization` accepted); a
    checkpoint without quantization_config asking for fp8 is quantized at load."""
    if name == "gguf":
        from pagoda.layers.quantization.gguf import GGUFConfig
        return GGUFConfig()
    values = getattr(hf_config, "quantization_config", None) or {}
    if name == "awq":
        from pagoda.layers.quantization.int_checkpoints import AWQConfig
        return AWQConfig(values)
    if name == "gptq":
        from pagoda.layers.quantization.int_checkpoints import GPTQConfig
        return GPTQConfig(values)
    if name == "fp8":
        from pagoda.layers.quantization.fp8 import Fp8Config
        return Fp8Config(values or None)
    if name == "compressed-tensors":
        from pagoda.layers.quantization.compressed_tensors import (
            compressed_tensors_config,
        )
        return compressed_tensors_config(values)
    raise NotImplementedError(f"--quantization {name} is not implemented yet")


def bind_linear_methods(model: nn.Module, config: QuantizationConfig | None) -> None:
    """Give every linear layer built without a method the format's method for its name
    (or 16-bit weights); this creates their weights."""
    for name, module in model.named_modules():
        if isinstance(module, LinearBase) and module.method is None:
            method = config.linear_method(name, module) if config is not None else None
            module.bind_method(method or UnquantizedLinearMethod())


def bind_experts(model: nn.Module, config: QuantizationConfig | None,
                 from_checkpoint: bool) -> None:
    """Give every mixture-of-experts layer built without weights what holds them: the
    checkpoint's codes for a CPU kernel where the format gives them, its kernel runs here
    (`holds_expert_codes`) and one rank holds every expert (float ones quantized to float8
    under `--quantization fp8`); on a GPU the checkpoint's codes stacked for the fused MoE
    kernel where the format gives them (`gives_expert_codes`; floats where their layout
    does not fit), and float8 for floats under `--quantization fp8`; dummy experts random
    codes of the format (float8, or an integer format's where the kernel takes them) made
    as such; else floats in the model's dtype (a quantized checkpoint's experts decoded at
    load)."""
    device = torch.empty(0).device.type  # the device being loaded onto
    for module in model.modules():
        if not isinstance(module, FusedMoE) or module.holds_weights:
            continue
        if config is None:
            module.hold_floats()
        elif from_checkpoint:
            _hold_checkpoint_experts(module, config, device)
        else:
            _hold_dummy_experts(module, config, device)


def _codes_on_cpu(module: FusedMoE, config: QuantizationConfig, device: str) -> bool:
    """Whether the layer's experts are held for a CPU kernel of the format."""
    return module.group.size == 1 and device == "cpu" and config.holds_expert_codes


def _hold_checkpoint_experts(module: FusedMoE, config: QuantizationConfig,
                             device: str) -> None:
    if _codes_on_cpu(module, config, device):
        module.hold_codes(float8=config.at_load)
    elif device == "cuda" and not config.at_load and config.gives_expert_codes:
        module.hold_stacked_codes()
    elif device == "cuda" and config.float8_experts:
        module.hold_stacked_codes(float8=True)
    else:
        module.hold_floats()


def _hold_dummy_experts(module: FusedMoE, config: QuantizationConfig, device: str) -> None:
    stacked = device == "cuda"
    random_piece = None
    if stacked or _codes_on_cpu(module, config, device):
        random_piece = random_expert_piece(config, module.hidden_size, module.local_inter,
                                           stacked)
    if random_piece is None:
        module.hold_floats()
    else:
        module.hold_dummy_codes(random_piece, stacked)


def random_expert_piece(config: QuantizationConfig, hidden: int, inter: int,
                        stacked: bool) -> Callable[..., Any] | None:
    """What makes a dummy expert's projection in the format's form: float8 rows under
    `--quantization fp8`, an integer format's codes (`stacked`, for the GPU kernel: where
    it takes their layout over both projections' inputs, gate-up's `hidden` and down's
    `inter`); None where the format has none."""
    from pagoda.layers.moe.expert_codes import layer_takes_integers, random_group_codes
    from pagoda.layers.quantization.fp8 import random_float8_rows
    layout = config.dummy_expert_layout
    if config.float8_experts:
        return random_float8_rows
    if layout is None or stacked and not layer_takes_integers(layout, hidden, inter):
        return None
    return partial(random_group_codes, *layout)


def bind_embeddings(model: nn.Module, config: QuantizationConfig | None) -> None:
    """Let the format hold each vocabulary table in its own form: an embedding's that no LM
    head is tied to, one that an embedding and an LM head share, and an untied LM head's."""
    if config is None:
        return
    heads = {id(m.weight): m for m in model.modules() if isinstance(m, LMHead) and m.tied}
    for module in model.modules():
        if isinstance(module, LMHead) and not module.tied:
            config.bind_head(module)
        if not isinstance(module, VocabEmbedding):
            continue
        head = heads.get(id(module.weight))
        if head is None:
            config.bind_embedding(module)
        else:
            config.bind_tied_table(module, head)


def finish_linear_layers(model: nn.Module) -> dict[str, str]:
    """Let each linear method repack what it loaded, and run what a loader deferred to the
    end of loading (a tied table's kernel); returns the kernel each layer type (the last part
    of its name: qkv_proj, down_proj..., lm_head when a kernel holds it) runs on."""
    for module in list(model.modules()):
        after_loading = module.__dict__.pop("after_loading", None)  # what a loader deferred
        if after_loading is not None:
            after_loading()
    kernels: dict[str, dict[str, None]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LinearBase):
            module.method.process_weights_after_loading(module)
            leaf = name.rpartition(".")[2]
            kernels.setdefault(leaf, {})[module.method.kernel(module)] = None
        elif isinstance(module, FusedMoE) and module.holds_stacked_codes:
            kernels.setdefault("experts", {})[module.kernel_name] = None
        elif isinstance(module, FusedMoE) and module.expert_kernels is not None:
            found = kernels.setdefault("experts", {})
            for expert in module.expert_kernels:
                for kernel in expert:
                    found[_kernel_name(kernel)] = None
        elif isinstance(module, LMHead) and module.quantized is not None:
            kernels.setdefault("lm_head", {})[_kernel_name(module.quantized)] = None
    return {leaf: ", ".join(found) for leaf, found in kernels.items()}


def _kernel_name(kernel: nn.Module) -> str:
    name = getattr(kernel, "kernel_name", None)
    return name() if name is not None else "dense matmul"
