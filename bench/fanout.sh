#!/usr/bin/env bash
# Backend broadcast fan-out (issue 17): one balancer, N WebSocket clients (default 9,000)
# paired with bench_backend, and `examples/fanout` registered as a backend that broadcasts
# SIZE bytes (default 128) ROUNDS times on the control channel. Prints one JSON line: time
# from the broadcast request to the first and the last client having it (median and worst),
# and the balancer's CPU time per broadcast (/proc, clock-tick resolution, averaged).
# A process may hold at most 20,000 descriptors here: 9,000 clients cost the balancer 18,000.
#
#   bash bench/fanout.sh [--n 9000] [--size 128] [--rounds 20] [--no-build]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CARGO=${CARGO:-cargo}
N=9000 SIZE=128 ROUNDS=20 BUILD=1
while [ $# -gt 0 ]; do
    case $1 in
    --n) N=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    *) echo "fanout.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ "$BUILD" = 1 ] && (cd "$ROOT" && "$CARGO" build --release --bins --examples --quiet)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
ulimit -n "$(ulimit -Hn)"
NEED=$((2 * N + 100))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$NEED" ]; then
    echo "fanout.sh: the balancer needs $NEED descriptors for $N clients, the limit is $(ulimit -n)" >&2
    exit 1
fi
# shellcheck source=bench/procs.sh
source "$ROOT/bench/procs.sh" fanout

"$BIN/examples/bench_backend" >"$WORK/backend.out" 2>&1 &
PIDS+=($!)
BACKEND=$(wait_addr "$WORK/backend.out")
"$BIN/wslb" -l 127.0.0.1:0 --control 127.0.0.1:0 2>"$WORK/wslb.err" &
WSLB_PID=$!
PIDS+=($WSLB_PID)
TARGET=$(wait_addr "$WORK/wslb.err")
CONTROL=$(wait_addr "$WORK/wslb.err" "control listening on ")
"$BIN/examples/fanout" --control "$CONTROL" --target "$TARGET" --binding "ws://$BACKEND" \
    --n "$N" --size "$SIZE" --rounds "$ROUNDS" --pid "$WSLB_PID"
