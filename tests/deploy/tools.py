"""Where the deploy tests find their real tools: the ones pip installs next to this Python
(kubectl, hadolint), Debian's Prometheus, and the npm packages of tests/deploy/node."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
NODE_DIR = Path(__file__).resolve().parent / "node"


def python_tool(name: str) -> str:
    """A command installed by the test extras (fails, not skips: `make install` provides it)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: install the test extras (make install)")
    return found


def system_tool(name: str, how: str) -> str:
    """A command outside the venv; a test without it skips, saying how to get it."""
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"SKIPPED FOR WANT OF {name}: {how}")
    return found


def node_package(path: str) -> Path:
    """A file of an npm package installed under tests/deploy/node (make deploy-tools)."""
    found = NODE_DIR / "node_modules" / path
    if not found.exists():
        pytest.skip(f"SKIPPED FOR WANT OF npm packages: run `npm ci --prefix {NODE_DIR}` "
                    "(make deploy-tools does)")
    return found
