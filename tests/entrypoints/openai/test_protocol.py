"""Protocol models: bounds, lenient parsing, SamplingParams mapping, OpenAI response shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from pagoda.entrypoints.openai import protocol as p
from pagoda.entrypoints.openai.errors import pydantic_error_to_body
from pagoda.errors import InvalidRequestError
from pagoda.sampling_params import (
    MAX_LOGIT_BIAS,
    MAX_N,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
)

USER = {"role": "user", "content": "hi"}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "hi", **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [USER], **fields}


def user(content: Any) -> dict[str, Any]:
    return chat(messages=[{"role": "user", "content": content}])


def rejected_param(model: type, body: dict[str, Any]) -> str | None:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return pydantic_error_to_body(info.value)["error"]["param"]


C, CHAT = p.CompletionRequest, p.ChatCompletionRequest

# (model, accepted body, rejected body, param named by the rejection)
BOUNDS = [
    (C, completion(n=MAX_N), completion(n=MAX_N + 1), "n"),
    (C, completion(n=1), completion(n=0), "n"),
    (CHAT, chat(n=MAX_N), chat(n=MAX_N + 1), "n"),
    (C, completion(max_tokens=1), completion(max_tokens=0), "max_tokens"),
    (CHAT, chat(max_tokens=1), chat(max_tokens=0), "max_tokens"),
    (CHAT, chat(max_completion_tokens=1), chat(max_completion_tokens=0), "max_completion_tokens"),
    (C, completion(temperature=2.0), completion(temperature=2.01), "temperature"),
    (C, completion(temperature=0.0), completion(temperature=-0.1), "temperature"),
    (CHAT, chat(temperature=2), chat(temperature=3), "temperature"),
    (C, completion(top_p=1.0), completion(top_p=0.0), "top_p"),
    (C, completion(top_p=0.01), completion(top_p=1.01), "top_p"),
    (C, completion(logprobs=20), completion(logprobs=21), "logprobs"),
    (C, completion(logprobs=0), completion(logprobs=-1), "logprobs"),
    (CHAT, chat(logprobs=True, top_logprobs=20), chat(logprobs=True, top_logprobs=21),
     "top_logprobs"),
    (CHAT, chat(logprobs=True, top_logprobs=0), chat(logprobs=True, top_logprobs=-1),
     "top_logprobs"),
    (C, completion(prompt_logprobs=20), completion(prompt_logprobs=21), "prompt_logprobs"),
    (C, completion(stop=["s"] * MAX_STOP_STRINGS), completion(stop=["s"] * (MAX_STOP_STRINGS + 1)),
     "stop"),
    (CHAT, chat(stop="x" * MAX_STOP_STRING_CHARS), chat(stop="x" * (MAX_STOP_STRING_CHARS + 1)),
     "stop"),
    (C, completion(stop=["x" * MAX_STOP_STRING_CHARS]),
     completion(stop=["x" * (MAX_STOP_STRING_CHARS + 1)]), "stop.0"),
    (C, completion(stop="s"), completion(stop=""), "stop"),
    (C, completion(presence_penalty=2.0), completion(presence_penalty=2.1), "presence_penalty"),
    (C, completion(frequency_penalty=-2.0), completion(frequency_penalty=-2.1),
     "frequency_penalty"),
    (C, completion(logit_bias={str(i): 1 for i in range(MAX_LOGIT_BIAS)}),
     completion(logit_bias={str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}), "logit_bias"),
    (CHAT, chat(logit_bias={"5": 100}), chat(logit_bias={"5": 100.5}), "logit_bias"),
    (CHAT, chat(logit_bias={"5": -100}), chat(logit_bias={"5": -101}), "logit_bias"),
    (CHAT, chat(logit_bias={"5": 1}), chat(logit_bias={"five": 1}), "logit_bias"),
    (C, completion(seed=2**64 - 1), completion(seed=2**64), "seed"),
    (C, completion(seed=-(2**63)), completion(seed=-(2**63) - 1), "seed"),
    (C, completion(top_k=-1), completion(top_k=-2), "top_k"),
    (C, completion(top_k=p.MAX_COUNT), completion(top_k=p.MAX_COUNT + 1), "top_k"),
    (C, completion(min_p=1.0), completion(min_p=1.1), "min_p"),
    (C, completion(repetition_penalty=100.0), completion(repetition_penalty=0.0),
     "repetition_penalty"),
    (C, completion(min_tokens=0), completion(min_tokens=-1), "min_tokens"),
    (C, completion(stop_token_ids=[0] * MAX_STOP_TOKEN_IDS),
     completion(stop_token_ids=[0] * (MAX_STOP_TOKEN_IDS + 1)), "stop_token_ids"),
    (C, completion(stop_token_ids=[p.MAX_TOKEN_ID]), completion(stop_token_ids=[-1]),
     "stop_token_ids"),
    (C, completion(priority=p.MAX_PRIORITY), completion(priority=p.MAX_PRIORITY + 1), "priority"),
    (C, completion(priority=p.MIN_PRIORITY), completion(priority=p.MIN_PRIORITY - 1), "priority"),
    (C, completion(best_of=1), completion(best_of=2), "best_of"),
    (C, completion(model="m" * p.MAX_NAME_CHARS), completion(model="m" * (p.MAX_NAME_CHARS + 1)),
     "model"),
    (C, completion(user="u" * p.MAX_NAME_CHARS), completion(user="u" * (p.MAX_NAME_CHARS + 1)),
     "user"),
    (C, completion(prompt=["a"] * p.MAX_PROMPTS), completion(prompt=["a"] * (p.MAX_PROMPTS + 1)),
     "prompt"),
    (C, completion(prompt=[[1]] * p.MAX_PROMPTS), completion(prompt=[[1]] * (p.MAX_PROMPTS + 1)),
     "prompt"),
    (C, completion(prompt=[1] * p.MAX_PROMPT_TOKENS),
     completion(prompt=[1] * (p.MAX_PROMPT_TOKENS + 1)), "prompt"),
    (C, completion(prompt=[p.MAX_TOKEN_ID]), completion(prompt=[p.MAX_TOKEN_ID + 1]), "prompt"),
    (C, completion(prompt="x" * p.MAX_CONTENT_CHARS),
     completion(prompt="x" * (p.MAX_CONTENT_CHARS + 1)), "prompt"),
    (C, completion(prompt="x"), completion(prompt=""), "prompt"),
    (C, completion(prompt=[1]), completion(prompt=[]), "prompt"),
    (CHAT, chat(messages=[USER] * p.MAX_MESSAGES), chat(messages=[USER] * (p.MAX_MESSAGES + 1)),
     "messages"),
    (CHAT, chat(messages=[USER]), chat(messages=[]), "messages"),
    (CHAT, user("x" * p.MAX_CONTENT_CHARS), user("x" * (p.MAX_CONTENT_CHARS + 1)),
     "messages.0.content"),
    (CHAT, user([{"type": "text", "text": "a"}] * p.MAX_CONTENT_PARTS),
     user([{"type": "text", "text": "a"}] * (p.MAX_CONTENT_PARTS + 1)), "messages.0.content"),
    (CHAT, user([{"type": "text", "text": "a"}]), user([]), "messages.0.content"),
    (CHAT, chat(tools=[TOOL] * p.MAX_TOOLS), chat(tools=[TOOL] * (p.MAX_TOOLS + 1)), "tools"),
    (CHAT, chat(chat_template="x" * p.MAX_CHAT_TEMPLATE_CHARS),
     chat(chat_template="x" * (p.MAX_CHAT_TEMPLATE_CHARS + 1)), "chat_template"),
    (CHAT, chat(chat_template_kwargs={str(i): 1 for i in range(p.MAX_CHAT_TEMPLATE_KWARGS)}),
     chat(chat_template_kwargs={str(i): 1 for i in range(p.MAX_CHAT_TEMPLATE_KWARGS + 1)}),
     "chat_template_kwargs"),
    (CHAT, chat(messages=[{"role": "assistant", "tool_calls": [
        {"id": "c", "function": {"name": "f"}}] * p.MAX_TOOL_CALLS}]),
     chat(messages=[{"role": "assistant", "tool_calls": [
         {"id": "c", "function": {"name": "f"}}] * (p.MAX_TOOL_CALLS + 1)}]),
     "messages.0.tool_calls"),
    (p.DetokenizeRequest, {"tokens": [1] * p.MAX_PROMPT_TOKENS},
     {"tokens": [1] * (p.MAX_PROMPT_TOKENS + 1)}, "tokens"),
    (p.DetokenizeRequest, {"tokens": [0]}, {"tokens": [-1]}, "tokens"),
    (p.TokenizeRequest, {"prompt": "x" * p.MAX_CONTENT_CHARS},
     {"prompt": "x" * (p.MAX_CONTENT_CHARS + 1)}, "prompt"),
]


@pytest.mark.parametrize("model,ok,bad,param", BOUNDS,
                         ids=[f"{i}-{row[3]}" for i, row in enumerate(BOUNDS)])
def test_bounds(model: type, ok: dict, bad: dict, param: str) -> None:
    model.model_validate(ok)
    assert rejected_param(model, bad) == param


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "hot", [1]])
def test_temperature_rejects_non_numbers(value: Any) -> None:
    assert rejected_param(C, completion(temperature=value)) == "temperature"


def test_unknown_fields_are_ignored() -> None:
    body = chat(store=True, metadata={"k": "v"}, reasoning_effort="low", service_tier="auto",
                modalities=["text"], brand_new_field={"x": [1]},
                messages=[{"role": "user", "content": [{"type": "text", "text": "hi", "x": 1}],
                           "weird": 1}])
    request = CHAT.model_validate(body)
    dump = request.model_dump()
    assert "store" not in dump and "weird" not in dump["messages"][0]
    assert "x" not in dump["messages"][0]["content"][0]
    request = C.model_validate(completion(stream_options=None, novel=1, service_tier="x"))
    assert request.prompt == "hi"


def test_model_is_optional_and_defaults() -> None:
    request = C.model_validate({"prompt": "hi"})
    assert (request.model, request.max_tokens, request.n, request.stream) == (None, 16, 1, False)
    request = CHAT.model_validate({"messages": [USER]})
    assert request.add_generation_prompt and not request.continue_final_message
    assert request.effective_max_tokens is None


@pytest.mark.parametrize("prompt", ["hi", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_prompt_forms(prompt: Any) -> None:
    assert C.model_validate(completion(prompt=prompt)).prompt == prompt


@pytest.mark.parametrize("prompt,param", [
    (5, "prompt"), (None, "prompt"), ({"a": 1}, "prompt"), ([1.5], "prompt"), ([True], "prompt"),
    ([1, "a"], "prompt"), (["a", 1], "prompt.1"), ([[1], ["a"]], "prompt.1"), ([-1], "prompt"),
])
def test_bad_prompts(prompt: Any, param: str) -> None:
    assert rejected_param(C, completion(prompt=prompt)) == param


def test_huge_wrong_token_list_fails_fast_with_one_error() -> None:
    with pytest.raises(ValidationError) as info:
        C.model_validate({"prompt": [1] * 1000 + ["x"] * 100_000})
    assert info.value.error_count() == 1
    with pytest.raises(ValidationError) as info:
        p.DetokenizeRequest.model_validate({"tokens": ["x"] * 100_000})
    assert info.value.error_count() == 1


# ---------------------------------------------------------------- SamplingParams mapping


def test_max_completion_tokens_wins() -> None:
    def max_tokens(**fields: Any) -> int | None:
        return CHAT.model_validate(chat(**fields)).to_sampling_params(99).max_tokens
    assert max_tokens(max_tokens=5, max_completion_tokens=7) == 7
    assert max_tokens(max_tokens=5) == 5
    assert max_tokens(max_completion_tokens=7) == 7
    assert max_tokens() == 99
    assert C.model_validate(completion()).to_sampling_params(99).max_tokens == 16
    assert C.model_validate(completion(max_tokens=None)).to_sampling_params(99).max_tokens == 99


def test_sampling_errors_name_the_api_field() -> None:
    request = CHAT.model_validate(chat(max_completion_tokens=2**40))
    with pytest.raises(InvalidRequestError) as info:
        request.to_sampling_params(10)
    assert info.value.param == "max_completion_tokens"
    with pytest.raises(InvalidRequestError) as info:
        CHAT.model_validate(chat(max_tokens=2**40)).to_sampling_params(10)
    assert info.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as info:
        C.model_validate(completion(max_tokens=3, min_tokens=5)).to_sampling_params(10)
    assert info.value.param == "min_tokens"


@pytest.mark.parametrize("fields,logprobs,prompt_logprobs", [
    ({}, None, None),
    ({"logprobs": 0}, 0, None),
    ({"logprobs": 5}, 5, None),
    ({"logprobs": 5, "echo": True}, 5, 5),
    ({"echo": True}, None, None),
    ({"logprobs": 5, "echo": True, "prompt_logprobs": 2}, 5, 2),
])
def test_completion_logprobs_mapping(fields: dict, logprobs: int | None,
                                     prompt_logprobs: int | None) -> None:
    params = C.model_validate(completion(**fields)).to_sampling_params(16)
    assert (params.logprobs, params.prompt_logprobs) == (logprobs, prompt_logprobs)


@pytest.mark.parametrize("fields,logprobs,prompt_logprobs", [
    ({}, None, None),
    ({"logprobs": False}, None, None),
    ({"logprobs": True}, 0, None),
    ({"logprobs": True, "top_logprobs": 4}, 4, None),
    ({"logprobs": False, "top_logprobs": 0}, None, None),
    ({"logprobs": True, "top_logprobs": 3, "echo": True}, 3, 3),
])
def test_chat_logprobs_mapping(fields: dict, logprobs: int | None,
                               prompt_logprobs: int | None) -> None:
    params = CHAT.model_validate(chat(**fields)).to_sampling_params(16)
    assert (params.logprobs, params.prompt_logprobs) == (logprobs, prompt_logprobs)


def test_top_logprobs_requires_logprobs() -> None:
    assert rejected_param(CHAT, chat(top_logprobs=2)) == "top_logprobs"


@pytest.mark.parametrize("stop,expected", [
    (None, []), ("x", ["x"]), (["a", "b"], ["a", "b"]), ([], []),
])
def test_stop_normalised(stop: Any, expected: list[str]) -> None:
    for request in (C.model_validate(completion(stop=stop)), CHAT.model_validate(chat(stop=stop))):
        assert request.stop_list == expected
        assert request.to_sampling_params(16).stop == expected


def test_field_mapping_and_defaults() -> None:
    request = C.model_validate(completion(
        temperature=0.5, top_k=-1, seed=7, logit_bias={"12": -100, "3": 2.5}, n=3,
        stop_token_ids=[2], ignore_eos=True, min_tokens=2, include_stop_str_in_output=True,
        skip_special_tokens=False, presence_penalty=0.5))
    params = request.to_sampling_params(16, defaults={"temperature": 0.1, "top_p": 0.9,
                                                      "max_tokens": 1})
    assert params.temperature == 0.5 and params.top_p == 0.9 and params.top_k == 0
    assert params.logit_bias == {12: -100.0, 3: 2.5}
    assert (params.n, params.seed, params.max_tokens, params.min_tokens) == (3, 7, 16, 2)
    assert params.stop_token_ids == [2] and params.ignore_eos
    assert params.include_stop_str_in_output and not params.skip_special_tokens
    assert params.presence_penalty == 0.5
    plain = C.model_validate(completion()).to_sampling_params(16)
    assert plain.temperature == 1.0 and plain.logit_bias is None and plain.seed is None


def test_suffix_accepted_by_schema_rejected_by_server() -> None:
    request = C.model_validate(completion(suffix="tail"))
    with pytest.raises(InvalidRequestError) as info:
        request.to_sampling_params(16)
    assert info.value.param == "suffix" and "not supported" in info.value.message
    C.model_validate(completion(suffix=None)).to_sampling_params(16)


def test_stream_options_need_stream() -> None:
    assert rejected_param(C, completion(stream_options={"include_usage": True})) == "stream_options"
    request = CHAT.model_validate(chat(stream=True, stream_options={"include_usage": True}))
    options = request.stream_options
    assert options.include_usage and not options.continuous_usage_stats


# ---------------------------------------------------------------- chat messages and tools


@pytest.mark.parametrize("kind", ["image_url", "input_audio", "file", "video_url"])
def test_media_parts_are_a_clear_error(kind: str) -> None:
    body = user([{"type": "text", "text": "look"}, {"type": kind, kind: {"url": "http://x"}}])
    with pytest.raises(ValidationError) as info:
        CHAT.model_validate(body)
    error = pydantic_error_to_body(info.value)["error"]
    assert error["param"] == "messages.0.content.1"
    assert "not supported" in error["message"] and kind in error["message"]


@pytest.mark.parametrize("message,param", [
    ({"role": "wizard", "content": "x"}, "messages.0"),
    ({"content": "x"}, "messages.0"),
    ("just text", "messages.0"),
    ({"role": "user"}, "messages.0.content"),
    ({"role": "user", "content": 5}, "messages.0.content"),
    ({"role": "user", "content": [{"type": "weird"}]}, "messages.0.content.0"),
    ({"role": "user", "content": [{"type": "text"}]}, "messages.0.content.0.text"),
    ({"role": "tool", "content": "42"}, "messages.0.tool_call_id"),
    ({"role": "assistant", "tool_calls": [{"id": "c"}]}, "messages.0.tool_calls.0.function"),
    ({"role": "user", "content": "x", "name": "n" * 1000}, "messages.0.name"),
])
def test_bad_messages(message: Any, param: str) -> None:
    assert rejected_param(CHAT, chat(messages=[message])) == param


def test_message_roles_and_conversation() -> None:
    request = CHAT.model_validate(chat(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "developer",
         "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "weather?", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]))
    roles = [m.role for m in request.messages]
    assert roles == ["system", "developer", "user", "assistant", "tool"]
    conv = request.conversation()
    assert conv[1] == {"role": "developer", "content": "a\nb"}
    assert conv[2] == {"role": "user", "content": "weather?", "name": "ann"}
    assert conv[3]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                    "arguments": {"city": "Oslo"}}
    assert conv[4] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


def test_tools_and_tool_choice() -> None:
    request = CHAT.model_validate(chat(tools=[TOOL], tool_choice="required",
                                       parallel_tool_calls=False))
    assert request.tools[0].function.parameters == {"type": "object"}
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert isinstance(CHAT.model_validate(chat(tools=[TOOL], tool_choice=named)).tool_choice,
                      p.NamedToolChoice)
    assert CHAT.model_validate(chat(tool_choice="none")).tool_choice == "none"
    assert rejected_param(CHAT, chat(tool_choice="required")) == "tool_choice"
    assert rejected_param(CHAT, chat(tools=[TOOL], tool_choice={
        "type": "function", "function": {"name": "other"}})) == "tool_choice"
    assert rejected_param(CHAT, chat(tool_choice="sometimes")) == "tool_choice"
    assert rejected_param(CHAT, chat(tools=[{"type": "function", "function": {}}])) \
        == "tools.0.function.name"


def test_response_format_accepted() -> None:
    request = CHAT.model_validate(chat(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}))
    assert request.response_format.json_schema.json_schema == {"type": "object"}
    assert CHAT.model_validate(chat(response_format={"type": "json_object"})).response_format
    assert rejected_param(CHAT, chat(response_format={"type": "yaml"})) == "response_format.type"


def test_continue_final_message_needs_assistant_last() -> None:
    ok = chat(messages=[USER, {"role": "assistant", "content": "Once"}],
              continue_final_message=True, add_generation_prompt=False)
    assert CHAT.model_validate(ok).continue_final_message
    assert rejected_param(CHAT, chat(continue_final_message=True)) == "messages"


def test_tokenize_requests() -> None:
    assert p.TokenizeRequest.model_validate({"prompt": "hi"}).add_special_tokens
    request = p.TokenizeRequest.model_validate({"messages": [USER], "add_generation_prompt": False})
    assert request.conversation() == [USER] and not request.add_generation_prompt
    assert rejected_param(p.TokenizeRequest, {}) == "prompt"
    assert rejected_param(p.TokenizeRequest, {"prompt": "x", "messages": [USER]}) == "prompt"
    assert p.DetokenizeRequest.model_validate({"model": "m", "tokens": [1, 2]}).tokens == [1, 2]


# ---------------------------------------------------------------- responses


def dumped(model: Any) -> dict[str, Any]:
    """What goes over the wire."""
    return json.loads(model.model_dump_json())


def chat_logprobs() -> p.ChatChoiceLogProbs:
    top = [p.TopLogprob(token="Hi", logprob=-0.1, bytes=[72, 105]),
           p.TopLogprob(token="Hey", logprob=-2.5, bytes=[72, 101, 121])]
    return p.ChatChoiceLogProbs(content=[p.ChatCompletionLogProb(
        token="Hi", logprob=-0.1, bytes=[72, 105], top_logprobs=top)])


def test_chat_completion_matches_openai() -> None:
    response = p.ChatCompletionResponse(model="m", usage=p.UsageInfo.of(5, 2), choices=[
        p.ChatCompletionResponseChoice(index=0, message=p.ChatResponseMessage(content="Hi!"),
                                       finish_reason="stop", logprobs=chat_logprobs()),
        p.ChatCompletionResponseChoice(index=1, finish_reason="tool_calls",
                                       message=p.ChatResponseMessage(content=None, tool_calls=[
                                           p.ToolCall(function=p.FunctionCall(
                                               name="f", arguments='{"a": 1}'))]))])
    data = dumped(response)
    parsed = ChatCompletion.model_validate(data)
    assert parsed.id.startswith("chatcmpl-") and data["object"] == "chat.completion"
    assert parsed.usage.total_tokens == 7
    assert parsed.choices[0].logprobs.content[0].top_logprobs[1].token == "Hey"
    call = parsed.choices[1].message.tool_calls[0]
    assert call.id.startswith("call") and call.function.arguments == '{"a": 1}'
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "Hi!"}
    assert data["choices"][1]["message"]["content"] is None  # explicit null beside tool_calls
    assert data["choices"][1]["logprobs"] is None
    assert "prompt_logprobs" not in data and "prompt_tokens_details" not in data["usage"]


def test_chat_chunks_match_openai() -> None:
    first = p.ChatCompletionStreamResponse(model="m", choices=[p.ChatCompletionResponseStreamChoice(
        index=0, delta=p.DeltaMessage(role="assistant", content=""))])
    middle = p.ChatCompletionStreamResponse(model="m", choices=[
        p.ChatCompletionResponseStreamChoice(index=0, delta=p.DeltaMessage(content="Hi"),
                                             logprobs=chat_logprobs())])
    tool = p.ChatCompletionStreamResponse(model="m", choices=[p.ChatCompletionResponseStreamChoice(
        index=0, delta=p.DeltaMessage(tool_calls=[p.DeltaToolCall(
            index=0, id="call_1", type="function",
            function=p.DeltaFunctionCall(name="f", arguments=""))]))])
    last = p.ChatCompletionStreamResponse(model="m", choices=[p.ChatCompletionResponseStreamChoice(
        index=0, delta=p.DeltaMessage(), finish_reason="stop")])
    usage = p.ChatCompletionStreamResponse(model="m", choices=[],
                                           usage=p.UsageInfo.of(5, 1, cached_tokens=4))
    for chunk in (first, middle, tool, last, usage):
        ChatCompletionChunk.model_validate(dumped(chunk))
    data = dumped(first)
    assert data["object"] == "chat.completion.chunk" and data["usage"] is None
    assert data["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert data["choices"][0]["finish_reason"] is None and data["choices"][0]["logprobs"] is None
    assert dumped(last)["choices"][0]["delta"] == {}
    assert dumped(tool)["choices"][0]["delta"]["tool_calls"][0] == {
        "index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
    data = dumped(usage)
    assert data["choices"] == [] and data["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    assert ChatCompletionChunk.model_validate(data).usage.prompt_tokens_details.cached_tokens == 4


def test_completion_matches_openai() -> None:
    logprobs = p.CompletionLogProbs(tokens=[" a", " b"], token_logprobs=[-0.5, -1.5],
                                    top_logprobs=[{" a": -0.5}, {" b": -1.5, " c": -2.0}],
                                    text_offset=[0, 2])
    response = p.CompletionResponse(model="m", usage=p.UsageInfo.of(3, 2), choices=[
        p.CompletionResponseChoice(index=0, text=" a b", logprobs=logprobs, finish_reason="length"),
        p.CompletionResponseChoice(index=1, text="!", finish_reason="stop", stop_reason="\n")])
    data = dumped(response)
    parsed = Completion.model_validate(data)
    assert parsed.id.startswith("cmpl-") and parsed.object == "text_completion"
    assert parsed.choices[0].logprobs.top_logprobs[1] == {" b": -1.5, " c": -2.0}
    assert data["choices"][1]["logprobs"] is None
    chunk = p.CompletionStreamResponse(model="m", choices=[p.CompletionResponseStreamChoice(
        index=0, text="x", finish_reason="stop")])
    assert Completion.model_validate(dumped(chunk)).choices[0].text == "x"
    mid = dumped(p.CompletionStreamResponse(model="m", choices=[
        p.CompletionResponseStreamChoice(index=0, text="x")]))
    assert mid["choices"][0]["finish_reason"] is None and mid["usage"] is None
    final = dumped(p.CompletionStreamResponse(model="m", choices=[], usage=p.UsageInfo.of(1, 1)))
    assert Completion.model_validate(final).usage.total_tokens == 2


def test_openai_types_catch_shape_errors() -> None:
    """The round-trip checks above mean something: the client types do validate."""
    bad = dumped(p.ChatCompletionResponse(model="m", choices=[], usage=p.UsageInfo()))
    bad["object"] = "chat.completions"
    with pytest.raises(ValidationError):
        ChatCompletion.model_validate(bad)


def test_model_list_matches_openai() -> None:
    models = p.ModelList(data=[p.ModelCard(id="smollm2", root="smollm2", max_model_len=2048),
                               p.ModelCard(id="alias", created=5, root="smollm2")])
    data = dumped(models)
    assert data["object"] == "list" and len(data["data"]) == 2
    for card in data["data"]:
        model = Model.model_validate(card)
        assert model.object == "model" and model.owned_by == "pagoda"
    first = data["data"][0]
    assert first == {"id": "smollm2", "object": "model", "created": first["created"],
                     "owned_by": "pagoda", "root": "smollm2", "parent": None,
                     "max_model_len": 2048, "state": None}


def test_tokenize_responses() -> None:
    assert dumped(p.TokenizeResponse(count=2, max_model_len=10, tokens=[1, 2])) == {
        "count": 2, "max_model_len": 10, "tokens": [1, 2]}
    assert dumped(p.TokenizeResponse(count=1, max_model_len=10, tokens=[1], token_strs=["a"])) \
        ["token_strs"] == ["a"]
    assert dumped(p.DetokenizeResponse(prompt="hi")) == {"prompt": "hi"}


def test_ids_are_unique() -> None:
    assert p.random_id("cmpl") != p.random_id("cmpl")
    assert p.CompletionResponse(model="m", choices=[], usage=p.UsageInfo()).id.startswith("cmpl-")
