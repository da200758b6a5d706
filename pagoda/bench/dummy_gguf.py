"""A GGUF file of a Llama or Qwen3-MoE model with random weights stored as real k-quant
blocks, so that the GGUF path can be benchmarked at any size (an 8B Q4_K_M) without a
download.

    python -m pagoda.bench.dummy_gguf CONFIG_DIR OUT.gguf [--mix q4_k_m|q4_k|q8_0] [--seed N]

CONFIG_DIR holds an HF config.json of a Llama or Qwen3-MoE model (bench/configs/llama-3.1-8b,
bench/configs/qwen3-30b-a3b). The file
carries the metadata pagoda's GGUF loader reads (the shape, rms epsilon, rope base and, for
Llama 3 rope scaling, llama.cpp's rope_freqs tensor) and no tokenizer: pass one with
`--tokenizer` (`python -m pagoda.bench.word_tokenizer CONFIG_DIR DIR` makes one).

The blocks are random bytes with chosen scales, not quantized floats: every Q4_K sub-block
gets a random 6-bit scale s and the same 6-bit min, with dmin = 7.5 d, so its weights are
d * s * (code - 7.5), centred on zero; Q6_K sub-blocks get int8 scales of random sign and
size; Q8_0 blocks random int8 codes under one float16 scale. The (super-)block scale d is
set so the weights have a standard deviation of about 0.02,
as pagoda's dummy loader draws them; norms are ones. Rows are stored as llama.cpp stores
them (its q/k row permutation is immaterial for random rows).

The mixes follow llama.cpp's choice of block types for Llama:
- q4_k_m (its Q4_K_M): every linear weight and the token embedding in Q4_K, except the
  output head, and attn_v and ffn_down in the layers that deserve more bits, in Q6_K. A layer
  i of n deserves more bits when it is among the first n/8 or the last n/8 (integer eighths,
  i < n // 8 or i >= 7 * n // 8), or when i - n // 8 leaves a remainder of 2 on division by 3
  (every third layer of the middle). For 32 layers that is layers 0-3, 6, 9, ..., 27, 28-31.
- q4_k: every linear weight and the token embedding in Q4_K, the output head in Q6_K.
- q8_0 (its Q8_0): every linear weight, the token embedding and the output head in Q8_0.
- iq4_xs: q4_k with IQ4_XS in place of Q4_K (each 4-bit index picks one of 16 int8 values,
  times a 6-bit sub-scale less 32 per 32 weights times the super-block's d), the output
  head in Q6_K.
A model with tied embeddings has no output head: its token embedding takes the head's type.
A Qwen3-MoE's experts are stacked per projection as llama.cpp stores them (ffn_gate_exps,
ffn_up_exps, ffn_down_exps: the down projection's type as ffn_down's above), beside its
float32 router (random, so tokens pick varied experts) and q/k norms.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from pagoda.layers.quantization.gguf_blocks import TABLE_VALUES
from pagoda.models.arch.llama import llama3_rope_factors
from pagoda.models.hf_config import HFConfig

Q4_K = gguf.GGMLQuantizationType.Q4_K
Q6_K = gguf.GGMLQuantizationType.Q6_K
Q8_0 = gguf.GGMLQuantizationType.Q8_0
IQ4_XS = gguf.GGMLQuantizationType.IQ4_XS
F32 = gguf.GGMLQuantizationType.F32
MIXES = ("q4_k_m", "q4_k", "q8_0", "iq4_xs")
# the file type a mix declares (llama.cpp's names for its mixes; q4_k is none of them)
FILE_TYPES = {"q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "iq4_xs": gguf.LlamaFileType.MOSTLY_IQ4_XS}
WEIGHT_STD = 0.02  # as pagoda's dummy loader
Q4_K_CODE_STD = float(np.sqrt((16**2 - 1) / 12))  # codes 0..15 around their mean 7.5
Q6_K_CODE_STD = float(np.sqrt((64**2 - 1) / 12))  # codes 0..63 less 32
Q8_0_CODE_STD = float(np.sqrt((256**2 - 1) / 12))  # int8 codes -128..127
Q4_K_SCALES = (32, 64)  # 6-bit sub-block scales drawn from [low, high)
Q6_K_SCALES = (8, 17)  # magnitudes of the int8 sub-block scales, [low, high)
# the GGUF stems of each layer's linear weights (linear_shapes gives their shapes)
LINEAR_STEMS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
MORE_BITS_STEMS = frozenset({"attn_v", "ffn_down"})  # Q6_K where use_more_bits says so


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    """One tensor of the file: its GGUF name, torch-order shape and storage type."""

    name: str
    shape: tuple[int, ...]
    kind: gguf.GGMLQuantizationType

    def byte_shape(self) -> tuple[int, ...]:
        """The shape of the array written: [rows, bytes per row] for blocks."""
        if self.kind == F32:
            return self.shape
        block_weights, block_bytes = gguf.GGML_QUANT_SIZES[self.kind]
        return (*self.shape[:-1], self.shape[-1] // block_weights * block_bytes)

    def nbytes(self) -> int:
        return int(np.prod(self.byte_shape())) * (4 if self.kind == F32 else 1)


def use_more_bits(layer: int, num_layers: int) -> bool:
    """llama.cpp's pick of the layers whose sensitive tensors get more bits (see above)."""
    eighth = num_layers // 8
    return layer < eighth or layer >= 7 * num_layers // 8 or (layer - eighth) % 3 == 2


def linear_kind(stem: str, layer: int, num_layers: int, mix: str) -> gguf.GGMLQuantizationType:
    """The block type of layer `layer`'s linear weight `stem` in `mix`."""
    if mix == "q8_0":
        return Q8_0
    if mix == "q4_k_m" and stem in MORE_BITS_STEMS and use_more_bits(layer, num_layers):
        return Q6_K
    return IQ4_XS if mix == "iq4_xs" else Q4_K


def linear_shapes(config: HFConfig) -> dict[str, tuple[int, int]]:
    """Each per-layer linear weight's (out, in) shape."""
    hidden, inter = config.hidden_size, config.intermediate_size
    query, kv = (config.num_attention_heads * config.head_dim,
                 config.num_key_value_heads * config.head_dim)
    return {"attn_q": (query, hidden), "attn_k": (kv, hidden), "attn_v": (kv, hidden),
            "attn_output": (hidden, query), "ffn_gate": (inter, hidden),
            "ffn_up": (inter, hidden), "ffn_down": (hidden, inter)}


def plan_tensors(config: HFConfig, mix: str) -> list[PlannedTensor]:
    """Every tensor of the file in writing order, llama.cpp's names and block types."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    tied = bool(getattr(config, "tie_word_embeddings", False))
    experts = config.model_type == "qwen3_moe"
    plan = []
    if config.rope_parameters.get("rope_type") == "llama3":
        plan.append(PlannedTensor("rope_freqs.weight", (config.head_dim // 2,), F32))
    plan.append(PlannedTensor("token_embd.weight", (config.vocab_size, hidden),
                              head_kind(mix) if tied else embedding_kind(mix)))
    shapes = linear_shapes(config)
    for layer in range(layers):
        plan.append(PlannedTensor(f"blk.{layer}.attn_norm.weight", (hidden,), F32))
        stems = LINEAR_STEMS[:4] if experts else LINEAR_STEMS
        plan += [PlannedTensor(f"blk.{layer}.{stem}.weight", shapes[stem],
                               linear_kind(stem, layer, layers, mix)) for stem in stems]
        if experts:
            plan += [PlannedTensor(f"blk.{layer}.{norm}.weight", (config.head_dim,), F32)
                     for norm in ("attn_q_norm", "attn_k_norm")]
            plan += expert_tensors(config, layer, mix)
        plan.append(PlannedTensor(f"blk.{layer}.ffn_norm.weight", (hidden,), F32))
    plan.append(PlannedTensor("output_norm.weight", (hidden,), F32))
    if not tied:
        plan.append(PlannedTensor("output.weight", (config.vocab_size, hidden), head_kind(mix)))
    return plan


def head_kind(mix: str) -> gguf.GGMLQuantizationType:
    """The block type of the output head (or a tied token embedding) in `mix`."""
    return Q8_0 if mix == "q8_0" else Q6_K


def embedding_kind(mix: str) -> gguf.GGMLQuantizationType:
    """The block type of an untied token embedding in `mix`."""
    return Q8_0 if mix == "q8_0" else IQ4_XS if mix == "iq4_xs" else Q4_K


def expert_tensors(config: HFConfig, layer: int, mix: str) -> list[PlannedTensor]:
    """A Qwen3-MoE layer's router (float32, random) and its experts stacked per projection,
    down in Q6_K where llama.cpp gives ffn_down more bits."""
    experts, hidden = config.num_experts, config.hidden_size
    inter, layers = config.moe_intermediate_size, config.num_hidden_layers
    return [PlannedTensor(f"blk.{layer}.ffn_gate_inp.weight", (experts, hidden), F32),
            PlannedTensor(f"blk.{layer}.ffn_gate_exps.weight", (experts, inter, hidden),
                          linear_kind("ffn_gate", layer, layers, mix)),
            PlannedTensor(f"blk.{layer}.ffn_up_exps.weight", (experts, inter, hidden),
                          linear_kind("ffn_up", layer, layers, mix)),
            PlannedTensor(f"blk.{layer}.ffn_down_exps.weight", (experts, hidden, inter),
                          linear_kind("ffn_down", layer, layers, mix))]


def check_block_shapes(plan: list[PlannedTensor]) -> None:
    """Rows must be whole blocks (k-quants: super-blocks of 256); say which tensor's are
    not."""
    for tensor in plan:
        if tensor.kind == F32:
            continue
        block_weights = gguf.GGML_QUANT_SIZES[tensor.kind][0]
        if tensor.shape[-1] % block_weights:
            raise ValueError(f"{tensor.name}: rows of {tensor.shape[-1]} weights are not a "
                             f"multiple of {block_weights}, which {tensor.kind.name} needs")


def pack_q4_k_scales(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins per block ([blocks, 8] each) -> the 12 bytes
    Q4_K keeps them in: bytes 0-3 and 4-7 hold scales 0-3 and mins 0-3 in their low six bits
    and the top two bits of scales 4-7 and mins 4-7 above them; bytes 8-11 hold the low four
    bits of scales 4-7 (low nibble) and mins 4-7 (high nibble)."""
    low_scales, high_scales = scales[:, :4], scales[:, 4:]
    low_mins, high_mins = mins[:, :4], mins[:, 4:]
    first = low_scales | ((high_scales >> 4) << 6)
    second = low_mins | ((high_mins >> 4) << 6)
    third = (high_scales & 0x0F) | ((high_mins & 0x0F) << 4)
    return np.concatenate([first, second, third], axis=1).astype(np.uint8)


def half_bytes(value: float, blocks: int) -> np.ndarray:
    """`value` as float16, its two bytes repeated for `blocks` blocks."""
    return np.tile(np.array([value], dtype=np.float16).view(np.uint8), (blocks, 1))


def random_bytes(rng: np.random.Generator, blocks: int, width: int) -> np.ndarray:
    """[blocks, width] uniform random bytes, from the bit generator's raw 64-bit words (the
    fastest numpy source: an 8B file needs 4.6 GB of them)."""
    words = rng.bit_generator.random_raw(-(-blocks * width // 8))
    return words.view(np.uint8)[:blocks * width].reshape(blocks, width)


def q4_k_blocks(rng: np.random.Generator, blocks: int, std: float) -> np.ndarray:
    """`blocks` Q4_K blocks of random codes whose weights are centred with about `std`:
    d * s * code - dmin * s with dmin = 7.5 d (each sub-block's min equals its scale)."""
    scales = rng.integers(*Q4_K_SCALES, size=(blocks, 8), dtype=np.uint8)
    mean_scale = (Q4_K_SCALES[0] + Q4_K_SCALES[1] - 1) / 2
    d = std / (mean_scale * Q4_K_CODE_STD)
    return np.concatenate([half_bytes(d, blocks), half_bytes(7.5 * d, blocks),
                           pack_q4_k_scales(scales, scales), random_bytes(rng, blocks, 128)],
                          axis=1)


def q6_k_blocks(rng: np.random.Generator, blocks: int, std: float) -> np.ndarray:
    """`blocks` Q6_K blocks of random codes (low nibbles, high bit pairs) under int8 scales
    of random sign, with d set so the weights have about `std`."""
    scales = rng.integers(*Q6_K_SCALES, size=(blocks, 16), dtype=np.int8)
    np.negative(scales, out=scales, where=rng.integers(0, 2, size=scales.shape, dtype=bool))
    mean_scale = (Q6_K_SCALES[0] + Q6_K_SCALES[1] - 1) / 2
    d = std / (mean_scale * Q6_K_CODE_STD)
    return np.concatenate([random_bytes(rng, blocks, 128), random_bytes(rng, blocks, 64),
                           scales.view(np.uint8), half_bytes(d, blocks)], axis=1)


def q8_0_blocks(rng: np.random.Generator, blocks: int, std: float) -> np.ndarray:
    """`blocks` Q8_0 blocks of random int8 codes under one scale d set so the weights have
    about `std`."""
    return np.concatenate([half_bytes(std / Q8_0_CODE_STD, blocks),
                           random_bytes(rng, blocks, 32)], axis=1)


def iq4_xs_blocks(rng: np.random.Generator, blocks: int, std: float) -> np.ndarray:
    """`blocks` IQ4_XS blocks of random indices and 6-bit sub-scales (uniform over 0..63,
    less 32) under one d set so the weights have about `std`."""
    values = np.array(TABLE_VALUES, dtype=np.float64)
    sub_scale_square = (64**2 - 1) / 12 + 0.25  # E[(s - 32)^2], s uniform over 0..63
    d = std / float(np.sqrt(sub_scale_square * np.mean(values**2)))
    return np.concatenate([half_bytes(d, blocks), random_bytes(rng, blocks, 134)], axis=1)


BLOCK_MAKERS = {Q4_K: q4_k_blocks, Q6_K: q6_k_blocks, Q8_0: q8_0_blocks, IQ4_XS: iq4_xs_blocks}


def tensor_data(tensor: PlannedTensor, config: HFConfig, rng: np.random.Generator) -> np.ndarray:
    """The array written for `tensor`: rope divisors, norms of ones, or random blocks."""
    if tensor.name == "rope_freqs.weight":
        rope = config.rope_parameters
        return llama3_rope_factors(rope, rope["rope_theta"], config.head_dim)
    if tensor.name.endswith("ffn_gate_inp.weight"):  # a router: varied picks of experts
        return rng.normal(0.0, WEIGHT_STD, tensor.shape).astype(np.float32)
    if tensor.kind == F32:
        return np.ones(tensor.shape, dtype=np.float32)
    blocks = int(np.prod(tensor.shape)) // gguf.GGML_QUANT_SIZES[tensor.kind][0]
    return BLOCK_MAKERS[tensor.kind](rng, blocks, WEIGHT_STD).reshape(tensor.byte_shape())


def add_decoder_metadata(writer: gguf.GGUFWriter, config) -> None:
    """The hyperparameters every decoder-only GGUF carries, from an HF config (the tests'
    GGUF files write them too)."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def add_model_metadata(writer: gguf.GGUFWriter, config: HFConfig, mix: str) -> None:
    """The hyperparameters llama.cpp's converter writes for a Llama (and a Qwen3-MoE's
    expert counts), and the BOS / first EOS ids of the config (no vocabulary: the tokenizer
    comes from elsewhere)."""
    writer.add_name(f"dummy {mix}")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if mix in FILE_TYPES:
        writer.add_file_type(FILE_TYPES[mix])
    add_decoder_metadata(writer, config)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_vocab_size(config.vocab_size)
    if config.model_type == "qwen3_moe":
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if getattr(config, "bos_token_id", None) is not None:
        writer.add_bos_token_id(int(config.bos_token_id))
    eos = getattr(config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) and eos else eos
    if eos is not None:
        writer.add_eos_token_id(int(eos))


# model types written, and their GGUF architecture
GGUF_ARCHITECTURES = {"llama": "llama", "qwen3_moe": "qwen3moe"}


def dummy_config(config_dir: Path) -> HFConfig:
    """The config of `config_dir`, which must describe a Llama or a Qwen3-MoE."""
    config = HFConfig.from_dir(config_dir)
    if config.model_type not in GGUF_ARCHITECTURES:
        raise ValueError(f"{config_dir}: model_type {config.model_type!r}; only "
                         f"{' and '.join(GGUF_ARCHITECTURES)} configs are written as dummy "
                         "GGUF files")
    return config


def write_dummy_gguf(config_dir: Path, out: Path, mix: str = "q4_k_m", seed: int = 0) -> Path:
    """Write the dummy GGUF of `config_dir`'s model to `out`, one tensor in memory at a
    time; the same seed writes the same bytes."""
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; use one of {', '.join(MIXES)}")
    config = dummy_config(config_dir)
    plan = plan_tensors(config, mix)
    check_block_shapes(plan)
    writer = gguf.GGUFWriter(str(out), GGUF_ARCHITECTURES[config.model_type])
    add_model_metadata(writer, config, mix)
    for tensor in plan:
        dtype = np.dtype(np.float32 if tensor.kind == F32 else np.uint8)
        writer.add_tensor_info(tensor.name, tensor.byte_shape(), dtype, tensor.nbytes(),
                               raw_dtype=None if tensor.kind == F32 else tensor.kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for tensor in plan:
        writer.write_tensor_data(tensor_data(tensor, config, rng))
    writer.close()
    return out


def planned_bytes(config: HFConfig, mix: str) -> int:
    """The bytes of tensor data the file of `config` in `mix` holds (its header aside)."""
    return sum(tensor.nbytes() for tensor in plan_tensors(config, mix))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagoda.bench.dummy_gguf",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config_dir", type=Path, help="directory with an HF config.json")
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--mix", choices=MIXES, default="q4_k_m", help="block types (above)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random bytes")
    args = parser.parse_args(argv)
    path = write_dummy_gguf(args.config_dir, args.out, args.mix, args.seed)
    print(f"{path}: {path.stat().st_size / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
