"""Turns user prompts and parameters into validated EngineCoreRequests."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, TypedDict

from pagoda.engine.model_info import ModelInfo, validate_prompt_ids
from pagoda.errors import InvalidRequestError
from pagoda.request import EngineCoreRequest
from pagoda.sampling_params import SamplingParams
from pagoda.structured_output.grammar import GrammarCompiler


class TokensPrompt(TypedDict, total=False):
    """A prompt given as token ids (optionally with the text it came from)."""

    prompt_token_ids: list[int]
    prompt: str


PromptType = str | list[int] | TokensPrompt


@dataclass(slots=True)
class ProcessedPrompt:
    """A prompt's text (if known) and its token ids."""

    text: str | None
    token_ids: list[int]


class InputProcessor:
    """Tokenizes and validates; raises InvalidRequestError before anything is scheduled."""

    def __init__(self, tokenizer: Any, info: ModelInfo) -> None:
        self.tokenizer = tokenizer
        self.info = info
        self.grammars = GrammarCompiler(lambda: self.tokenizer, info.vocab_size)

    def check_structured_outputs(self, params: SamplingParams) -> None:
        """Compile the request's output constraint, if any, under the compile time limit:
        a bad or too costly one is an InvalidRequestError before anything is queued."""
        if params.structured_outputs is not None:
            self.grammars.compile(params.structured_outputs)

    def tokenize(self, prompt: PromptType) -> ProcessedPrompt:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: give prompt token ids",
                                          "prompt")
            return ProcessedPrompt(prompt, self.tokenizer(prompt).input_ids)
        if isinstance(prompt, dict):
            ids = prompt.get("prompt_token_ids")
            if ids is None:
                raise InvalidRequestError("a dict prompt needs 'prompt_token_ids'", "prompt")
            return ProcessedPrompt(prompt.get("prompt"), list(ids))
        if isinstance(prompt, (list, tuple)):
            return ProcessedPrompt(None, list(prompt))
        raise InvalidRequestError("prompt must be a string or a list of token ids", "prompt")

    def validate_prompt(self, token_ids: list[int]) -> None:
        validate_prompt_ids(token_ids, self.info)

    def process(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                priority: int = 0, cache_salt: str | None = None,
                parent_id: str | None = None, lora_name: str | None = None
                ) -> EngineCoreRequest:
        self.validate_prompt(prompt.token_ids)
        params.check_vocab(self.info.vocab_size)
        if self.info.extra_eos_token_ids and not params.ignore_eos:
            extra = [t for t in self.info.extra_eos_token_ids if t not in params.stop_token_ids]
            params = params.clone(stop_token_ids=params.stop_token_ids + extra)
        return EngineCoreRequest(request_id, prompt.token_ids, params, self.info.eos_token_id,
                                 time.monotonic(), priority, cache_salt, parent_id, lora_name)

    def fan_out(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                priority: int = 0, cache_salt: str | None = None, lora_name: str | None = None
                ) -> tuple[list[tuple[str, SamplingParams]], list[EngineCoreRequest]]:
        """The engine requests of one user request: one per `n` sequence (validated)."""
        children = child_params(request_id, params)
        parent = request_id if params.n > 1 else None
        requests = [self.process(child_id, prompt, child, priority, cache_salt, parent, lora_name)
                    for child_id, child in children]
        return children, requests


def child_params(request_id: str, params: SamplingParams) -> list[tuple[str, SamplingParams]]:
    """The n sequences of a request; seeded ones get seed + index so they differ."""
    if params.n == 1:
        return [(request_id, params)]
    return [(f"{request_id}#{i}",
             params.clone(n=1, seed=None if params.seed is None else params.seed + i))
            for i in range(params.n)]
