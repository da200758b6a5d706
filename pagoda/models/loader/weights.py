"""Walks a checkpoint's (name, tensor) pairs onto a model's parameters through each
parameter's `weight_loader`, mapping pieces of fused modules (q/k/v -> qkv_proj) and each
expert's projections onto the stacked expert weights of a mixture of experts (a quantized
checkpoint's experts decoded first); a float8 KV cache's calibrated scales go to their
layer's attention module."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from pagoda.errors import UnsupportedModelError
from pagoda.layers.attention.layer import Attention
from pagoda.layers.linear import default_weight_loader
from pagoda.layers.quantization.base import QuantizationConfig
from pagoda.logger import get_logger

logger = get_logger(__name__)

# one expert's projection: Qwen-style names, or Mixtral's w1 (gate), w3 (up), w2 (down)
EXPERT_WEIGHT = re.compile(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight")
# any tensor of one expert's projection (a quantized checkpoint's codes, scales, zeros...)
EXPERT_TENSOR = re.compile(r"(.*\.experts\.\d+\.(?:gate_proj|up_proj|down_proj|w1|w3|w2))"
                           r"\.(\w+)")
# every expert's one projection stacked on dim 0 (how GGUF files store experts)
STACKED_EXPERTS = re.compile(r"(.*\.experts)\.(gate_proj|up_proj|down_proj)\.weight")
GATE_UP_HALF = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1}
# a layer's KV cache scales, as checkpoints name them: compressed-tensors' (`k_scale`,
# `v_scale`; before, the projections' `output_scale`), ModelOpt's (`k_proj.k_scale`), the
# first FP8 checkpoints' one `kv_scale` for both, and vLLM's own (`attn.k_scale`). The
# query and probability scales (`q_scale`, `prob_scale`) are for float8 attention
# products, which pagoda does not run: read and not used.
KV_SCALE = re.compile(r"(.*\.self_attn)\.(?:attn\.)?(k_scale|v_scale|kv_scale|q_scale|prob_scale"
                      r"|k_proj\.output_scale|v_proj\.output_scale|q_proj\.output_scale"
                      r"|k_proj\.k_scale|v_proj\.v_scale)")
KV_SCALE_OF = {"k_scale": "k", "v_scale": "v", "kv_scale": "kv", "k_proj.output_scale": "k",
               "v_proj.output_scale": "v", "k_proj.k_scale": "k", "v_proj.v_scale": "v"}


def kv_scale_target(name: str) -> tuple[str, str] | None:
    """For a checkpoint's KV cache scale: its attention module's prefix and which scales it
    sets ("k", "v", "kv"; "" for a query or probability scale, not used)."""
    match = KV_SCALE.fullmatch(name)
    return None if match is None else (match[1], KV_SCALE_OF.get(match[2], ""))


def expert_target(name: str) -> tuple[str, int] | None:
    """A per-expert checkpoint tensor's stacked parameter and piece: gate_up_proj piece
    2 * expert (+ 1 for up), down_proj piece expert."""
    match = EXPERT_WEIGHT.fullmatch(name)
    if match is None:
        return None
    prefix, expert, projection = match[1], int(match[2]), match[3]
    if projection in GATE_UP_HALF:
        return f"{prefix}.gate_up_proj", 2 * expert + GATE_UP_HALF[projection]
    return f"{prefix}.down_proj", expert


def stacked_expert_target(name: str) -> str | None:
    """For every expert's one projection stacked in one tensor (GGUF): the stacked
    parameter its experts load into."""
    match = STACKED_EXPERTS.fullmatch(name)
    if match is None:
        return None
    return f"{match[1]}.{'gate_up_proj' if match[2] in GATE_UP_HALF else 'down_proj'}"


def split_stacked_experts(weights: Iterable[tuple[str, torch.Tensor]]
                          ) -> Iterator[tuple[str, torch.Tensor]]:
    """Each [experts, ...] stack of one projection as one tensor per expert (views)."""
    for name, tensor in weights:
        match = STACKED_EXPERTS.fullmatch(name)
        if match is None or tensor.dim() != 3:
            yield name, tensor
            continue
        for expert in range(tensor.shape[0]):
            yield f"{match[1]}.{expert}.{match[2]}.weight", tensor[expert]


def decoded_experts(weights: Iterable[tuple[str, Any]], config: QuantizationConfig,
                    as_codes: bool = False) -> Iterator[tuple[str, Any]]:
    """Each expert projection of a quantized checkpoint as one `weight`: floats decoded by
    `config`, or (`as_codes`) its codes for a kernel, once the tensors it needs have come
    (they may come in any order); the tensors it does not need that come after (an input
    scale, an unused g_idx) are dropped. An expert missing some at the end is an error.
    Other tensors pass as they are. Experts are decoded on the device being loaded onto (the
    default device while the model loads)."""
    decode = config.expert_codes if as_codes else config.decode_expert
    device = torch.empty(0).device
    waiting: dict[str, dict[str, torch.Tensor]] = {}
    done: set[str] = set()
    logged = False
    for name, tensor in weights:
        match = EXPERT_TENSOR.fullmatch(name)
        if match is None:
            yield name, tensor
            continue
        projection, leaf = match[1], match[2]
        if projection in done:
            continue
        tensors = waiting.setdefault(projection, {})
        tensors[leaf] = _read_onto(tensor, device)
        weight = decode(tensors)
        if weight is None:
            continue
        del waiting[projection]
        done.add(projection)
        if set(tensors) != {"weight"} and not logged and not as_codes:
            logged = True
            logger.info("%s experts decoded at load to %s (no kernel takes their codes; the "
                        "other linear layers keep theirs)", config.name,
                        str(torch.get_default_dtype()).removeprefix("torch."))
        yield f"{projection}.weight", weight
    if waiting:
        projection, tensors = next(iter(waiting.items()))
        raise UnsupportedModelError(f"{len(waiting)} expert projections of the checkpoint are "
                                    f"incomplete: {projection} has only "
                                    f"{', '.join(sorted(tensors))}")


def _read_onto(tensor: Any, device: torch.device) -> Any:
    """A tensor on `device` (a checkpoint slice read now); GGUF blocks as they are."""
    materialize = getattr(tensor, "materialize", None)
    if materialize is not None:
        tensor = materialize()
    return tensor.to(device) if isinstance(tensor, torch.Tensor) else tensor


def fused_target(name: str, packed: Mapping[str, tuple[str, ...]]) -> tuple[str, int | None]:
    """The parameter a checkpoint name loads into, and its piece index in a fused module."""
    expert = expert_target(name)
    if expert is not None:
        return expert
    for fused, pieces in packed.items():
        for index, piece in enumerate(pieces):
            fragment = f".{piece}."
            if fragment in name:
                return name.replace(fragment, f".{fused}."), index
    return name, None


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       packed: Mapping[str, tuple[str, ...]],
                       ignored: tuple[str, ...]) -> set[str]:
    """Load every tensor; returns the names filled. A tensor with no parameter is an error,
    except those `ignored` and an lm_head tied to the embedding."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    tied = {f"{name}.weight" for name, module in modules.items() if getattr(module, "tied", False)}
    loaded: set[str] = set()
    for name, tensor in weights:
        if name.endswith(ignored) or name in tied:
            continue
        scale = kv_scale_target(name)
        if scale is not None:
            _load_kv_scale(modules, name, tensor, *scale)
            continue
        target, piece = fused_target(name, packed)
        param = params.get(target)
        if param is None:
            raise KeyError(f"checkpoint tensor {name!r} has no place in the model")
        loader = getattr(param, "weight_loader", default_weight_loader)
        loader(param, tensor, piece)
        loaded |= _pieces(target, param) if piece is None else {f"{target}#{piece}"}
    return loaded


def _load_kv_scale(modules: Mapping[str, nn.Module], name: str, tensor: torch.Tensor,
                   prefix: str, which: str) -> None:
    """Set the scales `which` of the attention module under `prefix` from `tensor`."""
    holder = modules.get(prefix)
    attention = next((m for m in holder.modules() if isinstance(m, Attention)), None) \
        if holder is not None else None
    if attention is None:
        raise KeyError(f"checkpoint tensor {name!r} has no place in the model")
    for each in which:
        attention.load_kv_scale(each, tensor, name)


def _pieces(name: str, param: nn.Parameter) -> set[str]:
    """The names a whole tensor fills: every piece of a parameter loaded in pieces or whole
    (stacked experts), else the parameter."""
    count = getattr(param, "num_pieces", None)
    return {f"{name}#{i}" for i in range(count)} if count else {name}


def expected_weights(model: nn.Module) -> set[str]:
    """Every parameter name, a fused module's as one `name#index` per piece; tied heads none."""
    expected = set()
    for module_name, module in model.named_modules():
        if getattr(module, "tied", False):
            continue
        pieces = getattr(module, "num_shards", None)
        for param_name, param in module.named_parameters(recurse=False):
            if getattr(param, "optional", False):
                continue  # a checkpoint may hold it or not (GPTQ's g_idx)
            name = f"{module_name}.{param_name}"
            expected |= {f"{name}#{i}" for i in range(pieces)} if pieces else _pieces(name, param)
    return expected
