"""Sleep and wake on a GPU: sleeping hands the weights' and KV cache's memory back to the
device, waking restores identical greedy outputs, and after the first wake the weights and
KV cache sit at fixed addresses so later wakes keep the captured CUDA graphs."""

from __future__ import annotations

import torch

from pagoda import LLM, SamplingParams
from pagoda.runner.device_arena import DeviceArena, arenas_supported

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11]]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def token_ids(llm: LLM) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
    return [o.outputs[0].token_ids for o in outs]


def device_free() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def test_arena_keeps_its_addresses_across_release_and_remap():
    assert arenas_supported(torch.device("cuda"))
    arena = DeviceArena(64 << 20, torch.device("cuda"))
    address = arena.tensor.data_ptr()
    arena.tensor.fill_(3)
    free_mapped = device_free()
    arena.release()
    assert device_free() >= free_mapped + (64 << 20)
    arena.remap()
    assert arena.tensor.data_ptr() == address
    arena.tensor.fill_(5)
    assert int(arena.tensor.sum()) == 5 * arena.nbytes
    arena.close()


def test_sleep_frees_memory_and_wake_restores_outputs(gpu_report):
    llm = LLM("bench/configs/llama-3.2-1b", load_format="dummy", dtype="bfloat16",
              max_model_len=1024, kv_cache_memory=2 << 30, max_num_seqs=16)
    core = llm.engine.core
    before = token_ids(llm)
    held = core.model_info.weight_bytes + core.model_info.kv_cache_bytes
    free_awake = device_free()
    core.sleep()
    freed = device_free() - free_awake
    assert freed >= 0.95 * held
    first_wake = core.wake_up()
    graphs = core.executor.worker.runner.graphs
    assert token_ids(llm) == before
    core.sleep()
    second_wake = core.wake_up()
    assert core.executor.worker.runner.graphs is graphs  # the addresses held: no re-capture
    assert token_ids(llm) == before
    gpu_report(model="llama-3.2-1b dummy", held_gib=round(held / 2**30, 2),
               freed_gib=round(freed / 2**30, 2), first_wake_s=round(first_wake, 3),
               second_wake_s=round(second_wake, 3))


def test_a_prepared_host_copy_makes_the_first_sleep_quick(gpu_report):
    llm = LLM("bench/configs/llama-3.2-1b", load_format="dummy", dtype="bfloat16",
              max_model_len=1024, kv_cache_memory=1 << 30, max_num_seqs=16, seed=1)
    core = llm.engine.core
    before = token_ids(llm)
    assert core.prepare_sleep()
    first_sleep = core.sleep()
    core.wake_up()
    assert token_ids(llm) == before
    assert first_sleep < 0.5
    gpu_report(model="llama-3.2-1b dummy", prepared_first_sleep_s=round(first_sleep, 3))
