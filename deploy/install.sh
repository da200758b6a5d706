#!/bin/sh
# The one way pagoda is installed from this repository: `make install` and both container images
# run this script, so the image gets exactly the versions the tests ran with.
#   deploy/install.sh PYTHON PIP_INSTALL_ARGS...   e.g. deploy/install.sh .venv/bin/python -e ".[test]"
# Run from the repository root. Extra package indexes come from pip's environment
# (PIP_EXTRA_INDEX_URL), e.g. the CPU image's PyTorch index.
set -eu
python=$1
shift
"$python" -m pip install -q --upgrade pip
"$python" -m pip install -q -c constraints/cpu.txt "$@"
