"""The memory planner: what each model needs on a device, and how the rest is divided.

A model's fixed need is its weights, its activation peak for one full step of its token
budget and a per-process overhead (CUDA context, graph pools). Its KV cache needs at least
one sequence of its max length; what a device has beyond everyone's minimum is divided
among the resident models' KV caches in proportion to their demand (the KV bytes of
max_num_seqs full sequences, a sliding-window layer holding its window and a step's chunk of
each), never giving a model more than it can use. Each engine is then
started with that absolute byte budget: nobody types a fraction.

Figures come from the config before a model loads (`pagoda.models.estimate`) and are
replaced by what the engine measured once it has.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pagoda.errors import ConfigError

GIB = 1 << 30
GPU_PROCESS_OVERHEAD = 768 << 20  # CUDA context, cuBLAS workspace, graph pools, per engine


@dataclass(slots=True)
class ModelNeed:
    """One model replica's memory on one device, in bytes."""

    name: str
    weight_bytes: int
    activation_bytes: int
    overhead_bytes: int
    kv_min_bytes: int  # one sequence of max_model_len (and the reserved null block)
    kv_demand_bytes: int  # what it could use: max_num_seqs sequences of max_model_len
    # (in every case as the engine allocates them: sliding-window layers hold their window)
    measured: bool = False  # figures from the loaded engine rather than the config

    @property
    def fixed_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.overhead_bytes

    @property
    def min_bytes(self) -> int:
        return self.fixed_bytes + self.kv_min_bytes


class DoesNotFit(ConfigError):
    """The models asked for cannot share the device even at their minimum."""


def divide_kv(capacity: int, needs: list[ModelNeed]) -> dict[str, int]:
    """KV bytes per model: its minimum plus a demand-weighted share of the spare memory,
    capped at its demand (what a capped model cannot use goes to the others)."""
    spare = capacity - sum(n.min_bytes for n in needs)
    if spare < 0:
        raise DoesNotFit(
            f"{', '.join(n.name for n in needs)} need {sum(n.min_bytes for n in needs) / GIB:.2f}"
            f" GiB at least; the device budget is {capacity / GIB:.2f} GiB")
    kv = {n.name: n.kv_min_bytes for n in needs}
    open_needs = [n for n in needs if n.kv_demand_bytes > n.kv_min_bytes]
    while spare > 0 and open_needs:
        total_weight = sum(n.kv_demand_bytes for n in open_needs)
        given, still_open = 0, []
        for n in open_needs:
            share = spare * n.kv_demand_bytes // total_weight
            room = n.kv_demand_bytes - kv[n.name]
            grant = min(share, room)
            kv[n.name] += grant
            given += grant
            if grant < room:
                still_open.append(n)
        spare -= given
        if given == 0 or len(still_open) == len(open_needs):
            break  # everyone took a full share: the remainder is rounding
        open_needs = still_open
    return kv


@dataclass(slots=True)
class PlanEntry:
    """One model replica in a plan: its state and the bytes it holds or will hold."""

    model: str
    replica: int
    state: str
    weight_bytes: int
    activation_bytes: int
    overhead_bytes: int
    kv_bytes: int
    resident_bytes: int  # what it holds on the device now
    measured: bool


@dataclass(slots=True)
class DevicePlan:
    """Every model's share of one device."""

    device: str
    total_bytes: int
    budget_bytes: int  # what pagoda may use of it
    entries: list[PlanEntry] = field(default_factory=list)

    @property
    def used_bytes(self) -> int:
        return sum(e.resident_bytes for e in self.entries)

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "total_bytes": self.total_bytes,
                "budget_bytes": self.budget_bytes, "used_bytes": self.used_bytes,
                "free_bytes": self.free_bytes, "models": [asdict(e) for e in self.entries]}

    def format(self) -> str:
        def gib(n: int) -> str:
            return f"{n / GIB:7.2f}"
        lines = [(f"memory plan for {self.device}: budget {self.budget_bytes / GIB:.2f} GiB of "
                  f"{self.total_bytes / GIB:.2f} GiB, {self.used_bytes / GIB:.2f} GiB in use"),
                 (f"  {'model':28s} {'state':9s} {'weights':>7s} {'activ.':>7s} {'other':>7s} "
                  f"{'KV':>7s} {'held':>7s}  (GiB)")]
        for e in self.entries:
            label = e.model if e.replica == 0 else f"{e.model}#{e.replica}"
            lines.append(f"  {label[:28]:28s} {e.state:9s} {gib(e.weight_bytes)} "
                         f"{gib(e.activation_bytes)} {gib(e.overhead_bytes)} {gib(e.kv_bytes)} "
                         f"{gib(e.resident_bytes)}{'' if e.measured else '  (estimated)'}")
        return "\n".join(lines)
