"""POST /v1/chat/completions: chat templates, streaming deltas, logprobs, usage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from pagoda.engine.input_processor import ProcessedPrompt
from pagoda.entrypoints.openai.logprobs import chat_logprobs
from pagoda.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    DeltaMessage,
    UsageInfo,
)
from pagoda.entrypoints.openai.serving_base import (
    SSE_DONE,
    ServingBase,
    last_outputs,
    new_request_id,
    now,
    sse,
    sse_error,
    until_disconnect,
)
from pagoda.errors import InvalidRequestError
from pagoda.outputs import CompletionOutput, RequestOutput
from pagoda.sampling_params import SamplingParams


class ChatServing(ServingBase):
    """Renders the conversation with the chat template, then generates."""

    async def create(self, body: ChatCompletionRequest, request: Request) -> Any:
        arrival = now()
        self.check_model(body.model)
        self.check_admission()
        self._check_supported(body)
        prompt = await self.engine.render_chat(
            body.conversation(), chat_template=self._template(body),
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            chat_template_kwargs=body.chat_template_kwargs, tools=self._tools(body))
        max_tokens = self.resolve_max_tokens(prompt, body.effective_max_tokens,
                                             "max_completion_tokens"
                                             if body.max_completion_tokens else "max_tokens",
                                             "messages")
        params = body.to_sampling_params(max_tokens).clone(max_tokens=max_tokens)
        self.validate_prompt(prompt, params)
        request_id = new_request_id("chatcmpl")
        stream = self.stream_outputs(request_id, prompt, params, body.priority, arrival)
        if body.stream:
            return StreamingResponse(self._stream(body, request_id, prompt, params, stream),
                                     media_type="text/event-stream")
        (final,) = await until_disconnect(request, last_outputs([stream]))
        return self._response(body, request_id, prompt, params, final)

    @staticmethod
    def _check_supported(body: ChatCompletionRequest) -> None:
        if body.response_format is not None and body.response_format.type != "text":
            raise InvalidRequestError("response_format other than 'text' is not supported yet",
                                      "response_format")
        if body.tool_choice == "required" or (body.tool_choice is not None
                                              and not isinstance(body.tool_choice, str)):
            raise InvalidRequestError("forcing tool calls (tool_choice 'required' or a named "
                                      "function) is not supported yet", "tool_choice")

    def _template(self, body: ChatCompletionRequest) -> str | None:
        if body.chat_template is not None:
            if not self.state.config.trust_request_chat_template:
                raise InvalidRequestError("this server does not accept chat templates in requests "
                                          "(see --trust-request-chat-template)", "chat_template")
            return body.chat_template
        return self.state.config.chat_template

    @staticmethod
    def _tools(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
        if not body.tools or body.tool_choice == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in body.tools]

    def _response(self, body: ChatCompletionRequest, request_id: str, prompt: ProcessedPrompt,
                  params: SamplingParams, final: RequestOutput) -> ChatCompletionResponse:
        choices = []
        for c in final.outputs:
            logprobs = None
            if params.logprobs is not None:
                logprobs = chat_logprobs(self.engine.tokenizer, c, params.logprobs)
            choices.append(ChatCompletionResponseChoice(
                index=c.index, message=ChatResponseMessage(content=self._echo(body) + c.text),
                logprobs=logprobs, finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                      usage=_usage(prompt, [final]))

    @staticmethod
    def _echo(body: ChatCompletionRequest) -> str:
        """vLLM's chat echo: repeat the final message's text when it is being continued."""
        last = body.messages[-1]
        if not body.echo or not isinstance(getattr(last, "content", None), str):
            return ""
        return last.content

    async def _stream(self, body: ChatCompletionRequest, request_id: str,
                      prompt: ProcessedPrompt, params: SamplingParams,
                      stream: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        sent: dict[int, tuple[int, int]] = {}
        final = None
        try:
            for index in range(body.n):
                yield sse(self._chunk(request_id, index, DeltaMessage(role="assistant",
                                                                      content=self._echo(body))))
            async for out in stream:
                final = out
                for c in out.outputs:
                    chunk = self._delta(request_id, params, c, sent)
                    if chunk is not None:
                        yield sse(chunk)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse(ChatCompletionStreamResponse(
                    id=request_id, model=self.model_name, choices=[],
                    usage=_usage(prompt, [final] if final else [])))
            yield SSE_DONE
        except Exception as exc:
            yield sse_error(exc)

    def _delta(self, request_id: str, params: SamplingParams, c: CompletionOutput,
               sent: dict[int, tuple[int, int]]) -> ChatCompletionStreamResponse | None:
        chars, tokens = sent.get(c.index, (0, 0))
        if chars < 0 or (len(c.text) == chars and not c.finished):
            return None
        logprobs = None
        if params.logprobs is not None:
            logprobs = chat_logprobs(self.engine.tokenizer, c, params.logprobs, start=tokens)
        sent[c.index] = (-1, 0) if c.finished else (len(c.text), len(c.token_ids))
        text = c.text[chars:]
        return self._chunk(request_id, c.index, DeltaMessage(content=text if text else None),
                           logprobs, c.finish_reason, c.stop_reason)

    def _chunk(self, request_id: str, index: int, delta: DeltaMessage, logprobs: Any = None,
               finish_reason: str | None = None,
               stop_reason: int | str | None = None) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(
            id=request_id, model=self.model_name,
            choices=[ChatCompletionResponseStreamChoice(
                index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason,
                stop_reason=stop_reason)])


def _usage(prompt: ProcessedPrompt, finals: list[RequestOutput]) -> UsageInfo:
    completion_tokens = sum(len(c.token_ids) for f in finals for c in f.outputs)
    return UsageInfo.of(len(prompt.token_ids), completion_tokens)
