#!/usr/bin/env bash
# `make run`: the balancer with a control port, and two example backends that register
# themselves through `wslb agent` (which also supervises them). Runs until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release
PORT=${WSLB_DEMO_PORT:-8080}
CONTROL=${WSLB_DEMO_CONTROL:-9090}
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

"$BIN/wslb" -l "127.0.0.1:$PORT" --control "127.0.0.1:$CONTROL" -a fewest & pids+=($!)
sleep 0.3
for spec in alpha:9001 beta:9002; do
  name=${spec%%:*} port=${spec##*:}
  "$BIN/wslb" agent --balancer "ws://127.0.0.1:$CONTROL/register" --guid "$name" \
    --binding "ws://127.0.0.1:$port" -- \
    "$BIN/examples/echo_backend" --name "$name" --listen "127.0.0.1:$port" & pids+=($!)
done
sleep 0.5
cat <<MSG

  wslb is running on http://127.0.0.1:$PORT/ ; backends alpha (:9001) and beta (:9002)
  registered themselves on the control port $CONTROL through 'wslb agent'.

  Open   http://127.0.0.1:$PORT/demo      and click "Open a WebSocket" a few times.
  Status http://127.0.0.1:$CONTROL/       (backends, connections; /metrics for Prometheus)
  Or try curl http://127.0.0.1:$PORT/     (twice: both backends answer)
         curl -d hello http://127.0.0.1:$CONTROL/api/broadcast   (reaches every open WebSocket)

  Ctrl-C stops everything.
MSG
wait "${pids[0]}"
