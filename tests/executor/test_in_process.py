"""The in-process executor driven by hand with plain scheduler outputs, as EngineCore drives
it: start-up facts, a greedy run with one step in flight equal to the engine's, the grammar
bitmask applied to its rows only, sleep and wake, and EngineCore building it through
executor_for with the bitmask filled between the forward pass and the sampling."""

from __future__ import annotations

import gguf
import pytest
import torch

from pagoda import LLM, SamplingParams
from pagoda.config import engine_config
from pagoda.engine import core as core_module
from pagoda.engine.core import EngineCore
from pagoda.executor.base import Executor, WorkerConfig
from pagoda.executor.factory import executor_for
from pagoda.executor.in_process import InProcessExecutor
from pagoda.models.estimate import estimate
from pagoda.models.source import resolve_model
from pagoda.request import EngineCoreRequest
from pagoda.scheduler.output import CachedRequestData, NewRequestData, SchedulerOutput
from pagoda.structured_output.bitmask import bitmask_words
from pagoda.structured_output.params import StructuredOutputsParams
from tests.utils import tiny_chat_model

VOCAB = 49152
BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4  # layers x (K, V) x block_size x kv_heads x head_dim x fp32
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
PROMPT = [5, 17, 300, 4000, 12]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny"), smollm2_dir)


@pytest.fixture(scope="module")
def executor(tiny_dir) -> InProcessExecutor:
    config = engine_config(str(tiny_dir), max_model_len=64, kv_cache_memory=64 * BLOCK_BYTES)
    executor = executor_for(WorkerConfig(config, 64))
    executor.init_device()
    executor.load_model()
    executor.initialize_kv_cache(executor.determine_kv_cache_size().num_blocks)
    return executor


def prefill(request_id: str, prompt: list[int], params: SamplingParams, block: int,
            finished: set[str] | None = None) -> SchedulerOutput:
    new = NewRequestData(request_id, prompt, params, None, [[block]], 0)
    return SchedulerOutput(new_requests=[new], num_scheduled_tokens={request_id: len(prompt)},
                           total_num_scheduled_tokens=len(prompt),
                           finished_request_ids=finished or set())


def decode(request_id: str, num_computed: int) -> SchedulerOutput:
    return SchedulerOutput(cached_requests=[CachedRequestData(request_id, [], num_computed)],
                           num_scheduled_tokens={request_id: 1}, total_num_scheduled_tokens=1)


def run(executor: Executor, sched_out: SchedulerOutput,
        bitmask: torch.Tensor | None = None) -> dict[str, list[int]]:
    executor.execute_model(sched_out)
    executor.sample_tokens(bitmask)
    return executor.collect_output().sampled_token_ids


def only_token(token_id: int) -> torch.Tensor:
    """A one-row bitmask that allows one token."""
    mask = torch.zeros((1, bitmask_words(VOCAB)), dtype=torch.int32)
    mask[0, token_id // 32] = 1 << (token_id % 32)
    return mask


def test_start_up_reports_the_model_and_sizes_the_cache(executor):
    info = executor.loaded_model
    model = executor.worker.runner.model
    assert (info.device, info.dtype, info.attention_backend) == ("cpu", "float32", "torch")
    assert info.num_parameters == sum(p.numel() for p in model.parameters())
    assert info.weight_bytes == 4 * info.num_parameters
    assert executor.determine_kv_cache_size().num_blocks == 64
    assert executor.worker.runner.kv_cache.numel() * 4 == 64 * BLOCK_BYTES
    assert executor.capture_decode_graphs() is False  # CPU: nothing to capture


def test_a_quantized_model_reports_its_checkpoint_s_parameters(smollm2_dir, monkeypatch):
    """SmolLM2's GGUF held as 4-bit codes: the parameters reported are the checkpoint's (the
    estimate's count), not the elements of the tensors that hold them; counted from the
    pulled model's tensor index, with no parse of the GGUF's header (its vocabulary took 2.4
    of the engine's 4.2 s start, Gemma 3 270M's 11 of 16)."""
    config = engine_config(str(smollm2_dir), max_model_len=64, kv_cache_memory=64 * BLOCK_BYTES)
    executor = executor_for(WorkerConfig(config, 64))
    executor.init_device()

    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF's header was parsed")
    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    info = executor.load_model()
    monkeypatch.undo()
    held = sum(p.numel() for p in executor.worker.runner.model.parameters())
    expected = estimate(resolve_model(str(smollm2_dir)), 64).num_parameters
    assert info.num_parameters == expected != held
    assert expected == pytest.approx(134.5e6, rel=0.01)  # SmolLM2-135M


def test_greedy_steps_with_one_in_flight_equal_the_engine(executor, tiny_dir):
    expected = LLM(str(tiny_dir), max_model_len=64).generate(
        [{"prompt_token_ids": PROMPT}], GREEDY.clone(max_tokens=4))[0].outputs[0].token_ids
    got = []
    executor.execute_model(prefill("a", PROMPT, GREEDY, block=1))
    executor.sample_tokens(None)
    for n in range(3):  # the next step runs on the previous one's token, still on the device
        executor.execute_model(decode("a", len(PROMPT) + n))
        executor.sample_tokens(None)
        got += executor.collect_output().sampled_token_ids["a"]
    got += executor.collect_output().sampled_token_ids["a"]
    assert got == expected
    run(executor, SchedulerOutput(finished_request_ids={"a"}))


def test_the_bitmask_constrains_only_its_rows(executor):
    free = run(executor, prefill("free", PROMPT, GREEDY, block=2))["free"]
    assert free != [42]
    both = SchedulerOutput(
        new_requests=[NewRequestData("free2", PROMPT, GREEDY, None, [[3]], 0),
                      NewRequestData("bound", PROMPT, GREEDY, None, [[4]], 0)],
        num_scheduled_tokens={"free2": 5, "bound": 5}, total_num_scheduled_tokens=10,
        finished_request_ids={"free"}, grammar_rows={"bound": 0})
    sampled = run(executor, both, only_token(42))
    assert sampled == {"free2": free, "bound": [42]}
    run(executor, SchedulerOutput(finished_request_ids={"free2", "bound"}))


def test_a_constrained_step_without_its_bitmask_is_refused(executor):
    step = prefill("bound", PROMPT, GREEDY, block=5)
    step.grammar_rows = {"bound": 0}
    executor.execute_model(step)
    with pytest.raises(ValueError, match="bitmask"):
        executor.sample_tokens(None)
    executor.sample_tokens(only_token(7))
    assert executor.collect_output().sampled_token_ids == {"bound": [7]}
    run(executor, SchedulerOutput(finished_request_ids={"bound"}))


def test_sleep_and_wake_keep_the_outputs(executor):
    before = run(executor, prefill("s1", PROMPT, GREEDY, block=6))["s1"]
    assert not executor.prepare_sleep()  # on CPU the weights already live in host memory
    executor.sleep()
    assert executor.worker.runner.kv_cache is None
    assert executor.wake_up() is False  # no CUDA graphs to capture again
    after = run(executor, prefill("s2", PROMPT, GREEDY, block=6, finished={"s1"}))["s2"]
    assert after == before
    run(executor, SchedulerOutput(finished_request_ids={"s2"}))


class SpyExecutor(InProcessExecutor):
    """Records the step calls (and whether a bitmask came with the sampling)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    def execute_model(self, sched_out: SchedulerOutput) -> None:
        self.calls.append("execute")
        super().execute_model(sched_out)

    def sample_tokens(self, grammar_bitmask: torch.Tensor | None) -> None:
        self.calls.append("sample" if grammar_bitmask is None else "sample+mask")
        super().sample_tokens(grammar_bitmask)


def test_the_core_builds_its_executor_and_fills_the_bitmask_between_the_calls(
        tiny_dir, monkeypatch):
    built = []

    def spy_executor_for(config: WorkerConfig, source=None) -> Executor:
        built.append(config)
        return SpyExecutor(config, source)

    monkeypatch.setattr(core_module, "executor_for", spy_executor_for)
    config = engine_config(str(tiny_dir), max_model_len=64, kv_cache_memory=64 * BLOCK_BYTES)
    core = EngineCore(config)
    assert built == [WorkerConfig(config, 64)] and isinstance(core.executor, SpyExecutor)
    assert core.model_info.weight_bytes == core.executor.loaded_model.weight_bytes
    real_fill = core.bitmask_filler.fill
    monkeypatch.setattr(core.bitmask_filler, "fill",
                        lambda states: core.executor.calls.append("fill") or real_fill(states))
    params = GREEDY.clone(max_tokens=3, structured_outputs=StructuredOutputsParams(
        choice=["yes", "no"]))
    core.add_request(EngineCoreRequest("c", PROMPT, params))
    while core.has_unfinished_requests():
        core.step()
    calls = core.executor.calls  # steps before the grammar compiled are empty: no fill
    fills = [i for i, call in enumerate(calls) if call == "fill"]
    assert fills and all(calls[i - 1:i + 2] == ["execute", "fill", "sample+mask"] for i in fills)
    assert calls.count("sample+mask") == len(fills)
    core.shutdown()
    assert core.executor.worker.runner is None
