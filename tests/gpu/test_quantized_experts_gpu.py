"""Quantized mixture-of-experts checkpoints on the GPU (the random Qwen3-MoE models of
tests/models/test_quantized_experts.py): their experts stay codes, stacked for the fused MoE
kernel (an FP8 checkpoint's float8 values; AWQ's, compressed-tensors' and a GGUF's integer
codes; a float checkpoint's experts quantized to float8 by `--quantization fp8`), the startup
log naming them and the estimate counting them; act-order GPTQ's are decoded at load (one
log line). Either way the experts compute the weights their tensors stand for."""

from __future__ import annotations

import pytest
import torch

from pagoda.layers.moe.layer import FusedMoE
from pagoda.models.estimate import estimate
from pagoda.models.loader.checkpoint import load_model, weight_bytes
from pagoda.models.source import resolve_model
from tests.models.parity import random_prompts
from tests.models.test_quantized_checkpoints import (
    COMPRESSED_TENSORS,
    top_tokens,
    write_compressed_tensors,
)
from tests.models.test_quantized_experts import (
    CONFIG,
    NUM_TOKENS,
    greedy,
    source,  # noqa: F401 (a fixture)
    write,
    write_qwen3moe_gguf,
)
from tests.utils import logged_messages


def loaded_on_the_gpu(path, quantization: str | None) -> tuple[torch.nn.Module, list[str]]:
    with logged_messages("pagoda") as messages:
        model = load_model(resolve_model(str(path), "auto"), torch.float32,
                           torch.device("cuda"), 128, quantization=quantization)
    return model, messages


def check_experts_as_codes(path, quantization: str, kernel: str) -> None:
    """Loaded on the GPU: every layer's experts stacked codes, the startup log's `experts:`
    naming `kernel`, no line about decoding, the estimate's bytes the engine's."""
    model, messages = loaded_on_the_gpu(path, quantization)
    moes = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert moes and all(m.holds_stacked_codes for m in moes)
    for moe in moes:
        assert all(codes.codes.is_cuda for codes in moe.stacked_experts())
    assert any(f"experts: {kernel} on the fused MoE kernel" in m for m in messages), messages
    assert not [m for m in messages if "decoded at load" in m or "held as floats" in m]
    figures = estimate(resolve_model(str(path), "auto"), 128, dtype="float32", device="cuda",
                       quantization=quantization)
    assert figures.weight_bytes == weight_bytes(model)


def agreement(quantized, reference, quantization: str, vocab_size: int) -> float:
    """The reference's greedy continuations scored by the quantized model on the GPU: the
    share of positions where its top token is the reference's."""
    prompts = random_prompts(vocab_size, (6, 21))
    continuations = greedy(reference, prompts)
    sequences = [p + c for p, c in zip(prompts, continuations, strict=True)]
    ours = top_tokens(quantized, sequences, quantization)
    agreed = sum(a == b for top, p, c in zip(ours, prompts, continuations, strict=True)
                 for a, b in zip(top[len(p) - 1:], c))
    return agreed / (len(prompts) * NUM_TOKENS)


# each format's experts as the startup log names them (the test model: hidden 256, experts
# of 128; AWQ and GPTQ in groups of 128, FP8 in blocks of 128 x 128)
KERNELS = {"fp8": "float8 weights", "awq": "4-bit codes in groups of 128"}


# (format, its experts' float8 products on FP8 tensor cores) -> the bar of next-token
# agreement with the float32 weights
AGREEMENT_BARS = {("awq", False): 0.9, ("fp8", False): 0.9, ("fp8", True): 0.85}


@pytest.mark.parametrize(("fmt", "tensor_cores"), sorted(AGREEMENT_BARS), ids=str)
def test_experts_stay_codes_and_agree_with_the_reference(fmt, tensor_cores, source,  # noqa: F811
                                                         tmp_path, gpu_report, monkeypatch):
    """FP8 with block scales (Qwen3-30B-A3B-FP8's layout, its attention FP8 too) and AWQ:
    >= 90 % of next tokens agree with the float32 weights they stand for; FP8's experts on
    FP8 tensor cores (the default: the activations in float8 too, a scale a row and 128
    inputs, as the format's dynamic activations are) >= 85 %: float8's 3 mantissa bits flip
    near-ties of a random model's logits (on an H200 when written: 0.896, and 1.000
    weight-only)."""
    from pagoda.layers.moe import triton_moe
    monkeypatch.setattr(triton_moe, "FP8_TENSOR_CORES_FROM", 1 if tensor_cores else None)
    quantized_dir, reference_dir = write(source, tmp_path, fmt)
    check_experts_as_codes(quantized_dir, fmt, KERNELS[fmt])
    rate = agreement(quantized_dir, reference_dir, fmt, CONFIG.vocab_size)
    gpu_report(format=f"{fmt}{' tensor cores' if tensor_cores else ''}", agreement=rate)
    assert rate >= AGREEMENT_BARS[fmt, tensor_cores]


def test_act_order_experts_are_decoded_and_give_the_reference_tokens(source, tmp_path,  # noqa: F811
                                                                     gpu_report):
    """Act-order GPTQ (its inputs permuted by g_idx, which the kernel's groups cannot
    follow): decoded at load on the GPU, exactly, so the greedy tokens are the float32
    reference's."""
    quantized_dir, reference_dir = write(source, tmp_path, "gptq")
    model, messages = loaded_on_the_gpu(quantized_dir, "gptq")
    moes = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert moes and not any(m.holds_stacked_codes for m in moes)
    assert all(m.gate_up_proj.is_cuda and m.gate_up_proj.dtype == torch.float32 for m in moes)
    assert len([m for m in messages if "experts decoded at load" in m]) == 1, messages
    prompts = random_prompts(CONFIG.vocab_size, (6, 21))
    ours = greedy(quantized_dir, prompts, quantization="gptq")
    expected = greedy(reference_dir, prompts)
    gpu_report(format="gptq act order", equal=ours == expected)
    assert ours == expected


def test_float_experts_quantized_to_float8_at_load(source, gpu_report):  # noqa: F811
    """`--quantization fp8` on the float32 checkpoint: its experts become float8 with the
    dense layers' per-channel quantization of their weights, bit for bit. Next tokens
    against the float32 weights (recorded, not a bound: every linear layer is rounded to
    float8 here, and products of more than 32 tokens also round the activations)."""
    from pagoda.layers.quantization.fp8 import quantize_per_channel
    check_experts_as_codes(source, "fp8", "float8 weights")
    floats, _ = loaded_on_the_gpu(source, None)
    held, _ = loaded_on_the_gpu(source, "fp8")
    moes = [[m for m in model.modules() if isinstance(m, FusedMoE)] for model in (floats, held)]
    for original, quantized in zip(*moes, strict=True):
        for weights, codes in zip((original.gate_up_proj, original.down_proj),
                                  quantized.stacked_experts(), strict=True):
            values, scale = quantize_per_channel(weights[1])
            assert torch.equal(codes.codes[1].view(torch.uint8), values.view(torch.uint8))
            assert torch.equal(codes.scale[1], scale)
    gpu_report(format="fp8 at load", agreement=agreement(source, source, "fp8",
                                                         CONFIG.vocab_size))


def test_dummy_float8_experts_serve(source):  # noqa: F811
    """An FP8 config with dummy weights (as the benchmarks load): its experts are float8
    too, and the engine generates."""
    from pagoda import LLM, SamplingParams
    with logged_messages("pagoda") as messages:
        model = load_model(resolve_model(str(source), "dummy"), torch.bfloat16,
                           torch.device("cuda"), 128, quantization="fp8")
    assert all(m.holds_stacked_codes for m in model.modules() if isinstance(m, FusedMoE))
    assert any("experts: float8 weights on the fused MoE kernel" in m for m in messages)
    llm = LLM(str(source), load_format="dummy", quantization="fp8", kv_cache_memory=8 << 20,
              max_model_len=128, dtype="bfloat16")
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}],
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("scheme_name", sorted(COMPRESSED_TENSORS))
def test_compressed_tensors_experts_stay_codes(scheme_name, source, tmp_path,  # noqa: F811
                                              gpu_report):
    """llmcompressor's integer schemes on every projection but the router (4-bit in groups,
    8-bit in groups or a scale a row): stacked codes; >= 90 % of next tokens agree."""
    pytest.importorskip("compressed_tensors")
    write_compressed_tensors(source, tmp_path / "ct", tmp_path / "reference", scheme_name)
    model, messages = loaded_on_the_gpu(tmp_path / "ct", "compressed-tensors")
    assert all(m.holds_stacked_codes for m in model.modules() if isinstance(m, FusedMoE))
    assert not [m for m in messages if "decoded at load" in m or "held as floats" in m]
    rate = agreement(tmp_path / "ct", tmp_path / "reference", "compressed-tensors",
                     CONFIG.vocab_size)
    gpu_report(format=scheme_name, agreement=rate)
    assert rate >= 0.9


def test_gguf_experts_stay_in_codes_and_agree_with_the_decoded_file(tmp_path, gpu_report):
    """A GGUF's Q4_0 gate and up and Q8_0 down experts (its other tensors float32): 4-bit
    and 8-bit codes in groups of 32; >= 97 % of next tokens agree with the file decoded
    whole at load (`--quantization none`)."""
    path = write_qwen3moe_gguf(tmp_path)
    check_experts_as_codes(path, "gguf", "4-bit codes in groups of 32 (gate-up), 8-bit codes "
                                         "in groups of 32 (down)")
    prompts = random_prompts(512, (6, 21))  # the GGUF model's vocabulary
    continuations = greedy(path, prompts, quantization="none")
    sequences = [p + c for p, c in zip(prompts, continuations, strict=True)]
    ours = top_tokens(path, sequences, "gguf")
    agreed = sum(a == b for top, p, c in zip(ours, prompts, continuations, strict=True)
                 for a, b in zip(top[len(p) - 1:], c))
    rate = agreed / (len(prompts) * NUM_TOKENS)
    gpu_report(format="gguf", agreement=rate)
    assert rate >= 0.97


@pytest.mark.parametrize(("base", "quantization"), [("qwen3-30b-a3b-awq", "awq"),
                                                    ("qwen3-30b-a3b", "fp8")])
def test_dummy_experts_take_the_format_codes_as_the_estimate_counts(base, quantization,
                                                                   tmp_path):
    """A config alone (dummy weights) on the GPU: AWQ's experts 4-bit codes, --quantization
    fp8's float8, made as codes (the load's peak within 4 MiB and 50 % of the weights it
    holds: 14.8 MB for AWQ's 9.6 on an H100; bf16 experts quantized once loaded would peak
    at 2.5-4x), and the estimate within 0.5 % of the engine's bytes (norms and routers
    counted as codes)."""
    from tests.models.test_estimate import small_config
    path = small_config(base, tmp_path / base, hidden_size=512, moe_intermediate_size=256,
                        num_experts=16, num_attention_heads=4, num_key_value_heads=2)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = load_model(resolve_model(path, "dummy"), torch.bfloat16, torch.device("cuda"), 128,
                       quantization=quantization)
    moes = [m for m in model.modules() if isinstance(m, FusedMoE)]
    assert moes and all(m.holds_stacked_codes for m in moes)
    peak = torch.cuda.max_memory_allocated() - before
    assert peak <= 1.5 * weight_bytes(model) + (4 << 20), (peak, weight_bytes(model))
    figures = estimate(resolve_model(path, "dummy"), 128, dtype="bfloat16", device="cuda",
                       quantization=quantization)
    assert figures.weight_bytes == pytest.approx(weight_bytes(model), rel=0.005)
