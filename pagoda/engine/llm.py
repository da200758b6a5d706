"""Offline API: LLM(model=...).generate(prompts, SamplingParams(...)) and LLM.chat(...)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from pagoda.config import engine_config
from pagoda.engine.input_processor import PromptType, TokensPrompt
from pagoda.engine.llm_engine import LLMEngine
from pagoda.outputs import RequestOutput
from pagoda.process import existing_objects_frozen
from pagoda.sampling_params import SamplingParams
from pagoda.tokenizer.chat_template import Conversation, render_chat


class LLM:
    """Runs a model offline over batches of prompts with continuous batching."""

    def __init__(self, model: str = "smollm2", **kwargs: Any) -> None:
        self.engine = LLMEngine(engine_config(model, **kwargs))

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def add_lora(self, name: str, path: str) -> int:
        """Load a PEFT LoRA adapter (needs enable_lora=True); returns its engine id."""
        return self.engine.core.add_lora(name, path)

    def remove_lora(self, name: str) -> bool:
        return self.engine.core.remove_lora(name)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 priority: Sequence[int] | None = None,
                 lora: str | Sequence[str | None] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order. `lora`: the
        adapter (added with add_lora) of all prompts, or one per prompt (None: the base)."""
        prompts = _as_prompt_list(prompts)
        params = _broadcast(sampling_params or SamplingParams(), len(prompts))
        loras = [lora] * len(prompts) if lora is None or isinstance(lora, str) else list(lora)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(loras)} adapters for {len(prompts)} prompts")
        ids = [self.engine.next_request_id() for _ in prompts]
        try:
            for i, (request_id, prompt) in enumerate(zip(ids, prompts)):
                self.engine.add_request(request_id, prompt, params[i],
                                        priority[i] if priority else 0, lora_name=loras[i])
        except Exception:
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        return self._run_to_completion(ids)

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Apply the chat template to one or more conversations, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self._chat_prompt(conv, chat_template, add_generation_prompt,
                                     chat_template_kwargs) for conv in conversations]
        return self.generate(prompts, sampling_params)

    def stream_chat(self, messages: Conversation,
                    sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Stream the reply to one conversation."""
        return self.stream(self._chat_prompt(messages), sampling_params)

    def _chat_prompt(self, messages: Conversation, chat_template: str | None = None,
                     add_generation_prompt: bool = True,
                     chat_template_kwargs: dict[str, Any] | None = None) -> TokensPrompt:
        tokenizer = self.engine.tokenizer
        text = render_chat(tokenizer, messages, chat_template, add_generation_prompt,
                           chat_template_kwargs)
        # the template already placed BOS and friends: do not add them again
        return {"prompt": text,
                "prompt_token_ids": tokenizer(text, add_special_tokens=False).input_ids}

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None
               ) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that advanced it."""
        request_id = self.engine.next_request_id()
        self.engine.add_request(request_id, prompt, sampling_params or SamplingParams())
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
        finally:
            self.engine.abort_request(request_id)

    def _run_to_completion(self, ids: list[str]) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with existing_objects_frozen():
            while len(finished) < len(ids) and self.engine.has_unfinished_requests():
                for out in self.engine.step(final_only=True):
                    if out.finished:
                        finished[out.request_id] = out
        return [finished[i] for i in ids]


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int):
        return [list(prompts)]
    return list(prompts)


def _broadcast(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return list(params)
