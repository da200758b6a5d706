"""Reading GGUF files: metadata, the HF config an architecture builds from it, and the
weights dequantized and renamed to HF (the architecture's GGUF layout says how)."""

from __future__ import annotations

import re
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from pagoda.errors import UnsupportedModelError
from pagoda.models.gguf_index import GGUFIndex, GGUFTensor, reader_tensors

if TYPE_CHECKING:
    import torch

    from pagoda.layers.quantization.gguf import GGUFWeight
    from pagoda.models.arch.base import GGUFLayout
    from pagoda.models.hf_config import HFConfig
    from pagoda.models.loader.safetensors import CheckpointSlice

# Bump when the files converted at pull time change (gguf_hf_config's output, the tensor
# index): pulled models then re-derive instead of trusting them, until `pagoda pull` redoes
# the conversion. 2: the tensor index (gguf-tensors.json) was added. 3: config.json is
# written by pagoda (HFConfig.save), not transformers. 4: the tokenizer is saved with its chat
# template (the GGUF's, else the architecture's default), so loads never read the GGUF for it.
# 5: Gemma 3's config lists <end_of_turn> among its stop ids.
GGUF_CONFIG_VERSION = 5


@dataclass(slots=True)
class GGUFMeta:
    """Typed access to the metadata and tensor index of one GGUF file."""

    path: Path
    reader: gguf.GGUFReader
    arch: str

    @classmethod
    def open(cls, path: Path) -> GGUFMeta:
        """Memory-map `path` and read its header (after checking its architecture: a full
        parse of a big vocabulary takes a minute)."""
        arch = peek_architecture(path)
        if arch is not None:
            gguf_layout(arch, path)  # an unsupported one fails here, in milliseconds
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
            raise UnsupportedModelError(
                f"{self.path} lacks GGUF metadata {key.format(arch=self.arch)}")
        return value

    def count(self, key: str) -> int | None:
        """Length of array metadata `key` without decoding its items."""
        field = self.reader.fields.get(key.format(arch=self.arch))
        return None if field is None else len(field.data)

    def token_id(self, text: str) -> int | None:
        """The id of the vocabulary entry spelled `text` (llama.cpp finds end-of-turn tokens
        this way), read entry by entry from the start of the vocabulary."""
        field = self.reader.fields.get("tokenizer.ggml.tokens")
        if field is None:
            return None
        wanted = text.encode()
        for token_id, part in enumerate(field.data):
            if field.parts[part].tobytes() == wanted:
                return token_id
        return None

    def tensor_index(self) -> GGUFIndex:
        """The file's architecture and tensors, as the reader parsed them."""
        return GGUFIndex(self.arch, list(reader_tensors(self.reader)))

    def tensor(self, name: str) -> gguf.ReaderTensor | None:
        """The tensor called `name`, if the file has one."""
        return next((t for t in self.reader.tensors if t.name == name), None)


# a GGUF value's type code -> its size in bytes (scalars); strings and arrays are read by length
GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_STRING, GGUF_ARRAY = 8, 9


def peek_architecture(path: Path, max_keys: int = 64) -> str | None:
    """general.architecture read straight from the header's first key-value pairs (where
    writers put it), without parsing the rest; None if not found there or not a GGUF."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF" or struct.unpack("<I", f.read(4))[0] < 2:
                return None
            _, num_keys = struct.unpack("<QQ", f.read(16))
            for _ in range(min(num_keys, max_keys)):
                key = f.read(struct.unpack("<Q", f.read(8))[0])
                kind = struct.unpack("<I", f.read(4))[0]
                if kind == GGUF_STRING:
                    value = f.read(struct.unpack("<Q", f.read(8))[0])
                    if key == b"general.architecture":
                        return value.decode("utf-8", errors="replace")
                elif kind in GGUF_SCALAR_SIZES:
                    f.seek(GGUF_SCALAR_SIZES[kind], 1)
                elif kind == GGUF_ARRAY:
                    item, count = struct.unpack("<IQ", f.read(12))
                    if item not in GGUF_SCALAR_SIZES:
                        return None  # arrays of strings (the vocabulary): stop looking
                    f.seek(GGUF_SCALAR_SIZES[item] * count, 1)
                else:
                    return None
    except (OSError, struct.error, ValueError):
        return None
    return None


def gguf_layout(arch: str, path: Path) -> GGUFLayout:
    """The layout of GGUF architecture `arch`, or one clear error naming the supported ones."""
    from pagoda.models.registry import gguf_layouts
    layouts = gguf_layouts()
    if arch not in layouts:
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported "
                                    f"(supported: {', '.join(sorted(layouts))})")
    return layouts[arch]


def gguf_hf_config(path: Path, meta: GGUFMeta | None = None) -> HFConfig:
    """Build the HF config of GGUF file `path` from its metadata (`meta`, if the
    caller has the file open already)."""
    meta = meta or GGUFMeta.open(path)
    if int(meta.get("split.count", 1)) > 1:
        raise UnsupportedModelError(
            f"{path} is one shard of a split GGUF; merge it with llama-gguf-split")
    return gguf_layout(meta.arch, meta.path).build_config(meta)


def decoder_config(meta: GGUFMeta, rms_eps_default: float = 1e-6,
                   experts: bool = False) -> dict[str, Any]:
    """The config fields every llama.cpp decoder architecture stores the same way
    (`experts`: the architecture reads its expert fields itself)."""
    if meta.get("{arch}.expert_count") and not experts:
        raise UnsupportedModelError(f"{meta.path}: {meta.arch} GGUF with experts (MoE) is not "
                                    "supported yet")
    hidden = int(meta.require("{arch}.embedding_length"))
    heads = int(meta.require("{arch}.attention.head_count"))
    return dict(
        vocab_size=vocab_size(meta),
        hidden_size=hidden,
        intermediate_size=int(meta.require("{arch}.feed_forward_length")),
        num_hidden_layers=int(meta.require("{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get("{arch}.attention.head_count_kv", heads)),
        head_dim=int(meta.get("{arch}.attention.key_length")
                     or meta.get("{arch}.rope.dimension_count") or hidden // heads),
        rms_norm_eps=float(meta.get("{arch}.attention.layer_norm_rms_epsilon", rms_eps_default)),
        max_position_embeddings=int(meta.get("{arch}.context_length", 2048)),
        tie_word_embeddings=meta.tensor("output.weight") is None,
        **special_token_ids(meta),
    )


def vocab_size(meta: GGUFMeta) -> int:
    size = meta.get("{arch}.vocab_size") or meta.count("tokenizer.ggml.tokens")
    if size is None:
        embedding = meta.tensor("token_embd.weight")
        if embedding is None:
            raise UnsupportedModelError(f"{meta.path}: cannot tell the vocabulary size")
        size = int(embedding.shape[-1])  # GGUF lists dims innermost first
    return int(size)


def special_token_ids(meta: GGUFMeta) -> dict[str, Any]:
    eos = meta.get("tokenizer.ggml.eos_token_id")
    extra = (meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id"))
    stops = list(dict.fromkeys(int(t) for t in (eos, *extra) if t is not None))
    return {
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": stops[0] if len(stops) == 1 else (stops or None),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }


def iter_gguf(path: Path, config: HFConfig, tensors: GGUFIndex | None = None,
              keep_blocks: Callable[[str, str], bool] | None = None, lazy: bool = False
              ) -> Iterator[tuple[str, torch.Tensor | GGUFWeight | CheckpointSlice]]:
    """Each tensor renamed to HF and transformed into HF's layout: dequantized to float32,
    or, where `keep_blocks(HF name, GGUF type name)` says so, as its rows of blocks (the
    layout's transforms only reorder rows, which blocks allow). `lazy`: a matrix of a block
    type pagoda decodes comes as a CheckpointSlice that decodes only the rows and blocks a
    rank's weight loader keeps."""
    import torch
    found = tensors or read_gguf_tensors(path)
    layout = gguf_layout(found.architecture, path)
    for tensor in found.tensors:
        if tensor.name in layout.skipped:
            continue
        name = hf_name(layout, tensor.name)
        if name is None:
            raise UnsupportedModelError(
                f"{path}: no HF name for GGUF tensor {tensor.name!r} ({found.architecture})")
        matrix, stacked = len(tensor.shape) == 2, len(tensor.shape) == 3
        if keep_blocks is not None and (matrix or stacked) and \
                keep_blocks(name, tensor.tensor_type.name):
            rows = layout.transform(name, tensor.data, config)
            if stacked:
                yield from _expert_block_rows(tensor, name, rows)
            else:
                yield name, _block_rows(tensor, rows)
        elif lazy and matrix and _decodes(tensor):
            yield name, _decoded_on_read(tensor, layout.transform(name, tensor.data, config))
        else:
            yield name, torch.from_numpy(layout.transform(name, dequantize(tensor), config))


def _decodes(tensor: GGUFTensor) -> bool:
    """Whether pagoda decodes the tensor's block type itself (gguf_blocks.FORMATS)."""
    from pagoda.layers.quantization.gguf_blocks import FORMATS
    return tensor.tensor_type.name in FORMATS


def _decoded_on_read(tensor: GGUFTensor, rows: np.ndarray) -> CheckpointSlice:
    """A matrix of blocks ([out, row bytes], in HF's row order) as a CheckpointSlice of its
    float32 values: reading a part decodes only its rows and the blocks covering its
    columns."""
    from pagoda.models.loader.safetensors import CheckpointSlice
    source = DecodedBlocks(rows, tensor.tensor_type.name)
    return CheckpointSlice(source, [(0, rows.shape[0]), (0, int(tensor.shape[0]))])


class DecodedBlocks:
    """Rows of GGUF blocks that decode to float32 where indexed by [row slice, column
    slice]: the rows asked for, and in them the blocks covering the columns."""

    def __init__(self, rows: np.ndarray, type_name: str) -> None:
        self.rows = rows  # [out, row bytes] uint8, possibly a read-only map of the file
        self.type_name = type_name

    def __getitem__(self, key: tuple[slice, slice]) -> torch.Tensor:
        import torch

        from pagoda.layers.quantization.gguf_blocks import FORMATS, dequantize_rows
        rows, columns = key
        fmt = FORMATS[self.type_name]
        first = columns.start // fmt.block_weights * fmt.block_weights
        stop = -(-columns.stop // fmt.block_weights) * fmt.block_weights
        raw = np.array(self.rows[rows, fmt.row_bytes(first):fmt.row_bytes(stop)],
                       dtype=np.uint8, copy=True)  # out of the read-only map
        decoded = dequantize_rows(torch.from_numpy(raw), self.type_name)
        return decoded[:, columns.start - first:columns.stop - first]


def _expert_block_rows(tensor: GGUFTensor, name: str, rows: np.ndarray
                       ) -> Iterator[tuple[str, GGUFWeight]]:
    """A stack of every expert's one projection ([experts, out, row bytes]) as each expert's
    blocks, named as a checkpoint names one expert's tensor."""
    from pagoda.layers.quantization.gguf import GGUFWeight
    from pagoda.models.loader.weights import STACKED_EXPERTS
    match = STACKED_EXPERTS.fullmatch(name)
    if match is None:
        raise UnsupportedModelError(f"GGUF tensor {tensor.name!r} ({name}) holds three "
                                    "dimensions but no experts")
    stack = _block_rows(tensor, rows)
    for expert in range(rows.shape[0]):
        yield (f"{match[1]}.{expert}.{match[2]}.weight",
               GGUFWeight(stack.rows[expert], stack.type_name, stack.columns))


def _block_rows(tensor: GGUFTensor, rows: np.ndarray) -> GGUFWeight:
    """The tensor's [out, row bytes] blocks as a read-only view of the memory map: the layer
    that keeps them copies only this rank's rows and blocks (nothing writes to the view)."""
    import torch

    from pagoda.layers.quantization.gguf import GGUFWeight
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        view = torch.from_numpy(np.asarray(rows, dtype=np.uint8))
    return GGUFWeight(view, tensor.tensor_type.name, int(tensor.shape[0]))


FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"})


def block_types(tensors: GGUFIndex) -> set[str]:
    """The quantized (block) types among the file's tensors."""
    return {t.tensor_type.name for t in tensors.tensors} - FLOAT_TYPES


def _weight_tensors(path: Path, tensors: GGUFIndex | None
                    ) -> Iterator[tuple[str, GGUFTensor]]:
    """(HF tensor name, tensor) for every tensor of the file's index (`tensors`, when the
    source has it; else read) that the loader turns into a weight."""
    found = tensors or read_gguf_tensors(path)
    layout = gguf_layout(found.architecture, path)
    for tensor in found.tensors:
        if tensor.name not in layout.skipped:
            yield hf_name(layout, tensor.name) or tensor.name, tensor


def gguf_types(path: Path, tensors: GGUFIndex | None = None) -> Iterator[tuple[str, str]]:
    """(HF tensor name, GGUF type name) for every tensor the loader turns into a weight."""
    for name, tensor in _weight_tensors(path, tensors):
        yield name, tensor.tensor_type.name


def gguf_shapes(path: Path, tensors: GGUFIndex | None = None
                ) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF tensor name, shape) for every GGUF tensor the loader turns into a weight, from the
    file's tensor index (no tensor is dequantized)."""
    for name, tensor in _weight_tensors(path, tensors):
        yield name, tuple(int(d) for d in reversed(tensor.shape))


def gguf_tensor_bytes(path: Path, tensors: GGUFIndex | None = None
                      ) -> Iterator[tuple[str, int]]:
    """(HF tensor name, bytes in the file) for every GGUF tensor the loader turns into a
    weight: its blocks' bytes as stored."""
    for name, tensor in _weight_tensors(path, tensors):
        yield name, int(tensor.data.nbytes)


def read_gguf_tensors(path: Path) -> GGUFIndex:
    """The file's architecture and tensors, through gguf's reader (parses all metadata)."""
    return GGUFMeta.open(path).tensor_index()


def hf_name(layout: GGUFLayout, gguf_name: str) -> str | None:
    stem, _, kind = gguf_name.rpartition(".")
    block = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if block is not None:
        module = layout.block_names.get(block[2])
        return None if module is None else f"model.layers.{block[1]}.{module}.{kind}"
    module = layout.global_names.get(stem)
    return None if module is None else f"{module}.{kind}"


def _decode_blocks(tensor: GGUFTensor) -> np.ndarray | None:
    """A block type pagoda decodes itself, in torch (the same floats as gguf-py, several
    times faster); None for other types."""
    if not _decodes(tensor):
        return None
    import torch

    from pagoda.layers.quantization.gguf_blocks import dequantize_rows
    raw = np.array(tensor.data, dtype=np.uint8, copy=True)  # out of the read-only map
    rows = torch.from_numpy(raw.reshape(-1, raw.shape[-1]))
    return dequantize_rows(rows, tensor.tensor_type.name).numpy()


def dequantize(tensor: GGUFTensor) -> np.ndarray:
    """The tensor as a writable float32 array in torch's dim order (GGUF lists dims reversed)."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    decoded = _decode_blocks(tensor)
    if decoded is not None:
        return decoded.reshape(shape)
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        if tensor.data.dtype == np.uint8:  # a block-quantized type gguf cannot decode
            raise UnsupportedModelError(
                f"GGUF tensor {tensor.name}: type {tensor.tensor_type.name} "
                "cannot be dequantized") from None
        values = tensor.data  # plain F64 / integer tensors
    values = np.asarray(values).reshape(shape)
    if values.dtype != np.float32 or not values.flags.writeable:
        values = values.astype(np.float32)  # copies: never hand torch the read-only memory map
    return values
