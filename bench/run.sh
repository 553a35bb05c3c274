#!/usr/bin/env bash
# wslb benchmark: the same scenarios against a backend directly (the proxy-less limit), wslb,
# HAProxy (nbthread 1) and nginx (worker_processes 1), targets interleaved within each round.
# Writes bench/results/latest.{jsonl,json,md} and prints the markdown table.
#
#   bash bench/run.sh [--rounds N] [--secs S] [--rate-secs S] [--hold N] [--targets "direct wslb haproxy nginx"]
#                     [--no-build] [--no-wrk] [--placement auto|split|float] [--fanout N] [--scale]
#                     [--no-tls | --tls-only]
#
# TLS (unless --no-tls; needs openssl): each proxy also runs twice more, terminating TLS with
# the same self-signed ECDSA P-256 or RSA 2048 certificate (bench/haproxy-tls.cfg.in,
# bench/nginx-tls.conf.in, wslb --tls-listen), for full and resumed handshakes, wss echo and
# the idle TLS WebSocket memory. --tls-only skips the plain scenarios and plain memory.
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
ROUNDS=3 SECS=10 RATE_SECS=5 WARMUP=1 HOLD=10000 BUILD=1 WRK=1 PLACEMENT_MODE=auto FANOUT=0 SCALE=0 TLS=1 PLAIN=1
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
    --no-tls) TLS=0; shift ;;
    --tls-only) PLAIN=0; shift ;;
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
if [ "$TLS" = 1 ] && ! command -v openssl >/dev/null; then
    log "openssl not installed: TLS scenarios skipped"; TLS=0
fi
[ "$TLS" = 0 ] && [ "$PLAIN" = 0 ] && { echo "run.sh: --tls-only without TLS" >&2; exit 2; }

# --- file descriptors: a proxy holding N WebSockets needs 2N + a few ------------------------
raise_nofile
# Headroom: listeners, idle keep-alive pools to the backends (nginx keeps up to 128), logs.
MAX_HOLD=$(((NOFILE - 600) / 2))
if [ "$HOLD" -gt "$MAX_HOLD" ]; then
    log "open-file limit is $NOFILE (cannot raise it): holding $MAX_HOLD WebSockets, not $HOLD"
    HOLD=$MAX_HOLD
fi
MAXCONN=$(((NOFILE - 100) / 2))

# --- CPU placement, how busy the machine is (bench/lib.sh) --------------------------------
announce_machine "$PLACEMENT_MODE"

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

# TLS: one self-signed certificate per key type (CN and SAN localhost, SAN IP 127.0.0.1), the
# same files for every proxy; one more instance of each proxy per certificate.
CERTS=(ecdsa rsa)
INSTANCES=("${PROXIES[@]}")
if [ "$TLS" = 1 ]; then
    mkdir -p "$WORK/certs"
    for c in "${CERTS[@]}"; do
        case $c in
        ecdsa) alg=(-newkey ec -pkeyopt ec_paramgen_curve:P-256) ;;
        rsa) alg=(-newkey rsa:2048) ;;
        esac
        openssl req -x509 "${alg[@]}" -nodes -days 30 -subj /CN=localhost \
            -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -addext "basicConstraints=critical,CA:FALSE" \
            -keyout "$WORK/certs/$c.key" -out "$WORK/certs/$c.crt" 2>/dev/null ||
            { echo "run.sh: openssl could not make the $c certificate" >&2; exit 1; }
        cat "$WORK/certs/$c.crt" "$WORK/certs/$c.key" >"$WORK/certs/$c.pem"
        crt=$WORK/certs/$c.crt key=$WORK/certs/$c.key
        want wslb && start_wslb "wslb:$c" --tls-listen 127.0.0.1:0 --cert "$crt" --key "$key"
        want haproxy && start_haproxy "haproxy:$c" "$ROOT/bench/haproxy-tls.cfg.in" "$WORK/certs/$c.pem"
        want nginx && start_nginx "nginx:$c" "$ROOT/bench/nginx-tls.conf.in" "$crt" "$key"
        for t in "${PROXIES[@]}"; do INSTANCES+=("$t:$c"); done
    done
    log "TLS targets: $(for t in "${INSTANCES[@]}"; do [[ $t == *:* ]] && printf '%s=%s ' "$t" "${TADDR[$t]}"; done)"
fi
sleep 1

# Memory at start (no traffic yet).
declare -A RSS_START
for t in "${INSTANCES[@]}"; do RSS_START[$t]=$(rss_of "$t"); done

# --- meta, sizes --------------------------------------------------------------------------
VERSIONS="wslb $("$WSLB" -V 2>&1 | sed -n 1p)"
command -v "$HAPROXY" >/dev/null && VERSIONS+="; $("$HAPROXY" -v 2>&1 | sed -n 1p | cut -d' ' -f1-3)"
command -v "$NGINX" >/dev/null && VERSIONS+="; $("$NGINX" -v 2>&1 | sed -n 1p)"
if [ "$TLS" = 1 ]; then
    RUSTLS=$(awk '/^name = "rustls"$/ {getline; gsub(/"/, "", $3); print $3}' "$ROOT/Cargo.lock")
    VERSIONS+="; TLS: wslb rustls ${RUSTLS:-?} (ring), HAProxy and nginx $(openssl version | cut -d' ' -f1-2)"
fi
HOST=$(hostname 2>/dev/null || echo "?")
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | sed -n 1p)
echo "{\"kind\":\"meta\",\"cpus\":$NCPU,\"placement\":$(json_str "$PLACEMENT"),\"rounds\":$ROUNDS,\"secs\":$SECS,\"rate_secs\":$RATE_SECS,\"warmup\":$WARMUP,\"hold\":$HOLD,\"nofile\":$NOFILE,\"versions\":$(json_str "$VERSIONS"),\"date\":\"$(date -u +%FT%TZ)\",\"kernel\":\"$(uname -r)\",\"host\":$(json_str "$HOST"),\"cpu_model\":$(json_str "${CPU_MODEL:-?}"),\"tls\":$TLS,\"plain\":$PLAIN,\"busy_before_pct\":$BUSY_BEFORE,\"loadavg_start\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}" >>"$RAW"

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
# run_one INSTANCE ROUND SCENARIO ARGS...: runs the load generator against INSTANCE (a target,
# or a TLS instance TARGET:CERT, recorded as TARGET), records result + the instance's CPU.
run_one() {
    local inst=$1 target=${1%%:*} round=$2 scen=$3 t0 t1 s0 s1 out cpu
    shift 3
    t0=$(ticks_of "$inst") s0=$(date +%s%N)
    if [ "$scen" = http-wrk ]; then
        out=$("${PIN_LOAD[@]}" wrk -t"$LOAD_THREADS" -c64 -d"${SECS}s" --latency "http://${TADDR[$inst]}/" 2>&1 |
            awk -v target="${TADDR[$inst]}" -v secs="$SECS" '
                function us(v) { if (v ~ /us$/) return v + 0; if (v ~ /ms$/) return v * 1000; if (v ~ /s$/) return v * 1000000; return v }
                /^ +50%/ {p50 = us($2)} /^ +99%/ {p99 = us($2)}
                /requests in/ {ops = $1}
                /Socket errors/ {errs += $4 + $6 + $8 + $10}
                /Non-2xx/ {errs += $NF}
                /Requests\/sec/ {rps = $2}
                END {printf "{\"scenario\":\"http-wrk\",\"target\":\"%s\",\"conns\":64,\"secs\":%s,\"ops\":%d,\"ops_per_sec\":%.0f,\"p50_us\":%.0f,\"p99_us\":%.0f,\"errors\":%d}\n", target, secs, ops, rps, p50, p99, errs}')
    else
        out=$("${PIN_LOAD[@]}" "$LOADGEN" "$scen" --target "${TADDR[$inst]}" --threads "$LOAD_THREADS" "$@")
    fi
    t1=$(ticks_of "$inst") s1=$(date +%s%N)
    cpu=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v ns=$((s1 - s0)) 'BEGIN {printf "%.1f", 100 * d / hz / (ns / 1e9)}')
    echo "{\"kind\":\"run\",\"target\":\"$target\",\"instance\":\"$inst\",\"round\":$round,\"cpu_pct\":$cpu,\"result\":$out}" >>"$RAW"
    local name resumed
    name=$(sed -n 's/.*"scenario":"\([^"]*\)".*/\1/p' <<<"$out")
    resumed=""
    grep -q '"resume":true' <<<"$out" && resumed=$(sed -n 's/.*"resumed_frac":\([0-9.]*\).*/, resumed \1/p' <<<"$out")
    log "round $round ${name:-$scen} $inst: $(sed 's/.*"ops_per_sec":\([0-9.]*\).*"p99_us":\([0-9]*\).*/\1 ops\/s p99 \2 us/' <<<"$out") errors $(sed -n 's/.*"errors":\([0-9]*\).*/\1/p' <<<"$out") cpu ${cpu}%$resumed"
}

# tls_round ROUND TARGETS...: the TLS scenarios, targets interleaved within each. Full
# handshakes with each certificate and version; resumption (no certificate signature
# involved) and wss echo with the ECDSA certificate only.
tls_round() {
    local r=$1 c v t
    shift
    for c in "${CERTS[@]}"; do
        for v in 1.3 1.2; do
            for t in "$@"; do
                run_one "$t:$c" "$r" tls-hs --label "tls-hs-$c-$v" --tls-version "$v" --conns 8 \
                    --secs "$RATE_SECS" --warmup "$WARMUP"
                sleep 1 # TIME_WAIT, as for ws-rate
            done
        done
    done
    for v in 1.3 1.2; do
        for t in "$@"; do
            run_one "$t:ecdsa" "$r" tls-hs --label "tls-resume-$v" --resume --tls-version "$v" \
                --conns 8 --secs "$RATE_SECS" --warmup "$WARMUP"
            sleep 1
        done
    done
    for t in "$@"; do
        run_one "$t:ecdsa" "$r" ws-echo --tls --label wss-echo --conns 64 --size 128 \
            --secs "$SECS" --warmup "$WARMUP"
    done
}

for ((r = 1; r <= ROUNDS; r++)); do
    # rotate the order each round so no target always runs first
    order=("${RUN_TARGETS[@]:$(((r - 1) % ${#RUN_TARGETS[@]}))}" "${RUN_TARGETS[@]:0:$(((r - 1) % ${#RUN_TARGETS[@]}))}")
    if [ "$PLAIN" = 1 ]; then
        for t in "${order[@]}"; do run_one "$t" "$r" ws-echo --conns 64 --size 128 --secs "$SECS" --warmup "$WARMUP"; done
        for t in "${order[@]}"; do run_one "$t" "$r" http --conns 64 --secs "$SECS" --warmup "$WARMUP" --path /; done
        if [ "$WRK" = 1 ]; then
            for t in "${order[@]}"; do run_one "$t" "$r" http-wrk; done
        fi
        for t in "${order[@]}"; do
            run_one "$t" "$r" ws-rate --conns 8 --secs "$RATE_SECS" --warmup "$WARMUP"
            sleep 1 # let TIME_WAIT sockets age (loopback reuse needs 1 s)
        done
    fi
    if [ "$TLS" = 1 ]; then
        torder=("${PROXIES[@]:$(((r - 1) % ${#PROXIES[@]}))}" "${PROXIES[@]:0:$(((r - 1) % ${#PROXIES[@]}))}")
        tls_round "$r" "${torder[@]}"
    fi
done

# --- memory: idle RSS, then with HOLD idle proxied WebSockets --------------------------------
# hold_mem KIND INSTANCE [LOADGEN ARGS]: records KIND (mem, mem-tls) for INSTANCE.
hold_mem() {
    local kind=$1 inst=$2 idle hpid ready held_rss final i
    shift 2
    sleep 2
    idle=$(rss_of "$inst")
    rm -f "$WORK/hold.in" && mkfifo "$WORK/hold.in"
    "${PIN_LOAD[@]}" "$LOADGEN" ws-hold --target "${TADDR[$inst]}" --n "$HOLD" --parallel 128 "$@" \
        <"$WORK/hold.in" >"$WORK/hold.out" 2>&1 &
    hpid=$!
    PIDS+=("$hpid")
    exec 7>"$WORK/hold.in"
    ready=$(wait_line "$WORK/hold.out" '"ready"' 180) || ready=""
    sleep 1
    held_rss=$(rss_of "$inst")
    exec 7>&-
    final=""
    for ((i = 0; i < 200; i++)); do
        kill -0 "$hpid" 2>/dev/null || break
        sleep 0.05
    done
    wait "$hpid" 2>/dev/null || true
    final=$(grep '"lost"' "$WORK/hold.out" | tail -1)
    [ -n "$final" ] || final=$(tail -c 2000 "$WORK/hold.out" | tr -d '\n' | sed 's/"/\\"/g; s/.*/{"error":"&"}/')
    echo "{\"kind\":\"$kind\",\"target\":\"${inst%%:*}\",\"instance\":\"$inst\",\"rss_start_kb\":${RSS_START[$inst]},\"rss_idle_kb\":$idle,\"rss_held_kb\":$held_rss,\"ready\":${ready:-null},\"hold\":$final}" >>"$RAW"
    log "memory $inst: start ${RSS_START[$inst]} KiB, idle $idle KiB, with $HOLD held $held_rss KiB"
}
if [ "$PLAIN" = 1 ]; then
    for t in "${PROXIES[@]}"; do hold_mem mem "$t"; done
fi
# The same over TLS (ECDSA certificate, TLS 1.3, each connection a full handshake + one echo).
if [ "$TLS" = 1 ]; then
    for t in "${PROXIES[@]}"; do hold_mem mem-tls "$t:ecdsa" --tls; done
fi

# --- report -------------------------------------------------------------------------------
echo "{\"kind\":\"end\",\"loadavg_end\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"busy_after_pct\":$(busy_pct)}" >>"$RAW"
mkdir -p "$ROOT/bench/results"
cp "$RAW" "$ROOT/bench/results/latest.jsonl"
for t in "${INSTANCES[@]}"; do
    f=${t/:/-}
    if [ -s "$WORK/$f.log" ] && grep -qiE 'error|panic|warn|alert' "$WORK/$f.log"; then
        log "$t log (errors/warnings):"; grep -iE 'error|panic|warn|alert' "$WORK/$f.log" | tail -20 >&2
    fi
    if [[ $t == nginx* ]] && [ -s "$WORK/$f/error.log" ]; then
        log "$t error.log:"; tail -20 "$WORK/$f/error.log" >&2
    fi
done
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
