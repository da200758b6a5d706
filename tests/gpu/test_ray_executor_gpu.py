"""The Ray executor on CUDA, on a one-node Ray cluster holding this machine's GPUs: each rank's
actor gets its own GPU (a {"GPU": 1} bundle, seen as cuda:0 inside the actor) and the engine
gives the multi-process executor's greedy tokens, over NCCL with two GPUs."""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install pagoda[ray])")

from pagoda.executor.ray_executor import RayExecutor  # noqa: E402
from tests.gpu import test_executor_gpu  # noqa: E402
from tests.gpu.test_executor_gpu import greedy, make  # noqa: E402
from tests.utils import local_ray_cluster  # noqa: E402

checkpoint = test_executor_gpu.checkpoint  # the same random Llama fixture


@pytest.fixture(scope="module")
def cluster():
    gpus = torch.cuda.device_count()
    with local_ray_cluster([f"--num-gpus={gpus}", "--num-cpus=4",
                            "--include-dashboard=false"]) as address, \
            pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ADDRESS", address)
        try:
            yield gpus
        finally:
            if ray.is_initialized():
                ray.shutdown()


def test_each_rank_gets_its_own_gpu_and_the_mp_tokens(cluster, checkpoint):
    ranks = min(cluster, 2)
    reference = make(checkpoint, tensor_parallel_size=ranks, distributed_executor_backend="mp")
    expected = greedy(reference)
    reference.engine.core.shutdown()
    del reference
    torch.cuda.empty_cache()
    llm = make(checkpoint, tensor_parallel_size=ranks, distributed_executor_backend="ray")
    executor = llm.engine.core.executor
    assert isinstance(executor, RayExecutor)
    gpus = [p.gpu_ids for p in executor.placements()]
    assert all(len(ids) == 1 for ids in gpus) and len(set(gpus)) == ranks
    assert executor.loaded_model.device == "cuda:0"  # the actor sees its GPU alone
    assert greedy(llm) == expected
    llm.engine.core.shutdown()
