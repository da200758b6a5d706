"""Memory a model will need, before any weight is read: weights, KV cache for a concurrency at
a context length, an activation allowance, and whether it fits a device.

Weights count the checkpoint's tensors from the safetensors or GGUF headers (only those the
engine keeps as parameters) at the dtype the engine would pick, or, for quantized weights, in
the form the engine holds them (`held_bytes`); a config-only source falls back to the
parameter count its architecture declares (models/arch/). KV is computed as the engine
allocates it (16-token blocks of its KV groups plus the reserved null block): a sliding-window
layer holds min(window + chunk, context) tokens of a sequence (in whole blocks), where chunk is
the token budget of a step. The activation figure is an allowance, not a measurement: on a GPU
the engine profiles the real peak at startup.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pagoda.config import resolve_dtype
from pagoda.errors import ConfigError
from pagoda.kv_cache.groups import group_layers
from pagoda.layers.attention.selector import holds_e4m3_cache
from pagoda.layers.parallel import layer_ranges
from pagoda.layers.quantization.group_gemm import (
    DECODED_SLICE_BYTES,
    fewest_tokens_decoded_first,
)
from pagoda.models.arch.base import ArchSpec, LayerAttention
from pagoda.models.loader.gguf import gguf_shapes, gguf_types
from pagoda.models.loader.safetensors import safetensors_dtypes, safetensors_shapes
from pagoda.models.quantization import (
    quantization_config,
    quantizes_at_load,
    resolve_kv_cache_dtype,
    resolve_quantization,
)
from pagoda.models.registry import arch_spec
from pagoda.models.source import ModelSource
from pagoda.runner.memory import kv_cache_torch_dtype

GIB = 1 << 30
BLOCK_SIZE = 16
Q4_K_M_BYTES = 0.6  # bytes a weight takes in a Q4_K_M GGUF (about 4.8 bits)
CUDA_CONTEXT_BYTES = 512 << 20  # CUDA context, cuBLAS workspaces: roughly, per GPU
# usable memory per GPU as nvidia-smi reports it (MiB)
DEVICES_MIB = {"H100": 81559, "H200": 143771, "H20": 97871, "B200": 183359,
               "A100-80G": 81920, "A100-40G": 40960, "L40S": 46068, "L40": 46068,
               "L4": 23034, "A10": 23028, "T4": 15360, "RTX3090": 24576, "RTX4090": 24564,
               "RTX5090": 32607, "MI300X": 196592}
# the named GPUs of compute capability below 8.9, whose attention kernels hold no float8
# E4M3 KV cache (a checkpoint calibrated for one keeps its model dtype there)
WITHOUT_E4M3 = frozenset({"A100-80G", "A100-40G", "A10", "T4", "RTX3090"})
# other names for the same devices ("A100" alone is the 80 GB part, the one clouds rent)
DEVICE_ALIASES = {"A100": "A100-80G", "A10080G": "A100-80G", "A10040G": "A100-40G",
                  "H100SXM": "H100", "H100PCIE": "H100", "GEFORCERTX4090": "RTX4090",
                  "GEFORCERTX3090": "RTX3090", "GEFORCERTX5090": "RTX5090"}


@dataclass(slots=True)
class MemoryEstimate:
    model: str
    dtype: str
    num_parameters: int
    weights_from: str  # "safetensors header", "gguf header" or "config"
    weight_bytes: int  # per GPU (weights split over tp, layers over pp)
    kv_bytes_per_token: int  # per GPU, every layer
    kv_bytes: int  # per GPU: concurrency x kv_bytes_per_seq + the null block
    kv_bytes_per_seq: int  # per GPU: one max_model_len sequence's blocks at their peak
    kv_bytes_without_freeing: int  # kv_bytes if sliding-window layers kept every token
    activation_bytes: int  # an allowance for one full step of the token budget
    overhead_bytes: int
    peak_bytes: int  # per GPU
    max_model_len: int
    concurrency: int
    tensor_parallel: int
    token_budget: int  # tokens a step runs: a sliding-window layer holds its window + this
    active_parameters: int | None = None  # a mixture of experts: what one token runs
    pipeline_parallel: int = 1  # with more than one stage, the figures are the first's
    quantization: str | None = None  # the form the weights are held in (None: --dtype)
    kv_dtype: str | None = None  # the KV cache's element type when not dtype (float8, bfloat16)
    device: str | None = None
    device_bytes: int | None = None
    usable_bytes: int | None = None  # device_bytes x gpu_memory_utilization
    fits: bool | None = None
    suggestions: list[str] | None = None  # what would fit, when it does not

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# a linear layer's weight, which quantization formats replace (experts and routers stay)
_LINEAR_WEIGHT = re.compile(r".*\.(q|k|v|o|gate|up|down)_proj\.(weight|qweight)")
_EMBEDDING = "model.embed_tokens.weight"
_HEAD = "lm_head.weight"
# tensors of quantized checkpoints that hold no parameters of their own
_QUANT_AUX = ("qzeros", "scales", "g_idx", "weight_scale", "weight_scale_inv", "input_scale",
              "weight_zero_point", "weight_g_idx", "weight_shape", "k_scale", "v_scale",
              "kv_scale", "q_scale", "prob_scale", "output_scale", "input_zero_point")
_PACKED_INTEGERS = ("qweight", "weight_packed")  # int32s of packed integer codes
_SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                      "I8": 1, "U8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}


def _shapes(source: ModelSource) -> tuple[Any, str] | None:
    if source.format == "safetensors":
        return safetensors_shapes(source.path), "safetensors header"
    if source.format == "gguf" and source.gguf_file is not None:
        return gguf_shapes(source.gguf_file, source.gguf_tensors), "gguf header"
    return None


def count_parameters(source: ModelSource, spec: ArchSpec) -> tuple[int, str]:
    """Parameters the engine allocates for `source` (a packed integer tensor counts the
    weights it holds; scales and zero points none), and where the count came from."""
    config = source.hf_config
    found = _shapes(source)
    if found is None:
        return spec.count_parameters(config), "config"
    shapes, origin = found
    total, per_int32 = 0, 32 // _packed_bits(config)
    for name, shape in shapes:
        leaf = name.rpartition(".")[2]
        if not spec.keeps_weight(name, config) or leaf in _QUANT_AUX:
            continue
        total += math.prod(shape) * (per_int32 if leaf in _PACKED_INTEGERS else 1)
    return total, origin


def _packed_bits(config: Any) -> int:
    """The width of a packed integer checkpoint's codes (AWQ/GPTQ `bits`, compressed-tensors'
    weights `num_bits`; 4 when the config does not say)."""
    values = quantization_config(config) or {}
    bits = values.get("bits", values.get("w_bit"))
    groups = list((values.get("config_groups") or {}).values())
    if bits is None and groups:
        bits = (groups[0].get("weights") or {}).get("num_bits")
    return int(bits or 4)


def held_bytes(source: ModelSource, spec: ArchSpec, itemsize: int, quantization: str | None,
               device: str, tp: int = 1) -> int:
    """Bytes of weights the engine holds for `source` in `quantization`'s form: GGUF linear weights
    as their kernel holds them (gguf.held_bits: on CPU every type as codes with a scale and min
    per group on the block-dot kernel, float16 for the legacy types and factored as the k-quants
    store them, else 4-bit types with bfloat16 ones per 32; on CUDA every type as 4 or 8-bit
    codes with float16 scales and mins, Q3_K's, Q6_K's, Q8_0's and Q4_0's scales alone), a
    tied GGUF table likewise where a kernel that also looks rows up holds it
    (gguf.holds_tied_table), an untied GGUF LM head likewise where a kernel holds its type,
    AWQ/GPTQ/compressed-tensors integers likewise (scales and zeros doubling the scales'
    bits), FP8 weights one byte (+ float32 scales; on CPU where pagoda's float8 kernel
    runs), everything else at `itemsize`; on CPU FP8 weights without the float8 kernel, and
    8-bit integers without the block-dot kernel, are decoded at load to `itemsize`. A mixture of
    experts' experts as the engine holds them (bind_experts): codes like the other layers' on
    one CPU rank where the format gives them and its CPU kernel runs, on CUDA as the format's
    codes stacked for the fused MoE kernel (taken to fit it; floats quantized to float8 by
    `--quantization fp8`), else decoded at load to `itemsize`."""
    from pagoda.layers.quantization import cpu_fp8_dot
    from pagoda.layers.quantization.gguf import held_bits, keeps_blocks
    params, _ = count_parameters(source, spec)
    if quantization is None:
        return params * itemsize
    found = _shapes(source)
    if found is None:
        return _config_only_bytes(source, spec, params, itemsize, quantization, device, tp)
    experts_as_codes = _experts_as_codes(source, quantization, device, tp)
    shapes = dict(found[0])
    if quantization == "gguf":
        types = dict(gguf_types(source.gguf_file, source.gguf_tensors))
        on = torch.device(device)
        kept = {name: kind for name, kind in types.items() if _LINEAR_WEIGHT.fullmatch(name)
                and (".experts." not in name or experts_as_codes) and keeps_blocks(kind, on)}
        packed = sum(math.prod(shapes[name]) for name in kept)
        packed_bits = sum(math.prod(shapes[name]) * held_bits(kind, on)
                          for name, kind in kept.items())
        table, table_bytes = _gguf_table(source, shapes, types, on)
        head, head_bytes = _gguf_head(shapes, types, on)
        return ((params - packed - table - head) * itemsize + int(packed_bits // 8)
                + table_bytes + head_bytes)
    on_cpu = torch.device(device).type == "cpu"
    if quantizes_at_load(quantization, source):
        if on_cpu and not cpu_fp8_dot.available():  # quantized, then decoded at load
            return params * itemsize
        linear = {n: s for n, s in shapes.items() if _LINEAR_WEIGHT.fullmatch(n)
                  and ".experts." not in n}
        if experts_as_codes:  # float8 on the GPU: each expert's weights, one or stacked
            linear |= {n: s for n, s in shapes.items() if ".experts." in n and len(s) >= 2}
        weights = sum(math.prod(s) for s in linear.values())
        scales = sum(4 * math.prod(s[:-1]) for s in linear.values())  # float32 a row
        return (params - weights) * itemsize + weights + scales
    return _quantized_safetensors_bytes(source, spec, shapes, itemsize, on_cpu,
                                        experts_as_codes)


def _config_only_bytes(source: ModelSource, spec: ArchSpec, params: int, itemsize: int,
                       quantization: str, device: str, tp: int) -> int:
    """Bytes of a model known by its config alone (dummy weights, a format with random
    weights of its own or quantized at load): the vocabulary tables at `itemsize`, every
    other parameter a linear weight at the format's bits (`_dummy_weight_bits`; norms and
    routers too, a slight undercount), a mixture of experts' experts too where dummy experts
    take the format's codes (`_dummy_experts_as_codes`), else at `itemsize`."""
    from pagoda.layers.quantization import get_quantization_config
    config = source.hf_config
    tables = config.vocab_size * config.hidden_size * \
        (1 + (not getattr(config, "tie_word_embeddings", False)))
    layout = None if spec.experts is None else spec.experts(config)
    experts = 0 if layout is None else \
        layout.moe_layers * layout.num_experts * layout.params_per_expert
    quantized = get_quantization_config(quantization, config)
    bits = _dummy_weight_bits(quantized, device, itemsize, config.hidden_size)
    as_codes = experts and _dummy_experts_as_codes(quantized, spec, config, device, tp)
    expert_bits = bits if as_codes else 8 * itemsize
    return tables * itemsize + round(((params - tables - experts) * bits
                                      + experts * expert_bits) / 8)


def _dummy_weight_bits(config: Any, device: str, itemsize: int, hidden: int) -> float:
    """Bits a dummy linear weight of quantization `config` takes on `device`: float8 a byte
    and its row's float32 scale (rows taken `hidden` inputs long: the down projections'
    longer rows a slight overcount; decoded on CPU without pagoda's float8 kernel); integer
    codes with their group's scale and min (16-bit each on a GPU and in torch's CPU int4
    kernel, 32-bit in the CPU block-dot kernel; 8-bit codes on CPU without it decoded to
    `itemsize`)."""
    from pagoda.layers.quantization import cpu_block_dot, cpu_fp8_dot
    on_cpu = torch.device(device).type == "cpu"
    bits, group = getattr(config, "bits", None), getattr(config, "group_size", None)
    if bits is None or group is None:  # float8
        return 8 * itemsize if on_cpu and not cpu_fp8_dot.available() else 8 + 32 / hidden
    if not on_cpu or (bits == 4 and not cpu_block_dot.available()):
        return bits + 32 / group
    return bits + 64 / group if cpu_block_dot.available() else 8 * itemsize


def _dummy_experts_as_codes(config: Any, spec: ArchSpec, hf_config: Any, device: str,
                            tp: int) -> bool:
    """Whether dummy experts take the format's codes (bind_experts): float8 ones, or an
    integer format's; on CPU where one rank holds them and the format's CPU kernel runs, on
    a GPU where the fused MoE kernel takes their layout over both projections' inputs."""
    from pagoda.layers.quantization import random_expert_piece
    hidden = hf_config.hidden_size
    inter = spec.experts(hf_config).params_per_expert // (3 * hidden) // tp
    kind = torch.device(device).type
    cpu_kernel = kind == "cpu" and tp == 1 and config.holds_expert_codes
    if not (cpu_kernel or kind == "cuda"):
        return False
    return random_expert_piece(config, hidden, inter, stacked=kind == "cuda") is not None


def _experts_as_codes(source: ModelSource, quantization: str, device: str, tp: int) -> bool:
    """Whether a mixture of experts' experts are held as the other layers' codes
    (bind_experts): on one CPU rank where the format's CPU kernel takes them; on CUDA where
    the format gives them (taken to fit the fused MoE kernel) or quantizes floats to
    float8."""
    from pagoda.layers.quantization import get_quantization_config
    config = get_quantization_config(quantization, source.hf_config)
    if device == "cpu":
        return tp == 1 and config.holds_expert_codes
    return torch.device(device).type == "cuda" and \
        (config.gives_expert_codes or config.float8_experts)


def _gguf_table(source: ModelSource, shapes: dict[str, tuple[int, ...]],
               types: dict[str, str], device: torch.device) -> tuple[int, int]:
    """(parameters, bytes) of a GGUF's embedding table kept in another form than floats:
    untied, as the GPU group kernel's codes where one holds it (gguf.holds_untied_table),
    else in its blocks (a block type pagoda decodes); tied, as the codes of the CPU
    block-dot kernel or the GPU group kernel where one holds it (gguf.holds_tied_table);
    (0, 0) when it is held as floats."""
    from pagoda.layers.quantization.gguf import (
        holds_tied_table,
        holds_untied_table,
        keeps_table_blocks,
    )
    from pagoda.layers.quantization.gguf_blocks import FORMATS
    kind = types.get(_EMBEDDING)
    if kind is None:
        return 0, 0
    rows, columns = shapes[_EMBEDDING]
    if getattr(source.hf_config, "tie_word_embeddings", False):
        if not holds_tied_table(kind, rows, columns, device):
            return 0, 0
        return _held_as_codes(rows, columns, kind, device)
    if holds_untied_table(kind, rows, columns, device):
        return _held_as_codes(rows, columns, kind, device)
    if not keeps_table_blocks(kind):
        return 0, 0
    return rows * columns, rows * FORMATS[kind].row_bytes(columns)


def _gguf_head(shapes: dict[str, tuple[int, ...]], types: dict[str, str],
               device: torch.device) -> tuple[int, int]:
    """(parameters, bytes) of a GGUF's untied LM head kept in its blocks (gguf.holds_head:
    where a kernel multiplies its type, as it holds linear layers' codes); (0, 0) when it is
    held as floats or tied."""
    from pagoda.layers.quantization.gguf import holds_head
    kind = types.get(_HEAD)
    if kind is None:
        return 0, 0
    rows, columns = shapes[_HEAD]
    if not holds_head(kind, rows, columns, device):
        return 0, 0
    return _held_as_codes(rows, columns, kind, device)


def _held_as_codes(rows: int, columns: int, kind: str, device: torch.device
                   ) -> tuple[int, int]:
    """(parameters, bytes) of a [rows, columns] GGUF table of type `kind` held as a kernel's
    codes on `device` (gguf.held_bits)."""
    from pagoda.layers.quantization.gguf import held_bits
    return rows * columns, int(rows * columns * held_bits(kind, device) // 8)


def _fp8_scale_bytes(scale: tuple[int, ...], weight: tuple[int, ...]) -> int:
    """An fp8 layer's scales as held: float32 per row, times the column blocks for block
    scales ([out / 128, in / 128] in the checkpoint)."""
    rows = weight[0]
    blocks = scale[1] if len(scale) == 2 and scale[0] < rows else 1
    return 4 * rows * blocks


def _quantized_safetensors_bytes(source: ModelSource, spec: ArchSpec,
                                 shapes: dict[str, tuple[int, ...]], itemsize: int,
                                 on_cpu: bool, experts_as_codes: bool) -> int:
    """A quantized checkpoint's tensors: float ones at `itemsize`, quantized ones as stored
    (integer codes' scales twice: a 16-bit scale and min each, 32-bit in the CPU block-dot
    kernel, counted for every layer where it runs; zero points and act orders folded in; a
    slight overcount where CUDA's 4-bit planes hold integer zero points, a byte each, and
    where its 8-bit codes of symmetric groups hold no min); on
    CPU, where no kernel takes them, 8-bit integers (without the block-dot kernel) and float8
    weights (without the float8 kernel) decoded at load to `itemsize` (their scales folded
    in); a mixture of experts' experts as the other layers where `experts_as_codes`, else
    decoded at load to `itemsize`."""
    from pagoda.layers.quantization import cpu_block_dot, cpu_fp8_dot
    dtypes = dict(safetensors_dtypes(source.path))
    per_int32 = 32 // _packed_bits(source.hf_config)
    block_dot = on_cpu and cpu_block_dot.available()
    decoded = on_cpu and per_int32 == 4 and not block_dot  # 8-bit integers on CPU
    float8_decoded = on_cpu and not cpu_fp8_dot.available()
    scale_bytes = 8 if block_dot else 4

    def integer_codes(name: str) -> bool:  # packed int32s, or int8 as they are
        return name.rpartition(".")[2] in _PACKED_INTEGERS or dtypes.get(name) == "I8"
    total = 0
    for name, dtype in dtypes.items():
        if not spec.keeps_weight(name, source.hf_config):
            continue
        count, leaf = math.prod(shapes[name]), name.rpartition(".")[2]
        if ".experts." in name and not experts_as_codes:  # decoded at load: at itemsize
            per = per_int32 if leaf in _PACKED_INTEGERS else 1
            total += count * per * itemsize if leaf in ("weight", *_PACKED_INTEGERS) else 0
            continue
        prefix = name.removesuffix(leaf)
        integer_scale = leaf == "scales" or (leaf == "weight_scale" and (
            integer_codes(prefix + "weight_packed") or integer_codes(prefix + "weight")))
        if leaf in ("qzeros", "g_idx", "input_scale", "weight_zero_point", "weight_g_idx",
                    "weight_shape", "input_zero_point") or (integer_scale and decoded):
            continue
        if integer_scale:
            total += scale_bytes * count
        elif leaf in ("weight_scale", "weight_scale_inv"):  # float8 weights' scales
            total += 0 if float8_decoded else _fp8_scale_bytes(shapes[name],
                                                               shapes[prefix + "weight"])
        elif integer_codes(name):
            per = per_int32 if leaf in _PACKED_INTEGERS else 1  # weights per element
            total += count * (per * itemsize if decoded else _SAFETENSORS_BYTES[dtype])
        elif dtype.startswith("F8"):
            total += count * (itemsize if float8_decoded else _SAFETENSORS_BYTES[dtype])
        else:
            total += count * itemsize
    return total


def active_parameters(spec: ArchSpec, config: Any, total: int) -> int | None:
    """Of `total` parameters, those one token runs (a mixture of experts runs top_k of its
    experts); None for a dense model."""
    return None if spec.experts is None else total - spec.experts(config).idle_parameters


def stage_layers(spec: ArchSpec, config: Any, pp: int = 1) -> list[LayerAttention]:
    """The attention layers of the largest pipeline stage (the first: stages are equal
    parts, the earlier ones one layer more); every layer without pipeline parallelism."""
    layers = spec.layer_attention(config)
    start, end = layer_ranges(len(layers), pp)[0]
    return layers[start:end]


def kv_bytes_per_token(spec: ArchSpec, config: Any, dtype: torch.dtype, tp: int = 1,
                       pp: int = 1) -> int:
    """KV bytes one token takes over a stage's layers on one GPU (KV heads split over tp, at
    least one per GPU)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(2 * max(layer.num_kv_heads // tp, 1) * layer.head_dim * itemsize
               for layer in stage_layers(spec, config, pp))


def kv_block_bytes(spec: ArchSpec, config: Any, dtype: torch.dtype, tp: int = 1,
                   pp: int = 1) -> int:
    """Bytes of one KV block on one GPU: BLOCK_SIZE tokens of one KV group's layer slots."""
    layout = group_layers(stage_layers(spec, config, pp))
    itemsize = torch.empty((), dtype=dtype).element_size()
    return BLOCK_SIZE * 2 * layout.slots * max(layout.num_kv_heads // tp, 1) * layout.head_dim \
        * itemsize


def kv_blocks_per_seq(spec: ArchSpec, config: Any, max_model_len: int, chunk: int,
                      pp: int = 1) -> int:
    """Blocks one sequence of max_model_len holds at most, over every KV group, run `chunk`
    tokens a step."""
    layout = group_layers(stage_layers(spec, config, pp))
    return layout.blocks_per_seq(max_model_len, chunk, BLOCK_SIZE)


# formats whose GPU weights may be integer codes in planes, whose long calls decode them
# into a workspace first (group_gemm.fewest_tokens_decoded_first; compressed-tensors counted
# whatever its scheme: an allowance errs high)
DECODED_FIRST_FORMATS = frozenset({"awq", "gptq", "compressed-tensors", "gguf"})


def activation_allowance(config: Any, dtype: torch.dtype, token_budget: int,
                         max_num_seqs: int, gpu_quantization: str | None = None) -> int:
    """Hidden states, attention and MLP intermediates for one step of `token_budget` tokens,
    plus float32 logits (and their softmax) for up to `max_num_seqs` sampled rows. The
    per-token factors match the engine's profiled peak for the Llama-3.1-8B shape on an H200
    (2.38 GiB above the weights at 8192 tokens and 256 sequences). `gpu_quantization`: the
    form of the weights on a GPU, whose long calls may decode into DECODED_SLICE_BYTES."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    hidden = config.hidden_size
    per_token = (12 * hidden + 6 * config.intermediate_size) * itemsize
    logits = 3 * min(max_num_seqs, token_budget) * config.vocab_size * 4
    decoded_from = fewest_tokens_decoded_first()
    decoded = (DECODED_SLICE_BYTES if gpu_quantization in DECODED_FIRST_FORMATS
               and decoded_from is not None and token_budget >= decoded_from else 0)
    return token_budget * per_token + logits + decoded


def estimate(source: ModelSource, max_model_len: int, concurrency: int = 1, tp: int = 1,
             dtype: str = "auto", device: str | None = None, token_budget: int = 2048,
             max_num_seqs: int = 64, gpu_memory_utilization: float = 0.9,
             pp: int = 1, quantization: str | None = None,
             kv_cache_dtype: str = "auto") -> MemoryEstimate:
    """The memory `source` needs to serve `concurrency` sequences of `max_model_len` tokens.
    `device`: a GPU name (H100, ...) to get a fit verdict, "cuda" for GPU figures without
    one, None or "cpu" for CPU figures. `quantization`: as `--quantization` (None: what the
    checkpoint holds); `kv_cache_dtype`: as `--kv-cache-dtype` ("auto": a float8 cache for a
    checkpoint calibrated for one, as the engine holds it)."""
    config = source.hf_config
    if max_model_len < 1 or concurrency < 1 or tp < 1 or pp < 1:
        raise ConfigError("max_model_len, concurrency, tp and pp must be at least 1")
    spec = arch_spec(config)
    check_tensor_parallel(config, tp)
    check_pipeline_parallel(config, pp)
    on_gpu = device is not None and device.lower() != "cpu"
    torch_dtype = resolve_dtype(dtype, torch.device("cuda" if on_gpu else "cpu"),
                                getattr(config, "dtype", None))
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    params, weights_from = count_parameters(source, spec)
    held = resolve_quantization(quantization, source)
    held_total = held_bytes(source, spec, itemsize, held, "cuda" if on_gpu else "cpu", tp)
    # a pipeline stage holds its share of the layers (bytes taken as spread like parameters)
    weights = held_total * stage_parameters(config, params, pp) // params // tp
    named = _device(device) if on_gpu and not device.lower().startswith("cuda") else None
    kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, source,
                                            _holds_float8_cache(on_gpu, named))
    kv_dtype = kv_cache_torch_dtype(kv_cache_dtype, torch_dtype)
    per_token = kv_bytes_per_token(spec, config, kv_dtype, tp, pp)
    block_bytes = kv_block_bytes(spec, config, kv_dtype, tp, pp)
    per_seq = kv_blocks_per_seq(spec, config, max_model_len, token_budget, pp) * block_bytes
    kv = concurrency * per_seq + block_bytes
    kv_unfreed = (concurrency * -(-max_model_len // BLOCK_SIZE) + 1) * BLOCK_SIZE * per_token
    activations = activation_allowance(config, torch_dtype, token_budget, max_num_seqs,
                                       held if on_gpu else None)
    overhead = CUDA_CONTEXT_BYTES if on_gpu else 0
    result = MemoryEstimate(
        model=source.name, dtype=str(torch_dtype).removeprefix("torch."), quantization=held,
        kv_dtype=None if kv_dtype == torch_dtype else str(kv_dtype).removeprefix("torch."),
        num_parameters=params, weights_from=weights_from, weight_bytes=weights,
        kv_bytes_per_token=per_token, kv_bytes=kv, kv_bytes_per_seq=per_seq,
        kv_bytes_without_freeing=kv_unfreed, activation_bytes=activations,
        overhead_bytes=overhead, peak_bytes=weights + kv + activations + overhead,
        max_model_len=max_model_len, concurrency=concurrency, tensor_parallel=tp,
        pipeline_parallel=pp,
        token_budget=token_budget, active_parameters=active_parameters(spec, config, params))
    if named is not None:  # a named GPU: does it fit?
        result.device, result.device_bytes = named
        result.usable_bytes = int(result.device_bytes * gpu_memory_utilization)
    else:  # this machine's RAM: what a CPU engine may take (half of what is available)
        from pagoda.runner.memory import available_host_memory
        result.device = "this machine (CPU, available RAM)"
        result.device_bytes = available_host_memory()
        result.usable_bytes = cpu_usable_bytes(result.device_bytes, weights)
    result.fits = result.peak_bytes <= result.usable_bytes
    if not result.fits:
        result.suggestions = what_would_fit(result, per_seq, block_bytes)
    return result


def cpu_usable_bytes(available: int, weights: int) -> int:
    """What a CPU engine may use of `available` RAM: the weights load first, then the KV
    cache takes at most CPU_MAX_FRACTION of what is left; never more than is available."""
    from pagoda.runner.memory import CPU_MAX_FRACTION
    if weights >= available:
        return available
    return weights + int((available - weights) * CPU_MAX_FRACTION)


def stage_parameters(config: Any, params: int, pp: int) -> int:
    """Parameters the largest pipeline stage holds: its share of the decoder layers (layers
    taken as equal) plus the embedding, LM head and final norm, which every stage keeps."""
    if pp == 1:
        return params
    hidden, vocab = config.hidden_size, config.vocab_size
    tied = bool(getattr(config, "tie_word_embeddings", False))
    every_stage = vocab * hidden * (1 if tied else 2) + hidden
    layers = config.num_hidden_layers
    start, end = layer_ranges(layers, pp)[0]
    return every_stage + (params - every_stage) * (end - start) // layers


def what_would_fit(e: MemoryEstimate, per_seq: int, block_bytes: int) -> list[str]:
    """Ways to make an estimate that does not fit fit: fewer sequences, a shorter context,
    tensor parallelism, a 4-bit variant."""
    room = e.usable_bytes - (e.peak_bytes - e.kv_bytes)  # left for the KV cache
    tips = []
    if room > per_seq + block_bytes:
        tips.append(f"--concurrency {int((room - block_bytes) // per_seq)} (sequences of "
                    f"{e.max_model_len} tokens)")
    if room > block_bytes:
        tokens = int((room - block_bytes) // max(e.kv_bytes_per_token, 1) // e.concurrency)
        tokens -= tokens % BLOCK_SIZE
        if tokens >= BLOCK_SIZE:
            tips.append(f"--max-model-len {tokens} (for {e.concurrency} sequences)")
    if e.tensor_parallel == 1 and e.device and "CPU" not in e.device:
        tips.append("--tp 2 or more (weights and KV split over GPUs)")
    if e.weight_bytes > e.num_parameters * Q4_K_M_BYTES:
        tips.append(f"a 4-bit variant (weights about "
                    f"{e.num_parameters * Q4_K_M_BYTES / 2**30:.1f} GiB as Q4_K_M GGUF)")
    return tips


def _holds_float8_cache(on_gpu: bool, named: tuple[str, int] | None) -> bool:
    """Whether the engine's attention kernels would hold a float8 E4M3 cache: on CPU, on a
    named GPU not in WITHOUT_E4M3, on "cuda" this machine's GPU if it has one, as the
    engine's default backend would (any other GPU taken as able)."""
    if named is not None:
        return named[0] not in WITHOUT_E4M3
    if on_gpu and torch.cuda.is_available():
        return holds_e4m3_cache("auto", "cuda")
    return True


def _device(name: str) -> tuple[str, int]:
    """A device's name and bytes, whatever the spelling ("RTX 4090", "rtx-4090", "a100")."""
    key = "".join(ch for ch in name.upper() if ch.isalnum())
    spelled = {known.replace("-", ""): known for known in DEVICES_MIB}
    known = spelled.get(key) or DEVICE_ALIASES.get(key)
    if known is not None:
        return known, DEVICES_MIB[known] << 20
    raise ConfigError(f"unknown device {name!r}; choose from {', '.join(DEVICES_MIB)} or cpu")


def check_tensor_parallel(config: Any, tp: int) -> None:
    """Tensor parallelism splits attention heads and MLP widths evenly: tp must divide the
    query heads, the KV heads (or be a multiple of them, which are then replicated), and the
    intermediate sizes."""
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    if heads is None or tp == 1:
        return
    if heads % tp:
        raise ConfigError(f"tensor parallel size {tp} does not divide the model's {heads} "
                          f"attention heads; use one of {_divisors(heads)}")
    if kv % tp and tp % kv:
        raise ConfigError(f"tensor parallel size {tp} neither divides the model's {kv} KV "
                          f"heads nor is a multiple of them; use one of {_divisors(heads)}")
    for name in ("intermediate_size", "moe_intermediate_size"):
        size = getattr(config, name, None)
        if isinstance(size, int) and size % tp:
            raise ConfigError(f"tensor parallel size {tp} does not divide the model's "
                              f"{name} of {size}")


def check_expert_parallel(config: Any, tp: int) -> None:
    """Expert parallelism gives every tensor-parallel rank an equal share of the experts."""
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    if not experts:
        raise ConfigError("expert parallelism needs a mixture-of-experts model")
    if experts % tp:
        raise ConfigError(f"tensor parallel size {tp} does not divide the model's {experts} "
                          "experts (with expert parallelism)")


def check_pipeline_parallel(config: Any, pp: int) -> None:
    """Pipeline parallelism gives every stage at least one decoder layer."""
    layers = getattr(config, "num_hidden_layers", None)
    if pp > 1 and isinstance(layers, int) and pp > layers:
        raise ConfigError(f"pipeline parallel size {pp} exceeds the model's {layers} layers")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, min(n, 64) + 1) if n % d == 0)
