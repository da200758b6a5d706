"""Typed errors raised by pagoda; the server maps each to an HTTP status."""

from __future__ import annotations


class PagodaError(Exception):
    """Base class of every error pagoda raises on purpose."""


class InvalidRequestError(PagodaError, ValueError):
    """A request or its parameters are invalid; nothing was scheduled."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ContextLengthExceededError(InvalidRequestError):
    """The prompt (plus requested output) does not fit the model's context."""

    def __init__(self, message: str, param: str | None = "prompt") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class ModelNotFoundError(PagodaError, FileNotFoundError):
    """A model name or path does not resolve to a loadable checkpoint."""


class UnsupportedModelError(PagodaError, ValueError):
    """The checkpoint exists but its architecture or format is not supported."""


class ConfigError(PagodaError, ValueError):
    """Engine configuration that cannot work (e.g. the KV cache cannot hold one sequence)."""
