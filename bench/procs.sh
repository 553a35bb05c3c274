# Sourced by bench/smoke.sh and bench/fanout.sh: a scratch directory and the processes a
# script starts (append their pids to PIDS), all removed or stopped on exit; and wait_addr.
# $1 = the script's name, for messages and the scratch directory.
BENCH_NAME=$1
WORK=$(mktemp -d "/tmp/wslb-$BENCH_NAME.XXXXXX")
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_addr FILE [MARKER]: the 127.0.0.1:PORT after MARKER ("listening on " by default) in
# FILE, within 10 s.
wait_addr() {
    local i marker=${2:-listening on }
    for ((i = 0; i < 200; i++)); do
        if grep -q "$marker" "$1" 2>/dev/null; then
            sed -n "s/.*$marker\(127\.0\.0\.1:[0-9]*\).*/\1/p" "$1" | sed -n 1p
            return 0
        fi
        sleep 0.05
    done
    echo "$BENCH_NAME: no '$marker' in $1:" >&2
    cat "$1" >&2
    return 1
}
