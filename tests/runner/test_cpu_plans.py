"""CPU plans: the built-in SmolLM2 (Q4_1 on the block-dot kernel) decodes the same tokens from
its plans as eagerly, at batch sizes that fill a plan, pad one and outgrow them all, and so
do tiny Q8_0 Qwen2 (biases) and Gemma 3 (sliding windows, head norms) GGUFs; a model that
computes outside pagoda's kernels, LoRA, --enforce-eager, a float8 KV cache and pipeline
stages get none; and what capture counts as computing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagoda import LLM, SamplingParams
from pagoda.layers import cpu_fused
from pagoda.layers.attention import cpu_decode_attention
from pagoda.layers.quantization import cpu_block_dot
from pagoda.runner import cpu_plans
from pagoda.runner.cpu_plans import CpuPlanRunner, PlanArena, computes
from tests.models.test_gguf_architectures import CASES as GGUF_CASES
from tests.models.test_gguf_architectures import gguf_name, write_arch_gguf

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3,",
           "Why is the sky blue?"]


@pytest.fixture(autouse=True)
def kernels_built():
    if not (cpu_block_dot.available() and cpu_fused.available()
            and cpu_decode_attention.available()):
        pytest.skip("pagoda's CPU kernels do not all run here")


def runner_of(llm: LLM):
    return llm.engine.core.executor.worker.runner


def counted_replays(plans: CpuPlanRunner, monkeypatch) -> list[int]:
    """The batch sizes of the decode steps `plans` replays from now on."""
    replayed: list[int] = []
    original = plans.run

    def run(input_ids, *args):
        replayed.append(len(input_ids))
        return original(input_ids, *args)
    monkeypatch.setattr(plans, "run", run)
    return replayed


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


def test_plans_decode_the_eager_tokens(smollm2_dir, eager_tokens, monkeypatch):
    llm = LLM(str(smollm2_dir), max_model_len=256, max_num_seqs=8)
    plans = runner_of(llm).graphs
    replayed = counted_replays(plans, monkeypatch)
    assert isinstance(plans, CpuPlanRunner) and plans.sizes == [1, 2, 4, 8]
    buffer = plans.arena.buffer.untyped_storage().data_ptr()
    assert {plans.plans[bs].output.untyped_storage().data_ptr() for bs in plans.sizes} == \
        {buffer}  # every plan's activations in the one buffer
    assert plans.arena.nbytes < 2 << 20  # a layer's activations die within it
    assert greedy_tokens(llm, [24]) == eager_tokens["one"]
    assert replayed == [1] * 23  # every decode step (the first token is the prefill's)
    replayed.clear()
    # 5 sequences padded to 8, then 4, 3 (padded to 4), 2 and 1
    assert greedy_tokens(llm, [3, 9, 14, 20, 26]) == eager_tokens["five"]
    assert sorted(set(replayed)) == [1, 2, 3, 4, 5] and len(replayed) == 25


def quantized_gguf(case: str, directory) -> str:
    """A tiny random GGUF of `case` (tests/models/test_gguf_architectures) with every matrix
    in Q8_0 blocks (vectors, biases and norms stay float32), its LM head tied to the table
    (an untied table is decoded per lookup by torch: no plans)."""
    config, arch, block_names = GGUF_CASES[case]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}  # tied: the head is the table (the block-dot kernel's)
    types = {gguf_name(k, block_names): "Q8_0" for k, v in state.items() if v.dim() == 2}
    return str(write_arch_gguf(directory / f"{case}.gguf", config, arch, block_names, state,
                               types=types))


@pytest.mark.parametrize("case", ["qwen2", "gemma3"])
def test_plans_of_a_biased_and_a_windowed_model_decode_the_eager_tokens(case, tmp_path,
                                                                       monkeypatch):
    """Qwen2's q/k/v biases (added by the block-dot kernel), Gemma 3's scaled embedding,
    per-head q/k norms, GELU and sliding window of 8 (two KV groups) all run in plans."""
    path = quantized_gguf(case, tmp_path)
    prompts = [{"prompt_token_ids": list(range(7 + 11 * i, 12 + 17 * i))} for i in range(4)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
              for n in (4, 12, 19, 30)]
    tokens = {}
    for eager in (False, True):
        llm = LLM(path, max_model_len=128, max_num_seqs=8, kv_cache_memory=16 << 20,
                  enforce_eager=eager)
        assert (runner_of(llm).graphs is None) == eager
        replayed = [] if eager else counted_replays(runner_of(llm).graphs, monkeypatch)
        tokens[eager] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
        assert len(replayed) == (0 if eager else 29)  # every decode step replayed
    assert tokens[False] == tokens[True]


def test_batches_past_the_largest_plan_run_eagerly(smollm2_dir, eager_tokens, monkeypatch):
    monkeypatch.setattr(cpu_plans, "MAX_PLAN_BATCH", 2)
    llm = LLM(str(smollm2_dir), max_model_len=256, max_num_seqs=8)
    plans = runner_of(llm).graphs
    assert plans.sizes == [1, 2]
    replayed = counted_replays(plans, monkeypatch)
    assert greedy_tokens(llm, [3, 9, 14, 20, 26]) == eager_tokens["five"]
    assert replayed == [2] * (20 - 14) + [1] * (26 - 20)  # the steps of two sequences or one


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


def test_no_plans_on_pipeline_stages(smollm2_dir):
    """A worker that holds part of the model (here one of two pipeline stages, each in its
    own process) notes no plans, and the stages serve."""
    llm = LLM(str(smollm2_dir), max_model_len=256, max_num_seqs=4, pipeline_parallel_size=2)
    assert llm.engine.core.executor.capture_decode_graphs() is False
    assert len(greedy_tokens(llm, [4, 6])[1]) == 6
    llm.engine.core.shutdown()


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


def test_the_arena_reuses_the_bytes_of_tensors_no_later_call_reads():
    arena = PlanArena()
    calls = []
    arena.measure(calls)
    a = arena.take([16], torch.float32)  # read by call 0 only
    b = arena.take([2, 8], torch.float32)  # read by calls 0 and 1
    calls.append((print, (a.data_ptr(), b.data_ptr())))
    c = arena.take([16], torch.float32)  # made after call 0: may take a's bytes
    calls.append((print, (b[1].data_ptr(), c.data_ptr(), 16)))  # b read through a view
    out = arena.take([4], torch.float64)  # the output: lives to the end
    calls.append((print, (c.data_ptr(), out.data_ptr())))
    arena.pack(calls, out)
    # c over a (dead after call 0) but clear of b (call 1 reads it); out over b
    assert arena.places == [0, 64, 0, 64]
    assert arena.nbytes == 128
    second = [arena.take([16], torch.float32), arena.take([2, 8], torch.float32),
              arena.take([16], torch.float32), arena.take([4], torch.float64)]
    base = arena.buffer.data_ptr()
    assert [t.data_ptr() - base for t in second] == [0, 64, 0, 64]
    assert second[3].dtype == torch.float64 and second[1].shape == (2, 8)
    with pytest.raises(RuntimeError):
        arena.take([1], torch.float32)  # more than the first pass made


def test_noting_a_plan_does_not_import_dynamo():
    """torch wraps a dispatch mode's __torch_dispatch__ to keep Dynamo out unless the mode
    opts out; the wrapping imports Dynamo (about 125 MiB of the engine's memory)."""
    script = ("import sys, torch\n"
              "from pagoda.runner.cpu_plans import PlanArena, _ViewsOnly\n"
              "arena = PlanArena()\n"
              "arena.measure([])\n"
              "with torch.inference_mode(), _ViewsOnly(arena):\n"
              "    torch.empty(3).view(3)\n"
              "print('torch._dynamo' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "False"
