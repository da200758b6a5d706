"""LoRA adapters through the real server and the official openai client: a static adapter,
runtime load/unload under traffic, unknown (404), malformed or mismatched (400), outside
--lora-dir (400), behind the API key, and the LoRA metrics."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import openai
import pytest
import torch
from transformers import AutoConfig, LlamaConfig

from pagoda import LLM, SamplingParams
from tests.lora.adapters import save_adapter_for_config
from tests.utils import RemoteServer

KEY = "lora-test-key"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def adapters(smollm2_dir, tmp_path_factory):
    """Random PEFT adapters for SmolLM2's shapes (2 of its 30 layers), and bad ones."""
    root = tmp_path_factory.mktemp("lora-dir")
    config = AutoConfig.from_pretrained(smollm2_dir)
    config.num_hidden_layers = 2
    save_adapter_for_config(config, root / "static", 8, ["q_proj", "v_proj"], seed=1)
    save_adapter_for_config(config, root / "runtime", 16, ["o_proj", "gate_proj", "up_proj",
                                                           "down_proj"], seed=2)
    other = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=4, vocab_size=128)
    save_adapter_for_config(other, root / "mismatched", 8, ["q_proj"], seed=3)
    (root / "malformed").mkdir()
    (root / "malformed" / "adapter_config.json").write_text("{not json")
    shutil.copytree(root / "runtime", root / "pickled")
    (root / "pickled" / "adapter_model.safetensors").rename(root / "pickled" / "adapter_model.bin")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(root / "runtime", outside / "runtime")
    return {"root": root, "outside": outside / "runtime"}


@pytest.fixture(scope="module")
def server(smollm2_dir, adapters):
    static = json.dumps({"name": "static", "path": str(adapters["root"] / "static")})
    # the engine on this process's thread count: the offline engine's sums in the same order
    # (a random adapter's logits are near ties, which another order's last bits can flip)
    srv = RemoteServer(str(smollm2_dir), "--served-model-name", "smol", "--max-model-len", "512",
                       "--kv-cache-memory", "64MiB", "--enable-lora", "--max-loras", "2",
                       "--max-cpu-loras", "2", "--lora-modules", static,
                       "--lora-dir", str(adapters["root"]), "--api-key", KEY,
                       env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                            "OMP_NUM_THREADS": str(torch.get_num_threads())})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client(api_key=KEY)


def post(server, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


def greedy(client, model: str, max_tokens: int = 12) -> str:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens,
                                     temperature=0).choices[0].text


def test_models_list_adapters_with_root_and_parent(client, adapters):
    cards = {m.id: m for m in client.models.list().data}
    assert cards["static"].root == str(adapters["root"] / "static")
    assert cards["static"].parent == "smol" and cards["smol"].parent is None


def test_static_adapter_equals_the_offline_engine(client, smollm2_dir, adapters):
    # the server's slots too: the adapters' products span every slot, so another slot count
    # adds them in another order, and the model's int8 activations (the CPU block dot) can
    # carry those last bits into a flipped near tie of the random adapter (seen on an
    # AVX-512 VM: 5e-3 apart in the first log-probabilities with 1 slot against 2)
    llm = LLM(str(smollm2_dir), kv_cache_memory=64 << 20, max_model_len=512,
              enable_lora=True, max_loras=2, max_cpu_loras=2)
    llm.add_lora("static", str(adapters["root"] / "static"))
    params = SamplingParams(temperature=0, max_tokens=12)
    offline = llm.generate(PROMPT, params, lora="static")[0].outputs[0].text
    base = llm.generate(PROMPT, params)[0].outputs[0].text
    assert greedy(client, "static") == offline
    assert greedy(client, "smol") == base != offline


def test_unknown_adapter_is_404(client, server):
    with pytest.raises(openai.NotFoundError):
        greedy(client, "no-such-adapter")
    response = post(server, "/v1/unload_lora_adapter", {"lora_name": "no-such-adapter"})
    assert response.status_code == 404


@pytest.mark.parametrize("path, message", [
    ("malformed", "adapter_config.json"),
    ("mismatched", "model.layers.0.self_attn.q_proj"),
    ("pickled", "adapter_model.bin"),
    ("does-not-exist", "does not exist"),
])
def test_bad_adapters_are_400_and_say_why(server, path, message):
    response = post(server, "/v1/load_lora_adapter", {"lora_name": f"bad-{path}",
                                                      "lora_path": path})
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_paths_outside_the_lora_dir_are_400(server, adapters):
    for path in (str(adapters["outside"]), "../" + adapters["outside"].parent.name + "/runtime"):
        response = post(server, "/v1/load_lora_adapter", {"lora_name": "escape",
                                                          "lora_path": path})
        assert response.status_code == 400
        assert "--lora-dir" in response.json()["error"]["message"]


def test_runtime_routes_need_the_api_key(server):
    response = post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "runtime"},
                    key=None)
    assert response.status_code == 401


def test_load_and_unload_under_traffic(server, client):
    """Adapters load while requests run, and an adapter unloaded mid-stream lets its
    requests finish; afterwards its name is a 404."""
    async def scenario() -> tuple[list[int], int]:
        aclient = server.async_client(api_key=KEY)
        streams = [asyncio.create_task(_complete(aclient, model))
                   for model in ("static", "smol", "static")]
        await asyncio.sleep(0.3)
        loaded = await asyncio.to_thread(post, server, "/v1/load_lora_adapter",
                                         {"lora_name": "runtime", "lora_path": "runtime"})
        assert loaded.status_code == 200, loaded.text
        assert loaded.text == "Success: LoRA adapter 'runtime' added successfully."
        unloaded = await asyncio.to_thread(post, server, "/v1/unload_lora_adapter",
                                           {"lora_name": "static"})
        assert unloaded.status_code == 200, unloaded.text
        lengths = await asyncio.gather(*streams)
        return lengths, await _complete(aclient, "runtime", 8)

    lengths, runtime_tokens = asyncio.run(scenario())
    assert lengths == [32, 32, 32]  # every token of the unloaded adapter's requests came
    assert runtime_tokens == 8
    again = post(server, "/v1/load_lora_adapter", {"lora_name": "runtime",
                                                   "lora_path": "runtime"})
    assert again.status_code == 400 and "already been loaded" in again.text
    with pytest.raises(openai.NotFoundError):
        greedy(client, "static")
    assert "static" not in {m.id for m in client.models.list().data}


async def _complete(aclient, model: str, max_tokens: int = 32) -> int:
    """Tokens generated (ignoring EOS, so all max_tokens unless the request was cut)."""
    response = await aclient.completions.create(model=model, prompt=PROMPT,
                                                max_tokens=max_tokens, temperature=0,
                                                extra_body={"ignore_eos": True})
    return response.usage.completion_tokens


def test_lora_metrics(server, client):
    greedy(client, "runtime", 4)
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    info = [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1 and 'max_lora="2"' in info[0]
    assert 'pagoda:lora_request_success_total{finished_reason="length",lora_name="runtime",' \
           'model_name="smol"}' in text
    generated = next(line for line in text.splitlines() if line.startswith(
        'pagoda:lora_generation_tokens_total{lora_name="runtime",model_name="smol"}'))
    assert float(generated.split()[-1]) >= 8
