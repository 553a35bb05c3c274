#!/usr/bin/env python3
"""bench/scale.sh's report: raw records (one JSON object a line: meta, start, climb, step,
release, end) -> summary JSON and markdown.

    python3 bench/scale_report.py RAW.jsonl OUT.json OUT.md

Per proxy and step: medians over rounds. The slope is a least-squares fit of RSS (KiB)
against the connections actually held, over the idle point and every plateau; it predicts
RSS at 100,000 and 1,000,000 held connections. The kernel-limit section is computed from
the machine's settings recorded in `meta`. Standard library only.
"""

import json
import math
import statistics
import sys

PROXIES = ["wslb", "haproxy", "nginx"]
NAMES = {"wslb": "wslb", "haproxy": "HAProxy", "nginx": "nginx"}
PREDICT = [100_000, 1_000_000]
# Echo figures: blank when the echo failed. Rows without a ratio: counts, not costs.
ECHO_KEYS = {"msgs_per_sec", "p50_us", "p99_us", "cpu_pct", "cpu_us_per_msg"}
CLIMB_KEYS = {"conns_per_sec", "climb_cpu_us_per_conn"}
NO_RATIO = {"held", "fds", "climb_errors", "echo_errors", "cpu_pct", "echo_close_secs"}


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fit(points):
    """Least squares y = a + b x; returns (b, a, r2) or None."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in points)
    b = sxy / sxx
    a = my - b * mx
    syy = sum((y - my) ** 2 for _, y in points)
    r2 = 1 - sum((y - a - b * x) ** 2 for x, y in points) / syy if syy > 0 else 1.0
    return b, a, r2


def fmt(v, digits=0, unit=""):
    if v is None:
        return "–"
    if isinstance(v, float) and digits == 0:
        v = round(v)
    if digits:
        return f"{v:,.{digits}f}{unit}"
    return f"{v:,}{unit}"


def ratio(a, b, lower_better=True):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def mib(kb):
    return None if kb is None else kb / 1024


def human_kb(kb):
    if kb is None:
        return "–"
    if kb >= 1024 * 1024:
        return f"{kb / 1024 / 1024:,.1f} GiB"
    return f"{kb / 1024:,.0f} MiB"


def main(raw_path, json_path, md_path):
    recs = []
    with open(raw_path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError as e:
                print(f"scale_report: skipping a bad record ({e}): {line[:200]}", file=sys.stderr)
    meta = next((r for r in recs if r.get("kind") == "meta"), {})
    end = next((r for r in recs if r.get("kind") == "end"), {})
    of = lambda kind: [r for r in recs if r.get("kind") == kind]
    proxies = [p for p in PROXIES if any(r.get("target") == p for r in of("start"))]
    steps = [0] + list(meta.get("steps", []))

    summary = {"meta": meta, "end": end, "proxies": {}}
    for p in proxies:
        starts = [r for r in of("start") if r["target"] == p]
        idle = median([r["rss_idle_kb"] for r in starts])
        per_step = {}
        points = []
        for s in steps:
            rs = [r for r in of("step") if r["target"] == p and r["step"] == s]
            if not rs:
                continue
            cl = [r for r in of("climb") if r["target"] == p and r["to"] == s]
            held = median([r["held"] for r in rs])
            rss = median([r["rss_kb"] for r in rs])
            echo = lambda k: median([r.get("echo", {}).get(k) for r in rs])
            per_conn = [
                (r["rss_kb"] - idle) / r["held"] for r in rs if r["held"] and idle is not None
            ]
            per_step[s] = {
                "held": held,
                "rss_kb": rss,
                "kib_per_conn": median(per_conn),
                "fds": median([r["fds"] for r in rs]),
                "conns_per_sec": median([r["conns_per_sec"] for r in cl]),
                "climb_secs": median([r["secs"] for r in cl]),
                "climb_errors": max([r["errors"] for r in cl], default=None),
                "climb_cpu_us_per_conn": median([r.get("cpu_us_per_conn") for r in cl]),
                "msgs_per_sec": echo("ops_per_sec"),
                "p50_us": echo("p50_us"),
                "p99_us": echo("p99_us"),
                "echo_close_secs": median([r.get("echo_close_secs") for r in rs]),
                "echo_errors": max([r.get("echo", {}).get("errors", 0) or 0 for r in rs]),
                "cpu_pct": median([r.get("cpu_pct") for r in rs]),
                "cpu_us_per_msg": median([r.get("cpu_us_per_msg") for r in rs]),
                "tcp_mem_kb": median([r.get("tcp_mem_kb") for r in rs]),
                "slab_kb": median([r.get("slab_kb") for r in rs]),
            }
            points += [(r["held"], r["rss_kb"]) for r in rs]
        f = fit(points)
        top = max(per_step) if per_step else 0
        # p99 growth: up to the most held with a working echo (no errors, some messages).
        ok = [k for k, v in per_step.items() if (v["msgs_per_sec"] or 0) > 0 and not v["echo_errors"]]
        base, last = per_step.get(0, {}), per_step.get(max(ok) if ok else top, {})
        failed = sorted(k for k in per_step if k not in ok)
        rel = [r for r in of("release") if r["target"] == p]
        # Kernel memory of the whole machine (4 sockets per proxied connection here: client,
        # proxy front and back, backend) per held connection, slab and TCP buffers.
        k0 = median([r.get("slab_kb") for r in starts])
        kern = None
        tops = per_step.get(top, {})
        if k0 is not None and tops.get("slab_kb") is not None and tops.get("held"):
            kern = (tops["slab_kb"] - k0) / tops["held"]
        summary["proxies"][p] = {
            "rss_start_kb": median([r["rss_start_kb"] for r in starts]),
            "rss_idle_kb": idle,
            "fds_idle": median([r["fds_idle"] for r in starts]),
            "note": next((r.get("note") for r in starts if r.get("note")), ""),
            "steps": {str(k): v for k, v in per_step.items()},
            "fit": None
            if f is None
            else {
                "kib_per_conn": f[0],
                "intercept_kb": f[1],
                "r2": f[2],
                "points": len(points),
                "predict_kb": {str(n): f[1] + f[0] * n for n in PREDICT},
            },
            "p99_growth": {
                "from_us": base.get("p99_us"),
                "to_us": last.get("p99_us"),
                "held": last.get("held"),
                "ratio": (last["p99_us"] / base["p99_us"])
                if base.get("p99_us") and last.get("p99_us")
                else None,
            },
            "echo_failed_at": failed,
            "short_of_step": {str(k): v["held"] for k, v in per_step.items() if k and v["held"] is not None and v["held"] < k},
            "lost_while_held": max([r["lost"] for r in rel], default=None),
            "rss_after_release_kb": median([r["rss_after_kb"] for r in rel]),
            "fds_after_release": median([r["fds_after"] for r in rel]),
            "kernel_slab_kib_per_conn_machine": kern,
        }
    summary["limits"] = limits(meta, summary)
    with open(json_path, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(markdown(meta, end, summary, proxies, steps))


def limits(meta, summary):
    lim = meta.get("limits", {})
    ports = lim.get("port_hi", 60999) - lim.get("port_lo", 32768) + 1
    out = {"ports_per_tuple": ports, "for": {}}
    for n in PREDICT:
        mem = {
            p: s["fit"]["predict_kb"][str(n)]
            for p, s in summary["proxies"].items()
            if s.get("fit")
        }
        out["for"][str(n)] = {
            "nofile": 2 * n + 1024,
            "nr_open": 2 * n + 1024,
            "file_max": 2 * n + 65536,
            "backend_tuples": math.ceil(n / ports),
            "backend_tuples_full_range": math.ceil(n / (65535 - 1024 + 1)),
            "somaxconn": 4096 if n <= 100_000 else 65535,
            "tcp_max_syn_backlog": 4096 if n <= 100_000 else 65535,
            "proxy_rss_kb": mem,
        }
    return out


def markdown(meta, end, summary, proxies, steps):
    L = []
    w = L.append
    lim = meta.get("limits", {})
    w("# wslb scale benchmark: cost per held WebSocket\n")
    w(
        f"{meta.get('date', '?')}, kernel {meta.get('kernel', '?')}, {meta.get('cpus', '?')} CPUs, "
        f"{meta.get('mem_total_kb', 0) / 1024 / 1024:.1f} GiB; {meta.get('versions', '')}. "
        f"{meta.get('placement', '')}. Steps {meta.get('steps')}, {meta.get('rounds')} round(s) "
        f"(medians), echo {meta.get('echo_conns')} connections × 128 B for {meta.get('secs')} s "
        f"after {meta.get('warmup')} s warm-up; ws-hold --parallel {meta.get('parallel')}; "
        f"nofile {meta.get('nofile')}. Machine busy before: {meta.get('busy_before_pct')}% "
        f"(load {meta.get('loadavg_start')}), after: {end.get('busy_after_pct', '?')}% "
        f"(load {end.get('loadavg_end', '?')}).\n"
    )
    if meta.get("cap_note"):
        w(f"**Capped:** {meta['cap_note']}.\n")
    for p in proxies:
        note = summary["proxies"][p].get("note")
        if note:
            w(f"**{NAMES[p]}** logged at start: \"{note}\" — it accepts no more client connections "
              "than that (held + the echo ones).\n")
    w(
        "Columns: *held* = WebSockets the proxy held (each did one echo, then idle); *RSS* = "
        "resident memory of all the proxy's processes; *KiB/conn* = (RSS − RSS idle before "
        "the climb) / held; *fds* = the proxy's open descriptors; *climb* = connections "
        "established per second while climbing to this step (time from starting `loadgen "
        "ws-hold` to its ready line) and the proxy's CPU µs per connection established; "
        "*msgs/s, p50, p99* = 128-byte echo on 64 more connections while the others are held; "
        "*CPU µs/msg* = the proxy's CPU time over the echo run per message; *echo conns closed "
        "after* = how long the proxy took to close the echo's connections after the run (the "
        "next climb waits for it, 10 s at most). Ratios are wslb / "
        "the other: below 1 is better for memory, latency and CPU, above 1 for rates. A "
        "busy machine (see above) skews the echo and climb figures, not the memory ones.\n"
    )
    rows = [
        ("held", "held", 0, ""),
        ("RSS MiB", "rss_mib", 1, ""),
        ("KiB/conn", "kib_per_conn", 2, ""),
        ("fds", "fds", 0, ""),
        ("climb conn/s", "conns_per_sec", 0, ""),
        ("climb CPU µs/conn", "climb_cpu_us_per_conn", 1, ""),
        ("climb errors", "climb_errors", 0, ""),
        ("echo msgs/s", "msgs_per_sec", 0, ""),
        ("echo p50 µs", "p50_us", 0, ""),
        ("echo p99 µs", "p99_us", 0, ""),
        ("echo errors", "echo_errors", 0, ""),
        ("echo conns closed after s", "echo_close_secs", 1, ""),
        ("CPU %", "cpu_pct", 1, ""),
        ("CPU µs/msg", "cpu_us_per_msg", 1, ""),
    ]
    cols = [NAMES[p] for p in proxies]
    has_h, has_n = "haproxy" in proxies, "nginx" in proxies
    for s in steps:
        if not any(str(s) in summary["proxies"][p]["steps"] for p in proxies):
            continue
        w(f"\n## {s:,} held" + (" (baseline: nothing held)" if s == 0 else "") + "\n")
        head = "| | " + " | ".join(cols)
        if has_h:
            head += " | wslb/HAProxy"
        if has_n:
            head += " | wslb/nginx"
        w(head + " |")
        w("|---" * (1 + len(cols) + has_h + has_n) + "|")
        for label, key, digits, _ in rows:
            if s == 0 and key in ("held", "kib_per_conn", "conns_per_sec", "climb_cpu_us_per_conn", "climb_errors"):
                continue
            vals, cells = {}, {}
            for p in proxies:
                st = summary["proxies"][p]["steps"].get(str(s), {})
                v = mib(st.get("rss_kb")) if key == "rss_mib" else st.get(key)
                cell = fmt(v, digits)
                if key in ECHO_KEYS and not st.get("msgs_per_sec"):
                    v, cell = None, "failed"  # no message echoed at all
                elif key in ECHO_KEYS and st.get("echo_errors"):
                    v, cell = None, cell + " ⚠"  # some echo connections failed
                elif key in CLIMB_KEYS and st.get("climb_errors"):
                    v, cell = None, cell + " ⚠"  # the climb waited for connections that failed
                vals[p], cells[p] = v, cell
            line = f"| {label} | " + " | ".join(cells[p] for p in proxies)
            comparable = key not in NO_RATIO and "wslb" in vals
            if has_h:
                line += " | " + (ratio(vals["wslb"], vals["haproxy"]) if comparable else "")
            if has_n:
                line += " | " + (ratio(vals["wslb"], vals["nginx"]) if comparable else "")
            w(line + " |")
        w(
            "\n⚠ = some connections failed (echo or climb errors: the proxy was out of "
            "descriptors or connection slots; a climb then waits for ws-hold's time-outs), so "
            "the figure is not comparable."
            if any(
                summary["proxies"][p]["steps"].get(str(s), {}).get(k)
                for p in proxies
                for k in ("echo_errors", "climb_errors")
            )
            else ""
        )

    w("\n## Slope: RSS vs held connections (least squares)\n")
    w(
        "| | start MiB | idle MiB | KiB per conn (slope) | intercept MiB | R² | predicted at "
        "100,000 | predicted at 1,000,000 | p99 at 0 → max held | lost while held | RSS after release MiB |"
    )
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in proxies:
        s = summary["proxies"][p]
        f = s.get("fit")
        g = s["p99_growth"]
        growth = "–"
        if g.get("from_us") is not None and g.get("to_us") is not None:
            growth = f"{g['from_us']:,} → {g['to_us']:,} µs at {g['held']:,}"
            if g.get("ratio"):
                growth += f" ({g['ratio']:.2f}×)"
        w(
            f"| {NAMES[p]} | {fmt(mib(s['rss_start_kb']), 1)} | {fmt(mib(s['rss_idle_kb']), 1)} | "
            + (
                f"{f['kib_per_conn']:.2f} | {f['intercept_kb'] / 1024:.1f} | {f['r2']:.4f} | "
                f"{human_kb(f['predict_kb']['100000'])} | {human_kb(f['predict_kb']['1000000'])}"
                if f
                else "– | – | – | – | –"
            )
            + f" | {growth} | {fmt(s['lost_while_held'])} | {fmt(mib(s['rss_after_release_kb']), 1)} |"
        )
    for p in proxies:
        s = summary["proxies"][p]
        short = ", ".join(f"{int(k):,} → {int(v):,}" for k, v in s.get("short_of_step", {}).items())
        if short:
            w(f"\n**{NAMES[p]} held fewer than asked** (step → held): {short}.")
        if s.get("echo_failed_at"):
            w(
                f"\n**{NAMES[p]}: the echo failed** (errors or no messages) at step "
                + ", ".join(f"{k:,}" for k in s["echo_failed_at"])
                + "; its p99 growth stops at the last step that worked."
            )
    fits = {p: summary["proxies"][p]["fit"] for p in proxies if summary["proxies"][p].get("fit")}
    if "wslb" in fits and len(fits) > 1:
        parts = [
            f"{fits['wslb']['kib_per_conn'] / fits[p]['kib_per_conn']:.2f}× {NAMES[p]}'s"
            for p in fits
            if p != "wslb" and fits[p]["kib_per_conn"] > 0
        ]
        if parts:
            w(f"\nwslb's slope is {', '.join(parts)}.")
    kern = [
        (p, summary["proxies"][p]["kernel_slab_kib_per_conn_machine"])
        for p in proxies
        if summary["proxies"][p].get("kernel_slab_kib_per_conn_machine") is not None
    ]
    if kern:
        w(
            "\nKernel memory is not in RSS: the machine's slab grew by "
            + ", ".join(f"{v:.1f} KiB ({NAMES[p]})" for p, v in kern)
            + " per held connection at the top step — four TCP sockets each here (client, proxy "
            "front and back, backend), so roughly a quarter to a half of it is the proxy's two; "
            "system-wide and noisy on a shared machine. Idle sockets keep almost no buffer memory "
            "(see tcp_mem below).\n"
        )

    w("\n## Kernel limits to raise\n")
    lm = summary["limits"]
    ports = lm["ports_per_tuple"]
    w(
        f"This machine: `ulimit -n` soft {lim.get('nofile_soft')} / hard {lim.get('nofile_hard')} "
        f"(the benchmark ran with {lim.get('nofile_used')}); fs.file-max {lim.get('file_max')}; "
        f"fs.nr_open {lim.get('nr_open')}; net.ipv4.ip_local_port_range {lim.get('port_lo')}–"
        f"{lim.get('port_hi')} = {ports:,} ports, i.e. at most {ports:,} connections from one "
        f"source IP to one backend IP:port; net.core.somaxconn {lim.get('somaxconn')}; "
        f"net.ipv4.tcp_max_syn_backlog {lim.get('tcp_max_syn_backlog')}; net.ipv4.tcp_mem "
        f"{lim.get('tcp_mem')} pages; tcp_rmem {lim.get('tcp_rmem')}; tcp_wmem {lim.get('tcp_wmem')}.\n"
    )
    w("| limit | why | 100,000 | 1,000,000 |")
    w("|---|---|---|---|")
    a, b = lm["for"]["100000"], lm["for"]["1000000"]
    w(
        f"| nofile (`ulimit -n`, systemd `LimitNOFILE=`) | 2 descriptors per proxied connection "
        f"(client + backend) + spare | ≥ {a['nofile']:,} | ≥ {b['nofile']:,} |"
    )
    w(
        f"| fs.nr_open | ceiling for nofile (now {lim.get('nr_open')}) | ≥ {a['nr_open']:,} | ≥ {b['nr_open']:,} |"
    )
    w(
        f"| fs.file-max | all descriptors of the machine (now {lim.get('file_max')}) | ≥ {a['file_max']:,} | ≥ {b['file_max']:,} |"
    )
    w(
        f"| backend addresses × source IPs | one ephemeral port per backend connection per (source IP, "
        f"backend IP:port): {ports:,} with the current range, 64,512 with 1024–65535 | ≥ "
        f"{a['backend_tuples']} ({a['backend_tuples_full_range']} with the full range) | ≥ "
        f"{b['backend_tuples']} ({b['backend_tuples_full_range']} with the full range) |"
    )
    w(
        f"| net.ipv4.ip_local_port_range | widen to `1024 65535` (keep listening ports out of it or "
        f"reserve them with ip_local_reserved_ports): fewer backend addresses or source IPs needed | "
        f"optional ({a['backend_tuples']} → {a['backend_tuples_full_range']}) | recommended "
        f"({b['backend_tuples']} → {b['backend_tuples_full_range']}) |"
    )
    w(
        f"| net.core.somaxconn, net.ipv4.tcp_max_syn_backlog, the listener's backlog | reconnect "
        f"storms after a restart (now {lim.get('somaxconn')} / {lim.get('tcp_max_syn_backlog')}) | "
        f"≥ {a['somaxconn']:,} | ≥ {b['somaxconn']:,} |"
    )
    mem_a = ", ".join(f"{NAMES[p]} {human_kb(v)}" for p, v in a["proxy_rss_kb"].items())
    mem_b = ", ".join(f"{NAMES[p]} {human_kb(v)}" for p, v in b["proxy_rss_kb"].items())
    w(f"| memory (proxy RSS, from the fit) | user space only | {mem_a or '–'} | {mem_b or '–'} |")
    page = meta.get("limits", {}).get("page_size", 4096)
    try:
        tcp_max = int(str(lim.get("tcp_mem", "")).split()[2]) * page / 2**30
        tcp_note = f"now {tcp_max:.1f} GiB"
    except (IndexError, ValueError):
        tcp_note = "see above"
    w(
        f"| net.ipv4.tcp_mem (pages), tcp_rmem/tcp_wmem | socket buffers ({tcp_note} at the "
        f"pressure mark); an idle socket holds ~0, a busy one up to rmem/wmem max: size tcp_mem "
        f"for the *active* share, e.g. 10% active × 2 sockets × 64 KiB | ~1.3 GiB | ~13 GiB |"
    )
    w(
        "\nPlus kernel memory per socket (struct sock, file, epoll item: a few KiB per socket, "
        "not in RSS; see the slab note above). A client-side load generator needs the same "
        "descriptors and, towards one proxy IP:port, the same ephemeral-port arithmetic.\n"
    )
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: scale_report.py RAW.jsonl OUT.json OUT.md")
    main(*sys.argv[1:])
