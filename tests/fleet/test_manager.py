"""ModelManager's decisions without engines: KV shares, which idle model to evict, sleep or
unload, keep-alive expiry. Needs come from the real configs (SmolLM2 and a tiny Llama)."""

from __future__ import annotations

import asyncio
import time

import pytest

from pagoda.errors import ModelDoesNotFitError
from pagoda.fleet.manager import ModelManager, ModelState
from pagoda.fleet.planner import DoesNotFit
from pagoda.fleet.spec import FOREVER, FleetSpec, ModelSpec
from pagoda.layers.quantization import cpu_block_dot
from tests.utils import tiny_chat_model

GIB = 1 << 30


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny"), smollm2_dir)


def manager(*specs: ModelSpec, memory_limit: int | None = None,
            keep_alive: float = FOREVER, quantization: str | None = "none") -> ModelManager:
    """Models dequantized to float32 by default: the limits below are sized for that."""
    m = ModelManager(FleetSpec(list(specs), memory_limit, keep_alive),
                     {"device": "cpu", "max_model_len": 256, "quantization": quantization})
    m.configure()
    return m


def loaded(m: ModelManager, name: str, idle: float = 0.0) -> None:
    model = m.by_name[name]
    model.state, model.kv_bytes = ModelState.LOADED, m._kv_budget(model)
    model.last_used = time.monotonic() - idle


def test_needs_come_from_the_config(smollm2_dir):
    m = manager(ModelSpec(str(smollm2_dir), "a"))
    need = m.by_name["a"].need
    assert need.weight_bytes == 538060032  # SmolLM2-135M in float32, as the engine allocates
    assert need.kv_min_bytes < need.kv_demand_bytes and not need.measured


def test_needs_count_weights_kept_quantized(smollm2_dir):
    m = manager(ModelSpec(str(smollm2_dir), "a"), quantization=None)
    # on the block-dot kernel Q4_1 linears as 4-bit codes with a float16 scale and low per
    # 32 (5 bits) and the tied Q8_0 table as bytes likewise (9 bits); on torch's kernels
    # the linears packed to 5 bits and the table float32
    held = 98346240 if cpu_block_dot.available() else 179741952
    assert m.by_name["a"].need.weight_bytes == held


def test_models_that_all_fit_split_by_demand_and_keep_their_share(smollm2_dir, tiny_dir):
    m = manager(ModelSpec(str(smollm2_dir), "a"), ModelSpec(str(tiny_dir), "t"),
                memory_limit=4 * GIB)
    share = m._kv_budget(m.by_name["a"])
    assert share == m.by_name["a"].need.kv_demand_bytes  # the whole demand fits
    loaded(m, "t")
    assert m._kv_budget(m.by_name["a"]) == share  # stable whatever else is loaded


def test_an_oversubscribed_device_sizes_for_the_others_asleep(smollm2_dir):
    m = manager(ModelSpec(str(smollm2_dir), "a"), ModelSpec(str(smollm2_dir), "b"),
                memory_limit=int(1.3 * GIB))
    a, b = m.by_name["a"], m.by_name["b"]
    kv = m._kv_budget(a)
    assert a.need.fixed_bytes + kv + b.need.weight_bytes <= 1.3 * GIB  # b asleep keeps weights
    assert kv >= a.need.kv_min_bytes


def test_a_model_bigger_than_the_device_is_refused_at_startup(smollm2_dir):
    with pytest.raises(DoesNotFit, match="needs 0.6"):
        manager(ModelSpec(str(smollm2_dir), "a"), memory_limit=GIB // 2)


def test_victims_lowest_priority_then_longest_idle_never_pinned_or_busy(smollm2_dir, tiny_dir):
    specs = [ModelSpec(str(tiny_dir), name) for name in ("new", "old", "older", "vip")]
    specs.append(ModelSpec(str(tiny_dir), "pinned", pinned=True))
    specs[3].priority = 10
    m = manager(*specs)
    for name, idle in (("old", 10), ("older", 100), ("vip", 1000), ("pinned", 5000)):
        loaded(m, name, idle)
    new = m.by_name["new"]
    assert m._pick_victim(new, "cpu").name == "older"
    m.by_name["older"].leases = 1  # serving a request
    assert m._pick_victim(new, "cpu").name == "old"
    m.by_name["old"].state = ModelState.SLEEPING  # sleeping ones go after loaded ones
    assert m._pick_victim(new, "cpu").name == "vip"
    m.by_name["vip"].waiters = 1  # a request waits for it
    assert m._pick_victim(new, "cpu").name == "old"
    m.by_name["old"].state = ModelState.UNLOADED
    assert m._pick_victim(new, "cpu") is None  # only the pinned one is left


def test_sleep_is_chosen_only_when_it_frees_enough(smollm2_dir):
    m = manager(ModelSpec(str(smollm2_dir), "a"), ModelSpec(str(smollm2_dir), "b"),
                memory_limit=int(1.3 * GIB))
    loaded(m, "a")
    a, b = m.by_name["a"], m.by_name["b"]
    frees = a.held_bytes() - a.need.weight_bytes  # on CPU the weights stay
    assert m._sleeping_suffices(b, "cpu", frees)
    assert not m._sleeping_suffices(b, "cpu", frees + 1)


def test_keep_alive_sets_when_an_idle_model_expires(smollm2_dir):
    m = manager(ModelSpec(str(smollm2_dir), "a", keep_alive=60),
                ModelSpec(str(smollm2_dir), "b", pinned=True), keep_alive=FOREVER)
    a, b = m.by_name["a"], m.by_name["b"]
    assert 59 < m._expiry(a) - time.monotonic() <= 60
    a.keep_alive = FOREVER  # a request said -1
    assert m._expiry(a) is None
    b.keep_alive = 0
    assert m._expiry(b) is None  # pinned models never expire


def test_a_model_that_cannot_fit_beside_pinned_ones_is_refused_at_once(smollm2_dir):
    m = manager(ModelSpec(str(smollm2_dir), "pinned", pinned=True),
                ModelSpec(str(smollm2_dir), "other"), memory_limit=int(1.3 * GIB))
    loaded(m, "pinned")
    other = m.by_name["other"]
    other.waiters = 1
    with pytest.raises(ModelDoesNotFitError, match="can never fit beside the pinned models "
                                                   r"\(pinned\)"):
        asyncio.run(m._make_room(other, other.need.min_bytes))


def test_fit_is_decided_before_any_idle_model_is_evicted(smollm2_dir, tiny_dir):
    m = manager(ModelSpec(str(smollm2_dir), "pinned", pinned=True),
                ModelSpec(str(tiny_dir), "idle"), ModelSpec(str(smollm2_dir), "other"),
                memory_limit=int(1.3 * GIB))
    loaded(m, "pinned")
    loaded(m, "idle", idle=100)
    other = m.by_name["other"]
    other.waiters = 1
    with pytest.raises(ModelDoesNotFitError):
        asyncio.run(m._make_room(other, other.need.min_bytes))
    assert m.by_name["idle"].state is ModelState.LOADED  # nothing was unloaded for nothing


def test_a_misfit_is_a_400_without_a_retry_hint():
    from pagoda.entrypoints.openai.errors import exception_to_response
    status, body, headers = exception_to_response(ModelDoesNotFitError("too big"))
    assert status == 400 and body["error"]["code"] == "model_does_not_fit"
    assert "Retry-After" not in headers


def test_ps_shows_no_idle_time_for_a_model_never_loaded(smollm2_dir, tiny_dir):
    m = manager(ModelSpec(str(smollm2_dir), "a"), ModelSpec(str(tiny_dir), "t"))
    loaded(m, "t", idle=30)
    rows = {row["model"]: row for row in m.ps()}
    assert rows["a"]["idle_seconds"] is None and rows["t"]["idle_seconds"] >= 30
    m.by_name["a"].state = ModelState.LOADING  # its first load: not idle yet either
    assert next(r for r in m.ps() if r["model"] == "a")["idle_seconds"] is None


def test_kv_demand_counts_only_the_window_of_sliding_window_layers():
    """Gemma 3 1B (22 of 26 layers local, window 512): 8 sequences of 4096 tokens in 512-token
    chunks need under half the KV they would if every layer kept every token."""
    m = ModelManager(FleetSpec([ModelSpec("bench/configs/gemma-3-1b", "g", engine={
        "load_format": "dummy", "max_model_len": 4096, "max_num_seqs": 8,
        "max_num_batched_tokens": 512})]), {"device": "cpu"})
    m.configure()
    need = m.by_name["g"].need
    per_token = 2 * 26 * 256 * 4  # K and V, 26 layers, one KV head of 256, float32
    block = 16 * 2 * 4 * 256 * 4  # a block holds one group's 4 layers
    per_seq = (4096 // 16 + 6 * (-(-(511 + 512) // 16) + 1)) * block  # full group + 6 local
    assert need.kv_demand_bytes == 8 * per_seq + block
    assert need.kv_min_bytes == per_seq + block
    assert need.kv_demand_bytes < (8 * 4096 + 16) * per_token / 2
