"""Offline throughput benchmark: all requests submitted at once, optionally against transformers.

The result is one JSON-able dict (schema `pagoda.bench.throughput/1`):

    environment  device, torch/transformers versions, CPU/GPU name, threads, load average
    git          commit and dirty flag of the working tree (None outside a checkout)
    notes        free text given with --notes
    command      the `pagoda bench throughput` flags that reproduce the run (None from Python);
    argv         the process's sys.argv; started_at / finished_at (UTC ISO 8601)
    model        spec, format, architecture, parameter count, dtype
    config       the benchmark settings and the engine keyword arguments
    workload     request count and prompt / output length statistics
    systems      {"pagoda": figures, "hf": figures}; figures carry elapsed_s, requests_per_s,
                 output_tokens_per_s, total_tokens_per_s, token counts, per-system details,
                 and an empty `fraction_of_bound` dict for the roofline to fill
    ratios       {"pagoda_over_hf": {metric: ratio}}
    bounds       {} - physical limits (roofline) keyed by name, filled by a later pass
"""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pagoda.bench.datasets import (
    BenchRequest,
    check_range,
    length_range,
    random_requests,
    special_token_ids,
)
from pagoda.models.quantization import holds_float8_weights, resolve_quantization
from pagoda.runner.memory import kv_cache_torch_dtype
from pagoda.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagoda.bench.roofline import HeldWeights

SCHEMA = "pagoda.bench.throughput/1"
RATIO_METRICS = ("requests_per_s", "output_tokens_per_s", "total_tokens_per_s")
_WARMUP_OUTPUT_LEN = 4
_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
# besides those: every PAGODA_ variable (the kernels' switches among them) but the secret
_SECRET_ENV_VARS = ("PAGODA_API_KEY",)


@dataclass(slots=True)
class ThroughputConfig:
    """What to benchmark: the model and engine settings, the workload, the comparison."""

    model: str = "smollm2"
    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.0
    input_len_range: tuple[int, int] | None = None
    output_len_range: tuple[int, int] | None = None
    temperature: float = 0.0
    seed: int = 0
    detokenize: bool = True
    compare: str | None = None  # None | "hf"
    hf_max_batch_size: int = 16
    hf_num_prompts: int | None = None  # the reference runs the first N requests only
    gpu_busy: bool = False  # rerun the workload under the profiler for the GPU busy fraction
    single_stream: bool = False  # also time the first request alone (TTFT, TPOT)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # LLM(model, **engine_kwargs)
    command: list[str] | None = None  # the CLI command reproducing this run, if any
    notes: str | None = None  # free text kept in the result (machine conditions, purpose)

    def __post_init__(self) -> None:
        """Reject a bad workload before any model is loaded."""
        if self.num_prompts < 1 or self.hf_max_batch_size < 1:
            raise ValueError("--num-prompts and --hf-max-batch-size must be >= 1")
        if self.compare not in (None, "hf"):
            raise ValueError(f"unknown comparison {self.compare!r}; use 'hf'")
        if self.temperature < 0:
            raise ValueError("--temperature must be >= 0")
        for length, bounds, what in ((self.input_len, self.input_len_range, "input length"),
                                     (self.output_len, self.output_len_range, "output length")):
            if bounds:
                check_range(bounds, what)
            else:
                length_range(length, self.range_ratio)


@dataclass(slots=True)
class SystemFigures:
    """Measured figures of one system on the workload; token counts are actual, not requested."""

    name: str
    elapsed_s: float
    num_requests: int
    prompt_tokens: int
    output_tokens: int
    requests_per_s: float = 0.0
    output_tokens_per_s: float = 0.0
    total_tokens_per_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    fraction_of_bound: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seconds = max(self.elapsed_s, 1e-9)
        self.requests_per_s = self.num_requests / seconds
        self.output_tokens_per_s = self.output_tokens / seconds
        self.total_tokens_per_s = (self.prompt_tokens + self.output_tokens) / seconds


# ---- pagoda ------------------------------------------------------------------------------------

def build_llm(cfg: ThroughputConfig) -> Any:
    """The pagoda engine under test."""
    from pagoda.engine.llm import LLM

    kwargs = {"seed": cfg.seed} | cfg.engine_kwargs
    return LLM(cfg.model, **kwargs)


def make_requests(cfg: ThroughputConfig, vocab_size: int, tokenizer: Any,
                  seed: int | None = None, num: int | None = None) -> list[BenchRequest]:
    """The benchmark workload, drawn from the model's vocabulary minus special tokens."""
    return random_requests(num or cfg.num_prompts, cfg.input_len, cfg.output_len,
                           cfg.range_ratio, vocab_size, cfg.seed if seed is None else seed,
                           input_len_range=cfg.input_len_range,
                           output_len_range=cfg.output_len_range,
                           excluded_token_ids=special_token_ids(tokenizer))


def sampling_params(cfg: ThroughputConfig, request: BenchRequest, index: int) -> SamplingParams:
    """Fixed-length generation: ignore EOS, exactly output_len tokens."""
    seed = None if cfg.temperature == 0 else cfg.seed + index
    return SamplingParams(temperature=cfg.temperature, max_tokens=request.output_len,
                          ignore_eos=True, seed=seed, detokenize=cfg.detokenize)


def warm_up(llm: Any, cfg: ThroughputConfig, request: BenchRequest) -> None:
    """One short request through the whole path, then forget its cached prefix blocks."""
    short = BenchRequest(request.prompt_token_ids, min(request.output_len, _WARMUP_OUTPUT_LEN))
    llm.generate([{"prompt_token_ids": short.prompt_token_ids}], sampling_params(cfg, short, 0))
    llm.engine.core.reset_prefix_cache()


def run_pagoda(llm: Any, cfg: ThroughputConfig, requests: list[BenchRequest]) -> SystemFigures:
    """Submit every request at once via llm.generate and time it to the last output."""
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [sampling_params(cfg, r, i) for i, r in enumerate(requests)]
    before = llm.engine.core.stats()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    after = llm.engine.core.stats()
    output_lens = [len(o.outputs[0].token_ids) for o in outputs]
    figures = SystemFigures("pagoda", elapsed, len(requests),
                            sum(len(r.prompt_token_ids) for r in requests), sum(output_lens))
    figures.details = engine_details(before, after, output_lens)
    figures.details["cached_prompt_tokens"] = sum(o.num_cached_tokens for o in outputs)
    return figures


def engine_details(before: Any, after: Any, output_lens: list[int]) -> dict[str, Any]:
    """Scheduler counters over the timed run.

    Every output token but the last of each request is fed back once (decode), so the rest
    of the computed tokens are prefill: prompts minus prefix hits, plus recomputation after
    preemption.
    """
    computed = after.num_computed_tokens_total - before.num_computed_tokens_total
    decode = sum(max(n - 1, 0) for n in output_lens)
    return {
        "computed_tokens": computed,
        "decode_tokens_computed": decode,
        "prefill_tokens_computed": computed - decode,
        "prefix_cache_queried_tokens": after.prefix_cache_queries - before.prefix_cache_queries,
        "prefix_cache_hit_tokens": after.prefix_cache_hits - before.prefix_cache_hits,
        "preemptions": after.num_preemptions - before.num_preemptions,
        "output_lens_min": min(output_lens),
        "output_lens_max": max(output_lens),
    }


def model_facts(llm: Any) -> dict[str, Any]:
    """What was loaded: spec, format, architecture, size, the bytes its weights are held in
    (a quantized model's floor may count others: floor_weights), dtype, KV capacity."""
    core = llm.engine.core
    hf = core.source.hf_config
    return {
        "spec": core.source.name,
        "path": str(core.source.gguf_file or core.source.path),
        "format": core.source.format,
        "architecture": (getattr(hf, "architectures", None) or [None])[0],
        "model_type": getattr(hf, "model_type", None),
        "num_parameters": core.executor.loaded_model.num_parameters,
        "weight_bytes": llm.engine.model_info.weight_bytes,
        "num_layers": getattr(hf, "num_hidden_layers", None),
        "hidden_size": getattr(hf, "hidden_size", None),
        "vocab_size": hf.vocab_size,
        "dtype": str(core.dtype).removeprefix("torch."),
        "device": str(core.device),
        "max_model_len": core.max_model_len,
        "kv_cache_blocks": llm.engine.model_info.num_kv_blocks,
        "kv_cache_block_size": llm.engine.model_info.block_size,
        "kv_cache_capacity_tokens": llm.engine.model_info.kv_capacity_tokens,
    }


# ---- transformers ------------------------------------------------------------------------------

def load_hf_model(source: Any, dtype: torch.dtype, device: torch.device, seed: int) -> Any:
    """The same checkpoint through transformers (random weights from `seed` for dummy)."""
    from transformers import AutoModelForCausalLM

    if source.format == "dummy":
        torch.manual_seed(seed)
        with torch.device(device):  # random init where it runs: fast for large models
            model = AutoModelForCausalLM.from_config(source.hf_config.to_transformers(),
                                                     dtype=dtype)
    elif source.format == "gguf":
        model = AutoModelForCausalLM.from_pretrained(
            str(source.gguf_file.parent), gguf_file=source.gguf_file.name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype)
    return model.to(device).eval()


def hf_batches(requests: list[BenchRequest], batch_size: int) -> list[list[BenchRequest]]:
    """Requests in submission order, batch_size at a time."""
    return [requests[i:i + batch_size] for i in range(0, len(requests), batch_size)]


def left_padded(batch: list[BenchRequest], pad_id: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of a batch, padded on the left."""
    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, request in enumerate(batch):
        n = len(request.prompt_token_ids)
        ids[row, width - n:] = torch.tensor(request.prompt_token_ids)
        mask[row, width - n:] = 1
    return ids.to(device), mask.to(device)


def pad_token_id(config: Any) -> int:
    """The model's pad id, else its (first) EOS id, else 0."""
    for candidate in (config.pad_token_id, config.eos_token_id):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


@torch.inference_mode()
def hf_generate(model: Any, batch: list[BenchRequest], cfg: ThroughputConfig,
                max_new_tokens: int | None = None) -> int:
    """Generate exactly the batch's longest output length for every row; returns that length."""
    from transformers import GenerationConfig

    new = max_new_tokens or max(r.output_len for r in batch)
    pad = pad_token_id(model.config)
    ids, mask = left_padded(batch, pad, model.device)
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_k": 0, "top_p": 1.0} \
        if cfg.temperature > 0 else {"do_sample": False}
    gen = GenerationConfig(max_new_tokens=new, min_new_tokens=new, pad_token_id=pad,
                           eos_token_id=model.config.eos_token_id, **sampling)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
    return out.shape[1] - ids.shape[1]


def run_hf(model: Any, cfg: ThroughputConfig, requests: list[BenchRequest]) -> SystemFigures:
    """Padded static batches through model.generate; only each request's own length counts."""
    hf_generate(model, requests[:1], cfg, _WARMUP_OUTPUT_LEN)
    batches = hf_batches(requests, cfg.hf_max_batch_size)
    if cfg.temperature > 0:
        torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    generated = [hf_generate(model, batch, cfg) for batch in batches]
    synchronize(model.device)
    elapsed = time.perf_counter() - start
    useful = sum(min(r.output_len, g) for g, b in zip(generated, batches) for r in b)
    figures = SystemFigures("hf", elapsed, len(requests),
                            sum(len(r.prompt_token_ids) for r in requests), useful)
    figures.details = {
        "batch_size": cfg.hf_max_batch_size,
        "num_batches": len(batches),
        "generated_tokens_incl_padding": sum(g * len(b) for g, b in zip(generated, batches)),
        "padded_prompt_tokens": sum(max(len(r.prompt_token_ids) for r in b) * len(b)
                                    for b in batches),
        "short_batches": sum(g < max(r.output_len for r in b) for g, b in zip(generated, batches)),
    }
    return figures


# ---- the run -----------------------------------------------------------------------------------

def run_benchmark(cfg: ThroughputConfig) -> dict[str, Any]:
    """Run pagoda (and the comparison, if asked); returns the full result dict."""
    result = {"schema": SCHEMA, "notes": cfg.notes, "command": cfg.command, "argv": sys.argv,
              "started_at": _now(),
              "environment": environment(), "git": git_info()}
    llm = build_llm(cfg)
    hf_config = llm.engine.core.source.hf_config
    requests = make_requests(cfg, hf_config.vocab_size, llm.engine.tokenizer)
    warmup = make_requests(cfg, hf_config.vocab_size, llm.engine.tokenizer, cfg.seed + 1, 1)
    warm_up(llm, cfg, warmup[0])
    systems = {"pagoda": run_pagoda(llm, cfg, requests)}
    result["model"] = model_facts(llm)
    source, device, dtype = llm.engine.core.source, llm.engine.core.device, llm.engine.core.dtype
    result["environment"]["device_name"] = device_name(device)
    result["gpu"] = _gpu_extras(llm, cfg, requests) if device.type == "cuda" else {}
    max_batch = _max_concurrency(llm, requests)
    quantized = resolve_quantization(cfg.engine_kwargs.get("quantization"), source)
    info = llm.engine.model_info
    held = floor_weights(source, info.weight_bytes, info.expert_weight_bytes) \
        if quantized else None
    kv_dtype = kv_cache_torch_dtype(llm.engine.model_info.kv_cache_dtype, dtype)  # as held
    float8 = holds_float8_weights(quantized, hf_config)
    del llm
    release_memory(device)
    if cfg.compare == "hf":
        systems |= _run_references(cfg, source, dtype, device, requests)
    result["bounds"] = _bounds(systems, hf_config, dtype, device, requests, max_batch, held,
                               kv_dtype, float8)
    result |= {"config": config_dict(cfg), "workload": workload_stats(requests),
               "systems": {name: asdict(fig) for name, fig in systems.items()},
               "ratios": ratios(systems), "finished_at": _now()}
    result["environment"]["loadavg_end"] = _loadavg()
    return result


def floor_weights(source: Any, weight_bytes: int, expert_bytes: int) -> HeldWeights:
    """The weights a quantized model's floor counts: as the engine holds them (its
    `weight_bytes`, `expert_bytes` of them its routed experts'), but a GGUF file's as its
    blocks store them, the fewest bytes a step of any engine reads (pagoda holds the
    k-quants' codes with float16 scales: more bytes, which a floor of its own would
    excuse)."""
    from pagoda.bench.roofline import HeldWeights
    if source.gguf_file is None:
        return HeldWeights(weight_bytes, expert_bytes)
    from pagoda.models.loader.gguf import gguf_tensor_bytes
    stored = dict(gguf_tensor_bytes(source.gguf_file))
    return HeldWeights(sum(stored.values()),
                       sum(size for name, size in stored.items() if ".experts." in name),
                       stored.get("model.embed_tokens.weight"))


def _gpu_extras(llm: Any, cfg: ThroughputConfig, requests: list[BenchRequest]) -> dict[str, Any]:
    """GPU busy fraction (a profiled rerun) and single-stream latency, when asked."""
    from pagoda.bench.gpu_figures import gpu_busy_fraction, single_stream_latency

    extras: dict[str, Any] = {}
    if cfg.gpu_busy:
        llm.engine.core.reset_prefix_cache()
        extras["busy"] = gpu_busy_fraction(lambda: run_pagoda(llm, cfg, requests))
    if cfg.single_stream or cfg.num_prompts == 1:
        llm.engine.core.reset_prefix_cache()
        extras["single_stream"] = single_stream_latency(llm, requests[0])
    return extras


def _max_concurrency(llm: Any, requests: list[BenchRequest]) -> int:
    """Most sequences the engine can hold at once for this workload (KV and max_num_seqs)."""
    longest = max(len(r.prompt_token_ids) + r.output_len for r in requests)
    by_kv = llm.engine.model_info.kv_capacity_tokens // longest
    return max(1, min(llm.engine.core.config.scheduler.max_num_seqs, by_kv))


def _run_references(cfg: ThroughputConfig, source: Any, dtype: torch.dtype,
                    device: torch.device, requests: list[BenchRequest]) -> dict[str, Any]:
    subset = requests[:cfg.hf_num_prompts] if cfg.hf_num_prompts else requests
    model = load_hf_model(source, dtype, device, cfg.seed)
    out = {"hf": run_hf(model, cfg, subset)}
    if device.type == "cuda":
        from pagoda.bench.gpu_figures import run_hf_continuous_batching
        out["hf-cb"] = run_hf_continuous_batching(model, subset, cfg.temperature, SystemFigures)
    del model
    release_memory(device)
    return out


def _bounds(systems: dict[str, SystemFigures], hf_config: Any,
            dtype: torch.dtype, device: torch.device, requests: list[BenchRequest],
            max_batch: int, held: HeldWeights | None, kv_dtype: torch.dtype,
            float8: bool) -> dict[str, Any]:
    """Roofline floors on CUDA (of the weights as held: `held` for a quantized engine; of a
    KV cache of `kv_dtype`; with `float8`, the weights' products at the float8 rate); each
    system's fraction = floor / its elapsed time."""
    if device.type != "cuda":
        return {}
    from pagoda.bench.gpu_figures import bounds, ceilings_of, subset_floor

    found = bounds(hf_config, dtype, device, requests, max_batch, held, kv_dtype, float8)
    ceil = ceilings_of(found)
    for fig in systems.values():
        floor = subset_floor(hf_config, dtype, ceil, requests[:fig.num_requests], max_batch,
                             held, kv_dtype, float8)
        fig.fraction_of_bound["workload"] = floor / max(fig.elapsed_s, 1e-12)
    return found


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall-clock timings are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Give the freed engine's memory back before the reference loads."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ratios(systems: dict[str, SystemFigures]) -> dict[str, dict[str, float]]:
    """pagoda / reference for each throughput metric (higher is better for pagoda)."""
    ours = systems["pagoda"]
    out = {}
    for name, ref in systems.items():
        if name != "pagoda":
            out[f"pagoda_over_{name}"] = {m: getattr(ours, m) / max(getattr(ref, m), 1e-12)
                                          for m in RATIO_METRICS}
    return out


def workload_stats(requests: list[BenchRequest]) -> dict[str, Any]:
    """Counts and length statistics of the workload."""
    prompt = [len(r.prompt_token_ids) for r in requests]
    output = [r.output_len for r in requests]
    return {"num_requests": len(requests),
            "prompt_tokens": sum(prompt), "requested_output_tokens": sum(output),
            "input_len": _spread(prompt), "output_len": _spread(output)}


def _spread(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}


def config_dict(cfg: ThroughputConfig) -> dict[str, Any]:
    out = asdict(cfg)
    out.pop("command", None)
    out.pop("notes", None)
    return out


def environment() -> dict[str, Any]:
    """Where the run happened: enough to compare two result files fairly."""
    import transformers

    from pagoda import __version__

    cuda = torch.cuda.is_available()
    return {
        "device_name": None,  # of the device the engine ran on, set once it is known
        "cuda_available": cuda,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "pagoda": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "loadavg_start": _loadavg(),
        "env": recorded_environment_variables(),
    }


def recorded_environment_variables() -> dict[str, str]:
    """The variables that change how a run goes: threads, devices and pagoda's own switches
    (PAGODA_PLANE_STEP_SUMS and the like), never a secret."""
    return {name: value for name, value in sorted(os.environ.items())
            if (name in _ENV_VARS or name.startswith("PAGODA_"))
            and name not in _SECRET_ENV_VARS}


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_info() -> dict[str, Any]:
    """Commit and dirty flag of the checkout pagoda was imported from."""
    root = Path(__file__).resolve().parents[2]
    commit = _git(root, "rev-parse", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---- reporting ---------------------------------------------------------------------------------

def write_json(result: dict[str, Any], path: str | Path) -> None:
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def print_table(result: dict[str, Any], console: Any = None) -> None:
    """A concise rich table: one column per system, plus the pagoda/reference ratio."""
    from rich.console import Console
    from rich.table import Table

    systems = result["systems"]
    model = result["model"]
    table = Table(title=f"throughput: {Path(model['spec']).name} ({model['dtype']}, "
                        f"{model['device']}), {result['workload']['num_requests']} requests")
    table.add_column("metric")
    for name in systems:
        table.add_column(name, justify="right")
    ratio_cols = list(result["ratios"])
    for name in ratio_cols:
        table.add_column(name.replace("_over_", "/"), justify="right")
    for metric, fmt in _TABLE_ROWS:
        cells = [fmt.format(systems[s][metric]) for s in systems]
        cells += [f"{result['ratios'][r][metric]:.2f}x" if metric in RATIO_METRICS else ""
                  for r in ratio_cols]
        table.add_row(metric, *cells)
    console = console or Console()
    console.print(table)
    _print_engine_line(systems["pagoda"]["details"], console)
    _print_gpu_lines(result, console)


def _print_gpu_lines(result: dict[str, Any], console: Any) -> None:
    """Roofline fractions, GPU busy fraction and single-stream latency, when measured."""
    found = result.get("bounds") or {}
    if found:
        floor = found["workload_floor"]
        float8 = found.get("float8_matmul_tflops")
        console.print(f"roofline on {found['device']}: {found['bandwidth_gb_s']:.0f} GB/s, "
                      f"{found['matmul_tflops']:.0f} TFLOP/s"
                      + (f" ({float8:.0f} in float8)" if float8 else "")
                      + " measured; workload floor "
                      f"{floor['total_s']:.2f} s (prefill {floor['prefill_s']:.2f} s, decode "
                      f"{floor['decode_s']:.2f} s) at up to {found['max_batch']} sequences")
        for name, fig in result["systems"].items():
            fraction = fig["fraction_of_bound"].get("workload")
            if fraction is not None:
                console.print(f"  {name}: {100 * fraction:.1f}% of the roofline "
                              f"({fig['num_requests']} requests)")
    gpu = result.get("gpu") or {}
    if "busy" in gpu:
        console.print(f"GPU busy {100 * gpu['busy']['gpu_busy_fraction']:.1f}% of wall time "
                      f"(profiled rerun: {gpu['busy']['gpu_busy_s']:.2f} s of "
                      f"{gpu['busy']['wall_s']:.2f} s)")
    if "single_stream" in gpu:
        single = gpu["single_stream"]
        line = f"single stream: TTFT {1e3 * single['ttft_s']:.1f} ms, TPOT " \
               f"{1e3 * single['tpot_s']:.2f} ms"
        if "tpot_median_s" in single:
            line += f" (median {1e3 * single['tpot_median_s']:.2f}, " \
                    f"max {1e3 * single['tpot_max_s']:.2f})"
        if found:
            floor_tpot = found["decode1_tpot_floor_s"]
            share = 100 * floor_tpot / single["tpot_s"]
            line += f" (floor {1e3 * floor_tpot:.2f} ms: {share:.1f}% of the roofline)"
        console.print(line)


_TABLE_ROWS = (("elapsed_s", "{:.2f}"), ("requests_per_s", "{:.2f}"),
               ("output_tokens_per_s", "{:.1f}"), ("total_tokens_per_s", "{:.1f}"),
               ("prompt_tokens", "{}"), ("output_tokens", "{}"))


def _print_engine_line(details: dict[str, Any], console: Any) -> None:
    console.print(f"pagoda prefill computed {details['prefill_tokens_computed']} tokens, "
                  f"prefix-cache hits {details['cached_prompt_tokens']} tokens, "
                  f"preemptions {details['preemptions']}")


def main(cfg: ThroughputConfig, output_json: str | None = None) -> dict[str, Any]:
    """Run, print the table, write the JSON if asked; returns the result."""
    result = run_benchmark(cfg)
    print_table(result)
    if output_json:
        write_json(result, output_json)
    return result
