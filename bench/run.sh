#!/usr/bin/env bash
# wslb benchmark: the same scenarios against a backend directly (the proxy-less limit), wslb,
# HAProxy (nbthread 1) and nginx (worker_processes 1), targets interleaved within each round.
# Writes bench/results/latest.{jsonl,json,md} and prints the markdown table.
#
#   bash bench/run.sh [--rounds N] [--secs S] [--rate-secs S] [--hold N] [--targets "direct wslb haproxy nginx"]
#                     [--no-build] [--no-wrk] [--placement auto|split|float] [--fanout N] [--scale]
#
# --scale also runs bench/scale.sh afterwards (default steps; cost per held WebSocket, each
# proxy in turn) and prints its report (bench/results/scale.md).
# --fanout N also runs bench/fanout.sh (wslb only: backend broadcast to N clients) and
# writes its JSON line to bench/results/fanout.json.
#
# Env: CARGO (cargo), CARGO_TARGET_DIR (target), HAPROXY (haproxy), NGINX (nginx).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
ROUNDS=3 SECS=10 RATE_SECS=5 WARMUP=1 HOLD=10000 BUILD=1 WRK=1 PLACEMENT_MODE=auto FANOUT=0 SCALE=0
TARGETS="direct wslb haproxy nginx"
while [ $# -gt 0 ]; do
    case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --secs) SECS=$2; shift 2 ;;
    --rate-secs) RATE_SECS=$2; shift 2 ;;
    --hold) HOLD=$2; shift 2 ;;
    --targets) TARGETS=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --no-wrk) WRK=0; shift ;;
    --placement) PLACEMENT_MODE=$2; shift 2 ;; # auto | split | float
    --fanout) FANOUT=$2; shift 2 ;;
    --scale) SCALE=1; shift ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

bench_init bench
bench_binaries "$BUILD"

# --- which targets can run ----------------------------------------------------------------
want() { case " $TARGETS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
if want haproxy && ! command -v "$HAPROXY" >/dev/null; then
    log "haproxy not installed (make bench-deps): skipped"; TARGETS=${TARGETS//haproxy/}
fi
if want nginx && ! command -v "$NGINX" >/dev/null; then
    log "nginx not installed (make bench-deps): skipped"; TARGETS=${TARGETS//nginx/}
fi
[ "$WRK" = 1 ] && ! command -v wrk >/dev/null && WRK=0

# --- file descriptors: a proxy holding N WebSockets needs 2N + a few ------------------------
raise_nofile
# Headroom: listeners, idle keep-alive pools to the backends (nginx keeps up to 128), logs.
MAX_HOLD=$(((NOFILE - 600) / 2))
if [ "$HOLD" -gt "$MAX_HOLD" ]; then
    log "open-file limit is $NOFILE (cannot raise it): holding $MAX_HOLD WebSockets, not $HOLD"
    HOLD=$MAX_HOLD
fi
MAXCONN=$(((NOFILE - 100) / 2))

# --- CPU placement (bench/lib.sh) ----------------------------------------------------------
setup_placement "$PLACEMENT_MODE"
log "$PLACEMENT"

BUSY_BEFORE=$(busy_pct)
[ "$BUSY_BEFORE" -gt 10 ] && log "WARNING: the machine is already ${BUSY_BEFORE}% busy before the benchmark: numbers will be noisy"

CLK_TCK=$(getconf CLK_TCK)
RAW=$WORK/raw.jsonl
: >"$RAW"

# --- start everything ---------------------------------------------------------------------
start_backends
log "backends on ${BADDRS[*]}"
for t in wslb haproxy nginx; do want "$t" && start_target "$t"; done
PROXIES=()
for t in wslb haproxy nginx; do want "$t" && PROXIES+=("$t"); done
RUN_TARGETS=()
for t in direct "${PROXIES[@]}"; do want "$t" && RUN_TARGETS+=("$t"); done
log "targets: $(for t in "${RUN_TARGETS[@]}"; do printf '%s=%s ' "$t" "${TADDR[$t]}"; done)"
sleep 1

# Memory at start (no traffic yet).
declare -A RSS_START
for t in "${PROXIES[@]}"; do RSS_START[$t]=$(rss_of "$t"); done

# --- meta, sizes --------------------------------------------------------------------------
VERSIONS="wslb $("$WSLB" -V 2>&1 | sed -n 1p)"
command -v "$HAPROXY" >/dev/null && VERSIONS+="; $("$HAPROXY" -v 2>&1 | sed -n 1p | cut -d' ' -f1-3)"
command -v "$NGINX" >/dev/null && VERSIONS+="; $("$NGINX" -v 2>&1 | sed -n 1p)"
echo "{\"kind\":\"meta\",\"cpus\":$NCPU,\"placement\":$(json_str "$PLACEMENT"),\"rounds\":$ROUNDS,\"secs\":$SECS,\"rate_secs\":$RATE_SECS,\"warmup\":$WARMUP,\"hold\":$HOLD,\"nofile\":$NOFILE,\"versions\":$(json_str "$VERSIONS"),\"date\":\"$(date -u +%FT%TZ)\",\"kernel\":\"$(uname -r)\",\"busy_before_pct\":$BUSY_BEFORE,\"loadavg_start\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}" >>"$RAW"

# Size of an ELF file and of it plus the shared libraries it loads.
size_line() {
    local name=$1 file=$2 libs=0 f
    for f in $(ldd "$file" 2>/dev/null | awk '/=> \// {print $3} /^\t\// {print $1}'); do
        libs=$((libs + $(stat -L -c %s "$f")))
    done
    echo "{\"kind\":\"size\",\"target\":\"$name\",\"bytes\":$(stat -L -c %s "$file"),\"with_libs\":$(($(stat -L -c %s "$file") + libs))}" >>"$RAW"
}
strip -o "$WORK/wslb.stripped" "$WSLB" 2>/dev/null || cp "$WSLB" "$WORK/wslb.stripped"
size_line wslb "$WORK/wslb.stripped"
want haproxy && size_line haproxy "$(command -v "$HAPROXY")"
want nginx && size_line nginx "$(command -v "$NGINX")"

# --- scenarios ----------------------------------------------------------------------------
# run_one TARGET ROUND SCENARIO ARGS...: runs the load generator, records result + proxy CPU.
run_one() {
    local target=$1 round=$2 scen=$3 t0 t1 s0 s1 out cpu
    shift 3
    t0=$(ticks_of "$target") s0=$(date +%s%N)
    if [ "$scen" = http-wrk ]; then
        out=$("${PIN_LOAD[@]}" wrk -t"$LOAD_THREADS" -c64 -d"${SECS}s" --latency "http://${TADDR[$target]}/" 2>&1 |
            awk -v target="${TADDR[$target]}" -v secs="$SECS" '
                function us(v) { if (v ~ /us$/) return v + 0; if (v ~ /ms$/) return v * 1000; if (v ~ /s$/) return v * 1000000; return v }
                /^ +50%/ {p50 = us($2)} /^ +99%/ {p99 = us($2)}
                /requests in/ {ops = $1}
                /Socket errors/ {errs += $4 + $6 + $8 + $10}
                /Non-2xx/ {errs += $NF}
                /Requests\/sec/ {rps = $2}
                END {printf "{\"scenario\":\"http-wrk\",\"target\":\"%s\",\"conns\":64,\"secs\":%s,\"ops\":%d,\"ops_per_sec\":%.0f,\"p50_us\":%.0f,\"p99_us\":%.0f,\"errors\":%d}\n", target, secs, ops, rps, p50, p99, errs}')
    else
        out=$("${PIN_LOAD[@]}" "$LOADGEN" "$scen" --target "${TADDR[$target]}" --threads "$LOAD_THREADS" "$@")
    fi
    t1=$(ticks_of "$target") s1=$(date +%s%N)
    cpu=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v ns=$((s1 - s0)) 'BEGIN {printf "%.1f", 100 * d / hz / (ns / 1e9)}')
    echo "{\"kind\":\"run\",\"target\":\"$target\",\"round\":$round,\"cpu_pct\":$cpu,\"result\":$out}" >>"$RAW"
    log "round $round $scen $target: $(sed 's/.*"ops_per_sec":\([0-9.]*\).*"p99_us":\([0-9]*\).*/\1 ops\/s p99 \2 us/' <<<"$out") errors $(sed -n 's/.*"errors":\([0-9]*\).*/\1/p' <<<"$out") cpu ${cpu}%"
}

for ((r = 1; r <= ROUNDS; r++)); do
    # rotate the order each round so no target always runs first
    order=("${RUN_TARGETS[@]:$(((r - 1) % ${#RUN_TARGETS[@]}))}" "${RUN_TARGETS[@]:0:$(((r - 1) % ${#RUN_TARGETS[@]}))}")
    for t in "${order[@]}"; do run_one "$t" "$r" ws-echo --conns 64 --size 128 --secs "$SECS" --warmup "$WARMUP"; done
    for t in "${order[@]}"; do run_one "$t" "$r" http --conns 64 --secs "$SECS" --warmup "$WARMUP" --path /; done
    if [ "$WRK" = 1 ]; then
        for t in "${order[@]}"; do run_one "$t" "$r" http-wrk; done
    fi
    for t in "${order[@]}"; do
        run_one "$t" "$r" ws-rate --conns 8 --secs "$RATE_SECS" --warmup "$WARMUP"
        sleep 1 # let TIME_WAIT sockets age (loopback reuse needs 1 s)
    done
done

# --- memory: idle RSS, then with HOLD idle proxied WebSockets --------------------------------
for t in "${PROXIES[@]}"; do
    sleep 2
    idle=$(rss_of "$t")
    rm -f "$WORK/hold.in" && mkfifo "$WORK/hold.in"
    "${PIN_LOAD[@]}" "$LOADGEN" ws-hold --target "${TADDR[$t]}" --n "$HOLD" --parallel 128 \
        <"$WORK/hold.in" >"$WORK/hold.out" 2>&1 &
    hpid=$!
    PIDS+=("$hpid")
    exec 7>"$WORK/hold.in"
    ready=$(wait_line "$WORK/hold.out" '"ready"' 180) || ready=""
    sleep 1
    held_rss=$(rss_of "$t")
    exec 7>&-
    final=""
    for ((i = 0; i < 200; i++)); do
        kill -0 "$hpid" 2>/dev/null || break
        sleep 0.05
    done
    wait "$hpid" 2>/dev/null || true
    final=$(grep '"lost"' "$WORK/hold.out" | tail -1)
    [ -n "$final" ] || final=$(tail -c 2000 "$WORK/hold.out" | tr -d '\n' | sed 's/"/\\"/g; s/.*/{"error":"&"}/')
    echo "{\"kind\":\"mem\",\"target\":\"$t\",\"rss_start_kb\":${RSS_START[$t]},\"rss_idle_kb\":$idle,\"rss_held_kb\":$held_rss,\"ready\":${ready:-null},\"hold\":$final}" >>"$RAW"
    log "memory $t: start ${RSS_START[$t]} KiB, idle $idle KiB, with $HOLD held $held_rss KiB"
done

# --- report -------------------------------------------------------------------------------
echo "{\"kind\":\"end\",\"loadavg_end\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"busy_after_pct\":$(busy_pct)}" >>"$RAW"
mkdir -p "$ROOT/bench/results"
cp "$RAW" "$ROOT/bench/results/latest.jsonl"
for t in "${PROXIES[@]}"; do
    if [ -s "$WORK/$t.log" ] && grep -qiE 'error|panic|warn|alert' "$WORK/$t.log"; then
        log "$t log (errors/warnings):"; grep -iE 'error|panic|warn|alert' "$WORK/$t.log" | tail -20 >&2
    fi
done
[ -s "$WORK/nginx/error.log" ] 2>/dev/null && { log "nginx error.log:"; tail -20 "$WORK/nginx/error.log" >&2; }
"$LOADGEN" report --in "$RAW" --json "$ROOT/bench/results/latest.json" --md "$ROOT/bench/results/latest.md"
cat "$ROOT/bench/results/latest.md"
if [ "$FANOUT" -gt 0 ]; then
    log "backend broadcast fan-out to $FANOUT clients (bench/fanout.sh)"
    bash "$ROOT/bench/fanout.sh" --no-build --n "$FANOUT" | tee "$ROOT/bench/results/fanout.json"
fi
if [ "$SCALE" = 1 ]; then
    log "scale: cost per held WebSocket (bench/scale.sh)"
    # our targets stop first: scale.sh runs one proxy at a time with nothing else holding
    cleanup
    trap - EXIT
    scale_targets=$(for t in wslb haproxy nginx; do want "$t" && printf '%s ' "$t"; done)
    bash "$ROOT/bench/scale.sh" --no-build --placement "$PLACEMENT_MODE" --targets "${scale_targets:-wslb}"
fi
