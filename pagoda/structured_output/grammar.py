"""Compiling structured-output constraints to xgrammar grammars, bounded in time and memory,
and the per-request matcher that follows the sampled tokens (bitmask.py masks the logits)."""

from __future__ import annotations

import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from pagoda.errors import InvalidRequestError
from pagoda.logger import get_logger
from pagoda.structured_output.params import StructuredOutputsParams, choice_grammar

logger = get_logger(__name__)

COMPILE_TIMEOUT_S = 10.0
CACHE_LIMIT_BYTES = 256 << 20  # xgrammar's compiled-grammar cache
COMPILE_WORKERS = 2
ANY_OBJECT_SCHEMA = '{"type": "object"}'


class GrammarCompiler:
    """Compiles constraints against one tokenizer. xgrammar is imported and the tokenizer's
    token table built on first use, so servers that never see a constraint pay nothing."""

    def __init__(self, tokenizer_loader: Any, vocab_size: int,
                 timeout_s: float = COMPILE_TIMEOUT_S) -> None:
        self._load_tokenizer = tokenizer_loader  # () -> a transformers tokenizer
        self.vocab_size = vocab_size
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(COMPILE_WORKERS, thread_name_prefix="grammar")
        self._lock = threading.Lock()
        self._compiler: Any = None

    def submit(self, params: StructuredOutputsParams) -> Future:
        """Compile in the background; the future holds an xgrammar CompiledGrammar."""
        return self._executor.submit(self._compile, params)

    def compile(self, params: StructuredOutputsParams) -> Any:
        """Compile now, or raise InvalidRequestError for a bad or too slow constraint."""
        self._ensure_compiler()  # one-time setup is not charged to the request's time limit
        future = self.submit(params)
        try:
            return future.result(self.timeout_s)
        except FutureTimeout:
            raise InvalidRequestError(f"the structured output constraint took more than "
                                      f"{self.timeout_s:g} s to compile", "structured_outputs"
                                      ) from None

    def _ensure_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr
                tokenizer = self._load_tokenizer()
                if tokenizer is None:
                    raise InvalidRequestError("structured outputs need a model with a tokenizer",
                                              "structured_outputs")
                info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=COMPILE_WORKERS,
                                                     cache_limit_bytes=CACHE_LIMIT_BYTES)
            return self._compiler

    def _compile(self, params: StructuredOutputsParams) -> Any:
        compiler = self._ensure_compiler()
        try:
            return _compile_with(compiler, params)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's parse errors
            raise InvalidRequestError(f"invalid {params.kind} constraint: {_short(exc)}",
                                      "structured_outputs") from None


def _compile_with(compiler: Any, params: StructuredOutputsParams) -> Any:
    kind = params.kind
    if kind == "json":
        return compiler.compile_json_schema(params.json, any_whitespace=False, strict_mode=True)
    if kind == "json_object":  # OpenAI's JSON mode: any object, not any JSON value
        return compiler.compile_json_schema(ANY_OBJECT_SCHEMA, any_whitespace=False,
                                            strict_mode=False)
    if kind == "regex":
        return compiler.compile_regex(params.regex)
    if kind == "choice":
        return compiler.compile_grammar(choice_grammar(params.choice))
    return compiler.compile_grammar(params.grammar)


_LOG_PREFIX = re.compile(r"^\[[^\]]*\] \S+:\d+: ")


def _short(exc: BaseException) -> str:
    """xgrammar's message without its C++ log prefix ("[time] file.cc:123: ")."""
    lines = str(exc).strip().splitlines()
    return _LOG_PREFIX.sub("", lines[-1] if lines else type(exc).__name__)[:300]


class GrammarMatcherState:
    """One request's position in its grammar."""

    def __init__(self, compiled: Any) -> None:
        import xgrammar as xgr
        self.matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token_id: int) -> bool:
        return self.matcher.accept_token(token_id)

    @property
    def is_terminated(self) -> bool:
        return self.matcher.is_terminated()
