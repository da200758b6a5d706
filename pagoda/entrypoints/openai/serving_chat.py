"""POST /v1/chat/completions: chat templates, streaming deltas, logprobs, usage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, StreamingResponse

from pagoda.engine.input_processor import ProcessedPrompt
from pagoda.entrypoints.openai.chat_output import (
    ChoiceStream,
    ToolSetup,
    forced_tool_constraint,
    whole_message,
)
from pagoda.entrypoints.openai.logprobs import chat_logprobs
from pagoda.entrypoints.openai.model_defaults import apply_model_defaults
from pagoda.entrypoints.openai.output_parsers import (
    TOOLS_WARNING,
    TOOLS_WARNING_HEADER,
    OutputParsers,
)
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
    current_lease,
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
from pagoda.tokenizer.chat_template import renders_tools


class ChatServing(ServingBase):
    """Renders the conversation with the chat template, then generates."""

    async def create(self, body: ChatCompletionRequest, request: Request) -> Any:
        prepared = await self.prepare(body)
        request_id = new_request_id("chatcmpl")
        stream = self.start(prepared, request_id)
        prompt, params, tools = prepared.prompt, prepared.params, prepared.tools
        headers = self.warning_headers(body, tools)
        if body.stream:
            return StreamingResponse(self._stream(body, request_id, prompt, params, tools,
                                                  stream), media_type="text/event-stream",
                                     headers=headers)
        (final,) = await until_disconnect(request, last_outputs([stream]))
        response = self._response(body, request_id, prompt, params, tools, final)
        return response if headers is None else \
            JSONResponse(jsonable_encoder(response), headers=headers)

    async def prepare(self, body: ChatCompletionRequest,
                      raw_prompt: str | None = None) -> PreparedChat:
        """Validate, render and bound a chat request without starting it: the one path
        every protocol (OpenAI, Ollama, Anthropic, Responses) takes into the engine.
        `raw_prompt`, if given, is the prompt text as it is (no chat template)."""
        arrival = now()
        self.check_model(body.model)
        self.check_admission()
        body = apply_model_defaults(body, self.model_defaults())
        tools = ToolSetup.of(body, self.parsers.tools)
        if raw_prompt is not None:
            prompt = await self.engine.tokenize(raw_prompt)
        else:
            prompt = await self.engine.render_chat(
                body.conversation(), chat_template=self._template(body),
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
                chat_template_kwargs=body.chat_template_kwargs, tools=self._tools(body))
        max_tokens = self.resolve_max_tokens(prompt, body.effective_max_tokens,
                                             "max_completion_tokens"
                                             if body.max_completion_tokens else "max_tokens",
                                             "messages")
        params = self._sampling_params(body, tools, max_tokens)
        self.validate_prompt(prompt, params)
        await self.check_structured_outputs(params, _constraint_field(body, tools))
        return PreparedChat(body, prompt, params, tools, arrival)

    def start(self, prepared: PreparedChat, request_id: str) -> AsyncIterator[RequestOutput]:
        """Submit a prepared request; its outputs as the engine makes them."""
        return self.stream_outputs(request_id, prepared.prompt, prepared.params,
                                   prepared.body.priority, prepared.arrival,
                                   self.lora_for(prepared.body.model))

    def choice_stream(self, prepared: PreparedChat) -> ChoiceStream:
        """A fresh splitter of one choice's text into content, reasoning and tool calls."""
        return self._choice_stream(prepared.params, prepared.tools)

    async def count_prompt_tokens(self, body: ChatCompletionRequest) -> int:
        """How many tokens the rendered conversation (with its tools) takes."""
        self.check_model(body.model)
        body = apply_model_defaults(body, self.model_defaults())
        prompt = await self.engine.render_chat(
            body.conversation(), chat_template=self._template(body),
            add_generation_prompt=body.add_generation_prompt,
            chat_template_kwargs=body.chat_template_kwargs, tools=self._tools(body))
        return len(prompt.token_ids)

    @property
    def parsers(self) -> OutputParsers:
        """The tool-call and reasoning formats, resolved once from flags and template."""
        owner = current_lease.get()
        owner = self.state if owner is None else owner.model  # each model has its own
        if owner.output_parsers is None:
            server_template = self.server_chat_template()
            template = server_template or getattr(self.engine.tokenizer, "chat_template", None)
            owner.output_parsers = OutputParsers.resolve(
                self.state.config.tool_call_parser, self.state.config.reasoning_parser,
                template if isinstance(template, str) else None,
                renders_tools(self.engine.tokenizer, server_template) is not False)
        return owner.output_parsers

    def warning_headers(self, body: ChatCompletionRequest,
                        tools: ToolSetup) -> dict[str, str] | None:
        """The header that marks a response whose request's tools the template dropped."""
        if tools.mode == "none":
            return None
        if body.chat_template is not None:  # the request's own (trusted) template
            rendered = renders_tools(self.engine.tokenizer, body.chat_template) is not False
        else:
            rendered = self.parsers.renders_tools
        return None if rendered else {TOOLS_WARNING_HEADER: TOOLS_WARNING}

    @staticmethod
    def _sampling_params(body: ChatCompletionRequest, tools: ToolSetup,
                         max_tokens: int) -> SamplingParams:
        params = body.to_sampling_params(max_tokens).clone(max_tokens=max_tokens)
        forced = forced_tool_constraint(body, tools)
        if forced is None:
            return params
        if params.structured_outputs is not None:
            raise InvalidRequestError("tool_choice 'required' or a named function cannot be "
                                      "combined with another output constraint", "tool_choice")
        return params.clone(structured_outputs=forced)

    def _template(self, body: ChatCompletionRequest) -> str | None:
        if body.chat_template is not None:
            if not self.state.config.trust_request_chat_template:
                raise InvalidRequestError("this server does not accept chat templates in requests "
                                          "(see --trust-request-chat-template)", "chat_template")
            return body.chat_template
        return self.server_chat_template()

    @staticmethod
    def _tools(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
        if not body.tools or body.tool_choice == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in body.tools]

    def _response(self, body: ChatCompletionRequest, request_id: str, prompt: ProcessedPrompt,
                  params: SamplingParams, tools: ToolSetup,
                  final: RequestOutput) -> ChatCompletionResponse:
        choices = []
        for c in final.outputs:
            logprobs = None
            if params.logprobs is not None:
                logprobs = chat_logprobs(self.engine.tokenizer, c, params.logprobs)
            stream = self._choice_stream(params, tools)
            parts = whole_message(stream, c.text)
            content = parts.content or None if parts.tool_calls else \
                self._echo(body) + parts.content
            if not content and parts.reasoning:
                content = None  # thought but said nothing: null, as OpenAI clients expect
            message = ChatResponseMessage(
                content=content, reasoning_content=parts.reasoning or None,
                reasoning=parts.reasoning or None, tool_calls=parts.tool_calls or None)
            choices.append(ChatCompletionResponseChoice(
                index=c.index, message=message, logprobs=logprobs,
                finish_reason=stream.finish_reason(c.finish_reason), stop_reason=c.stop_reason))
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                      usage=_usage(prompt, [final]))

    def _choice_stream(self, params: SamplingParams, tools: ToolSetup) -> ChoiceStream:
        return ChoiceStream(self.parsers.reasoning, tools, params.structured_outputs is not None)

    @staticmethod
    def _echo(body: ChatCompletionRequest) -> str:
        """vLLM's chat echo: repeat the final message's text when it is being continued."""
        last = body.messages[-1]
        if not body.echo or not isinstance(getattr(last, "content", None), str):
            return ""
        return last.content

    async def _stream(self, body: ChatCompletionRequest, request_id: str,
                      prompt: ProcessedPrompt, params: SamplingParams, tools: ToolSetup,
                      stream: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
        choices: dict[int, _StreamedChoice] = {}
        final = None
        try:
            async for out in stream:
                final = out
                for c in out.outputs:
                    state = choices.get(c.index)
                    if state is None:  # the role chunk goes out with the first output
                        state = choices[c.index] = _StreamedChoice(
                            self._choice_stream(params, tools))
                        yield sse(self._chunk(request_id, c.index, DeltaMessage(
                            role="assistant", content=self._echo(body))))
                    for chunk in self._deltas(request_id, params, c, state):
                        yield sse(chunk)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield sse(ChatCompletionStreamResponse(
                    id=request_id, model=self.model_name, choices=[],
                    usage=_usage(prompt, [final] if final else [])))
            yield SSE_DONE
        except Exception as exc:
            yield sse_error(exc)
        finally:
            await stream.aclose()  # the client left early: abort the request now

    def _deltas(self, request_id: str, params: SamplingParams, c: CompletionOutput,
                state: _StreamedChoice) -> list[ChatCompletionStreamResponse]:
        """The chunks for what one choice produced since the last output."""
        if state.finished or (len(c.text) == state.chars and not c.finished):
            return []
        logprobs = None
        if params.logprobs is not None:
            logprobs = chat_logprobs(self.engine.tokenizer, c, params.logprobs,
                                     start=state.tokens)
        deltas = state.stream.feed(c.text[state.chars:])
        if c.finished:
            deltas += state.stream.finish()
            state.finished = True
        state.chars, state.tokens = len(c.text), len(c.token_ids)
        if not deltas:  # text held back (a possible marker): only logprobs or the end to send
            if logprobs is None and not c.finished:
                return []
            deltas = [DeltaMessage()]
        chunks = [self._chunk(request_id, c.index, delta) for delta in deltas]
        chunks[0].choices[0].logprobs = logprobs
        if c.finished:
            last = chunks[-1].choices[0]
            last.finish_reason = state.stream.finish_reason(c.finish_reason)
            last.stop_reason = c.stop_reason
        return chunks

    def _chunk(self, request_id: str, index: int,
               delta: DeltaMessage) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(
            id=request_id, model=self.model_name,
            choices=[ChatCompletionResponseStreamChoice(index=index, delta=delta)])


def _constraint_field(body: ChatCompletionRequest, tools: ToolSetup) -> str:
    """The request field an output constraint came from (for error messages)."""
    if tools.mode in ("named", "required"):
        return "tools"
    found = body.chat_constraints()
    return found[0][0] if found else "structured_outputs"


@dataclass(slots=True)
class PreparedChat:
    """A validated, rendered chat request, ready to submit."""

    body: ChatCompletionRequest
    prompt: ProcessedPrompt
    params: SamplingParams
    tools: ToolSetup
    arrival: float


async def message_deltas(stream: ChoiceStream, outputs: AsyncIterator[RequestOutput]
                         ) -> AsyncIterator[tuple[list[DeltaMessage], RequestOutput]]:
    """For a one-choice request: the message deltas each engine output settles, with it."""
    sent = 0
    async for out in outputs:
        choice = out.outputs[0]
        deltas = stream.feed(choice.text[sent:]) if len(choice.text) > sent else []
        sent = len(choice.text)
        if choice.finished:
            deltas += stream.finish()
        yield deltas, out


@dataclass(slots=True)
class _StreamedChoice:
    """How far one choice of a stream has been sent."""

    stream: ChoiceStream
    chars: int = 0
    tokens: int = 0
    finished: bool = False


def _usage(prompt: ProcessedPrompt, finals: list[RequestOutput]) -> UsageInfo:
    completion_tokens = sum(len(c.token_ids) for f in finals for c in f.outputs)
    return UsageInfo.of(len(prompt.token_ids), completion_tokens)
