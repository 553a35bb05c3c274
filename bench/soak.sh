#!/usr/bin/env bash
# Soak (`make soak`, not part of `make test`): SOAK_SECS (default 600) of churn through one
# release wslb — WebSockets opening and closing (plain and TLS), echo messages both ways
# (TLS ones over a record in size), TLS handshakes (resumed), HTTP requests, and
# a backend whose agent is restarted (deregisters, registers again) every SOAK_REREGISTER
# seconds (default 60) — while RSS and open descriptors are sampled every 10 s.
#
# Prints the samples and, over the samples after SOAK_WARMUP seconds (default 120), the
# least-squares slope of RSS (KiB/min) and the peak descriptor count of each two minutes.
# Fails (exit 1) when RSS grows by more than SOAK_MAX_KIB_PER_MIN (default 64), when the last
# peak of descriptors is over the first by more than 2 %, or when wslb logged an error the
# churn does not explain.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECS=${SOAK_SECS:-600}
REREG=${SOAK_REREGISTER:-60}
WARMUP=${SOAK_WARMUP:-120}
MAX_SLOPE=${SOAK_MAX_KIB_PER_MIN:-64}
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
EX=$BIN/examples
for b in "$BIN/wslb" "$EX/loadgen" "$EX/echo_backend"; do
    [ -x "$b" ] || { echo "soak: $b missing: cargo build --release --bins --examples" >&2; exit 1; }
done
# shellcheck source=bench/procs.sh
source "$ROOT/bench/procs.sh" soak

"$EX/echo_backend" --name s1 --listen 127.0.0.1:0 >"$WORK/s1.out" 2>&1 &
PIDS+=($!)
"$EX/echo_backend" --name s2 --listen 127.0.0.1:0 >"$WORK/s2.out" 2>&1 &
PIDS+=($!)
S1=$(wait_addr "$WORK/s1.out")
S2=$(wait_addr "$WORK/s2.out")
# TLS churn too: client-side TLS runs on buffers taken and given back per read and write.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost -addext basicConstraints=critical,CA:FALSE \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
"$BIN/wslb" -l 127.0.0.1:0 --tls-listen 127.0.0.1:0 --cert "$WORK/cert.pem" --key "$WORK/key.pem" \
    --control 127.0.0.1:0 -B "ws://$S1" -B "ws://$S2" \
    --heartbeat 1s >"$WORK/wslb.log" 2>&1 &
LB=$!
PIDS+=($LB)
ADDR=$(wait_addr "$WORK/wslb.log" "info: listening on ")
TLS_ADDR=$(wait_addr "$WORK/wslb.log" "tls listening on ")
CONTROL=$(wait_addr "$WORK/wslb.log" "control listening on ")

AGENT=
start_agent() {
    local port
    port=$("$EX/loadgen" free-ports --n 1 | tr -d '[] ')
    "$BIN/wslb" agent --balancer "ws://$CONTROL/register" --guid soak-agent \
        --binding "ws://127.0.0.1:$port" --heartbeat 1s -- \
        "$EX/echo_backend" --name agent --listen "127.0.0.1:$port" >>"$WORK/agent.log" 2>&1 &
    AGENT=$!
    PIDS+=($AGENT)
}
start_agent

# Churn: each loop runs one short scenario after another until the end.
END=$(($(date +%s) + SECS))
churn() {
    while [ "$(date +%s)" -lt "$END" ]; do
        "$@" >>"$WORK/load.log" 2>&1 || true
    done
}
churn "$EX/loadgen" ws-hold --target "$ADDR" --n 300 --parallel 50 --echo 1 &
PIDS+=($!)
churn "$EX/loadgen" ws-echo --target "$ADDR" --conns 16 --secs 5 &
PIDS+=($!)
churn "$EX/loadgen" http --target "$ADDR" --conns 8 --secs 5 &
PIDS+=($!)
churn "$EX/loadgen" ws-hold --tls --target "$TLS_ADDR" --n 100 --parallel 20 --echo 1 &
PIDS+=($!)
churn "$EX/loadgen" ws-echo --tls --target "$TLS_ADDR" --conns 4 --size 20000 --secs 5 &
PIDS+=($!)
churn "$EX/loadgen" tls-hs --resume --target "$TLS_ADDR" --conns 2 --secs 5 &
PIDS+=($!)

sample() { # seconds-since-start rss-kib fds
    local rss fds
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$LB/status")
    fds=$(find "/proc/$LB/fd" -mindepth 1 -maxdepth 1 | wc -l)
    echo "$1 $rss $fds"
}
START=$(date +%s)
NEXT_REREG=$((START + REREG))
: >"$WORK/samples"
echo "soak: ${SECS}s of churn through $ADDR; agent restarted every ${REREG}s" >&2
while [ "$(date +%s)" -lt "$END" ]; do
    sleep 10
    NOW=$(date +%s)
    [ "$NOW" -lt "$END" ] || break
    kill -0 "$LB" 2>/dev/null || { echo "soak: wslb exited" >&2; cat "$WORK/wslb.log" >&2; exit 1; }
    sample $((NOW - START)) | tee -a "$WORK/samples"
    if [ "$NOW" -ge "$NEXT_REREG" ]; then
        kill -TERM "$AGENT" 2>/dev/null || true
        wait "$AGENT" 2>/dev/null || true
        start_agent
        NEXT_REREG=$((NOW + REREG))
    fi
done

# After the warm-up: the least-squares slope of RSS (KiB/min) over every sample, and the
# highest descriptor count of each two minutes (the churn makes descriptors a saw-tooth
# between its phases: only a rising peak means descriptors are kept).
read -r RSS_SLOPE N <<<"$(awk -v w="$WARMUP" '$1 >= w {
    n++; x += $1; y += $2; xx += $1 * $1; xy += $1 * $2
} END {
    d = n * xx - x * x
    printf "%.1f %d\n", (n >= 3 && d != 0) ? 60 * (n * xy - x * y) / d : 0, n
}' "$WORK/samples")"
PEAKS=$(awk -v w="$WARMUP" '$1 >= w { m = int($1 / 120); if (!(m in p) || $3 > p[m]) p[m] = $3 }
    END { for (m in p) print m, p[m] }' "$WORK/samples" | sort -n | awk '{printf "%s ", $2}')
echo "soak: after ${WARMUP}s warm-up, $N samples: RSS slope $RSS_SLOPE KiB/min; descriptor peaks per 2 min: $PEAKS"
# Errors the churn explains: the agent's backend going away and coming back.
UNEXPECTED=$(grep -i 'error' "$WORK/wslb.log" | grep -v -e 'backend connect failed' \
    -e 'no backend could be reached' -e 'backend closed before answering' \
    -e 'heartbeats missed' || true)
STATUS=0
if awk -v s="$RSS_SLOPE" -v m="$MAX_SLOPE" 'BEGIN { exit !(s > m) }'; then
    echo "soak: RSS grows faster than $MAX_SLOPE KiB/min" >&2
    STATUS=1
fi
read -r FIRST LAST <<<"$(echo "$PEAKS" | awk '{print $1, $NF}')"
if awk -v f="${FIRST:-0}" -v l="${LAST:-0}" 'BEGIN { exit !(l > f * 1.02 + 4) }'; then
    echo "soak: descriptors grow: peaks $PEAKS" >&2
    STATUS=1
fi
if [ -n "$UNEXPECTED" ]; then
    echo "soak: unexpected errors:" >&2
    echo "$UNEXPECTED" | sort | uniq -c | sort -rn | head -20 >&2
    STATUS=1
fi
grep -c '"scenario"' "$WORK/load.log" | sed 's/^/soak: load runs completed: /'
exit $STATUS
