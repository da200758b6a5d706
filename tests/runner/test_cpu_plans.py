"""CPU plans: the built-in SmolLM2 (Q4_1 on the block-dot kernel) decodes the same tokens from
its plans as eagerly, at batch sizes that fill a plan, pad one and outgrow them all; a model
that computes outside pagoda's kernels, LoRA, --enforce-eager and a float8 KV cache get none;
and what capture counts as computing."""

from __future__ import annotations

import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.layers import cpu_fused
from pagoda.layers.attention import cpu_decode_attention
from pagoda.layers.quantization import cpu_block_dot
from pagoda.runner import cpu_plans
from pagoda.runner.cpu_plans import CpuPlanRunner, PlanArena, computes

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3,",
           "Why is the sky blue?"]


@pytest.fixture(autouse=True)
def kernels_built():
    if not (cpu_block_dot.available() and cpu_fused.available()
            and cpu_decode_attention.available()):
        pytest.skip("pagoda's CPU kernels do not all run here")


def runner_of(llm: LLM):
    return llm.engine.core.executor.worker.runner


def greedy_tokens(llm: LLM, lengths: list[int]) -> list[list[int]]:
    """Each prompt's greedy tokens, prompt i stopping after lengths[i] (so the decode batch
    shrinks step by step)."""
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    outputs = llm.generate(PROMPTS[:len(lengths)], params)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def eager_tokens(smollm2_dir):
    llm = LLM(str(smollm2_dir), max_model_len=256, max_num_seqs=8, enforce_eager=True)
    assert runner_of(llm).graphs is None
    return {"one": greedy_tokens(llm, [24]), "five": greedy_tokens(llm, [3, 9, 14, 20, 26])}


def test_plans_decode_the_eager_tokens(smollm2_dir, eager_tokens):
    llm = LLM(str(smollm2_dir), max_model_len=256, max_num_seqs=8)
    plans = runner_of(llm).graphs
    assert isinstance(plans, CpuPlanRunner) and plans.sizes == [1, 2, 4, 8]
    chunks = {chunk.untyped_storage().data_ptr() for chunk in plans.arena.chunks}
    assert {plans.plans[bs].output.untyped_storage().data_ptr() for bs in plans.sizes} <= chunks
    assert greedy_tokens(llm, [24]) == eager_tokens["one"]
    # 5 sequences padded to 8, then 4, 3 (padded to 4), 2 and 1
    assert greedy_tokens(llm, [3, 9, 14, 20, 26]) == eager_tokens["five"]


def test_batches_past_the_largest_plan_run_eagerly(smollm2_dir, eager_tokens, monkeypatch):
    monkeypatch.setattr(cpu_plans, "MAX_PLAN_BATCH", 2)
    llm = LLM(str(smollm2_dir), max_model_len=256, max_num_seqs=8)
    plans = runner_of(llm).graphs
    assert plans.sizes == [1, 2]
    replayed = []
    original = plans.run
    monkeypatch.setattr(plans, "run", lambda *args: replayed.append(1) or original(*args))
    assert greedy_tokens(llm, [3, 9, 14, 20, 26]) == eager_tokens["five"]
    assert len(replayed) == 26 - 14  # the steps of two sequences or one


def test_a_model_computing_outside_the_kernels_gets_no_plans(smollm2_dir):
    # dequantized at load: its linear layers are torch matmuls
    llm = LLM(str(smollm2_dir), max_model_len=256, max_num_seqs=4, quantization="none")
    runner = runner_of(llm)
    assert runner.graphs is None
    assert runner.capture_cpu_plans(4, 256) is False and runner.graphs is None


@pytest.mark.parametrize("option", [{"enable_lora": True}, {"enforce_eager": True},
                                    {"kv_cache_dtype": "fp8"}])
def test_no_plans_with_lora_enforce_eager_or_a_float8_cache(smollm2_dir, option):
    llm = LLM(str(smollm2_dir), max_model_len=256, max_num_seqs=4, **option)
    assert runner_of(llm).graphs is None
    assert len(greedy_tokens(llm, [4, 6])[1]) == 6  # and it serves


def test_views_and_allocations_compute_nothing_the_rest_does():
    aten = torch.ops.aten
    x = torch.randn(4, 6)
    assert not computes(aten.view.default, (x, [24]), {}, x.view(24))
    assert not computes(aten.reshape.default, (x, [6, 4]), {}, x.reshape(6, 4))
    assert not computes(aten.empty.memory_format, ([3],), {}, torch.empty(3))
    assert not computes(aten.split_with_sizes.default, (x, [2, 4], 1), {},
                        x.split_with_sizes([2, 4], 1))
    transposed = x.t()
    assert computes(aten.reshape.default, (transposed, [24]), {}, transposed.reshape(24))
    assert computes(aten.add.Tensor, (x, x), {}, x + x)
    assert computes(aten.mul_.Tensor, (x, 2), {}, x.mul_(2))  # in place: returns x itself
    out = torch.empty(4, 6)
    assert computes(aten.clamp.out, (x,), {"min": 0, "out": out}, torch.clamp(x, min=0, out=out))


def test_the_arena_cuts_aligned_tensors_and_rewinds_to_share_them(monkeypatch):
    monkeypatch.setattr(PlanArena, "CHUNK", 1024)
    arena = PlanArena()
    a, b = arena.take([3], torch.float32), arena.take([2, 5], torch.int64)
    assert (a.shape, a.dtype, b.shape, b.dtype) == ((3,), torch.float32, (2, 5), torch.int64)
    assert b.data_ptr() - a.data_ptr() == PlanArena.ALIGN and b.is_contiguous()
    big = arena.take([300], torch.float32)  # past the first chunk's 1024 bytes
    assert len(arena.chunks) == 2 and big.data_ptr() == arena.chunks[1].data_ptr()
    arena.rewind()
    assert arena.take([3], torch.float32).data_ptr() == a.data_ptr()  # the next plan's
    assert arena.nbytes == 1024 + 1200
