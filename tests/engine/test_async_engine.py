"""AsyncEngine: a request is admitted and submitted at once; its stream, read or not,
aborts it when closed or dropped; a refused request leaves nothing behind."""

from __future__ import annotations

import asyncio
import gc

import pytest

from pagoda.engine.admission import AdmissionLimits, EngineOverloadedError
from pagoda.engine.async_engine import AsyncEngine, OutputMailbox
from pagoda.engine.client import InprocClient
from pagoda.engine.input_processor import ProcessedPrompt
from pagoda.errors import PagodaError
from pagoda.outputs import CompletionOutput, RequestOutput
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


def test_an_unread_output_gives_way_to_the_next_and_errors_keep_their_place():
    def output(text: str) -> RequestOutput:
        return RequestOutput("r", None, [1], [CompletionOutput(0, text)])

    async def scenario():
        box = OutputMailbox()
        first, second, third = output("a"), output("ab"), output("abc")
        box.put_nowait(first)
        box.put_nowait(second)
        assert await box.get() is second
        error = PagodaError("engine failed")
        box.put_nowait(error)
        box.put_nowait(third)
        assert await box.get() is error and await box.get() is third
        waiting = asyncio.ensure_future(box.get())
        await asyncio.sleep(0)
        assert not waiting.done()
        box.put_nowait(first)
        assert await waiting is first
    asyncio.run(scenario())


def test_a_reader_that_falls_behind_gets_the_latest_output_in_one_read(client):
    async def scenario():
        engine = engine_with(client)
        engine.start()
        kept_up = [out async for out in engine.generate("kept-up", PROMPT, params(max_tokens=20))]
        late = engine.generate("late", PROMPT, params(max_tokens=20))
        while client.core.has_unfinished_requests():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the output loop hands the last step over
        outputs = [out async for out in late]
        assert len(outputs) == 1 and outputs[0].finished
        assert outputs[0].outputs[0].token_ids == kept_up[-1].outputs[0].token_ids
        assert len(outputs[0].outputs[0].token_ids) == 20
        await engine.stop()
    asyncio.run(scenario())
