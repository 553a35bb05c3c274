# Shell helpers shared by bench/run.sh and bench/scale.sh (sourced, after ROOT is set).
#
#   bench_init NAME        scratch directory $WORK (/tmp/wslb-NAME.XXXXXX), the PIDS array of
#                          every process started (killed on exit, then WORK removed), traps
#   bench_binaries BUILD   builds the release binaries when BUILD=1; sets BIN WSLB BACKEND LOADGEN
#   raise_nofile           raises `ulimit -n` as far as the hard limit allows (at most 65536
#                          unless NOFILE_WANT says more); sets NOFILE
#   setup_placement MODE   auto|split|float: PIN_PROXY PIN_BACKEND PIN_LOAD LOAD_THREADS PLACEMENT
#   busy_pct               % of the machine's CPU busy over 2 s
#   wait_line FILE PATTERN SECONDS, wait_port PORT SECONDS, addr_of LINE, free_port
#   start_backends         two examples/bench_backend: BPIDS BADDRS B1 B2
#   start_target NAME      wslb | haproxy | nginx against B1 B2: TPID[NAME] TADDR[NAME]
#   pids_of NAME           a target's processes (nginx: master + workers; direct: backends)
#   ticks_of NAME, rss_of NAME, fds_of NAME   CPU ticks, RSS KiB, open descriptors, summed
#   stop_pids PID...       TERM, wait (KILL after 3 s), and forget them
#
# Env: CARGO (cargo), CARGO_TARGET_DIR (target), HAPROXY (haproxy), NGINX (nginx).
# shellcheck shell=bash disable=SC2034  # the variables set here are used by the callers

CARGO=${CARGO:-cargo}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
HAPROXY=${HAPROXY:-haproxy}
NGINX=${NGINX:-nginx}
LOG_TAG=${LOG_TAG:-bench}

log() { echo "[$LOG_TAG $(date +%T)] $*" >&2; }

# --- processes: every one we start is recorded and killed on exit -------------------------
bench_init() {
    PIDS=()
    WORK=$(mktemp -d "/tmp/wslb-$1.XXXXXX")
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$WORK"
}

# wait_exit TICKS PID...: until none of the PIDs runs, TICKS x 50 ms at most; fails if
# some still run.
wait_exit() {
    local ticks=$1 p i alive
    shift
    for ((i = 0; i < ticks; i++)); do
        alive=0
        for p in "$@"; do kill -0 "$p" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && return 0
        sleep 0.05
    done
    return 1
}

# stop_pids PID...: TERM them, wait up to 3 s, KILL what is left, drop them from PIDS.
stop_pids() {
    local p keep=()
    for p in "$@"; do kill "$p" 2>/dev/null || true; done
    wait_exit 60 "$@" || true
    for p in "$@"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        case " $* " in *" $p "*) ;; *) keep+=("$p") ;; esac
    done
    PIDS=("${keep[@]}")
}

# --- build --------------------------------------------------------------------------------
bench_binaries() {
    if [ "$1" = 1 ]; then
        log "building release binaries"
        (cd "$ROOT" && "$CARGO" build --release --bins --examples --quiet)
    fi
    BIN=$TARGET_DIR/release
    WSLB=$BIN/wslb BACKEND=$BIN/examples/bench_backend LOADGEN=$BIN/examples/loadgen
    local b
    for b in "$WSLB" "$BACKEND" "$LOADGEN"; do
        [ -x "$b" ] || { echo "$LOG_TAG: $b missing (cargo build --release --bins --examples)" >&2; exit 1; }
    done
}

# --- file descriptors: a proxy holding N WebSockets needs 2N + a few ------------------------
raise_nofile() {
    local want=${NOFILE_WANT:-65536} hard
    hard=$(ulimit -Hn)
    if [ "$hard" != unlimited ] && [ "$hard" -lt "$want" ]; then
        ulimit -Hn "$want" 2>/dev/null || true
        hard=$(ulimit -Hn)
    fi
    [ "$hard" = unlimited ] && hard=$want
    NOFILE=$((hard < want ? hard : want))
    ulimit -n "$NOFILE"
}

# --- CPU placement ------------------------------------------------------------------------
# With 4+ CPUs: proxy alone on CPU 0, backends on CPU 1, loadgen on the rest. With 2-3 CPUs
# nothing is pinned: pinning the proxy to one core and loadgen + backends to the other leaves
# the proxies ~40% busy, waiting on the starved load side (cross-core wake-ups for every hop),
# so every target looks the same; floating lets the busy side take the slack. `split` forces
# the pinned layout anyway. Every bench process runs at nice -10 (when allowed) so other work
# on the machine disturbs it less; the same for every target.
setup_placement() {
    local mode=$1
    NCPU=$(nproc)
    PIN_PROXY=() PIN_LOAD=() PIN_BACKEND=() LOAD_THREADS=1
    if [ "$mode" = auto ]; then
        if [ "$NCPU" -ge 4 ]; then mode="split"; else mode="float"; fi
    fi
    if [ "$mode" = split ] && [ "$NCPU" -ge 2 ] && command -v taskset >/dev/null; then
        PIN_PROXY=(taskset -c 0)
        if [ "$NCPU" -ge 4 ]; then
            PIN_BACKEND=(taskset -c 1)
            PIN_LOAD=(taskset -c "2-$((NCPU - 1))")
            LOAD_THREADS=$((NCPU - 2 < 4 ? NCPU - 2 : 4))
            PLACEMENT="pinned: proxy CPU 0, backends CPU 1, loadgen ($LOAD_THREADS threads) CPUs 2-$((NCPU - 1))"
        else
            PIN_BACKEND=(taskset -c "1-$((NCPU - 1))")
            PIN_LOAD=(taskset -c "1-$((NCPU - 1))")
            PLACEMENT="pinned: proxy CPU 0, backends + loadgen (1 thread) CPU 1-$((NCPU - 1))"
        fi
    else
        PLACEMENT="not pinned: proxy, 2 backends (1 thread each), loadgen (1 thread) float over $NCPU CPUs"
    fi
    if nice -n -10 true 2>/dev/null; then
        PIN_PROXY=(nice -n -10 "${PIN_PROXY[@]}") PIN_BACKEND=(nice -n -10 "${PIN_BACKEND[@]}")
        PIN_LOAD=(nice -n -10 "${PIN_LOAD[@]}")
        PLACEMENT+=", all at nice -10"
    fi
}

# announce_machine MODE: CPU placement (see setup_placement), logged, and BUSY_BEFORE, with a
# warning when other work already keeps the machine busy.
announce_machine() {
    setup_placement "$1"
    log "$PLACEMENT"
    BUSY_BEFORE=$(busy_pct)
    [ "$BUSY_BEFORE" -gt 10 ] && log "WARNING: the machine is already ${BUSY_BEFORE}% busy before the benchmark: numbers will be noisy"
    return 0
}

# Other work on the machine skews everything: how busy it is (%), over 2 s.
busy_pct() {
    local a b
    a=$(awk '/^cpu / {print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat)
    sleep 2
    b=$(awk '/^cpu / {print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN {split(a, x, " "); split(b, y, " "); d = y[2] - x[2]; printf "%.0f", (d > 0 ? 100 * (y[1] - x[1]) / d : 0)}'
}

# --- small helpers ------------------------------------------------------------------------
free_port() { "$LOADGEN" free-ports --n 1; }

# wait_line FILE PATTERN SECONDS: the first line of FILE matching PATTERN (empty on timeout).
wait_line() {
    local i
    for ((i = 0; i < $3 * 20; i++)); do
        if grep -q -- "$2" "$1" 2>/dev/null; then grep -m1 -- "$2" "$1"; return 0; fi
        sleep 0.05
    done
    return 1
}

# wait_port PORT SECONDS: until 127.0.0.1:PORT accepts a connection.
wait_port() {
    local i
    for ((i = 0; i < $2 * 20; i++)); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    return 1
}

addr_of() { sed -n 's/.*listening on \(127\.0\.0\.1:[0-9]*\).*/\1/p' <<<"$1" | sed -n 1p; }

json_str() { printf '"%s"' "$(sed 's/\\/\\\\/g; s/"/\\"/g' <<<"$1")"; }

# --- backends and proxies -----------------------------------------------------------------
declare -A TADDR TPID
BPIDS=() BADDRS=()

# start_backends: two bench_backend processes (one thread each) on free ports.
start_backends() {
    local b line
    BPIDS=() BADDRS=()
    for b in 1 2; do
        # a log left by an earlier start would be read before the new process truncates it
        rm -f "$WORK/backend$b.log"
        "${PIN_BACKEND[@]}" "$BACKEND" --listen 127.0.0.1:0 --threads 1 >"$WORK/backend$b.log" 2>&1 &
        PIDS+=($!) BPIDS+=($!)
        line=$(wait_line "$WORK/backend$b.log" "listening on" 10) || { cat "$WORK/backend$b.log" >&2; exit 1; }
        BADDRS+=("$(addr_of "$line")")
    done
    B1=${BADDRS[0]##*:} B2=${BADDRS[1]##*:}
    TADDR[direct]=${BADDRS[0]}
}

# One proxy instance each: INSTANCE is the target (wslb, haproxy, nginx) or, for the TLS
# ones, TARGET:CERT (wslb:ecdsa, ...). Files are named after it with - for :.
# start_wslb INSTANCE [--tls-listen ... --cert C --key K]
start_wslb() {
    local key=$1 f=${1/:/-} pattern="listening on" line
    shift
    [ $# -gt 0 ] && pattern="tls listening on"
    rm -f "$WORK/$f.log"
    "${PIN_PROXY[@]}" "$WSLB" -l 127.0.0.1:0 "$@" -B "ws://127.0.0.1:$B1" -B "ws://127.0.0.1:$B2" \
        --max-connections 20000 --idle-timeout 300s >"$WORK/$f.log" 2>&1 &
    PIDS+=($!) TPID[$key]=$!
    line=$(wait_line "$WORK/$f.log" "$pattern" 10) || { cat "$WORK/$f.log" >&2; exit 1; }
    TADDR[$key]=$(addr_of "$line")
}
# start_haproxy INSTANCE TEMPLATE [CERT+KEY PEM]
start_haproxy() {
    local key=$1 f=${1/:/-} port
    port=$(free_port)
    sed -e "s/@PORT@/$port/; s/@B1@/$B1/; s/@B2@/$B2/; s/@MAXCONN@/$MAXCONN/; s#@CRT@#${3:-}#" \
        "$2" >"$WORK/$f.cfg"
    "${PIN_PROXY[@]}" "$HAPROXY" -db -f "$WORK/$f.cfg" >"$WORK/$f.log" 2>&1 &
    PIDS+=($!) TPID[$key]=$!
    wait_port "$port" 10 || { cat "$WORK/$f.log" >&2; exit 1; }
    TADDR[$key]=127.0.0.1:$port
}
# start_nginx INSTANCE TEMPLATE [CERT KEY]
start_nginx() {
    local key=$1 f=${1/:/-} port
    port=$(free_port)
    mkdir -p "$WORK/$f"
    sed -e "s/@PORT@/$port/; s/@B1@/$B1/; s/@B2@/$B2/; s/@CONNS@/$((NOFILE * 2))/" \
        -e "s/@NOFILE@/$NOFILE/; s#@DIR@#$WORK/$f#g; s#@CERT@#${3:-}#; s#@KEY@#${4:-}#" \
        "$2" >"$WORK/$f/nginx.conf"
    "${PIN_PROXY[@]}" "$NGINX" -p "$WORK/$f" -c "$WORK/$f/nginx.conf" -e "$WORK/$f/error.log" \
        >"$WORK/$f.log" 2>&1 &
    PIDS+=($!) TPID[$key]=$!
    wait_port "$port" 10 || { cat "$WORK/$f.log" "$WORK/$f/error.log" >&2; exit 1; }
    TADDR[$key]=127.0.0.1:$port
}

# start_target NAME: one plain proxy (wslb, haproxy, nginx) in front of B1 B2, with the bench
# configs. Uses NOFILE and MAXCONN (HAProxy's maxconn); nginx gets twice NOFILE connection
# slots (see nginx.conf.in).
start_target() {
    case $1 in
    wslb) start_wslb wslb ;;
    haproxy) start_haproxy haproxy "$ROOT/bench/haproxy.cfg.in" ;;
    nginx) start_nginx nginx "$ROOT/bench/nginx.conf.in" ;;
    *) echo "$LOG_TAG: unknown target $1" >&2; exit 2 ;;
    esac
}

# Process ids making up a target instance: wslb, nginx, ... or a TLS one, wslb:ecdsa,
# nginx:rsa, ... (nginx: master + worker).
pids_of() {
    # shellcheck disable=SC2046 # one pid a word
    case $1 in
    nginx*) echo "${TPID[$1]}" $(pgrep -P "${TPID[$1]}" 2>/dev/null || true) ;;
    direct) echo "${BPIDS[@]}" ;;
    *) echo "${TPID[$1]}" ;;
    esac
}

# CPU ticks (user + system) of a target's processes.
ticks_of() {
    local p t=0 s
    for p in $(pids_of "$1"); do
        s=$(cut -d')' -f2 "/proc/$p/stat" 2>/dev/null) || continue
        # shellcheck disable=SC2086 # the fields of /proc/PID/stat after the name
        set -- $s
        t=$((t + ${12} + ${13}))
    done
    echo "$t"
}

# RSS in KiB of a target's processes.
rss_of() {
    local p t=0 r
    for p in $(pids_of "$1"); do
        r=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null) || continue
        t=$((t + ${r:-0}))
    done
    echo "$t"
}

# Open descriptors of a target's processes.
fds_of() {
    local p t=0 f
    for p in $(pids_of "$1"); do
        f=("/proc/$p/fd"/*)
        [ "${f[0]}" != "/proc/$p/fd/*" ] && t=$((t + ${#f[@]}))
    done
    echo "$t"
}
