"""Ollama's API on a real `pagoda serve` (a models file: SmolLM2, and a tiny model created from
a Modelfile), driven by the official `ollama` client and LangChain's ChatOllama."""

from __future__ import annotations

import json
import time

import httpx
import ollama
import pytest
import yaml

from pagoda.cli.main import main
from pagoda.layers.cpu_kernels import kernels_dir
from pagoda.tokenizer.chat_template import render_template
from pagoda.tokenizer.go_template import to_jinja
from tests.utils import RemoteServer, free_port, tiny_chat_model

MODEL = "smollm2"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 10}
PIRATE_SYSTEM = "You are a pirate."
PIRATE_TEMPLATE = ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
                   "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
                   "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n")
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def home(tmp_path_factory, smollm2_dir):
    """A PAGODA_HOME whose store holds SmolLM2 (linked, so pull finds it and delete never
    touches the real one), its compiled CPU kernels the real home's (a build of each takes
    seconds)."""
    home = tmp_path_factory.mktemp("home")
    store_dir = home / "models" / "smollm2"
    store_dir.mkdir(parents=True)
    for path in smollm2_dir.iterdir():
        if path.is_file():
            (store_dir / path.name).symlink_to(path)
    kernels_dir().mkdir(parents=True, exist_ok=True)
    (home / "kernels").symlink_to(kernels_dir())
    return home


@pytest.fixture(scope="module")
def models_file(tmp_path_factory, smollm2_dir):
    """A models file with SmolLM2 and `pirate`, made by `pagoda create` from a Modelfile."""
    tmp = tmp_path_factory.mktemp("modelfile")
    tiny = tiny_chat_model(tmp / "tiny", smollm2_dir)
    config = tmp / "models.yaml"
    config.write_text(f"models:\n  - {{model: {smollm2_dir}, name: {MODEL}}}\n")
    modelfile = tmp / "Modelfile"
    modelfile.write_text(f'FROM {tiny}\nSYSTEM """{PIRATE_SYSTEM}"""\nPARAMETER temperature 0\n'
                         f'PARAMETER num_predict 3\nPARAMETER num_ctx 512\n'
                         f'TEMPLATE """{PIRATE_TEMPLATE}"""\n')
    assert main(["create", "pirate", "-f", str(modelfile), "--config", str(config)]) == 0
    data = yaml.safe_load(config.read_text())
    data["models"][1]["preload"] = False  # loaded by the first request for it
    config.write_text(yaml.safe_dump(data))
    return config


@pytest.fixture(scope="module")
def ollama_port():
    return free_port()


@pytest.fixture(scope="module")
def server(models_file, home, ollama_port):
    srv = RemoteServer(f"--config={models_file}", "--ollama-port", str(ollama_port),
                       "--max-model-len", "2048", "--memory-limit", "2GiB",
                       env={"PAGODA_HOME": str(home)})
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url, timeout=120)


def test_chat_equals_openai_chat_with_ollama_timings(server, client):
    reply = client.chat(model=MODEL, messages=CHAT, options=GREEDY, stream=False)
    openai_reply = server.client().chat.completions.create(model=MODEL, messages=CHAT,
                                                           max_tokens=10, temperature=0)
    assert reply.message.role == "assistant"
    assert reply.message.content == openai_reply.choices[0].message.content
    assert reply.done and reply.done_reason == "stop"
    assert reply.prompt_eval_count == openai_reply.usage.prompt_tokens
    assert reply.eval_count == openai_reply.usage.completion_tokens
    assert reply.total_duration >= reply.prompt_eval_duration + reply.eval_duration > 0
    assert reply.load_duration >= 0


def test_latest_tag_names_the_same_model(client):
    plain = client.chat(model=MODEL, messages=CHAT, options=GREEDY)
    tagged = client.chat(model=f"{MODEL}:latest", messages=CHAT, options=GREEDY)
    assert tagged.message.content == plain.message.content


def test_streamed_chat_reassembles_the_whole_reply(client):
    whole = client.chat(model=MODEL, messages=CHAT, options=GREEDY)
    parts = list(client.chat(model=MODEL, messages=CHAT, options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == whole.eval_count


def test_raw_ndjson_lines(server):
    body = {"model": MODEL, "messages": CHAT, "options": GREEDY}
    with httpx.stream("POST", f"{server.url}/api/chat", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert len(lines) > 2 and lines[-1]["done"] is True
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
                "eval_count", "eval_duration", "done_reason"):
        assert key in lines[-1]


def test_generate_plain_streamed_and_raw(server, client):
    whole = client.generate(model=MODEL, prompt="What is the capital of France?",
                            options=GREEDY)
    chat = client.chat(model=MODEL, messages=CHAT, options=GREEDY)
    assert whole.response == chat.message.content and whole.done
    streamed = "".join(p.response for p in client.generate(
        model=MODEL, prompt="What is the capital of France?", options=GREEDY, stream=True))
    assert streamed == whole.response
    raw = client.generate(model=MODEL, prompt="The three primary colours are", raw=True,
                          options={"temperature": 0, "num_predict": 8})
    completion = server.client().completions.create(
        model=MODEL, prompt="The three primary colours are", max_tokens=8, temperature=0)
    assert raw.response == completion.choices[0].text


def test_options_map_onto_sampling(client):
    short = client.chat(model=MODEL, messages=CHAT, options={"temperature": 0, "num_predict": 3})
    assert short.eval_count == 3 and short.done_reason == "length"
    full = client.chat(model=MODEL, messages=CHAT, options=GREEDY).message.content
    word = full.split()[2]
    stopped = client.chat(model=MODEL, messages=CHAT, options={**GREEDY, "stop": [word]})
    assert stopped.message.content == full[:full.index(word)]
    sampled = {"temperature": 1.0, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "seed": 7,
               "repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.5,
               "num_predict": 12}
    first = client.chat(model=MODEL, messages=CHAT, options=sampled).message.content
    assert client.chat(model=MODEL, messages=CHAT, options=sampled).message.content == first
    bounded = client.chat(model=MODEL, messages=CHAT,
                          options={"temperature": 0, "num_ctx": short.prompt_eval_count + 2})
    assert bounded.eval_count == 2 and bounded.done_reason == "length"


def test_format_json_and_schema(client):
    as_json = client.chat(model=MODEL, messages=[{"role": "user", "content": "Give a person."}],
                          format="json", options={"temperature": 0, "num_predict": 40})
    assert isinstance(json.loads(as_json.message.content), dict)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "capital": {"type": "boolean"}},
              "required": ["city", "capital"], "additionalProperties": False}
    shaped = client.chat(model=MODEL, messages=CHAT, format=schema,
                         options={"temperature": 0, "num_predict": 40})
    value = json.loads(shaped.message.content)
    assert set(value) == {"city", "capital"} and isinstance(value["capital"], bool)


def test_tool_turns_reach_the_prompt(client):
    one = {"temperature": 0, "num_predict": 1}
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    turns = [*asked, {"role": "assistant", "content": "", "tool_calls": [
                 {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
             {"role": "tool", "tool_name": "get_weather", "content": "sunny, 21 C"}]
    before = client.chat(model=MODEL, messages=asked, tools=[WEATHER_TOOL], options=one)
    after = client.chat(model=MODEL, messages=turns, tools=[WEATHER_TOOL], options=one)
    assert after.done and after.message.role == "assistant"
    assert after.prompt_eval_count > before.prompt_eval_count + 5


def test_think_is_accepted_and_images_are_refused(client):
    thought = client.chat(model=MODEL, messages=CHAT, think=True, options=GREEDY)
    assert thought.message.content and thought.message.thinking is None  # no reasoning format
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model=MODEL, messages=[{**CHAT[0], "images": [b"\x89PNG"]}])
    assert refused.value.status_code == 400 and "images are not supported" in \
        refused.value.error
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model=MODEL, prompt="hi", images=[b"\x89PNG"])
    assert refused.value.status_code == 400


def test_list_show_ps_version(server, client, ollama_port):
    names = [m.model for m in client.list().models]
    assert names[:2] == [MODEL, "pirate"]
    smol = client.list().models[0]
    assert smol.size > 0 and smol.details.format == "gguf" and smol.details.family == "llama"
    shown = client.show(MODEL)
    assert shown.details.quantization_level == "Q4_1" and "im_start" in shown.template
    assert shown.modelinfo["llama.context_length"] == 2048
    running = {m.model: m for m in client.ps().models}
    assert running[MODEL].context_length == 2048 and running[MODEL].size > 0
    version = httpx.get(f"{server.url}/api/version").json()["version"]
    other_port = httpx.get(f"http://127.0.0.1:{ollama_port}/api/version").json()["version"]
    assert version == other_port
    assert ollama.Client(host=f"http://127.0.0.1:{ollama_port}").list().models


def test_pull_copy_delete_in_the_store(client, home):
    progress = list(client.pull(MODEL, stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    assert any(p.total and p.completed == p.total for p in progress)
    assert client.pull(MODEL).status == "success"
    client.copy(MODEL, "smollm2-copy")
    assert "smollm2-copy" in [m.model for m in client.list().models]
    assert client.show("smollm2-copy").details.family == "llama"
    client.delete("smollm2-copy")
    assert "smollm2-copy" not in [m.model for m in client.list().models]
    assert (home / "models" / "smollm2").is_dir()
    with pytest.raises(ollama.ResponseError) as missing:
        client.delete("smollm2-copy")
    assert missing.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as unknown:
        client.pull("no-such-model")
    assert unknown.value.status_code == 404 and "pagoda pulls" in unknown.value.error


def test_modelfile_defaults_apply_and_keep_alive_unloads(client, smollm2_tokenizer):
    reply = client.chat(model="pirate", messages=CHAT, keep_alive=0)
    assert reply.eval_count == 3 and reply.done_reason == "length"  # PARAMETER num_predict 3
    expected = render_template(to_jinja(PIRATE_TEMPLATE), {"messages": [
        {"role": "system", "content": PIRATE_SYSTEM}, *CHAT]})
    assert reply.prompt_eval_count == len(smollm2_tokenizer(expected,
                                                            add_special_tokens=False).input_ids)
    assert f'SYSTEM """{PIRATE_SYSTEM}"""' in client.show("pirate").modelfile
    deadline = time.monotonic() + 30
    while "pirate" in {m.model for m in client.ps().models}:
        assert time.monotonic() < deadline, "keep_alive 0 did not unload the model"
        time.sleep(0.2)
    loaded = client.chat(model="pirate", messages=[], keep_alive="5m")
    assert loaded.done and loaded.done_reason == "load"
    assert "pirate" in {m.model for m in client.ps().models}


BAD_REQUESTS = [
    ("/api/chat", {"messages": CHAT, "options": {"temperature": 5}}, 400, "temperature"),
    ("/api/chat", {"messages": CHAT, "options": {"num_predict": 0}}, 400, "num_predict"),
    ("/api/chat", {"messages": CHAT, "options": {"top_p": 0}}, 400, "top_p"),
    ("/api/chat", {"messages": CHAT, "options": {"stop": ["x"] * 500}}, 400, "stop"),
    ("/api/chat", {"messages": CHAT, "options": {"num_ctx": 4}}, 400, "num_ctx"),
    ("/api/chat", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/api/chat", {"messages": CHAT, "format": "yaml"}, 400, "format"),
    ("/api/chat", {"messages": CHAT, "format": {"type": "nonsense"}}, 400, "format"),
    ("/api/chat", {"messages": CHAT, "keep_alive": "forever"}, 400, "keep_alive"),
    ("/api/chat", {"messages": CHAT, "model": "no-such-model"}, 404, "no-such-model"),
    ("/api/chat", {"messages": CHAT, "model": ""}, 400, "model"),
    ("/api/chat", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/api/generate", {"prompt": "hi", "suffix": "end"}, 400, "suffix"),
    ("/api/generate", {"prompt": "hi", "template": "{{ .Tools }}"}, 400, "template"),
    ("/api/generate", {"prompt": "hi " * 5000}, 400, "context"),
    ("/api/show", {"model": "no-such-model"}, 404, "not found"),
    ("/api/copy", {"source": MODEL, "destination": "../escape"}, 400, "destination"),
]


@pytest.mark.parametrize("path, body, status, mention", BAD_REQUESTS)
def test_bad_input_gets_ollama_error(server, path, body, status, mention):
    r = httpx.post(f"{server.url}{path}", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()
    assert set(error) == {"error"} and isinstance(error["error"], str)
    assert mention in error["error"]
    assert "Traceback" not in error["error"]


def test_form_encoded_json_and_malformed_bodies(server):
    curl_like = httpx.post(f"{server.url}/api/show", content=json.dumps({"model": MODEL}),
                           headers={"content-type": "application/x-www-form-urlencoded"})
    assert curl_like.status_code == 200
    broken = httpx.post(f"{server.url}/api/chat", content=b"{not json")
    assert broken.status_code == 400 and set(broken.json()) == {"error"}
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_langchain_chat_ollama(server):
    from langchain_ollama import ChatOllama
    llm = ChatOllama(model=MODEL, base_url=server.url, temperature=0, num_predict=10)
    answer = llm.invoke("What is the capital of France?")
    direct = ollama.Client(host=server.url).chat(
        model=MODEL, messages=CHAT, options=GREEDY).message.content
    assert answer.content == direct
    streamed = "".join(chunk.content for chunk in llm.stream("What is the capital of France?"))
    assert streamed == direct
    with_tools = llm.bind_tools([WEATHER_TOOL]).invoke("What is the weather in Paris?")
    assert with_tools.response_metadata["done_reason"] in ("stop", "length")
