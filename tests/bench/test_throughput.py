"""`pagoda bench throughput` on a tiny random-weight Llama: counts, JSON fields, HF ratio."""

from __future__ import annotations

import json

import pytest

from pagoda.bench.datasets import length_range, random_requests, special_token_ids
from pagoda.cli.main import main
from pagoda.engine.llm import LLM

VOCAB = 512
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: LlamaConfig's bos/eos defaults


@pytest.fixture
def one_thread():
    """The CI machine has 2 cores shared with other jobs: two OpenMP threads then stall for
    a scheduler quantum per op (~20 ms), one thread does not."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A config-only Llama directory (weights come from load_format=dummy) with a word-level
    tokenizer, since pagoda's engine always loads one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                max_position_embeddings=512).save_pretrained(path)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + [f"w{i}" for i in range(3, VOCAB)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    return path


def test_lengths_within_range_and_no_special_tokens():
    reqs = random_requests(200, 100, 20, 0.5, VOCAB, seed=3, excluded_token_ids=[0, 1, 2])
    assert {len(r.prompt_token_ids) for r in reqs} <= set(range(50, 151))
    lengths = [len(r.prompt_token_ids) for r in reqs]
    assert min(lengths) < 70 < max(lengths)
    assert all(10 <= r.output_len <= 30 for r in reqs)
    assert all(3 <= t < VOCAB for r in reqs for t in r.prompt_token_ids)
    first = random_requests(5, seed=3, vocab_size=VOCAB)[0]
    assert first == random_requests(5, seed=3, vocab_size=VOCAB)[0]
    explicit = random_requests(50, vocab_size=VOCAB, input_len_range=(100, 1024),
                               output_len_range=(7, 7))
    assert all(100 <= len(r.prompt_token_ids) <= 1024 and r.output_len == 7 for r in explicit)
    assert length_range(1, 0.9) == (1, 2)


def test_special_token_ids_from_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    assert special_token_ids(AutoTokenizer.from_pretrained(tiny_llama)) == [0, 1, 2]


def test_throughput_counts_json_and_hf_ratio(tiny_llama, tmp_path, monkeypatch, capsys, one_thread):
    generated = []
    real_generate = LLM.generate

    def recording_generate(self, prompts, params=None, priority=None):
        outputs = real_generate(self, prompts, params, priority)
        generated.append((prompts, params, outputs))
        return outputs

    monkeypatch.setattr(LLM, "generate", recording_generate)
    out_json = tmp_path / "result.json"
    rc = main(["bench", "throughput", "--model", str(tiny_llama), "--load-format", "dummy",
               "--num-prompts", "10", "--input-len", "24", "--output-len", "8",
               "--random-range-ratio", "0.5", "--max-num-seqs", "4",
               "--max-num-batched-tokens", "64", "--kv-cache-memory", "16M", "--dtype", "float32",
               "--compare", "hf", "--hf-max-batch-size", "4", "--enforce-eager",
               "--output-json", str(out_json)])
    assert rc == 0
    result = json.loads(out_json.read_text())

    assert len(generated) == 2  # the warm-up request, then every request in one call
    prompts, params, outputs = generated[1]
    assert len(prompts) == 10
    assert [p.max_tokens for p in params] == [len(o.outputs[0].token_ids) for o in outputs]
    ours = result["systems"]["pagoda"]
    actual = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(p["prompt_token_ids"]) for p in prompts)
    assert ours["output_tokens"] == actual == result["workload"]["requested_output_tokens"]
    assert ours["prompt_tokens"] == prompt_tokens == result["workload"]["prompt_tokens"]
    assert ours["output_tokens_per_s"] == pytest.approx(actual / ours["elapsed_s"])
    assert ours["total_tokens_per_s"] == pytest.approx((actual + prompt_tokens) / ours["elapsed_s"])
    details = ours["details"]
    assert details["prefix_cache_hit_tokens"] == details["cached_prompt_tokens"] == 0
    assert details["preemptions"] == 0
    assert details["prefill_tokens_computed"] == prompt_tokens
    assert details["computed_tokens"] == prompt_tokens + actual - len(outputs)

    hf = result["systems"]["hf"]
    assert hf["output_tokens"] == actual and hf["details"]["num_batches"] == 3
    assert hf["details"]["short_batches"] == 0
    ratio = result["ratios"]["pagoda_over_hf"]
    assert ratio["output_tokens_per_s"] == pytest.approx(
        ours["output_tokens_per_s"] / hf["output_tokens_per_s"])
    assert ratio["output_tokens_per_s"] > 0

    for key in ("schema", "command", "started_at", "finished_at", "environment", "git", "model",
                "config", "workload", "systems", "ratios", "bounds"):
        assert key in result
    assert result["environment"]["torch"] and result["environment"]["device_name"]
    assert result["environment"]["torch_threads"] == 1
    assert "commit" in result["git"]
    assert result["model"]["format"] == "dummy" and result["model"]["dtype"] == "float32"
    assert result["model"]["weight_bytes"] == 4 * result["model"]["num_parameters"]  # float32
    assert result["config"]["engine_kwargs"]["max_num_seqs"] == 4
    assert result["command"][:3] == ["pagoda", "bench", "throughput"]
    assert result["command"][result["command"].index("--compare") + 1] == "hf"
    assert "--enforce-eager" in result["command"] and "--seed" not in result["command"]
    assert "pagoda/hf" in capsys.readouterr().out


def test_the_executor_backend_and_tensor_parallel_size_reach_the_engine():
    """The mp-versus-in-process overhead runs (`--distributed-executor-backend mp|uni`)."""
    from pagoda.cli.bench import throughput_config
    from pagoda.cli.main import build_parser, parse
    argv = ["bench", "throughput", "--distributed-executor-backend", "mp", "-tp", "1"]
    args = parse(build_parser(argv), argv)
    engine = throughput_config(args).engine_kwargs
    assert engine["distributed_executor_backend"] == "mp" and engine["tensor_parallel_size"] == 1
    assert "distributed_executor_backend" not in throughput_config(
        parse(build_parser(argv[:2]), argv[:2])).engine_kwargs


def test_the_environment_records_pagoda_switches_but_not_secrets(monkeypatch):
    from pagoda.bench.throughput import environment

    monkeypatch.setenv("PAGODA_PLANE_STEP_SUMS", "0")
    monkeypatch.setenv("PAGODA_API_KEY", "sk-secret")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("UNRELATED_VARIABLE", "1")
    recorded = environment()["env"]
    assert recorded["PAGODA_PLANE_STEP_SUMS"] == "0"
    assert recorded["OMP_NUM_THREADS"] == "2"
    assert "PAGODA_API_KEY" not in recorded and "UNRELATED_VARIABLE" not in recorded
