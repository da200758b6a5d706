"""Several models behind one real `pagoda serve`, driven by the official openai client:
routing by model, replicas, keep_alive, sleep and wake under a memory limit that holds only
one model, a bounded waiting room, and one model's engine dying without hurting the other."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from pagoda import LLM, SamplingParams
from pagoda.cli.main import main
from tests.utils import RemoteServer, tiny_chat_model

PROMPTS = ["The capital of France is", "Water boils at", "One, two, three,"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny"), smollm2_dir)


@pytest.fixture(scope="module")
def expected(smollm2_dir, tiny_dir) -> dict[str, dict[str, str]]:
    """Greedy completions of each model run alone, offline (SmolLM2 also dequantized:
    "smollm2-none", as the swap fleet serves it)."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    texts = {}
    for name, path, options in (("smollm2", smollm2_dir, {}), ("tiny", tiny_dir, {}),
                                ("smollm2-none", smollm2_dir, {"quantization": "none"})):
        llm = LLM(str(path), max_model_len=256, kv_cache_memory=32 << 20, **options)
        texts[name] = {p: o.outputs[0].text for p, o in zip(PROMPTS, llm.generate(PROMPTS, params))}
        del llm
    return texts


def models_file(tmp_path, text: str) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return f"--config={path}"


def complete(client: openai.OpenAI, model: str, prompt: str, **extra) -> str:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                    temperature=0, extra_body=extra or None)
    return out.choices[0].text


def ps(server: RemoteServer) -> dict[str, dict]:
    rows = httpx.get(f"{server.url}/pagoda/ps", timeout=10).json()["models"]
    return {r["model"] if r["replica"] == 0 else f"{r['model']}#{r['replica']}": r for r in rows}


def wait_for(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# ---- two models side by side ---------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory, smollm2_dir, tiny_dir):
    config = models_file(tmp_path_factory.mktemp("pair"), f"""
defaults: {{max_model_len: 256}}
models:
  - {{model: {smollm2_dir}, name: smol, aliases: [gpt-4o-mini]}}
  - {{model: {tiny_dir}, name: tiny, replicas: 2}}
""")
    server = RemoteServer(config)
    yield server
    server.stop()


def test_models_lists_every_name_with_its_state(pair):
    cards = {m.id: m for m in pair.client().models.list().data}
    assert set(cards) == {"smol", "gpt-4o-mini", "tiny"}
    assert all(card.model_extra["state"] == "loaded" for card in cards.values())
    assert cards["gpt-4o-mini"].model_extra["parent"] == "smol"


def test_pagoda_ps_and_the_memory_plan(pair, capsys):
    assert main(["ps", "--url", pair.url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "DEVICE", "STATE"]
    assert {line.split()[0] for line in lines[1:]} == {"smol", "tiny", "tiny#1"}
    assert all(" cpu " in line and "loaded" in line for line in lines[1:])
    plan = httpx.get(f"{pair.url}/pagoda/plan").json()["devices"]
    assert [d["device"] for d in plan] == ["cpu"]
    entries = plan[0]["models"]
    assert sorted((e["model"], e["replica"]) for e in entries) == [
        ("smol", 0), ("tiny", 0), ("tiny", 1)]
    assert all(e["measured"] and e["kv_bytes"] > 0 for e in entries)
    assert plan[0]["used_bytes"] == sum(e["resident_bytes"] for e in entries)
    assert main(["ps", "--url", "http://127.0.0.1:1"]) == 1  # nobody there: a clear error


def test_interleaved_requests_answer_as_each_model_alone(pair, expected):
    client = pair.client()
    jobs = [(model, prompt) for prompt in PROMPTS for model in ("smol", "tiny", "gpt-4o-mini")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda job: complete(client, *job), jobs))
    for (model, prompt), text in zip(jobs, texts, strict=True):
        assert text == expected["tiny" if model == "tiny" else "smollm2"][prompt]
    chat = client.chat.completions.create(model="tiny", max_tokens=4,
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.model == "tiny" and chat.choices[0].finish_reason in ("length", "stop")


def test_replicas_share_load_and_keep_a_prefix_together(pair):
    client = pair.client()
    before = ps(pair)
    assert before["tiny"]["state"] == before["tiny#1"]["state"] == "loaded"
    assert before["tiny"]["engine_pid"] != before["tiny#1"]["engine_pid"]
    with ThreadPoolExecutor(8) as pool:  # unrelated prompts, all at once: both replicas work
        list(pool.map(lambda i: complete(client, "tiny", f"story {i}: " + "word " * 40),
                      range(8)))
    spread = ps(pair)
    assert all(spread[r]["requests_routed"] > before[r]["requests_routed"]
               for r in ("tiny", "tiny#1"))
    system = "You are a careful assistant who answers briefly. " * 6  # > 4 prefix blocks
    for question in ("a?", "b?", "c?", "d?"):  # one after another: the prefix holder wins
        complete(client, "tiny", system + question)
    after = ps(pair)
    grew = sorted(after[r]["requests_routed"] - spread[r]["requests_routed"]
                  for r in ("tiny", "tiny#1"))
    assert grew == [0, 4]


def test_bad_model_names_and_keep_alive_get_clear_errors(pair):
    client = pair.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        complete(client, "nope", "hi")
    r = httpx.post(f"{pair.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 400 and "several models" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="keep_alive"):
        complete(client, "smol", "hi", keep_alive="soonish")


def test_keep_alive_zero_unloads_and_the_next_request_reloads(pair, expected):
    client = pair.client()
    assert complete(client, "tiny", PROMPTS[0], keep_alive=0) == expected["tiny"][PROMPTS[0]]
    wait_for(lambda: ps(pair)["tiny"]["state"] == "unloaded")
    assert ps(pair)["smol"]["state"] == "loaded"  # only the one it was asked of
    assert complete(client, "tiny", PROMPTS[1], keep_alive="5m") == expected["tiny"][PROMPTS[1]]
    row = ps(pair)["tiny"]
    assert row["state"] == "loaded" and 250 < row["expires_in_seconds"] <= 300


def test_pagoda_stop_unloads_a_model_and_the_next_request_reloads_it(pair, expected, capsys):
    complete(pair.client(), "tiny", PROMPTS[0])
    assert main(["stop", "tiny", "--url", pair.url]) == 0
    assert capsys.readouterr().out.strip() == "stopped tiny"
    rows = ps(pair)
    assert rows["tiny"]["state"] == "unloaded" and rows["tiny"]["idle_seconds"] is None
    assert rows["smol"]["state"] == "loaded"
    assert main(["stop", "nope", "--url", pair.url]) == 1
    assert "`nope` does not exist" in capsys.readouterr().err
    assert complete(pair.client(), "tiny", PROMPTS[1]) == expected["tiny"][PROMPTS[1]]


def test_one_engine_dying_leaves_the_other_model_serving(pair, expected):
    client = pair.client()
    os.kill(ps(pair)["smol"]["engine_pid"], signal.SIGKILL)
    assert complete(client, "tiny", PROMPTS[2]) == expected["tiny"][PROMPTS[2]]
    wait_for(lambda: ps(pair)["smol"]["state"] == "unloaded")
    assert "engine died" in ps(pair)["smol"]["error"]
    assert complete(client, "smol", PROMPTS[2]) == expected["smollm2"][PROMPTS[2]]  # reloaded
    assert httpx.get(f"{pair.url}/health").status_code == 200


# ---- two models, memory for one ------------------------------------------------------------
@pytest.fixture(scope="module")
def swap(tmp_path_factory, smollm2_dir):
    # each copy holds 0.66 GiB awake plus its KV; asleep on CPU it keeps its 0.5 GiB of
    # weights (dequantized to float32): 1.3 GiB fits one awake and one asleep, never both
    config = models_file(tmp_path_factory.mktemp("swap"), f"""
memory_limit: 1.3GiB
defaults: {{max_model_len: 256, quantization: none}}
models:
  - {{model: {smollm2_dir}, name: a}}
  - {{model: {smollm2_dir}, name: b}}
""")
    server = RemoteServer(config)
    yield server
    server.stop()


def test_only_one_fits_so_alternate_requests_sleep_and_wake(swap, expected):
    client = swap.client()
    for i, model in enumerate("baba"):  # a was loaded at startup
        prompt = PROMPTS[i % len(PROMPTS)]
        assert complete(client, model, prompt) == expected["smollm2-none"][prompt]
        states = {name: row["state"] for name, row in ps(swap).items()}
        assert states == {model: "loaded", "ab".replace(model, ""): "sleeping"}
    rows = ps(swap)
    assert rows["a"]["wake_seconds"] is not None and rows["b"]["wake_seconds"] is not None
    events = model_events(swap)  # a woke twice and b once; each slept before the other woke
    assert events["a", "wake"] >= 2 and events["b", "wake"] >= 1
    assert events["a", "sleep"] >= 2 and events["b", "sleep"] >= 1
    assert events["a", "load"] >= 1 and events["b", "load"] >= 1
    assert events["a", "unload"] == events["b", "unload"] == 0
    plan = httpx.get(f"{swap.url}/pagoda/plan").json()["devices"][0]
    assert plan["used_bytes"] <= plan["budget_bytes"] == int(1.3 * 2**30)


def model_events(server) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(f"{server.url}/metrics").text
    family = next(f for f in text_string_to_metric_families(text)
                  if f.name == "pagoda:model_events")
    return {(s.labels["model_name"], s.labels["event"]): s.value for s in family.samples}


def test_concurrent_requests_to_both_all_succeed(swap, expected):
    client = swap.client()
    jobs = [(model, prompt) for prompt in PROMPTS for model in "abba"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        texts = list(pool.map(lambda job: complete(client, *job), jobs))
    assert texts == [expected["smollm2-none"][prompt] for _, prompt in jobs]


# ---- the waiting room ----------------------------------------------------------------------
def test_requests_beyond_the_waiting_room_get_503_with_retry_after(tmp_path, tiny_dir,
                                                                   expected):
    config = models_file(tmp_path, f"""
models:
  - {{model: {tiny_dir}, name: first, max_model_len: 256}}
  - {{model: {tiny_dir}, name: second, max_model_len: 256, preload: false}}
""")
    server = RemoteServer(config, "--max-waiting-requests", "2",
                          env={"PAGODA_TEST_STARTUP_DELAY_S": "3"})
    try:
        def call(_: int) -> httpx.Response:
            return httpx.post(f"{server.url}/v1/completions", timeout=60, json={
                "model": "second", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
                "temperature": 0})
        with ThreadPoolExecutor(5) as pool:
            responses = list(pool.map(call, range(5)))
        codes = sorted(r.status_code for r in responses)
        assert codes == [200, 200, 503, 503, 503]
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["Retry-After"]) >= 1
            else:
                assert r.json()["choices"][0]["text"] == expected["tiny"][PROMPTS[0]]
    finally:
        server.stop()
