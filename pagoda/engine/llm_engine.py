"""LLMEngine: the synchronous frontend over an in-process EngineCore."""

from __future__ import annotations

import itertools
from typing import Any

from pagoda.config import EngineConfig
from pagoda.engine.core import EngineCore
from pagoda.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType
from pagoda.engine.output_processor import OutputProcessor
from pagoda.errors import InvalidRequestError, ModelNotFoundError
from pagoda.models.source import ModelSource, load_tokenizer, resolve_model
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams


class LLMEngine:
    """Add requests, call step() until done; each step returns the requests it advanced."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        source = resolve_model(config.model, config.load_format)
        self.tokenizer = _optional_tokenizer(source)
        self.core = EngineCore(config, source)
        self.model_info = self.core.model_info
        self.input_processor = InputProcessor(self.tokenizer, self.model_info)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def next_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(self, request_id: str, prompt: PromptType | ProcessedPrompt,
                    params: SamplingParams, priority: int = 0,
                    cache_salt: str | None = None) -> None:
        """Validate and queue a request; raises InvalidRequestError before scheduling anything."""
        if request_id in self.output_processor.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        processed = prompt if isinstance(prompt, ProcessedPrompt) else \
            self.input_processor.tokenize(prompt)
        children = self._children(request_id, params)
        core_requests = [self.input_processor.process(
            child_id, processed, child_params, priority, cache_salt,
            parent_id=request_id if params.n > 1 else None)
            for child_id, child_params in children]
        self.output_processor.add_request(request_id, processed.text, processed.token_ids,
                                          children)
        for core_request in core_requests:
            self.core.add_request(core_request)

    @staticmethod
    def _children(request_id: str, params: SamplingParams) -> list[tuple[str, SamplingParams]]:
        """The n sequences of a request; seeded ones get seed + index so they differ."""
        if params.n == 1:
            return [(request_id, params)]
        return [(f"{request_id}#{i}",
                 params.clone(n=1, seed=None if params.seed is None else params.seed + i))
                for i in range(params.n)]

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self.core.abort_requests(self.output_processor.child_ids(request_id))
        return self.output_processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        outputs, stopped = self.output_processor.process(self.core.step())
        if stopped:
            self.core.abort_requests(stopped)
        return outputs

    def get_tokenizer(self) -> Any:
        return self.tokenizer


def _optional_tokenizer(source: ModelSource) -> Any | None:
    """The tokenizer; random-weight models without tokenizer files run on token ids alone."""
    try:
        return load_tokenizer(source)
    except ModelNotFoundError:
        if source.format != "dummy":
            raise
        return None
