"""Anthropic's Messages API request bodies, bounded like the OpenAI routes, and their
translation into the chat request pagoda's engine path takes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pagoda.entrypoints.openai.internal_request import chat_request
from pagoda.entrypoints.openai.protocol import (
    MAX_CONTENT_CHARS,
    MAX_CONTENT_PARTS,
    MAX_DESCRIPTION_CHARS,
    MAX_MESSAGES,
    MAX_TOOLS,
    ChatCompletionRequest,
    NonEmptyName,
    StopString,
    Text,
)
from pagoda.errors import InvalidRequestError
from pagoda.sampling_params import MAX_STOP_STRINGS

Name = NonEmptyName
StopSequence = StopString
MAX_OUTPUT_TOKENS = 1 << 20

# internal chat-request fields -> Anthropic's names, for error messages
FIELD_NAMES = {"max_tokens": "max_tokens", "stop": "stop_sequences", "messages": "messages",
               "tools": "tools", "tool_choice": "tool_choice", "temperature": "temperature",
               "response_format": "output_config"}
_BLOCK_TYPES = {"text", "tool_use", "tool_result", "thinking", "redacted_thinking"}


class AnthropicModel(BaseModel):
    """Base of the request models: unknown fields (cache_control, citations...) ignored."""

    model_config = ConfigDict(extra="ignore")


class TextBlock(AnthropicModel):
    type: Literal["text"]
    text: Text


class ToolUseBlock(AnthropicModel):
    type: Literal["tool_use"]
    id: Name
    name: Name
    input: dict[str, Any] = Field(default_factory=dict)


class ToolResultBlock(AnthropicModel):
    type: Literal["tool_result"]
    tool_use_id: Name
    content: Text | Annotated[list[TextBlock], Field(max_length=MAX_CONTENT_PARTS)] = ""
    is_error: bool = False

    def text(self) -> str:
        text = self.content if isinstance(self.content, str) else \
            "\n".join(block.text for block in self.content)
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(AnthropicModel):
    type: Literal["thinking"]
    thinking: Text
    signature: Annotated[str, StringConstraints(max_length=MAX_CONTENT_CHARS)] | None = None


class RedactedThinkingBlock(AnthropicModel):
    type: Literal["redacted_thinking"]


def _block_type(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, Mapping) else getattr(value, "type", None)
    return kind if kind in _BLOCK_TYPES else None


def _check_block(value: Any) -> Any:
    """One clear error for a block pagoda does not take (images, documents, server tools)."""
    kind = value.get("type") if isinstance(value, Mapping) else None
    if isinstance(kind, str) and kind not in _BLOCK_TYPES:
        raise PydanticCustomError(
            "unsupported_content", "'{kind}' content blocks are not supported by this server; "
            "use text, tool_use, tool_result and thinking blocks", {"kind": kind[:64]})
    return value


Block = Annotated[
    Annotated[
        Annotated[TextBlock, Tag("text")] | Annotated[ToolUseBlock, Tag("tool_use")]
        | Annotated[ToolResultBlock, Tag("tool_result")]
        | Annotated[ThinkingBlock, Tag("thinking")]
        | Annotated[RedactedThinkingBlock, Tag("redacted_thinking")],
        Discriminator(_block_type, custom_error_type="invalid_block",
                      custom_error_message="each content block needs a type")],
    BeforeValidator(_check_block)]


class Message(AnthropicModel):
    """One turn of ``messages``."""

    role: Literal["user", "assistant"]
    content: Text | Annotated[list[Block], Field(min_length=0, max_length=MAX_CONTENT_PARTS)]

    def openai(self) -> list[dict[str, Any]]:
        """This turn as OpenAI chat messages: tool results become tool messages."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        if self.role == "assistant":
            return [self._assistant()]
        out: list[dict[str, Any]] = [
            {"role": "tool", "tool_call_id": b.tool_use_id, "content": b.text()}
            for b in self.content if isinstance(b, ToolResultBlock)]
        text = [b.text for b in self.content if isinstance(b, TextBlock)]
        if text or not out:
            out.append({"role": "user", "content": "\n".join(text)})
        return out

    def _assistant(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(
            b.text for b in self.content if isinstance(b, TextBlock))}
        thinking = "".join(b.thinking for b in self.content if isinstance(b, ThinkingBlock))
        if thinking:
            message["reasoning_content"] = thinking
        calls = [{"id": b.id, "type": "function",
                  "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                 for b in self.content if isinstance(b, ToolUseBlock)]
        if calls:
            message["tool_calls"] = calls
        return message


class Tool(AnthropicModel):
    """A client tool: name, description, input_schema (Anthropic's server tools refused)."""

    name: Name
    description: Annotated[str, StringConstraints(max_length=MAX_DESCRIPTION_CHARS)] | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None


class ToolChoice(AnthropicModel):
    type: Literal["auto", "any", "tool", "none"]
    name: Name | None = None
    disable_parallel_tool_use: bool = False


class Thinking(AnthropicModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1, le=MAX_OUTPUT_TOKENS)


class OutputFormat(AnthropicModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(AnthropicModel):
    """``output_config``: a JSON schema for the reply (structured output); effort ignored."""

    format: OutputFormat | None = None


class _MessagesBase(AnthropicModel):
    """What /v1/messages and /v1/messages/count_tokens share."""

    model: Name
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    system: Text | Annotated[list[TextBlock], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> _MessagesBase:
        choice = self.tool_choice
        if choice is not None and choice.type in ("any", "tool") and not self.tools:
            raise InvalidRequestError("tool_choice requires tools", "tool_choice")
        if choice is not None and choice.type == "tool" and choice.name not in {
                t.name for t in self.tools or []}:
            raise InvalidRequestError("tool_choice.name must name one of the tools",
                                      "tool_choice")
        return self

    def _chat_fields(self) -> dict[str, Any]:
        messages = [m for message in self.messages for m in message.openai()]
        system = self.system if isinstance(self.system, str) or self.system is None else \
            "\n".join(block.text for block in self.system)
        if system:
            messages.insert(0, {"role": "system", "content": system})
        data: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.tools:
            data["tools"] = [{"type": "function", "function": {
                "name": t.name, "description": t.description, "parameters": t.input_schema}}
                for t in self.tools]
            data["tool_choice"] = _tool_choice(self.tool_choice)
            if self.tool_choice is not None and self.tool_choice.disable_parallel_tool_use:
                data["parallel_tool_calls"] = False
        if self.output_config is not None and self.output_config.format is not None:
            data["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "output", "schema": self.output_config.format.schema_}}
        if self.thinking is not None:
            data["chat_template_kwargs"] = {"enable_thinking": self.thinking.type != "disabled"}
        return data


def _tool_choice(choice: ToolChoice | None) -> Any:
    if choice is None or choice.type == "auto":
        return "auto"
    if choice.type == "any":
        return "required"
    if choice.type == "none":
        return "none"
    return {"type": "function", "function": {"name": choice.name}}


class MessagesRequest(_MessagesBase):
    """POST /v1/messages."""

    max_tokens: int = Field(ge=1, le=MAX_OUTPUT_TOKENS)
    stop_sequences: Annotated[list[StopSequence], Field(max_length=MAX_STOP_STRINGS)] | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1, le=1 << 30)
    stream: bool = False

    @model_validator(mode="after")
    def _budget_below_max_tokens(self) -> MessagesRequest:
        budget = self.thinking.budget_tokens if self.thinking is not None else None
        if budget is not None and budget >= self.max_tokens:
            raise InvalidRequestError("thinking.budget_tokens must be less than max_tokens",
                                      "thinking")
        return self

    def to_chat(self) -> ChatCompletionRequest:
        data = self._chat_fields()
        data.update(max_tokens=self.max_tokens, stop=self.stop_sequences,
                    temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return chat_request({k: v for k, v in data.items() if v is not None}, FIELD_NAMES)


class CountTokensRequest(_MessagesBase):
    """POST /v1/messages/count_tokens."""

    def to_chat(self) -> ChatCompletionRequest:
        return chat_request(self._chat_fields(), FIELD_NAMES)
