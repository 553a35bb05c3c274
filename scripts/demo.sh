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
# Backend ports: WSLB_DEMO_BACKEND_PORTS="9001 9002", else two free ones.
read -r -a ports <<<"${WSLB_DEMO_BACKEND_PORTS:-$(python3 -c '
import socket
ss = [socket.socket() for _ in range(2)]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))')}"
for spec in "alpha:${ports[0]}" "beta:${ports[1]}"; do
  name=${spec%%:*} port=${spec##*:}
  "$BIN/wslb" agent --balancer "ws://127.0.0.1:$CONTROL/register" --guid "$name" \
    --binding "ws://127.0.0.1:$port" -- \
    "$BIN/examples/echo_backend" --name "$name" --listen "127.0.0.1:$port" & pids+=($!)
done
sleep 0.5
cat <<MSG

  wslb is running on http://127.0.0.1:$PORT/ ; backends alpha (:${ports[0]}) and beta
  (:${ports[1]}) registered themselves on the control port $CONTROL through 'wslb agent'.

  Open   http://127.0.0.1:$PORT/demo      and click "Open a WebSocket" a few times.
  Status http://127.0.0.1:$CONTROL/       (backends, connections; /metrics for Prometheus)
  Or try for i in 1 2 3 4 5 6; do curl -s http://127.0.0.1:$PORT/; done
         (fewest connections, ties broken at random: both backends show up)
         curl -d hello http://127.0.0.1:$CONTROL/api/broadcast   (reaches every open WebSocket)

  Ports: WSLB_DEMO_PORT (8080), WSLB_DEMO_CONTROL (9090), WSLB_DEMO_BACKEND_PORTS.
  Ctrl-C stops everything.
MSG
wait "${pids[0]}"
