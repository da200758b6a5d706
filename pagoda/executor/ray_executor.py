"""RayExecutor: one Ray actor per rank on a running Ray cluster (`ray start --head` on one
node, `ray start --address=HEAD:6379` on the others), so that an engine's ranks can span
several machines. Ray is an optional extra (`pip install pagoda[ray]`).

The ranks get one placement-group bundle each ({"GPU": 1} on CUDA, {"CPU": 1} on CPU), and
each actor builds the same Worker a worker process builds (ray_worker.py), with its machine's
CPU cores shared among the ranks placed there as torch's threads (Ray would give a one-CPU
actor one). Calls and replies are the multi-process executor's msgpack frames
(worker_group.py), carried by actor method calls: Ray runs one actor's calls in the order
they were sent, so a step can stay in flight the same way. torch.distributed's ranks meet at
rank 0's node (PAGODA_HOST_IP on that node, else Ray's address for it) on a port free there;
GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME set here reach every actor.

An actor that dies (its process killed, its node lost) fails the waiting call at once with
WorkerError naming the rank, even while the other ranks wait for it in a collective.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

from pagoda.errors import ConfigError
from pagoda.executor import serial
from pagoda.executor.base import WorkerConfig
from pagoda.executor.ray_worker import RankPlacement, RayWorkerHost, threads_per_rank
from pagoda.executor.worker_group import RankHandle, WorkerError, WorkerGroupExecutor
from pagoda.logger import get_logger

logger = get_logger(__name__)

__all__ = ["RayExecutor", "WorkerError"]

PLACEMENT_TIMEOUT_S = 60.0  # how long the cluster may take to find a bundle for every rank
START_TIMEOUT_S = 300.0  # how long the actors may take to start (Ray starts their processes)
STOP_TIMEOUT_S = 5.0  # how long the actors get to answer shutdown before they are killed
# set here, these reach every actor (the rest of a node's environment is the one it was
# started with: set PAGODA_HOST_IP on each node before its `ray start`)
FORWARDED_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "PAGODA_LOG_LEVEL",
                 "HF_TOKEN", "HF_HUB_OFFLINE")
INSTALL_HINT = "pip install pagoda[ray]"
CLUSTER_HINT = ("start one with `ray start --head` (then `ray start --address=<head ip>:6379` "
                "on each other node), or use --distributed-executor-backend mp on one machine")


class _RankActor(RankHandle):
    """One rank's actor, its replies still to come (object refs, oldest first), and where
    Ray placed it."""

    def __init__(self, rank: int, actor: Any) -> None:
        super().__init__(rank)
        self.actor = actor
        self.refs: deque[Any] = deque()
        self.placement: RankPlacement | None = None
        self.death: BaseException | None = None  # how Ray reported it gone


class RayExecutor(WorkerGroupExecutor):
    """Places tensor_parallel_size x pipeline_parallel_size actors on the Ray cluster and
    drives them in lockstep."""

    def __init__(self, config: WorkerConfig) -> None:
        super().__init__(config)
        self._ray = import_ray()
        connect(self._ray)
        use_gpu = _wants_gpus(config, self._ray)
        self.workers: list[_RankActor] = []
        self._group = self._reserve(use_gpu)
        try:
            self._start_actors(config, use_gpu)
        except BaseException:
            self._stop()
            raise
        for worker in self.workers:
            logger.info("Ray executor: %s", worker.placement.describe())

    def placements(self) -> list[RankPlacement]:
        """Where each rank runs, in rank order."""
        return [worker.placement for worker in self.workers]

    # ---- start and stop -----------------------------------------------------------------------
    def _reserve(self, use_gpu: bool) -> Any:
        """A placement group with one bundle per rank, ready (else a ConfigError)."""
        from ray.util.placement_group import placement_group, remove_placement_group
        bundle = {"GPU": 1} if use_gpu else {"CPU": 1}
        group = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        ready, _ = self._ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(group)
            raise ConfigError(
                f"the Ray cluster has no room for {self.world_size} rank(s) of {bundle} within "
                f"{PLACEMENT_TIMEOUT_S:.0f} s (it has {_resources(self._ray)}); add nodes with "
                "`ray start --address=<head ip>:6379`, or lower tensor_parallel_size x "
                "pipeline_parallel_size")
        return group

    def _start_actors(self, config: WorkerConfig, use_gpu: bool) -> None:
        """Create the actors, learn where they are, then build each rank's Worker, all
        joining torch.distributed at rank 0's node."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        remote = self._ray.remote(RayWorkerHost)
        for rank in range(self.world_size):
            strategy = PlacementGroupSchedulingStrategy(
                self._group, placement_group_bundle_index=rank)
            actor = remote.options(
                num_cpus=0 if use_gpu else 1, num_gpus=1 if use_gpu else 0,
                scheduling_strategy=strategy,
                runtime_env={"env_vars": _actor_env()}).remote(rank)
            self.workers.append(_RankActor(rank, actor))
        self._learn_placements()
        port = self._wait_one(self.workers[0], self.workers[0].actor.free_port.remote())
        init_method = f"tcp://{self.workers[0].placement.host_ip}:{port}"
        frame = serial.encode_config(config.engine)
        parallel = config.engine.parallel
        for worker in self.workers:
            setup = (worker.rank, self.world_size, init_method, parallel.tensor_parallel_size,
                     0 if use_gpu else None)  # Ray shows each actor its own GPU only
            worker.refs.append(worker.actor.start.remote(frame, config.max_model_len, setup,
                                                         worker.placement.threads))
            worker.owed.append("start")
        for worker in self.workers:
            self._settle(worker)

    def _learn_placements(self) -> None:
        """Where each actor is, and the CPU threads each rank gets there."""
        placements = [RankPlacement(*self._wait_one(worker, worker.actor.placement.remote()))
                      for worker in self.workers]
        given = os.environ.get("OMP_NUM_THREADS", "").strip()
        threads = threads_per_rank(placements, int(given) if given.isdigit() else None)
        for worker, placement, count in zip(self.workers, placements, threads):
            worker.placement = replace(placement, threads=count)

    def _wait_one(self, worker: _RankActor, ref: Any) -> Any:
        """An actor's answer during start-up (not a reply frame)."""
        ready, _ = self._ray.wait([ref], timeout=START_TIMEOUT_S)
        if not ready:
            self._fail(f"Ray worker rank {worker.rank} did not start within "
                       f"{START_TIMEOUT_S:.0f} s")
        return self._get(worker, ref)

    def shutdown(self) -> None:
        """Ask every actor to stop and give it STOP_TIMEOUT_S to; then end them all."""
        if self._dead is None and self.workers:
            frame = serial.encode(serial.PlainCall("shutdown"))
            refs = [worker.actor.call.remote(frame) for worker in self.workers]
            self._ray.wait(refs, num_returns=len(refs), timeout=STOP_TIMEOUT_S)
        self._dead = self._dead or "the executor was shut down"
        self._stop()

    def _stop(self) -> None:
        """Kill the actors and free their bundles (nothing left to do once this process has
        left the cluster: Ray ended them then)."""
        from ray.util.placement_group import remove_placement_group
        if self._ray.is_initialized():
            for worker in self.workers:
                self._ray.kill(worker.actor)
            if self._group is not None:
                remove_placement_group(self._group)
        self.workers.clear()
        self._group = None

    # ---- the control channel ------------------------------------------------------------------
    def _send(self, worker: _RankActor, frame: bytes) -> bool:
        if worker.death is not None:
            return False
        worker.refs.append(worker.actor.call.remote(frame))
        return True

    def _receive(self, worker: _RankActor) -> bytes:
        """The worker's oldest reply, watching every other rank's pending replies for a
        death meanwhile (a live rank may wait in a collective for a dead one)."""
        ref = worker.refs[0]
        owners = {other: w for w in self.workers if w is not worker for other in w.refs}
        pending = [ref, *owners]
        while True:
            ready, pending = self._ray.wait(pending, num_returns=1)
            for done in ready:
                if done == ref:
                    frame = self._get(worker, ref)
                    worker.refs.popleft()
                    return frame
                self._get(owners[done], done)  # raises if that rank is gone

    def _get(self, worker: _RankActor, ref: Any) -> Any:
        """ref's value; a dead actor fails the engine naming its rank."""
        from ray.exceptions import RayActorError, RayError
        try:
            return self._ray.get(ref)
        except (RayActorError, RayError) as exc:
            worker.death = exc
            self._fail_dead(worker)

    def _fail_dead(self, worker: _RankActor) -> None:
        where = worker.placement.describe() if worker.placement else f"rank {worker.rank}"
        if worker.death is None:
            self._fail(f"Ray worker {where} is unreachable")
        why = (str(worker.death).strip().splitlines() or [""])[0]
        self._fail(f"Ray worker {where} is gone: {type(worker.death).__name__}: {why}")

    def _first_dead(self, timeout: float, besides: _RankActor) -> _RankActor | None:
        """A rank other than `besides` whose pending replies fail because its actor is
        gone, waiting up to `timeout` for one to."""
        from ray.exceptions import RayActorError
        owners = {ref: w for w in self.workers if w is not besides for ref in w.refs}
        if not owners:
            return None
        ready, _ = self._ray.wait(list(owners), num_returns=len(owners), timeout=timeout)
        for ref in ready:
            try:
                self._ray.get(ref)
            except RayActorError as exc:
                owners[ref].death = exc
                return owners[ref]
        return None


def import_ray() -> Any:
    """The ray module, or a ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--distributed-executor-backend ray needs Ray, an optional extra: "
                          f"{INSTALL_HINT}") from None
    return ray


def connect(ray: Any) -> None:
    """Join the running cluster (RAY_ADDRESS, else the one `ray start` left on this node);
    a ConfigError at once where there is none (never start a private one)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "auto"
    host, _, port = address.rpartition(":")
    if address != "auto" and not address.startswith("ray://") \
            and not _reachable(host.strip("[]"), port):
        raise ConfigError(f"no Ray cluster answers at RAY_ADDRESS={address}: {CLUSTER_HINT}")
    try:
        ray.init(address=address, logging_level="WARNING", log_to_driver=True)
    except ConnectionError as exc:
        raise ConfigError(f"no Ray cluster is running ({str(exc).splitlines()[0]}): "
                          f"{CLUSTER_HINT}") from None


def _reachable(host: str, port: str) -> bool:
    if not port.isdigit():
        return False
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3.0):
            return True
    except OSError:
        return False


def _pagoda_path() -> str:
    """PYTHONPATH for the actors: the directory this pagoda is imported from first (a source
    checkout runs its own code in the actors, as in the engine process), then the rest."""
    here = str(Path(__file__).resolve().parents[2])
    rest = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join([here, *filter(None, rest.split(os.pathsep))])


def _actor_env() -> dict[str, str]:
    forwarded = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    return {**forwarded, "PYTHONPATH": _pagoda_path()}


def _wants_gpus(config: WorkerConfig, ray: Any) -> bool:
    """GPU bundles where the device is CUDA (auto: where the cluster has GPUs)."""
    device = config.engine.device
    if device.startswith("cuda"):
        return True
    return device == "auto" and ray.cluster_resources().get("GPU", 0) > 0


def _resources(ray: Any) -> str:
    available = ray.available_resources()
    return ", ".join(f"{key} {available.get(key, 0):g} free" for key in ("CPU", "GPU")) \
        + f" over {len(ray.nodes())} node(s)"

