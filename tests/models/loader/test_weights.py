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


def test_quantized_experts_are_decoded_once_their_tensors_have_come():
    """A Mixtral expert's float8 weight after its scale, an input scale after the decode
    (dropped), an unquantized expert, and the tensors of other modules passing in order."""
    from pagoda.layers.quantization.fp8 import FP8, Fp8Config
    from pagoda.models.loader.weights import decoded_experts
    config = Fp8Config({"quant_method": "fp8", "activation_scheme": "static"})
    codes = torch.tensor([[1.0, -2.0], [0.5, 4.0]]).to(FP8)
    expert = "model.layers.0.block_sparse_moe.experts.1.w2"
    plain = torch.ones(2, 2)
    stream = [(f"{expert}.weight_scale", torch.tensor(0.5)),
              ("model.norm.weight", plain),
              (f"{expert}.weight", codes),
              (f"{expert}.input_scale", torch.tensor(2.0)),
              ("model.layers.0.mlp.experts.0.up_proj.weight", plain)]
    out = list(decoded_experts(stream, config))
    assert [name for name, _ in out] == ["model.norm.weight", f"{expert}.weight",
                                         "model.layers.0.mlp.experts.0.up_proj.weight"]
    torch.testing.assert_close(out[1][1], torch.tensor([[0.5, -1.0], [0.25, 2.0]]))
    assert out[2][1] is plain


def test_quantized_experts_lacking_a_tensor_at_the_end_are_refused():
    from pagoda.errors import UnsupportedModelError
    from pagoda.layers.quantization.int_checkpoints import AWQConfig
    from pagoda.models.loader.weights import decoded_experts
    config = AWQConfig({"bits": 4, "group_size": 128})
    stream = [("model.layers.2.mlp.experts.7.down_proj.qweight", torch.zeros(128, 16,
                                                                           dtype=torch.int32))]
    with pytest.raises(UnsupportedModelError, match=r"1 expert projections .* has only qweight"):
        list(decoded_experts(stream, config))
