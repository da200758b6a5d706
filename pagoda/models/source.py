"""Resolving a model spec (pulled name, directory, .gguf file); reading its config, weights, tokenizer."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from pagoda.errors import ModelNotFoundError, UnsupportedModelError
from pagoda.models import store
from pagoda.models.gguf_index import (
    INDEX_NAME,
    GGUFIndex,
    GGUFTensor,
    read_tensor_index,
    reader_tensors,
)
from pagoda.models.hf_config import HFConfig
from pagoda.tokenizer.hf_tokenizer import load_hf_tokenizer

if TYPE_CHECKING:
    import torch

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
# Bump when the files converted at pull time change (gguf_hf_config's output, the tensor
# index): pulled models then re-derive instead of trusting them, until `pagoda pull` redoes
# the conversion. 2: the tensor index (gguf-tensors.json) was added. 3: config.json is
# written by pagoda (HFConfig.save), not transformers.
GGUF_CONFIG_VERSION = 3
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_SAFETENSORS_INDEX = "model.safetensors.index.json"
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


def resolve_model(spec: str, load_format: str = "auto") -> ModelSource:
    """Find the checkpoint `spec` names; `load_format` restricts or overrides its format."""
    if load_format not in LOAD_FORMATS:
        raise UnsupportedModelError(f"unknown load format {load_format!r}; use one of {LOAD_FORMATS}")
    path = Path(spec).expanduser()
    if path.exists():
        source = _resolve_path(spec, path, load_format)
    else:
        source = _resolve_name(spec, load_format)
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
    has_hf = (path / "config.json").is_file() and (load_format == "dummy" or _safetensors_files(path))
    ggufs = sorted(path.glob("*.gguf"))
    if has_hf and (load_format != "gguf" or not ggufs):
        return _hf_source(spec, path)  # a format mismatch is reported by _apply_format
    if len(ggufs) == 1:
        return _gguf_source(spec, ggufs[0])
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise ModelNotFoundError(f"{spec} holds several .gguf files ({names}); pass the file's path")
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
        raise ModelNotFoundError(f"model {spec!r} is not pulled yet: run `pagoda pull {builtin.name}`")
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
        raise UnsupportedModelError(f"{source.name} is a {source.format} checkpoint, not {load_format}")
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
                       gguf_tensors=tensors)


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


def has_tokenizer_files(path: Path) -> bool:
    return any((path / name).is_file() for name in _TOKENIZER_FILES)


def _safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's shards: those the index names if there is one, else every *.safetensors."""
    index = path / _SAFETENSORS_INDEX
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return [path / name for name in sorted(shards)]
    return sorted(path.glob("*.safetensors"))


@dataclass(slots=True)
class GGUFMeta:
    """Typed access to the metadata and tensor index of one GGUF file."""

    path: Path
    reader: gguf.GGUFReader
    arch: str

    @classmethod
    def open(cls, path: Path) -> GGUFMeta:
        """Memory-map `path` and read its header."""
        try:
            reader = gguf.GGUFReader(path, "r")
        except (ValueError, OSError, IndexError, KeyError) as exc:
            raise UnsupportedModelError(f"{path} is not a readable GGUF file: {exc}") from None
        field = reader.fields.get("general.architecture")
        if field is None:
            raise UnsupportedModelError(f"{path} has no general.architecture metadata")
        return cls(path, reader, str(field.contents()))

    def get(self, key: str, default: Any = None) -> Any:
        """Value of metadata `key` ("{arch}" is replaced by the architecture), else default."""
        field = self.reader.fields.get(key.format(arch=self.arch))
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        """Value of metadata `key`; a missing key is an unsupported file."""
        value = self.get(key)
        if value is None:
            raise UnsupportedModelError(f"{self.path} lacks GGUF metadata {key.format(arch=self.arch)}")
        return value

    def count(self, key: str) -> int | None:
        """Length of array metadata `key` without decoding its items."""
        field = self.reader.fields.get(key.format(arch=self.arch))
        return None if field is None else len(field.data)

    def tensor_index(self) -> GGUFIndex:
        """The file's architecture and tensors, as the reader parsed them."""
        return GGUFIndex(self.arch, list(reader_tensors(self.reader)))

    def tensor(self, name: str) -> gguf.ReaderTensor | None:
        """The tensor called `name`, if the file has one."""
        return next((t for t in self.reader.tensors if t.name == name), None)


@dataclass(frozen=True, slots=True)
class GGUFArch:
    """How one GGUF `general.architecture` maps onto an HF config and HF tensor names."""

    build_config: Callable[[GGUFMeta], HFConfig]
    global_names: Mapping[str, str]  # GGUF tensor stem -> HF module path
    block_names: Mapping[str, str]  # GGUF per-block stem -> HF module path under model.layers.N
    transform: Callable[[str, np.ndarray, HFConfig], np.ndarray]
    skipped: frozenset[str] = frozenset()  # tensors consumed by build_config, not parameters


def gguf_hf_config(path: Path, meta: GGUFMeta | None = None) -> HFConfig:
    """Build the HF config of GGUF file `path` from its metadata (`meta`, if the
    caller has the file open already)."""
    meta = meta or GGUFMeta.open(path)
    if int(meta.get("split.count", 1)) > 1:
        raise UnsupportedModelError(f"{path} is one shard of a split GGUF; merge it with llama-gguf-split")
    return _arch(meta.arch, meta.path).build_config(meta)


def _arch(arch: str, path: Path) -> GGUFArch:
    spec = GGUF_ARCHS.get(arch)
    if spec is None:
        supported = ", ".join(GGUF_ARCHS)
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {supported})")
    return spec


def _llama_config(meta: GGUFMeta) -> HFConfig:
    if meta.get("{arch}.expert_count"):
        raise UnsupportedModelError(f"{meta.path}: llama GGUF with experts (MoE) is not supported yet")
    hidden = int(meta.require("{arch}.embedding_length"))
    heads = int(meta.require("{arch}.attention.head_count"))
    head_dim = int(meta.get("{arch}.attention.key_length") or meta.get("{arch}.rope.dimension_count")
                   or hidden // heads)
    return HFConfig.from_dict(dict(
        model_type="llama",
        vocab_size=_vocab_size(meta),
        hidden_size=hidden,
        intermediate_size=int(meta.require("{arch}.feed_forward_length")),
        num_hidden_layers=int(meta.require("{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get("{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(meta.get("{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(meta.get("{arch}.context_length", 2048)),
        rope_parameters=_llama_rope(meta, head_dim),
        tie_word_embeddings=meta.tensor("output.weight") is None,
        architectures=["LlamaForCausalLM"],
        **_special_token_ids(meta),
    ))


def _vocab_size(meta: GGUFMeta) -> int:
    size = meta.get("{arch}.vocab_size") or meta.count("tokenizer.ggml.tokens")
    if size is None:
        embedding = meta.tensor("token_embd.weight")
        if embedding is None:
            raise UnsupportedModelError(f"{meta.path}: cannot tell the vocabulary size")
        size = int(embedding.shape[-1])  # GGUF lists dims innermost first
    return int(size)


def _special_token_ids(meta: GGUFMeta) -> dict[str, Any]:
    eos = meta.get("tokenizer.ggml.eos_token_id")
    extra = (meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id"))
    stops = list(dict.fromkeys(int(t) for t in (eos, *extra) if t is not None))
    return {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": stops[0] if len(stops) == 1 else (stops or None),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }


def _llama_rope(meta: GGUFMeta, head_dim: int) -> dict[str, Any]:
    theta = float(meta.get("{arch}.rope.freq_base", 10000.0))
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    freqs = meta.tensor("rope_freqs.weight")
    if freqs is not None:
        return params | _llama3_rope(meta, _dequantize(freqs), theta, head_dim)
    legacy_linear = meta.get("{arch}.rope.scale_linear")  # pre-2024 files: linear factor only
    kind = meta.get("{arch}.rope.scaling.type") or ("linear" if legacy_linear else "none")
    factor = meta.get("{arch}.rope.scaling.factor") or legacy_linear
    if kind == "none":
        return params
    if kind not in ("linear", "yarn") or not factor:
        raise UnsupportedModelError(f"{meta.path}: rope scaling {kind!r} (factor {factor}) is not supported")
    if kind == "linear":
        return params | {"rope_type": "linear", "factor": float(factor)}
    return params | _yarn_rope(meta, float(factor))


def _yarn_rope(meta: GGUFMeta, factor: float) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "yarn", "factor": factor}
    original = meta.get("{arch}.rope.scaling.original_context_length")
    if original:
        params["original_max_position_embeddings"] = int(original)
    for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        value = meta.get("{arch}.rope.scaling." + key)
        if value is not None:
            params[name] = float(value)
    return params


def _llama3_rope(meta: GGUFMeta, factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """Recover Llama 3.1-style rope parameters from llama.cpp's per-frequency divisors."""
    params = {"rope_type": "llama3", "factor": round(float(factors.max()), 4), "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if not np.allclose(llama3_rope_factors(params, theta, head_dim), factors, rtol=1e-4, atol=1e-6):
        raise UnsupportedModelError(f"{meta.path}: rope_freqs do not match Llama 3 rope scaling")
    return params


def llama3_rope_factors(params: Mapping[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency divisors llama.cpp stores as rope_freqs for Llama 3 rope scaling."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old_len = params["original_max_position_embeddings"]
    low, high, factor = params["low_freq_factor"], params["high_freq_factor"], params["factor"]
    smooth = np.clip((old_len / wavelen - low) / (high - low), 0.0, 1.0)
    return (1.0 / ((1 - smooth) / factor + smooth)).astype(np.float32)


def iter_weights(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF parameter name, tensor) for every weight of the checkpoint."""
    if source.format == "safetensors":
        yield from _iter_safetensors(source.path)
    elif source.format == "gguf" and source.gguf_file is not None:
        yield from _iter_gguf(source.gguf_file, source.hf_config, source.gguf_tensors)
    else:
        raise UnsupportedModelError(f"{source.name}: no weights to read for format {source.format!r}")


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for shard in _safetensors_files(path):
        with safe_open(shard, framework="pt") as tensors:
            for name in tensors.keys():
                yield name, tensors.get_tensor(name)


def _iter_gguf(path: Path, config: HFConfig,
               tensors: GGUFIndex | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantize each tensor to float32, renamed to HF and transformed into HF's layout."""
    import torch
    found = tensors or read_gguf_tensors(path)
    arch = _arch(found.architecture, path)
    for tensor in found.tensors:
        if tensor.name in arch.skipped:
            continue
        name = _hf_name(arch, tensor.name)
        if name is None:
            raise UnsupportedModelError(
                f"{path}: no HF name for GGUF tensor {tensor.name!r} ({found.architecture})")
        yield name, torch.from_numpy(arch.transform(name, _dequantize(tensor), config))


def read_gguf_tensors(path: Path) -> GGUFIndex:
    """The file's architecture and tensors, through gguf's reader (parses all metadata)."""
    return GGUFMeta.open(path).tensor_index()


def _hf_name(arch: GGUFArch, gguf_name: str) -> str | None:
    stem, _, kind = gguf_name.rpartition(".")
    block = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if block is not None:
        module = arch.block_names.get(block[2])
        return None if module is None else f"model.layers.{block[1]}.{module}.{kind}"
    module = arch.global_names.get(stem)
    return None if module is None else f"{module}.{kind}"


def _dequantize(tensor: GGUFTensor) -> np.ndarray:
    """The tensor as a writable float32 array in torch's dim order (GGUF lists dims reversed)."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        if tensor.data.dtype == np.uint8:  # a block-quantized type gguf cannot decode
            raise UnsupportedModelError(f"GGUF tensor {tensor.name}: type {tensor.tensor_type.name} "
                                        "cannot be dequantized") from None
        values = tensor.data  # plain F64 / integer tensors
    values = np.asarray(values).reshape(shape)
    if values.dtype != np.float32 or not values.flags.writeable:
        values = values.astype(np.float32)  # copies: never hand torch the read-only memory map
    return values


def _llama_transform(name: str, weight: np.ndarray, config: HFConfig) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of q_proj / k_proj."""
    if ".self_attn.q_proj." in name:
        return unpermute_rope_rows(weight, config.num_attention_heads)
    if ".self_attn.k_proj." in name:
        return unpermute_rope_rows(weight, config.num_key_value_heads)
    return weight


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permute: per head, rows (pair i, half h) -> row h*half + i.

    llama.cpp stores each head's rotary rows interleaved (x0, y0, x1, y1, ...); HF keeps
    them split in halves (x0, x1, ..., y0, y1, ...) for rotate_half.
    """
    rows = weight.shape[0]
    per_head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(per_head.swapaxes(1, 2).reshape(weight.shape))


_LLAMA_BLOCK_NAMES = MappingProxyType({
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
})
_LLAMA_GLOBAL_NAMES = MappingProxyType({
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
})

# Extension point: one entry per supported GGUF architecture.
GGUF_ARCHS: Mapping[str, GGUFArch] = MappingProxyType({
    "llama": GGUFArch(
        build_config=_llama_config,
        global_names=_LLAMA_GLOBAL_NAMES,
        block_names=_LLAMA_BLOCK_NAMES,
        transform=_llama_transform,
        skipped=frozenset({"rope_freqs.weight"}),
    ),
})


def load_tokenizer(source: ModelSource) -> Any:
    """The model's transformers tokenizer, with its chat template set when the GGUF has one."""
    if source.tokenizer_path is not None:
        tokenizer = load_hf_tokenizer(source.tokenizer_path)
        if tokenizer.chat_template is None and source.gguf_file is not None:
            tokenizer.chat_template = GGUFMeta.open(source.gguf_file).get("tokenizer.chat_template")
        return tokenizer
    if source.gguf_file is not None:
        return tokenizer_from_gguf(source.gguf_file)
    raise ModelNotFoundError(f"{source.path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")


def tokenizer_from_gguf(gguf_file: Path) -> Any:
    """Convert the tokenizer embedded in a GGUF file (slow: seconds for a 50k vocabulary).
    It is read from a directory holding (a link to) the GGUF alone: transformers would also
    read tokenizer files lying next to it, such as an earlier conversion's, and mix them in."""
    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory(prefix="pagoda-gguf-") as alone:
        (Path(alone) / gguf_file.name).symlink_to(gguf_file.resolve())
        tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=gguf_file.name)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = GGUFMeta.open(gguf_file).get("tokenizer.chat_template")
    return tokenizer
