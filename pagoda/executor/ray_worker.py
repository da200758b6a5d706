"""The Ray actor that holds one rank's Worker on whichever node of the cluster Ray placed it:
it says where it is, then answers the executor's call frames one by one, in order, exactly
as a worker process answers them from its pipe (worker_calls.py).

This module imports Ray only inside the actor's methods, so that it loads without Ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pagoda.executor import serial
from pagoda.executor.base import WorkerConfig
from pagoda.executor.worker import RankSetup, Worker
from pagoda.executor.worker_calls import CallAnswerer, configure_rank_logging
from pagoda.process import affinity_cores, free_port

HOST_IP_ENV = "PAGODA_HOST_IP"  # this node's address for the other ranks (vLLM's VLLM_HOST_IP)


@dataclass(frozen=True, slots=True)
class RankPlacement:
    """Where Ray put a rank: its node, the address other ranks reach it at, its GPUs."""

    rank: int
    host_ip: str  # PAGODA_HOST_IP on that node, else Ray's address for the node
    node_id: str  # Ray's node id
    gpu_ids: tuple[str, ...]  # the GPUs Ray gave the actor (empty: it runs on CPU)
    pid: int
    cores: int  # CPU cores the actor's process may run on
    threads: int = 0  # CPU threads the executor gave the rank (0: not yet decided)

    def describe(self) -> str:
        gpus = f"GPU {','.join(self.gpu_ids)}" if self.gpu_ids else "CPU"
        return (f"rank {self.rank}: node {self.host_ip} (id {self.node_id[:12]}), {gpus}, "
                f"{self.threads} CPU threads, pid {self.pid}")


def threads_per_rank(placements: list[RankPlacement], given: int | None) -> list[int]:
    """Each rank's CPU threads: `given` (OMP_NUM_THREADS where the engine runs) for every
    rank, else its machine's cores shared among the ranks placed on that machine (ranks with
    one host address share one machine: Ray nodes started on the same host do)."""
    if given:
        return [given] * len(placements)
    sharing: dict[str, int] = {}
    for placement in placements:
        sharing[placement.host_ip] = sharing.get(placement.host_ip, 0) + 1
    return [max(1, p.cores // sharing[p.host_ip]) for p in placements]


class RayWorkerHost:
    """One rank: placed first (placement(), free_port()), then start() builds its Worker,
    then call() answers each call frame with one reply frame."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.answerer: CallAnswerer | None = None
        configure_rank_logging(rank)

    def placement(self) -> tuple:
        """Its RankPlacement's fields (plain values: the executor builds the dataclass)."""
        import ray
        context = ray.get_runtime_context()
        gpus = context.get_accelerator_ids().get("GPU", [])
        node_id = context.get_node_id()
        host_ip = os.environ.get(HOST_IP_ENV) or _node_address(ray, node_id)
        return (self.rank, host_ip, node_id, tuple(str(g) for g in gpus), os.getpid(),
                affinity_cores())

    def free_port(self) -> int:
        """A port free on this node now, for torch.distributed's rendezvous (rank 0)."""
        return free_port("")

    def start(self, config_frame: bytes, max_model_len: int, setup: tuple,
              threads: int) -> bytes:
        """Run torch on `threads` CPU threads (Ray gives a one-CPU actor one) and build the
        Worker; a reply frame: nothing, or the error that stopped it (a model that cannot be
        found or loaded) for the executor to raise."""
        import torch
        torch.set_num_threads(threads)
        try:
            worker = Worker(WorkerConfig(serial.decode_config(config_frame), max_model_len),
                            rank=RankSetup(*setup))
        except Exception as exc:  # noqa: BLE001 -- sent to the executor, which raises it
            return serial.encode_reply(error=exc)
        self.answerer = CallAnswerer(worker, self.rank)
        return serial.encode_reply(None)

    def call(self, frame: bytes) -> bytes:
        return self.answerer.answer(frame).reply

    def torch_threads(self) -> int:
        """The CPU threads torch runs this rank's operations on."""
        import torch
        return torch.get_num_threads()


def _node_address(ray, node_id: str) -> str:
    """The address the cluster knows this node by (`ray start --node-ip-address`, else the
    one Ray found)."""
    for node in ray.nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()
