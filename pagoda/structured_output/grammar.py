"""Compiling structured-output constraints to xgrammar grammars, bounded in time and memory,
and the per-request matcher that masks logits and follows the sampled tokens."""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch

from pagoda.errors import InvalidRequestError
from pagoda.logger import get_logger
from pagoda.structured_output.params import StructuredOutputsParams, choice_grammar

logger = get_logger(__name__)

COMPILE_TIMEOUT_S = 10.0
CACHE_LIMIT_BYTES = 256 << 20  # xgrammar's compiled-grammar cache
COMPILE_WORKERS = 2
ANY_OBJECT_SCHEMA = '{"type": "object"}'
FILL_THREADS = max(1, min(8, (os.cpu_count() or 1) // 2))  # bitmask rows filled in parallel


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


class BitmaskFiller:
    """Fills a step's bitmask rows for many matchers at once, on several CPU threads."""

    def __init__(self, vocab_size: int, threads: int = FILL_THREADS) -> None:
        self.vocab_size = vocab_size
        self.threads = threads
        self._batch: Any = None

    def fill(self, states: list[GrammarMatcherState]) -> torch.Tensor:
        if self._batch is None:
            import xgrammar as xgr
            self._batch = xgr.BatchGrammarMatcher(self.threads)
        bitmask = new_bitmask(len(states), self.vocab_size)
        self._batch.batch_fill_next_token_bitmask([s.matcher for s in states], bitmask)
        return bitmask


def bitmask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """An int32 [rows, ceil(V/32)] bitmask with every token allowed (bit set = allowed)."""
    return torch.full((rows, bitmask_words(vocab_size)), -1, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set logits[rows[i], t] to -inf wherever bit t of bitmask[i] is clear (in place)."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)[:, :logits.shape[-1]]
    index = torch.tensor(rows, device=logits.device)
    sub = logits.index_select(0, index)
    logits.index_copy_(0, index, sub.masked_fill(~allowed.to(logits.device), float("-inf")))
