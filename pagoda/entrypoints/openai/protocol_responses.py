"""OpenAI's Responses API request (POST /v1/responses), bounded like the chat route, and its
translation into the chat request pagoda's engine path takes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pagoda.entrypoints.openai.internal_request import chat_request
from pagoda.entrypoints.openai.protocol import (
    MAX_CONTENT_PARTS,
    MAX_DESCRIPTION_CHARS,
    MAX_MESSAGES,
    MAX_TOOLS,
    ChatCompletionRequest,
    NonEmptyName,
    OpenAIModel,
    Text,
)
from pagoda.errors import InvalidRequestError

Name = NonEmptyName
MAX_METADATA = 16
FIELD_NAMES = {"max_tokens": "max_output_tokens", "messages": "input", "tools": "tools",
               "tool_choice": "tool_choice", "response_format": "text",
               "temperature": "temperature", "top_p": "top_p"}
_TEXT_PARTS = {"input_text", "output_text", "text", "refusal", "summary_text",
               "reasoning_text"}


class TextPart(OpenAIModel):
    """A text part of an input message (input_text, output_text, refusal)."""

    type: str
    text: Text = ""
    refusal: Text | None = None


def _check_part(value: Any) -> Any:
    kind = value.get("type") if isinstance(value, Mapping) else None
    if isinstance(kind, str) and kind not in _TEXT_PARTS:
        raise PydanticCustomError("unsupported_content",
                                  "'{kind}' input parts are not supported by this server; only "
                                  "text parts are", {"kind": kind[:64]})
    return value


Parts = Annotated[list[Annotated[TextPart, BeforeValidator(_check_part)]],
                  Field(max_length=MAX_CONTENT_PARTS)]


def _text(content: str | list[TextPart]) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.refusal or part.text for part in content)


class MessageItem(OpenAIModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Text | Parts


class FunctionCallItem(OpenAIModel):
    type: Literal["function_call"]
    call_id: Name
    name: Name
    arguments: Text = "{}"


class FunctionCallOutputItem(OpenAIModel):
    type: Literal["function_call_output"]
    call_id: Name
    output: Text | Parts


class ReasoningItem(OpenAIModel):
    """Earlier reasoning handed back: kept out of the prompt, as OpenAI's models do."""

    type: Literal["reasoning"]


_ITEM_TAGS = {"message", "function_call", "function_call_output", "reasoning"}


def _item_tag(value: Any) -> str | None:
    if not isinstance(value, Mapping):
        return getattr(value, "type", None)
    kind = value.get("type", "message" if "role" in value else None)
    return kind if kind in _ITEM_TAGS else None


def _check_item(value: Any) -> Any:
    kind = value.get("type") if isinstance(value, Mapping) else None
    if isinstance(kind, str) and kind not in _ITEM_TAGS:
        raise PydanticCustomError("unsupported_item",
                                  "'{kind}' input items are not supported by this server; use "
                                  "message, function_call, function_call_output and reasoning",
                                  {"kind": kind[:64]})
    return value


InputItem = Annotated[
    Annotated[
        Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
        | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
        | Annotated[ReasoningItem, Tag("reasoning")],
        Discriminator(_item_tag, custom_error_type="invalid_item",
                      custom_error_message="each input item needs a type or a role")],
    BeforeValidator(_check_item)]


def _check_tool(value: Any) -> Any:
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind != "function":
        raise PydanticCustomError("unsupported_tool", "only function tools are supported by "
                                                      "this server")
    return value


class FunctionTool(OpenAIModel):
    type: Literal["function"]
    name: Name
    description: Annotated[str, StringConstraints(max_length=MAX_DESCRIPTION_CHARS)] | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(OpenAIModel):
    type: Literal["function"]
    name: Name


class Reasoning(OpenAIModel):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None


class TextFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    name: Name | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(OpenAIModel):
    format: TextFormat | None = None


class ResponsesRequest(OpenAIModel):
    """POST /v1/responses."""

    model: Name | None = None
    input: Text | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_MESSAGES)]
    instructions: Text | None = None
    tools: Annotated[list[Annotated[FunctionTool, BeforeValidator(_check_tool)]],
                     Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=1 << 30)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    store: bool = False  # pagoda keeps nothing unless asked
    previous_response_id: Name | None = None
    reasoning: Reasoning | None = None
    text: TextConfig | None = None
    metadata: Annotated[dict[Annotated[str, StringConstraints(max_length=64)],
                             Annotated[str, StringConstraints(max_length=512)]],
                        Field(max_length=MAX_METADATA)] | None = None
    user: Name | None = None

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ResponsesRequest:
        if isinstance(self.tool_choice, NamedFunction) and self.tool_choice.name not in {
                t.name for t in self.tools or []}:
            raise InvalidRequestError("tool_choice names a function that is not in tools",
                                      "tool_choice")
        return self

    def input_messages(self) -> list[dict[str, Any]]:
        """``input`` as OpenAI chat messages (function calls join their assistant turn)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        messages: list[dict[str, Any]] = []
        for item in self.input:
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": _text(item.content)})
            elif isinstance(item, FunctionCallItem):
                _assistant_turn(messages).setdefault("tool_calls", []).append(
                    {"id": item.call_id, "type": "function",
                     "function": {"name": item.name, "arguments": item.arguments}})
            elif isinstance(item, FunctionCallOutputItem):
                messages.append({"role": "tool", "tool_call_id": item.call_id,
                                 "content": _text(item.output)})
        return messages

    def to_chat(self, history: list[dict[str, Any]]) -> ChatCompletionRequest:
        """The chat request: instructions, the stored conversation `history`, then input."""
        messages = [{"role": "system", "content": self.instructions}] if self.instructions \
            else []
        messages += history + self.input_messages()
        data: dict[str, Any] = {"model": self.model, "messages": messages,
                                "max_tokens": self.max_output_tokens,
                                "temperature": self.temperature, "top_p": self.top_p,
                                "parallel_tool_calls": self.parallel_tool_calls}
        if self.tools:
            data["tools"] = [{"type": "function", "function": t.model_dump(
                exclude={"type"}, exclude_none=True)} for t in self.tools]
            choice = self.tool_choice
            data["tool_choice"] = ({"type": "function", "function": {"name": choice.name}}
                                   if isinstance(choice, NamedFunction) else choice)
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type != "text":
            data["response_format"] = {"type": fmt.type} if fmt.type == "json_object" else {
                "type": "json_schema", "json_schema": {"name": fmt.name or "output",
                                                       "schema": fmt.schema_}}
        if self.reasoning is not None and self.reasoning.effort is not None:
            data["chat_template_kwargs"] = {"enable_thinking": self.reasoning.effort != "none"}
        return chat_request({k: v for k, v in data.items() if v is not None}, FIELD_NAMES)

    def echo_fields(self) -> dict[str, Any]:
        """The request settings a Response object repeats."""
        choice = self.tool_choice
        return {"instructions": self.instructions, "metadata": self.metadata or {},
                "parallel_tool_calls": self.parallel_tool_calls is not False,
                "temperature": self.temperature, "top_p": self.top_p,
                "max_output_tokens": self.max_output_tokens,
                "previous_response_id": self.previous_response_id,
                "tool_choice": choice.model_dump() if isinstance(choice, NamedFunction)
                else (choice or "auto"),
                "tools": [t.model_dump(exclude_none=True) for t in self.tools or []],
                "reasoning": self.reasoning.model_dump() if self.reasoning else None,
                "text": {"format": (self.text.format.model_dump(by_alias=True, exclude_none=True)
                                    if self.text and self.text.format else {"type": "text"})},
                "store": self.store, "user": self.user, "truncation": "disabled"}


def _assistant_turn(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant turn a function call belongs to: the last one, or a new one."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[-1]
    messages.append({"role": "assistant", "content": ""})
    return messages[-1]


def output_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the chat messages a follow-up turn continues from."""
    turn: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in output:
        if item["type"] == "message":
            turn["content"] += "".join(p["text"] for p in item["content"])
        elif item["type"] == "function_call":
            turn.setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": item["arguments"]}})
    return [turn]


def json_size(value: Any) -> int:
    return len(json.dumps(value))
