#!/usr/bin/env bash
# The API process's CPU a streamed token, and how it holds up short of CPU: `pagoda serve` on
# a tiny random-weight model (its engine and the benchmark client on core 1, the API process
# on core 0 beside HOGS busy loops; 0 for none), 256 streams of 256 tokens through
# `pagoda bench serve`. Run it for two checkouts to compare them.
# Usage (repo root; needs 2 cores): bash bench/cpu/saturated_api.sh CHECKOUT_DIR [HOGS]
#   the tiny model: python -c "from pathlib import Path; from pagoda.models import store;
#   from tests.utils import tiny_chat_model; tiny_chat_model(Path('/tmp/tinym'),
#   store.find_pulled('smollm2'))"
set -u
CODE=$(cd "$1" && pwd)
HOGS=${2:-5}
PY=${PY:-$(pwd)/.venv/bin/python}
PORT=${PORT:-8045}
(cd "$CODE" && PYTHONPATH=$CODE taskset -c 1 "$PY" -m pagoda.cli.main serve /tmp/tinym \
  --max-num-seqs 256 --port $PORT --disable-log-requests > /tmp/saturated-api-server.log 2>&1) &
for _ in $(seq 60); do curl -s -o /dev/null localhost:$PORT/health && break; sleep 1; done
SERVER=$(pgrep -f "serve /tmp/tinym --max-num-seqs 256 --port $PORT" | head -1)
taskset -cp 0 "$SERVER" > /dev/null  # the API process's main thread; its engine stays on 1
HOG_PIDS=()
for _ in $(seq "$HOGS"); do taskset -c 0 python3 -c "while True: pass" & HOG_PIDS+=($!); done
cpu_ticks() { awk '{print $14 + $15}' "/proc/$SERVER/stat"; }
before=$(cpu_ticks)
taskset -c 1 "$PY" -m pagoda.cli.main bench serve --port $PORT --tokenizer /tmp/tinym \
  --num-prompts 512 --random-input-len 32 --random-output-len 256 --ignore-eos \
  --max-concurrency 256 --disable-tqdm > /tmp/saturated-api-bench.txt 2>&1
used=$(( $(cpu_ticks) - before ))
grep -E 'Output token throughput|Median TTFT|P99 TTFT|Median ITL|P99 ITL' /tmp/saturated-api-bench.txt
tokens=$(awk '/Total generated tokens/ {print $NF}' /tmp/saturated-api-bench.txt)
hz=$(getconf CLK_TCK)
python3 -c "print(f'API process CPU: {$used / $hz:.2f} s, {$used / $hz / $tokens * 1e6:.1f} us a token')"
kill "${HOG_PIDS[@]}" "$SERVER" 2>/dev/null
wait 2>/dev/null
