#!/usr/bin/env bash
# Scale benchmark: how a proxy's cost grows with the WebSockets it holds. For each proxy in
# turn (wslb, HAProxy, nginx; one at a time, each with two fresh bench_backend processes):
# RSS at start, a 128-byte echo on 64 connections with nothing held (the baseline), then a
# climb to each step of idle proxied WebSockets (`loadgen ws-hold`, one process per
# increment) timing the climb (connections established per second), and at each plateau
# RSS (all the proxy's processes), KiB per held connection, open descriptors and the echo
# again (msgs/s, p50, p99, proxy CPU µs per message). Then everything is released and the
# next proxy runs. Writes bench/results/scale.{jsonl,json,md} and prints the markdown: a
# table per step with wslb/HAProxy and wslb/nginx ratios, the least-squares slope of RSS vs
# held connections, what it predicts for 100,000 and 1,000,000, the p99 growth, and the
# kernel limits to raise (computed from this machine's settings).
#
#   bash bench/scale.sh [--steps "2500 5000 9900"] [--max N] [--secs 5] [--warmup 1]
#                       [--rounds 1] [--targets "wslb haproxy nginx"] [--parallel 128]
#                       [--no-build] [--placement auto|split|float] [--plan]
#
# --max N: the top step (steps N/4 N/2 N unless --steps is given; with --steps, steps above
# N are dropped and N added). Steps are capped by the descriptor limit (the proxy needs 2
# per held WebSocket, plus the 64 echo connections and headroom) and by the ephemeral port
# range (every client connection goes from 127.0.0.1 to one proxy port); the script says so
# when it caps. Where the limits allow more, pass a bigger --max. --plan prints the steps
# after capping and exits.
#
# Env: CARGO (cargo), CARGO_TARGET_DIR (target), HAPROXY (haproxy), NGINX (nginx).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOG_TAG=scale
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
STEPS="" MAX=0 SECS=5 WARMUP=1 ROUNDS=1 PARALLEL=128 BUILD=1 PLACEMENT_MODE=auto PLAN=0
TARGETS="wslb haproxy nginx"
ECHO_CONNS=64
while [ $# -gt 0 ]; do
    case $1 in
    --steps) STEPS=$2; shift 2 ;;
    --max) MAX=$2; shift 2 ;;
    --secs) SECS=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --targets) TARGETS=$2; shift 2 ;;
    --parallel) PARALLEL=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --placement) PLACEMENT_MODE=$2; shift 2 ;;
    --plan) PLAN=1; shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "scale.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
for v in $STEPS $MAX $ROUNDS $PARALLEL; do
    [[ $v =~ ^[0-9]+$ ]] || { echo "scale.sh: $v is not a whole number (--steps, --max, --rounds, --parallel)" >&2; exit 2; }
done
[[ $SECS =~ ^[0-9.]+$ && $WARMUP =~ ^[0-9.]+$ ]] || { echo "scale.sh: --secs and --warmup take seconds" >&2; exit 2; }
command -v python3 >/dev/null || { echo "scale.sh: python3 is needed for the report" >&2; exit 1; }

# --- steps ----------------------------------------------------------------------------------
if [ -z "$STEPS" ]; then
    if [ "$MAX" -gt 0 ]; then STEPS="$((MAX / 4)) $((MAX / 2)) $MAX"; else STEPS="2500 5000 9900"; fi
elif [ "$MAX" -gt 0 ]; then
    kept="" dropped=0
    for s in $STEPS; do if [ "$s" -le "$MAX" ]; then kept+=" $s"; else dropped=1; fi; done
    [ "$dropped" = 1 ] && kept+=" $MAX"
    STEPS=$kept
fi
sorted_steps() { tr ' ' '\n' <<<"$1" | awk '$1 > 0' | sort -n -u | tr '\n' ' ' | sed 's/ $//'; }
STEPS=$(sorted_steps "$STEPS")
[ -n "$STEPS" ] || { echo "scale.sh: no positive step in --steps" >&2; exit 2; }
TOP=${STEPS##* }

bench_init scale
bench_binaries "$BUILD"

want() { case " $TARGETS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
PROXIES=()
for t in wslb haproxy nginx; do
    want "$t" || continue
    if [ "$t" = haproxy ] && ! command -v "$HAPROXY" >/dev/null; then
        log "haproxy not installed (make bench-deps): skipped"; continue
    fi
    if [ "$t" = nginx ] && ! command -v "$NGINX" >/dev/null; then
        log "nginx not installed (make bench-deps): skipped"; continue
    fi
    PROXIES+=("$t")
done
[ "${#PROXIES[@]}" -gt 0 ] || { echo "scale.sh: no target to run" >&2; exit 2; }

# --- limits: descriptors and ephemeral ports cap the steps ----------------------------------
SOFT_BEFORE=$(ulimit -Sn) HARD_BEFORE=$(ulimit -Hn)
want_fds=$((2 * (TOP + ECHO_CONNS) + 256))
NOFILE_WANT=$((want_fds > 65536 ? want_fds : 65536))
raise_nofile
read -r PORT_LO PORT_HI </proc/sys/net/ipv4/ip_local_port_range
PORTS=$((PORT_HI - PORT_LO + 1))
# The proxy: 2 descriptors per held WebSocket and per echo connection, 64 for listeners,
# epoll, logs, a backend connect racing a close.
FD_CAP=$(((NOFILE - 2 * ECHO_CONNS - 64) / 2))
# All client connections share one (127.0.0.1, proxy IP:port) pair: one ephemeral port each
# (TIME_WAIT leftovers of the echo runs take some too).
PORT_CAP=$((PORTS - 4 * ECHO_CONNS - 256))
CAP=$((FD_CAP < PORT_CAP ? FD_CAP : PORT_CAP))
CAP_NOTE=""
if [ "$TOP" -gt "$CAP" ]; then
    if [ "$FD_CAP" -le "$PORT_CAP" ]; then
        CAP_NOTE="open-file limit is $NOFILE (hard $(ulimit -Hn), cannot raise it): a proxy holds at most $FD_CAP WebSockets beside the $ECHO_CONNS echo connections (2 descriptors each + 64 spare); steps above are capped"
    else
        CAP_NOTE="ephemeral port range $PORT_LO-$PORT_HI gives $PORTS ports from 127.0.0.1 to one proxy port: at most $PORT_CAP held; steps above are capped"
    fi
    log "$CAP_NOTE"
    capped=""
    for s in $STEPS; do capped+=" $((s > CAP ? CAP : s))"; done
    STEPS=$(sorted_steps "$capped")
    TOP=${STEPS##* }
fi
# HAProxy's maxconn: the held connections plus the echo ones must fit.
MAXCONN=$(((NOFILE - 40) / 2))
# The load generator needs one descriptor per connection: split an increment over processes.
CHUNK=$((NOFILE - 64))
log "steps: $STEPS (nofile $NOFILE, ports $PORT_LO-$PORT_HI); proxies: ${PROXIES[*]}; echo ${SECS}s + ${WARMUP}s warm-up"
[ "$PLAN" = 1 ] && exit 0

announce_machine "$PLACEMENT_MODE"

CLK_TCK=$(getconf CLK_TCK)
RAW=$WORK/scale.jsonl
: >"$RAW"

# --- meta: versions, the kernel limits of this machine -----------------------------------------
sysctl_val() { tr '\t' ' ' <"/proc/sys/$1" 2>/dev/null | tr -s ' ' || echo "?"; }
VERSIONS="wslb $("$WSLB" -V 2>&1 | sed -n 1p)"
command -v "$HAPROXY" >/dev/null && VERSIONS+="; $("$HAPROXY" -v 2>&1 | sed -n 1p | cut -d' ' -f1-3)"
command -v "$NGINX" >/dev/null && VERSIONS+="; $("$NGINX" -v 2>&1 | sed -n 1p)"
MEM_TOTAL=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
{
    printf '{"kind":"meta","cpus":%s,"placement":%s,"steps":[%s],"secs":%s,"warmup":%s,"rounds":%s,' \
        "$NCPU" "$(json_str "$PLACEMENT")" "${STEPS// /,}" "$SECS" "$WARMUP" "$ROUNDS"
    printf '"parallel":%s,"echo_conns":%s,"nofile":%s,"cap":%s,"cap_note":%s,"versions":%s,' \
        "$PARALLEL" "$ECHO_CONNS" "$NOFILE" "$CAP" "$(json_str "$CAP_NOTE")" "$(json_str "$VERSIONS")"
    printf '"date":"%s","kernel":"%s","busy_before_pct":%s,"loadavg_start":"%s","mem_total_kb":%s,' \
        "$(date -u +%FT%TZ)" "$(uname -r)" "$BUSY_BEFORE" "$(cut -d' ' -f1-3 /proc/loadavg)" "$MEM_TOTAL"
    printf '"limits":{"nofile_soft":"%s","nofile_hard":"%s","nofile_used":%s,"file_max":"%s","nr_open":"%s",' \
        "$SOFT_BEFORE" "$HARD_BEFORE" "$NOFILE" "$(sysctl_val fs/file-max)" "$(sysctl_val fs/nr_open)"
    printf '"port_lo":%s,"port_hi":%s,"somaxconn":"%s","tcp_max_syn_backlog":"%s",' \
        "$PORT_LO" "$PORT_HI" "$(sysctl_val net/core/somaxconn)" "$(sysctl_val net/ipv4/tcp_max_syn_backlog)"
    printf '"tcp_mem":"%s","tcp_rmem":"%s","tcp_wmem":"%s","page_size":%s}}\n' \
        "$(sysctl_val net/ipv4/tcp_mem)" "$(sysctl_val net/ipv4/tcp_rmem)" "$(sysctl_val net/ipv4/tcp_wmem)" "$(getconf PAGESIZE)"
} >>"$RAW"

# --- measurements -------------------------------------------------------------------------------
# Kernel-side memory of the whole machine (sockets of clients, proxy and backends alike).
kernel_kb() {
    local tcp_pages slab
    tcp_pages=$(awk '/^TCP:/ {for (i = 2; i < NF; i++) if ($i == "mem") print $(i + 1)}' /proc/net/sockstat)
    slab=$(awk '/^Slab:/ {print $2}' /proc/meminfo)
    printf '"tcp_mem_kb":%s,"slab_kb":%s' "$((${tcp_pages:-0} * $(getconf PAGESIZE) / 1024))" "${slab:-0}"
}

# echo_json TARGET: the 128-byte echo on 64 connections, with the proxy's CPU over the run;
# sets ECHO_JSON. The load generator runs in the background and this shell `wait`s for it,
# so a TERM or INT to the script is acted on at once.
echo_json() {
    local t0 t1 s0 s1 out cpu us lp
    t0=$(ticks_of "$1") s0=$(date +%s%N)
    "${PIN_LOAD[@]}" "$LOADGEN" ws-echo --target "${TADDR[$1]}" --threads "$LOAD_THREADS" \
        --conns "$ECHO_CONNS" --size 128 --secs "$SECS" --warmup "$WARMUP" >"$WORK/echo.out" 7>&- &
    lp=$!
    PIDS+=("$lp")
    wait "$lp" || true
    out=$(grep -m1 '^{' "$WORK/echo.out" || true)
    [ -n "$out" ] || out='{"error":"loadgen failed","errors":1}'
    stop_pids "$lp" # already exited: only forgets it
    t1=$(ticks_of "$1") s1=$(date +%s%N)
    cpu=$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v ns=$((s1 - s0)) 'BEGIN {printf "%.1f", 100 * d / hz / (ns / 1e9)}')
    # CPU µs per message: the run's CPU share over the measured rate (as bench/run.sh's report).
    us=$(awk -v c="$cpu" -v r="$(jfield "$out" ops_per_sec)" \
        'BEGIN {if (r > 0) printf "%.1f", c / 100 * 1e6 / r; else print "null"}')
    ECHO_JSON=$(printf '"cpu_pct":%s,"cpu_us_per_msg":%s,"echo":%s' "$cpu" "$us" "$out")
}

# jfield JSON KEY: a number from a flat JSON line.
jfield() { sed -n "s/.*\"$2\":\([0-9.]*\).*/\1/p" <<<"$1" | sed -n 1p; }
echo_summary() { echo "$(jfield "$1" ops_per_sec) msgs/s, p50 $(jfield "$1" p50_us) us, p99 $(jfield "$1" p99_us) us, errors $(jfield "$1" errors), proxy CPU $(jfield "$1" cpu_pct)%"; }

# Timestamps each line (bash's EPOCHREALTIME: no fork): when "ready" arrived.
stamp() { local l; while IFS= read -r l; do printf '%s %s\n' "$EPOCHREALTIME" "$l"; done; }

# wait_ready FILE SECONDS: sets READY to ws-hold's stamped "ready" line. Loops in this shell
# (not in a $(...) subshell) so that a TERM or INT to the script acts within 50 ms.
wait_ready() {
    local i
    READY=""
    for ((i = 0; i < $2 * 20; i++)); do
        if [ -s "$1" ]; then
            READY=$(grep -m1 '"ready"' "$1" || true)
            [ -n "$READY" ] && return 0
        fi
        sleep 0.05
    done
    return 1
}

HOLD_PIDS=() HOLD_OUTS=()
# climb TARGET ROUND FROM TO: hold TO-FROM more WebSockets (one ws-hold process per CHUNK).
climb() {
    local t=$1 r=$2 from=$3 to=$4 n left start tk0 tk1 i out held=0 errors=0 end=0 line ts outs=() secs
    left=$((to - from))
    tk0=$(ticks_of "$t") start=$EPOCHREALTIME
    while [ "$left" -gt 0 ]; do
        n=$((left < CHUNK ? left : CHUNK))
        left=$((left - n))
        out=$WORK/hold-$t-$r-$to-${#outs[@]}.out
        "${PIN_LOAD[@]}" "$LOADGEN" ws-hold --target "${TADDR[$t]}" --n "$n" --parallel "$PARALLEL" \
            <"$WORK/hold.in" 7>&- > >(exec 7>&-; stamp >"$out") 2>"$out.err" &
        PIDS+=($!) HOLD_PIDS+=($!)
        outs+=("$out") HOLD_OUTS+=("$out")
    done
    for out in "${outs[@]}"; do
        wait_ready "$out" 200 || { log "$t: no ready line from ws-hold ($out)"; cat "$out.err" >&2; continue; }
        ts=${READY%% *} line=${READY#* }
        held=$((held + $(sed -n 's/.*"held":\([0-9]*\).*/\1/p' <<<"$line")))
        errors=$((errors + $(sed -n 's/.*"errors":\([0-9]*\).*/\1/p' <<<"$line")))
        end=$(awk -v a="$end" -v b="$ts" 'BEGIN {print (b > a ? b : a)}')
    done
    tk1=$(ticks_of "$t")
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.3f", b - a}')
    printf '{"kind":"climb","target":"%s","round":%s,"from":%s,"to":%s,"held":%s,"errors":%s,"secs":%s,"conns_per_sec":%s,"cpu_us_per_conn":%s}\n' \
        "$t" "$r" "$from" "$to" "$held" "$errors" "$secs" \
        "$(awk -v n="$held" -v s="$secs" 'BEGIN {if (s > 0) printf "%.0f", n / s; else print 0}')" \
        "$(awk -v n="$held" -v d=$((tk1 - tk0)) -v hz="$CLK_TCK" 'BEGIN {if (n > 0) printf "%.1f", d / hz * 1e6 / n; else print "null"}')" >>"$RAW"
    CLIMB_HELD=$held
    log "$t: climbed $from -> $to: $held held, $errors errors, ${secs}s ($(awk -v n="$held" -v s="$secs" 'BEGIN {if (s > 0) printf "%.0f", n / s}') conn/s)"
}

# release: close the hold processes' stdin, wait for their last line (how many were lost).
release() {
    local t=$1 r=$2 lost=0 out l
    exec 7>&-
    wait_exit 400 "${HOLD_PIDS[@]}" || log "$t: ws-hold still running 20 s after release: killed"
    stop_pids "${HOLD_PIDS[@]}"
    sleep 0.2
    for out in "${HOLD_OUTS[@]}"; do
        l=$(grep -o '"lost":[0-9]*' "$out" | tail -1 | cut -d: -f2)
        lost=$((lost + ${l:-0}))
    done
    HOLD_PIDS=() HOLD_OUTS=()
    RELEASE_LOST=$lost
}

# settle_fds TARGET LIMIT: after an echo run, until the proxy has closed those connections
# (its descriptors ≤ LIMIT), 10 s at most, so that the next climb starts from what is held.
# Sets SETTLE to the seconds it took (HAProxy can keep closed tunnels a few seconds).
settle_fds() {
    local i
    for ((i = 0; i < 100; i++)); do
        [ "$(fds_of "$1")" -le "$2" ] && break
        sleep 0.1
    done
    SETTLE=$(awk -v i="$i" 'BEGIN {printf "%.1f", i / 10}')
    [ "$i" = 100 ] && log "$1: still $(fds_of "$1") descriptors 10 s after the echo (expected <= $2)"
    return 0
}

# run_proxy TARGET ROUND: one proxy through every step, then everything stopped.
run_proxy() {
    local t=$1 r=$2 rss0 fds0 idle idle_fds held=0 s rss fds e after_rss after_fds i note=""
    start_backends
    start_target "$t"
    sleep 1
    rss0=$(rss_of "$t") fds0=$(fds_of "$t")
    if [ "$t" = wslb ]; then
        note=$(grep -o 'max-connections [0-9]* lowered to [0-9]*[^"]*' "$WORK/wslb.log" | head -1 || true)
        [ -n "$note" ] && log "wslb: $note"
    fi
    echo_json "$t"
    e=$ECHO_JSON
    settle_fds "$t" $((fds0 + 16))
    e+=",\"echo_close_secs\":$SETTLE"
    sleep 1
    idle=$(rss_of "$t") idle_fds=$(fds_of "$t")
    printf '{"kind":"start","target":"%s","round":%s,"addr":"%s","rss_start_kb":%s,"fds_start":%s,"rss_idle_kb":%s,"fds_idle":%s,"note":%s,%s}\n' \
        "$t" "$r" "${TADDR[$t]}" "$rss0" "$fds0" "$idle" "$idle_fds" "$(json_str "$note")" "$(kernel_kb)" >>"$RAW"
    printf '{"kind":"step","target":"%s","round":%s,"step":0,"held":0,"rss_kb":%s,"fds":%s,%s}\n' \
        "$t" "$r" "$idle" "$idle_fds" "$e" >>"$RAW"
    log "$t: start $rss0 KiB, idle $idle KiB, $idle_fds fds; echo at 0 held: $(echo_summary "$e")"
    rm -f "$WORK/hold.in" && mkfifo "$WORK/hold.in"
    exec 7<>"$WORK/hold.in" # the hold processes read it; they stop when it closes
    local prev=0
    for s in $STEPS; do
        climb "$t" "$r" "$prev" "$s"
        held=$((held + CLIMB_HELD)) prev=$s
        sleep 1
        rss=$(rss_of "$t") fds=$(fds_of "$t")
        local k; k=$(kernel_kb)
        echo_json "$t"
        e=$ECHO_JSON
        settle_fds "$t" $((fds0 + 2 * held + 16))
        e+=",\"echo_close_secs\":$SETTLE"
        printf '{"kind":"step","target":"%s","round":%s,"step":%s,"held":%s,"rss_kb":%s,"fds":%s,%s,%s}\n' \
            "$t" "$r" "$s" "$held" "$rss" "$fds" "$k" "$e" >>"$RAW"
        log "$t: $held held: RSS $rss KiB ($(awk -v a="$rss" -v b="$idle" -v n="$held" 'BEGIN {if (n > 0) printf "%.2f", (a - b) / n}') KiB/conn), $fds fds; echo: $(echo_summary "$e")"
    done
    release "$t" "$r"
    for ((i = 0; i < 100; i++)); do # until the proxy has closed what it held (10 s at most)
        [ "$(fds_of "$t")" -le $((idle_fds + 32)) ] && break
        sleep 0.1
    done
    after_rss=$(rss_of "$t") after_fds=$(fds_of "$t")
    printf '{"kind":"release","target":"%s","round":%s,"lost":%s,"rss_after_kb":%s,"fds_after":%s}\n' \
        "$t" "$r" "$RELEASE_LOST" "$after_rss" "$after_fds" >>"$RAW"
    log "$t: released ($RELEASE_LOST lost while held): RSS $after_rss KiB, $after_fds fds"
    for f in "$WORK/$t.log" "$WORK/nginx/error.log"; do
        [ "$t" = nginx ] || [ "$f" = "$WORK/$t.log" ] || continue
        if [ -s "$f" ] && grep -qiE 'error|panic|alert|crit' "$f"; then
            log "$t log (errors):"; grep -iE 'error|panic|alert|crit' "$f" | sort | uniq -c | sort -rn | head -10 >&2
        fi
    done
    # shellcheck disable=SC2046 # word splitting wanted: a list of pids
    stop_pids $(pids_of "$t") "${BPIDS[@]}"
    rm -rf "$WORK/nginx"
}

for ((r = 1; r <= ROUNDS; r++)); do
    # rotate the order each round so no proxy always runs first
    k=$(((r - 1) % ${#PROXIES[@]}))
    for t in "${PROXIES[@]:$k}" "${PROXIES[@]:0:$k}"; do
        log "round $r: $t"
        run_proxy "$t" "$r"
        sleep 2
    done
done

# --- report -------------------------------------------------------------------------------------
echo "{\"kind\":\"end\",\"loadavg_end\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"busy_after_pct\":$(busy_pct)}" >>"$RAW"
mkdir -p "$ROOT/bench/results"
cp "$RAW" "$ROOT/bench/results/scale.jsonl"
python3 "$ROOT/bench/scale_report.py" "$RAW" "$ROOT/bench/results/scale.json" "$ROOT/bench/results/scale.md"
cat "$ROOT/bench/results/scale.md"
