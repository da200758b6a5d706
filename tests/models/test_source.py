"""Tests for pagoda.models.source: resolving specs, GGUF configs, weights and tokenizers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pagoda.bench.dummy_gguf import add_decoder_metadata
from pagoda.errors import ModelNotFoundError, UnsupportedModelError
from pagoda.models import store
from pagoda.models.arch.llama import llama3_rope_factors, unpermute_rope_rows
from pagoda.models.hf_config import HFConfig
from pagoda.models.loader.checkpoint import iter_weights
from pagoda.models.loader.gguf import GGUF_CONFIG_VERSION, gguf_hf_config
from pagoda.models.loader.tokenizer import load_tokenizer
from pagoda.models.source import ModelSource, resolve_model
from pagoda.tokenizer.gguf import tokenizer_from_gguf
from tests.models.gguf_files import write_gguf

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MULTI_BYTE = "Grüße, 世界! 🌏🚀 naïve café — ½ ∑ x² <|im_end|>"

HF_TO_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
HF_TO_GGUF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
                     "lm_head": "output"}


# ------------------------------------------------------------------------------------- helpers


def llamacpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's HF->GGUF q/k permutation, written index by index:
    HF row h*d+p*d/2+i -> h*d+2i+p."""
    out = np.empty_like(weight)
    head_dim = weight.shape[0] // num_heads
    half = head_dim // 2
    for h in range(num_heads):
        for i in range(half):
            for p in range(2):
                out[h * head_dim + 2 * i + p] = weight[h * head_dim + p * half + i]
    return out


def gguf_name(hf_name: str) -> str:
    stem, kind = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, layer, module = stem.split(".", 3)
        return f"blk.{layer}.{HF_TO_GGUF_BLOCK[module]}.{kind}"
    return f"{HF_TO_GGUF_GLOBAL[stem]}.{kind}"


def tiny_llama_config(**overrides: object) -> LlamaConfig:
    fields = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return LlamaConfig(**(fields | overrides))


def tiny_llama_state(config: LlamaConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()  # norms are all ones otherwise, which would hide name mix-ups
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_llama_gguf(path: Path, config: LlamaConfig, tensors: dict[str, np.ndarray],
                     metadata: dict[str, object] | None = None, arch: str = "llama") -> Path:
    """A float32 GGUF with llama metadata for `config` plus extra `metadata` keys."""
    def add_metadata(writer: gguf.GGUFWriter) -> None:
        add_decoder_metadata(writer, config)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        writer.add_bos_token_id(config.bos_token_id)
        writer.add_eos_token_id(config.eos_token_id)
        for key, value in (metadata or {}).items():
            add = writer.add_string if isinstance(value, str) else writer.add_float32
            add(key.format(arch=arch), value)

    return write_gguf(path, arch, tensors, add_metadata)


def embedding(vocab: int, hidden: int) -> dict[str, np.ndarray]:
    return {"token_embd.weight": np.zeros((vocab, hidden), np.float32)}


def gguf_tensors_from_hf(state: dict[str, torch.Tensor],
                         config: LlamaConfig) -> dict[str, np.ndarray]:
    out = {}
    for name, tensor in state.items():
        array = tensor.numpy()
        if ".q_proj." in name:
            array = llamacpp_permute(array, config.num_attention_heads)
        elif ".k_proj." in name:
            array = llamacpp_permute(array, config.num_key_value_heads)
        out[gguf_name(name)] = array
    return out


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def smollm2_config(smollm2_dir: Path) -> HFConfig:
    return gguf_hf_config(smollm2_dir / SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def smollm2_weights(smollm2_dir: Path) -> dict[str, torch.Tensor]:
    return dict(iter_weights(resolve_model(str(smollm2_dir))))


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# ------------------------------------------------------------------------------------- real GGUF


def test_smollm2_config_fields(smollm2_config: HFConfig) -> None:
    config = smollm2_config
    assert isinstance(config, HFConfig)
    assert (config.hidden_size, config.intermediate_size,
            config.num_hidden_layers) == (576, 1536, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.max_position_embeddings) == (49152, 8192)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 100000.0}
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert config.tie_word_embeddings is True
    assert config.architectures == ["LlamaForCausalLM"]


def test_smollm2_config_matches_transformers(smollm2_config: HFConfig,
                                             smollm2_hf: torch.nn.Module) -> None:
    theirs = smollm2_hf.config.to_dict()
    ours = smollm2_config.to_transformers().to_dict()
    skip = {"_name_or_path", "_model_name_or_path", "quantization_config", "transformers_version",
            "architectures", "unk_token_id", "dtype"}
    assert {k: v for k, v in ours.items() if k not in skip} == {
        k: v for k, v in theirs.items() if k not in skip}


def test_pulled_name_and_alias_resolve_fast_path(smollm2_dir: Path, smollm2_config: HFConfig,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGODA_HOME", str(smollm2_dir.parent.parent))
    source = resolve_model("SmolLM2-135M-Instruct")
    assert (source.format == "gguf" and source.path == smollm2_dir
            and source.name == "SmolLM2-135M-Instruct")
    assert source.gguf_file == smollm2_dir / SMOLLM2_GGUF
    assert source.tokenizer_path == smollm2_dir
    assert store.read_manifest(smollm2_dir).config_version == GGUF_CONFIG_VERSION
    slow = smollm2_config.to_dict()
    fast = source.hf_config.to_dict()
    assert {k: v for k, v in fast.items() if k != "_name_or_path"} == {
        k: v for k, v in slow.items() if k != "_name_or_path"}


def test_smollm2_weight_names_and_shapes(smollm2_weights: dict[str, torch.Tensor]) -> None:
    assert len(smollm2_weights) == 2 + 30 * 9
    assert "lm_head.weight" not in smollm2_weights  # tied embeddings
    expect = {
        "model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,),
        "model.layers.7.self_attn.q_proj.weight": (576, 576),
        "model.layers.7.self_attn.k_proj.weight": (192, 576),
        "model.layers.7.self_attn.v_proj.weight": (192, 576),
        "model.layers.7.self_attn.o_proj.weight": (576, 576),
        "model.layers.7.mlp.gate_proj.weight": (1536, 576),
        "model.layers.7.mlp.up_proj.weight": (1536, 576),
        "model.layers.7.mlp.down_proj.weight": (576, 1536),
        "model.layers.7.input_layernorm.weight": (576,),
        "model.layers.7.post_attention_layernorm.weight": (576,),
    }
    assert {name: tuple(smollm2_weights[name].shape) for name in expect} == expect
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in smollm2_weights.values())


def test_smollm2_weights_equal_transformers(smollm2_weights: dict[str, torch.Tensor],
                                            smollm2_hf: torch.nn.Module) -> None:
    """Whole state dict, q/k rotary unpermutation included, equals transformers' GGUF load."""
    theirs = smollm2_hf.state_dict()
    assert set(smollm2_weights) | {"lm_head.weight"} == set(theirs)
    worst = {name: (ours - theirs[name]).abs().max().item()
             for name, ours in smollm2_weights.items()}
    assert max(worst.values()) <= 1e-6, sorted(worst.items(), key=lambda kv: -kv[1])[:3]


def test_tokenizer_round_trip_and_chat_template(smollm2_dir: Path) -> None:
    saved = load_tokenizer(resolve_model(str(smollm2_dir)))
    ids = saved(MULTI_BYTE, add_special_tokens=False).input_ids
    assert saved.decode(ids) == MULTI_BYTE
    assert ids[-1] == saved.convert_tokens_to_ids("<|im_end|>") == 2
    converted = tokenizer_from_gguf(smollm2_dir / SMOLLM2_GGUF)
    assert converted(MULTI_BYTE, add_special_tokens=False).input_ids == ids
    prompt = saved.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert saved.chat_template == converted.chat_template


def test_gguf_file_and_plain_directory_specs(tmp_path: Path) -> None:
    config = tiny_llama_config()
    real = write_llama_gguf(tmp_path / "real.gguf", config, embedding(300, 64))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "linked.gguf").symlink_to(real)  # like a Hugging Face cache snapshot
    for spec in (str(model_dir), str(model_dir / "linked.gguf")):
        source = resolve_model(spec)
        assert (source.format == "gguf" and source.path == model_dir
                and source.tokenizer_path is None)
        assert source.gguf_file == model_dir / "linked.gguf" and source.name == spec
        assert source.hf_config.num_hidden_layers == 2


# ----------------------------------------------------------------------------------- synthetic GGUF


def test_unpermute_inverts_llamacpp_permute() -> None:
    weight = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    assert np.array_equal(unpermute_rope_rows(llamacpp_permute(weight, 3), 3), weight)
    bias = weight[:, 0].copy()
    assert np.array_equal(unpermute_rope_rows(llamacpp_permute(bias, 3), 3), bias)


def test_synthetic_gguf_round_trips_hf_weights(tmp_path: Path) -> None:
    config = tiny_llama_config()
    state = tiny_llama_state(config)
    path = write_llama_gguf(tmp_path / "tiny.gguf", config, gguf_tensors_from_hf(state, config))
    source = resolve_model(str(path))
    got = source.hf_config
    assert (got.vocab_size, got.hidden_size, got.num_key_value_heads,
            got.head_dim) == (300, 64, 2, 16)
    assert got.tie_word_embeddings is False  # output.weight present
    weights = dict(iter_weights(source))
    assert set(weights) == set(state)
    for name, tensor in state.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("metadata", "expected"), [
    ({"{arch}.rope.scaling.type": "linear", "{arch}.rope.scaling.factor": 4.0},
     {"rope_type": "linear", "factor": 4.0}),
    ({"{arch}.rope.scale_linear": 2.0}, {"rope_type": "linear", "factor": 2.0}),
    ({"{arch}.rope.scaling.type": "none"}, {"rope_type": "default"}),
    ({"{arch}.rope.scaling.type": "yarn", "{arch}.rope.scaling.factor": 4.0,
      "{arch}.rope.scaling.original_context_length": 64.0},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
])
def test_rope_scaling_metadata(tmp_path: Path, metadata: dict[str, object],
                               expected: dict[str, object]) -> None:
    config = tiny_llama_config()
    path = write_llama_gguf(tmp_path / "rope.gguf", config, embedding(300, 64), metadata)
    assert gguf_hf_config(path).rope_parameters == expected | {"rope_theta": 10000.0}


def test_llama3_rope_recovered_from_rope_freqs(tmp_path: Path) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = tiny_llama_config(head_dim=128, hidden_size=512, max_position_embeddings=131072,
                               rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    factors = (plain / scaled.double()).float().numpy()  # what llama.cpp stores as rope_freqs
    np.testing.assert_allclose(llama3_rope_factors(rope, 500000.0, 128), factors, rtol=1e-5)
    tensors = embedding(300, 512) | {"rope_freqs.weight": factors}
    source = resolve_model(str(write_llama_gguf(tmp_path / "l3.gguf", config, tensors)))
    assert source.hf_config.rope_parameters == rope
    scaled_again, _ = ROPE_INIT_FUNCTIONS["llama3"](source.hf_config.to_transformers(), "cpu")
    torch.testing.assert_close(scaled_again, scaled)
    assert [name for name, _ in iter_weights(source)] == ["model.embed_tokens.weight"]


def test_vocab_size_falls_back_to_embedding_rows(tmp_path: Path) -> None:
    config = tiny_llama_config()
    path = write_llama_gguf(tmp_path / "v.gguf", config, embedding(123, 64))
    assert gguf_hf_config(path).vocab_size == 123


def test_unsupported_gguf_architecture_and_garbage(tmp_path: Path) -> None:
    config = tiny_llama_config()
    path = write_llama_gguf(tmp_path / "m.gguf", config, embedding(300, 64), arch="mamba")
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported"):
        resolve_model(str(path))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all, just text padding....")
    with pytest.raises(UnsupportedModelError, match="not a readable GGUF"):
        resolve_model(str(tmp_path / "junk.gguf"))


def test_an_unsupported_gguf_architecture_is_refused_before_the_metadata_is_parsed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_llama_config()
    path = write_llama_gguf(tmp_path / "m.gguf", config, embedding(300, 64), arch="mamba")

    def no_full_parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the whole GGUF header was parsed")
    monkeypatch.setattr(gguf, "GGUFReader", no_full_parse)
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'mamba' is not supported"):
        resolve_model(str(path))


def test_peek_architecture_reads_the_first_keys_only(tmp_path: Path) -> None:
    from pagoda.models.loader.gguf import peek_architecture
    path = write_llama_gguf(tmp_path / "l.gguf", tiny_llama_config(), embedding(300, 64))
    assert peek_architecture(path) == "llama"
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 9)
    assert peek_architecture(tmp_path / "junk.gguf") is None


def test_a_gguf_tensor_with_no_hf_name_is_unsupported(tmp_path: Path) -> None:
    config = tiny_llama_config()
    tensors = embedding(300, 64) | {"mystery.weight": np.zeros(4, np.float32)}
    source = resolve_model(str(write_llama_gguf(tmp_path / "x.gguf", config, tensors)))
    with pytest.raises(UnsupportedModelError,
                       match=r"no HF name for GGUF tensor 'mystery.weight' \(llama\)"):
        dict(iter_weights(source))


# ------------------------------------------------------------------------------- safetensors, dummy


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    config = tiny_llama_config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("hf")
    model.save_pretrained(path)
    return path, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_safetensors_checkpoint_resolves_and_iterates(hf_checkpoint: tuple[Path, dict]) -> None:
    path, state = hf_checkpoint
    source = resolve_model(str(path))
    assert source.format == "safetensors" and source.path == path and source.gguf_file is None
    assert source.tokenizer_path is None
    got = source.hf_config
    assert (got.model_type, got.hidden_size, got.num_key_value_heads, got.tie_word_embeddings) == (
        "llama", 64, 2, False)
    weights = dict(iter_weights(source))
    assert set(weights) == set(state)
    for name, tensor in state.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0, msg=name)
    with pytest.raises(ModelNotFoundError, match="no tokenizer files"):
        load_tokenizer(source)


def test_a_gguf_without_a_vocabulary_runs_on_token_ids(tmp_path: Path) -> None:
    from pagoda.models.loader.tokenizer import get_tokenizer
    path = write_llama_gguf(tmp_path / "bare.gguf", tiny_llama_config(), embedding(300, 64))
    with pytest.raises(ModelNotFoundError, match="embeds no tokenizer"):
        tokenizer_from_gguf(path)
    assert get_tokenizer(resolve_model(str(path))) is None


def test_safetensors_with_tokenizer_files(smollm2_dir: Path, hf_checkpoint: tuple[Path, dict],
                                          tmp_path: Path) -> None:
    path, _ = hf_checkpoint
    for item in path.iterdir():
        (tmp_path / item.name).symlink_to(item)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / name).symlink_to(smollm2_dir / name)
    source = resolve_model(str(tmp_path))
    assert source.tokenizer_path == tmp_path
    tokenizer = load_tokenizer(source)
    assert tokenizer.decode(tokenizer(MULTI_BYTE).input_ids) == MULTI_BYTE


def test_load_format_dummy_and_mismatch(hf_checkpoint: tuple[Path, dict], tmp_path: Path) -> None:
    path, _ = hf_checkpoint
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ModelNotFoundError, match="does not look like a model directory"):
        resolve_model(str(tmp_path))
    source = resolve_model(str(tmp_path), load_format="dummy")
    assert isinstance(source, ModelSource) and source.format == "dummy"
    assert source.hf_config.hidden_size == 64
    with pytest.raises(UnsupportedModelError, match="no weights"):
        next(iter_weights(source))
    assert resolve_model(str(path), load_format="dummy").format == "dummy"
    with pytest.raises(UnsupportedModelError, match="is a safetensors checkpoint, not gguf"):
        resolve_model(str(path), load_format="gguf")
    with pytest.raises(UnsupportedModelError, match="unknown load format"):
        resolve_model(str(path), load_format="pt")


def test_hub_cache_snapshot(hf_checkpoint: tuple[Path, dict], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    path, _ = hf_checkpoint
    repo = tmp_path / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for item in path.iterdir():
        (snapshot / item.name).symlink_to(item)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    source = resolve_model("acme/tiny-llama")
    assert source.format == "safetensors" and source.path == snapshot.resolve()
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model("acme/other")


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("spec", ["./no/such/dir", "/no/such/model.gguf", "surely-not-a-model"])
def test_missing_specs_raise_helpful_errors(spec: str, empty_home: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(spec)
    message = str(info.value)
    assert spec in message and "pagoda pull" in message and "\n" not in message


def test_builtin_not_pulled_says_how_to_pull(empty_home: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"not pulled yet: run `pagoda pull smollm2`"):
        resolve_model("smollm2-135m")


def test_directory_with_two_ggufs_and_non_gguf_file(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"several \.gguf files \(a\.gguf, b\.gguf\)"):
        resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_incomplete_pull_is_not_taken_as_pulled(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path))
    directory = tmp_path / "models" / "smollm2"
    directory.mkdir(parents=True)
    (directory / SMOLLM2_GGUF).write_bytes(b"GGUF" + b"\0" * 12)
    manifest = {"name": "smollm2", "source": "x", "gguf": SMOLLM2_GGUF, "sha256": "0", "size": 999}
    (directory / store.MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelNotFoundError, match="not pulled yet"):
        resolve_model("smollm2")
    assert os.path.exists(directory / SMOLLM2_GGUF)


def test_a_tokenizer_directory_alone_is_a_tokenizer(tmp_path, smollm2_dir):
    """`--tokenizer DIR` may name a directory with tokenizer files and no weights."""
    import shutil

    from pagoda.models.loader.tokenizer import get_tokenizer
    from pagoda.models.source import resolve_model
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, tmp_path / name)
    tokenizer = get_tokenizer(resolve_model(str(smollm2_dir)), str(tmp_path))
    assert tokenizer.encode("hello world") == \
        get_tokenizer(resolve_model(str(smollm2_dir))).encode("hello world")


def test_unknown_architecture_fails_at_resolution_naming_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["MambaForCausalLM"], "model_type": "mamba"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModelError,
                       match=r"'MambaForCausalLM' is not supported \(supported: Gemma3ForCausalLM"):
        resolve_model(str(tmp_path))
