"""A chat choice's generated text as the API returns it: reasoning, content and tool calls.

Text flows through a reasoning splitter (when the model thinks) and then a tool-call
extractor. The non-streamed message is built by running the same stream over the whole text,
so streamed deltas always reassemble to the non-streamed result.

With a grammar on the output (structured outputs, forced tool calls), reasoning is split off
only when the output starts with `<think>`: the grammar, not the model, decides the shape.

Tool modes: `auto` parses the model's own tool-call format; `required` and a named function
are enforced by grammar (`forced_tool_constraint`): a named choice makes the whole output the
function's arguments, `required` makes it a JSON array of {"name", "parameters"} objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pagoda.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
)
from pagoda.entrypoints.openai.reasoning_parsers import (
    ReasoningParser,
    StreamingReasoningParser,
)
from pagoda.entrypoints.openai.tool_parsers import (
    ContentDelta,
    StreamEvent,
    ToolCallDelta,
    ToolParser,
    make_tool_call_id,
)
from pagoda.structured_output.params import StructuredOutputsParams

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(slots=True)
class ToolSetup:
    """How a request's tools shape its output."""

    mode: str = "none"  # none | auto | required | named
    function: str | None = None  # the named function
    parser: ToolParser | None = None  # the model's format, for auto

    @classmethod
    def of(cls, body: ChatCompletionRequest, parser: ToolParser | None) -> ToolSetup:
        choice = body.tool_choice
        if not body.tools or choice == "none":
            return cls()
        if isinstance(choice, NamedToolChoice):
            return cls("named", choice.function.name)
        if choice == "required":
            return cls("required")
        return cls("auto", parser=parser)


def forced_tool_constraint(body: ChatCompletionRequest,
                           setup: ToolSetup) -> StructuredOutputsParams | None:
    """The grammar behind `required` and named tool choices (None otherwise)."""
    if setup.mode == "named":
        tool = next(t for t in body.tools if t.function.name == setup.function)
        return StructuredOutputsParams(json=json.dumps(tool.function.parameters or ANY_OBJECT))
    if setup.mode != "required":
        return None
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [t.function.name]},
                             "parameters": t.function.parameters or ANY_OBJECT},
              "required": ["name", "parameters"], "additionalProperties": False}
             for t in body.tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if body.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=json.dumps(schema))


class _NamedCallStream:
    """The whole output is the named function's arguments."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = False

    def feed(self, text: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if not self.started:
            self.started = True
            events.append(ToolCallDelta(0, "", make_tool_call_id(), self.name))
        if text:
            events.append(ToolCallDelta(0, text))
        return events

    def finish(self) -> list[StreamEvent]:
        return self.feed("") if not self.started else []


class _RequiredCallsStream:
    """The output is a JSON array of calls; each is sent once its object is complete. An
    output that ends before its first call is complete (cut off by max_tokens) comes back
    as content, so the partial call is not lost, streamed or not."""

    def __init__(self) -> None:
        self.buffer = ""
        self.position = 0  # where the next element (or the array) starts
        self.count = 0
        self.decoder = json.JSONDecoder()

    def feed(self, text: str) -> list[StreamEvent]:
        self.buffer += text
        events: list[StreamEvent] = []
        while (call := self._next_call()) is not None:
            name, arguments = call
            events += [ToolCallDelta(self.count, "", make_tool_call_id(), name),
                       ToolCallDelta(self.count, arguments)]
            self.count += 1
        return events

    def finish(self) -> list[StreamEvent]:
        if self.count or not self.buffer.strip():
            return []
        return [ContentDelta(self.buffer)]

    def _next_call(self) -> tuple[str, str] | None:
        text, pos = self.buffer, self.position
        while pos < len(text) and text[pos] in " \t\r\n[,":
            pos += 1
        if pos >= len(text) or text[pos] != "{":
            return None
        try:
            value, end = self.decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None  # not complete yet
        self.position = end
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return None
        return value["name"], json.dumps(value.get("parameters", {}), ensure_ascii=False)


@dataclass(slots=True)
class ChoiceMessage:
    """One choice's message, accumulated from its deltas."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def add(self, delta: DeltaMessage) -> None:
        self.content += delta.content or ""
        self.reasoning += delta.reasoning_content or ""
        for piece in delta.tool_calls or []:
            if piece.index == len(self.tool_calls):
                self.tool_calls.append(ToolCall(id=piece.id, function=FunctionCall(
                    name=piece.function.name, arguments="")))
            call = self.tool_calls[piece.index]
            call.function.arguments += piece.function.arguments or ""


class ChoiceStream:
    """Turns one choice's text deltas into chat deltas."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolSetup,
                 constrained: bool = False) -> None:
        # A grammar decides the output's shape: reasoning only if it starts with <think>
        self.reasoning = None if reasoning is None else (
            StreamingReasoningParser(implicit_reasoning=False) if constrained
            else reasoning.streamer())
        self.mode = tools.mode
        self.tools: Any = None
        if tools.mode == "named":
            self.tools = _NamedCallStream(tools.function)
        elif tools.mode == "required":
            self.tools = _RequiredCallsStream()
        elif tools.mode == "auto" and tools.parser is not None:
            self.tools = tools.parser.streamer()
        self.made_tool_calls = False

    def feed(self, text: str) -> list[DeltaMessage]:
        if self.reasoning is None:
            return self._content(text, final=False)
        return self._split(self.reasoning.feed(text), final=False)

    def finish(self) -> list[DeltaMessage]:
        if self.reasoning is None:
            return self._content("", final=True)
        return self._split(self.reasoning.finish(), final=True)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """OpenAI's reason: "tool_calls" when the model chose to call (not when forced by
        name, where OpenAI answers "stop")."""
        if engine_reason == "stop" and self.made_tool_calls and self.mode in ("auto",
                                                                               "required"):
            return "tool_calls"
        return engine_reason

    def _split(self, pieces: list[Any], final: bool) -> list[DeltaMessage]:
        deltas = []
        for piece in pieces:
            if piece.reasoning:
                deltas.append(DeltaMessage(reasoning_content=piece.reasoning,
                                           reasoning=piece.reasoning))
            if piece.content:
                deltas += self._content(piece.content, final=False)
        if final:
            deltas += self._content("", final=True)
        return deltas

    def _content(self, text: str, final: bool) -> list[DeltaMessage]:
        if self.tools is None:
            return [DeltaMessage(content=text)] if text else []
        events = self.tools.feed(text) if text else []
        if final:
            events += self.tools.finish()
        return [self._delta(event) for event in events]

    def _delta(self, event: StreamEvent) -> DeltaMessage:
        if isinstance(event, ContentDelta):
            return DeltaMessage(content=event.text)
        self.made_tool_calls = True
        function = DeltaFunctionCall(name=event.name, arguments=event.arguments)
        return DeltaMessage(tool_calls=[DeltaToolCall(
            index=event.index, id=event.id, type="function" if event.id else None,
            function=function)])


def whole_message(stream: ChoiceStream, text: str) -> ChoiceMessage:
    """The non-streamed message: the stream run over the complete text."""
    message = ChoiceMessage()
    for delta in stream.feed(text) + stream.finish():
        message.add(delta)
    return message
