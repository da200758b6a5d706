"""LoRA adapters over HTTP, as vLLM serves them: static `--lora-modules`, adapter names in a
request's `model`, adapter cards in /v1/models, and runtime loading and unloading (only with
--allow-runtime-lora-updating, and only from inside --lora-dir)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from pagoda.engine.async_engine import AsyncEngine
from pagoda.entrypoints.openai.protocol import ModelCard
from pagoda.errors import ConfigError, InvalidRequestError
from pagoda.logger import get_logger
from pagoda.lora.registry import MAX_LORA_NAME_CHARS, LoRANotLoadedError
from pagoda.lora.request import LoRAAdapterError

if TYPE_CHECKING:
    from pagoda.entrypoints.openai.app import ServerState

logger = get_logger(__name__)
RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
MAX_LORA_PATH_CHARS = 4096


@dataclass(frozen=True, slots=True)
class LoRAModule:
    """An adapter the server offers: its name, directory and base model."""

    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(value: str) -> LoRAModule:
    """`name=path` or vLLM's JSON form `{"name": ..., "path": ..., "base_model_name": ...}`."""
    if value.lstrip().startswith("{"):
        try:
            raw = json.loads(value)
        except ValueError as exc:
            raise ConfigError(f"--lora-modules: invalid JSON {value!r}: {exc}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) \
                or not isinstance(raw.get("path"), str):
            raise ConfigError(f"--lora-modules: {value!r} needs string 'name' and 'path'")
        return LoRAModule(raw["name"], raw["path"], raw.get("base_model_name"))
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--lora-modules: expected name=path or JSON, got {value!r}")
    return LoRAModule(name, path)


def runtime_updating_allowed(flag: bool) -> bool:
    return flag or _env_true(RUNTIME_UPDATING_ENV)


def _env_true(name: str) -> bool:
    import os
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def resolve_in_dir(path: str, allowed: Path) -> Path:
    """The adapter directory `path` names, which must lie inside `allowed` (relative paths
    are taken from there); a 400 otherwise, saying nothing about the file system."""
    if not path or len(path) > MAX_LORA_PATH_CHARS or "\x00" in path:
        raise InvalidRequestError("lora_path is empty or too long", "lora_path")
    root = allowed.expanduser().resolve()
    candidate = Path(path).expanduser()
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not resolved.is_relative_to(root):
        raise InvalidRequestError("lora_path must be inside the server's adapter directory "
                                  "(--lora-dir)", "lora_path", "lora_path_not_allowed")
    return resolved


class LoadLoRAAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter."""

    lora_name: str = Field(min_length=1, max_length=MAX_LORA_NAME_CHARS)
    lora_path: str = Field(min_length=1, max_length=MAX_LORA_PATH_CHARS)
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    """POST /v1/unload_lora_adapter."""

    lora_name: str = Field(min_length=1, max_length=MAX_LORA_NAME_CHARS)
    lora_int_id: int | None = None


@dataclass(slots=True)
class LoRAServerConfig:
    """The operator's LoRA settings of the HTTP server."""

    modules: list[LoRAModule] = field(default_factory=list)
    lora_dir: Path | None = None  # None: the model store
    allow_runtime_updating: bool = False
    max_loras: int = 0  # 0: LoRA is off


class LoRAServing:
    """The adapters this server offers on top of its one base model."""

    def __init__(self, state: ServerState, config: LoRAServerConfig) -> None:
        self.state = state
        self.config = config
        self.adapters: dict[str, LoRAModule] = {}
        self.created: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.config.max_loras > 0

    def is_adapter(self, model: str | None) -> bool:
        return model is not None and model in self.adapters

    async def load_static(self, engine: AsyncEngine, base_name: str) -> None:
        """Load --lora-modules at startup (a bad one stops the server)."""
        for module in self.config.modules:
            await engine.add_lora(module.name, str(Path(module.path).expanduser()))
            self._register(LoRAModule(module.name, module.path,
                                      module.base_model_name or base_name))

    async def load(self, engine: AsyncEngine, body: LoadLoRAAdapterRequest,
                   base_name: str) -> str:
        """vLLM's 200 body, or a 400 (exists already, bad or outside --lora-dir)."""
        if (body.lora_name in self.adapters
                or body.lora_name in self.state.config.served_model_names):
            raise LoRAAdapterError(f"The lora adapter '{body.lora_name}' has already been "
                                   "loaded.")
        path = resolve_in_dir(body.lora_path, self._allowed_dir())
        await engine.add_lora(body.lora_name, str(path))
        self._register(LoRAModule(body.lora_name, body.lora_path, base_name))
        logger.info("loaded LoRA adapter %r from %s", body.lora_name, path)
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    async def unload(self, engine: AsyncEngine, body: UnloadLoRAAdapterRequest) -> str:
        """vLLM's 200 body, or a 404 when no such adapter is loaded."""
        if body.lora_name not in self.adapters:
            raise LoRANotLoadedError(body.lora_name)
        del self.adapters[body.lora_name]  # no new requests from now on
        await engine.remove_lora(body.lora_name)
        logger.info("unloaded LoRA adapter %r", body.lora_name)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    def cards(self, max_model_len: int | None) -> list[ModelCard]:
        return [ModelCard(id=m.name, created=self.created[m.name], owned_by="pagoda",
                          root=m.path, parent=m.base_model_name, max_model_len=max_model_len,
                          state="loaded") for m in self.adapters.values()]

    def _register(self, module: LoRAModule) -> None:
        self.adapters[module.name] = module
        self.created[module.name] = int(time.time())

    def _allowed_dir(self) -> Path:
        if self.config.lora_dir is not None:
            return self.config.lora_dir
        from pagoda.models.store import models_dir
        return models_dir()
