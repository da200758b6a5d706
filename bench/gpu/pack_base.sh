#!/usr/bin/env bash
# A commit's pagoda/ beside the working tree, for timing a change against it in one device
# call: unpacks COMMIT's pagoda/ into .base/ (git-ignored; the stage links the tree's bench/
# configs in). Carry it with the wheels (run's carry: [".whl", ".base"]), then
# `bash bench/gpu/run.sh ab-decode1` alternates decode-1 of this tree and the base.
# Usage (repository root):  bash bench/gpu/pack_base.sh COMMIT
set -euo pipefail
commit=${1:?usage: bash bench/gpu/pack_base.sh COMMIT}
rm -rf .base
mkdir .base
git archive "$commit" pagoda | tar -x -C .base
git rev-parse "$commit" > .base/COMMIT
du -sh .base
