"""ModelManager: several models behind one server, loaded, put to sleep, woken and unloaded
as requests and memory demand.

Each model replica is one engine process. A request leases its model: if the model is not
resident it is brought in (loaded, or woken from sleep) after idle models are evicted by a
cost-aware LRU until it fits; requests that arrive meanwhile wait in a bounded queue and
get 503 with Retry-After when it is full or the wait runs out. One swap runs at a time.
Pinned models are loaded at startup and never evicted. When a model's last lease ends its
keep-alive starts (Ollama semantics: a duration, 0 = unload now, -1 = keep); an expired
model is unloaded.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Any

from pagoda.config import engine_config
from pagoda.engine.async_engine import AsyncEngine, EngineObserver
from pagoda.engine.client import EngineDeadError, MPClient
from pagoda.errors import (
    InvalidRequestError,
    ModelBusyError,
    ModelDoesNotFitError,
    ModelUnavailableError,
    PagodaError,
    UnknownModelError,
)
from pagoda.fleet.devices import DeviceMemory, default_device, device_memory
from pagoda.fleet.planner import (
    GPU_PROCESS_OVERHEAD,
    DevicePlan,
    DoesNotFit,
    ModelNeed,
    PlanEntry,
    divide_kv,
)
from pagoda.fleet.replicas import PrefixIndex, ReplicaSet
from pagoda.fleet.spec import FOREVER, FleetSpec, ModelSpec
from pagoda.logger import get_logger
from pagoda.models.loader.tokenizer import get_tokenizer
from pagoda.models.source import resolve_model
from pagoda.runner.memory import available_host_memory

logger = get_logger(__name__)

GPU_BUDGET_FRACTION = 0.9  # of a GPU's memory, when no memory limit is given
CPU_BUDGET_FRACTION = 0.8  # of available host memory
CPU_KV_DEMAND_CAP = 4 << 30  # a CPU model's KV demand never exceeds this
HOST_BANDWIDTH = 10e9  # bytes/s assumed for a wake before one was measured
REAPER_PERIOD_S = 0.25
# Of a GPU's budget, what KV sizing leaves unassigned: a model's first KV budget rests on
# estimates (its activation peak is only measured once it loads).
GPU_PLAN_MARGIN = 0.02
GPU_PLAN_MARGIN_MIN = 256 << 20


class ModelState(enum.StrEnum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    SLEEPING = "sleeping"
    WAKING = "waking"


_RESIDENT = (ModelState.LOADED, ModelState.LOADING, ModelState.WAKING)
_IDLE_STATES = (ModelState.LOADED, ModelState.SLEEPING)  # where `pagoda ps` shows idle time


@dataclass(slots=True)
class Replica:
    index: int
    device: str
    client: MPClient | None = None
    engine: AsyncEngine | None = None
    prefixes: PrefixIndex = field(default_factory=PrefixIndex)


@dataclass(slots=True)
class ManagedModel:
    """A configured model, its replicas and its residency."""

    spec: ModelSpec
    replicas: list[Replica]
    need: ModelNeed
    state: ModelState = ModelState.UNLOADED
    kv_bytes: int = 0  # the KV budget its engines were started with
    leases: int = 0
    waiters: int = 0
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float | None = None  # when an idle model is unloaded (None: never)
    keep_alive: float | None = None  # the last request's keep_alive, else the model's
    load_seconds: float | None = None
    wake_seconds: float | None = None
    transition: asyncio.Task | None = None
    source: Any = None  # its ModelSource, resolved once
    tokenizer: Any = None
    handle: ReplicaSet | None = None
    output_parsers: Any = None  # the chat endpoint's parsers for this model's template
    error: str | None = None  # why its last load failed or its engine died
    host_copy: bool = False  # its engines keep a pinned host copy of the weights (GPU)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def evictable(self) -> bool:
        return not self.spec.pinned and self.leases == 0 and self.waiters == 0 \
            and self.state in (ModelState.LOADED, ModelState.SLEEPING)

    @property
    def on_gpu(self) -> bool:
        return self.replicas[0].device.startswith("cuda")

    def held_bytes(self) -> int:
        """Device bytes one replica holds in its current state."""
        if self.state in _RESIDENT:
            return self.need.fixed_bytes + self.kv_bytes
        if self.state is ModelState.SLEEPING:  # GPU: context and graph pools stay;
            # CPU: the weights stay in RAM (host memory is the device there)
            return ModelManager._asleep_bytes(self)
        return 0

    def idle_seconds(self, now: float) -> float:
        return 0.0 if self.leases else now - self.last_used


@dataclass(slots=True)
class Lease:
    """A request's hold on a resident model; release() when the response is done."""

    manager: ModelManager
    model: ManagedModel
    keep_alive: float | None = None
    released: bool = False
    lora_name: str | None = None  # the model's LoRA adapter the request named

    @property
    def engine(self) -> ReplicaSet:
        if self.model.handle is None:  # its engine died and was unloaded meanwhile
            raise EngineDeadError(f"the engine of {self.model.name!r} is gone; retry")
        return self.model.handle

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.manager._release(self.model, self.keep_alive)


class ModelManager:
    """Owns every model's engines; see the module docstring."""

    def __init__(self, fleet: FleetSpec, engine_kwargs: dict[str, Any], *,
                 max_pending: int = 1024, max_waiting: int = 256,
                 swap_timeout: float = 120.0, metrics: Any = None,
                 host_memory_limit: int | None = None,
                 engine_options: dict[str, Any] | None = None) -> None:
        self.fleet = fleet
        self.engine_options = engine_options or {}  # AsyncEngine's: admission, stall timeout
        self.engine_kwargs = {k: v for k, v in engine_kwargs.items()
                              if k not in ("kv_cache_memory", "gpu_memory_utilization")}
        self.fraction = engine_kwargs.get("gpu_memory_utilization")
        self.max_pending = max_pending
        self.max_waiting = max_waiting
        self.swap_timeout = swap_timeout
        self.metrics = metrics
        self.host_memory_limit = host_memory_limit
        self.models: list[ManagedModel] = []
        self.by_name: dict[str, ManagedModel] = {}
        self.devices: dict[str, DeviceMemory] = {}
        self.budgets: dict[str, int] = {}
        self._swap = asyncio.Lock()
        self._idle = asyncio.Event()  # set whenever a lease ends or a model goes away
        self._reaper: asyncio.Task | None = None
        self.waiting = 0

    # ---- setup ---------------------------------------------------------------------------------
    def configure(self) -> None:
        """Resolve every model and its needs from its config (no weights are read)."""
        default = self.engine_kwargs.get("device", "auto")
        default = default_device() if default == "auto" else default
        for spec in self.fleet.models:
            replicas = [Replica(i, _normal_device(spec.device_of(i) or default))
                        for i in range(spec.replicas)]
            for replica in replicas:
                if replica.device not in self.devices:
                    self.devices[replica.device] = device_memory(replica.device)
                    self.budgets[replica.device] = self._budget(self.devices[replica.device])
            source = resolve_model(spec.model, self._engine_kwargs(spec).get("load_format",
                                                                              "auto"))
            model = ManagedModel(spec, replicas, self._estimate_need(spec, source,
                                                                     replicas[0].device),
                                 source=source)
            self.models.append(model)
            for name in spec.names:
                self.by_name[name] = model
        for device in self.devices:
            self._check_minimums(device)
        if self.host_memory_limit is None:
            self.host_memory_limit = available_host_memory() // 2

    def _budget(self, memory: DeviceMemory) -> int:
        if self.fleet.memory_limit is not None:
            return self.fleet.memory_limit
        if memory.name == "cpu":
            return int(memory.free_bytes * (self.fraction or CPU_BUDGET_FRACTION))
        fraction = self.fraction or GPU_BUDGET_FRACTION
        already_used = memory.total_bytes - memory.free_bytes  # by other processes
        return max(int(memory.total_bytes * fraction) - already_used, 0)

    def _engine_kwargs(self, spec: ModelSpec) -> dict[str, Any]:
        """The command line's engine options under the model's own."""
        return {**self.engine_kwargs, **spec.engine}

    def _estimate_need(self, spec: ModelSpec, source: Any, device: str) -> ModelNeed:
        from pagoda.config import resolve_max_model_len
        from pagoda.models.estimate import estimate
        kwargs = self._engine_kwargs(spec)
        max_len = resolve_max_model_len(source.hf_config, kwargs.get("max_model_len"))
        seqs = int(kwargs.get("max_num_seqs", 64))
        on_gpu = device.startswith("cuda")
        e = estimate(source, max_len, concurrency=1, dtype=kwargs.get("dtype") or "auto",
                     device="cuda" if on_gpu else None,  # one rank's share when split
                     tp=int(kwargs.get("tensor_parallel_size") or 1),
                     pp=int(kwargs.get("pipeline_parallel_size") or 1),
                     token_budget=int(kwargs.get("max_num_batched_tokens", 2048)),
                     max_num_seqs=seqs, quantization=kwargs.get("quantization"),
                     kv_cache_dtype=kwargs.get("kv_cache_dtype") or "auto")
        demand = seqs * e.kv_bytes_per_seq + (e.kv_bytes - e.kv_bytes_per_seq)  # + null block
        if not on_gpu:
            demand = min(demand, max(CPU_KV_DEMAND_CAP, e.kv_bytes))
        return ModelNeed(spec.name, e.weight_bytes, e.activation_bytes,
                         GPU_PROCESS_OVERHEAD if on_gpu else 0, e.kv_bytes, demand)

    def _check_minimums(self, device: str) -> None:
        for model in self._on(device):
            if model.need.min_bytes > self.budgets[device]:
                raise DoesNotFit(
                    f"model {model.name!r} needs {model.need.min_bytes / 2**30:.2f} GiB at "
                    f"least on {device}, more than its budget of "
                    f"{self.budgets[device] / 2**30:.2f} GiB")

    async def start(self) -> None:
        """Load pinned models, then the others that fit without evicting anyone, all at
        once (each engine gets its absolute budget, so they cannot collide)."""
        self._reaper = asyncio.get_running_loop().create_task(self._reap())
        chosen = []
        for model in sorted(self.models, key=lambda m: not m.spec.pinned):
            if not (model.spec.pinned or model.spec.preload):
                continue
            if not model.spec.pinned and not self._fits_now(model):
                logger.info("%s will load on demand (it does not fit next to the others)",
                            model.name)
                continue
            self._reserve(model, self._kv_budget(model))
            chosen.append(model)
        async with self._swap:
            results = await asyncio.gather(*(self._spawn(m) for m in chosen),
                                           return_exceptions=True)
            await self._prepare_sleeps(chosen)
        for line in self.plan_text().splitlines():
            logger.info("%s", line)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        for model in self.models:
            if model.transition is not None:
                model.transition.cancel()
            await self._unload(model, "the server is stopping")

    # ---- leases ----------------------------------------------------------------------------------
    def resolve(self, name: str | None) -> ManagedModel:
        if name is None:
            if len(self.models) == 1:
                return self.models[0]
            raise InvalidRequestError("this server hosts several models: name one in "
                                      "'model'", "model")
        model = self.by_name.get(name)
        if model is None:
            raise UnknownModelError(name)
        return model

    async def acquire(self, name: str | None, keep_alive: float | None = None) -> Lease:
        """Lease the model, bringing it in first if needed (waits at most swap_timeout)."""
        lease = await self._acquire(self.resolve(name), keep_alive)
        if name in lease.model.spec.lora_modules:
            lease.lora_name = name
        return lease

    async def _acquire(self, model: ManagedModel, keep_alive: float | None) -> Lease:
        if model.state is ModelState.LOADED and model.transition is None:
            return self._lease(model, keep_alive)
        if self.waiting >= self.max_waiting:
            raise ModelUnavailableError("too many requests are waiting for models to load; "
                                        "retry shortly", retry_after=5)
        self.waiting += 1
        model.waiters += 1
        try:
            return await asyncio.wait_for(self._wait_resident(model, keep_alive),
                                          self.swap_timeout)
        except TimeoutError:
            raise ModelUnavailableError(f"model {model.name!r} is still being loaded; retry "
                                        f"shortly", retry_after=5) from None
        finally:
            self.waiting -= 1
            model.waiters -= 1
            self._idle.set()  # a swap waiting for room re-checks whether anyone still waits

    async def _wait_resident(self, model: ManagedModel, keep_alive: float | None) -> Lease:
        while True:
            if model.state is ModelState.LOADED and model.transition is None:
                return self._lease(model, keep_alive)
            if model.transition is None:
                model.transition = asyncio.get_running_loop().create_task(self._bring_in(model))
            task = model.transition
            await asyncio.shield(task)  # a failed load raises here, for every waiter

    def _lease(self, model: ManagedModel, keep_alive: float | None) -> Lease:
        model.leases += 1
        model.expires_at = None
        model.last_used = time.monotonic()
        return Lease(self, model, keep_alive)

    def _release(self, model: ManagedModel, keep_alive: float | None) -> None:
        model.leases -= 1
        model.last_used = time.monotonic()
        if keep_alive is not None:
            model.keep_alive = keep_alive
        if model.leases == 0:
            model.expires_at = self._expiry(model)
        self._idle.set()

    def _expiry(self, model: ManagedModel) -> float | None:
        if model.spec.pinned:
            return None
        keep = model.keep_alive
        if keep is None:
            keep = model.spec.keep_alive if model.spec.keep_alive is not None \
                else self.fleet.keep_alive
        return None if keep == FOREVER else time.monotonic() + keep

    # ---- bringing a model in ---------------------------------------------------------------------
    async def _bring_in(self, model: ManagedModel) -> None:
        try:
            async with self._swap:
                if model.state is ModelState.SLEEPING:
                    await self._make_room(model, model.need.fixed_bytes + model.kv_bytes
                                          - model.held_bytes())
                    await self._wake(model)
                elif model.state is ModelState.UNLOADED:
                    await self._load(model)
        finally:
            model.transition = None

    async def _make_room(self, model: ManagedModel, needed: int) -> None:
        """Evict idle models from the device until `needed` bytes are free; waits for a busy
        model to go idle when nothing can be evicted yet."""
        device = model.replicas[0].device
        self._check_fits_beside_pinned(model, device, needed)  # before evicting anything
        while self._free(device) < needed:
            victim = self._pick_victim(model, device)
            if victim is None:
                if model.waiters == 0:
                    raise ModelUnavailableError("nobody waits for this model any more")
                if not self._may_become_evictable(model, device):
                    raise self._misfit(model, device, needed)
                self._idle.clear()
                await self._idle.wait()  # a lease ends, a waiter leaves or a model goes
                continue
            if victim.state is ModelState.LOADED and self._can_sleep(victim) \
                    and self._sleeping_suffices(model, device, needed - self._free(device)):
                await self._sleep(victim)
            else:
                await self._unload(victim, f"evicted to make room for {model.name}")

    def _check_fits_beside_pinned(self, model: ManagedModel, device: str, needed: int) -> None:
        """Raise ModelDoesNotFitError when evicting every model that may go would still not
        free `needed` bytes: the pinned ones stay, so no wait or retry can help."""
        if self._free(device) + self._evictable_ever(model, device) < needed:
            raise self._misfit(model, device, needed)

    def _evictable_ever(self, model: ManagedModel, device: str) -> int:
        """Bytes the device's unpinned models hold (all of it freed if they are unloaded)."""
        return sum(m.held_bytes() * sum(r.device == device for r in m.replicas)
                   for m in self._on(device) if m is not model and not m.spec.pinned)

    def _misfit(self, model: ManagedModel, device: str, needed: int) -> ModelDoesNotFitError:
        pinned = [m.name for m in self._on(device) if m.spec.pinned and m.held_bytes()]
        return ModelDoesNotFitError(
            f"model {model.name!r} needs {needed / 2**30:.2f} GiB on {device} and can never "
            f"fit beside the pinned models ({', '.join(pinned) or 'none'}) within the "
            f"{self.budgets[device] / 2**30:.2f} GiB budget: unpin one, raise the memory "
            f"limit or lower this model's max_model_len")

    def _may_become_evictable(self, model: ManagedModel, device: str) -> bool:
        """Whether some other model of the device, busy now, could be evicted later."""
        return any(m is not model and not m.spec.pinned
                   and m.state in (*_RESIDENT, ModelState.SLEEPING) for m in self._on(device))

    def _pick_victim(self, model: ManagedModel, device: str) -> ManagedModel | None:
        """Cost-aware LRU: lowest priority first, then the longest idle per second it would
        take to bring back; loaded models before sleeping ones (which hold little)."""
        now = time.monotonic()
        candidates = [m for m in self._on(device) if m is not model and m.evictable]
        if not candidates:
            return None

        def key(m: ManagedModel) -> tuple:
            restore = self._restore_seconds(m)
            return (m.state is ModelState.SLEEPING, m.spec.priority,
                    -m.idle_seconds(now) / (1.0 + restore))
        return min(candidates, key=key)

    def _restore_seconds(self, model: ManagedModel) -> float:
        if model.state is ModelState.LOADED and self._can_sleep(model):
            return model.wake_seconds or model.need.weight_bytes / HOST_BANDWIDTH
        return model.load_seconds or 10.0

    def _can_sleep(self, model: ManagedModel) -> bool:
        """On GPU: whether host memory can take its weights (a model that slept once keeps
        its host copy until it is unloaded, so later sleeps cost nothing)."""
        if not model.on_gpu or model.host_copy:
            return True
        held = sum(m.need.weight_bytes * len(m.replicas) for m in self.models
                   if m.host_copy and m is not model)
        return held + model.need.weight_bytes * len(model.replicas) <= self.host_memory_limit

    async def _prepare_sleeps(self, models: list[ManagedModel]) -> None:
        """Before the server is ready, make the host copies of the GPU models that share a
        device with more models than it holds: their first eviction then takes milliseconds
        instead of the seconds that pinning takes (and stalls the device for)."""
        ready = [m for m in models if m.state is ModelState.LOADED and self._may_sleep_soon(m)]
        await asyncio.gather(*(self._call_all(m, "prepare_sleep") for m in ready))
        for model in ready:
            model.host_copy = True

    def _may_sleep_soon(self, model: ManagedModel) -> bool:
        device = model.replicas[0].device
        crowded = sum(m.need.min_bytes for m in self._on(device)) > self.budgets[device]
        return model.on_gpu and crowded and not model.host_copy and self._can_sleep(model)

    def _sleeping_suffices(self, model: ManagedModel, device: str, shortfall: int) -> bool:
        """Whether putting idle models to sleep (rather than unloading them) can free
        `shortfall` bytes."""
        frees = sum(m.held_bytes() - self._asleep_bytes(m) for m in self._on(device)
                    if m is not model and m.evictable and m.state is ModelState.LOADED
                    and self._can_sleep(m))
        return frees >= shortfall

    def _free(self, device: str) -> int:
        used = sum(m.held_bytes() * sum(r.device == device for r in m.replicas)
                   for m in self.models)
        return self.budgets[device] - used

    def _on(self, device: str) -> list[ManagedModel]:
        return [m for m in self.models if any(r.device == device for r in m.replicas)]

    def _fits_now(self, model: ManagedModel) -> bool:
        kv = self._kv_budget(model)
        return all(self._free(r.device) >= model.need.fixed_bytes + kv for r in model.replicas)

    def _kv_budget(self, model: ManagedModel) -> int:
        """This model's KV share. If every model of its device fits at its minimum, the
        division over all of them (stable whatever is loaded). Else the division over this
        model and the most recently used resident ones that fit beside it, the others counted
        asleep. Never more than the device has once idle models are put to sleep."""
        device = model.replicas[0].device
        budget = self.budgets[device]
        if device != "cpu":
            budget -= max(int(budget * GPU_PLAN_MARGIN), GPU_PLAN_MARGIN_MIN)
        others = [m for m in self._on(device) if m is not model]
        try:
            share = divide_kv(budget, [model.need, *(m.need for m in others)])[model.name]
        except DoesNotFit:
            share = self._oversubscribed_share(model, others, budget)
        room = budget - model.need.fixed_bytes - sum(
            min(m.held_bytes(), self._asleep_bytes(m)) if m.evictable else m.held_bytes()
            for m in others)
        return max(min(share, room), model.need.kv_min_bytes)

    def _oversubscribed_share(self, model: ManagedModel, others: list[ManagedModel],
                              budget: int) -> int:
        keep = [m for m in others if m.spec.pinned or m.state in _RESIDENT]
        keep.sort(key=lambda m: (m.spec.pinned, m.last_used), reverse=True)
        while True:
            outside = sum(self._asleep_bytes(m) for m in others if m not in keep)
            try:
                return divide_kv(budget - outside,
                                 [model.need, *(m.need for m in keep)])[model.name]
            except DoesNotFit:
                if not keep or keep[-1].spec.pinned:
                    return model.need.kv_min_bytes
                keep.pop()

    @staticmethod
    def _asleep_bytes(model: ManagedModel) -> int:
        """What a model holds on its device while asleep."""
        return model.need.overhead_bytes if model.on_gpu else model.need.weight_bytes

    async def _load(self, model: ManagedModel) -> None:
        kv = self._kv_budget(model)
        await self._make_room(model, model.need.fixed_bytes + kv)
        self._reserve(model, kv)
        await self._spawn(model)

    @staticmethod
    def _reserve(model: ManagedModel, kv_bytes: int) -> None:
        """Count the model's memory as taken from now on (its engines are starting)."""
        model.kv_bytes, model.state = kv_bytes, ModelState.LOADING

    async def _spawn(self, model: ManagedModel) -> None:
        """Start the model's engines with the KV budget _reserve() gave it."""
        start = time.monotonic()
        try:
            if model.tokenizer is None:
                model.tokenizer = await asyncio.to_thread(
                    get_tokenizer, model.source, self._engine_kwargs(model.spec).get("tokenizer"))
            clients = await asyncio.gather(
                *(asyncio.to_thread(self._start_engine, model, r, model.kv_bytes)
                  for r in model.replicas), return_exceptions=True)
            failed = next((c for c in clients if isinstance(c, BaseException)), None)
            if failed is not None:
                for client in clients:
                    if not isinstance(client, BaseException):
                        client.shutdown()
                raise failed
        except BaseException as exc:
            model.state, model.kv_bytes = ModelState.UNLOADED, 0
            model.error = f"failed to load: {exc}"
            self._idle.set()
            logger.error("model %s failed to load: %s", model.name, exc)
            if isinstance(exc, PagodaError):
                raise
            raise PagodaError(f"model {model.name!r} failed to load: {exc}") from exc
        self._attach(model, clients)
        await self._add_adapters(model)
        model.load_seconds = time.monotonic() - start
        model.state, model.error = ModelState.LOADED, None
        self._record(model, "load")
        logger.info("loaded %s in %.1fs: KV cache %.2f GiB (%d tokens)", model.name,
                    model.load_seconds, model.kv_bytes / 2**30,
                    model.handle.model_info.kv_capacity_tokens)

    def _start_engine(self, model: ManagedModel, replica: Replica, kv_bytes: int) -> MPClient:
        kwargs = {**self._engine_kwargs(model.spec), "kv_cache_memory": kv_bytes,
                  "device": replica.device}
        return MPClient(engine_config(model.spec.model, **kwargs))

    def _attach(self, model: ManagedModel, clients: list[MPClient]) -> None:
        engines = []
        for replica, client in zip(model.replicas, clients, strict=True):
            observer: EngineObserver | None = None
            if self.metrics is not None:
                observer = self.metrics.for_model(model.name)
            engine = AsyncEngine(client, model.tokenizer, max_pending=self.max_pending,
                                 observer=observer, **self.engine_options)
            engine.start()
            replica.client, replica.engine = client, engine
            replica.prefixes.clear()
            engines.append(engine)
        model.handle = ReplicaSet(engines, [r.prefixes for r in model.replicas])
        self._measure(model, clients[0].model_info)

    @staticmethod
    async def _add_adapters(model: ManagedModel) -> None:
        """Load the model's LoRA adapters into every replica's engine."""
        for name, path in model.spec.lora_modules.items():
            for engine in model.handle.engines:
                await engine.add_lora(name, path)

    @staticmethod
    def _measure(model: ManagedModel, info: Any) -> None:
        """Replace the config estimate with what the engine allocated."""
        need = model.need
        need.weight_bytes = info.weight_bytes or need.weight_bytes
        if info.activation_bytes:
            need.activation_bytes = info.activation_bytes
        model.kv_bytes = info.kv_cache_bytes or model.kv_bytes
        need.measured = True

    # ---- sleep, wake, unload ---------------------------------------------------------------------
    async def _sleep(self, model: ManagedModel) -> None:
        model.state = ModelState.SLEEPING  # from now on new requests wait for a wake
        model.host_copy = model.on_gpu
        try:
            seconds = await self._call_all(model, "sleep")
        except Exception:
            await self._unload(model, "it failed to go to sleep")
            raise
        model.expires_at = self._expiry(model)
        for replica in model.replicas:
            replica.prefixes.clear()  # their caches are gone
        self._record(model, "sleep")
        logger.info("put %s to sleep in %.2fs", model.name, seconds)

    async def _wake(self, model: ManagedModel) -> None:
        model.state = ModelState.WAKING
        try:
            model.wake_seconds = await self._call_all(model, "wake_up")
        except Exception:
            await self._unload(model, "it failed to wake")
            raise
        model.state = ModelState.LOADED
        self._record(model, "wake")
        logger.info("woke %s in %.2fs", model.name, model.wake_seconds)

    async def _call_all(self, model: ManagedModel, method: str) -> float:
        results = await asyncio.gather(*(r.client.call(method) for r in model.replicas))
        return max(results)

    async def _unload(self, model: ManagedModel, why: str) -> None:
        if model.state is ModelState.UNLOADED:
            return
        logger.info("unloading %s: %s", model.name, why)
        model.state, model.handle = ModelState.UNLOADED, None  # no new lease from now on
        for replica in model.replicas:
            if replica.engine is not None:
                await replica.engine.stop()
            if replica.client is not None:
                await asyncio.to_thread(replica.client.shutdown)
            replica.client = replica.engine = None
            replica.prefixes.clear()
        model.kv_bytes, model.expires_at, model.host_copy = 0, None, False
        self._record(model, "unload")
        self._idle.set()

    def _record(self, model: ManagedModel, event: str) -> None:
        if self.metrics is not None:
            self.metrics.record_model_event(model.name, event)

    async def _reap(self) -> None:
        """Unload models whose keep-alive ran out, and models whose engine died."""
        while True:
            await asyncio.sleep(REAPER_PERIOD_S)
            now = time.monotonic()
            for model in self.models:
                if model.transition is not None or model.state in (
                        ModelState.UNLOADED, ModelState.LOADING, ModelState.WAKING):
                    continue
                dead = next((r.engine.dead for r in model.replicas
                             if r.engine is not None and r.engine.dead is not None), None)
                if dead is not None:
                    model.error = f"engine died: {dead}"
                    async with self._swap:
                        await self._unload(model, model.error)
                elif model.leases == 0 and model.expires_at is not None \
                        and now >= model.expires_at:
                    async with self._swap:
                        if model.leases == 0 and model.transition is None:
                            await self._unload(model, "keep_alive expired")

    async def stop_model(self, name: str) -> ManagedModel:
        """Unload a model now (`pagoda stop`); its next request loads it again. A model with
        requests in flight is refused (ModelBusyError): it would cut them off."""
        model = self.resolve(name)
        async with self._swap:
            if model.leases or model.waiters or model.transition is not None:
                raise ModelBusyError(f"model {model.name!r} is busy ({model.leases} requests "
                                     f"in flight, {model.waiters} waiting); stop it once idle")
            await self._unload(model, "stopped on request")
        return model

    # ---- reports ---------------------------------------------------------------------------------
    @property
    def num_in_flight(self) -> int:
        return sum(r.engine.num_in_flight for m in self.models for r in m.replicas
                   if r.engine is not None)

    def abort_all(self) -> None:
        for model in self.models:
            for replica in model.replicas:
                if replica.engine is not None:
                    replica.engine.abort_all()

    def plans(self) -> list[DevicePlan]:
        plans = []
        for device, memory in self.devices.items():
            plan = DevicePlan(device, memory.total_bytes, self.budgets[device])
            for model in self._on(device):
                for replica in model.replicas:
                    if replica.device != device:
                        continue
                    n = model.need
                    kv = model.kv_bytes or (self._kv_budget(model)
                                            if model.state is ModelState.UNLOADED else 0)
                    plan.entries.append(PlanEntry(
                        model.name, replica.index, str(model.state), n.weight_bytes,
                        n.activation_bytes, n.overhead_bytes, kv, model.held_bytes(),
                        n.measured))
            plans.append(plan)
        return plans

    def plan_text(self) -> str:
        return "\n".join(plan.format() for plan in self.plans())

    def ps(self) -> list[dict[str, Any]]:
        """One row per model replica: what `pagoda ps` shows."""
        now = time.monotonic()
        rows = []
        for model in self.models:
            for replica in model.replicas:
                expires = None if model.expires_at is None else max(model.expires_at - now, 0)
                rows.append({
                    "model": model.name, "replica": replica.index, "device": replica.device,
                    "state": str(model.state), "weight_bytes": model.need.weight_bytes,
                    "kv_cache_bytes": model.kv_bytes, "held_bytes": model.held_bytes(),
                    "host_bytes": model.need.weight_bytes if model.host_copy else 0,
                    "pinned": model.spec.pinned, "in_flight": (replica.engine.num_in_flight
                                                               if replica.engine else 0),
                    "idle_seconds": (round(model.idle_seconds(now), 1)
                                     if model.state in _IDLE_STATES else None),
                    "expires_in_seconds": None if expires is None else round(expires, 1),
                    "load_seconds": model.load_seconds, "wake_seconds": model.wake_seconds,
                    "requests_routed": (model.handle.routed[replica.index]
                                        if model.handle is not None else 0),
                    "engine_pid": replica.client.engine_pid if replica.client else None,
                    "error": model.error})
        return rows


def _normal_device(device: str) -> str:
    return "cuda:0" if device == "cuda" else device

