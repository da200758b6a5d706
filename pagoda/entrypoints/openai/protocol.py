"""Pydantic models of the OpenAI API as pagoda serves it (vLLM's extras included).

Requests ignore unknown fields (clients send new ones) and bound every user-controlled size.
Responses serialize to OpenAI's exact JSON with a plain ``model_dump()`` /
``model_dump_json()``: fields OpenAI omits when empty carry ``exclude_if``, fields OpenAI
sends as explicit nulls (``logprobs``, ``finish_reason``, stream ``usage``) stay. Do not
serialize responses with ``exclude_none=True``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pagoda.errors import ConfigError, InvalidRequestError
from pagoda.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    SamplingParams,
)
from pagoda.structured_output.params import (
    MAX_CHOICE_CHARS,
    MAX_CHOICES,
    MAX_SPEC_CHARS,
    StructuredOutputsParams,
)

# Bounds on request sizes (the HTTP layer's body limit bounds the total on top of these).
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 1024
MAX_CONTENT_CHARS = 4 << 20  # one content string, one prompt string, tool-call arguments
MAX_PROMPTS = 1024  # prompts in one /v1/completions request
MAX_PROMPT_TOKENS = 1 << 20  # token ids in one prompt or one /detokenize request
MAX_TOKEN_ID = (1 << 31) - 1
MAX_NAME_CHARS = 256  # model names, message names, tool names, ids, user
MAX_DESCRIPTION_CHARS = 1 << 16
MAX_TOOLS = 128
MAX_TOOL_CALLS = 128
MAX_CHAT_TEMPLATE_CHARS = 1 << 16
MAX_CHAT_TEMPLATE_KWARGS = 64
MAX_DOCUMENTS = 256
MAX_LOGIT_BIAS_KEY_CHARS = 16
MIN_PRIORITY, MAX_PRIORITY = -(1 << 31), (1 << 31) - 1
MIN_SEED, MAX_SEED = -(1 << 63), (1 << 64) - 1
MAX_COUNT = 1 << 30  # min_tokens, top_k


def _token_id_guard(max_len: int) -> BeforeValidator:
    """Check a token-id list in one pass with one error, not one error per bad element."""
    def check(value: Any) -> Any:
        if not isinstance(value, list) or len(value) > max_len:
            return value  # pydantic reports the type or length error (length before items)
        if not all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in value):
            raise PydanticCustomError(
                "token_ids", "token ids must be integers in [0, {max_id}]",
                {"max_id": MAX_TOKEN_ID})
        return value
    return BeforeValidator(check)


def _token_ids(min_len: int, max_len: int) -> Any:
    return Annotated[list[int], _token_id_guard(max_len), Field(min_length=min_len,
                                                                max_length=max_len)]


Name = Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)]
Text = Annotated[str, StringConstraints(max_length=MAX_CONTENT_CHARS)]
TokenIds = _token_ids(1, MAX_PROMPT_TOKENS)
AnyTokenIds = _token_ids(0, MAX_PROMPT_TOKENS)
StopTokenIds = _token_ids(0, MAX_STOP_TOKEN_IDS)
PromptText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CONTENT_CHARS)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
LogitBiasKey = Annotated[str, StringConstraints(max_length=MAX_LOGIT_BIAS_KEY_CHARS)]
LogitBiasValue = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]
LogitBias = Annotated[dict[LogitBiasKey, LogitBiasValue], Field(max_length=MAX_LOGIT_BIAS)]
NonEmptyName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)]
CacheSalt = NonEmptyName
ChatTemplate = Annotated[str, StringConstraints(max_length=MAX_CHAT_TEMPLATE_CHARS)]
TemplateKwargs = Annotated[dict[str, Any], Field(max_length=MAX_CHAT_TEMPLATE_KWARGS)]


def _prompt_shape(value: Any) -> str | None:
    """Which form of prompt this is, so only that form is validated (no union fan-out)."""
    if isinstance(value, str):
        return "Text"
    if not isinstance(value, list):
        return None
    first = value[0] if value else ""
    if isinstance(first, str):
        return "TextList"
    if isinstance(first, list):
        return "TokenIdLists"
    return "TokenIds" if type(first) is int else None


Prompt = Annotated[
    Annotated[PromptText, Tag("Text")]
    | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS), Tag("TextList")]
    | Annotated[TokenIds, Tag("TokenIds")]
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS), Tag("TokenIdLists")],
    Discriminator(_prompt_shape, custom_error_type="invalid_prompt",
                  custom_error_message="prompt must be a string, a list of strings, a list of "
                                       "token ids or a list of token-id lists")]

_MEDIA_PART_TYPES = frozenset({"image_url", "input_image", "image", "input_audio", "audio_url",
                               "video_url", "video", "file", "input_file"})


def _omit_none(value: Any) -> bool:
    return value is None


def random_id(prefix: str) -> str:
    """A fresh OpenAI-style object id, e.g. ``chatcmpl-<32 hex digits>``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


class OpenAIModel(BaseModel):
    """Base of every request model: unknown fields are ignored, never an error."""

    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------------- chat messages


def _check_content_part(value: Any) -> Any:
    """One clear error for a non-text content part instead of a pydantic union dump."""
    if not isinstance(value, Mapping) or value.get("type") == "text":
        return value
    kind = value.get("type")
    if isinstance(kind, str) and kind in _MEDIA_PART_TYPES:
        raise PydanticCustomError(
            "unsupported_content",
            "'{kind}' content parts are not supported by this server; only 'text' parts are",
            {"kind": kind})
    raise PydanticCustomError(
        "unsupported_content", "content parts must have type 'text'; no other type is supported")


class TextContentPart(OpenAIModel):
    """One ``{"type": "text", "text": ...}`` part of a message's content."""

    type: Literal["text"]
    text: Text


ContentParts = Annotated[
    list[Annotated[TextContentPart, BeforeValidator(_check_content_part)]],
    Field(min_length=1, max_length=MAX_CONTENT_PARTS)]
Content = Text | ContentParts


class FunctionCall(OpenAIModel):
    """The function a tool call invokes, with its arguments as a JSON string."""

    name: Name
    arguments: Text = "{}"


class ToolCall(OpenAIModel):
    """A tool call: in an assistant message of a request, or generated in a response."""

    id: Name = Field(default_factory=lambda: random_id("call"))
    type: Literal["function"] = "function"
    function: FunctionCall


class _MessageBase(OpenAIModel):
    """Fields and behaviour every chat message has."""

    name: Name | None = None

    def template_dict(self) -> dict[str, Any]:
        """This message as a chat template expects it: content flattened to one string."""
        out = self.model_dump(exclude_none=True)
        content = getattr(self, "content", None)
        if isinstance(content, list):
            out["content"] = "\n".join(part.text for part in content)
        return out


class SystemMessage(_MessageBase):
    """A system prompt."""

    role: Literal["system"]
    content: Content


class DeveloperMessage(_MessageBase):
    """A developer prompt (OpenAI's newer name for system instructions)."""

    role: Literal["developer"]
    content: Content


class UserMessage(_MessageBase):
    """A user turn."""

    role: Literal["user"]
    content: Content


class AssistantMessage(_MessageBase):
    """An earlier assistant turn, possibly with the tool calls it made."""

    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOL_CALLS)] | None = None
    # the reasoning a response returned, passed back (Qwen3's template keeps it in <think>)
    reasoning_content: Text | None = None
    reasoning: Text | None = None  # vLLM's newer name for the same text

    def template_dict(self) -> dict[str, Any]:
        out = super().template_dict()
        out.setdefault("content", "")  # a tool-calling turn has none; templates concatenate it
        for call in out.get("tool_calls", []):
            call["function"]["arguments"] = _json_object_or_text(call["function"]["arguments"])
        return out


class ToolMessage(_MessageBase):
    """The result of a tool call, sent back by the client."""

    role: Literal["tool"]
    content: Content
    tool_call_id: Name


def _json_object_or_text(arguments: str) -> Any:
    """Templates index tool-call arguments as a mapping; keep the text if it is not one."""
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return arguments
    return parsed if isinstance(parsed, dict) else arguments


_ROLE_TAGS: Mapping[str, str] = MappingProxyType({
    "system": "SystemMessage", "developer": "DeveloperMessage", "user": "UserMessage",
    "assistant": "AssistantMessage", "tool": "ToolMessage"})


def _message_tag(value: Any) -> str | None:
    role = value.get("role") if isinstance(value, Mapping) else getattr(value, "role", None)
    return _ROLE_TAGS.get(role) if isinstance(role, str) else None


ChatMessage = Annotated[
    Annotated[SystemMessage, Tag("SystemMessage")]
    | Annotated[DeveloperMessage, Tag("DeveloperMessage")]
    | Annotated[UserMessage, Tag("UserMessage")]
    | Annotated[AssistantMessage, Tag("AssistantMessage")]
    | Annotated[ToolMessage, Tag("ToolMessage")],
    Discriminator(_message_tag, custom_error_type="invalid_role",
                  custom_error_message="each message needs a role of 'system', 'developer', "
                                       "'user', 'assistant' or 'tool'")]
Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]


# --------------------------------------------------------------------------- tools


class FunctionDefinition(OpenAIModel):
    """A function the model may call; ``parameters`` is a JSON schema (checked later)."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)]
    description: Annotated[str, StringConstraints(max_length=MAX_DESCRIPTION_CHARS)] | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIModel):
    """One entry of ``tools``."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    """The function a named ``tool_choice`` forces."""

    name: Name


class NamedToolChoice(OpenAIModel):
    """``{"type": "function", "function": {"name": ...}}``: call exactly this tool."""

    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(OpenAIModel):
    """``response_format.json_schema``; the schema itself is validated when compiled."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: Name = "response"
    description: Annotated[str, StringConstraints(max_length=MAX_DESCRIPTION_CHARS)] | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    """``response_format``: accepted here, enforced by structured output."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


SpecText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SPEC_CHARS)]
Choices = Annotated[list[Annotated[str, StringConstraints(min_length=1,
                                                          max_length=MAX_CHOICE_CHARS)]],
                    Field(min_length=1, max_length=MAX_CHOICES)]


class StructuredOutputsRequest(OpenAIModel):
    """vLLM's ``structured_outputs``: exactly one constraint on the generated text."""

    json_: dict[str, Any] | SpecText | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: SpecText | None = None
    choice: Choices | None = None
    grammar: SpecText | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_params(self, field: str) -> StructuredOutputsParams:
        schema = self.json_
        if isinstance(schema, dict):
            schema = json.dumps(schema)
        return _structured_params(field, json=schema, json_object=bool(self.json_object),
                                  regex=self.regex, choice=list(self.choice or []),
                                  grammar=self.grammar)


def _structured_params(field: str, **kwargs: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kwargs)
    except InvalidRequestError as exc:
        raise InvalidRequestError(exc.message, field) from None


class StreamOptions(OpenAIModel):
    """``stream_options``: a final usage chunk, and (vLLM) usage on every chunk."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


# --------------------------------------------------------------------------- requests


class _GenerationRequest(OpenAIModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Name | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: StopString | StopList | None = None
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: LogitBias | None = None
    user: Name | None = None
    echo: bool = False
    # vLLM extras
    top_k: int | None = Field(None, ge=-1, le=MAX_COUNT)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    min_tokens: int = Field(0, ge=0, le=MAX_COUNT)
    ignore_eos: bool = False
    stop_token_ids: StopTokenIds | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = Field(0, ge=MIN_PRIORITY, le=MAX_PRIORITY)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    cache_salt: CacheSalt | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    # the older vLLM spelling of structured_outputs
    guided_json: dict[str, Any] | SpecText | None = None
    guided_regex: SpecText | None = None
    guided_choice: Choices | None = None
    guided_grammar: SpecText | None = None
    # Ollama's: how long the model stays loaded after this request ("5m", 0, -1)
    keep_alive: int | float | Annotated[str, StringConstraints(max_length=32)] | None = None

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive(cls, value: Any) -> Any:
        if value is not None:
            from pagoda.fleet.spec import parse_keep_alive
            try:
                parse_keep_alive(value)
            except ConfigError as exc:
                raise PydanticCustomError("keep_alive", str(exc)) from None
        return value

    def keep_alive_seconds(self) -> float | None:
        """keep_alive in seconds (FOREVER for negative values), None if not given."""
        from pagoda.fleet.spec import parse_keep_alive
        return None if self.keep_alive is None else parse_keep_alive(self.keep_alive)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isascii() or not key.isdigit() or int(key) > MAX_TOKEN_ID:
                raise PydanticCustomError("logit_bias_key",
                                          "logit_bias keys must be token ids (decimal integers)")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true",
                                      "stream_options")
        return self

    @property
    def stop_list(self) -> list[str]:
        """``stop`` normalized to a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def _sampling_kwargs(self, defaults: Mapping[str, Any] | None) -> dict[str, Any]:
        """The sampling fields shared by both endpoints; unset ones fall back to defaults."""
        optional = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                    "min_p": self.min_p, "presence_penalty": self.presence_penalty,
                    "frequency_penalty": self.frequency_penalty,
                    "repetition_penalty": self.repetition_penalty}
        kwargs = {k: v for k, v in (defaults or {}).items() if k in optional}
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        kwargs.update(
            n=self.n, seed=self.seed, stop=self.stop_list, stop_token_ids=self.stop_token_ids or [],
            logit_bias=dict(self.logit_bias) if self.logit_bias else None,
            min_tokens=self.min_tokens, ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens)
        return kwargs

    def structured_constraints(self) -> list[tuple[str, StructuredOutputsParams]]:
        """Each output constraint the request sets, with the field that set it."""
        found = []
        if self.structured_outputs is not None:
            found.append(("structured_outputs",
                          self.structured_outputs.to_params("structured_outputs")))
        guided = {"json": self.guided_json, "regex": self.guided_regex,
                  "choice": self.guided_choice, "grammar": self.guided_grammar}
        given = [name for name, value in guided.items() if value is not None]
        if given:
            field = f"guided_{given[0]}"
            found.append((field, StructuredOutputsRequest(**guided).to_params(field)))
        return found

    @staticmethod
    def _one_constraint(found: list[tuple[str, StructuredOutputsParams]]
                        ) -> StructuredOutputsParams | None:
        if len(found) > 1:
            fields = " and ".join(name for name, _ in found)
            raise InvalidRequestError(f"give only one output constraint, not {fields}",
                                      found[1][0])
        return found[0][1] if found else None

    def _build(self, kwargs: dict[str, Any], api_names: Mapping[str, str]) -> SamplingParams:
        """SamplingParams, its errors renamed to the API field the client actually sent."""
        try:
            return SamplingParams(**kwargs)
        except InvalidRequestError as exc:
            param = api_names.get(exc.param or "", exc.param)
            raise InvalidRequestError(exc.message, param, exc.code) from None


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt: Prompt
    suffix: Text | None = None
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise PydanticCustomError("unsupported_value",
                                      "best_of is not supported; omit it or use 1")
        return value

    def check_supported(self) -> None:
        """Reject what the schema accepts but the server does not implement."""
        if self.suffix is not None:
            raise InvalidRequestError("suffix is not supported by this server", "suffix")

    def to_sampling_params(self, default_max_tokens: int, *,
                           defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """This request's SamplingParams; ``defaults`` (e.g. the model's generation config)
        fill the sampling fields the request leaves unset."""
        self.check_supported()
        kwargs = self._sampling_kwargs(defaults)
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo and self.logprobs is not None:
            prompt_logprobs = self.logprobs
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        kwargs.update(max_tokens=max_tokens, logprobs=self.logprobs,
                      prompt_logprobs=prompt_logprobs,
                      structured_outputs=self._one_constraint(self.structured_constraints()))
        names = {} if self.prompt_logprobs is not None else {"prompt_logprobs": "logprobs"}
        return self._build(kwargs, names)


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: Messages
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Annotated[list[ChatTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # vLLM extras
    chat_template: ChatTemplate | None = None
    chat_template_kwargs: TemplateKwargs | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: Annotated[list[dict[str, str]], Field(max_length=MAX_DOCUMENTS)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise InvalidRequestError(
                "continue_final_message needs the last message to be an assistant message",
                "messages")
        self._check_tool_choice()
        return self

    def _check_tool_choice(self) -> None:
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto"):
            return
        if not self.tools:
            raise InvalidRequestError("tool_choice requires tools to be given", "tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {
                tool.function.name for tool in self.tools}:
            raise InvalidRequestError("tool_choice names a function that is not in tools",
                                      "tool_choice")

    def chat_constraints(self) -> list[tuple[str, StructuredOutputsParams]]:
        """The output constraints, ``response_format`` included."""
        found = self.structured_constraints()
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            found.append(("response_format",
                          _structured_params("response_format", json_object=True)))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.json_schema is None:
                raise InvalidRequestError("response_format json_schema needs a schema",
                                          "response_format")
            found.append(("response_format", _structured_params(
                "response_format", json=json.dumps(fmt.json_schema.json_schema))))
        return found

    @property
    def effective_max_tokens(self) -> int | None:
        """``max_completion_tokens`` if given, else the deprecated ``max_tokens``."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def conversation(self) -> list[dict[str, Any]]:
        """The messages as plain dicts for the chat template."""
        return [message.template_dict() for message in self.messages]

    def to_sampling_params(self, default_max_tokens: int, *,
                           defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """This request's SamplingParams; ``defaults`` (e.g. the model's generation config)
        fill the sampling fields the request leaves unset."""
        kwargs = self._sampling_kwargs(defaults)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo and logprobs is not None:
            prompt_logprobs = logprobs
        max_tokens = self.effective_max_tokens
        kwargs.update(max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
                      logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                      structured_outputs=self._one_constraint(self.chat_constraints()))
        names = {"logprobs": "top_logprobs", "max_tokens": "max_completion_tokens"
                 if self.max_completion_tokens is not None else "max_tokens"}
        if self.prompt_logprobs is None:
            names["prompt_logprobs"] = "top_logprobs"
        return self._build(kwargs, names)


class TokenizeRequest(OpenAIModel):
    """POST /tokenize: either ``prompt`` or ``messages`` (rendered with the chat template)."""

    model: Name | None = None
    prompt: Text | None = None
    messages: Messages | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: TemplateKwargs | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages", "prompt")
        return self

    def conversation(self) -> list[dict[str, Any]]:
        """The messages as plain dicts for the chat template (empty for a plain prompt)."""
        return [message.template_dict() for message in self.messages or []]


class DetokenizeRequest(OpenAIModel):
    """POST /detokenize."""

    model: Name | None = None
    tokens: AnyTokenIds


class StopRequest(OpenAIModel):
    """POST /pagoda/stop: unload one model of a several-model server."""

    model: Name


# --------------------------------------------------------------------------- responses


class PromptTokensDetails(BaseModel):
    """``usage.prompt_tokens_details``."""

    cached_tokens: int = 0


class UsageInfo(BaseModel):
    """Token counts of a request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = Field(None, exclude_if=_omit_none)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int,
           cached_tokens: int | None = None) -> UsageInfo:
        """Usage with the total filled in."""
        details = (None if cached_tokens is None
                   else PromptTokensDetails(cached_tokens=cached_tokens))
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)


class CompletionLogProbs(BaseModel):
    """Legacy completions logprobs: parallel lists, one entry per token."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(BaseModel):
    """One completion in a /v1/completions response."""

    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or token id that ended it
    prompt_logprobs: list[dict[int, Any] | None] | None = Field(None, exclude_if=_omit_none)


class CompletionResponse(BaseModel):
    """A /v1/completions response."""

    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo


class CompletionResponseStreamChoice(BaseModel):
    """One completion's delta in a /v1/completions stream chunk."""

    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionStreamResponse(BaseModel):
    """One SSE chunk of a streamed /v1/completions response."""

    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionResponseStreamChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    """One candidate token at a position."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionLogProb(TopLogprob):
    """The chosen token at a position, with the top candidates."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogProbs(BaseModel):
    """``choices[].logprobs`` of a chat response."""

    content: list[ChatCompletionLogProb] | None = None


class ChatResponseMessage(BaseModel):
    """The assistant message of a chat response."""

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = Field(None, exclude_if=_omit_none)
    reasoning: str | None = Field(None, exclude_if=_omit_none)  # vLLM's newer name, same text
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=_omit_none)


class ChatCompletionResponseChoice(BaseModel):
    """One choice of a chat response."""

    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    """A /v1/chat/completions response."""

    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[int, Any] | None] | None = Field(None, exclude_if=_omit_none)


class DeltaFunctionCall(BaseModel):
    """A piece of a streamed tool call's function."""

    name: str | None = Field(None, exclude_if=_omit_none)
    arguments: str | None = Field(None, exclude_if=_omit_none)


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call; ``index`` says which call it extends."""

    index: int
    id: str | None = Field(None, exclude_if=_omit_none)
    type: Literal["function"] | None = Field(None, exclude_if=_omit_none)
    function: DeltaFunctionCall | None = Field(None, exclude_if=_omit_none)


class DeltaMessage(BaseModel):
    """``choices[].delta`` of a chat stream chunk; absent parts are left out."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_omit_none)
    content: str | None = Field(None, exclude_if=_omit_none)
    reasoning_content: str | None = Field(None, exclude_if=_omit_none)
    reasoning: str | None = Field(None, exclude_if=_omit_none)
    tool_calls: list[DeltaToolCall] | None = Field(None, exclude_if=_omit_none)


class ChatCompletionResponseStreamChoice(BaseModel):
    """One choice of a chat stream chunk."""

    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    """One SSE chunk of a streamed chat response (the usage chunk has ``choices == []``)."""

    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionResponseStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    """One entry of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "pagoda"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    state: str | None = None  # pagoda: loaded, sleeping, unloaded, loading or waking


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class TokenizeResponse(BaseModel):
    """POST /tokenize result."""

    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = Field(None, exclude_if=_omit_none)


class DetokenizeResponse(BaseModel):
    """POST /detokenize result."""

    prompt: str
