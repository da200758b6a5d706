"""LLMEngine: the synchronous frontend over an in-process EngineCore."""

from __future__ import annotations

import itertools
from typing import Any

from pagoda.config import EngineConfig
from pagoda.engine.core import EngineCore
from pagoda.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType
from pagoda.engine.output_processor import OutputProcessor
from pagoda.errors import InvalidRequestError
from pagoda.logger import get_logger
from pagoda.models.loader.tokenizer import get_tokenizer
from pagoda.models.source import resolve_model
from pagoda.outputs import RequestOutput
from pagoda.sampling_params import SamplingParams

logger = get_logger(__name__)


class LLMEngine:
    """Add requests, call step() until done; each step returns the requests it advanced."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        source = resolve_model(config.model, config.load_format)
        self.tokenizer = get_tokenizer(source, config.tokenizer)
        self.core = EngineCore(config, source)
        self.model_info = self.core.model_info
        self.input_processor = InputProcessor(self.tokenizer, self.model_info)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def next_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(self, request_id: str, prompt: PromptType | ProcessedPrompt,
                    params: SamplingParams, priority: int = 0,
                    cache_salt: str | None = None, lora_name: str | None = None) -> None:
        """Validate and queue a request; raises InvalidRequestError before scheduling anything."""
        if request_id in self.output_processor.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", "request_id")
        processed = prompt if isinstance(prompt, ProcessedPrompt) else \
            self.input_processor.tokenize(prompt)
        self.input_processor.check_structured_outputs(params)
        children, core_requests = self.input_processor.fan_out(
            request_id, processed, params, priority, cache_salt, lora_name)
        self.output_processor.add_request(request_id, processed.text, processed.token_ids,
                                          children)
        for core_request in core_requests:
            self.core.add_request(core_request)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self.core.abort_requests(self.output_processor.child_ids(request_id))
        return self.output_processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """One engine step; returns the requests it advanced (only finished ones if
        final_only)."""
        core_outputs = self.core.step()
        for request_id, exc in self.core.take_rejections():
            logger.error("request %s failed in the engine: %s", request_id, exc)
        outputs, stopped = self.output_processor.process(core_outputs, final_only)
        if stopped:
            self.core.abort_requests(stopped)
        return outputs

    def get_tokenizer(self) -> Any:
        return self.tokenizer

