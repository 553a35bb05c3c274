#!/usr/bin/env bash
# A/B of two wslb binaries on the same backends, rounds interleaved (A, B, then B, A, ...), so
# a change can be measured against the binary before it on a noisy machine.
#
#   bash bench/ab.sh OLD_WSLB NEW_WSLB [--rounds N] [--secs S]
#
# Prints, per scenario (HTTP keep-alive, WebSocket echo), each round's ops/s and the median
# ratio NEW/OLD. Uses the release loadgen and bench_backend of this tree
# (cargo build --release --examples).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 2 ] || { echo "usage: $0 OLD_WSLB NEW_WSLB [--rounds N] [--secs S]" >&2; exit 2; }
OLD=$1 NEW=$2
shift 2
ROUNDS=6 SECS=5
while [ $# -gt 0 ]; do
    case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --secs) SECS=$2; shift 2 ;;
    *) echo "ab.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/examples
LOADGEN=$BIN/loadgen BACKEND=$BIN/bench_backend
for b in "$OLD" "$NEW" "$LOADGEN" "$BACKEND"; do
    [ -x "$b" ] || { echo "ab.sh: $b missing" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/wslb-ab.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

addr_of() { grep -o '127\.0\.0\.1:[0-9]*' <<<"$1" | head -n 1; }
wait_line() { # file needle seconds
    local i
    for ((i = 0; i < $3 * 20; i++)); do
        grep -m1 "$2" "$1" 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}

BADDRS=()
for b in 1 2; do
    "$BACKEND" --listen 127.0.0.1:0 --threads 1 >"$WORK/backend$b.log" 2>&1 &
    PIDS+=($!)
    BADDRS+=("$(addr_of "$(wait_line "$WORK/backend$b.log" "listening on" 10)")")
done
declare -A ADDR
for side in old new; do
    bin=$OLD
    [ "$side" = new ] && bin=$NEW
    "$bin" -l 127.0.0.1:0 -B "ws://${BADDRS[0]}" -B "ws://${BADDRS[1]}" --idle-timeout 300s \
        >"$WORK/$side.log" 2>&1 &
    PIDS+=($!)
    ADDR[$side]=$(addr_of "$(wait_line "$WORK/$side.log" "listening on" 10)")
done

ops() { sed -n 's/.*"ops_per_sec":\([0-9.]*\).*/\1/p'; }
for scen in http ws-echo; do
    ratios=()
    for ((r = 1; r <= ROUNDS; r++)); do
        order=(old new)
        [ $((r % 2)) = 0 ] && order=(new old)
        declare -A got=()
        for side in "${order[@]}"; do
            args=(--conns 64 --secs "$SECS" --warmup 1)
            [ "$scen" = http ] && args+=(--path /)
            [ "$scen" = ws-echo ] && args+=(--size 128)
            got[$side]=$("$LOADGEN" "$scen" --target "${ADDR[$side]}" --threads 1 "${args[@]}" | ops)
        done
        ratio=$(awk -v a="${got[old]}" -v b="${got[new]}" 'BEGIN {printf "%.3f", b / a}')
        ratios+=("$ratio")
        echo "$scen round $r: old ${got[old]} ops/s, new ${got[new]} ops/s, new/old $ratio"
    done
    median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR] = $1} END {print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2}')
    echo "$scen: median new/old $median over $ROUNDS interleaved rounds"
done
