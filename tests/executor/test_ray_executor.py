"""The Ray executor on a real two-node Ray cluster started on this machine (two `ray start`
processes, one CPU each): TP=2 places one rank on each node and gives the greedy tokens of
the one-rank engine; each rank runs torch on the CPU threads the executor gave it (not Ray's
one per one-CPU actor); a rank's actor process killed mid-run fails the next step at once with
WorkerError naming the rank; and without a cluster, `--distributed-executor-backend ray`
stops with one line saying how to start one."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip(
    "ray", reason="Ray is not installed (pip install pagoda[ray]): the Ray executor is untested")

from pagoda import LLM  # noqa: E402
from pagoda.cli.main import main  # noqa: E402
from pagoda.errors import ConfigError  # noqa: E402
from pagoda.executor import ray_executor  # noqa: E402
from pagoda.executor.ray_executor import RayExecutor, WorkerError  # noqa: E402
from pagoda.executor.ray_worker import RankPlacement, threads_per_rank  # noqa: E402
from tests.executor.test_in_process import GREEDY, PROMPT  # noqa: E402
from tests.utils import free_port, local_ray_cluster, tiny_chat_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    return tiny_chat_model(tmp_path_factory.mktemp("tiny"), smollm2_dir)


def test_without_a_cluster_the_ray_backend_stops_with_one_line(tiny_dir, monkeypatch, capsys):
    """(Runs before the cluster below starts: nothing answers at RAY_ADDRESS.)"""
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    # the command's log handler writes to capsys's stream, closed after this test
    monkeypatch.setattr(logging.getLogger("pagoda"), "handlers", [])
    status = main(["generate", "hi", "--model", str(tiny_dir), "--max-model-len", "64",
                   "-tp", "2", "--distributed-executor-backend", "ray"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and not ray.is_initialized()
    assert lines[-1].startswith("pagoda generate: no Ray cluster answers at RAY_ADDRESS=127.0.0.1:")
    assert "`ray start --head`" in lines[-1] and "--distributed-executor-backend mp" in lines[-1]


def test_the_socket_interfaces_reach_the_actors_and_the_host_ip_does_not(monkeypatch):
    """GLOO_/NCCL_SOCKET_IFNAME set for the engine are forwarded; PAGODA_HOST_IP is each
    node's own (set before its `ray start`), so the engine's is not."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    monkeypatch.setenv("PAGODA_HOST_IP", "10.1.2.3")
    env = ray_executor._actor_env()
    assert (env["GLOO_SOCKET_IFNAME"], env["NCCL_SOCKET_IFNAME"]) == ("eth7", "ib0")
    assert "PAGODA_HOST_IP" not in env
    # the actors import this checkout's pagoda first
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(Path(ray_executor.__file__).parents[2])


def test_without_ray_installed_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    with pytest.raises(ConfigError, match=r"needs Ray.*pip install pagoda\[ray\]"):
        ray_executor.import_ray()


@pytest.fixture(scope="module")
def cluster():
    """A head node and a second node on this machine, one CPU each; RAY_ADDRESS names the
    head, PAGODA_HOST_IP (each node's own) is loopback, and the engine's GLOO_SOCKET_IFNAME
    (loopback too) reaches the actors."""
    node = ["--num-cpus=1"]
    with local_ray_cluster([*node, "--include-dashboard=false"], node,
                           env={"PAGODA_HOST_IP": "127.0.0.1"}) as address, \
            pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ADDRESS", address)
        patch.setenv("GLOO_SOCKET_IFNAME", "lo")
        try:
            yield address
        finally:
            if ray.is_initialized():
                ray.shutdown()  # this process leaves the cluster before it stops


@pytest.fixture(scope="module")
def two_node_llm(cluster, tiny_dir):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "2")  # each rank's threads (Ray's default: one)
        llm = LLM(str(tiny_dir), max_model_len=64, tensor_parallel_size=2,
                  distributed_executor_backend="ray")
    yield llm
    with contextlib.suppress(WorkerError):
        llm.engine.core.shutdown()


def test_two_ranks_on_two_nodes_give_the_one_rank_tokens(two_node_llm, tiny_dir):
    executor = two_node_llm.engine.core.executor
    assert isinstance(executor, RayExecutor)
    placements = executor.placements()
    assert [p.rank for p in placements] == [0, 1]
    assert len({p.node_id for p in placements}) == 2  # one rank on each node
    assert all(p.gpu_ids == () and p.host_ip == "127.0.0.1" for p in placements)
    assert os.getpid() not in {p.pid for p in placements}
    prompts = [{"prompt_token_ids": PROMPT}, {"prompt_token_ids": PROMPT[:3]}]
    params = GREEDY.clone(max_tokens=6)
    expected = LLM(str(tiny_dir), max_model_len=64).generate(prompts, params)
    got = two_node_llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == \
        [o.outputs[0].token_ids for o in expected]


def test_each_rank_runs_on_the_threads_it_was_given(two_node_llm):
    executor = two_node_llm.engine.core.executor
    assert [p.threads for p in executor.placements()] == [2, 2]
    assert [ray.get(worker.actor.torch_threads.remote())
            for worker in executor.workers] == [2, 2]


def placed(rank: int, host: str, cores: int) -> RankPlacement:
    return RankPlacement(rank, host, f"node-{host}", (), 1000 + rank, cores)


def test_ranks_share_their_machines_cores():
    placements = [placed(0, "10.0.0.1", 8), placed(1, "10.0.0.1", 8),
                  placed(2, "10.0.0.2", 16), placed(3, "10.0.0.3", 1), placed(4, "10.0.0.3", 1)]
    assert threads_per_rank(placements, None) == [4, 4, 16, 1, 1]
    assert threads_per_rank(placements, 3) == [3] * 5  # OMP_NUM_THREADS: each rank's


def test_a_killed_rank_fails_the_next_step_at_once(two_node_llm):
    """(Last: the engine is done after it.)"""
    rank1 = two_node_llm.engine.core.executor.placements()[1]
    os.kill(rank1.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(WorkerError, match=r"Ray worker rank 1: node 127\.0\.0\.1 .*, pid "
                                          r"\d+ is gone: ActorDiedError"):
        two_node_llm.generate([{"prompt_token_ids": PROMPT}], GREEDY.clone(max_tokens=4))
    assert time.monotonic() - start < 20
    with pytest.raises(WorkerError, match="rank 1"):  # and every later call, at once
        two_node_llm.engine.core.executor.collect_output()
