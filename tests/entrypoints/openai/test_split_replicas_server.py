"""The real server with two data-parallel replicas of two tensor-parallel ranks each
(`-dp 2 -tp 2`): two engine processes, each with its own two gloo worker processes, and the
official openai client gets one device's tokens."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from tests.entrypoints.openai.test_tensor_parallel_server import children
from tests.utils import RemoteServer, tiny_chat_model

PROMPT = [5, 17, 300, 4000, 12]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_dir):
    return str(tiny_chat_model(tmp_path_factory.mktemp("tiny"), smollm2_dir))


def test_split_replicas_give_one_devices_tokens(tiny_model):
    expected = LLM(tiny_model, max_model_len=1024).generate(
        [{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=8, temperature=0,
                                                       ignore_eos=True))[0].outputs[0]
    server = RemoteServer(tiny_model, "--served-model-name", "tiny", "--kv-cache-memory",
                          "16MiB", "--max-model-len", "1024", "--tensor-parallel-size", "2",
                          "--data-parallel-size", "2", "--device", "cpu")
    try:
        client = server.client()
        texts = set()
        for _ in range(4):
            completion = client.completions.create(
                model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True})
            texts.add(completion.choices[0].text)
        assert texts == {expected.text}
        engines = server.engine_pids()
        assert len(engines) == 2  # one engine process per replica ...
        for engine in engines:  # ... with two workers (children of its fork server)
            assert len([pid for helper in children(engine) for pid in children(helper)]) == 2
    finally:
        server.stop()
