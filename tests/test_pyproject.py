"""pyproject.toml installs without setuptools warnings (they print during `make install`)."""

from __future__ import annotations

import warnings
from pathlib import Path

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def test_setuptools_reads_the_project_without_warnings():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), PYPROJECT)
    assert [str(w.message).splitlines()[0] for w in caught] == []
    assert dist.metadata.license_expression == "Apache-2.0"
