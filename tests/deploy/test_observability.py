"""The dashboard and the alert rules against the real thing: promtool checks the rules and
configs, and a real Prometheus (Debian's) scrapes a live `pagoda serve`; after some traffic every
PromQL expression of the dashboard and every alert's measure returns data through Prometheus's
HTTP API, so no panel or rule names a metric pagoda does not export."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.tools import DEPLOY, system_tool
from tests.utils import RemoteServer, free_port

ALERTS = DEPLOY / "observability" / "prometheus" / "alerts.yaml"
DASHBOARD = DEPLOY / "observability" / "grafana" / "dashboards" / "pagoda.json"
PROMETHEUS_CONFIGS = (DEPLOY / "compose" / "prometheus.yml",
                      DEPLOY / "observability" / "prometheus" / "kubernetes.yml")
HOW = "apt-get install prometheus (make deploy-tools does, as root)"
MODEL = "smollm2"
THRESHOLD = re.compile(r"^(?P<measure>.*?)\s*(==|!=|>=|<=|>|<)\s*[0-9.]+\s*$", re.S)


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([system_tool("promtool", HOW), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_promtool_accepts_the_alert_rules():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_promtool_rejects_a_broken_rule(tmp_path):
    broken = yaml.safe_load(ALERTS.read_text())
    broken["groups"][0]["rules"][0]["expr"] = "sum by (model_name (up)"
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(broken))
    assert promtool("check", "rules", str(tmp_path / "alerts.yaml")).returncode != 0


@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS, ids=lambda p: p.parent.name)
def test_promtool_accepts_the_scrape_configs(config, tmp_path):
    text = config.read_text().replace("/etc/prometheus/alerts.yaml", "alerts.yaml")
    (tmp_path / "prometheus.yml").write_text(text)
    (tmp_path / "alerts.yaml").write_text(ALERTS.read_text())
    result = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def dashboard_expressions() -> list[str]:
    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))
    board = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in panels(board["panels"])
            for target in panel.get("targets", [])]


def alert_measures() -> dict[str, str]:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    return {rule["alert"]: THRESHOLD.match(rule["expr"]).group("measure") for rule in rules}


def test_dashboard_has_the_panels_the_issue_lists():
    board = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in board["panels"]}
    assert {"Request rate", "Output tokens/s", "Time to first token", "Time per output token",
            "Inter-token latency", "End-to-end latency", "Running and waiting requests",
            "KV cache usage", "Prefix-cache hit rate", "Preemptions",
            "Sleep / wake events"} <= titles
    rows = [p for p in board["panels"] if p["type"] == "row" and p.get("repeat") == "model_name"]
    assert rows, "a row repeated per model"
    assert set(alert_measures()) == {"PagodaEngineDown", "PagodaQueueGrowing",
                                     "PagodaKVCacheSaturated", "PagodaErrorRate",
                                     "PagodaTTFTOverObjective"}


# ---- a live Prometheus scraping a live pagoda ----------------------------------------------------

@pytest.fixture(scope="module")
def server(smollm2_dir):
    srv = RemoteServer(str(smollm2_dir), "--served-model-name", MODEL, "--max-model-len", "1024",
                       "--kv-cache-memory", "64MiB", "--max-num-seqs", "8")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    binary = system_tool("prometheus", HOW)
    workdir = tmp_path_factory.mktemp("prometheus")
    (workdir / "alerts.yaml").write_text(ALERTS.read_text())
    (workdir / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yaml"],
        "scrape_configs": [{"job_name": "pagoda",
                            "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}]}]}))
    port = free_port()
    log = open(workdir / "prometheus.log", "w+")
    proc = subprocess.Popen([binary, "--config.file=prometheus.yml", "--storage.tsdb.path=data",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(f"{url}/-/ready", timeout=1).status_code == 200, 60,
                 lambda: (workdir / "prometheus.log").read_text()[-2000:])
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def wait_for(condition, timeout: float, explain=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"not within {timeout}s\n{explain()}")


def query(url: str, expr: str) -> list:
    reply = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30).json()
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


def send_traffic(server) -> None:
    async def one(client, i):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=6, temperature=0.7, seed=i, stream=True)
        async for _ in stream:
            pass

    async def run():
        client = server.async_client()
        await asyncio.gather(*(one(client, i) for i in range(4)))  # same prompt: prefix hits
    asyncio.run(run())


@pytest.fixture(scope="module")
def scraped_after_traffic(server, prometheus):
    wait_for(lambda: query(prometheus, 'up{job="pagoda"} == 1'), 60)
    send_traffic(server)
    served = httpx.get(f"{server.url}/metrics").text
    finished = re.search(r'vllm:e2e_request_latency_seconds_count\{model_name="smollm2"\} (\S+)',
                         served).group(1)
    counted = f'vllm:e2e_request_latency_seconds_count{{model_name="{MODEL}"}} >= {finished}'
    wait_for(lambda: query(prometheus, counted), 60)
    time.sleep(2)  # a couple more scrapes, so rates have two samples after the traffic
    return prometheus


def test_every_dashboard_expression_returns_data(scraped_after_traffic):
    empty = []
    for expr in dashboard_expressions():
        concrete = expr.replace("$__rate_interval", "1m").replace("$model_name", MODEL)
        if not query(scraped_after_traffic, concrete):
            empty.append(expr)
    assert not empty, f"{len(empty)} panel queries return nothing:\n" + "\n".join(empty)


def test_every_alert_measure_returns_data_and_prometheus_evaluates_the_rules(scraped_after_traffic):
    empty = [name for name, measure in alert_measures().items()
             if not query(scraped_after_traffic, measure)]
    assert not empty, empty
    wait_for(lambda: all(rule.get("lastEvaluation", "").startswith("2")
                         for rule in rules(scraped_after_traffic)), 30)
    assert {rule["health"] for rule in rules(scraped_after_traffic)} == {"ok"}
    assert not query(scraped_after_traffic, 'ALERTS{alertname="PagodaEngineDown"}')


def rules(url: str) -> list[dict]:
    groups = httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_a_missing_metric_would_be_caught(scraped_after_traffic):
    assert not query(scraped_after_traffic, "rate(vllm:no_such_metric_total[1m])")
