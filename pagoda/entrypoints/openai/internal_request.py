"""The chat request every protocol translates into: a ChatCompletionRequest built from a plain
mapping, its validation errors raised as one InvalidRequestError naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pydantic

from pagoda.entrypoints.openai.errors import pydantic_error_to_body
from pagoda.entrypoints.openai.protocol import ChatCompletionRequest
from pagoda.errors import InvalidRequestError


def chat_request(data: dict[str, Any], names: dict[str, str] | None = None
                 ) -> ChatCompletionRequest:
    """Validate `data` as a chat request; `names` renames internal fields to the client's
    own (e.g. ``max_tokens`` -> ``options.num_predict``) in the error."""
    try:
        return ChatCompletionRequest.model_validate(data)
    except pydantic.ValidationError as exc:
        error = pydantic_error_to_body(exc)["error"]
        param = error.get("param")
        top = param.split(".", 1)[0] if param else None
        renamed = (names or {}).get(top or "", param)
        message = error["message"]
        if top and renamed != param:
            message = message.replace(top, renamed, 1)
        raise InvalidRequestError(message, renamed) from None


@contextmanager
def client_field_names(names: dict[str, str]) -> Iterator[None]:
    """Errors raised inside name the client's field (``format``) instead of the internal one
    (``response_format``)."""
    try:
        yield
    except InvalidRequestError as exc:
        param = exc.param or ""
        top = param.split(".", 1)[0]
        if top not in names or names[top] == top:
            raise
        raise InvalidRequestError(exc.message, names[top] + param[len(top):],
                                  exc.code) from None
