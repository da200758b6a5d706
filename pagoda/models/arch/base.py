"""What pagoda knows about an architecture without building it (no torch): its HF names,
config defaults, GGUF layout, per-layer attention shape and parameter count."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pagoda.models.hf_config import HFConfig
    from pagoda.models.loader.gguf import GGUFMeta

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True, slots=True)
class LayerAttention:
    """One attention layer's KV shape: heads, head size and its window (None: full)."""

    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None


@dataclass(frozen=True, slots=True)
class GGUFLayout:
    """How a GGUF `general.architecture` maps onto an HF config and HF tensor names."""

    build_config: Callable[[GGUFMeta], HFConfig]
    global_names: Mapping[str, str]  # GGUF tensor stem -> HF module path
    block_names: Mapping[str, str]  # GGUF per-block stem -> HF module path under model.layers.N
    # (HF name, float32 array, config) -> the array in HF's layout
    transform: Callable[[str, np.ndarray, HFConfig], np.ndarray] = lambda name, w, config: w
    skipped: frozenset[str] = frozenset()  # tensors consumed by build_config, not parameters


@dataclass(frozen=True, slots=True)
class ExpertLayout:
    """A mixture-of-experts model's routed experts, for counting what a token reads."""

    moe_layers: int  # layers whose MLP is routed experts
    num_experts: int  # experts per MoE layer
    top_k: int  # experts each token runs per MoE layer
    params_per_expert: int  # gate, up and down of one expert

    @property
    def idle_parameters(self) -> int:
        """Expert parameters one token does not run (all layers)."""
        return self.moe_layers * (self.num_experts - self.top_k) * self.params_per_expert

    def experts_touched(self, batch: int) -> float:
        """Experts per MoE layer a batch of `batch` tokens runs, expected under uniform
        routing: E * (1 - (1 - k / E) ** batch); k for one token, E for large batches."""
        return self.num_experts * (1.0 - (1.0 - self.top_k / self.num_experts) ** batch)


@dataclass(frozen=True, slots=True)
class ArchSpec:
    """One architecture's declaration; the model class itself is imported only to build it."""

    architectures: tuple[str, ...]  # HF `architectures` names
    model_types: tuple[str, ...]  # HF `model_type` values
    model_class: str  # "module:Class" of the torch model
    count_parameters: Callable[[HFConfig], int]  # what the model allocates
    layer_attention: Callable[[HFConfig], list[LayerAttention]]
    config_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # fills derived fields of a raw config dict as transformers does (rope parameters,
    # layer_types); None: rope_theta and rope_scaling folded into rope_parameters
    complete_config: Callable[[dict[str, Any]], None] | None = None
    gguf: Mapping[str, GGUFLayout] = field(default_factory=dict)  # general.architecture -> layout
    ignored_weights: tuple[str, ...] = ("rotary_emb.inv_freq",)  # checkpoint tensors not kept
    # file name under pagoda/tokenizer/templates/ of the chat template a model of this
    # architecture gets when its tokenizer has none (None: such a model has no chat template)
    default_chat_template: str | None = None
    # the routed experts of a mixture-of-experts model (None: a dense model)
    experts: Callable[[HFConfig], ExpertLayout] | None = None

    def count_active_parameters(self, config: HFConfig) -> int:
        """Parameters one token runs: all but the experts the router did not pick."""
        total = self.count_parameters(config)
        return total if self.experts is None else total - self.experts(config).idle_parameters

    def load_class(self) -> type:
        """The torch model class (imports torch)."""
        module, _, name = self.model_class.partition(":")
        return getattr(importlib.import_module(module), name)

    def keeps_weight(self, name: str, config: HFConfig) -> bool:
        """Whether the model allocates a parameter for checkpoint tensor `name`."""
        if name.endswith(self.ignored_weights):
            return False
        return not (name == "lm_head.weight"
                    and bool(getattr(config, "tie_word_embeddings", False)))


def frozen(values: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(values))


def head_dim(config: HFConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_windows(config: HFConfig) -> list[int | None]:
    """Each layer's sliding window (None: full attention): as the config's `layer_types`
    say, else the config's `sliding_window` on every layer (Mistral)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        types = [SLIDING if window else FULL] * config.num_hidden_layers
    return [int(window) if kind == SLIDING and window else None for kind in types]


def uniform_layers(config: HFConfig) -> list[LayerAttention]:
    """Every layer with the config's KV heads and head size, windows from `layer_types`."""
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    return [LayerAttention(kv_heads, head_dim(config), window) for window in layer_windows(config)]


@dataclass(frozen=True, slots=True)
class DecoderShape:
    """The parameter-bearing parts of a pre-norm decoder layer, for counting."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norms_per_layer: int = 2


def decoder_parameters(config: HFConfig, shape: DecoderShape) -> int:
    """Parameters of an embedding + decoder layers (attention, gated MLP) + norm + LM head."""
    hidden, inter = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    dim = head_dim(config)
    q_out, kv_out = heads * dim, kv_heads * dim
    attention = hidden * (q_out + 2 * kv_out) + q_out * hidden
    attention += (q_out + 2 * kv_out) * shape.qkv_bias + hidden * shape.o_bias
    attention += 2 * dim * shape.qk_norm
    mlp = 3 * hidden * inter + (2 * inter + hidden) * shape.mlp_bias
    per_layer = attention + mlp + shape.norms_per_layer * hidden
    embeddings = config.vocab_size * hidden
    lm_head = 0 if getattr(config, "tie_word_embeddings", False) else embeddings
    return embeddings + config.num_hidden_layers * per_layer + hidden + lm_head
