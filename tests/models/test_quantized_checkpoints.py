"""Tiny random Llama checkpoints packed as AWQ, as act-order GPTQ in 4 and 8 bits (packers
written from the formats' documentation), as compressed-tensors W4A16 and W8A16 (packed by
the library) and as FP8 with block scales, and a float32 one quantized to FP8 at load,
served by pagoda: tokens against the same model with the weights those tensors stand for,
saved as a float32 checkpoint (transformers cannot read these formats without their
kernels' packages); on two tensor-parallel ranks, one device's tokens (act-order GPTQ
refused)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from pagoda import LLM, SamplingParams
from pagoda.errors import UnsupportedModelError
from pagoda.layers.linear import LinearBase
from pagoda.layers.quantization.fp8 import FP8
from pagoda.models.estimate import estimate
from pagoda.models.loader.checkpoint import load_model, weight_bytes
from pagoda.models.source import resolve_model
from tests.layers.quantization.packers import awq_tensors, gptq_tensors, quantize
from tests.models.parity import random_prompts
from tests.utils import save_random_checkpoint

CONFIG = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                     max_position_embeddings=256, initializer_range=0.2,
                     tie_word_embeddings=False)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NUM_TOKENS = 32
FORMATS = {
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
             "version": "gemm"}, False, awq_tensors),
    "gptq": ({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True,
              "desc_act": True}, True, gptq_tensors),
    "gptq-int8": ({"quant_method": "gptq", "bits": 8, "group_size": 128, "sym": False,
                   "desc_act": True}, False, gptq_tensors),
}


def method(fmt: str) -> str:
    """The --quantization name of a FORMATS entry."""
    return FORMATS[fmt][0]["quant_method"] if fmt in FORMATS else fmt.split()[0]


def write_quantized(source, quantized_dir, reference_dir, fmt: str) -> None:
    """The checkpoint in `fmt` beside a float32 one holding the weights it stands for."""
    config, symmetric, pack = FORMATS[fmt]
    tensors = load_file(source / "model.safetensors")
    packed, reference, orders = {}, {}, {}
    torch.manual_seed(1)
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        parent, _, projection = module.rpartition(".")
        if name.endswith(".weight") and projection in PROJECTIONS:
            # act order: one input order per input (q, k, v share one; gate and up too)
            key = (parent, projection in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
            orders.setdefault(key, torch.randperm(tensor.shape[1]) // 128)
            q = quantize(tensor.float(), 128, symmetric,
                         orders[key] if method(fmt) == "gptq" else None, bits=config["bits"])
            packed |= {f"{module}.{key}": value for key, value in pack(q).items()}
            reference[name] = q.weights()
        else:
            packed[name] = reference[name] = tensor
    write_checkpoints(source, (quantized_dir, packed, config), (reference_dir, reference, None))


def write_checkpoints(source: Path, *checkpoints: tuple[Path, dict, dict | None]) -> None:
    """Each (directory, tensors, quantization_config or None) as a checkpoint with the
    config of `source`."""
    for directory, weights, quantization_config in checkpoints:
        directory.mkdir()
        save_file({k: v.contiguous() for k, v in weights.items()},
                  directory / "model.safetensors")
        values = json.loads((source / "config.json").read_text())
        if quantization_config is not None:
            values["quantization_config"] = quantization_config
        (directory / "config.json").write_text(json.dumps(values))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_random_checkpoint(CONFIG, tmp_path_factory.mktemp("tiny") / "fp32", None)


def greedy(path, prompts: list[list[int]], **options) -> list[list[int]]:
    llm = LLM(str(path), kv_cache_memory=8 << 20, max_model_len=128, **options)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params)]


def top_tokens(path, sequences: list[list[int]], fmt: str) -> list[list[int]]:
    """The most likely next token at every position of each sequence (teacher-forced)."""
    llm = LLM(str(path), kv_cache_memory=8 << 20, max_model_len=128, quantization=fmt)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": s} for s in sequences], params)
    return [[next(t for t, lp in position.items() if lp.rank == 1)
             for position in out.prompt_logprobs[1:]] for out in outputs]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_next_tokens_agree_with_the_weights_they_stand_for(fmt, source, tmp_path, cpu_kernel):
    """The reference's greedy continuations, scored by the quantized model: its top token at
    each of the NUM_TOKENS generated positions is the reference's at >= 90% of them on
    torch's path (a random model's logits are close to ties; bfloat16 activations in the
    int4 kernel flip a few: 0.953, 0.953, 1.0 for awq, gptq and gptq-int8 when written),
    >= 97% on the block-dot kernel (its two-pass activations: 1.0 for each when written)."""
    write_quantized(source, tmp_path / fmt, tmp_path / "reference", fmt)
    prompts = random_prompts(CONFIG.vocab_size, (7, 19))
    continuations = greedy(tmp_path / "reference", prompts)
    sequences = [p + c for p, c in zip(prompts, continuations)]
    ours = top_tokens(tmp_path / fmt, sequences, method(fmt))
    agreed = [sum(a == b for a, b in zip(top[len(p) - 1:], c))
              for top, p, c in zip(ours, prompts, continuations)]
    rate = sum(agreed) / (len(prompts) * NUM_TOKENS)
    print(f"{fmt}: next-token agreement {rate:.3f}")
    assert rate >= (0.97 if cpu_kernel == "cpu_block_dot" else 0.9)


def fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 weights and a scale per 128x128 block (block max / 448), as DeepSeek and
    Qwen3-FP8 checkpoints store them."""
    rows, columns = weight.shape
    blocks = weight.reshape(rows // 128, 128, columns // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3)) / 448
    values = (blocks / scale[:, None, :, None]).to(FP8).reshape(rows, columns)
    return values, scale


def expand_blocks(scale: torch.Tensor) -> torch.Tensor:
    return scale.repeat_interleave(128, 0).repeat_interleave(128, 1)


def write_fp8(source, quantized_dir, reference_dir) -> None:
    tensors = load_file(source / "model.safetensors")
    packed, reference = {}, {}
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rpartition(".")[2] in PROJECTIONS:
            values, scale = fp8_blocks(tensor.float())
            packed |= {name: values, f"{module}.weight_scale_inv": scale}
            reference[name] = values.float() * expand_blocks(scale)
        else:
            packed[name] = reference[name] = tensor
    config = {"quant_method": "fp8", "activation_scheme": "dynamic",
              "weight_block_size": [128, 128]}
    write_checkpoints(source, (quantized_dir, packed, config), (reference_dir, reference, None))


def test_an_fp8_block_checkpoint_gives_its_weights_tokens(source, tmp_path, fp8_cpu_kernel):
    """The weights are exactly the reference's and their products float32 (on the float8
    kernel, summed in another order): equal tokens."""
    write_fp8(source, tmp_path / "fp8", tmp_path / "reference")
    prompts = random_prompts(CONFIG.vocab_size, (7, 19))
    assert greedy(tmp_path / "fp8", prompts) == greedy(tmp_path / "reference", prompts)


def test_fp8_at_load_gives_the_per_channel_rounded_weights_tokens(source, tmp_path,
                                                                  fp8_cpu_kernel):
    reference = tmp_path / "reference"
    reference.mkdir()
    tensors = load_file(source / "model.safetensors")
    for name, tensor in tensors.items():
        if name.endswith(".weight") and name.removesuffix(".weight").rpartition(".")[2] \
                in PROJECTIONS:
            scale = tensor.float().abs().amax(1, keepdim=True) / 448
            tensors[name] = (tensor.float() / scale).to(FP8).float() * scale
    save_file(tensors, reference / "model.safetensors")
    (reference / "config.json").write_text((source / "config.json").read_text())
    prompts = random_prompts(CONFIG.vocab_size, (7, 19))
    assert greedy(source, prompts, quantization="fp8") == greedy(reference, prompts)


@pytest.mark.parametrize("fmt", ["awq", "gptq", "gptq-int8"])
def test_the_estimate_counts_the_bytes_the_engine_holds(fmt, source, tmp_path):
    check_the_estimate(fmt, source, tmp_path)


@pytest.mark.parametrize("fmt", ["fp8", "fp8 at load"])
def test_the_estimate_counts_float8_bytes_on_each_cpu_path(fmt, source, tmp_path,
                                                           fp8_cpu_kernel):
    check_the_estimate(fmt, source, tmp_path)


def check_the_estimate(fmt: str, source, tmp_path) -> None:
    """The estimate's weight bytes for `fmt` are the bytes the loaded model holds."""
    if fmt == "fp8":
        write_fp8(source, tmp_path / fmt, tmp_path / "reference")
    elif fmt in FORMATS:
        write_quantized(source, tmp_path / fmt, tmp_path / "reference", fmt)
    path, flag = (source, "fp8") if fmt == "fp8 at load" else (tmp_path / fmt, None)
    expected = estimate(resolve_model(str(path)), 128, quantization=flag)
    assert expected.quantization == method(fmt)
    model = load_model(resolve_model(str(path)), torch.float32, torch.device("cpu"), 128,
                       quantization=method(fmt))
    assert expected.weight_bytes == weight_bytes(model)
    assert expected.num_parameters == sum(p.numel() for p in source_model_params(source))


def source_model_params(source):
    return load_file(source / "model.safetensors").values()


@pytest.mark.parametrize("fmt", ["awq", "fp8"])
def test_two_tensor_parallel_ranks_give_one_devices_tokens(fmt, source, tmp_path, cpu_kernel):
    """Each rank reads its slice of the packed tensors (k and v: half a block of FP8 scales
    each; o_proj and down_proj: whole groups of int4 inputs) and the tokens are one device's."""
    if fmt == "fp8":
        write_fp8(source, tmp_path / fmt, tmp_path / "reference")
    else:
        write_quantized(source, tmp_path / fmt, tmp_path / "reference", fmt)
    prompts = random_prompts(CONFIG.vocab_size, (7, 19))
    one, one_bytes = greedy_and_weight_bytes(tmp_path / fmt, prompts)
    two, two_bytes = greedy_and_weight_bytes(tmp_path / fmt, prompts, tensor_parallel_size=2)
    assert two == one
    assert two_bytes < 0.6 * one_bytes  # a rank holds its half (norms whole)


def greedy_and_weight_bytes(path, prompts: list[list[int]], **options
                            ) -> tuple[list[list[int]], int]:
    llm = LLM(str(path), kv_cache_memory=8 << 20, max_model_len=128, **options)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        return [o.outputs[0].token_ids for o in outputs], llm.engine.model_info.weight_bytes
    finally:
        llm.engine.core.shutdown()


def test_act_order_gptq_on_two_ranks_is_refused_in_one_line(source, tmp_path):
    """o_proj and down_proj split their inputs, which act order scatters over every group."""
    write_quantized(source, tmp_path / "gptq", tmp_path / "reference", "gptq")
    with pytest.raises(UnsupportedModelError, match="^gptq act-order .* row-parallel layer"):
        LLM(str(tmp_path / "gptq"), kv_cache_memory=8 << 20, max_model_len=128,
            tensor_parallel_size=2)


@pytest.mark.parametrize("fmt, kernel, levels", [
    ("awq", "int4pack_mm_for_cpu", 16),
    ("gptq-int8", "8-bit codes decoded at load (dense matmul)", 256)])
def test_dummy_weights_of_an_integer_config_are_its_codes(fmt, kernel, levels, tmp_path,
                                                          torch_cpu_kernels):
    """Benchmarks of a quantized format with no checkpoint: an AWQ (GPTQ-Int8) config with
    `--load-format dummy` holds random 4-bit codes (byte codes, decoded at load on torch's
    CPU path: up to 256 values a group) (a float config gets floats)."""
    CONFIG.save_pretrained(tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    values["quantization_config"] = FORMATS[fmt][0]
    (tmp_path / "config.json").write_text(json.dumps(values))
    llm = LLM(str(tmp_path), load_format="dummy", kv_cache_memory=8 << 20, max_model_len=128)
    model = llm.engine.core.executor.worker.runner.model
    layers = [m for m in model.modules() if isinstance(m, LinearBase)]
    assert {m.method.kernel(m) for m in layers} == {kernel}
    if levels > 16:
        group = layers[0].quantized.weight[0, :128]  # one group of a row: one scale and min
        assert 16 < group.unique().numel() <= levels
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert len(llm.generate([{"prompt_token_ids": [1, 2, 3]}], params)[0].outputs[0].token_ids) == 4


# scheme -> (bits, format, strategy, group); W8A8 runs its int8 weights weight-only
COMPRESSED_TENSORS = {"w4a16": (4, "pack-quantized", "group", 128),
                      "w8a16": (8, "pack-quantized", "group", 128),
                      "w8a8-int8": (8, "int-quantized", "channel", None)}


def write_compressed_tensors(source, quantized_dir, reference_dir, scheme_name: str) -> None:
    """compressed-tensors integer weights (symmetric; COMPRESSED_TENSORS' bits, format and
    scales) compressed by the library itself, beside the float32 weights it decompresses
    them to."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams
    bits, fmt, strategy, group = COMPRESSED_TENSORS[scheme_name]
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy=strategy,
                            group_size=group)
    activations = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token",
                                   dynamic=True) if fmt == "int-quantized" else None
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=activations)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    packed, reference = {}, {}
    for name, tensor in load_file(source / "model.safetensors").items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rpartition(".")[2] in PROJECTIONS:
            groups = tensor.float().reshape(tensor.shape[0], -1, group or tensor.shape[1])
            scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
            stored = compressor.compress(
                {"weight": tensor.float(), "weight_scale": scale, "weight_zero_point": zero},
                scheme)
            packed |= {f"{module}.{key}": value for key, value in stored.items()}
            reference[name] = compressor.decompress(dict(stored), scheme)["weight"]
        else:
            packed[name] = reference[name] = tensor
    config = {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
              "config_groups": {"group_0": {
                  "targets": ["Linear"], "format": fmt, "weights": args.model_dump(),
                  "input_activations": activations.model_dump() if activations else None}}}
    write_checkpoints(source, (quantized_dir, packed, config), (reference_dir, reference, None))


@pytest.mark.parametrize("scheme_name", sorted(COMPRESSED_TENSORS))
def test_a_compressed_tensors_integer_checkpoint_is_served_and_estimated(scheme_name, source,
                                                                         tmp_path, cpu_kernel):
    """W4A16, W8A16 and W8A8-int8 as llmcompressor writes them: the next tokens of the
    weights they stand for (the same greedy tokens on the block-dot kernel, and for 8 bits
    decoded at load to float32 on torch's path; >= 90% for torch's int4 kernel), and the
    estimate counts the parameters and bytes the engine holds."""
    bits = COMPRESSED_TENSORS[scheme_name][0]
    write_compressed_tensors(source, tmp_path / "ct", tmp_path / "reference", scheme_name)
    prompts = random_prompts(CONFIG.vocab_size, (7, 19))
    continuations = greedy(tmp_path / "reference", prompts)
    sequences = [p + c for p, c in zip(prompts, continuations)]
    ours = top_tokens(tmp_path / "ct", sequences, "compressed-tensors")
    agreed = sum(a == b for top, p, c in zip(ours, prompts, continuations)
                 for a, b in zip(top[len(p) - 1:], c))
    exact = bits == 8 or cpu_kernel == "cpu_block_dot"
    assert agreed >= (1.0 if exact else 0.9) * len(prompts) * NUM_TOKENS
    expected = estimate(resolve_model(str(tmp_path / "ct")), 128)
    model = load_model(resolve_model(str(tmp_path / "ct")), torch.float32, torch.device("cpu"),
                       128, quantization="compressed-tensors")
    assert expected.weight_bytes == weight_bytes(model)
    assert expected.num_parameters == sum(p.numel() for p in source_model_params(source))


def test_w8a8_int8_on_two_tensor_parallel_ranks_gives_one_devices_tokens(source, tmp_path,
                                                                         cpu_kernel):
    """A scale per output row: column-parallel ranks keep their rows' scales, row-parallel
    ones every row's scale with their half of the inputs' codes."""
    write_compressed_tensors(source, tmp_path / "ct", tmp_path / "reference", "w8a8-int8")
    prompts = random_prompts(CONFIG.vocab_size, (7, 19))
    one, one_bytes = greedy_and_weight_bytes(tmp_path / "ct", prompts)
    two, two_bytes = greedy_and_weight_bytes(tmp_path / "ct", prompts, tensor_parallel_size=2)
    assert two == one
    assert two_bytes < 0.6 * one_bytes
