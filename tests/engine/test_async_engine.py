"""AsyncEngine: a request is admitted and submitted at once; its stream, read or not,
aborts it when closed or dropped; a refused request leaves nothing behind."""

from __future__ import annotations

import asyncio
import gc

import pytest

from pagoda.engine.admission import AdmissionLimits, EngineOverloadedError
from pagoda.engine.async_engine import AsyncEngine
from pagoda.engine.client import InprocClient
from pagoda.engine.input_processor import ProcessedPrompt
from pagoda.sampling_params import SamplingParams
from tests.engine.test_client import tiny_config, tiny_model  # noqa: F401 -- fixture

PROMPT = ProcessedPrompt(None, [5, 6, 7, 8])


def params(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, **{"max_tokens": 50, **kwargs})


@pytest.fixture(scope="module")
def client(tiny_model):  # noqa: F811
    inproc = InprocClient(tiny_config(tiny_model))
    yield inproc
    inproc.shutdown()


def engine_with(client, **limits) -> AsyncEngine:
    return AsyncEngine(client, None, limits=AdmissionLimits(**limits))


def test_an_unread_stream_aborts_its_request_when_closed_or_dropped(client):
    async def scenario():
        engine = engine_with(client)
        engine.start()
        kept = engine.generate("kept", PROMPT, params())
        dropped = engine.generate("dropped", PROMPT, params(n=2))
        assert engine.num_in_flight == 2 and engine.admission.sequences == 3
        kept.close()
        del dropped
        gc.collect()
        await asyncio.sleep(0.05)  # the dropped stream's abort runs on the loop
        assert engine.num_in_flight == 0 and engine.admission.sequences == 0
        assert not client.core.has_unfinished_requests()
        await engine.stop()
    asyncio.run(scenario())


def test_a_refused_request_leaves_nothing_queued(client):
    async def scenario():
        engine = engine_with(client, max_sequences=3)
        engine.start()
        first = engine.generate("first", PROMPT, params(n=2))
        with pytest.raises(EngineOverloadedError, match="sequences"):
            engine.generate("second", PROMPT, params(n=2))
        assert engine.num_in_flight == 1 and engine.admission.sequences == 2
        outputs = [out async for out in first]
        assert outputs[-1].finished and engine.num_in_flight == 0
        assert engine.admission.tokens_owed == 0
        await engine.stop()
    asyncio.run(scenario())
