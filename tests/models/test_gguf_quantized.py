"""SmolLM2 (Q4_1) served with its linear weights in 4-bit form on CPU: every projection on
a 4-bit kernel (pagoda's block-dot kernel where it runs, else torch's int4 matmul), its
weights at most 0.4x the dequantized model's, and greedy tokens against the dequantized
engine's (the shared `smollm2_llm`) over 32 tokens of 16 prompts. A tiny untied GGUF keeps
its Q8_0 embedding table in blocks, and its LM head's where a CPU kernel takes them."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from pagoda import LLM, SamplingParams
from pagoda.layers.linear import LinearBase
from pagoda.layers.quantization import cpu_block_dot
from pagoda.layers.quantization.cpu_block_dot import kernel_name
from pagoda.layers.quantization.gguf import GGUFLinearMethod
from pagoda.layers.quantization.gguf_blocks import FORMATS, TABLE_FORMATS
from pagoda.models.arch.qwen import QWEN3_BLOCK_NAMES
from pagoda.models.estimate import estimate
from pagoda.models.source import resolve_model
from tests.layers.quantization.test_gguf_blocks import random_rows
from tests.models.parity import random_prompts
from tests.models.test_gguf_architectures import gguf_name, write_arch_gguf

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
           "The best way to learn", "Water boils at", "In 1492,", "import numpy as np\n",
           "My favourite food is", "The theory of relativity", "Paris is known for",
           "To make bread, you", "The largest planet", "Q: What is 2+2?\nA:",
           "The quick brown fox", "Machine learning is", "Dear John,"]
NUM_TOKENS = 32


@pytest.fixture(scope="module")
def quantized_llm(smollm2_dir):
    return LLM(str(smollm2_dir), quantization="gguf", kv_cache_memory=64 << 20,
               max_model_len=256)


def _model(llm: LLM):
    return llm.engine.core.executor.worker.runner.model


def test_every_projection_runs_on_a_4_bit_kernel(quantized_llm):
    layers = [m for m in _model(quantized_llm).modules() if isinstance(m, LinearBase)]
    assert len(layers) == 30 * 4  # qkv, o, gate_up, down per layer
    assert all(isinstance(m.method, GGUFLinearMethod) for m in layers)
    kernel = (kernel_name(4, 2, half_scales=True) if cpu_block_dot.available()  # Q4_1
              else "int4pack_mm_for_cpu")
    assert {m.method.kernel(m) for m in layers} == {kernel}
    # the LM head tied to the Q8_0 embedding: its codes on the block-dot kernel, else floats
    head = _model(quantized_llm).lm_head
    assert (head.quantized is not None) == cpu_block_dot.available()


def test_the_estimate_counts_the_bytes_the_quantized_engine_holds(quantized_llm, smollm2_dir):
    expected = estimate(resolve_model(str(smollm2_dir)), 256, quantization="gguf")
    assert expected.weight_bytes == quantized_llm.engine.model_info.weight_bytes


def test_weights_take_at_most_0_4x_the_dequantized_bytes(quantized_llm, smollm2_llm):
    quantized = quantized_llm.engine.model_info.weight_bytes
    dequantized = smollm2_llm.engine.model_info.weight_bytes
    assert quantized <= 0.4 * dequantized


def test_greedy_tokens_follow_the_dequantized_engines(quantized_llm, smollm2_llm):
    """Exact equality cannot hold: the 4-bit kernels round the activations (to within
    ~2^-16 of each block of 32's largest in the block-dot kernel's two passes, to bfloat16
    in torch's int4 kernel) where the dequantized engine multiplies float32s, and greedy
    decoding follows the first flipped near-tie. Stated rates, the share of the tokens that
    come before each prompt's first difference and the prompts that agree throughout: on
    the block-dot kernel >= 90% and >= 15 of 16 (94% and 15 measured: "Paris is known for"
    parts at its second token, where " high" and " vibrant" lie 0.0006 nats apart; one
    early near-tie costs 6%), on torch's int4 kernel >= 60% and >= 6 (76% and 11)."""
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in quantized_llm.generate(PROMPTS, params)]
    theirs = [o.outputs[0].token_ids for o in smollm2_llm.generate(PROMPTS, params)]
    agreeing = [next((i for i, (a, b) in enumerate(zip(o, t)) if a != b), NUM_TOKENS)
                for o, t in zip(ours, theirs)]
    share, whole = (0.9, 15) if cpu_block_dot.available() else (0.6, 6)
    assert sum(agreeing) >= share * NUM_TOKENS * len(PROMPTS)
    assert agreeing.count(NUM_TOKENS) >= whole


UNTIED = Qwen3Config(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     head_dim=32, hidden_size=64, intermediate_size=128, vocab_size=4096,
                     max_position_embeddings=256, initializer_range=0.2,
                     tie_word_embeddings=False)


def write_untied_gguf(path, head_type: str | None = None, table_type: str = "Q8_0"):
    """A random Qwen3 (UNTIED) as a GGUF: its token_embd `table_type`, its output table
    `head_type` (None: float32), every other tensor float32."""
    torch.manual_seed(0)
    state = {k: v.detach() for k, v in
             AutoModelForCausalLM.from_config(UNTIED, dtype=torch.float32).state_dict().items()}
    types = {"token_embd.weight": table_type}
    if head_type is not None:
        types["output.weight"] = head_type
    return write_arch_gguf(path, UNTIED, "qwen3", QWEN3_BLOCK_NAMES, state, types=types)


def write_tied_gguf(path, table_type: str):
    """The random Qwen3 of write_untied_gguf with its LM head tied to its token_embd (no
    output table), which is `table_type`; every other tensor float32."""
    torch.manual_seed(0)
    state = {k: v.detach() for k, v in
             AutoModelForCausalLM.from_config(UNTIED, dtype=torch.float32).state_dict().items()
             if k != "lm_head.weight"}
    tied = copy.deepcopy(UNTIED)
    tied.tie_word_embeddings = True
    return write_arch_gguf(path, tied, "qwen3", QWEN3_BLOCK_NAMES, state,
                           types={"token_embd.weight": table_type})


def output_table(path, name: str = "output.weight") -> torch.Tensor:
    """The GGUF's output table (or the table `name`) decoded by gguf-py, [vocab, hidden]
    float32."""
    reader = gguf.GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == name)
    table = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(table.reshape(UNTIED.vocab_size, UNTIED.hidden_size).copy())


# a block type per projection: q, k and v of one fused layer in three types
TYPED = {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q5_0", "attn_output": "Q5_1",
         "ffn_gate": "Q8_0", "ffn_up": "Q4_0", "ffn_down": "Q8_0"}


def write_typed_gguf(path):
    """The random Qwen3 of write_untied_gguf with each projection in TYPED's block type (the
    types gguf-py can quantize to), embeddings and norms float32."""
    torch.manual_seed(0)
    state = {k: v.detach() for k, v in
             AutoModelForCausalLM.from_config(UNTIED, dtype=torch.float32).state_dict().items()}
    types = {f"blk.{i}.{name}.weight": kind for i in range(UNTIED.num_hidden_layers)
             for name, kind in TYPED.items()}
    return write_arch_gguf(path, UNTIED, "qwen3", QWEN3_BLOCK_NAMES, state, types=types)


def test_an_untied_embedding_stays_in_its_blocks(tmp_path):
    """An untied Qwen3 GGUF whose token_embd is Q8_0: with `--quantization gguf` the table
    stays in blocks (each lookup decodes its rows; two tensor-parallel ranks each keep their
    half of the vocabulary's), its bytes are what the estimate says, and the tokens are those
    of the table dequantized at load."""
    path = write_untied_gguf(tmp_path / "untied.gguf")
    prompts = random_prompts(UNTIED.vocab_size, (5, 17))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens, held = {}, {}
    for mode, tp in (("gguf", 1), ("none", 1), ("gguf", 2)):
        llm = LLM(str(path), quantization=mode, kv_cache_memory=8 << 20, max_model_len=128,
                  tensor_parallel_size=tp)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        tokens[mode, tp] = [o.outputs[0].token_ids for o in outputs]
        held[mode, tp] = llm.engine.model_info.weight_bytes
        if tp == 1:
            table = _model(llm).model.embed_tokens
            assert (table.decode_rows is not None) == (mode == "gguf")
            assert table.weight.dtype == (torch.uint8 if mode == "gguf" else torch.float32)
        llm.engine.core.shutdown()
    assert tokens["gguf", 1] == tokens["none", 1] == tokens["gguf", 2]
    float_table, q8_table = 4096 * 64 * 4, 4096 * 64 // 32 * 34
    assert held["none", 1] - held["gguf", 1] == float_table - q8_table
    assert held["gguf", 2] < 0.6 * held["gguf", 1]
    assert estimate(resolve_model(str(path)), 128, quantization="gguf").weight_bytes \
        == held["gguf", 1]


def tokens_of_three_engines(path, check_kept) -> dict[tuple[str, int], list[list[int]]]:
    """Greedy tokens of the GGUF at `path` kept quantized on one rank, decoded at load, and
    kept on two tensor-parallel ranks, by (mode, ranks); `check_kept(llm)` looks at the
    first engine before it shuts down."""
    prompts = [{"prompt_token_ids": p} for p in random_prompts(UNTIED.vocab_size, (5, 17))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = {}
    for mode, tp in (("gguf", 1), ("none", 1), ("gguf", 2)):
        llm = LLM(str(path), quantization=mode, kv_cache_memory=8 << 20, max_model_len=128,
                  tensor_parallel_size=tp)
        tokens[mode, tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        if (mode, tp) == ("gguf", 1):
            check_kept(llm)
        llm.engine.core.shutdown()
    return tokens


@pytest.mark.parametrize("head_type", ["Q8_0", "Q4_0"])
def test_an_untied_head_keeps_its_blocks_where_a_kernel_takes_them(tmp_path, cpu_kernel,
                                                                   head_type):
    """An untied Qwen3 GGUF whose output table is `head_type`: the LM head keeps its blocks
    where a CPU kernel takes the type (the block-dot kernel every type, torch's int4 matmul
    the 4-bit ones; else decoded at load), the estimate counts what is held, and its logits
    are those of the table gguf-py decodes, within the kernel's rounding of the activations
    (bfloat16 in torch's int4 kernel); greedy tokens against the table decoded at load, and
    on two tensor-parallel ranks (each keeping its half of the vocabulary's rows)."""
    path = write_untied_gguf(tmp_path / "head.gguf", head_type)

    def check_kept(llm):
        head = _model(llm).lm_head
        kept = cpu_kernel == "cpu_block_dot" or head_type == "Q4_0"
        assert (head.quantized is not None) == kept
        assert head.weight.dtype == (torch.uint8 if kept else torch.float32)
        assert estimate(resolve_model(str(path)), 128, quantization="gguf").weight_bytes \
            == llm.engine.model_info.weight_bytes
        hidden = torch.randn(6, UNTIED.hidden_size)
        reference = hidden @ output_table(path).T
        error = (head(hidden) - reference).abs().max() / reference.abs().max()
        assert error < (1e-4 if cpu_kernel == "cpu_block_dot" else 1e-2)

    tokens = tokens_of_three_engines(path, check_kept)
    assert tokens["gguf", 1] == tokens["none", 1] == tokens["gguf", 2]


def test_a_tied_table_is_held_once_where_the_block_dot_kernel_runs(tmp_path, cpu_kernel):
    """A Qwen3 GGUF whose LM head is tied to its Q4_0 token_embd: the block-dot kernel holds
    the table once for the head's product and the lookups (torch's path: floats, shared),
    the estimate counts what is held, lookups are the rows gguf-py decodes; greedy tokens
    against the table decoded at load, and on two tensor-parallel ranks."""
    path = write_tied_gguf(tmp_path / "tied.gguf", "Q4_0")

    def check_kept(llm):
        model = _model(llm)
        assert (model.lm_head.quantized is not None) == (cpu_kernel == "cpu_block_dot")
        assert model.model.embed_tokens.quantized is model.lm_head.quantized
        assert estimate(resolve_model(str(path)), 128, quantization="gguf").weight_bytes \
            == llm.engine.model_info.weight_bytes
        table = output_table(path, "token_embd.weight")
        ids = torch.tensor([[0, 7, UNTIED.vocab_size - 1]])
        assert torch.equal(model.model.embed_tokens(ids), table[ids])

    tokens = tokens_of_three_engines(path, check_kept)
    assert tokens["gguf", 1] == tokens["none", 1] == tokens["gguf", 2]


def test_the_estimate_counts_a_tied_table_on_cuda_as_the_group_kernels_codes(tmp_path):
    """On CUDA a tied Q4_0 table is held as 4-bit codes with a 16-bit scale a group of 32
    (4.5 bits a weight: its mins, -8 times the scales, are not held) in place of its
    bfloat16 floats; nothing else differs (the file's other tensors are floats either
    way)."""
    source = resolve_model(str(write_tied_gguf(tmp_path / "tied.gguf", "Q4_0")))
    held, decoded = (estimate(source, 128, dtype="bfloat16", device="cuda", quantization=mode)
                     for mode in ("gguf", "none"))
    table = UNTIED.vocab_size * UNTIED.hidden_size
    assert decoded.weight_bytes - held.weight_bytes == table * 2 - table * 9 // 16


def test_typed_projections_on_two_ranks_give_one_ranks_tokens(tmp_path, cpu_kernel):
    """A GGUF with a block type per projection on two tensor-parallel ranks: every type
    stays in blocks on the block-dot kernel; on torch's path the 4-bit types do and the
    others are decoded at load (each rank its own rows or inputs); the greedy tokens are
    one rank's."""
    path = write_typed_gguf(tmp_path / "typed.gguf")
    prompts = [{"prompt_token_ids": p} for p in random_prompts(UNTIED.vocab_size, (5, 17))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = []
    for tp in (1, 2):
        llm = LLM(str(path), quantization="gguf", kv_cache_memory=8 << 20, max_model_len=128,
                  tensor_parallel_size=tp)
        tokens.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        if tp == 1:
            kernels = {part for m in _model(llm).modules() if isinstance(m, LinearBase)
                       for part in m.method.kernel(m).split(" + ")}
            # (the legacy types' scales are float16s)
            assert kernels == ({kernel_name(4, 2, True), kernel_name(6, 2, True),
                                kernel_name(8, 2, True)}
                               if cpu_kernel == "cpu_block_dot"
                               else {"int4pack_mm_for_cpu", "dense matmul"})
        llm.engine.core.shutdown()
    assert tokens[0] == tokens[1]


def test_an_untied_table_on_a_gpu_is_counted_as_the_group_kernels_codes(tmp_path,
                                                                         monkeypatch):
    """On a GPU an untied table is held as the group kernel's codes (its lookups one launch:
    gguf.holds_untied_table), for Q8_0 a code and a float16 scale a group of 32 (its lows
    -128 times the scale, no min held): its blocks' 34 bytes a block of 32, as on CPU, which
    keeps the blocks; with its mins held too (PAGODA_CENTRED_CODES=0) the estimates differ
    by the mins' bytes only. A type whose codes would take much more than its blocks (Q6_K:
    9 bits against 6.56) keeps its blocks on a GPU too."""
    from pagoda.layers.quantization import group_gemm
    from pagoda.layers.quantization.gguf import holds_untied_table
    rows, columns = UNTIED.vocab_size, UNTIED.hidden_size
    assert holds_untied_table("Q8_0", rows, columns, torch.device("cuda"))
    assert holds_untied_table("Q4_K", rows, columns, torch.device("cuda"))
    assert not holds_untied_table("Q6_K", rows, columns, torch.device("cuda"))
    assert not holds_untied_table("Q8_0", rows, columns, torch.device("cpu"))
    source = resolve_model(str(write_untied_gguf(tmp_path / "untied.gguf")))
    on_cpu = estimate(source, 128, quantization="gguf", dtype="float32").weight_bytes
    on_gpu = estimate(source, 128, quantization="gguf", dtype="float32",
                      device="H100").weight_bytes
    assert on_gpu == on_cpu
    monkeypatch.setattr(group_gemm, "CENTRED_CODES", False)
    with_mins = estimate(source, 128, quantization="gguf", dtype="float32",
                         device="H100").weight_bytes
    assert with_mins - on_cpu == rows * columns * 9 // 8 - rows * columns // 32 * 34


# a random Qwen3 whose projections all take IQ4_XS's super-blocks of 256 inputs
WIDE = Qwen3Config(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                   head_dim=128, hidden_size=256, intermediate_size=512, vocab_size=512,
                   max_position_embeddings=256, initializer_range=0.2)


def table_type_blocks(type_name: str, rows: int, columns: int, seed: int) -> np.ndarray:
    """Random blocks of IQ4_NL or IQ4_XS (which gguf-py cannot quantize to) whose float16
    d is small enough for a sane model: weights within 0.13 (IQ4_NL) or 4.1 (IQ4_XS)."""
    blocks = random_rows(type_name, rows, columns, seed).reshape(
        rows, -1, FORMATS[type_name].block_bytes)
    d = np.random.default_rng(seed).uniform(-1e-3, 1e-3, blocks.shape[:2]).astype(np.float16)
    blocks[..., 0:2] = d[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def write_table_type_gguf(path, type_name: str):
    """The random Qwen3 WIDE as a GGUF whose every projection is `type_name`'s random blocks
    (tied embedding and norms float32)."""
    torch.manual_seed(0)
    state = {k: v.detach() for k, v in
             AutoModelForCausalLM.from_config(WIDE, dtype=torch.float32).state_dict().items()}
    blocks = {}
    for seed, (name, tensor) in enumerate(state.items()):
        target = gguf_name(name, QWEN3_BLOCK_NAMES)
        if target is not None and name.endswith("_proj.weight"):
            blocks[target] = (type_name, table_type_blocks(type_name, *tensor.shape, seed))
    assert len(blocks) == 7 * WIDE.num_hidden_layers
    return write_arch_gguf(path, WIDE, "qwen3", QWEN3_BLOCK_NAMES, state, blocks=blocks)


@pytest.mark.parametrize("type_name", sorted(TABLE_FORMATS))
def test_table_types_are_held_as_byte_codes_where_the_block_dot_kernel_runs(
        tmp_path, cpu_kernel, type_name):
    """A GGUF whose projections are IQ4_NL or IQ4_XS (a 4-bit index into a table of 16 int8
    values, a scale per 32 weights): the block-dot kernel holds them as byte codes (the value
    plus 128; IQ4_NL's scales float16s, IQ4_XS's as its blocks store them: an int8
    sub-scale a group times a super-block's float), torch's path decodes them at load;
    the estimate counts what is held, and the greedy tokens are those of the weights decoded
    at load."""
    path = write_table_type_gguf(tmp_path / f"{type_name}.gguf", type_name)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(WIDE.vocab_size, (5, 17))]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = {}
    for mode in ("gguf", "none"):
        llm = LLM(str(path), quantization=mode, kv_cache_memory=8 << 20, max_model_len=128)
        tokens[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        if mode == "gguf":
            kernels = {m.method.kernel(m) for m in _model(llm).modules()
                       if isinstance(m, LinearBase)}
            on_block_dot = kernel_name(8, 2, half_scales=type_name == "IQ4_NL",
                                       factored=type_name == "IQ4_XS")
            assert kernels == ({on_block_dot}
                               if cpu_kernel == "cpu_block_dot" else {"dense matmul"})
            assert estimate(resolve_model(str(path)), 128, quantization="gguf").weight_bytes \
                == llm.engine.model_info.weight_bytes
        llm.engine.core.shutdown()
    assert tokens["gguf"] == tokens["none"]
