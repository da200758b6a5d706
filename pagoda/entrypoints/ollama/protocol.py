"""Ollama's request bodies, bounded like the OpenAI routes, and their translation into the
chat request pagoda's engine path takes (``ChatCompletionRequest``)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from pagoda.entrypoints.openai.internal_request import chat_request
from pagoda.entrypoints.openai.protocol import (
    MAX_MESSAGES,
    MAX_SEED,
    MAX_TOOL_CALLS,
    MAX_TOOLS,
    MIN_SEED,
    ChatCompletionRequest,
    NonEmptyName,
    Text,
)
from pagoda.errors import ConfigError, InvalidRequestError
from pagoda.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

Name = NonEmptyName
KeepAlive = int | float | Annotated[str, StringConstraints(max_length=32)] | None
MAX_IMAGES = 16
IMAGES_REFUSED = ("images are not supported: pagoda serves text-only models here; send "
                  "text content only")

# the sampling fields an Ollama option sets, for error messages
OPTION_NAMES = {"temperature": "options.temperature", "top_p": "options.top_p",
                "top_k": "options.top_k", "min_p": "options.min_p",
                "max_tokens": "options.num_predict", "stop": "options.stop",
                "seed": "options.seed", "repetition_penalty": "options.repeat_penalty",
                "presence_penalty": "options.presence_penalty",
                "frequency_penalty": "options.frequency_penalty", "response_format": "format",
                "messages": "messages", "tools": "tools"}


class OllamaModel(BaseModel):
    """Base of Ollama's request bodies: unknown fields are ignored, as Ollama does."""

    model_config = ConfigDict(extra="ignore")


def model_name(name: str) -> str:
    """A model name as pagoda serves it: Ollama's default ``:latest`` tag dropped."""
    return name.removesuffix(":latest")


class Options(OllamaModel):
    """``options``: the sampling options pagoda honours (others are ignored, as in Ollama)."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1 << 30)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    num_predict: int | None = Field(None, ge=-2, le=1 << 30)
    stop: Annotated[list[Annotated[str, StringConstraints(
        min_length=1, max_length=MAX_STOP_STRING_CHARS)]],
        Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    repeat_penalty: float | None = Field(None, gt=0.0, le=100.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    num_ctx: int | None = Field(None, ge=1, le=1 << 30)

    @field_validator("num_predict")
    @classmethod
    def _num_predict(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("num_predict must be positive, or -1 (no limit) / -2 (fill the "
                             "context)")
        return value

    def sampling(self) -> dict[str, Any]:
        """These options as chat-request fields."""
        out: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p,
                               "min_p": self.min_p, "seed": self.seed, "stop": self.stop,
                               "repetition_penalty": self.repeat_penalty,
                               "presence_penalty": self.presence_penalty,
                               "frequency_penalty": self.frequency_penalty}
        if self.top_k is not None:
            out["top_k"] = self.top_k or -1  # Ollama's 0: no top-k
        if self.num_predict is not None and self.num_predict > 0:
            out["max_tokens"] = self.num_predict
        return {k: v for k, v in out.items() if v is not None}


class ToolCallFunction(OllamaModel):
    name: Name
    arguments: dict[str, Any] = Field(default_factory=dict)


class ToolCall(OllamaModel):
    function: ToolCallFunction


class Message(OllamaModel):
    """One chat message; images are refused."""

    role: Literal["system", "user", "assistant", "tool"]
    content: Text = ""
    thinking: Text | None = None
    images: Annotated[list[Any], Field(max_length=MAX_IMAGES)] | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOL_CALLS)] | None = None
    tool_name: Name | None = None

    def openai(self) -> dict[str, Any]:
        """This message as an OpenAI chat message."""
        if self.images:
            raise InvalidRequestError(IMAGES_REFUSED, "messages.images")
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.role == "tool":
            out["tool_call_id"] = self.tool_name or "tool"
        if self.role == "assistant":
            if self.thinking:
                out["reasoning_content"] = self.thinking
            if self.tool_calls:
                out["tool_calls"] = [
                    {"id": f"call_{i}", "type": "function",
                     "function": {"name": c.function.name,
                                  "arguments": json.dumps(c.function.arguments)}}
                    for i, c in enumerate(self.tool_calls)]
        return out


class _Generation(OllamaModel):
    """What /api/chat and /api/generate share."""

    model: Name
    stream: bool = True
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options | None = None
    keep_alive: KeepAlive = None
    think: bool | Literal["low", "medium", "high"] | None = None

    def keep_alive_seconds(self) -> float | None:
        from pagoda.fleet.spec import parse_keep_alive
        if self.keep_alive is None:
            return None
        try:
            return parse_keep_alive(self.keep_alive)
        except ConfigError as exc:
            raise InvalidRequestError(str(exc), "keep_alive") from None

    def _common(self) -> dict[str, Any]:
        data: dict[str, Any] = {"model": model_name(self.model), "stream": False}
        data.update((self.options or Options()).sampling())
        if self.format == "json":
            data["response_format"] = {"type": "json_object"}
        elif isinstance(self.format, dict):
            data["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "format", "schema": self.format}}
        if self.think is not None:
            data["chat_template_kwargs"] = {"enable_thinking": self.think is not False}
        return data


class ChatRequest(_Generation):
    """POST /api/chat."""

    messages: Annotated[list[Message], Field(max_length=MAX_MESSAGES)] = Field(
        default_factory=list)
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None

    def to_chat(self) -> ChatCompletionRequest:
        data = self._common()
        data["messages"] = [m.openai() for m in self.messages]
        if self.tools:
            data["tools"] = self.tools
        return chat_request(data, OPTION_NAMES)


class GenerateRequest(_Generation):
    """POST /api/generate."""

    prompt: Text = ""
    system: Text | None = None
    template: Text | None = None
    suffix: Text | None = None
    raw: bool = False
    images: Annotated[list[Any], Field(max_length=MAX_IMAGES)] | None = None
    context: list[int] | None = None

    def to_chat(self) -> ChatCompletionRequest:
        if self.images:
            raise InvalidRequestError(IMAGES_REFUSED, "images")
        if self.suffix:
            raise InvalidRequestError("suffix (fill-in-the-middle) is not supported", "suffix")
        if self.context:
            raise InvalidRequestError("context is not supported; send the conversation to "
                                      "/api/chat instead", "context")
        data = self._common()
        messages = [{"role": "system", "content": self.system}] if self.system else []
        data["messages"] = messages + [{"role": "user", "content": self.prompt}]
        if self.template:
            from pagoda.tokenizer.go_template import to_jinja
            try:
                data["chat_template"] = to_jinja(self.template)
            except ValueError as exc:
                raise InvalidRequestError(f"template: {exc}", "template") from None
        return chat_request(data, OPTION_NAMES)


class ModelRequest(OllamaModel):
    """/api/show, /api/delete, /api/pull: a model name (``name`` is Ollama's older key)."""

    model: Name | None = None
    name: Name | None = None
    stream: bool = True

    @property
    def target(self) -> str:
        name = self.model or self.name
        if not name:
            raise InvalidRequestError("model is required", "model")
        return model_name(name)


class CopyRequest(OllamaModel):
    """POST /api/copy."""

    source: Name
    destination: Name
