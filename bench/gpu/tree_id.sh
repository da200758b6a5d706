#!/usr/bin/env bash
# A fingerprint of pagoda/'s source: the git blob hash and path of each of its .py, .cpp and
# .h files, sorted by path, hashed. Without an argument, of the working tree (run.sh prints
# it on the device, whose copy's git history stays at the session's first commit); with
# COMMIT, of that commit's files. Equal fingerprints: the same code.
# Usage (repository root):  bash bench/gpu/tree_id.sh [COMMIT]
set -euo pipefail
if [ $# -eq 0 ]; then
  find pagoda -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.h' \) | LC_ALL=C sort \
    | while read -r path; do echo "$(git hash-object "$path") $path"; done
else
  git ls-tree -r "$1" pagoda | awk '$4 ~ /\.(py|cpp|h)$/ {print $3, $4}' \
    | LC_ALL=C sort -k2
fi | sha1sum | cut -c1-12
