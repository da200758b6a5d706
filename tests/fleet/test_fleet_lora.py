"""LoRA adapters in a several-model server: each adapter is routed to its own base model,
answers as the offline engine does with it, and is listed with its parent."""

from __future__ import annotations

import pytest

from pagoda import LLM, SamplingParams
from pagoda.errors import ConfigError
from pagoda.fleet.spec import fleet_from_yaml
from tests.lora.adapters import save_random_adapter
from tests.utils import RemoteServer, tiny_chat_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("fleet-lora")
    tiny = tiny_chat_model(root / "tiny", smollm2_dir)
    return {"tiny": tiny,
            "a": save_random_adapter(tiny, root / "a", 8, ["q_proj", "v_proj"], seed=1),
            "b": save_random_adapter(tiny, root / "b", 16, ["gate_proj", "down_proj"], seed=2)}


def write_config(tmp_path, models) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(f"""
defaults: {{max_model_len: 256, enable_lora: true, max_loras: 2}}
models:
  - {{model: {models['tiny']}, name: first, lora_modules: ["first-lora={models['a']}"]}}
  - model: {models['tiny']}
    name: second
    lora_modules: [{{name: second-lora, path: {models['b']}}}]
""")
    return str(path)


def offline(models, adapter: str | None) -> str:
    """The greedy text of the offline engine with the fleet's LoRA slots (another slot count
    adds the adapters' products in another order)."""
    llm = LLM(str(models["tiny"]), max_model_len=256, kv_cache_memory=16 << 20,
              enable_lora=True, max_loras=2)
    if adapter:
        llm.add_lora(adapter, str(models[adapter]))
    params = SamplingParams(temperature=0, max_tokens=8)
    return llm.generate(PROMPT, params, lora=adapter)[0].outputs[0].text


def test_adapters_route_to_their_base_model(tmp_path, models):
    expected = {name: offline(models, adapter)
                for name, adapter in (("first", None), ("first-lora", "a"),
                                      ("second-lora", "b"))}
    server = RemoteServer(f"--config={write_config(tmp_path, models)}")
    try:
        client = server.client()
        cards = {m.id: m for m in client.models.list().data}
        assert cards["first-lora"].parent == "first"
        assert cards["first-lora"].root == str(models["a"])
        assert cards["second-lora"].parent == "second"
        for name, text in expected.items():
            out = client.completions.create(model=name, prompt=PROMPT, max_tokens=8,
                                            temperature=0)
            assert out.choices[0].text == text, name
        assert expected["first-lora"] != expected["first"]
    finally:
        server.stop()


def test_adapters_need_enable_lora_and_unique_names(tmp_path, models):
    path = tmp_path / "bad.yaml"
    path.write_text(f"models: [{{model: {models['tiny']}, lora_modules: ['x={models['a']}']}}]")
    with pytest.raises(ConfigError, match="enable_lora"):
        fleet_from_yaml(path)
    path.write_text(f"""
defaults: {{enable_lora: true}}
models:
  - {{model: {models['tiny']}, name: one, lora_modules: ['same={models['a']}']}}
  - {{model: {models['tiny']}, name: two, lora_modules: ['same={models['b']}']}}
""")
    with pytest.raises(ConfigError, match="'same'"):
        fleet_from_yaml(path)
