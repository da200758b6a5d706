#!/usr/bin/env bash
# Ray for the GPU machine within a device call's 64 MiB carry: the wheel pyproject.toml pins
# (CPython 3.12, the GPU image's), without what pagoda's Ray executor never loads (Java jars,
# RLlib, Data, Tune, Train, Serve, LLM, the dashboard's web client), xz-compressed into
# .whl/ray-slim.tar.xz (about 20 MB), plus the wheels of Ray's dependencies the image lacks.
# bench/gpu/run.sh unpacks it next to the other wheels. The CPU Ray tests pass on this cut
# (tests/executor/test_ray_executor.py with the same directories removed from a local Ray).
# Usage (repository root, needs unzip and xz):  bash bench/gpu/pack_ray.sh
set -euo pipefail
version=$(grep -o '"ray==[0-9.]*"' pyproject.toml | head -1 | tr -d '"' | cut -d= -f3)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 "ray==$version" -d "$work"
unzip -q "$work"/ray-*.whl -d "$work/tree"  # unzip keeps the binaries' exec bits
rm -rf "$work/tree/ray/"{jars,rllib,data,tune,train,serve,llm,dashboard/client}
mkdir -p .whl
tar -C "$work/tree" -cf - ray "ray-$version.dist-info" | xz -9 -T0 > .whl/ray-slim.tar.xz
../shared/tools/device-wheels.sh jsonschema  # Ray's one requirement the image lacks
du -sh .whl/ray-slim.tar.xz .whl
