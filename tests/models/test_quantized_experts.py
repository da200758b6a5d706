"""Mixture-of-experts checkpoints in quantized formats (FP8 with block scales, as
Qwen3-30B-A3B-FP8 ships; AWQ; act-order GPTQ; compressed-tensors integers packed by the
library; a GGUF of Q4_0 and Q8_0 experts), written from random Qwen3-MoE models: the experts
are held as codes on a CPU kernel where the format allows (block-dot; float8 for FP8), else
decoded at load to the model's dtype, and compute the weights their tensors stand for; the
router stays unquantized; the next tokens are those of a float32 checkpoint holding those
weights, on one device or two tensor-parallel ranks. A float checkpoint's experts under
`--quantization fp8`, and dummy experts of a format, are its codes on CPU too. The estimate
counts the experts as the engine holds them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3MoeConfig

from pagoda import LLM, SamplingParams
from pagoda.errors import UnsupportedModelError
from pagoda.layers.linear import UnquantizedLinearMethod
from pagoda.layers.moe.layer import FusedMoE
from pagoda.layers.quantization import cpu_block_dot, cpu_fp8_dot
from pagoda.layers.quantization.cpu_block_dot import BlockDotWeight
from pagoda.layers.quantization.cpu_fp8_dot import Fp8DotWeight
from pagoda.models.estimate import estimate
from pagoda.models.loader.checkpoint import load_model, weight_bytes
from pagoda.models.source import resolve_model
from tests.layers.quantization.packers import awq_tensors, gptq_tensors, quantize
from tests.models.parity import random_prompts
from tests.models.test_quantized_checkpoints import (
    COMPRESSED_TENSORS,
    expand_blocks,
    fp8_blocks,
    greedy_and_weight_bytes,
    top_tokens,
    write_checkpoints,
    write_compressed_tensors,
)
from tests.utils import save_random_checkpoint

CONFIG = Qwen3MoeConfig(hidden_size=256, intermediate_size=384, moe_intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=64, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                        vocab_size=512, max_position_embeddings=256, initializer_range=0.2,
                        tie_word_embeddings=False)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT = ("gate_proj", "up_proj", "down_proj")
NUM_TOKENS = 24
# each format's quantization_config; every checkpoint but the FP8 one leaves the attention
# unquantized (the experts' tokens then depend on the decoding alone)
FORMATS = {
    "fp8": {"quant_method": "fp8", "activation_scheme": "dynamic",
            "weight_block_size": [128, 128]},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": ["self_attn"]},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True,
             "desc_act": True, "modules_to_not_convert": ["self_attn"]},
}


def pack(fmt: str, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One float32 weight in `fmt`: its tensors and the weight they stand for."""
    if fmt == "fp8":
        values, scale = fp8_blocks(weight)
        return {"weight": values, "weight_scale_inv": scale}, \
            values.float() * expand_blocks(scale)
    order = torch.randperm(weight.shape[1]) // 128 if fmt == "gptq" else None
    q = quantize(weight, 128, fmt == "gptq", order)
    return (awq_tensors if fmt == "awq" else gptq_tensors)(q), q.weights()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_random_checkpoint(CONFIG, tmp_path_factory.mktemp("moe") / "fp32", None)


def write(source, tmp_path, fmt: str):
    """The checkpoint in `fmt` and a float32 one of the weights it stands for."""
    torch.manual_seed(1)
    packed, reference = {}, {}
    for name, tensor in load_file(source / "model.safetensors").items():
        module, _, leaf = name.rpartition(".")
        projection = module.rpartition(".")[2]
        quantized = projection in EXPERT and ".experts." in name or \
            (fmt == "fp8" and projection in ATTENTION)
        if leaf == "weight" and quantized:
            tensors, reference[name] = pack(fmt, tensor.float())
            packed |= {f"{module}.{key}": value for key, value in tensors.items()}
        else:
            packed[name] = reference[name] = tensor
    assert any(".experts.3.down_proj.weight" in name for name in reference)
    quantized_dir, reference_dir = tmp_path / fmt, tmp_path / "reference"
    write_checkpoints(source, (quantized_dir, packed, FORMATS[fmt]),
                      (reference_dir, reference, None))
    return quantized_dir, reference_dir


def greedy(path, prompts: list[list[int]], **options) -> list[list[int]]:
    llm = LLM(str(path), kv_cache_memory=8 << 20, max_model_len=128, **options)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params)]


def loaded(path, quantization=None):
    source = resolve_model(str(path), "auto")
    return load_model(source, torch.float32, torch.device("cpu"), 128,
                      quantization=quantization)


def expert_weights(moe: FusedMoE) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's stacked gate-up and down weights as floats, however it holds them."""
    if moe.expert_kernels is None:
        return moe.gate_up_proj, moe.down_proj
    return tuple(torch.stack([held_weight(expert[i]) for expert in moe.expert_kernels])
                 for i in (0, 1))


def held_weight(kernel: torch.nn.Module) -> torch.Tensor:
    if isinstance(kernel, BlockDotWeight):
        return kernel.decoded_rows(torch.arange(kernel.out_features))
    if isinstance(kernel, Fp8DotWeight):  # one weight times one in each product: exact
        return kernel(torch.eye(kernel.in_features)).t()
    return kernel.weight


def held_as_codes(fmt: str) -> bool:
    """Whether `fmt`'s experts stay codes here: AWQ's on the block-dot kernel, FP8's on the
    float8 one (act-order GPTQ's are decoded)."""
    return {"awq": cpu_block_dot.available(), "fp8": cpu_fp8_dot.available()}.get(fmt, False)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_experts_hold_the_weights_they_stand_for(fmt, source, tmp_path):
    """AWQ's experts stay codes on the CPU block-dot kernel, FP8's float8 rows on the float8
    kernel, where they run; act-order GPTQ's are decoded at load. Either way each expert
    computes the weights its tensors stand for, and the router stays unquantized."""
    quantized_dir, reference_dir = write(source, tmp_path, fmt)
    ours, reference = loaded(quantized_dir, fmt), loaded(reference_dir)
    experts = [(name, m) for name, m in ours.named_modules() if isinstance(m, FusedMoE)]
    assert len(experts) == CONFIG.num_hidden_layers
    expected = dict(reference.named_parameters())
    for name, moe in experts:
        assert moe.holds_codes == held_as_codes(fmt)
        for held, param in zip(expert_weights(moe), ("gate_up_proj", "down_proj"),
                               strict=True):
            torch.testing.assert_close(held, expected[f"{name}.{param}"], rtol=1e-6,
                                       atol=1e-6)
    routers = [m for name, m in ours.named_modules() if name.endswith("mlp.gate")]
    assert routers and all(type(r.method) is UnquantizedLinearMethod for r in routers)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_next_tokens_agree_with_the_weights_they_stand_for(fmt, source, tmp_path):
    """The reference's greedy continuations scored by the quantized model: the same top
    token at every position where the experts were decoded (float32 products of the same
    weights), at >= 97 % of them where a CPU kernel holds their codes."""
    quantized_dir, reference_dir = write(source, tmp_path, fmt)
    prompts = random_prompts(CONFIG.vocab_size, (6, 21))
    continuations = greedy(reference_dir, prompts)
    sequences = [p + c for p, c in zip(prompts, continuations, strict=True)]
    ours = top_tokens(quantized_dir, sequences, fmt)
    agreed = sum(a == b for top, p, c in zip(ours, prompts, continuations, strict=True)
                 for a, b in zip(top[len(p) - 1:], c))
    rate = agreed / (len(prompts) * NUM_TOKENS)
    print(f"{fmt}: next-token agreement {rate:.3f}")
    assert rate >= 0.97 if held_as_codes(fmt) else rate == 1.0


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_the_estimate_counts_the_experts_as_the_engine_holds_them(fmt, source, tmp_path):
    quantized_dir, _ = write(source, tmp_path, fmt)
    model = loaded(quantized_dir, fmt)
    figures = estimate(resolve_model(str(quantized_dir), "auto"), 128, dtype="float32")
    assert figures.quantization == fmt
    assert figures.weight_bytes == weight_bytes(model)


def test_an_expert_missing_its_scale_is_one_clear_error(source, tmp_path):
    quantized_dir, _ = write(source, tmp_path, "fp8")
    tensors = load_file(quantized_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"]
    save_file(tensors, quantized_dir / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="experts.2.up_proj has only weight"):
        loaded(quantized_dir, "fp8")


def test_two_tensor_parallel_ranks_give_the_weights_tokens(source, tmp_path):
    """Each rank decodes every expert's tensors and keeps its slice of the intermediate
    size (the FP8 attention split as in a dense model): the tokens of the float32 weights
    the checkpoint stands for, each rank holding under 0.6x of them."""
    quantized_dir, reference_dir = write(source, tmp_path, "fp8")
    prompts = random_prompts(CONFIG.vocab_size, (6, 21))
    reference, reference_bytes = greedy_and_weight_bytes(reference_dir, prompts)
    two, two_bytes = greedy_and_weight_bytes(quantized_dir, prompts, tensor_parallel_size=2)
    assert two == reference
    assert two_bytes < 0.6 * reference_bytes


def write_qwen3moe_gguf(tmp_path) -> Path:
    """The GGUF test's random Qwen3-MoE with its experts in blocks, as a Q4_K_M file mixes
    them: gate and up Q4_0, down Q8_0 (the rest float32)."""
    from transformers import AutoModelForCausalLM

    from pagoda.models.arch.moe import QWEN3_MOE_BLOCK_NAMES
    from tests.models.test_gguf_architectures import QWEN3_MOE, stacked_experts, write_arch_gguf
    config = QWEN3_MOE
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = stacked_experts({k: v.detach() for k, v in model.state_dict().items()},
                            config.moe_intermediate_size)
    types = {f"blk.{layer}.ffn_{kind}_exps.weight": "Q8_0" if kind == "down" else "Q4_0"
             for layer in range(config.num_hidden_layers) for kind in ("gate", "up", "down")}

    def experts(writer):
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)

    return write_arch_gguf(tmp_path / "qwen3moe.gguf", config, "qwen3moe",
                           QWEN3_MOE_BLOCK_NAMES, state, experts, types)


@pytest.mark.skipif(not cpu_block_dot.available(), reason="the CPU block-dot kernel")
def test_a_gguf_s_experts_stay_in_their_blocks_codes_on_cpu(tmp_path):
    """Kept: each expert's gate and up in one 4-bit kernel, its down in an 8-bit one, each
    decoding to what the GGUF's blocks decode to (`--quantization none`, every tensor decoded
    at load), in a fraction of the memory the estimate counts; the next tokens agree at
    >= 97 %."""
    path = write_qwen3moe_gguf(tmp_path)
    kept, decoded = loaded(path, "gguf"), loaded(path)
    moes = [m for m in kept.modules() if isinstance(m, FusedMoE)]
    decoded_moes = [m for m in decoded.modules() if isinstance(m, FusedMoE)]
    assert len(moes) == 2 and all(m.holds_codes for m in moes)
    assert {(k[0].bits, k[1].bits) for m in moes for k in m.expert_kernels} == {(4, 8)}
    for moe, reference in zip(moes, decoded_moes, strict=True):
        for held, expected in zip(expert_weights(moe), expert_weights(reference), strict=True):
            torch.testing.assert_close(held, expected, rtol=1e-6, atol=1e-6)
    expert_bytes = sum(p.numel() * p.element_size() for m in moes for p in m.parameters())
    assert expert_bytes < 0.4 * sum(p.numel() * 4 for m in decoded_moes for p in m.parameters())
    source = resolve_model(str(path), "auto")
    assert estimate(source, 128, dtype="float32").weight_bytes == weight_bytes(kept)
    prompts = random_prompts(512, (6, 21))  # QWEN3_MOE's vocabulary
    continuations = greedy(path, prompts, quantization="none")
    sequences = [p + c for p, c in zip(prompts, continuations, strict=True)]
    ours = top_tokens(path, sequences, "gguf")
    agreed = sum(a == b for top, p, c in zip(ours, prompts, continuations, strict=True)
                 for a, b in zip(top[len(p) - 1:], c))
    assert agreed / (len(prompts) * NUM_TOKENS) >= 0.97


@pytest.mark.skipif(not cpu_fp8_dot.available(), reason="the float8 kernel is not built")
def test_float_experts_quantized_to_float8_rows_at_load_on_cpu(source):
    """`--quantization fp8` on a float32 checkpoint: each expert's projections are float8
    with a scale a row on the float8 kernel, bit for bit the dense layers' quantization of
    their weights, in a third of the floats' bytes; the estimate counts them so."""
    from pagoda.layers.quantization.fp8 import quantize_per_channel
    floats, held = loaded(source), loaded(source, "fp8")
    pairs = [[m for m in model.modules() if isinstance(m, FusedMoE)] for model in (floats, held)]
    for original, quantized in zip(*pairs, strict=True):
        assert quantized.holds_codes
        for expert, (gate_up, down) in enumerate(quantized.expert_kernels):
            assert isinstance(gate_up, Fp8DotWeight) and isinstance(down, Fp8DotWeight)
            values, scale = quantize_per_channel(original.down_proj[expert])
            assert torch.equal(held_weight(down), values.float() * scale)
    expert_bytes = sum(p.numel() * p.element_size() for moe in pairs[1]
                       for p in moe.parameters())
    assert expert_bytes < 0.3 * sum(p.numel() * 4 for moe in pairs[0] for p in moe.parameters())
    figures = estimate(resolve_model(str(source), "auto"), 128, dtype="float32",
                       quantization="fp8")
    assert figures.weight_bytes == weight_bytes(held)


@pytest.mark.parametrize(("fmt", "kernel"), [("awq", BlockDotWeight), ("fp8", Fp8DotWeight)])
def test_dummy_experts_are_the_format_codes_on_cpu(fmt, kernel, tmp_path):
    """A config alone (dummy weights), with AWQ's quantization_config or under
    `--quantization fp8`: every expert random codes on the format's CPU kernel (4-bit codes
    on the block-dot kernel; float8 rows), as the checkpoint's would be held, whose weights
    have the dummy weights' spread; the model generates."""
    if not (cpu_block_dot.available() if fmt == "awq" else cpu_fp8_dot.available()):
        pytest.skip(f"the {kernel.__name__} kernel is not built")
    stored = {"quantization_config": FORMATS["awq"]} if fmt == "awq" else {}
    (tmp_path / "config.json").write_text(json.dumps(CONFIG.to_dict() | stored))
    source = resolve_model(str(tmp_path), "dummy")
    model = load_model(source, torch.float32, torch.device("cpu"), 128, quantization=fmt)
    moes = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert len(moes) == 2 and all(m.holds_codes for m in moes)
    kernels = [k for m in moes for expert in m.expert_kernels for k in expert]
    assert len(kernels) == 2 * 2 * CONFIG.num_experts
    assert all(isinstance(k, kernel) for k in kernels)
    gate_up, down = expert_weights(moes[0])
    assert gate_up.shape == (CONFIG.num_experts, 2 * 128, 256)
    assert float(gate_up.std()) == pytest.approx(0.02, rel=0.1)
    assert abs(float(down.mean())) < 0.15 * float(down.std())  # (AWQ: codes 0-15 about 8)
    llm = LLM(str(tmp_path), load_format="dummy", kv_cache_memory=8 << 20, max_model_len=128,
              quantization=fmt)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}],
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8


def test_a_gguf_s_experts_held_as_floats_say_so_in_one_line(tmp_path, cpu_kernel):
    """Without the block-dot kernel the experts are decoded at load while the other layers
    keep their blocks (torch's int4 kernel): one log line names the experts' types."""
    from tests.utils import logged_messages
    path = write_qwen3moe_gguf(tmp_path)
    with logged_messages("pagoda.models.loader.checkpoint") as messages:
        model = loaded(path, "gguf")
    held_as_codes = [m.holds_codes for m in model.modules() if isinstance(m, FusedMoE)]
    lines = [m for m in messages if "experts decoded at load" in m]
    if cpu_kernel == "cpu_block_dot":
        assert all(held_as_codes) and not lines
    else:
        assert not any(held_as_codes)
        assert len(lines) == 1 and "GGUF Q4_0, Q8_0 experts decoded at load" in lines[0]


@pytest.mark.parametrize("scheme_name", sorted(COMPRESSED_TENSORS))
def test_compressed_tensors_experts_compressed_by_the_library(scheme_name, source, tmp_path):
    """W4A16, W8A16 and W8A8-int8 as llmcompressor writes them, every projection but the
    router: each expert computes the weights the library decompresses them to (held as
    codes where the block-dot kernel runs), the next tokens agree at >= 97 % and the estimate
    counts what the engine holds."""
    write_compressed_tensors(source, tmp_path / "ct", tmp_path / "reference", scheme_name)
    ours, reference = loaded(tmp_path / "ct", "compressed-tensors"), loaded(tmp_path / "reference")
    expected = dict(reference.named_parameters())
    for name, moe in ((n, m) for n, m in ours.named_modules() if isinstance(m, FusedMoE)):
        assert moe.holds_codes == cpu_block_dot.available()
        for held, param in zip(expert_weights(moe), ("gate_up_proj", "down_proj"),
                               strict=True):
            torch.testing.assert_close(held, expected[f"{name}.{param}"], rtol=1e-6,
                                       atol=1e-6)
    prompts = random_prompts(CONFIG.vocab_size, (6, 21))
    continuations = greedy(tmp_path / "reference", prompts)
    sequences = [p + c for p, c in zip(prompts, continuations, strict=True)]
    top = top_tokens(tmp_path / "ct", sequences, "compressed-tensors")
    agreed = sum(a == b for t, p, c in zip(top, prompts, continuations, strict=True)
                 for a, b in zip(t[len(p) - 1:], c))
    assert agreed >= 0.97 * len(prompts) * NUM_TOKENS
    figures = estimate(resolve_model(str(tmp_path / "ct"), "auto"), 128, dtype="float32")
    assert figures.weight_bytes == weight_bytes(ours)


def test_experts_packed_as_floats_beside_quantized_attention(tmp_path):
    """A checkpoint whose attention is FP8 and whose experts are floats packed as
    transformers 5 saves them: each expert's floats are taken as they are, and the tokens
    are the float32 weights' (the FP8 attention on the float8 kernel)."""
    source = save_random_checkpoint(CONFIG, tmp_path / "packed", None, original_format=False)
    tensors = load_file(source / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors
    packed, reference = {}, {}
    for name, tensor in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.rpartition(".")[2] in ATTENTION:
            stored, reference[name] = pack("fp8", tensor.float())
            packed |= {f"{module}.{key}": value for key, value in stored.items()}
        else:
            packed[name] = reference[name] = tensor
    write_checkpoints(source, (tmp_path / "fp8", packed, FORMATS["fp8"]),
                      (tmp_path / "reference", reference, None))
    model = loaded(tmp_path / "fp8", "fp8")
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert all(m.holds_codes == held_as_codes("fp8") for m in experts)
    prompts = random_prompts(CONFIG.vocab_size, (6, 21))
    assert greedy(tmp_path / "fp8", prompts) == greedy(tmp_path / "reference", prompts)
