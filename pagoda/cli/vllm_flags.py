"""vLLM's `serve` flags that pagoda does not act on: accepted so that command lines from vLLM
guides run unchanged, each with a one-line startup note saying what pagoda does instead, or
refused on purpose where ignoring the flag would quietly serve something else than asked.

pagoda's own flags (serve.py, engine_args.py) keep vLLM's names; this table covers the rest of
the flags `vllm serve` had in vLLM 0.19.1, and older ones guides still carry.
tests/cli/data/vllm_serve_flags.tsv records that list and tests/cli/test_vllm_serve_flags.py
walks it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from pagoda.errors import ConfigError


@dataclass(frozen=True, slots=True)
class VllmFlag:
    names: tuple[str, ...]  # the long name first, then vLLM's short aliases
    arity: str  # switch | value | values (one or more) | optional | append
    reason: str  # what pagoda does instead (ignored), or why it cannot (refused)
    quiet: frozenset[str]  # values that match what pagoda does anyway: no note
    refused: bool = False  # any other value stops the command with `reason`

    @property
    def dest(self) -> str:
        return "vllm_" + self.names[0].removeprefix("--").replace("-", "_")


VLLM_FLAGS: dict[str, VllmFlag] = {}


def _add(reason: str, specs: str, quiet: tuple[str, ...] = (), refused: bool = False) -> None:
    """specs: one flag per line, `--name[/alias...] arity`; switches are quiet when off."""
    for line in specs.strip().splitlines():
        names, arity = line.split()
        quiet_values = set(quiet) | ({"false"} if arity == "switch" else set())
        flag = VllmFlag(tuple(names.split("/")), arity, reason, frozenset(quiet_values), refused)
        VLLM_FLAGS[flag.names[0]] = flag


ONE_ENGINE = ("pagoda runs engines on this machine only: one per model, or --data-parallel-size "
              "replicas, each split by --tensor-parallel-size and --pipeline-parallel-size "
              "(whose ranks span a Ray cluster's nodes with --distributed-executor-backend ray)")
_add(ONE_ENGINE, """
--decode-context-parallel-size/-dcp value
--prefill-context-parallel-size/-pcp value""", quiet=("1",))
_add(ONE_ENGINE, """
--master-addr value
--master-port value
--distributed-timeout-seconds value
--dcp-comm-backend value
--dcp-kv-cache-interleave-size value
--cp-kv-cache-interleave-size value
--data-parallel-rank/-dpn value
--data-parallel-start-rank/-dpr value
--data-parallel-size-local/-dpl value
--data-parallel-address/-dpa value
--data-parallel-rpc-port/-dpp value
--data-parallel-backend/-dpb value
--data-parallel-hybrid-lb/-dph switch
--data-parallel-external-lb/-dpe switch
--disable-nccl-for-dp-synchronization switch
--ray-workers-use-nsight switch
--worker-use-ray switch
--engine-use-ray switch
--api-server-count/-asc value""", quiet=("1",))
_add("pagoda has no custom all-reduce kernel", "--disable-custom-all-reduce switch")
MULTI_NODE = ("pagoda serves across nodes on a Ray cluster only (--distributed-executor-backend "
              "ray); this machine would serve alone")
_add(MULTI_NODE, """
--nnodes/-n value""", quiet=("1",), refused=True)
_add(MULTI_NODE, """
--node-rank/-r value""", quiet=("0",), refused=True)
_add("pagoda always runs an API server with its engine", "--headless switch", refused=True)
_add("with --enable-expert-parallel, experts are split evenly over the tensor-parallel ranks; "
     "pagoda has no other expert-parallel options", """
--enable-ep-weight-filter switch
--all2all-backend value
--enable-dbo switch
--ubatch-size value
--enable-elastic-ep switch
--dbo-decode-token-threshold value
--dbo-prefill-token-threshold value
--enable-eplb switch
--eplb-config value
--expert-placement-strategy value
--moe-backend value
--enable-return-routed-experts switch""")
_add("weights load in one pass, straight to the device", """
--max-parallel-loading-workers value
--safetensors-load-strategy value
--model-loader-extra-config value
--pt-load-map-location value
--use-tqdm-on-load switch
--ignore-patterns values""")
_add("weights stay on the device; nothing is offloaded to CPU memory", """
--cpu-offload-gb value
--kv-offloading-size value""", quiet=("0", "0.0"))
_add("weights stay on the device; nothing is offloaded to CPU memory", """
--cpu-offload-params values
--offload-params values
--offload-backend value
--offload-group-size value
--offload-num-in-group value
--offload-prefetch-step value
--kv-offloading-backend value""")
_add("preempted requests are recomputed from their prompt and output, not swapped to CPU",
     "--swap-space value")
_add("preempted requests are recomputed from their prompt and output, not swapped to CPU",
     "--preemption-mode value", quiet=("recompute",))
_add("pagoda has one block manager (what v2 was); the flag is a no-op in vLLM too",
     "--use-v2-block-manager switch", quiet=("true",))
_add("pagoda has no cascade attention", "--disable-cascade-attn switch", quiet=("true",))
_add("pagoda always groups layers by attention window (one block table each)",
     "--disable-hybrid-kv-cache-manager switch")
_add("sliding-window layers keep their window; set --max-model-len to cap the context",
     "--disable-sliding-window switch")
_add("chunked prefill is always on (--max-num-batched-tokens is the chunk)",
     "--enable-chunked-prefill switch", quiet=("true",))
_add("pagoda schedules with one policy: chunked prefill under one token budget", """
--max-num-partial-prefills value
--max-long-partial-prefills value
--long-prefill-token-threshold value
--scheduler-reserve-full-isl switch
--scheduler-delay-factor value
--num-lookahead-slots value
--disable-chunked-mm-input switch
--stream-interval value
--num-scheduler-steps value
--multi-step-stream-outputs switch
--disable-async-output-proc switch""", quiet=("0", "0.0", "1"))
_add("CUDA graphs capture decode batches up to --max-num-seqs, CPU plans up to 32 "
     "(--enforce-eager turns them off)",
     """
--cudagraph-capture-sizes values
--cuda-graph-sizes values
--max-cudagraph-capture-size value
--max-seq-len-to-capture value
--max-context-len-to-capture value
--compilation-config/-cc value
--optimization-level value
--performance-mode value""")
_add("pagoda chooses its kernels itself (--attention-backend torch|triton)", """
--attention-config/-ac value
--kernel-config value
--enable-flashinfer-autotune switch
--gdn-prefill-backend value
--override-attention-dtype value
--additional-config value""")
_add("a float8 KV cache (--kv-cache-dtype fp8) holds every layer, unscaled (a scale of 1.0)", """
--calculate-kv-scales switch
--kv-cache-dtype-skip-layers values""")
_add("the KV cache is stored in the model's dtype (or bfloat16, float8: --kv-cache-dtype)", """
--kv-sharing-fast-prefill switch
--mamba-cache-dtype value
--mamba-ssm-cache-dtype value
--mamba-block-size value
--mamba-cache-mode value""")
_add("the KV cache is sized by --kv-cache-memory or --gpu-memory-utilization",
     "--num-gpu-blocks-override value")
_add("prefix blocks are hashed with pagoda's own chained hash",
     "--prefix-caching-hash-algo value", quiet=("sha256", "sha256_cbor"))
_add("every --quantization format pagoda reads is current", """
--allow-deprecated-quantization switch""", quiet=("true",))
_add("there is no speculative decoding", """
--speculative-config/-sc value
--speculative-model value
--num-speculative-tokens value""")
_add("prefill and decode run in this one server; no KV is sent elsewhere", """
--kv-transfer-config value
--ec-transfer-config value""", refused=True)
_add("no KV cache events are published", "--kv-events-config value")
_add("these LoRA options have no pagoda counterpart", """
--enable-tower-connector-lora switch
--fully-sharded-loras switch
--lora-target-modules values
--default-mm-loras value
--specialize-active-lora switch
--enable-lora-bias switch
--long-lora-scaling-factors value""")
_add("pagoda serves text-generating models only (no pooling or embedding runner)", """
--runner value""", quiet=("auto", "generate"), refused=True)
_add("pagoda serves text-generating models only (no pooling or embedding runner)", """
--convert value""", quiet=("auto", "none"), refused=True)
_add("pagoda serves text-generating models only (no pooling or embedding runner)", """
--task value""", quiet=("auto", "generate"), refused=True)
_add("pagoda serves text-generating models only (no pooling or embedding runner)",
     "--pooler-config value")
_add("models are text-only; no images, audio or video are read", """
--allowed-local-media-path value
--allowed-media-domains values
--limit-mm-per-prompt value
--enable-mm-embeds switch
--media-io-kwargs value
--mm-processor-kwargs value
--mm-processor-cache-gb value
--mm-processor-cache-type value
--mm-shm-cache-max-object-size-mb value
--mm-encoder-only switch
--mm-encoder-tp-mode value
--mm-encoder-attn-backend value
--interleave-mm-strings switch
--skip-mm-profiling switch
--video-pruning-rate value
--mm-tensor-ipc value
--disable-mm-preprocessor-cache switch
--enable-prompt-embeds switch""")
_add("models are text-only; no images, audio or video are read",
     "--language-model-only switch", quiet=("true",))
_add("this would change the model itself; edit its config.json instead", """
--hf-overrides value
--rope-scaling value
--rope-theta value""", refused=True)
_add("models come from a local path or `pagoda pull`; there is no hub download", """
--revision value
--code-revision value
--tokenizer-revision value
--download-dir value
--hf-token optional
--hf-config-path value""")
_add("config.json is read as a Hugging Face config", "--config-format value",
     quiet=("auto", "hf"))
_add("pagoda runs its own model implementations", "--model-impl value", quiet=("auto", "vllm"))
_add("pagoda runs its own worker and scheduler", "--worker-cls value", quiet=("auto",))
_add("pagoda runs no plugin code from the command line", """
--worker-extension-cls value
--scheduler-cls value
--tool-parser-plugin value
--reasoning-parser-plugin value
--logits-processors values
--io-processor-plugin value
--middleware append""", refused=True)
_add("the tokenizer is loaded with transformers (or from the GGUF)", "--tokenizer-mode value",
     quiet=("auto", "hf", "slow"))
_add("the tokenizer is loaded with transformers (or from the GGUF)", """
--tokenizer-pool-size value
--tokenizer-pool-type value
--renderer-num-workers value""", quiet=("0", "1"))
_add("the tokenizer is always loaded: prompts are text or token ids",
     "--skip-tokenizer-init switch")
_add("requests run with their own sampling parameters; generation_config.json is not read",
     "--generation-config value", quiet=("vllm",))
_add("requests run with their own sampling parameters; generation_config.json is not read",
     "--override-generation-config value")
_add("logprobs are those of the processed distribution, up to 20 per token", """
--max-logprobs value
--logprobs-mode value""", quiet=("20", "processed_logprobs"))
_add("chat messages' content parts are joined as text", "--chat-template-content-format value",
     quiet=("auto", "string"))
_add("requests pass chat_template_kwargs themselves", "--default-chat-template-kwargs value")
_add("assistant replies have the role `assistant`", "--response-role value",
     quiet=("assistant",))
_add("tool definitions always reach the chat template",
     "--exclude-tools-when-tool-choice-none switch")
_add("pagoda has no built-in tool server", "--tool-server value")
_add("reasoning is split by --reasoning-parser", """
--reasoning-config value
--enable-reasoning switch
--structured-outputs-config value
--guided-decoding-backend value""", quiet=("auto", "xgrammar", "true"))
_add("responses carry text; logprobs carry token strings", """
--return-tokens-as-token-ids switch
--tokens-only switch""")
_add("usage is reported as OpenAI reports it", """
--enable-prompt-tokens-details switch
--enable-force-include-usage switch""")
_add("pagoda logs one line per request (--disable-log-requests) and its own startup lines", """
--log-config-file value
--max-log-len value
--enable-log-outputs switch
--enable-log-deltas switch
--log-error-stack switch
--enable-logging-iteration-details switch
--aggregate-engine-logging switch""")
_add("pagoda logs no periodic throughput lines; /metrics has the figures",
     "--disable-log-stats switch", quiet=("true",))
_add("/metrics serves pagoda's fixed set of vllm:* metrics", """
--show-hidden-metrics-for-version value
--kv-cache-metrics switch
--kv-cache-metrics-sample value
--cudagraph-metrics switch
--enable-mfu-metrics switch
--enable-server-load-tracking switch""")
_add("there is no tracing or profiling endpoint", """
--otlp-traces-endpoint value
--collect-detailed-traces values
--enable-layerwise-nvtx-tracing switch
--profiler-config value""")
_add("the server listens on TCP (--host, --port); no unix socket", "--uds value",
     refused=True)
_add("pagoda serves plain HTTP; put a TLS-terminating proxy in front", """
--ssl-keyfile value
--ssl-certfile value
--ssl-ca-certs value
--ssl-cert-reqs value
--ssl-ciphers value
--enable-ssl-refresh switch""", refused=True)
_add("pagoda sends no CORS headers", """
--allow-credentials switch
--allowed-origins value
--allowed-methods value
--allowed-headers value""")
_add("the API is served at the root path", "--root-path value")
_add("uvicorn writes no access log (--uvicorn-log-level warning)", """
--disable-uvicorn-access-log switch
--disable-access-log-for-endpoints value""", quiet=("true",))
_add("HTTP limits are --max-request-body and the server's own", """
--h11-max-incomplete-event-size value
--h11-max-header-count value""")
_add("responses carry their request id in the body", "--enable-request-id-headers switch")
_add("pagoda serves no /docs pages", """
--disable-fastapi-docs switch
--enable-offline-docs switch""", quiet=("true",))
_add("the tokenizer endpoints are /tokenize and /detokenize",
     "--enable-tokenizer-info-endpoint switch")
_add("models sleep and wake in multi-model serving (--config) on their own",
     "--enable-sleep-mode switch", quiet=("true",))
_add("weights are only loaded, never updated at run time", "--weight-transfer-config value")
_add("the engine runs in its own process already", "--disable-frontend-multiprocessing switch")
_add("no environment variables are validated", "--fail-on-environ-validation switch",
     quiet=("true",))


def add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    """Register every table flag the parser does not define itself (hidden from --help)."""
    taken = parser._option_string_actions  # argparse keeps no public view of its options
    for flag in VLLM_FLAGS.values():
        names = [n for n in flag.names if n not in taken]
        if names != list(flag.names):
            continue  # a flag of pagoda's own wins
        kwargs: dict = {"dest": flag.dest, "default": None, "help": argparse.SUPPRESS}
        if flag.arity == "switch":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif flag.arity == "values":
            kwargs["nargs"] = "+"
        elif flag.arity == "optional":
            kwargs.update(nargs="?", const="")
        elif flag.arity == "append":
            kwargs["action"] = "append"
        parser.add_argument(*names, **kwargs)


def _given(args: argparse.Namespace) -> list[tuple[VllmFlag, str]]:
    """The table flags given on this command line, with their values as text."""
    given = []
    for flag in VLLM_FLAGS.values():
        value = getattr(args, flag.dest, None)
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list):
            text = " ".join(map(str, value))
        else:
            text = str(value)
        if text.lower() not in flag.quiet:
            given.append((flag, text))
    return given


def _shown(flag: VllmFlag, text: str) -> str:
    if flag.arity == "switch":
        return flag.names[0] if text == "true" else "--no-" + flag.names[0][2:]
    return f"{flag.names[0]} {text}".rstrip()


def vllm_flag_notes(args: argparse.Namespace) -> list[str]:
    """One line per vLLM flag given that pagoda does not act on; refused flags raise."""
    notes = []
    for flag, text in _given(args):
        if flag.refused:
            raise ConfigError(f"{_shown(flag, text)} is not supported: {flag.reason}")
        notes.append(f"{_shown(flag, text)} ignored: {flag.reason}")
    return notes
