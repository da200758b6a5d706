"""A model's Modelfile-style defaults (system prompt, sampling parameters) applied to a chat
request: the request's own values always win."""

from __future__ import annotations

from typing import Any

from pagoda.entrypoints.openai.protocol import ChatCompletionRequest, SystemMessage

# Ollama's parameter names -> the chat request's fields
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "seed": "seed", "repeat_penalty": "repetition_penalty", "stop": "stop",
           "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


def apply_model_defaults(body: ChatCompletionRequest, spec: Any) -> ChatCompletionRequest:
    """`body` with what it leaves unset taken from `spec` (a fleet ModelSpec, or None)."""
    if spec is None or (not spec.system and not spec.parameters):
        return body
    update: dict[str, Any] = {}
    for name, value in spec.parameters.items():
        field = _FIELDS.get(name)
        if field is not None and getattr(body, field) is None:
            update[field] = value
    predict = spec.parameters.get("num_predict")
    if predict is not None and predict > 0 and body.effective_max_tokens is None:
        update["max_tokens"] = predict
    if spec.system and not any(m.role in ("system", "developer") for m in body.messages):
        update["messages"] = [SystemMessage(role="system", content=spec.system),
                              *body.messages]
    return body.model_copy(update=update) if update else body
