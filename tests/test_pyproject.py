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


def test_every_kernel_source_is_installed_with_its_package():
    """The C++ sources pagoda compiles at first use ship in the wheel beside their modules."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution
    package_data = apply_configuration(Distribution(), PYPROJECT).package_data
    root = PYPROJECT.parent
    sources = sorted((root / "pagoda").rglob("*.cpp"))
    assert sources
    for source in sources:
        package = ".".join(source.parent.relative_to(root).parts)
        assert "*.cpp" in package_data.get(package, []), source
