"""CPU plans: decode steps replayed as a list of kernel calls, the CPU's counterpart of CUDA
graphs. On CPU a small model's decode step spends more time in Python (module calls,
dispatch, argument checks) than in its kernels: SmolLM2's 30 layers make about 150 kernel
calls a token and four times as many module calls. Where every operation of the model's
forward is one of pagoda's compiled CPU kernels (`pagoda.layers.cpu_kernels`), each call is
an address-and-size list that reruns the same work on the same memory; a plan is the list,
noted while the model runs once over static input buffers (`StaticInputs`, shared with the
CUDA graphs), and a replay calls them in order without the model's Python.

Capture checks that nothing else computed: every torch operator run while a plan is noted
must be a view or an allocation (their memory is then kept for the plan), else the model has
work outside the kernels (a torch matmul, a bias add, a LoRA adapter, a collective) and no
plan is made: the step runs eagerly, as with --enforce-eager. Plans are captured for decode
batches of 1, 2, 4, 8, 16 and 32 sequences (padded up as the graphs are: a padded row writes
no KV and attends to nothing)."""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from pagoda.layers import cpu_fused
from pagoda.layers.attention import cpu_decode_attention
from pagoda.layers.attention.metadata import CommonAttentionMetadata, StepKVGroups
from pagoda.layers.attention.torch_ref import fill_decode_firsts, static_decode_metadata
from pagoda.layers.cpu_kernels import KernelCall, recording_kernel_calls
from pagoda.logger import get_logger
from pagoda.runner.cuda_graphs import StaticInputs, capture_sizes

logger = get_logger(__name__)

MAX_PLAN_BATCH = 32  # plans for decode batches up to this many sequences (above, the
# kernels' time outweighs the Python a plan saves)

_aten = torch.ops.aten
ALLOCATIONS = frozenset({_aten.empty, _aten.empty_like, _aten.empty_strided})


def computes(func: Any, args: tuple, kwargs: dict, out: Any) -> bool:
    """Whether an operator call did work a plan would miss: anything but an allocation or a
    view (an out-of-place call whose every result shares a positional input's memory:
    views, and reshape, contiguous or to when they return their input)."""
    if func.overloadpacket in ALLOCATIONS:
        return False
    if func.overloadpacket.__name__.endswith("_") or "out" in kwargs:
        return True  # in place, or into a given tensor
    inputs = {a.untyped_storage().data_ptr() for a in pytree.tree_leaves(args)
              if isinstance(a, torch.Tensor)}
    results = [r for r in pytree.tree_leaves(out) if isinstance(r, torch.Tensor)]
    return not results or any(r.untyped_storage().data_ptr() not in inputs for r in results)


@dataclass(slots=True)
class Allocation:
    """A tensor a plan's first pass allocated: when, where (that pass's memory) and its
    size."""

    noted_at: int  # the kernel calls noted before it: the first it can be handed to
    start: int
    nbytes: int


class PlanArena:
    """The memory plans' tensors are cut from, one buffer all plans share (one is replayed at
    a time, its output read before the next), as CUDA graphs share a memory pool. A plan is
    noted twice: the first pass (`measure`) hands out fresh memory and notes each
    allocation; `pack` then places each in the buffer, over the bytes of tensors no later
    kernel call reads (a layer's activations die within the layer); the second pass hands
    out those places."""

    ALIGN = 64  # bytes: every tensor starts on a cache line

    def __init__(self) -> None:
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self.places: list[int] | None = None  # each allocation's offset in the buffer
        self.taken = 0
        self.noted: list[Allocation] = []
        self.calls: list[KernelCall] = []

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def measure(self, calls: list[KernelCall]) -> None:
        """A first pass begins: allocations are fresh memory, noted against `calls` (the
        pass's kernel calls, as they are noted)."""
        self.places, self.noted, self.calls = None, [], calls

    def take(self, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of `shape` and `dtype` (its values are whatever lies there)."""
        nbytes = math.prod(shape) * dtype.itemsize
        if self.places is None:
            tensor = torch.empty(shape, dtype=dtype)
            self.noted.append(Allocation(len(self.calls), tensor.data_ptr(), nbytes))
            return tensor
        if self.taken == len(self.places):
            raise RuntimeError("a plan's second pass allocated more than its first")
        place = self.places[self.taken]
        self.taken += 1
        return self.buffer[place:place + nbytes].view(dtype).view(shape)

    def pack(self, calls: list[KernelCall], output: torch.Tensor) -> None:
        """Place the first pass's allocations (a tensor lives from its allocation to the last
        call handed an address inside it; the output to the end) and get ready for the
        second pass, growing the buffer where it is too small."""
        last_use = _last_uses(self.noted, calls, output.data_ptr())
        places, end = _first_fit(self.noted, last_use, self.ALIGN)
        if end > self.buffer.numel():  # plans noted before keep the old buffer alive
            self.buffer = torch.empty(end, dtype=torch.uint8)
        self.places, self.taken = places, 0


def _last_uses(noted: list[Allocation], calls: list[KernelCall], output: int) -> list[float]:
    """Each allocation's last call handed an address inside it (its allocation time if none;
    infinity for the one holding `output`)."""
    starts = sorted(range(len(noted)), key=lambda i: noted[i].start)
    addresses = [noted[i].start for i in starts]

    def holder(address: int) -> int | None:
        at = bisect.bisect_right(addresses, address) - 1
        if at < 0:
            return None
        found = noted[starts[at]]
        return starts[at] if address < found.start + max(found.nbytes, 1) else None

    last: list[float] = [a.noted_at for a in noted]
    for index, (_, args) in enumerate(calls):
        for arg in args:
            owner = holder(arg) if isinstance(arg, int) else None
            if owner is not None:
                last[owner] = max(last[owner], index)
    owner = holder(output)
    if owner is not None:
        last[owner] = math.inf
    return last


def _first_fit(noted: list[Allocation], last_use: list[float],
               align: int) -> tuple[list[int], int]:
    """Offsets for the allocations, in order, each at the lowest place clear of every
    allocation still in use when it is made; and the bytes they span."""
    live: list[tuple[int, int, float]] = []  # (offset, end, last use)
    places, extent = [], 0
    for allocation, last in zip(noted, last_use, strict=True):
        live = sorted(p for p in live if p[2] >= allocation.noted_at)
        size = -(-allocation.nbytes // align) * align
        place = 0
        for offset, end, _ in live:
            if place + size <= offset:
                break
            place = max(place, end)
        live.append((place, place + size, last))
        places.append(place)
        extent = max(extent, place + size)
    return places, extent


def _arena_shape(func: Any, args: tuple, kwargs: dict) -> tuple[list[int], torch.dtype] | None:
    """The shape and dtype of an allocation the arena serves (a contiguous CPU tensor, as
    torch.empty or torch.empty_like of a contiguous tensor makes), else None."""
    if kwargs.get("device", torch.device("cpu")) != torch.device("cpu") \
            or kwargs.get("layout", torch.strided) != torch.strided \
            or kwargs.get("pin_memory"):
        return None
    if func is _aten.empty.memory_format and kwargs.get("memory_format") in (
            None, torch.contiguous_format):
        return list(args[0]), kwargs.get("dtype") or torch.get_default_dtype()
    if func is _aten.empty_like.default and args[0].is_contiguous() and args[0].is_cpu:
        return list(args[0].shape), kwargs.get("dtype") or args[0].dtype
    return None


class _ViewsOnly(TorchDispatchMode):
    """Runs the operators as usual, their allocations from `arena` where it serves them;
    keeps what they return (a plan's kernels write into and read from that memory) and
    notes the first one that computes."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """No torch.compile runs inside: torch need not wrap __torch_dispatch__ to keep
        Dynamo out (the wrapping imports Dynamo, about 125 MiB of the engine's memory)."""
        return False

    def __init__(self, arena: PlanArena) -> None:
        super().__init__()
        self.arena = arena
        self.kept: list[Any] = []
        self.computing: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        allocation = _arena_shape(func, args, kwargs)
        out = func(*args, **kwargs) if allocation is None else self.arena.take(*allocation)
        if self.computing is None and computes(func, args, kwargs, out):
            self.computing = str(func)
        self.kept.append(out)
        return out


@dataclass(slots=True)
class CpuPlan:
    """One decode batch size's kernel calls and the memory they use; `output` is the
    model's hidden states [batch, hidden] once replayed."""

    calls: list[KernelCall]
    kept: list[Any]
    output: torch.Tensor

    def replay(self) -> None:
        for function, args in self.calls:
            function(*args)


def _converted(call: KernelCall) -> KernelCall:
    """The call with its arguments as the ctypes values its function declares (ctypes then
    checks them without converting at each replay: about 0.4 us a call)."""
    function, args = call
    kinds = getattr(function, "argtypes", None)
    if not kinds:
        return call
    return function, tuple(kind(value) for kind, value in zip(kinds, args, strict=True))


class CpuPlanRunner:
    """Owns the plans; run() replays the smallest that fits the batch (the interface of
    CudaGraphRunner)."""

    def __init__(self, model: nn.Module, block_size: int, max_num_seqs: int,
                 max_model_len: int, num_kv_groups: int = 1) -> None:
        self.model = model
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(min(max_num_seqs, MAX_PLAN_BATCH))
        max_blocks = -(-max_model_len // block_size)
        device = torch.device("cpu")
        self.inputs = StaticInputs(self.sizes[-1], max_blocks, model.config.hidden_size,
                                   torch.float32, device, num_kv_groups)
        windows = {layer.sliding_window for layer in model.kv_cache_spec()}
        self.firsts = {window: torch.zeros(self.sizes[-1], dtype=torch.int32)
                       for window in windows}
        self.plans: dict[int, CpuPlan] = {}
        self.arena = PlanArena()

    @torch.inference_mode()
    def capture(self, kv_cache_dtype: torch.dtype) -> bool:
        """Note a plan for each batch size; False (and no plans, with one log line saying
        why) where the model computes outside pagoda's kernels or the KV cache's dtype is
        one they do not store (float8: torch writes it)."""
        if not (cpu_fused.available() and cpu_decode_attention.available()):
            logger.info("no CPU decode plans: pagoda's CPU kernels do not run here")
            return False
        if kv_cache_dtype not in cpu_decode_attention.STORED_TYPES:
            logger.info("no CPU decode plans: a %s KV cache is written by torch", kv_cache_dtype)
            return False
        start = time.perf_counter()
        for bs in reversed(self.sizes):  # the largest first: it sizes the arena's buffer
            plan, computing = self._capture_one(bs)
            if plan is None:
                self.plans.clear()
                logger.info("no CPU decode plans: the model computes outside pagoda's CPU "
                            "kernels (%s); decode steps run eagerly", computing)
                return False
            self.plans[bs] = plan
        logger.info("noted %d CPU decode plans (batch sizes %d..%d, %d kernel calls each, "
                    "%.1f MiB of activations shared) in %.2fs", len(self.plans), self.sizes[0],
                    self.sizes[-1], len(self.plans[self.sizes[0]].calls),
                    self.arena.nbytes / 2**20, time.perf_counter() - start)
        return True

    def _capture_one(self, bs: int) -> tuple[CpuPlan | None, str | None]:
        metadata = [static_decode_metadata(common, {w: f[:bs] for w, f in self.firsts.items()})
                    for common in self.inputs.metadata(bs, self.max_model_len,
                                                       self.block_size)]
        args = (self.inputs.input_ids[:bs], self.inputs.positions[:bs], metadata)
        self.model(*args)  # first: kernels built, lazily made tables made, outside the plan
        with recording_kernel_calls() as calls:
            self.arena.measure(calls)
            guard = _ViewsOnly(self.arena)
            with guard:
                output = self.model(*args)
        if guard.computing is not None:
            return None, guard.computing
        self.arena.pack(calls, output)
        guard = _ViewsOnly(self.arena)
        with recording_kernel_calls() as calls, guard:
            output = self.model(*args)
        if self.arena.taken != len(self.arena.places):
            return None, "a plan's second pass allocated less than its first"
        return CpuPlan([_converted(call) for call in calls], guard.kept + [metadata, output],
                       output), None

    def can_run(self, attn: CommonAttentionMetadata) -> bool:
        return bool(self.plans) and attn.max_query_len == 1 \
            and attn.num_seqs <= self.sizes[-1] \
            and attn.block_tables.shape[1] <= self.inputs.block_tables.shape[2]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, groups: StepKVGroups,
            intermediate: None = None) -> torch.Tensor:
        """Replay a decode step: its hidden states, a view of the plan's output (the next
        replay overwrites it). Plans are made for whole models only: no `intermediate`."""
        assert intermediate is None, "CPU plans run whole models, not pipeline stages"
        n = groups.metadata[0].num_seqs
        bs = next(s for s in self.sizes if s >= n)
        self.inputs.load(n, bs, input_ids, positions, groups)
        fill_decode_firsts(self.firsts, self.inputs.seq_lens[:bs])
        plan = self.plans[bs]
        plan.replay()
        return plan.output[:n]
