"""Resolving a model spec (pulled name, directory, .gguf file) to its config and files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from pagoda.errors import ModelNotFoundError, UnsupportedModelError
from pagoda.models import store
from pagoda.models.gguf_index import INDEX_NAME, GGUFIndex, read_tensor_index
from pagoda.models.hf_config import HFConfig
from pagoda.models.loader.gguf import GGUF_CONFIG_VERSION, GGUFMeta, gguf_hf_config
from pagoda.models.loader.safetensors import safetensors_files
from pagoda.models.registry import arch_spec
from pagoda.tokenizer.hf_tokenizer import has_tokenizer_files

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_LAYOUTS = (
    "a pulled model name (see `pagoda list`), a directory with config.json and *.safetensors, "
    "a directory holding one .gguf file, or a path to a .gguf file"
)


@dataclass(slots=True)
class ModelSource:
    """Where a model's config, weights and tokenizer come from."""

    name: str
    path: Path  # directory of the checkpoint
    format: str  # "safetensors" | "gguf" | "dummy"
    hf_config: HFConfig
    gguf_file: Path | None = None
    tokenizer_path: Path | None = None  # directory with tokenizer files; None: use the GGUF
    # the GGUF's tensors as found while resolving (through the index saved at pull, or from
    # the metadata the config was built from), so loading parses nothing; None: read at load
    gguf_tensors: GGUFIndex | None = field(default=None, compare=False, repr=False)
    # a pull's current conversion lies beside the GGUF: the tokenizer there carries the chat
    # template the GGUF had (else the architecture's default), so the GGUF is not read for it
    converted: bool = False


def resolve_model(spec: str, load_format: str = "auto") -> ModelSource:
    """Find the checkpoint `spec` names; `load_format` restricts or overrides its format."""
    if load_format not in LOAD_FORMATS:
        raise UnsupportedModelError(
            f"unknown load format {load_format!r}; use one of {LOAD_FORMATS}")
    path = Path(spec).expanduser()
    if path.exists():
        source = _resolve_path(spec, path, load_format)
    else:
        source = _resolve_name(spec, load_format)
    arch_spec(source.hf_config)  # an unknown architecture fails here, in one line
    return _apply_format(source, load_format)


def _resolve_path(spec: str, path: Path, load_format: str) -> ModelSource:
    if path.is_dir():
        return _resolve_dir(spec, path, load_format)
    if path.suffix.lower() == ".gguf":
        return _gguf_source(spec, _absolute(path))
    raise ModelNotFoundError(f"{spec} is a file but not a .gguf; a model is {_LAYOUTS}")


def _resolve_dir(spec: str, path: Path, load_format: str) -> ModelSource:
    path = _absolute(path)
    manifest = store.read_manifest(path)
    if manifest is not None and store.is_complete(path, manifest):
        return _pulled_source(spec, path, manifest)
    has_hf = ((path / "config.json").is_file()
              and (load_format == "dummy" or safetensors_files(path)))
    ggufs = sorted(path.glob("*.gguf"))
    if has_hf and (load_format != "gguf" or not ggufs):
        return _hf_source(spec, path)  # a format mismatch is reported by _apply_format
    if len(ggufs) == 1:
        return _gguf_source(spec, ggufs[0])
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelNotFoundError(
            f"{spec} holds several .gguf files ({names}); pass the file's path")
    raise ModelNotFoundError(f"{spec} does not look like a model directory; a model is {_LAYOUTS}")


def _absolute(path: Path) -> Path:
    """Absolute and normalized, without following symlinks (HF cache files link to hashed blobs)."""
    return Path(os.path.abspath(path))


def _resolve_name(spec: str, load_format: str) -> ModelSource:
    pulled = store.find_pulled(spec)
    if pulled is not None:
        return _resolve_dir(spec, pulled, load_format)
    builtin = store.lookup(spec)
    if builtin is not None:
        raise ModelNotFoundError(
            f"model {spec!r} is not pulled yet: run `pagoda pull {builtin.name}`")
    cached = _hub_cache_dir(spec)
    if cached is not None:
        return _resolve_dir(spec, cached, load_format)
    known = ", ".join(m.name for m in store.BUILTIN_MODELS)
    raise ModelNotFoundError(
        f"model {spec!r} not found: no such path, pulled model or Hugging Face cache entry. "
        f"A model is {_LAYOUTS}. Built-in models (`pagoda pull NAME`): {known}"
    )


def _hub_cache_dir(spec: str) -> Path | None:
    """The local Hugging Face cache snapshot of repo id `spec`, without touching the network."""
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=spec, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None


def _apply_format(source: ModelSource, load_format: str) -> ModelSource:
    if load_format == "dummy":
        return replace(source, format="dummy")
    if load_format not in ("auto", source.format):
        raise UnsupportedModelError(
            f"{source.name} is a {source.format} checkpoint, not {load_format}")
    return source


def _pulled_source(spec: str, path: Path, manifest: store.Manifest) -> ModelSource:
    gguf_file = path / manifest.gguf
    cached = manifest.config_version == GGUF_CONFIG_VERSION and (path / "config.json").is_file()
    if cached:
        config, tensors = HFConfig.from_dir(path), read_tensor_index(gguf_file, path / INDEX_NAME)
    else:
        config, tensors = _gguf_config_and_tensors(gguf_file)
    tokenizer = path if has_tokenizer_files(path) else None
    return ModelSource(spec, path, "gguf", config, gguf_file=gguf_file, tokenizer_path=tokenizer,
                       gguf_tensors=tensors, converted=cached and tokenizer is not None)


def _gguf_source(spec: str, gguf_file: Path) -> ModelSource:
    config, tensors = _gguf_config_and_tensors(gguf_file)
    return ModelSource(spec, gguf_file.parent, "gguf", config, gguf_file=gguf_file,
                       gguf_tensors=tensors)


def _gguf_config_and_tensors(gguf_file: Path) -> tuple[HFConfig, GGUFIndex]:
    """The config and tensors of a GGUF, from one parse of its metadata."""
    meta = GGUFMeta.open(gguf_file)
    return gguf_hf_config(gguf_file, meta), meta.tensor_index()


def _hf_source(spec: str, path: Path) -> ModelSource:
    tokenizer = path if has_tokenizer_files(path) else None
    return ModelSource(spec, path, "safetensors", HFConfig.from_dir(path), tokenizer_path=tokenizer)
