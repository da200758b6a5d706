"""The runner reuses a batch's sampling tensors across decode steps while the same requests
sample, rebuilds them when the batch changes or a row's tensors depend on its output, and
the outputs are the same as when rebuilding every step."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from pagoda.runner.model_runner import ModelRunner, _sampling_row
from pagoda.sampling import metadata
from tests.utils import tiny_chat_model

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


@pytest.fixture(scope="module")
def llm(tmp_path_factory, smollm2_dir) -> LLM:
    path = tiny_chat_model(tmp_path_factory.mktemp("tiny"), smollm2_dir)
    return LLM(str(path), max_model_len=256, kv_cache_memory=16 << 20)


def run(llm: LLM, params: list[SamplingParams], monkeypatch, fresh_every_step: bool):
    builds = []
    real_build = metadata.SamplingMetadata.build

    def counting_build(*args, **kwargs):
        builds.append(1)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(metadata.SamplingMetadata, "build", counting_build)
    if fresh_every_step:  # the behaviour before reuse: build for every sampling step
        monkeypatch.setattr(ModelRunner, "_sampling_metadata", _rebuild_always)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    monkeypatch.undo()
    return [o.outputs[0].token_ids for o in outs], len(builds)


def _rebuild_always(runner, states):
    return metadata.SamplingMetadata.build([_sampling_row(s) for s in states],
                                           runner.config.vocab_size, runner.config.device)


def test_steady_batches_build_once_and_sample_the_same(llm, monkeypatch):
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=12, top_k=5, top_p=0.9, seed=4, ignore_eos=True)]
    reused, builds = run(llm, params, monkeypatch, fresh_every_step=False)
    assert builds <= 2  # the first sampling step; every later step has the same rows
    rebuilt, every_step = run(llm, params, monkeypatch, fresh_every_step=True)
    assert every_step >= 11 and reused == rebuilt


def test_penalties_and_min_tokens_rebuild_every_step(llm, monkeypatch):
    params = [SamplingParams(max_tokens=10, temperature=0, presence_penalty=1.5,
                             ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0, min_tokens=6),
              SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)]
    reused, builds = run(llm, params, monkeypatch, fresh_every_step=False)
    rebuilt, _ = run(llm, params, monkeypatch, fresh_every_step=True)
    assert builds >= 10 and reused == rebuilt
