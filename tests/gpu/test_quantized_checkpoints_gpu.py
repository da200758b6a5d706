"""Quantized checkpoints end to end on CUDA (their kernels: test_quantized_gpu.py).

- In float32: AWQ and act-order GPTQ checkpoints, GGUF files of five block types and FP8
  (block checkpoint, and at load on a bfloat16 model) agree with the weights they stand for.
- An FP8 block checkpoint on two ranks over NCCL gives one GPU's tokens, and an untied GGUF's
  Q8_0 embedding kept in blocks on the GPU gives the dequantized table's; its LM head in
  Q8_0 or Q4_0 multiplies its codes in the group kernel, as does a table tied to the LM head
  (its lookups decoding the rows looked up)."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.layers.linear import LinearBase
from pagoda.layers.quantization.group_gemm import FEW_TOKENS, FP8, GroupQuantWeight
from pagoda.models.estimate import estimate
from pagoda.models.source import resolve_model
from tests.gpu.test_quantized_gpu import relative_error
from tests.models.parity import random_prompts
from tests.models.test_gguf_quantized import (
    UNTIED,
    output_table,
    write_tied_gguf,
    write_typed_gguf,
    write_untied_gguf,
)
from tests.models.test_quantized_checkpoints import (
    COMPRESSED_TENSORS,
    CONFIG,
    FORMATS,
    write_compressed_tensors,
    write_fp8,
    write_quantized,
)
from tests.utils import save_random_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def engine(path, dtype: str = "float32", **options) -> LLM:
    return LLM(str(path), device="cuda", dtype=dtype, kv_cache_memory=256 << 20,
               max_model_len=256, **options)


def greedy(path, prompts, **options) -> list[list[int]]:
    llm = engine(path, **options)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
        return [o.outputs[0].token_ids for o in outputs]
    finally:
        llm.engine.core.shutdown()


def agreement(path, reference, prompts, **options) -> float:
    """How often the quantized model's top next token is the reference's, at each position
    the reference generated greedily (teacher-forced: one flip does not derail the rest)."""
    continuations = greedy(reference, prompts, dtype=options.get("dtype", "float32"))
    llm = engine(path, **options)
    try:
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
        outputs = llm.generate([{"prompt_token_ids": p + c}
                                for p, c in zip(prompts, continuations)], params)
    finally:
        llm.engine.core.shutdown()
    agreed = 0
    for out, prompt, continuation in zip(outputs, prompts, continuations):
        top = [next(t for t, lp in position.items() if lp.rank == 1)
               for position in out.prompt_logprobs[1:]]
        agreed += sum(a == b for a, b in zip(top[len(prompt) - 1:], continuation))
    return agreed / sum(len(c) for c in continuations)


def kernels_of(path, **options) -> set[str]:
    llm = engine(path, **options)
    try:
        model = llm.engine.core.executor.worker.runner.model
        return {type(m.method).__name__ + ":" + m.method.kernel(m)
                for m in model.modules() if isinstance(m, LinearBase)}
    finally:
        llm.engine.core.shutdown()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_random_checkpoint(CONFIG, tmp_path_factory.mktemp("tiny") / "fp32", None)


@pytest.mark.parametrize("fmt", ["awq", "gptq", "gptq-int8"])
def test_int_checkpoints_agree_with_their_weights(fmt, source, tmp_path, gpu_report):
    write_quantized(source, tmp_path / fmt, tmp_path / "reference", fmt)
    kernels = [k for k in kernels_of(tmp_path / fmt) if k.startswith("IntCheckpoint")]
    bits = FORMATS[fmt][0]["bits"]
    assert kernels and all(f"triton group gemm ({bits}-bit codes" in k for k in kernels)
    rate = agreement(tmp_path / fmt, tmp_path / "reference",
                     random_prompts(CONFIG.vocab_size, (7, 19, 40)))
    gpu_report(format=fmt, agreement=f"{rate:.3f}")
    assert rate >= 0.95


def test_awq_with_zero_points_in_planes_agrees_with_its_weights(source, tmp_path, monkeypatch,
                                                               gpu_report):
    from pagoda.layers.quantization import group_gemm as held
    monkeypatch.setattr(held, "ZERO_POINTS_IN_PLANES", True)
    write_quantized(source, tmp_path / "awq", tmp_path / "reference", "awq")
    kernels = [k for k in kernels_of(tmp_path / "awq") if k.startswith("IntCheckpoint")]
    assert kernels and all("in planes with zero points" in k for k in kernels)
    rate = agreement(tmp_path / "awq", tmp_path / "reference",
                     random_prompts(CONFIG.vocab_size, (7, 19, 40)))
    gpu_report(format="awq, zero points", agreement=f"{rate:.3f}")
    assert rate >= 0.95


@pytest.mark.parametrize("scheme_name", sorted(COMPRESSED_TENSORS))
def test_compressed_tensors_integers_agree_with_their_weights(scheme_name, source, tmp_path,
                                                             gpu_report):
    """W4A16, W8A16 and W8A8-int8 (weight-only) through the group kernel (the library
    itself writes them: `../shared/tools/device-wheels.sh compressed-tensors`)."""
    pytest.importorskip("compressed_tensors")
    write_compressed_tensors(source, tmp_path / "ct", tmp_path / "reference", scheme_name)
    rate = agreement(tmp_path / "ct", tmp_path / "reference",
                     random_prompts(CONFIG.vocab_size, (7, 19, 40)))
    gpu_report(format=scheme_name, agreement=f"{rate:.3f}")
    assert rate >= 0.95


def test_gguf_block_types_agree_with_their_dequantized_weights(tmp_path, gpu_report):
    path = write_typed_gguf(tmp_path / "typed.gguf")
    prompts = random_prompts(UNTIED.vocab_size, (7, 19, 40))
    kernels = kernels_of(path, quantization="gguf")
    assert any("4-bit" in k for k in kernels) and any("8-bit" in k for k in kernels)
    assert kernels_of(path) == kernels  # kept without the flag too
    dequantized = greedy(path, prompts, quantization="none")
    ours = greedy(path, prompts, quantization="gguf")
    matching = sum(a == b for x, y in zip(ours, dequantized) for a, b in zip(x, y))
    rate = matching / sum(len(x) for x in dequantized)
    gpu_report(format="gguf Q4_0/Q4_1/Q5_0/Q5_1/Q8_0", greedy_equal=f"{rate:.3f}")
    assert rate >= 0.9


def test_an_fp8_block_checkpoint_agrees_with_its_weights(source, tmp_path, gpu_report):
    write_fp8(source, tmp_path / "fp8", tmp_path / "reference")
    rate = agreement(tmp_path / "fp8", tmp_path / "reference",
                     random_prompts(CONFIG.vocab_size, (7, 19, 40)))
    gpu_report(format="fp8 blocks", agreement=f"{rate:.3f}")
    assert rate >= 0.95


def test_fp8_at_load_agrees_with_the_rounded_weights_in_bfloat16(source, tmp_path,
                                                                  gpu_report):
    """Steps of at most FEW_TOKENS tokens run the Triton kernel on the per-row rounded
    weights; the tensor-core path (longer calls, activations rounded to FP8 too) is what
    the layers report for calls past FEW_TOKENS tokens and is checked against the dense
    product above."""
    reference = write_rounded_per_row(source, tmp_path / "rounded")
    assert any("_scaled_mm" in k for k in kernels_of(source, dtype="bfloat16",
                                                      quantization="fp8"))
    # teacher-forced prompts of 23 and 35 tokens, prefilled in steps of at most FEW_TOKENS
    # (the few-token kernel's, not the tensor-core path's)
    rate = agreement(source, reference, random_prompts(CONFIG.vocab_size, (7, 19)),
                     dtype="bfloat16", quantization="fp8", max_num_batched_tokens=FEW_TOKENS)
    gpu_report(format="fp8 at load, bf16", agreement=f"{rate:.3f}")
    # 0.844 on the H200: the reference's rounded weights are rounded again to bfloat16 at
    # load (float8 times a float32 scale needs more bits), near-tied logits of a random
    # model flip with them; an unrelated model would agree almost nowhere
    assert rate >= 0.8


def write_rounded_per_row(source, directory):
    """`source` with each projection rounded to FP8 with a scale per row, as floats."""
    from safetensors.torch import load_file, save_file
    directory.mkdir()
    tensors = load_file(source / "model.safetensors")
    for name, tensor in tensors.items():
        if name.endswith("_proj.weight"):
            scale = tensor.float().abs().amax(1, keepdim=True) / 448
            tensors[name] = (tensor.float() / scale).to(FP8).float() * scale
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text((source / "config.json").read_text())
    return directory


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fp8_blocks_on_two_ranks_give_one_gpus_tokens(tmp_path):
    source = save_random_checkpoint(CONFIG, tmp_path / "fp32", None)
    write_fp8(source, tmp_path / "fp8", tmp_path / "reference")
    prompts = random_prompts(CONFIG.vocab_size, (7, 19, 40))
    assert greedy(tmp_path / "fp8", prompts, tensor_parallel_size=2) == \
        greedy(tmp_path / "fp8", prompts)


@pytest.mark.parametrize("head_type", ["Q8_0", "Q4_0"])
def test_an_untied_gguf_head_multiplies_its_codes_on_the_gpu(head_type, tmp_path, gpu_report):
    """The LM head of an untied GGUF whose output table is `head_type` keeps its blocks as
    the group kernel's codes: its logits against the table gguf-py decodes (float32
    activations, tf32 products in the few-token kernel), the estimate's bytes as held,
    greedy tokens as with the table decoded at load."""
    path = write_untied_gguf(tmp_path / "head.gguf", head_type)
    llm = engine(path, quantization="gguf")
    try:
        head = llm.engine.core.executor.worker.runner.model.lm_head
        assert isinstance(head.quantized, GroupQuantWeight)
        hidden = torch.randn(6, UNTIED.hidden_size, device="cuda")
        reference = hidden @ output_table(path).cuda().T
        error = relative_error(head(hidden), reference)
        held = llm.engine.model_info.weight_bytes
    finally:
        llm.engine.core.shutdown()
    figures = estimate(resolve_model(str(path)), 256, dtype="float32", device="cuda",
                       quantization="gguf")
    gpu_report(format=f"gguf {head_type} LM head", relative_error=f"{error:.1e}")
    assert error < 2e-3
    assert figures.weight_bytes == held
    prompts = random_prompts(UNTIED.vocab_size, (5, 17))
    assert greedy(path, prompts, quantization="gguf") == \
        greedy(path, prompts, quantization="none")


@pytest.mark.parametrize("table_type", ["Q8_0", "Q4_0"])
def test_a_tied_gguf_table_is_held_as_codes_on_the_gpu(table_type, tmp_path, gpu_report):
    """A GGUF whose LM head is tied to its `table_type` token_embd holds the table once, as
    the group kernel's codes: the head's logits and the embedding's lookups against the
    table gguf-py decodes, the estimate's bytes as held, greedy tokens as with the table
    decoded at load, in CUDA graphs (the engine's default) as eager."""
    path = write_tied_gguf(tmp_path / "tied.gguf", table_type)
    llm = engine(path, quantization="gguf")
    try:
        model = llm.engine.core.executor.worker.runner.model
        head, embedding = model.lm_head, model.model.embed_tokens
        assert isinstance(head.quantized, GroupQuantWeight)
        assert embedding.quantized is head.quantized and embedding.weight.numel() == 0
        hidden = torch.randn(6, UNTIED.hidden_size, device="cuda")
        head_error = relative_error(head(hidden), hidden @ output_table(path, TABLE).cuda().T)
        lookup_error = table_lookup_error(embedding, path)
        held = llm.engine.model_info.weight_bytes
    finally:
        llm.engine.core.shutdown()
    gpu_report(format=f"gguf tied {table_type} table", relative_error=f"{head_error:.1e}",
               lookup_error=f"{lookup_error:.1e}")
    assert head_error < 2e-3 and lookup_error < 1e-6
    assert estimated_bytes(path) == held
    prompts = random_prompts(UNTIED.vocab_size, (5, 17))
    tokens = greedy(path, prompts, quantization="gguf")
    assert tokens == greedy(path, prompts, quantization="none")
    assert tokens == greedy(path, prompts, quantization="gguf", enforce_eager=True)


@pytest.mark.parametrize("table_type", ["Q8_0", "Q4_0"])
def test_an_untied_gguf_table_is_held_as_codes_on_the_gpu(table_type, tmp_path, gpu_report):
    """An untied GGUF's `table_type` token_embd held as the group kernel's codes on the GPU
    (gguf.holds_untied_table), its lookups one launch (triton_rows): against the table
    gguf-py decodes, the estimate's bytes as held, greedy tokens as with the table decoded
    at load."""
    path = write_untied_gguf(tmp_path / "untied.gguf", table_type=table_type)
    llm = engine(path, quantization="gguf")
    try:
        embedding = llm.engine.core.executor.worker.runner.model.model.embed_tokens
        assert isinstance(embedding.quantized, GroupQuantWeight)
        assert embedding.weight.numel() == 0 and embedding.decode_rows is None
        lookup_error = table_lookup_error(embedding, path)
        held = llm.engine.model_info.weight_bytes
    finally:
        llm.engine.core.shutdown()
    gpu_report(format=f"gguf untied {table_type} table", lookup_error=f"{lookup_error:.1e}")
    assert lookup_error < 1e-6 and estimated_bytes(path) == held
    prompts = random_prompts(UNTIED.vocab_size, (5, 17))
    assert greedy(path, prompts, quantization="gguf") == \
        greedy(path, prompts, quantization="none")


TABLE = "token_embd.weight"


def table_lookup_error(embedding, path) -> float:
    """The relative error of `embedding`'s lookups (ids with repeats, the first and last
    rows) against the GGUF's token_embd as gguf-py decodes it."""
    ids = torch.tensor([[0, 7, UNTIED.vocab_size - 1], [7, 7, 1]], device="cuda")
    return relative_error(embedding(ids), output_table(path, TABLE).cuda()[ids])


def estimated_bytes(path) -> int:
    """The weight bytes `pagoda estimate` counts for the GGUF at `path` kept on a GPU."""
    return estimate(resolve_model(str(path)), 256, dtype="float32", device="cuda",
                    quantization="gguf").weight_bytes
