//! Fan-out benchmark for backend broadcasts (issue 17; `bench/fanout.sh` runs it).
//!
//! `fanout --control ADDR --target ADDR --binding URL [--n 9000] [--size 128] [--rounds 10]
//! [--pid PID]`
//!
//! Registers as a backend on the balancer's control listener (guid `fanout`, clients sent to
//! `--binding`, e.g. `bench_backend`), opens `--n` WebSocket clients through the balancer, then
//! `--rounds` times sends one `broadcast` of `--size` bytes on the control channel and waits
//! until every client has it. Prints one JSON line: time from the request to the first and
//! to the last client (median and worst over rounds), and, with `--pid`, the balancer's CPU
//! time (user + system from /proc) per broadcast.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use std::{env, process};

use mio::{Events, Interest, Poll, Token};
use serde_json::json;
use tungstenite::Message;

/// Bytes of one unmasked server frame carrying `size` payload bytes.
fn frame_len(size: usize) -> usize {
    size + match size {
        0..=125 => 2,
        126..=0xffff => 4,
        _ => 10,
    }
}

/// Clock ticks of user + system time of `pid` (fields 14 and 15 of /proc/PID/stat).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Resident set of `pid` in KiB (VmRSS from /proc/PID/status).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    let opt = |name: &str, default: &str| -> String {
        let args: Vec<String> = env::args().collect();
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| default.to_string())
    };
    let control: SocketAddr = opt("--control", "").parse().unwrap_or_else(|_| usage());
    let target: SocketAddr = opt("--target", "").parse().unwrap_or_else(|_| usage());
    let binding = opt("--binding", "");
    let n: usize = opt("--n", "9000").parse().unwrap_or_else(|_| usage());
    let size: usize = opt("--size", "128").parse().unwrap_or_else(|_| usage());
    let rounds: usize = opt("--rounds", "10").parse().unwrap_or_else(|_| usage());
    let pid: Option<u32> = opt("--pid", "").parse().ok();

    let url = format!("ws://{control}/register");
    let (mut ctl, _) =
        tungstenite::client::client(url.as_str(), TcpStream::connect(control).expect("control"))
            .expect("control handshake");
    let register =
        json!({"type": "register", "version": 1, "guid": "fanout", "bindings": [binding]});
    ctl.send(Message::text(register.to_string()))
        .expect("register");
    wait_for(&mut ctl, "registered");

    // Clients: blocking handshakes one after another (setup is not measured), then
    // non-blocking under one poll.
    let mut poll = Poll::new().expect("poll");
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let tcp = TcpStream::connect(target).expect("connect client");
        let (ws, _) = tungstenite::client::client(format!("ws://{target}/").as_str(), tcp)
            .unwrap_or_else(|e| panic!("client {i} handshake: {e}"));
        let tcp = ws.into_inner();
        tcp.set_nonblocking(true).expect("nonblocking");
        let mut s = mio::net::TcpStream::from_std(tcp);
        poll.registry()
            .register(&mut s, Token(i), Interest::READABLE)
            .expect("register client");
        clients.push((s, 0usize));
    }
    eprintln!("fanout: {n} clients open");
    let payload = "x".repeat(size);
    let want = frame_len(size);
    let mut events = Events::with_capacity(4096);
    let mut buf = vec![0u8; 64 * 1024];
    let (mut firsts, mut lasts) = (Vec::new(), Vec::new());
    let cpu_before = pid.and_then(cpu_ticks);
    for round in 1..=rounds {
        let msg = json!({"type": "broadcast", "id": round, "text": payload}).to_string();
        let start = Instant::now();
        ctl.send(Message::text(msg)).expect("broadcast");
        let (mut done, mut first) = (0, None);
        while done < n {
            poll.poll(&mut events, Some(Duration::from_secs(10)))
                .expect("poll");
            if events.is_empty() {
                eprintln!("fanout: round {round}: only {done}/{n} clients got it in 10 s");
                process::exit(1);
            }
            for ev in events.iter() {
                let Some((s, got)) = clients.get_mut(ev.token().0) else {
                    continue;
                };
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => {
                            eprintln!("fanout: client {} closed", ev.token().0);
                            process::exit(1);
                        }
                        Ok(k) => {
                            let before = *got >= want * round;
                            *got += k;
                            if !before && *got >= want * round {
                                done += 1;
                                first.get_or_insert_with(|| start.elapsed());
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => panic!("read: {e}"),
                    }
                }
            }
        }
        lasts.push(start.elapsed());
        firsts.push(first.unwrap_or_default());
        wait_for(&mut ctl, "sent");
    }
    let cpu_after = pid.and_then(cpu_ticks);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu_ms = cpu_before
        .zip(cpu_after)
        .map(|(a, b)| (b - a) as f64 * 1000.0 / hz / rounds as f64);
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v.get(v.len() / 2).map(ms).unwrap_or_default()
    };
    println!(
        "{}",
        json!({
            "scenario": "broadcast-fanout", "clients": n, "size": size, "rounds": rounds,
            "first_ms_p50": median(&mut firsts),
            "last_ms_p50": median(&mut lasts),
            "last_ms_max": lasts.iter().map(ms).fold(0.0, f64::max),
            "balancer_cpu_ms_per_broadcast": cpu_ms,
            "balancer_rss_kib_after": pid.and_then(rss_kib),
        })
    );
}

/// Reads control messages until one of type `kind` (answers and notices in between are
/// skipped; `failed` or `error` ends the run).
fn wait_for(ctl: &mut tungstenite::WebSocket<TcpStream>, kind: &str) {
    loop {
        let msg = ctl.read().expect("control read");
        let Ok(text) = msg.to_text() else { continue };
        let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
        match v["type"].as_str() {
            Some(t) if t == kind => return,
            Some("failed" | "error") => {
                eprintln!("fanout: balancer refused: {text}");
                process::exit(1);
            }
            _ => {}
        }
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: fanout --control ADDR --target ADDR --binding ws://IP:PORT [--n 9000] [--size 128] [--rounds 10] [--pid PID]"
    );
    process::exit(2)
}
