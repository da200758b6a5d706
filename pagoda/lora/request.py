"""What crosses process boundaries about adapters (plain data, no torch): an adapter the
engine knows, and why one is refused."""

from __future__ import annotations

from dataclasses import dataclass

from pagoda.errors import InvalidRequestError


class LoRAAdapterError(InvalidRequestError):
    """An adapter that cannot be used with this model (a 400 naming what is wrong)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "lora_path", "invalid_lora_adapter")


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """An adapter the engine knows: its unique id (never reused), name and directory."""

    lora_id: int
    name: str
    path: str
