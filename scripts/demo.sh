#!/usr/bin/env bash
# `make run`: the balancer plus two example backends on loopback, until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
PORT=${WSLB_DEMO_PORT:-8080}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

"$BIN/examples/echo_backend" --name alpha --listen 127.0.0.1:9001 >/dev/null & pids+=($!)
"$BIN/examples/echo_backend" --name beta --listen 127.0.0.1:9002 >/dev/null & pids+=($!)
"$BIN/wslb" -l "127.0.0.1:$PORT" -B ws://127.0.0.1:9001 -B ws://127.0.0.1:9002 -a fewest & pids+=($!)
sleep 0.3
cat <<MSG

  wslb is running on http://127.0.0.1:$PORT/ with backends alpha (:9001) and beta (:9002).

  Open   http://127.0.0.1:$PORT/demo   and click "Open a WebSocket" a few times.
  Or try curl http://127.0.0.1:$PORT/   (twice: see both backends answer)

  Ctrl-C stops everything.
MSG
wait "${pids[2]}"
