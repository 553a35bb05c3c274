#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS_PER_TARGET seconds (default 60).
#
#   fuzz/run.sh [SECONDS_PER_TARGET]
#
# Works on stable Rust: the sanitizer flags cargo-fuzz passes are unstable, so the build
# runs with RUSTC_BOOTSTRAP=1 (no nightly toolchain is needed or downloaded). cargo-fuzz is
# installed from crates.io when missing.
#
# The committed corpus (fuzz/corpus/<target>, fuzz/regressions/<target>) is read only:
# libFuzzer writes new units into its first corpus directory, which here is a temporary one,
# so a run never dirties the git tree. Any crash, leak, timeout (-timeout=10) or
# out-of-memory (-rss_limit_mb=2048) fails the run (non-zero exit) and leaves the
# reproducer in fuzz/artifacts/<target>/. One summary line per target gives the executions
# and executions per second (libFuzzer's -print_final_stats=1).
#
# FUZZ_TARGETS="a b" limits the run to some targets; FUZZ_SANITIZER overrides the sanitizer
# (default address, which includes LeakSanitizer on x86_64 Linux).
set -euo pipefail

seconds="${1:-60}"
case "$seconds" in
'' | *[!0-9]*)
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
    ;;
esac

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

# Targets fed the HTTP dictionary (their inputs are HTTP text).
dict_targets=" http_request http_response chunked ws_handshake "

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# The fuzzed code is built with the balancer's own dependency versions: fuzz/Cargo.lock is
# the root Cargo.lock (not committed, so a build never dirties the tree); cargo adds the
# fuzz-only crates (libfuzzer-sys) to it.
cp ../Cargo.lock Cargo.lock

export RUSTC_BOOTSTRAP=1
sanitizer="${FUZZ_SANITIZER:-address}"
build_start=$(date +%s)
# -O: optimised; -a: keep debug assertions and overflow checks (an overflow is a finding).
if ! cargo fuzz build -O -a --sanitizer "$sanitizer"; then
    if [ "$sanitizer" = none ]; then
        exit 1
    fi
    echo "fuzz: build with --sanitizer $sanitizer failed; retrying with --sanitizer none" >&2
    echo "fuzz: (coverage-guided fuzzing still works; memory errors and leaks go unchecked)" >&2
    sanitizer=none
    cargo fuzz build -O -a --sanitizer none
fi
echo "fuzz: built all targets in $(($(date +%s) - build_start)) s (sanitizer: $sanitizer)"

# Every [[bin]] in fuzz/Cargo.toml, so a new target is fuzzed without editing this script.
targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
triple="$(rustc -vV | sed -n 's/^host: //p')"
bin_dir="$here/target/$triple/release"
work="$(mktemp -d "${TMPDIR:-/tmp}/wslb-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# Everything the next person needs to fix a finding without rerunning the fuzzer: the
# target, the reproducer's path and bytes (CI artifacts are often gone), and the commands
# that replay it, with and without nightly-only tooling.
report_reproducer() {
    local target="$1" file="$2" size
    size=$(wc -c <"$file")
    echo "fuzz:   target:     $target"
    echo "fuzz:   reproducer: $file ($size bytes)"
    if [ "$size" -lt 4096 ]; then
        echo "fuzz:   base64:     $(base64 -w0 "$file")"
        echo "fuzz:   recreate:   echo '$(base64 -w0 "$file")' | base64 -d > crash.bin"
    else
        echo "fuzz:   (over 4 KiB: bytes not printed; the log is in fuzz/artifacts/$target/)"
    fi
    echo "fuzz:   replay:     (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run -O -a $target $file)"
    echo "fuzz:   on stable:  cp $file fuzz/regressions/$target/crash-<hash>-<what>-regression && cargo test --test fuzz_corpus"
}

failed=()
total_execs=0
for t in $targets; do
    mkdir -p "artifacts/$t" "$work/$t"
    corpora=("$work/$t")
    for dir in "corpus/$t" "regressions/$t"; do
        if [ -d "$dir" ]; then
            corpora+=("$dir")
        fi
    done
    flags=(
        "-max_total_time=$seconds"
        -timeout=10
        -rss_limit_mb=2048
        -print_final_stats=1
        "-artifact_prefix=artifacts/$t/"
    )
    if [[ "$dict_targets" == *" $t "* ]]; then
        flags+=("-dict=http.dict")
    elif [ "$t" = control_message ]; then
        flags+=("-dict=json.dict")
    elif [ "$t" = proxy_header ]; then
        flags+=("-dict=proxy.dict")
    fi
    log="$work/$t.log"
    touch "$work/$t.start"
    status=0
    "$bin_dir/$t" "${flags[@]}" "${corpora[@]}" >"$log" 2>&1 || status=$?
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
    found="$(find "artifacts/$t" -type f -newer "$work/$t.start" 2>/dev/null | head -n 5)"
    total_execs=$((total_execs + ${execs:-0}))
    if [ "$status" -ne 0 ]; then
        failed+=("$t")
        printf 'fuzz: %-14s FAILED (exit %s) after %s execs\n' "$t" "$status" "${execs:-?}"
        grep -E '^(==[0-9]+==|SUMMARY|thread .* panicked|artifact_prefix|Test unit written)' "$log" | head -n 20 || true
        sed -n '/panicked at/,+6p' "$log" | head -n 20
        cp "$log" "artifacts/$t/last-failure.log"
        if [ -z "$found" ]; then
            echo "fuzz:   $t: no reproducer was written (see the log above)"
        fi
        for f in $found; do
            report_reproducer "$t" "$here/$f"
        done
    else
        printf 'fuzz: %-14s ok  %12s execs  %8s execs/s  (%s s)\n' "$t" "${execs:-?}" "${rate:-?}" "$seconds"
    fi
done

echo "fuzz: total $total_execs execs over $(echo "$targets" | wc -w) targets"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz: FAILED: ${failed[*]}" >&2
    exit 1
fi
