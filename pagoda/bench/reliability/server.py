"""A `pagoda serve` subprocess the suite can load, signal and watch."""

from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from pagoda.bench.http_overhead import wait_healthy

_METRIC = re.compile(r"^(vllm:[a-z_]+)(?:\{[^}]*\})? ([0-9.eE+-]+|NaN)$")
_BUCKET = re.compile(r'^(vllm:[a-z_]+)_bucket\{[^}]*le="([^"]+)"[^}]*\} ([0-9.eE+-]+)$')
RESIDUE_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting",
                   "vllm:kv_cache_usage_perc")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`pagoda serve MODEL... ARGS` on a free loopback port, its output in `log_path`."""

    def __init__(self, models: list[str], args: list[str], log_path: Path,
                 startup_timeout: float = 600.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "pagoda.cli.main", "serve", *models, "--host", "127.0.0.1",
               "--port", str(self.port), "--disable-log-requests", *args]
        self.command = " ".join(cmd[1:])
        self._log = open(log_path, "a")
        self._log.write(f"$ {self.command}\n")
        self._log.flush()
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        atexit.register(self._kill)  # the suite interrupted: leave no server behind
        started = time.monotonic()
        wait_healthy(self.proc, self.url, startup_timeout)
        self.startup_s = time.monotonic() - started

    def get(self, path: str, timeout: float = 10.0) -> Any:
        return httpx.get(f"{self.url}{path}", timeout=timeout).json()

    def engine_pid(self) -> int:
        return int(self.get("/pagoda/ps")["models"][0]["engine_pid"])

    def status(self, path: str = "/health") -> int | None:
        """The HTTP status of a GET, None when nothing answers."""
        try:
            return httpx.get(f"{self.url}{path}", timeout=2).status_code
        except httpx.HTTPError:
            return None

    def metrics(self, names: tuple[str, ...] = RESIDUE_METRICS) -> dict[str, float]:
        """These series' values from /metrics, each summed over its labels (models)."""
        return series_values(self._scrape(), names)

    def snapshot(self, series: tuple[str, ...], histograms: tuple[str, ...]
                 ) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
        """These series' values and these histograms' buckets from one scrape (so that both
        describe the same moment)."""
        text = self._scrape()
        return series_values(text, series), histogram_buckets(text, histograms)

    def _scrape(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Poll /metrics until running, waiting and KV usage are 0 (or the timeout)."""
        deadline = time.monotonic() + timeout
        values = self.metrics()
        while any(values.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
            values = self.metrics()
        return values

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def series_values(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Each of these series' values in a /metrics text, summed over its labels (models)."""
    values = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        match = _METRIC.match(line)
        if match and match.group(1) in values:
            values[match.group(1)] += float(match.group(2))
    return values


def histogram_buckets(text: str, names: tuple[str, ...]) -> dict[str, dict[float, float]]:
    """Each of these histograms' cumulative counts by bucket bound (+inf the total) in a
    /metrics text, summed over their other labels (models)."""
    counts: dict[str, dict[float, float]] = {name: {} for name in names}
    for line in text.splitlines():
        match = _BUCKET.match(line)
        if match and match.group(1) in counts:
            buckets = counts[match.group(1)]
            bound = float(match.group(2))
            buckets[bound] = buckets.get(bound, 0.0) + float(match.group(3))
    return counts
