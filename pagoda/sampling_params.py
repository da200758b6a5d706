"""Per-request generation parameters, validated before anything is scheduled."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from pagoda.errors import InvalidRequestError
from pagoda.structured_output.params import StructuredOutputsParams

# Hard bounds on user-controlled sizes (the server may tighten them further).
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024
_GREEDY_EPS = 1e-5


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request's output (OpenAI / vLLM semantics)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context limit
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per sampled token (0: only the sampled one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def uses_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def sampling_reads_output(self) -> bool:
        """Whether sampling the next token looks at the tokens generated so far (penalties
        count them, min_tokens counts how many)."""
        return self.uses_penalties or self.min_tokens > 0

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first bad field."""
        _check_int(self.n, "n", 1, MAX_N)
        _check_float(self.temperature, "temperature", 0.0, 100.0)
        _check_float(self.top_p, "top_p", 0.0, 1.0, low_open=True)
        _check_int(self.top_k, "top_k", 0, 1 << 30)
        _check_float(self.min_p, "min_p", 0.0, 1.0)
        _check_float(self.presence_penalty, "presence_penalty", -2.0, 2.0)
        _check_float(self.frequency_penalty, "frequency_penalty", -2.0, 2.0)
        _check_float(self.repetition_penalty, "repetition_penalty", 0.0, 100.0, low_open=True)
        if self.max_tokens is not None:
            _check_int(self.max_tokens, "max_tokens", 1, 1 << 30)
        _check_int(self.min_tokens, "min_tokens", 0, 1 << 30)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError("min_tokens must not exceed max_tokens", "min_tokens")
        if self.seed is not None:
            _check_int(self.seed, "seed", -(1 << 63), (1 << 64) - 1)
        if self.logprobs is not None:
            _check_int(self.logprobs, "logprobs", 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int(self.prompt_logprobs, "prompt_logprobs", 0, MAX_LOGPROBS)
        self._validate_stops()
        self._validate_logit_bias()

    def _validate_stops(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings are allowed",
                                      "stop")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop strings must be non-empty strings", "stop")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidRequestError(
                    f"stop strings are limited to {MAX_STOP_STRING_CHARS} characters", "stop")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequestError(
                f"at most {MAX_STOP_TOKEN_IDS} stop token ids are allowed", "stop_token_ids")
        for t in self.stop_token_ids:
            _check_int(t, "stop_token_ids", 0, 1 << 31)

    def _validate_logit_bias(self) -> None:
        if not self.logit_bias:
            return
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(
                f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries", "logit_bias")
        clean: dict[int, float] = {}
        for token, bias in self.logit_bias.items():
            try:
                token_id = int(token)
            except (TypeError, ValueError):
                raise InvalidRequestError("logit_bias keys must be token ids",
                                          "logit_bias") from None
            if token_id < 0:
                raise InvalidRequestError("logit_bias keys must be token ids", "logit_bias")
            _check_float(bias, "logit_bias", -100.0, 100.0)
            clean[token_id] = float(bias)
        self.logit_bias = clean

    def check_vocab(self, vocab_size: int) -> None:
        """Reject token ids the model does not have."""
        for t in self.stop_token_ids:
            if t >= vocab_size:
                raise InvalidRequestError(f"stop token id {t} is out of vocabulary",
                                          "stop_token_ids")
        for t in self.logit_bias or {}:
            if t >= vocab_size:
                raise InvalidRequestError(f"logit_bias token id {t} is out of vocabulary",
                                          "logit_bias")

    def clone(self, **changes: object) -> "SamplingParams":
        return replace(self, **changes)


def _check_int(value: object, name: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {type(value).__name__}", name)
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be in [{low}, {high}], got {value}", name)


def _check_float(value: object, name: str, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a finite number", name)
    bad_low = value <= low if low_open else value < low
    if bad_low or value > high:
        bracket = "(" if low_open else "["
        raise InvalidRequestError(f"{name} must be in {bracket}{low}, {high}], got {value}", name)
