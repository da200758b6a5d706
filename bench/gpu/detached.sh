#!/usr/bin/env bash
# A device command longer than one call's 10 minutes, run over two calls: `start` runs a
# command detached (its files under /tmp/detached/out, given to it as $OUT) and waits out
# most of the call; `collect`, issued at once afterwards (the device machine is released
# after 30 s idle, and with it the detached command), waits for the command to end and
# copies its files and log to this call's $OUT.
#   bash bench/gpu/detached.sh start [SECONDS] -- COMMAND...   (waits SECONDS, default 585)
#   bash bench/gpu/detached.sh collect [TIMEOUT]               (default 540)
# e.g. SOAK_S=600 SOAK_SEQS=64 RELIABILITY_PHASES=soak \
#        bash bench/gpu/detached.sh start -- bash bench/gpu/run.sh reliability
set -u
DIR=/tmp/detached
case "${1:-}" in
  start)
    shift
    wait_s=585
    if [ "${1:-}" != "--" ]; then wait_s=$1; shift; fi
    [ "${1:-}" = "--" ] && shift
    rm -rf "$DIR" && mkdir -p "$DIR/out"
    OUT="$DIR/out" setsid nohup "$@" > "$DIR/log" 2>&1 < /dev/null &
    echo $! > "$DIR/pid"
    echo "started $* ($(date))"
    for _ in $(seq "$wait_s"); do kill -0 "$(cat "$DIR/pid")" 2>/dev/null || break; sleep 1; done
    tail -c 800 "$DIR/log"
    kill -0 "$(cat "$DIR/pid")" 2>/dev/null && echo "still running: collect it now ($(date))" ;;
  collect)
    [ -f "$DIR/pid" ] || { echo "nothing started on this machine (a fresh one?)"; exit 3; }
    for _ in $(seq "${2:-540}"); do kill -0 "$(cat "$DIR/pid")" 2>/dev/null || break; sleep 1; done
    tail -c 3000 "$DIR/log"
    cp "$DIR/log" "${OUT:?}/detached.log"
    find "$DIR/out" -maxdepth 2 -type f -exec cp {} "$OUT/" \;
    ls "$OUT" ;;
  *) echo "usage: $0 start [SECONDS] -- COMMAND... | collect [TIMEOUT]" >&2; exit 2 ;;
esac
