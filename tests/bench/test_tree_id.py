"""bench/gpu/tree_id.sh: the working tree's fingerprint of pagoda/'s source matches the
commit it was checked out from, and tells an edit of that source apart."""

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "tree_id.sh"

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def _fingerprint(repo: Path, *commit: str) -> str:
    return subprocess.run(["bash", str(SCRIPT), *commit], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    (tmp_path / "pagoda" / "layers").mkdir(parents=True)
    (tmp_path / "pagoda" / "__init__.py").write_text("")
    (tmp_path / "pagoda" / "layers" / "kernel.py").write_text("def f():\n    return 1\n")
    (tmp_path / "pagoda" / "layers" / "op.cpp").write_text("int f() { return 1; }\n")
    (tmp_path / "pagoda" / "notes.txt").write_text("not source\n")
    (tmp_path / "README.md").write_text("outside pagoda/\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "first")
    return tmp_path


def test_a_clean_checkout_matches_its_commit(repo: Path):
    working = _fingerprint(repo)
    assert len(working) == 12 and int(working, 16) >= 0
    assert working == _fingerprint(repo, "HEAD")


def test_an_edit_of_the_source_changes_the_working_trees_fingerprint_only(repo: Path):
    before = _fingerprint(repo)
    (repo / "pagoda" / "layers" / "op.cpp").write_text("int f() { return 2; }\n")
    assert _fingerprint(repo) != before
    assert _fingerprint(repo, "HEAD") == before
    _git(repo, "commit", "-qam", "second")
    assert _fingerprint(repo, "HEAD") == _fingerprint(repo) != before
    assert _fingerprint(repo, "HEAD~1") == before


def test_files_that_are_not_source_or_not_under_pagoda_leave_it(repo: Path):
    before = _fingerprint(repo)
    (repo / "pagoda" / "notes.txt").write_text("edited\n")
    (repo / "README.md").write_text("edited\n")
    assert _fingerprint(repo) == before


def test_a_renamed_source_file_changes_it(repo: Path):
    before = _fingerprint(repo)
    (repo / "pagoda" / "layers" / "kernel.py").rename(repo / "pagoda" / "layers" / "k.py")
    assert _fingerprint(repo) != before
