"""`pagoda estimate`: weights counted from the safetensors or GGUF headers (never the tensor
data) and KV from the config equal what the engine then allocates; fit verdicts and the
command line."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, MistralConfig

from pagoda import LLM
from pagoda.cli.main import main
from pagoda.errors import ConfigError
from pagoda.layers.quantization import cpu_fp8_dot
from pagoda.models.estimate import MemoryEstimate, estimate
from pagoda.models.loader import gguf as gguf_loader
from pagoda.models.loader.checkpoint import weight_bytes
from pagoda.models.registry import arch_spec
from pagoda.models.source import resolve_model
from tests.utils import save_random_checkpoint

GIB = 1 << 30


def allocated(llm: LLM) -> tuple[int, int]:
    runner = llm.engine.core.executor.worker.runner
    kv = runner.kv_cache
    return weight_bytes(runner.model), kv.numel() * kv.element_size()


def check_matches(spec: str, **engine_kwargs) -> MemoryEstimate:
    """The engine allocates exactly the estimated weights and (within 5%) the estimated KV."""
    source = resolve_model(spec, engine_kwargs.get("load_format", "auto"))
    e = estimate(source, max_model_len=256, concurrency=3)
    llm = LLM(spec, kv_cache_memory=e.kv_bytes, max_model_len=256, **engine_kwargs)
    weights, kv = allocated(llm)
    assert weights == e.weight_bytes
    assert kv == pytest.approx(e.kv_bytes, rel=0.05)
    assert llm.engine.core.model_info.kv_capacity_tokens >= 3 * 256
    return e


def check_header_agrees_with_config(spec: str, weights_from: str) -> None:
    source = resolve_model(spec)
    e = estimate(source, max_model_len=256)
    assert e.weights_from == weights_from
    assert e.num_parameters == arch_spec(source.hf_config).count_parameters(source.hf_config)


def tiny_llama(tied: bool) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                       max_position_embeddings=512, tie_word_embeddings=tied)


def header_length(path: Path) -> int:
    with path.open("rb") as file:
        return struct.unpack("<Q", file.read(8))[0]


def test_smollm2_estimate_matches_the_engine(smollm2_dir):
    assert check_matches(str(smollm2_dir)).weights_from == "gguf header"
    check_header_agrees_with_config(str(smollm2_dir), "gguf header")


def test_gguf_estimate_dequantizes_nothing(smollm2_dir, monkeypatch):
    # the estimate reports this machine's free RAM, which moves between two calls: hold it
    monkeypatch.setattr("pagoda.runner.memory.available_host_memory", lambda: 8 * GIB)
    source = resolve_model(str(smollm2_dir))
    expected = estimate(source, max_model_len=256)

    def refuse(*args, **kwargs):
        raise AssertionError("the estimate read GGUF tensor data")

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    monkeypatch.setattr(gguf_loader, "dequantize", refuse)
    assert estimate(source, max_model_len=256) == expected


def test_a_gguf_on_a_gpu_counts_its_blocks_unless_decoded_at_load(smollm2_dir):
    source = resolve_model(str(smollm2_dir))
    kept = estimate(source, max_model_len=256, device="H100")
    decoded = estimate(source, max_model_len=256, device="H100", quantization="none")
    assert kept.quantization == "gguf" and decoded.quantization is None
    # the linear layers' Q4_1 blocks against bfloat16 (the table tied to the LM head stays
    # bfloat16 on a GPU either way)
    assert kept.weight_bytes < decoded.weight_bytes / 2


def test_untied_gqa_checkpoint_with_head_dim_matches_the_engine(tmp_path):
    config = MistralConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                           vocab_size=300, max_position_embeddings=512,
                           tie_word_embeddings=False)
    spec = str(save_random_checkpoint(config, tmp_path, None))
    assert check_matches(spec).weights_from == "safetensors header"
    check_header_agrees_with_config(spec, "safetensors header")


def test_safetensors_estimate_reads_only_the_headers(tmp_path):
    spec = str(save_random_checkpoint(tiny_llama(tied=False), tmp_path, None))
    full = estimate(resolve_model(spec), max_model_len=512, concurrency=2)
    assert full.weights_from == "safetensors header"
    for path in tmp_path.glob("*.safetensors"):
        size = path.stat().st_size
        with path.open("r+b") as file:
            file.truncate(8 + header_length(path))
        assert path.stat().st_size < size
    again = estimate(resolve_model(spec), max_model_len=512, concurrency=2)
    moving = ("device_bytes", "usable_bytes")  # this machine's available RAM, now
    assert {k: v for k, v in again.to_json().items() if k not in moving} == \
        {k: v for k, v in full.to_json().items() if k not in moving}


def test_sharded_checkpoint_counts_only_the_parameters_the_engine_keeps(tmp_path):
    """Two shards named by an index; a duplicate lm_head of tied embeddings and rotary
    inv_freq buffers are in the files but the engine allocates neither."""
    whole = save_random_checkpoint(tiny_llama(tied=True), tmp_path / "whole", None)
    tensors = load_file(whole / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(whole / "config.json", sharded / "config.json")
    names = sorted(tensors)
    extras = {"lm_head.weight": tensors["model.embed_tokens.weight"].clone()}
    extras |= {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(8) for i in range(2)}
    shards = {"model-00001-of-00002.safetensors": {n: tensors[n] for n in names[::2]},
              "model-00002-of-00002.safetensors": {n: tensors[n] for n in names[1::2]} | extras}
    for file_name, part in shards.items():
        save_file(part, sharded / file_name)
    weight_map = {n: file_name for file_name, part in shards.items() for n in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    e = check_matches(str(sharded))
    assert e.weights_from == "safetensors header"
    assert e.num_parameters == estimate(resolve_model(str(whole)), 256).num_parameters
    check_header_agrees_with_config(str(sharded), "safetensors header")


def test_fit_verdicts_and_tensor_parallel():
    source = resolve_model("bench/configs/llama-3.1-8b", "dummy")
    h100 = estimate(source, 8192, concurrency=32, device="H100")
    assert h100.dtype == "bfloat16" and h100.fits and h100.weights_from == "config"
    assert h100.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert h100.num_parameters == pytest.approx(8.03e9, rel=0.01)
    l4 = estimate(source, 131072, concurrency=4, device="L4", tp=2)
    assert l4.weight_bytes == h100.weight_bytes // 2 and not l4.fits
    with pytest.raises(ConfigError, match="unknown device"):
        estimate(source, 1024, device="TPU")


def test_the_command(capsys, smollm2_dir):
    assert main(["estimate", "smollm2", "--max-model-len", "2048", "--concurrency", "4",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kv_bytes"] == (4 * 2048 // 16 + 1) * 16 * result["kv_bytes_per_token"]
    assert result["weights_from"] == "gguf header"
    assert main(["estimate", "smollm2", "--max-model-len", "2048"]) == 0
    assert "(from gguf header)" in capsys.readouterr().out
    assert main(["estimate", "bench/configs/llama-3.1-8b", "--max-model-len", "131072",
                 "--concurrency", "8", "--device", "L4"]) == 3  # does not fit
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["estimate", "smollm2", "--max-model-len", "2048", "--concurrency", "4",
                 "--kv-cache-dtype", "fp8", "--json"]) == 0
    small = json.loads(capsys.readouterr().out)
    assert small["kv_bytes"] * 4 == result["kv_bytes"] and small["kv_dtype"] == "float8_e4m3fn"
    assert main(["estimate", "smollm2", "--kv-cache-dtype", "fp8"]) == 0
    assert "KiB per token, float8_e4m3fn)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["qwen2-gqa2-tied", "qwen3-gqa4-wide-heads-untied",
                                  "gemma3-window-8-pattern-6"])
def test_each_architecture_declares_what_the_engine_allocates(name, tmp_path):
    from tests.models.test_gemma3 import CONFIGS as GEMMA3
    from tests.models.test_qwen import CONFIGS as QWEN
    spec = str(save_random_checkpoint((QWEN | GEMMA3)[name], tmp_path, None))
    assert check_matches(spec).weights_from == "safetensors header"
    check_header_agrees_with_config(spec, "safetensors header")


def write_unknown_architecture(path: Path) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(
        {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": 64}))
    return path


def test_unknown_architecture_is_one_line_naming_the_supported_ones(tmp_path, capsys):
    path = write_unknown_architecture(tmp_path / "mamba")
    assert main(["estimate", str(path), "--max-model-len", "256"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "MambaForCausalLM" in err and "Gemma3ForCausalLM" in err and "Qwen3ForCausalLM" in err
    assert "Traceback" not in err


def test_sliding_window_layers_hold_their_window_and_a_chunk(tmp_path):
    """Gemma 3 with a window of 8 (one full group, six local groups of one layer): a local
    layer holds min(window + chunk, context) tokens of a sequence, in whole blocks (+1 where
    they straddle one), as the engine then allocates and reports."""
    from pagoda.cli.estimate import format_estimate
    from pagoda.kv_cache.groups import seq_blocks
    from tests.models.test_gemma3 import CONFIGS as GEMMA3
    spec = str(save_random_checkpoint(GEMMA3["gemma3-window-8-pattern-6"], tmp_path, None))
    e = estimate(resolve_model(spec), max_model_len=256, concurrency=3, token_budget=16)
    block_bytes = 16 * 2 * 2 * 32 * 4  # tokens x (K, V) x KV heads x head size x float32
    per_seq = 256 // 16 + 6 * seq_blocks(8, 256, 16, 16)
    assert per_seq == 16 + 6 * 3
    assert e.kv_bytes == (3 * per_seq + 1) * block_bytes
    assert e.kv_bytes_without_freeing == (3 * 256 // 16 + 1) * 16 * e.kv_bytes_per_token
    assert "local layers: min(window + 16, context)" in format_estimate(e)
    llm = LLM(spec, kv_cache_memory=e.kv_bytes, max_model_len=256, max_num_batched_tokens=16)
    assert allocated(llm)[1] == e.kv_bytes
    assert llm.engine.core.model_info.kv_capacity_tokens == 3 * 256


@pytest.mark.parametrize("spelling, device", [("RTX 4090", "RTX4090"), ("rtx-3090", "RTX3090"),
                                              ("A100", "A100-80G"), ("t4", "T4"),
                                              ("RTX 5090", "RTX5090"), ("L40", "L40"),
                                              ("H20", "H20"), ("B200", "B200"),
                                              ("MI300X", "MI300X"), ("a100-40g", "A100-40G")])
def test_device_names_in_any_spelling(spelling, device):
    source = resolve_model("bench/configs/llama-3.1-8b", "dummy")
    assert estimate(source, 1024, device=spelling).device == device


@pytest.mark.parametrize("tp", [3, 5, 64])
def test_tensor_parallel_sizes_that_cannot_split_the_heads_are_refused(tp):
    source = resolve_model("bench/configs/llama-3.1-8b", "dummy")  # 32 heads, 8 KV heads
    with pytest.raises(ConfigError, match=f"tensor parallel size {tp} "):
        estimate(source, 1024, tp=tp, device="H100")
    assert estimate(source, 1024, tp=16, device="H100").fits  # 8 KV heads, each on two GPUs


def test_a_misfit_says_what_would_fit():
    source = resolve_model("bench/configs/llama-3.1-8b", "dummy")
    e = estimate(source, 131072, concurrency=8, device="L4")
    assert not e.fits
    shorter = next(t for t in e.suggestions if t.startswith("--max-model-len"))
    tokens = int(shorter.split()[1])
    assert estimate(source, tokens, concurrency=8, device="L4").fits
    assert not estimate(source, tokens + 256, concurrency=8, device="L4").fits
    assert any("--tp 2" in t for t in e.suggestions)
    assert any("4-bit variant" in t for t in e.suggestions)
    fewer = estimate(source, 8192, concurrency=64, device="L4")
    tip = next(t for t in fewer.suggestions if t.startswith("--concurrency"))
    assert estimate(source, 8192, concurrency=int(tip.split()[1]), device="L4").fits


def test_without_a_device_the_verdict_is_for_this_machine(capsys, smollm2_dir):
    assert main(["estimate", "smollm2"]) == 0  # --max-model-len: the model's (8192)
    out = capsys.readouterr().out
    assert "(1 x 8192 tokens" in out and "this machine (CPU, available RAM)" in out
    assert "-> fits" in out


def test_cpu_verdicts_never_count_more_than_the_available_ram(capsys, monkeypatch):
    from pagoda.models.estimate import cpu_usable_bytes
    assert cpu_usable_bytes(10 * GIB, 4 * GIB) == 7 * GIB  # half of what the weights leave
    assert cpu_usable_bytes(10 * GIB, 16 * GIB) == 10 * GIB
    monkeypatch.setattr("pagoda.runner.memory.available_host_memory", lambda: 8 * GIB)
    source = resolve_model("bench/configs/llama-3.1-8b", "dummy")
    for device in (None, "cpu"):
        e = estimate(source, 1024, device=device)
        assert e.usable_bytes == 8 * GIB and not e.fits  # 30 GiB of float32 weights
        assert e.device == "this machine (CPU, available RAM)"
        assert any("4-bit variant" in tip for tip in e.suggestions)
        assert not any("--tp" in tip for tip in e.suggestions)


@pytest.mark.parametrize(("name", "original_format"), [
    ("qwen3moe-top2-norm-dense-layer-1", True), ("mixtral-top2-of-4", False)])
def test_mixtures_of_experts_count_every_expert_and_the_active_ones(name, original_format,
                                                                   tmp_path):
    from tests.models.test_moe import CONFIGS as MOE
    spec = str(save_random_checkpoint(MOE[name], tmp_path, None, original_format=original_format))
    e = check_matches(spec)
    assert e.weights_from == "safetensors header"
    check_header_agrees_with_config(spec, "safetensors header")
    config = resolve_model(spec).hf_config
    assert e.active_parameters == arch_spec(config).count_active_parameters(config)
    assert 0 < e.active_parameters < e.num_parameters


def test_the_command_reports_active_parameters(capsys):
    assert main(["estimate", "bench/configs/qwen3-30b-a3b", "--max-model-len", "4096",
                 "--device", "H200"]) == 0
    out = capsys.readouterr().out
    assert "30.53 B parameters (3.35 B active per token)" in out, out
    assert main(["estimate", "bench/configs/llama-3.1-8b", "--max-model-len", "4096",
                 "--device", "H200"]) == 0
    assert "active" not in capsys.readouterr().out


def float8_bytes(weights: int, hidden: int) -> int:
    """Linear weights in float8 with a float32 scale a row of `hidden` inputs."""
    return round(weights * (8 + 32 / hidden) / 8)


def test_fp8_at_load_counts_a_byte_per_linear_weight_of_a_config_only_model():
    source = resolve_model("bench/configs/llama-3.1-8b", "dummy")
    bf16 = estimate(source, 8192, device="H100")
    fp8 = estimate(source, 8192, device="H100", quantization="fp8")
    config = source.hf_config
    tables = config.vocab_size * config.hidden_size * 2  # untied embedding and LM head
    assert fp8.quantization == "fp8" and bf16.quantization is None
    assert fp8.weight_bytes == 2 * tables + float8_bytes(bf16.num_parameters - tables,
                                                         config.hidden_size)


def small_config(base: str, directory: Path, **sizes) -> str:
    """bench/configs/`base` (its quantization_config kept) at the given sizes, two layers."""
    config = json.loads(Path("bench/configs", base, "config.json").read_text())
    config.update(num_hidden_layers=2, vocab_size=1000, **sizes)
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


@pytest.mark.parametrize(("base", "sizes"), [
    ("llama-3.1-8b-awq", {"hidden_size": 512, "intermediate_size": 1024,
                          "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64}),
    ("qwen3-30b-a3b-awq", {"hidden_size": 512, "moe_intermediate_size": 256, "num_experts": 8,
                           "num_attention_heads": 4, "num_key_value_heads": 2})])
def test_a_config_only_integer_model_counts_the_codes_the_engine_holds(base, sizes, tmp_path):
    """Dummy AWQ weights on CPU: every linear layer's and expert's 4-bit codes with their
    groups' scales as the block-dot kernel holds them (norms and the router counted as
    codes: within 0.5 %; a byte a weight, as the estimate once counted, is 29 % over)."""
    spec = small_config(base, tmp_path / base, **sizes)
    e = estimate(resolve_model(spec, "dummy"), 256, device="cpu")
    assert e.quantization == "awq" and e.weights_from == "config"
    llm = LLM(spec, load_format="dummy", max_model_len=256, device="cpu")
    assert e.weight_bytes == pytest.approx(allocated(llm)[0], rel=0.005)


def test_a_config_only_mixture_of_experts_counts_its_experts_as_a_gpu_holds_them():
    """Dummy experts take the format's codes: on a GPU AWQ's 4 bits with 16-bit scale and
    min per 128 inputs, float8 with a scale a row under --quantization fp8 (on CPU too); the
    tables stay 16-bit."""
    awq = resolve_model("bench/configs/qwen3-30b-a3b-awq", "dummy")
    bf16 = resolve_model("bench/configs/qwen3-30b-a3b", "dummy")
    config = bf16.hf_config
    tables = 2 * config.vocab_size * config.hidden_size
    params = estimate(bf16, 4096, device="H100").num_parameters
    linear = params - tables
    assert estimate(awq, 4096, device="H100").weight_bytes == \
        2 * tables + round(linear * (4 + 32 / 128) / 8)
    assert estimate(bf16, 4096, device="H100", quantization="fp8").weight_bytes == \
        2 * tables + float8_bytes(linear, config.hidden_size)
    # on CPU too, where pagoda's float8 kernel runs
    if cpu_fp8_dot.available():
        assert estimate(bf16, 4096, device="cpu", quantization="fp8", dtype="bfloat16"
                        ).weight_bytes == 2 * tables + float8_bytes(linear, config.hidden_size)


def test_integer_codes_on_a_gpu_allow_for_the_slice_long_calls_decode_into():
    from pagoda.layers.quantization.group_gemm import DECODE_FROM, DECODED_SLICE_BYTES
    bf16 = resolve_model("bench/configs/llama-3.1-8b", "dummy")
    awq = resolve_model("bench/configs/llama-3.1-8b-awq", "dummy")
    first = min(DECODE_FROM.values())
    for budget, extra in ((first, DECODED_SLICE_BYTES), (first - 1, 0)):
        plain = estimate(bf16, 4096, device="H100", token_budget=budget)
        codes = estimate(awq, 4096, device="H100", token_budget=budget)
        assert codes.quantization == "awq"
        assert codes.activation_bytes == plain.activation_bytes + extra
    # float8 weights and CPU kernels decode nothing first
    fp8 = estimate(bf16, 4096, device="H100", token_budget=2048, quantization="fp8")
    assert fp8.activation_bytes == estimate(bf16, 4096, device="H100",
                                            token_budget=2048).activation_bytes
    assert estimate(awq, 4096, device="cpu", token_budget=2048).activation_bytes == \
        estimate(bf16, 4096, device="cpu", token_budget=2048).activation_bytes


def test_the_decoding_allowance_follows_pagoda_decode_from(monkeypatch):
    """PAGODA_DECODE_FROM=0 (never decode first) drops the slice; a threshold below every
    layout's default adds it for budgets the defaults would not."""
    from pagoda.layers.quantization import group_gemm
    awq = resolve_model("bench/configs/llama-3.1-8b-awq", "dummy")
    bf16 = resolve_model("bench/configs/llama-3.1-8b", "dummy")
    budget = min(group_gemm.DECODE_FROM.values())
    extra = {}
    for decode_from, tokens in ((None, budget), (0, budget), (64, 64), (None, 64)):
        monkeypatch.setattr(group_gemm, "DECODE_FROM_ALL", decode_from)
        codes = estimate(awq, 4096, device="H100", token_budget=tokens).activation_bytes
        plain = estimate(bf16, 4096, device="H100", token_budget=tokens).activation_bytes
        extra[(decode_from, tokens)] = codes - plain
    slice_bytes = group_gemm.DECODED_SLICE_BYTES
    assert extra == {(None, budget): slice_bytes, (0, budget): 0, (64, 64): slice_bytes,
                     (None, 64): 0}
