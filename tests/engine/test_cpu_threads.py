"""The engine's CPU thread count from affinity, cgroup quota and the HTTP process's share."""

from __future__ import annotations

from pathlib import Path

from pagoda.engine.cpu_threads import CpuBudget, cgroup_quota


def test_threads_leave_a_core_to_the_http_process():
    assert CpuBudget(affinity=2, quota=None).engine_threads() == 1
    assert CpuBudget(affinity=16, quota=None).engine_threads() == 15
    assert CpuBudget(affinity=1, quota=None).engine_threads() == 1


def test_a_cgroup_quota_caps_the_affinity():
    assert CpuBudget(affinity=64, quota=4.0).usable == 4
    assert CpuBudget(affinity=64, quota=2.5).engine_threads() == 2
    assert CpuBudget(affinity=2, quota=8.0).usable == 2


def test_cgroup_v2_quota_is_the_tightest_on_the_path(tmp_path: Path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/pod/app\n")
    (tmp_path / "pod" / "app").mkdir(parents=True)
    (tmp_path / "pod" / "cpu.max").write_text("300000 100000\n")
    (tmp_path / "pod" / "app" / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path, proc) == 3.0


def test_no_cgroup_means_no_quota(tmp_path: Path):
    assert cgroup_quota(tmp_path, tmp_path / "missing") is None
