#!/bin/sh
# The one way pagoda is installed from this repository: `make install` and both container images
# run this script, so an image gets the versions the tests ran with.
#   deploy/install.sh PYTHON PIP_INSTALL_ARGS...   e.g. deploy/install.sh .venv/bin/python -e ".[test]"
# Run from the repository root. Extra package indexes come from pip's environment
# (PIP_EXTRA_INDEX_URL), e.g. the CPU image's PyTorch index. PAGODA_UNPIN names packages whose
# pin is left out: the CUDA image takes the Triton its CUDA build of torch requires.
set -eu
python=$1
shift
constraints=constraints/cpu.txt
if [ -n "${PAGODA_UNPIN:-}" ]; then
    unpinned=$(mktemp)
    cp "$constraints" "$unpinned"
    for name in $PAGODA_UNPIN; do
        grep -v -i "^$name==" "$unpinned" > "$unpinned.next" || true
        mv "$unpinned.next" "$unpinned"
    done
    constraints=$unpinned
fi
"$python" -m pip install -q --upgrade pip
"$python" -m pip install -q -c "$constraints" "$@"
