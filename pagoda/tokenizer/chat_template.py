"""Chat templates: render a conversation to prompt text with the tokenizer's template."""

from __future__ import annotations

from typing import Any

from pagoda.errors import InvalidRequestError

Conversation = list[dict[str, Any]]


def render_chat(tokenizer: Any, messages: Conversation, chat_template: str | None = None,
                add_generation_prompt: bool = True,
                chat_template_kwargs: dict[str, Any] | None = None,
                continue_final_message: bool = False,
                tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text for a conversation (special tokens included, so no BOS is re-added)."""
    if not messages:
        raise InvalidRequestError("messages must not be empty", "messages")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model has no chat template; pass one explicitly",
                                  "chat_template")
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            continue_final_message=continue_final_message, tools=tools,
            **(chat_template_kwargs or {}))
    except InvalidRequestError:
        raise
    except Exception as exc:  # template errors are the request's fault, not the engine's
        raise InvalidRequestError(f"the chat template could not render these messages: "
                                  f"{type(exc).__name__}", "messages") from None
