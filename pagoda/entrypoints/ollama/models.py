"""Ollama's model endpoints over pagoda's hosted models and model store: /api/tags, /api/ps,
/api/show, /api/pull (progress lines), /api/delete, /api/copy."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagoda.entrypoints.error_shapes import ollama_error
from pagoda.entrypoints.ollama.protocol import model_name
from pagoda.errors import (
    ConfigError,
    InvalidRequestError,
    ModelNotFoundError,
    PagodaError,
    UnknownModelError,
)
from pagoda.models import store

if TYPE_CHECKING:
    from pagoda.entrypoints.openai.app import ServerState

_QUANT = re.compile(r"(?i)\b(Q\d_[A-Z0-9_]+|Q\d_\d|F16|BF16|F32)\b")
_SIZE = re.compile(r"(?i)(\d+(?:\.\d+)?[MB])(?=[-_.]|$)")
FAR_FUTURE = datetime(2318, 1, 1, tzinfo=UTC)  # Ollama's "never expires"


class UnknownOllamaModel(UnknownModelError):
    """A model the server neither hosts nor has in its store (404 saying which)."""

    def __init__(self, name: str, message: str | None = None) -> None:
        super().__init__(name)
        self.message = message or f"model '{name[:256]}' not found"
        self.args = (self.message,)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def model_directory(name: str) -> Path | None:
    """The checkpoint directory behind a name or path, if it is on this machine."""
    found = store.find_pulled(name) if store._is_plain_name(name) else None
    if found is not None:
        return found
    path = Path(name).expanduser()
    if path.is_file():
        return path.parent
    return path if path.is_dir() else None


def details(directory: Path | None) -> dict[str, Any]:
    """Ollama's ``details`` of a checkpoint: format, family, parameter size, quantization."""
    if directory is None:
        return {"format": "", "family": "", "families": [], "parameter_size": "",
                "quantization_level": ""}
    manifest = store.read_manifest(directory)
    gguf = manifest.gguf if manifest else next((p.name for p in directory.glob("*.gguf")), "")
    family = _config(directory).get("model_type", "")
    quant = _QUANT.search(gguf) if gguf else None
    size = _SIZE.search(gguf.replace(".gguf", "")) if gguf else None
    return {"format": "gguf" if gguf else "safetensors", "family": family,
            "families": [family] if family else [], "parameter_size": size.group(1) if size
            else "", "quantization_level": quant.group(1).upper() if quant else ""}


def _config(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _digest(directory: Path | None) -> str:
    manifest = store.read_manifest(directory) if directory is not None else None
    return manifest.sha256 if manifest else ""


def _size(directory: Path | None) -> int:
    if directory is None:
        return 0
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


class OllamaModels:
    """The model-management endpoints."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._pull_lock = asyncio.Lock()  # one pull at a time

    # ---- what is hosted ------------------------------------------------------------------------
    def hosted(self) -> dict[str, str]:
        """Served name -> the model (name or path) behind it."""
        manager = self.state.manager
        if manager is not None:
            return {name: m.spec.model for m in manager.models for name in m.spec.names}
        engine = self.state.engine
        source = engine.model_info.name if engine is not None else ""
        return {name: source for name in self.state.config.served_model_names}

    def _entry(self, name: str, directory: Path | None) -> dict[str, Any]:
        modified = directory.stat().st_mtime if directory is not None else self.state.started
        return {"name": name, "model": name, "modified_at": _iso(modified),
                "size": _size(directory), "digest": _digest(directory),
                "details": details(directory)}

    def tags(self) -> dict[str, Any]:
        """Hosted models first, then what else the store holds."""
        entries = [self._entry(name, model_directory(source))
                   for name, source in self.hosted().items()]
        listed = {e["name"] for e in entries}
        for directory, manifest in store.list_pulled():
            if manifest.name not in listed:
                entries.append(self._entry(manifest.name, directory))
        return {"models": entries}

    def ps(self) -> dict[str, Any]:
        from pagoda.entrypoints.openai.app import ps_rows
        hosted = self.hosted()
        rows = [r for r in ps_rows(self.state) if r["state"] in ("loaded", "sleeping")]
        models = []
        for row in rows:
            directory = model_directory(hosted.get(row["model"], row["model"]))
            expires = row.get("expires_in_seconds")
            models.append({
                "name": row["model"], "model": row["model"], "size": row["held_bytes"],
                "size_vram": row["held_bytes"] if str(row["device"]).startswith("cuda") else 0,
                "digest": _digest(directory), "details": details(directory),
                "expires_at": (FAR_FUTURE if expires is None else datetime.now(UTC) +
                               timedelta(seconds=expires)).isoformat().replace("+00:00", "Z"),
                "context_length": self._context_length(row["model"])})
        return {"models": models}

    def _context_length(self, name: str) -> int | None:
        manager = self.state.manager
        if manager is not None:
            model = next((m for m in manager.models if name in m.spec.names), None)
            handle = model.handle if model is not None else None
            return handle.model_info.max_model_len if handle is not None else None
        engine = self.state.engine
        return engine.model_info.max_model_len if engine is not None else None

    def show(self, name: str) -> dict[str, Any]:
        name = model_name(name)
        hosted = self.hosted()
        source = hosted.get(name)
        directory = model_directory(source) if source is not None else (
            store.find_pulled(name) if store._is_plain_name(name) else None)
        if directory is None and source is None:
            raise UnknownOllamaModel(name)
        spec = self._spec(name)
        info = details(directory)
        context = self._context_length(name) if source is not None else None
        model_info: dict[str, Any] = {"general.architecture": info["family"]}
        if context is not None and info["family"]:
            model_info[f"{info['family']}.context_length"] = context
        return {"modelfile": self._modelfile(source or name, spec),
                "parameters": _parameters_text(spec.parameters if spec else {}),
                "template": (spec.chat_template if spec and spec.chat_template else
                             self._template(directory)),
                "system": spec.system if spec and spec.system else "",
                "details": info, "model_info": model_info,
                "capabilities": ["completion", "tools"],
                "modified_at": _iso(directory.stat().st_mtime if directory else
                                    self.state.started)}

    def _spec(self, name: str) -> Any:
        manager = self.state.manager
        if manager is None:
            return None
        return next((m.spec for m in manager.models if name in m.spec.names), None)

    @staticmethod
    def _template(directory: Path | None) -> str:
        if directory is None:
            return ""
        try:
            config = json.loads((directory / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            config = {}
        template = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(template, str):
            return template
        jinja = directory / "chat_template.jinja"
        return jinja.read_text() if jinja.is_file() else ""

    @staticmethod
    def _modelfile(source: str, spec: Any) -> str:
        lines = [f"FROM {source}"]
        if spec is not None and spec.system:
            lines.append(f'SYSTEM """{spec.system}"""')
        for key, value in (spec.parameters if spec is not None else {}).items():
            for item in value if isinstance(value, list) else [value]:
                lines.append(f"PARAMETER {key} {json.dumps(item) if key == 'stop' else item}")
        return "\n".join(lines) + "\n"

    # ---- the store ------------------------------------------------------------------------------
    def start_pull(self, name: str) -> store.BuiltinModel:
        """The built-in model a pull of `name` fetches (404 before any line is sent)."""
        model = store.lookup(model_name(name))
        if model is None:
            known = ", ".join(m.name for m in store.BUILTIN_MODELS)
            raise UnknownOllamaModel(name, f"model '{name[:256]}' cannot be pulled; pagoda "
                                           f"pulls: {known}")
        return model

    async def pull_lines(self, model: store.BuiltinModel) -> AsyncIterator[dict[str, Any]]:
        """Progress objects of one pull, ending with success or an error."""
        yield {"status": "pulling manifest"}
        async with self._pull_lock:
            try:
                directory = await asyncio.to_thread(store.pull, model.name)
            except PagodaError as exc:
                yield ollama_error(f"pull {model.name}: {exc}")
                return
        manifest = store.read_manifest(directory)
        size = manifest.size if manifest else 0
        digest = f"sha256:{manifest.sha256}" if manifest else ""
        yield {"status": f"pulling {digest[7:19] or model.name}", "digest": digest,
               "total": size, "completed": size}
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        yield {"status": "success"}

    def delete(self, name: str) -> None:
        """Remove a pulled model from the store (hosted engines keep what they loaded)."""
        name = model_name(name)
        directory = store.find_pulled(name) if store._is_plain_name(name) else None
        if directory is None:
            raise UnknownOllamaModel(name)
        shutil.rmtree(directory)

    def copy(self, source: str, destination: str) -> None:
        """A pulled model under a second name (see store.copy)."""
        source, destination = model_name(source), model_name(destination)
        try:
            store.copy(source, destination)
        except ModelNotFoundError:
            raise UnknownOllamaModel(source) from None
        except ConfigError as exc:
            raise InvalidRequestError(str(exc), "destination") from None


def _parameters_text(parameters: dict[str, Any]) -> str:
    lines = []
    for key, value in parameters.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {json.dumps(item) if key == 'stop' else item}")
    return "\n".join(lines)
