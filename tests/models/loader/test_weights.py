"""Checkpoint names onto a model: a float8 KV cache's calibrated scales, as the formats name
them, go to their layer's attention module (query and probability scales are read and not
used); other tensors to their parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pagoda.layers.attention.backend import KVScales
from pagoda.layers.attention.layer import Attention
from pagoda.models.loader.weights import kv_scale_target, load_named_weights


@pytest.mark.parametrize("name, target", [
    ("model.layers.3.self_attn.k_scale", ("model.layers.3.self_attn", "k")),
    ("model.layers.3.self_attn.v_scale", ("model.layers.3.self_attn", "v")),
    ("model.layers.0.self_attn.k_proj.output_scale", ("model.layers.0.self_attn", "k")),
    ("model.layers.0.self_attn.v_proj.output_scale", ("model.layers.0.self_attn", "v")),
    ("model.layers.0.self_attn.kv_scale", ("model.layers.0.self_attn", "kv")),
    ("model.layers.0.self_attn.k_proj.k_scale", ("model.layers.0.self_attn", "k")),
    ("model.layers.0.self_attn.attn.v_scale", ("model.layers.0.self_attn", "v")),
    ("model.layers.1.self_attn.q_scale", ("model.layers.1.self_attn", "")),
    ("model.layers.1.self_attn.prob_scale", ("model.layers.1.self_attn", "")),
    ("model.layers.1.self_attn.k_proj.weight_scale", None),
    ("model.layers.1.self_attn.k_proj.weight", None),
    ("model.layers.1.mlp.down_proj.output_scale", None),
])
def test_kv_scale_names(name, target):
    assert kv_scale_target(name) == target


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.o_proj = nn.Linear(4, 4, bias=False)
        self.self_attn.attn = Attention(2, 1, 2, 0.5)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Layer(), Layer()])


def test_scales_load_into_their_layer_s_attention():
    model = Model()
    weight = torch.randn(4, 4)
    loaded = load_named_weights(model, [
        ("model.layers.0.self_attn.k_scale", torch.tensor(0.5)),
        ("model.layers.0.self_attn.v_scale", torch.tensor([2.0])),
        ("model.layers.0.self_attn.q_scale", torch.tensor(9.0)),
        ("model.layers.1.self_attn.kv_scale", torch.tensor(3.0)),
        ("model.layers.1.self_attn.o_proj.weight", weight)], {}, ())
    assert loaded == {"model.layers.1.self_attn.o_proj.weight"}
    assert model.model.layers[0].self_attn.attn.kv_scales == KVScales(0.5, 2.0)
    assert model.model.layers[1].self_attn.attn.kv_scales == KVScales(3.0, 3.0)
    assert torch.equal(model.model.layers[1].self_attn.o_proj.weight, weight)


def test_a_scale_of_a_layer_the_model_lacks_is_refused():
    with pytest.raises(KeyError, match="model.layers.7.self_attn.k_scale"):
        load_named_weights(Model(), [("model.layers.7.self_attn.k_scale", torch.tensor(1.0))],
                           {}, ())
