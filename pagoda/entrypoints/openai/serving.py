"""OpenAIServing: the endpoints' entry points, delegating to per-endpoint classes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import Request

from pagoda.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from pagoda.entrypoints.openai.serving_base import ServingBase
from pagoda.entrypoints.openai.serving_chat import ChatServing
from pagoda.entrypoints.openai.serving_completion import CompletionServing
from pagoda.errors import InvalidRequestError

if TYPE_CHECKING:
    from pagoda.entrypoints.openai.app import ServerState


class OpenAIServing(ServingBase):
    """Completions, chat completions, tokenize and detokenize over one AsyncEngine."""

    def __init__(self, state: ServerState) -> None:
        super().__init__(state)
        self._completion = CompletionServing(state)
        self._chat = ChatServing(state)

    def resolve_output_parsers(self) -> None:
        """Settle the model's tool-call and reasoning formats now, so that what they warn
        about (a chat template that drops tools) is logged at startup."""
        _ = self._chat.parsers

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        return await self._completion.create(body, request)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        return await self._chat.create(body, request)

    async def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        self.check_model(body.model)
        tokenizer = self._tokenizer()
        if body.messages is not None:
            prompt = await self.engine.render_chat(
                body.conversation(), chat_template=self.server_chat_template(),
                add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message,
                chat_template_kwargs=body.chat_template_kwargs)
            ids = prompt.token_ids
        else:
            ids = (await self.engine.tokenize_text(body.prompt or "", body.add_special_tokens))
        strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.model_info.max_model_len,
                                tokens=ids, token_strs=strs)

    async def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(body.model)
        tokenizer = self._tokenizer()
        ids = list(body.tokens)
        vocab = self.engine.model_info.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"token id {bad} is out of vocabulary", "tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(ids))

    def _tokenizer(self) -> Any:
        if self.engine.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer", "model")
        return self.engine.tokenizer
