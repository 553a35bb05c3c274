#!/usr/bin/env python3
"""Autobahn|Testsuite through wslb, compared case by case with the same run direct.

Two directions, each run direct and through wslb (a static `-B` backend):
  client: `wstest -m fuzzingclient` -> [wslb ->] a third-party echo server
          (frames client->backend; the backend's verdicts relayed back)
  server: examples/autobahn_client (tungstenite) -> [wslb ->] `wstest -m fuzzingserver`
          (frames backend->client)
For every case, Autobahn's `behavior` and `behaviorClose` through wslb must equal the direct
run's. Writes OUT/table.md (every case, both directions) and OUT/summary.txt, prints the
summary, and exits 1 if any case differs (2 if the run itself failed).

Ports: every listener binds 127.0.0.1:0 (wslb; Autobahn's servers through
scripts/autobahn/wstest_server.py, which also turns off their Host-port check that any
proxy fails; the websockets echo server) and reports the port it took. Only wstest's
fuzzingclient runs direct from `wstest`.
Every wait has a deadline. Run scripts/autobahn/install.sh first (make does).
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
AB = ROOT / "target" / "autobahn"
WSTEST = AB / "py27" / "bin" / "wstest"
PY3 = AB / "py3" / "bin" / "python"
PY27 = AB / "py27" / "bin" / "python"
QUICK_EXCLUDE = ["9.*", "12.*", "13.*"]
# Upper bounds for one whole wstest run; the full suite takes ~5 min on 2 cores.
RUN_LIMIT = {True: 300, False: 1800}
# Extra side-by-side runs of the cases whose first results differ, each with this many
# direct and through-wslb agents (one wstest start-up buys several samples).
RERUNS = 4
RERUN_COPIES = 4


class Procs:
    """Children started here, stopped (by their own pid) on exit."""

    def __init__(self):
        self.procs = []

    def start(self, args, log, **kw):
        f = open(log, "wb")
        p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


def wait_for(pred, what, limit=20.0, proc=None):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {limit} s")


def log_match(path, pattern):
    try:
        m = re.search(pattern, Path(path).read_text(errors="replace"))
    except OSError:
        return None
    return m.group(1) if m else None


def start_wslb(procs, wslb, backend_port, log):
    p = procs.start(
        [str(wslb), "-l", "127.0.0.1:0", "-B", f"ws://127.0.0.1:{backend_port}"], log
    )
    addr = wait_for(lambda: log_match(log, r"listening on (127\.0\.0\.1:\d+)"), "wslb", proc=p)
    return int(addr.rsplit(":", 1)[1])


def start_echo(procs, kind, out):
    """A conforming third-party echo server; returns its port."""
    log = out / f"echo-{kind}.log"
    if kind == "websockets":
        p = procs.start([str(PY3), str(ROOT / "scripts/autobahn/echo_server.py")], log)
        return int(wait_for(lambda: log_match(log, r"PORT (\d+)"), "echo server", proc=p))
    p = procs.start([str(PY27), str(ROOT / "scripts/autobahn/wstest_server.py"), "echoserver"], log)
    return int(wait_for(lambda: log_match(log, r"PORT (\d+)"), "wstest echoserver", proc=p))


def agents(copies):
    """Agent names: "direct" and "wslb", or numbered copies of each for reruns."""
    if copies == 1:
        return [("direct", "direct"), ("wslb", "wslb")]
    return [(side, f"{side}-{i}") for i in range(1, copies + 1) for side in ("direct", "wslb")]


def run_client_direction(procs, args, out, echo, cases, exclude, copies=1):
    """fuzzingclient against the echo server, direct and through wslb; the report index."""
    out.mkdir(parents=True, exist_ok=True)
    echo_port = start_echo(procs, echo, out)
    lb_port = start_wslb(procs, args.wslb, echo_port, out / "wslb.log")
    spec = {
        "outdir": str(out / "reports"),
        "servers": [
            {"agent": name, "url": f"ws://127.0.0.1:{echo_port if side == 'direct' else lb_port}"}
            for side, name in agents(copies)
        ],
        "cases": cases,
        "exclude-cases": exclude,
        "exclude-agent-cases": {},
    }
    spec_path = out / "fuzzingclient.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    try:
        with open(out / "wstest.log", "wb") as log:
            subprocess.run(
                [str(WSTEST), "-m", "fuzzingclient", "-s", str(spec_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=out,
                timeout=RUN_LIMIT[args.quick], check=True,
            )
    finally:
        procs.stop_all()
    return json.loads((out / "reports" / "index.json").read_text())


def run_server_direction(procs, args, out, cases, exclude, copies=1):
    """tungstenite's client against the fuzzingserver, direct and through wslb."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "url": "ws://127.0.0.1:0",
        "outdir": str(out / "reports"),
        "cases": cases,
        "exclude-cases": exclude,
        "exclude-agent-cases": {},
    }
    spec_path = out / "fuzzingserver.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    log = out / "wstest.log"
    try:
        p = procs.start(
            [str(PY27), str(ROOT / "scripts/autobahn/wstest_server.py"), "fuzzingserver", str(spec_path)],
            log,
            cwd=out,
        )
        port = int(wait_for(lambda: log_match(log, r"PORT (\d+)"), "fuzzingserver", proc=p))
        lb_port = start_wslb(procs, args.wslb, port, out / "wslb.log")
        for side, agent in agents(copies):
            target = port if side == "direct" else lb_port
            with open(out / f"client-{agent}.log", "wb") as clog:
                subprocess.run(
                    [str(args.client), f"ws://127.0.0.1:{target}", agent],
                    stdout=clog, stderr=subprocess.STDOUT,
                    timeout=RUN_LIMIT[args.quick], check=True,
                )
    finally:
        procs.stop_all()
    return json.loads((out / "reports" / "index.json").read_text())


def case_key(case):
    return tuple(int(x) for x in case.split("."))


def outcome(index, agent, case):
    r = index.get(agent, {}).get(case, {})
    return (r.get("behavior", "MISSING"), r.get("behaviorClose", "MISSING"))


def outcomes(index, side, case):
    """Every outcome of `case` among the agents of one side (copies included)."""
    return {
        outcome(index, agent, case)
        for agent in index
        if agent == side or agent.startswith(side + "-")
    }


PASSING = ({"OK", "NON-STRICT", "INFORMATIONAL"}, {"OK", "INFORMATIONAL"})


def same(direct, wslb):
    """The rule `settle` documents, over the outcome sets of one case."""
    if wslb <= direct:
        return True
    passing = all(b in PASSING[0] and c in PASSING[1] for b, c in direct | wslb)
    return passing and bool(direct & wslb)


def settle(run, out, first):
    """Per case, the outcomes seen direct and through wslb. A case whose two outcomes differ
    is run again (direct and through wslb, side by side) up to RERUNS times: some cases'
    results depend on how the echo server's reads happen to split the bytes (Autobahn sends
    them octet by octet; a server that fails by dropping TCP loses the echo it had queued
    when the bad frame came in the same read), and vary between direct runs too; which way
    they lean depends on load. A case passes when every outcome seen through wslb also
    occurred direct, or when both ways reached a common outcome and every outcome seen
    either way is a passing one (OK / NON-STRICT / INFORMATIONAL): strict and non-strict
    behaviour are both conforming and which one a run gets is the echo server's timing."""
    cases = sorted(set(first.get("direct", {})) | set(first.get("wslb", {})), key=case_key)
    seen = {c: ({outcome(first, "direct", c)}, {outcome(first, "wslb", c)}) for c in cases}

    def unsettled():
        return [c for c, (d, w) in seen.items() if not same(d, w)]

    for i in range(RERUNS):
        todo = unsettled()
        if not todo:
            break
        index = run(out / f"rerun-{i + 1}", todo, [], RERUN_COPIES)
        for c in todo:
            seen[c][0].update(outcomes(index, "direct", c))
            seen[c][1].update(outcomes(index, "wslb", c))
    return cases, seen


def compare(name, cases, first, seen):
    rows, diffs, counts = [], [], {"direct": {}, "wslb": {}}
    for case in cases:
        dv, wv = outcome(first, "direct", case), outcome(first, "wslb", case)
        for agent, v in (("direct", dv), ("wslb", wv)):
            counts[agent][v[0]] = counts[agent].get(v[0], 0) + 1
        d_all, w_all = seen[case]
        if dv == wv and len(d_all) == 1 and len(w_all) == 1:
            verdict = "same"
        elif same(d_all, w_all):
            verdict = "same (varies direct too: " + "; ".join(
                " / ".join(o) for o in sorted(d_all)
            ) + "; through wslb: " + "; ".join(" / ".join(o) for o in sorted(w_all)) + ")"
        else:
            verdict = "**DIFFERS** (direct: " + "; ".join(" / ".join(o) for o in sorted(d_all)) + \
                "; wslb: " + "; ".join(" / ".join(o) for o in sorted(w_all)) + ")"
            diffs.append(case)
        rows.append(f"| {name} | {case} | {dv[0]} / {dv[1]} | {wv[0]} / {wv[1]} | {verdict} |")
    return rows, diffs, counts


def fmt_counts(c):
    return ", ".join(f"{v} {k}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="exclude 9.*, 12.*, 13.*")
    ap.add_argument("--out", type=Path, default=AB / "results")
    ap.add_argument("--wslb", type=Path, default=ROOT / "target/debug/wslb")
    ap.add_argument("--client", type=Path, default=ROOT / "target/debug/examples/autobahn_client")
    ap.add_argument("--echo", choices=["wstest", "websockets", "both"], default="wstest",
                    help="echo server behind the fuzzingclient: Autobahn's own (fails by "
                    "dropping TCP), Python websockets (fails with a close frame), or both")
    ap.add_argument("--direction", choices=["client", "server", "both"], default="both")
    args = ap.parse_args()
    for path in (WSTEST, PY3, args.wslb, args.client):
        if not path.exists():
            sys.exit(f"conformance: {path} missing (run scripts/autobahn/install.sh and cargo build)")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    exclude = QUICK_EXCLUDE if args.quick else []
    procs = Procs()
    runs = []
    if args.direction in ("client", "both"):
        for echo in (["wstest", "websockets"] if args.echo == "both" else [args.echo]):
            runs.append((
                f"client→backend (fuzzingclient; echo: {echo})",
                out / f"client-{echo}",
                lambda o, c, x, n=1, echo=echo: run_client_direction(procs, args, o, echo, c, x, n),
            ))
    if args.direction in ("server", "both"):
        runs.append((
            "backend→client (fuzzingserver; tungstenite client)",
            out / "server",
            lambda o, c, x, n=1: run_server_direction(procs, args, o, c, x, n),
        ))
    results = []
    try:
        for name, where, run in runs:
            first = run(where, ["*"], exclude)
            cases, seen = settle(run, where, first)
            results.append((name, cases, first, seen))
    except (RuntimeError, subprocess.SubprocessError, OSError, ValueError) as e:
        print(f"conformance: run failed: {e} (logs in {out})", file=sys.stderr)
        return 2
    finally:
        procs.stop_all()

    table = [
        f"# Autobahn|Testsuite: direct vs through wslb ({'quick: without ' + ', '.join(QUICK_EXCLUDE) if args.quick else 'full'})",
        "",
        "| direction | case | direct (behavior / close) | through wslb | |",
        "| --- | --- | --- | --- | --- |",
    ]
    summary, failed = [], False
    for name, cases, first, seen in results:
        rows, diffs, counts = compare(name, cases, first, seen)
        table.extend(rows)
        varied = sum(1 for c in cases if len(seen[c][0] | seen[c][1]) > 1 and c not in diffs)
        summary.append(f"{name}: {len(rows)} cases")
        summary.append(f"  direct: {fmt_counts(counts['direct'])}")
        summary.append(f"  wslb:   {fmt_counts(counts['wslb'])}")
        summary.append(f"  cases whose result varies from run to run, direct too: {varied}")
        summary.append(f"  differing cases: {len(diffs)}" + (f" ({', '.join(diffs)})" if diffs else ""))
        failed |= bool(diffs) or not rows
    (out / "table.md").write_text("\n".join(table) + "\n")
    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    print(f"per-case table: {out / 'table.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
