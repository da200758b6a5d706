"""Typed errors raised by pagoda; the server maps each to an HTTP status."""

from __future__ import annotations

_MAX_NAME_CHARS = 128  # of a model name quoted back in an error message


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


class UnknownModelError(PagodaError, LookupError):
    """The request names a model this server does not serve."""

    def __init__(self, model: str | None = None) -> None:
        name = (model or "")[:_MAX_NAME_CHARS]
        self.message = f"The model `{name}` does not exist." if name else \
            "The model does not exist."
        super().__init__(self.message)
        self.param = "model"
        self.code = "model_not_found"


class ModelUnavailableError(PagodaError):
    """A hosted model cannot take the request now (still loading, no room beside the models
    that must stay, too many waiting); worth retrying after `retry_after` seconds if given."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class ModelDoesNotFitError(PagodaError):
    """A hosted model can never be loaded beside the models that must stay (pinned): a
    configuration problem, not a busy server; retrying does not help."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelBusyError(PagodaError):
    """The model has requests in flight, so it cannot be stopped now."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
