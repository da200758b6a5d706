"""POST /v1/completions: string, list and token-id prompts; echo; streaming; logprobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from pagoda.engine.input_processor import ProcessedPrompt
from pagoda.entrypoints.openai.logprobs import completion_logprobs
from pagoda.entrypoints.openai.protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    UsageInfo,
)
from pagoda.entrypoints.openai.serving_base import (
    SSE_DONE,
    ServingBase,
    last_outputs,
    merge_streams,
    new_request_id,
    now,
    sse,
    sse_error,
    until_disconnect,
)
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams


class CompletionServing(ServingBase):
    """Turns a CompletionRequest into engine requests and OpenAI-shaped responses."""

    async def create(self, body: CompletionRequest, request: Request) -> Any:
        arrival = now()
        self.check_model(body.model)
        self.check_admission()
        body.check_supported()
        prompts = [await self._tokenize(p) for p in _prompt_list(body.prompt)]
        plans = [self._plan(body, p) for p in prompts]
        found = body.structured_constraints()
        await self.check_structured_outputs(plans[0][1],
                                            found[0][0] if found else "structured_outputs")
        request_id = new_request_id("cmpl")
        streams = self.open_streams([(f"{request_id}-{i}", prompt, params)
                                     for i, (prompt, params) in enumerate(plans)],
                                    body.priority, arrival, self.lora_for(body.model))
        if body.stream:
            return StreamingResponse(self._stream(body, request_id, plans, streams),
                                     media_type="text/event-stream")
        finals = await until_disconnect(request, last_outputs(streams))
        return self._response(body, request_id, plans, finals)

    async def _tokenize(self, prompt: str | list[int]) -> ProcessedPrompt:
        if isinstance(prompt, str):
            return await self.engine.tokenize(prompt)
        return ProcessedPrompt(None, list(prompt))

    def _plan(self, body: CompletionRequest, prompt: ProcessedPrompt
              ) -> tuple[ProcessedPrompt, SamplingParams]:
        max_tokens = self.resolve_max_tokens(prompt, body.max_tokens, "max_tokens", "prompt")
        params = body.to_sampling_params(max_tokens).clone(max_tokens=max_tokens)
        self.validate_prompt(prompt, params)
        if body.echo and prompt.text is None and self.engine.tokenizer is not None:
            prompt = ProcessedPrompt(self.engine.tokenizer.decode(prompt.token_ids),
                                     prompt.token_ids)
        return prompt, params

    def _response(self, body: CompletionRequest, request_id: str,
                  plans: list[tuple[ProcessedPrompt, SamplingParams]],
                  finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        for p, (final, (prompt, params)) in enumerate(zip(finals, plans)):
            for c in final.outputs:
                text = (prompt.text or "") + c.text if body.echo else c.text
                logprobs = None
                if params.logprobs is not None:
                    logprobs = completion_logprobs(self.engine.tokenizer, final, c, body.echo,
                                                   params.logprobs)
                choices.append(CompletionResponseChoice(
                    index=p * body.n + c.index, text=text, logprobs=logprobs,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                  usage=_usage(plans, finals))

    async def _stream(self, body: CompletionRequest, request_id: str,
                      plans: list[tuple[ProcessedPrompt, SamplingParams]],
                      streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[str]:
        sent: dict[tuple[int, int], tuple[int, int]] = {}  # (prompt, choice) -> (chars, tokens)
        finals: dict[int, RequestOutput] = {}
        try:
            async for p, out in merge_streams(streams):
                finals[p] = out
                for chunk in self._deltas(body, request_id, p, plans[p], out, sent):
                    yield sse(chunk)
            if body.stream_options is not None and body.stream_options.include_usage:
                usage = _usage(plans, [finals[i] for i in sorted(finals)])
                yield sse(CompletionStreamResponse(id=request_id, model=self.model_name,
                                                   choices=[], usage=usage))
            yield SSE_DONE
        except Exception as exc:
            yield sse_error(exc)

    def _deltas(self, body: CompletionRequest, request_id: str, p: int,
                plan: tuple[ProcessedPrompt, SamplingParams], out: RequestOutput,
                sent: dict[tuple[int, int], tuple[int, int]]) -> list[CompletionStreamResponse]:
        prompt, params = plan
        chunks = []
        for c in out.outputs:
            key = (p, c.index)
            first = key not in sent
            chars, tokens = sent.get(key, (0, 0))
            if chars < 0 or (not first and len(c.text) == chars and not c.finished):
                continue  # finished earlier, or nothing new to send
            text = c.text[chars:]
            if first and body.echo:
                text = (prompt.text or "") + text
            logprobs = None
            if params.logprobs is not None:
                logprobs = completion_logprobs(self.engine.tokenizer, out, c, body.echo and first,
                                               params.logprobs, start=tokens)
            sent[key] = (-1, 0) if c.finished else (len(c.text), len(c.token_ids))
            chunks.append(CompletionStreamResponse(
                id=request_id, model=self.model_name,
                choices=[CompletionResponseStreamChoice(
                    index=p * body.n + c.index, text=text, logprobs=logprobs,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason)]))
        return chunks


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


def _usage(plans: list[tuple[ProcessedPrompt, SamplingParams]],
           finals: list[RequestOutput]) -> UsageInfo:
    prompt_tokens = sum(len(p.token_ids) for p, _ in plans)
    completion_tokens = sum(len(c.token_ids) for f in finals for c in f.outputs)
    return UsageInfo.of(prompt_tokens, completion_tokens)
