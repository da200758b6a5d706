"""Which quantization a checkpoint holds (its config's `quantization_config`, or the GGUF's
tensor types) and whether `--quantization` agrees with it; no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pagoda.errors import ConfigError, UnsupportedModelError

if TYPE_CHECKING:
    from pagoda.models.source import ModelSource

# vLLM's `--quantization` names that pagoda reads
QUANTIZATION_METHODS = ("fp8", "awq", "gptq", "compressed-tensors", "gguf")
# formats applied at load to a checkpoint in 16 or 32 bits
AT_LOAD = frozenset({"fp8"})
# pagoda's own value: decode the checkpoint's blocks to --dtype at load (the path every
# GGUF took before its blocks were kept; the reference the quantized path is checked against)
DEQUANTIZE = "none"
DEQUANTIZABLE = frozenset({"gguf"})
# other names vLLM takes for these formats (awq_marlin, gptq_marlin: the same checkpoints
# through its Marlin kernels; pagoda picks its own kernels)
_ALIASES = {"compressed_tensors": "compressed-tensors", "awq_marlin": "awq",
            "gptq_marlin": "gptq"}


DUMMY_FORMATS = ("awq", "gptq")  # formats whose linear method makes random weights


def quantization_config(hf_config: Any) -> dict[str, Any] | None:
    """The config's `quantization_config` as a dict, if it has one."""
    value = getattr(hf_config, "quantization_config", None)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UnsupportedModelError("the checkpoint's quantization_config is not an object")
    return value


def checkpoint_quantization(source: ModelSource) -> str | None:
    """The format the checkpoint's weights are stored in; None: 16 or 32-bit floats. Dummy
    weights take the config's format where it has random weights of its own (4-bit
    AWQ/GPTQ), floats otherwise."""
    if source.format == "dummy":
        method = str((quantization_config(source.hf_config) or {}).get("quant_method", ""))
        return method.lower() if method.lower() in DUMMY_FORMATS else None
    if source.format == "gguf":
        from pagoda.models.loader.gguf import block_types, read_gguf_tensors
        tensors = source.gguf_tensors or read_gguf_tensors(source.gguf_file)
        return "gguf" if block_types(tensors) else None
    config = quantization_config(source.hf_config)
    if config is None:
        return None
    method = str(config.get("quant_method", "")).lower()
    method = _ALIASES.get(method, method)
    if method == "compressed-tensors" and not config.get("config_groups"):
        return None  # a scheme for the KV cache alone: the weights are floats
    if method not in QUANTIZATION_METHODS:
        raise UnsupportedModelError(
            f"{source.name}: quantization {method or '(unnamed)'!r} is not supported "
            f"(supported: {', '.join(QUANTIZATION_METHODS)})")
    return method


def resolve_quantization(requested: str | None, source: ModelSource) -> str | None:
    """The format to load `source` with: `requested` (`--quantization`) if it agrees with
    the checkpoint, else the checkpoint's own (None: floats; "none" asks for that of a
    GGUF); ConfigError on a mismatch."""
    if requested is not None:
        requested = _ALIASES.get(requested.lower(), requested.lower())
        if requested not in (*QUANTIZATION_METHODS, DEQUANTIZE):
            raise ConfigError(f"unknown --quantization {requested!r}; pagoda reads "
                              f"{', '.join(QUANTIZATION_METHODS)} (or {DEQUANTIZE}: dequantize "
                              "a GGUF at load)")
    stored = checkpoint_quantization(source)
    if requested == DEQUANTIZE:
        if stored is not None and stored not in DEQUANTIZABLE:
            raise ConfigError(f"--quantization {DEQUANTIZE}: {source.name}'s {stored} weights "
                              "cannot be dequantized at load; drop the flag")
        return None
    if requested is None or requested == stored:
        return stored
    if stored is None and requested in AT_LOAD:
        return requested
    held = f"{stored}-quantized weights" if stored else "unquantized weights"
    if stored is None and requested not in AT_LOAD:
        hint = f"; only {', '.join(sorted(AT_LOAD))} quantizes a 16-bit checkpoint at load"
    else:
        hint = f"; drop --quantization or pass --quantization {stored}"
    raise ConfigError(f"--quantization {requested} does not match {source.name}, which holds "
                      f"{held}{hint}")


def quantizes_at_load(quantization: str | None, source: ModelSource) -> bool:
    """Whether `quantization` is applied at load to a checkpoint of floats."""
    return quantization in AT_LOAD and checkpoint_quantization(source) is None


def holds_float8_weights(quantization: str | None, hf_config: Any) -> bool:
    """Whether a model loaded as `quantization` (resolve_quantization's) holds its weights
    in float8: `fp8`, or a compressed-tensors group of 8-bit float weights."""
    if quantization == "fp8":
        return True
    if quantization != "compressed-tensors":
        return False
    groups = (quantization_config(hf_config) or {}).get("config_groups") or {}
    return any(_float8_scheme(group.get("weights") or {}) for group in groups.values())


def _float8_scheme(scheme: dict[str, Any]) -> bool:
    """Whether a compressed-tensors scheme (a group's weights, a kv_cache_scheme) holds
    8-bit floats."""
    return scheme.get("type") == "float" and int(scheme.get("num_bits") or 0) == 8


def checkpoint_kv_cache_dtype(source: ModelSource) -> str | None:
    """The KV cache the checkpoint was calibrated for, as a --kv-cache-dtype value: "fp8"
    for a compressed-tensors `kv_cache_scheme` of 8-bit floats (its scales are per layer in
    the checkpoint); None for none, or for a scheme pagoda does not hold (integers)."""
    config = quantization_config(source.hf_config) or {}
    scheme = config.get("kv_cache_scheme")
    if not isinstance(scheme, dict):
        return None
    return "fp8" if _float8_scheme(scheme) else None


def resolve_kv_cache_dtype(requested: str, source: ModelSource, float8_cache: bool) -> str:
    """--kv-cache-dtype as the engine holds it: `requested`, except that "auto" takes the
    checkpoint's calibrated float8 cache (as vLLM does) where the device holds one
    (`float8_cache`), and the model's dtype elsewhere."""
    if requested != "auto":
        return requested
    calibrated = checkpoint_kv_cache_dtype(source)
    return calibrated if calibrated is not None and float8_cache else "auto"
