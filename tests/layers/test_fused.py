"""Fused Triton kernels (RMSNorm+residual, RoPE, q/k head norms+RoPE+KV store, SiLU-and-mul)
equal the layers' torch paths; the norm's and the gated activations' float8 rows are what
fp8_rows makes of their plain rows.

They run here under Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before triton is
imported, hence a subprocess), and at real sizes on the GPU in tests/gpu/test_fused.py.
"""

from __future__ import annotations

import json

import torch

from pagoda.layers.activation import GeluTanhAndMul, SiluAndMul
from pagoda.layers.norm import GemmaRMSNorm, RMSNorm
from pagoda.layers.rotary import RotaryEmbedding
from tests.utils import interpreter_report

MARKER = "FUSED-RESULTS "


def compare_all(device: str, dtype: torch.dtype, tokens: int = 5) -> dict[str, float]:
    """Max error (relative to 1 + |expected|) of each fused kernel against the torch path,
    on random inputs."""
    from pagoda.layers import fused
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    errors = {}
    norm = RMSNorm(96, 1e-5).to(device)
    norm.weight.data = randn(96).float().to(device)
    x, res = randn(tokens, 96), randn(tokens, 96)
    for name, r in (("rms_norm", None), ("add_rms_norm", res)):
        ref_out, ref_res = norm.forward_native(x, r)
        out, new_res = fused.add_rms_norm(x, r, norm.weight, norm.eps)
        errors[name] = max(_relative_error(out, ref_out), _relative_error(new_res, ref_res))
    for rot_dim in (64, 32):  # full and partial rotary
        rope = RotaryEmbedding(64, 128, {"rope_type": "default", "rope_theta": 1e4},
                               rotary_dim=rot_dim).to(device)
        qkv = randn(tokens, 9 * 64 + 2 * 3 * 64)
        q = qkv[:, :576].view(tokens, 9, 64)
        k = qkv[:, 576:768].view(tokens, 3, 64)
        positions = torch.tensor([0, 3, 17, 64, 127][:tokens], device=device)
        ref_q, ref_k = rope.forward_native(positions, q.clone(), k.clone())
        fused.rope_qk_(positions, q, k, rope.cos_sin, rot_dim)
        errors[f"rope_{rot_dim}"] = max(_relative_error(q, ref_q), _relative_error(k, ref_k))
        errors[f"rope_store_kv_{rot_dim}"] = _rope_store_kv_error(rope, rot_dim, randn, tokens,
                                                                  device)
    errors["qk_norm_rope_store_kv"] = _qk_norm_rope_store_kv_error(randn, tokens, device)
    errors["norm_add_rms_norm"] = _norm_add_rms_norm_error(randn, tokens, device)
    gate_up = randn(tokens, 2 * 1100)
    errors["silu_and_mul"] = _relative_error(fused.silu_and_mul(gate_up),
                                             SiluAndMul().forward_native(gate_up))
    errors["gelu_tanh_and_mul"] = _relative_error(fused.gelu_tanh_and_mul(gate_up),
                                                  GeluTanhAndMul().forward_native(gate_up))
    for name, r in (("rms_norm_float8", None), ("add_rms_norm_float8", res)):
        rows, new_res = fused.add_rms_norm_float8(x, r, norm.weight, norm.eps)
        out, ref_res = fused.add_rms_norm(x, r, norm.weight, norm.eps)
        errors[name] = max(_float8_rows_mismatch(rows, out), _relative_error(new_res, ref_res))
    errors["silu_and_mul_float8"] = _float8_rows_mismatch(
        fused.gated_act_float8(gate_up, gelu_tanh=False), fused.silu_and_mul(gate_up))
    errors["gelu_tanh_and_mul_float8"] = _float8_rows_mismatch(
        fused.gated_act_float8(gate_up, gelu_tanh=True), fused.gelu_tanh_and_mul(gate_up))
    return errors


def _float8_rows_mismatch(rows, plain: torch.Tensor) -> float:
    """The largest difference between Float8Rows written by a kernel and fp8_rows of the
    same kernel's plain rows (values and scales; 0 when bit for bit)."""
    from pagoda.layers.float8_rows import FLOAT8_MAX
    from pagoda.layers.quantization.triton_group_gemm import fp8_rows
    values, scale = fp8_rows(plain, FLOAT8_MAX)
    assert rows.dtype == plain.dtype and rows.values.dtype == values.dtype
    return max((rows.values.float() - values.float()).abs().max().item(),
               (rows.scale - scale).abs().max().item())


def _rope_store_kv_error(rope, rot_dim, randn, tokens, device) -> float:
    """The fused RoPE + KV store against RoPE, then a plain copy into the cache slots
    (slot -1 and a token past the slot list store nothing)."""
    from pagoda.layers import fused
    qkv = randn(tokens, 9 * 64 + 2 * 3 * 64)
    q = qkv[:, :576].view(tokens, 9, 64)
    k = qkv[:, 576:768].view(tokens, 3, 64)
    v = qkv[:, 768:].view(tokens, 3, 64)
    positions = torch.tensor([0, 3, 17, 64, 127][:tokens], device=device)
    slots = torch.tensor([5, -1, 9, 0][:max(tokens - 1, 1)], device=device)
    ref_q, ref_k = rope.forward_native(positions, q.clone(), k.clone())
    ref_cache = torch.full((2, 4 * 4, 3, 64), 7.0, dtype=q.dtype, device=device)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            ref_cache[0, slot], ref_cache[1, slot] = ref_k[t], v[t]
    cache = torch.full((2, 4, 4, 3, 64), 7.0, dtype=q.dtype, device=device)
    fused.rope_store_kv_(positions, q, k, v, rope.cos_sin, rot_dim, cache[0], cache[1], slots)
    return max(_relative_error(q, ref_q), _relative_error(cache.flatten(1, 2), ref_cache))


def _qk_norm_rope_store_kv_error(randn, tokens, device) -> float:
    """The fused kernel with per-head q/k norms against the torch path: each head of q and k
    (strided views of a fused qkv output) normed, rotated, then copied into the cache slots
    (Gemma's 1 + w form on k: the weights are just weights)."""
    from pagoda.layers import fused
    q_norm, k_norm = RMSNorm(64, 1e-6).to(device), GemmaRMSNorm(64, 1e-5).to(device)
    q_norm.weight.data = randn(64).float().to(device)
    k_norm.weight.data = randn(64).float().to(device)
    rope = RotaryEmbedding(64, 128, {"rope_type": "default", "rope_theta": 1e4}).to(device)
    qkv = randn(tokens, (6 + 2 * 2) * 64)
    q, k = qkv[:, :384].view(tokens, 6, 64), qkv[:, 384:512].view(tokens, 2, 64)
    v = qkv[:, 512:].view(tokens, 2, 64)
    positions = torch.tensor([0, 3, 17, 64, 127][:tokens], device=device)
    slots = torch.arange(tokens, device=device) * 3
    normed_q = q_norm.forward_native(q.reshape(-1, 64))[0].view(q.shape)
    normed_k = k_norm.forward_native(k.reshape(-1, 64))[0].view(k.shape)
    ref_q, ref_k = rope.forward_native(positions, normed_q, normed_k)
    cache = torch.zeros((2, 4, 4, 2, 64), dtype=q.dtype, device=device)
    fused.rope_store_kv_(positions, q, k, v, rope.cos_sin, 64, cache[0], cache[1], slots,
                         (q_norm, k_norm))
    stored = cache.flatten(1, 2)[:, slots]
    return max(_relative_error(q, ref_q), _relative_error(k, ref_k),
               _relative_error(stored[0], ref_k), _relative_error(stored[1], v))


def _norm_add_rms_norm_error(randn, tokens, device) -> float:
    from pagoda.layers import fused
    first, second = RMSNorm(96, 1e-6).to(device), RMSNorm(96, 1e-5).to(device)
    first.weight.data = randn(96).float().to(device)
    second.weight.data = randn(96).float().to(device)
    x, res = randn(tokens, 96), randn(tokens, 96)
    ref_out, ref_res = second.forward_native(first.forward_native(x)[0], res)
    out, new_res = fused.norm_add_rms_norm(x, res, first.weight, first.eps, second.weight,
                                           second.eps)
    return max(_relative_error(out, ref_out), _relative_error(new_res, ref_res))


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max |actual - expected| / (1 + |expected|): a kernel may round one ulp differently
    (fused multiply-adds), and in bf16 one ulp at |x| >= 4 is already 2^-5."""
    expected = expected.float()
    return ((actual.float() - expected).abs() / (1 + expected.abs())).max().item()


def test_fused_kernels_match_torch_under_the_interpreter():
    errors = interpreter_report("tests.layers.test_fused", MARKER)
    assert set(errors) == {"rms_norm", "add_rms_norm", "rope_64", "rope_32", "rope_store_kv_64",
                           "rope_store_kv_32", "silu_and_mul", "gelu_tanh_and_mul",
                           "qk_norm_rope_store_kv", "norm_add_rms_norm", "rms_norm_float8",
                           "add_rms_norm_float8", "silu_and_mul_float8",
                           "gelu_tanh_and_mul_float8"}
    for name, error in errors.items():
        if name.endswith("float8"):  # float8 rows as fp8_rows makes them, bit for bit
            assert error == 0, (name, error)
        else:
            assert error < 1e-5, (name, error)


if __name__ == "__main__":
    print(MARKER + json.dumps(compare_all("cpu", torch.float32)))


def test_the_norm_kernel_compiles_for_sm90_with_and_without_float8_rows():
    """The interpreter runs a float constexpr `if` that Triton's compiler refuses."""
    from pagoda.layers import fused
    from tests.utils import compile_for_cuda
    for fp8_max in (0.0, 448.0):
        out = "*fp8e4nv" if fp8_max else "*bf16"
        assembly = compile_for_cuda(
            fused._add_rms_norm_kernel,
            {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": out,
             "res_out_ptr": "*bf16", "scale_ptr": "*fp32", "n_cols": "i32", "eps": "fp32"},
            {"HAS_RESIDUAL": True, "BLOCK": 4096, "PDL": True, "FP8_MAX": fp8_max},
            num_warps=16)
        assert "cubin" in assembly
