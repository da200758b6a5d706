"""The engine core's adapters by name: each load gets a new id (never reused, so the prefix
cache of an adapter unloaded and loaded again under its name is not mixed up), and an
unloaded adapter stays with the workers until no request uses it any more."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.errors import InvalidRequestError
from pagoda.lora.request import LoRAAdapterError, LoRARequest

MAX_LORA_NAME_CHARS = 256


class LoRANotLoadedError(InvalidRequestError):
    """A request or an unload names an adapter that is not loaded (404)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"The LoRA adapter '{name[:MAX_LORA_NAME_CHARS]}' is not loaded.",
                         "model", "lora_not_found")


@dataclass(slots=True)
class LoRARegistry:
    """name -> LoRARequest of the loaded adapters, and the ids on their way out."""

    enabled: bool
    loaded: dict[str, LoRARequest] = field(default_factory=dict)
    retiring: set[int] = field(default_factory=set)
    _next_id: int = 1

    def reserve(self, name: str, path: str) -> LoRARequest:
        """The request for a new adapter (not registered until add())."""
        if not self.enabled:
            raise LoRAAdapterError("LoRA adapters are off: start the server with --enable-lora")
        if not name or len(name) > MAX_LORA_NAME_CHARS:
            raise LoRAAdapterError(f"an adapter name must have 1 to {MAX_LORA_NAME_CHARS} "
                                   "characters")
        if name in self.loaded:
            raise LoRAAdapterError(f"The lora adapter '{name}' has already been loaded.")
        request = LoRARequest(self._next_id, name, path)
        self._next_id += 1
        return request

    def add(self, request: LoRARequest) -> None:
        self.loaded[request.name] = request

    def remove(self, name: str) -> int | None:
        request = self.loaded.pop(name, None)
        if request is None:
            return None
        self.retiring.add(request.lora_id)
        return request.lora_id

    def id_of(self, name: str | None) -> int:
        """The engine id of a request's adapter (0: none)."""
        if name is None:
            return 0
        request = self.loaded.get(name)
        if request is None:
            raise LoRANotLoadedError(name)
        return request.lora_id

    def names(self) -> list[str]:
        return list(self.loaded)
