"""Test helpers shared across test modules."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import torch


def save_random_checkpoint(config, path: Path, tokenizer_dir: Path | None, seed: int = 0,
                           original_format: bool = True) -> Path:
    """A random-weight HF checkpoint (safetensors + config [+ tokenizer]) for any config;
    `original_format` False: tensors as transformers 5 holds them (packed experts)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, save_original_format=original_format)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     "special_tokens_map.json"):
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, path / name)
    return path


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    """A real `pagoda serve` subprocess on a free loopback port."""

    def __init__(self, model: str, *args: str, env: dict[str, str] | None = None,
                 startup_timeout: float = 240.0) -> None:
        import sys
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "pagoda.cli.main", "serve", model, "--host", "127.0.0.1",
               "--port", str(self.port), *args]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"pagoda-serve-{self.port}.log",
                        "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> None:
        import time

        import httpx
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def engine_pids(self) -> list[int]:
        """The server's engine-core children (multiprocessing's helpers excluded)."""
        pids = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"spawn_main" in cmdline:
                    pids.append(int(pid))
        return pids

    def client(self, **kwargs):
        import openai
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "none"),
                             max_retries=0, **kwargs)

    def async_client(self, **kwargs):
        import openai
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1",
                                  api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)

    def stop(self, sig: int | None = None, timeout: float = 60.0) -> int:
        import signal
        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def tiny_chat_model(path: Path, tokenizer_dir: Path, **config_overrides) -> Path:
    """A random-weight Llama small enough to start in about a second, with SmolLM2's
    tokenizer and chat template, so the server's whole surface works on it."""
    from transformers import LlamaConfig
    config = LlamaConfig(**{**dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=True), **config_overrides})
    return save_random_checkpoint(config, path, tokenizer_dir)


@contextlib.contextmanager
def logged_messages(logger_name: str) -> Iterator[list[str]]:
    """The INFO-and-above messages `logger_name` emits within the block (caught at the logger
    itself: pagoda's tree does not propagate to the root once an entry point configured it)."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


RAY_NODE_START_TIMEOUT_S = 60.0


@contextlib.contextmanager
def local_ray_cluster(head: list[str], *others: list[str],
                      env: dict[str, str] | None = None) -> Iterator[str]:
    """Ray nodes on this machine, each one `ray start --block` process with its own
    arguments (`head`: the head node's); yields the head's address. Every node ends with the
    block, even after a failure (a terminated `ray start --block` ends its node's processes)."""
    import sys
    import tempfile
    import time

    import pytest
    port = free_port()
    # short: Ray's socket paths live under it and must fit a unix socket's 107 bytes
    temp = Path(tempfile.mkdtemp(prefix="pgray", dir="/tmp"))
    ray = [sys.executable, "-m", "ray.scripts.scripts"]  # Ray's CLI, with or without its script
    environ = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    common = ["--object-store-memory=80000000", "--disable-usage-stats"]
    nodes: list[subprocess.Popen] = []

    def start(args: list[str], log: Path) -> None:
        with log.open("wb") as out:
            nodes.append(subprocess.Popen([*ray, "start", "--block", *common, *args],
                                          stdout=out, stderr=subprocess.STDOUT, env=environ))
        deadline = time.monotonic() + RAY_NODE_START_TIMEOUT_S
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if nodes[-1].poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`ray start` failed:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    try:
        start(["--head", f"--port={port}", f"--temp-dir={temp}", *head], temp / "head.log")
        for n, args in enumerate(others, 1):
            start([f"--address=127.0.0.1:{port}", *args], temp / f"node{n}.log")
        yield f"127.0.0.1:{port}"
    finally:
        for node in reversed(nodes):
            node.terminate()
            try:
                node.wait(20)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        shutil.rmtree(temp, ignore_errors=True)


def interpreter_report(module: str, marker: str) -> dict:
    """Run `python -m module` under Triton's CPU interpreter (TRITON_INTERPRET=1 must be set
    before triton is imported, hence a subprocess) and return the JSON it printed on its line
    starting with `marker`."""
    import json
    import sys
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", module], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith(marker))
    return json.loads(line.removeprefix(marker))


def compile_for_cuda(kernel, signature: dict, constants: dict, capability: int = 90,
                     divisible: tuple[str, ...] = (), **options) -> dict:
    """Compile a Triton kernel for a CUDA compute capability (90: the H200's; 80: an
    A100's) with no GPU (Triton's own ptxas) and return its assembly by stage ("ptx",
    "cubin", ...): type errors the interpreter lets through (a dot of mixed dtypes, a type
    the architecture lacks) fail here. `signature` types the runtime arguments; pointers,
    and the integers named in `divisible`, are taken as multiples of 16, as Triton
    specializes them at run time (so that vector loads and pipelined copies are compiled as
    on the GPU); `options` as a launch's (num_warps, num_stages)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    aligned = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]]
               for name, kind in signature.items() if kind.startswith("*") or name in divisible}
    source = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constants,
                                                                            "constexpr")},
                       constexprs=constants, attrs=aligned)
    asm = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options).asm
    assert asm["cubin"]
    return asm


def pick_cpu_kernel_build(module, request, monkeypatch) -> str:
    """Point a C++ CPU kernel module of pagoda.layers (its VARIABLE and cached _library) at
    the build request.param for one test, skipping the test where that build does not run
    here; the next load after the test picks again."""
    import pytest
    monkeypatch.setenv(module.VARIABLE, request.param)
    module._library.cache_clear()
    request.addfinalizer(module._library.cache_clear)
    if module._library() is None:
        pytest.skip(f"the {request.param} build does not run here")
    return request.param


def on_thread_counts(call, counts: tuple[int, ...] = (1, 2)) -> list:
    """call()'s result with torch on each thread count of `counts` in turn (the caller's
    count restored after): the CPU kernels split work by torch.get_num_threads()."""
    threads = torch.get_num_threads()
    try:
        results = []
        for count in counts:
            torch.set_num_threads(count)
            results.append(call())
        return results
    finally:
        torch.set_num_threads(threads)
