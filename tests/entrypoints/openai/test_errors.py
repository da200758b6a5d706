"""The OpenAI error envelope: exact shape, status mapping, clean validation messages."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from pagoda.entrypoints.openai import errors as e
from pagoda.entrypoints.openai.app import _add_error_handlers
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from pagoda.errors import (
    ConfigError,
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    PagodaError,
    UnknownModelError,
)

LEAKS = ("Traceback", "File \"", "site-packages", "/work", " at 0x", "pydantic", "Value error",
         "function-after", "list[", "body.", "<", "SECRET")


def assert_envelope(body: dict[str, Any]) -> dict[str, Any]:
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    assert len(error["message"]) <= e.MAX_MESSAGE_CHARS
    for leak in LEAKS:
        assert leak not in error["message"], (leak, error["message"])
    json.dumps(body)
    return error


def test_error_body_shape() -> None:
    error = assert_envelope(e.error_body(400, "bad n", param="n"))
    assert error == {"message": "bad n", "type": "invalid_request_error", "param": "n",
                     "code": None}
    parsed = e.ErrorResponse.model_validate(e.error_body(404, "x"))
    assert parsed.error.type == "invalid_request_error"
    assert openai.types.ErrorObject.model_validate(e.error_body(429, "slow", code="x")["error"])


@pytest.mark.parametrize("status,kind", [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "invalid_request_error"), (413, "invalid_request_error"), (429, "rate_limit_error"),
    (500, "server_error"), (502, "server_error"), (503, "service_unavailable_error"),
])
def test_default_types(status: int, kind: str) -> None:
    assert e.error_body(status, "m")["error"]["type"] == kind


class EngineDeadError(PagodaError):
    """Stand-in with the engine's class name (the mapping goes by name, not import)."""


class EngineOverloadedError(PagodaError):
    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@pytest.mark.parametrize("exc,status,kind,code,param", [
    (InvalidRequestError("n is too big", "n"), 400, "invalid_request_error", None, "n"),
    (InvalidRequestError("bad", "logit_bias", "invalid_value"), 400, "invalid_request_error",
     "invalid_value", "logit_bias"),
    (ContextLengthExceededError("This model's maximum context length is 2048 tokens."), 400,
     "invalid_request_error", "context_length_exceeded", "prompt"),
    (ModelNotFoundError("/work/SECRET/models does not look like a model"), 404,
     "invalid_request_error", "model_not_found", None),
    (UnknownModelError("gpt-9"), 404, "invalid_request_error", "model_not_found", "model"),
    (ModelUnavailableError("still loading", retry_after=5), 503, "service_unavailable_error",
     "server_is_overloaded", None),
    (e.AuthenticationError(), 401, "authentication_error", "invalid_api_key", None),
    (e.RequestTooLargeError(), 413, "invalid_request_error", "request_too_large", None),
    (e.RateLimitedError(retry_after=2), 429, "rate_limit_error", "rate_limit_exceeded", None),
    (e.ServerOverloadedError(retry_after=1), 503, "service_unavailable_error",
     "server_is_overloaded", None),
    (EngineOverloadedError("too many requests in flight", 3), 503, "service_unavailable_error",
     "server_is_overloaded", None),
    (EngineDeadError("SECRET engine core at 0x7f00 died"), 503, "service_unavailable_error", None,
     None),
    (NotImplementedError("SECRET internal"), 400, "invalid_request_error", "unsupported", None),
    (ConfigError("SECRET /work/config"), 500, "server_error", None, None),
    (RuntimeError("SECRET <object at 0x7f00> /work/pagoda/x.py"), 500, "server_error", None, None),
    (e.ServerError(), 500, "server_error", None, None),
])
def test_exception_mapping(exc: BaseException, status: int, kind: str, code: str | None,
                           param: str | None) -> None:
    got_status, body, _ = e.exception_to_response(exc)
    error = assert_envelope(body)
    assert (got_status, error["type"], error["code"], error["param"]) == (status, kind, code, param)
    assert e.classify_exception(exc).status == status
    if status == 500:
        assert error["message"] == e.SERVER_ERROR_MESSAGE


def test_own_messages_pass_through() -> None:
    _, body, _ = e.exception_to_response(ContextLengthExceededError(
        "This model's maximum context length is 2048 tokens. However, you requested 3000 tokens."))
    assert "maximum context length is 2048 tokens" in body["error"]["message"]
    _, body, _ = e.exception_to_response(UnknownModelError("gpt-9"))
    assert body["error"]["message"] == "The model `gpt-9` does not exist."
    _, body, _ = e.exception_to_response(UnknownModelError("x" * 10_000))
    assert len(body["error"]["message"]) < 200


def test_retry_after_headers() -> None:
    assert e.exception_to_response(e.RateLimitedError(retry_after=2.5))[2] == {
        "Retry-After": "3", "retry-after-ms": "2500"}
    assert e.exception_to_response(EngineOverloadedError("busy", 1))[2]["Retry-After"] == "1"
    assert e.exception_to_response(ModelUnavailableError("no room", 60))[2]["Retry-After"] == "60"
    assert e.exception_to_response(e.ServerOverloadedError())[2] == {}
    assert e.exception_to_response(InvalidRequestError("x"))[2] == {}
    assert e.retry_after_headers(float("inf")) == {} and e.retry_after_headers(-1) == {}


def test_real_engine_errors_map() -> None:
    engine = pytest.importorskip("pagoda.engine.async_engine")
    assert e.classify_exception(engine.EngineOverloadedError("busy")).status == 503
    assert e.classify_exception(engine.EngineDeadError("gone")).status == 503


# ---------------------------------------------------------------- validation errors


@pytest.mark.parametrize("loc,param", [
    (("body", "messages", 0, "UserMessage", "content", "list[...]", 1), "messages.0.content.1"),
    (("body", "prompt", "function-after[check(), list[int]]"), "prompt"),
    (("prompt", "str"), "prompt"),
    (("tool_choice", "NamedToolChoice", "function", "name"), "tool_choice.function.name"),
    (("logit_bias", "50256", "[key]"), "logit_bias"),
    (("stop", "list[constrained-str]", 3), "stop.3"),
    (("body",), None),
    ((), None),
    (("user",), "user"),
    (("messages", 2, "AssistantMessage", "tool_calls", 0, "function", "arguments"),
     "messages.2.tool_calls.0.function.arguments"),
])
def test_clean_loc(loc: tuple, param: str | None) -> None:
    assert e.clean_loc(loc) == param


def validation_error(model: type, body: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return info.value


@pytest.mark.parametrize("body,param,needle", [
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "x" * 10_000, "content": "hi"}]}, "messages.0", "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0", "not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 10**9}, "n", "less than or equal"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs",
     "requires logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["ok", 7]}, "stop.1", "string"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature",
     "number"),
])
def test_validation_bodies(body: dict, param: str, needle: str) -> None:
    error = assert_envelope(e.pydantic_error_to_body(validation_error(ChatCompletionRequest, body)))
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert needle in error["message"]
    assert "x" * 100 not in error["message"]  # hostile input is not echoed back


def test_exception_to_response_handles_validation_errors() -> None:
    status, body, _ = e.exception_to_response(validation_error(CompletionRequest, {"prompt": 5}))
    assert status == 400 and assert_envelope(body)["param"] == "prompt"


# ---------------------------------------------------------------- over HTTP, through the client


@pytest.fixture(scope="module")
def client() -> openai.OpenAI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> dict:
        body.to_sampling_params(16)
        raise ContextLengthExceededError("This model's maximum context length is 8 tokens.",
                                         "messages")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict:
        body.to_sampling_params(16)
        raise e.ServerOverloadedError(retry_after=200)  # > 120 s: the client will not retry

    _add_error_handlers(app)  # the server's own handlers

    http = TestClient(app, raise_server_exceptions=False)
    return openai.OpenAI(api_key="k", base_url="http://testserver/v1", http_client=http,
                         max_retries=0)


@pytest.mark.parametrize("raw,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ("", "JSON object"),
])
def test_raw_bodies(client: openai.OpenAI, raw: str, message: str) -> None:
    response = client._client.post("/v1/chat/completions", content=raw,
                                   headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert message in assert_envelope(response.json())["message"]


def test_client_sees_bad_request_fields(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                       top_logprobs=2)
    assert (info.value.status_code, info.value.param, info.value.type) == (
        400, "top_logprobs", "invalid_request_error")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt="x", suffix="y")
    assert info.value.param == "suffix"


def test_client_sees_overload_with_retry_after(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model="m", prompt="x")
    assert info.value.status_code == 503 and info.value.code == "server_is_overloaded"
    assert info.value.response.headers["retry-after"] == "200"
