"""pagoda's home: $PAGODA_HOME, else ~/.cache/pagoda, and what is kept under it."""

from __future__ import annotations

from pathlib import Path

from pagoda.cli.create import default_models_file
from pagoda.home import home_dir
from pagoda.layers.cpu_kernels import kernels_dir
from pagoda.models.store import models_dir


def test_pagoda_home_is_the_variable_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PAGODA_HOME", "~/data")
    assert home_dir() == tmp_path / "data"


def test_without_the_variable_it_is_under_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("PAGODA_HOME", raising=False)
    assert home_dir() == Path(tmp_path) / ".cache" / "pagoda"


def test_models_the_models_file_and_kernels_are_kept_there(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGODA_HOME", str(tmp_path))
    assert models_dir() == tmp_path / "models"
    assert default_models_file() == tmp_path / "models.yaml"
    assert kernels_dir() == tmp_path / "kernels"
