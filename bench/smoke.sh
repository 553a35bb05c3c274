#!/usr/bin/env bash
# ~8 s smoke of the benchmark harness (for `make test`): one bench backend + wslb, each load
# generator scenario for 1 s against wslb; fails unless every scenario did some ops with zero
# errors. Needs only wslb and the examples (no HAProxy/nginx); the TLS checks (tls-hs, a
# resumed tls-hs, wss echo against wslb's TLS listener) need openssl, else they are skipped.
#   bash bench/smoke.sh [--release] [--no-build]
# Debug binaries by default (`cargo test --all-targets` has built them already, so this is
# only an incremental build); --release uses target/release.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CARGO=${CARGO:-cargo}
PROFILE=debug BUILD=1
for a in "$@"; do
    case $a in
    --release) PROFILE=release ;;
    --no-build) BUILD=0 ;;
    *) echo "smoke: unknown argument $a" >&2; exit 2 ;;
    esac
done
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE
if [ "$BUILD" = 1 ]; then
    flags=(--bins --examples --quiet)
    [ "$PROFILE" = release ] && flags+=(--release)
    (cd "$ROOT" && "$CARGO" build "${flags[@]}")
fi
# shellcheck source=bench/procs.sh
source "$ROOT/bench/procs.sh" smoke

"$BIN/examples/bench_backend" --listen 127.0.0.1:0 >"$WORK/backend.log" 2>&1 &
PIDS+=($!)
BACKEND=$(wait_addr "$WORK/backend.log")
TLS_ARGS=()
if command -v openssl >/dev/null; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
        -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -addext "basicConstraints=critical,CA:FALSE" \
        -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
    TLS_ARGS=(--tls-listen 127.0.0.1:0 --cert "$WORK/cert.pem" --key "$WORK/key.pem")
fi
"$BIN/wslb" -l 127.0.0.1:0 "${TLS_ARGS[@]}" -B "ws://$BACKEND" >"$WORK/wslb.log" 2>&1 &
PIDS+=($!)
WSLB=$(wait_addr "$WORK/wslb.log")
[ ${#TLS_ARGS[@]} -gt 0 ] && WSLB_TLS=$(wait_addr "$WORK/wslb.log" "tls listening on ")

fail=0
check() { # NAME JSON: ops > 0 and errors == 0
    local ops errors
    ops=$(sed -n 's/.*"ops":\([0-9]*\).*/\1/p' <<<"$2")
    errors=$(sed -n 's/.*"errors":\([0-9]*\).*/\1/p' <<<"$2")
    if [ "${ops:-0}" -gt 0 ] && [ "${errors:-1}" = 0 ]; then
        echo "smoke: $1 ok ($ops ops)"
    else
        echo "smoke: $1 FAILED: $2" >&2
        fail=1
    fi
}
LG=$BIN/examples/loadgen
check ws-echo "$(timeout 30 "$LG" ws-echo --target "$WSLB" --conns 8 --size 128 --secs 1)"
check http "$(timeout 30 "$LG" http --target "$WSLB" --conns 8 --secs 1)"
check ws-rate "$(timeout 30 "$LG" ws-rate --target "$WSLB" --conns 4 --secs 1)"
hold=$(echo | timeout 30 "$LG" ws-hold --target "$WSLB" --n 50 | tail -1)
held=$(sed -n 's/.*"held":\([0-9]*\).*/\1/p' <<<"$hold")
if [ "${held:-0}" = 50 ] && grep -q '"errors":0' <<<"$hold" && grep -q '"lost":0' <<<"$hold"; then
    echo "smoke: ws-hold ok (50 held)"
else
    echo "smoke: ws-hold FAILED: $hold" >&2
    fail=1
fi
passed=5
TLS_HS='{}'
if [ -n "${WSLB_TLS:-}" ]; then
    TLS_HS=$(timeout 30 "$LG" tls-hs --target "$WSLB_TLS" --conns 2 --secs 1 --label tls-hs-ecdsa-1.3)
    check tls-hs "$TLS_HS"
    resume=$(timeout 30 "$LG" tls-hs --target "$WSLB_TLS" --conns 2 --secs 0.5 --resume)
    if [ "$(sed -n 's/.*"resumed":\([0-9]*\).*/\1/p' <<<"$resume")" -gt 0 ] 2>/dev/null; then
        check "tls-hs --resume" "$resume"
    else
        echo "smoke: tls-hs --resume FAILED (nothing resumed): $resume" >&2
        fail=1
    fi
    check "ws-echo --tls" "$(timeout 30 "$LG" ws-echo --tls --target "$WSLB_TLS" --conns 8 --size 128 --secs 1)"
    passed=$((passed + 3))
else
    echo "smoke: no openssl: TLS checks skipped"
fi
# the report step of bench/run.sh, on a tiny record set
printf '%s\n' '{"kind":"meta","cpus":1,"rounds":1}' \
    "{\"kind\":\"run\",\"target\":\"wslb\",\"round\":1,\"cpu_pct\":50,\"result\":$(timeout 30 "$LG" http --target "$WSLB" --conns 2 --secs 0.2)}" \
    "{\"kind\":\"run\",\"target\":\"wslb\",\"round\":1,\"cpu_pct\":50,\"result\":$TLS_HS}" \
    >"$WORK/raw.jsonl"
if "$LG" report --in "$WORK/raw.jsonl" --json "$WORK/out.json" --md "$WORK/out.md" && grep -q "req/s" "$WORK/out.md" &&
    { [ "$TLS_HS" = '{}' ] || grep -q "handshakes/s" "$WORK/out.md"; }; then
    echo "smoke: report ok"
else
    echo "smoke: report FAILED" >&2
    fail=1
fi
if [ "$fail" != 0 ]; then
    echo "smoke: wslb log:" >&2
    tail -20 "$WORK/wslb.log" >&2
    exit 1
fi
echo "smoke: $passed passed, 0 failed"
