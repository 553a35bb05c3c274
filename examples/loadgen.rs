//! Load generator for the wslb benchmarks: `--threads N` mio event loops (default 1), each
//! owning a share of the connections. Every connection has at most one message or request
//! outstanding (no pipelining): it sends, waits for the whole answer, records the latency and
//! sends the next. It shares no code with the balancer.
//!
//! ```text
//! loadgen ws-echo --target ADDR [--conns 64] [--size 128] [--secs 10] [--warmup 0] [--path /ws]
//! loadgen http    --target ADDR [--conns 64] [--secs 10] [--warmup 0] [--path /]
//! loadgen ws-rate --target ADDR [--conns 8] [--secs 5] [--warmup 0]
//! loadgen ws-hold --target ADDR [--n 10000] [--parallel 256] [--echo 1|0]
//! loadgen tls-hs  --target ADDR [--conns 8] [--secs 5] [--warmup 0] [--resume]
//! (TLS, all but tls-hs need --tls: [--tls] [--tls-version 1.2|1.3] [--ca FILE] [--sni NAME]
//!  [--label NAME])
//! loadgen free-ports [--n 1]
//! loadgen report --in RAW.jsonl --json OUT.json --md OUT.md
//! ```
//!
//! Each scenario prints one JSON line: `scenario`, `target`, `ops`, `ops_per_sec`, `p50_us`,
//! `p99_us`, `p999_us`, `max_us`, `errors` (with `error_kinds`). `ws-echo`: one op = one
//! 128-byte (`--size`) binary message echoed. `http`: one keep-alive GET answered.
//! `ws-rate`: connect + upgrade + one echo + close handshake, on a new TCP connection each
//! time. `ws-hold`: opens `--n` WebSocket connections (each does one echo unless `--echo 0`), prints a
//! `"ready"` line, then holds them idle until stdin closes (or SIGTERM), and prints a final
//! line with how many were lost meanwhile. An op still unanswered a second after the end of
//! the run counts as a `stalled` error.
//!
//! `--tls` runs ws-echo, ws-hold, http (or ws-rate) over TLS (module `tls`, in
//! `examples/loadgen/tls.rs`): full handshakes only, certificates not verified unless
//! `--ca`; the JSON then has `tls` (version, suite, group negotiated). `tls-hs`: one op =
//! TCP connect + TLS handshake + close_notify + close; `--resume` adds `resumed`,
//! `resumed_frac`, `tickets_missing` (see the module). `--label NAME` replaces the
//! `scenario` name in the JSON (bench/run.sh: one name per certificate and version).
//!
//! `report` turns the records `bench/run.sh` collected (one JSON object a line: `meta`,
//! `run`, `mem`, `size`) into the summary JSON and the markdown table: medians over rounds,
//! wslb/HAProxy and wslb/nginx ratios, and the issue's goals checked.

use std::collections::BTreeMap;
use std::io::{self, BufRead, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::process;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use serde_json::json;

#[path = "loadgen/tls.rs"]
mod tls;

/// Connect + handshake (and any single op) must finish within this, else an error.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// An op outstanding longer than this when the run ends is reported as `stalled`.
const STALL: Duration = Duration::from_secs(1);
/// `ws-hold`: how long all connections may take to be established.
const HOLD_SETUP: Duration = Duration::from_secs(120);
/// `ws-hold`: attempts per connection before it is given up.
const HOLD_ATTEMPTS: u32 = 3;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Scenario {
    WsEcho,
    Http,
    WsRate,
    WsHold,
    TlsHs,
}

#[derive(Clone)]
struct Cfg {
    scenario: Scenario,
    target: SocketAddr,
    conns: usize,
    size: usize,
    secs: f64,
    warmup: f64,
    path: String,
    threads: usize,
    parallel: usize,
    /// ws-hold: one echo on each connection before holding it (`--echo 0`: upgrade only).
    hold_echo: bool,
    /// `--tls` (always for tls-hs).
    tls: Option<tls::Opts>,
    /// `--label`: the scenario name to report.
    label: Option<String>,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let sub = args.next().unwrap_or_else(|| usage("missing subcommand"));
    let mut opts: BTreeMap<String, String> = BTreeMap::new();
    while let Some(a) = args.next() {
        let Some(name) = a.strip_prefix("--") else {
            usage(&format!("unexpected argument {a}"))
        };
        if FLAGS.contains(&name) {
            opts.insert(name.to_string(), "1".into());
            continue;
        }
        let v = args
            .next()
            .unwrap_or_else(|| usage(&format!("{a} needs a value")));
        opts.insert(name.to_string(), v);
    }
    let known = [
        "target",
        "conns",
        "size",
        "secs",
        "warmup",
        "path",
        "threads",
        "n",
        "parallel",
        "echo",
        "in",
        "json",
        "md",
        "tls",
        "tls-version",
        "ca",
        "sni",
        "resume",
        "label",
    ];
    if let Some(k) = opts.keys().find(|k| !known.contains(&k.as_str())) {
        usage(&format!("unknown option --{k}"));
    }
    let num = |k: &str, d: f64| -> f64 {
        opts.get(k).map_or(d, |v| {
            v.parse()
                .ok()
                .filter(|x: &f64| x.is_finite() && *x >= 0.0)
                .unwrap_or_else(|| usage(&format!("--{k} needs a number")))
        })
    };
    let scenario = match sub.as_str() {
        "ws-echo" => Scenario::WsEcho,
        "http" => Scenario::Http,
        "ws-rate" => Scenario::WsRate,
        "ws-hold" => Scenario::WsHold,
        "tls-hs" => Scenario::TlsHs,
        "free-ports" => return free_ports(num("n", 1.0) as usize),
        "report" => {
            let get = |k: &str| {
                opts.get(k)
                    .cloned()
                    .unwrap_or_else(|| usage(&format!("report needs --{k}")))
            };
            return report::main(&get("in"), &get("json"), &get("md"));
        }
        _ => usage(&format!("unknown subcommand {sub}")),
    };
    let target: SocketAddr = opts
        .get("target")
        .unwrap_or_else(|| usage("--target ADDR is required"))
        .parse()
        .unwrap_or_else(|_| usage("--target must be IP:PORT"));
    let default_conns = match scenario {
        Scenario::WsRate | Scenario::TlsHs => 8.0,
        Scenario::WsHold => num("n", 10000.0),
        _ => 64.0,
    };
    let cfg = Cfg {
        scenario,
        target,
        conns: (num("conns", default_conns) as usize).max(1),
        size: num("size", 128.0) as usize,
        secs: num(
            "secs",
            if matches!(scenario, Scenario::WsRate | Scenario::TlsHs) {
                5.0
            } else {
                10.0
            },
        ),
        warmup: num("warmup", 0.0),
        path: opts.get("path").cloned().unwrap_or_else(|| {
            if scenario == Scenario::Http {
                "/"
            } else {
                "/ws"
            }
            .to_string()
        }),
        threads: (num("threads", 1.0) as usize).clamp(1, 64),
        parallel: (num("parallel", 256.0) as usize).max(1),
        hold_echo: num("echo", 1.0) > 0.0,
        tls: (scenario == Scenario::TlsHs || opts.contains_key("tls")).then(|| {
            tls::Opts::new(
                opts.get("tls-version").map(String::as_str),
                opts.get("ca").cloned(),
                opts.get("sni").map_or("localhost", String::as_str),
                opts.contains_key("resume"),
            )
            .unwrap_or_else(|| usage("--tls-version must be 1.2 or 1.3, --sni a name or IP"))
        }),
        label: opts.get("label").cloned(),
    };
    let result = run(&cfg);
    println!("{result}");
}

/// Options that take no value.
const FLAGS: [&str; 2] = ["tls", "resume"];

fn usage(msg: &str) -> ! {
    eprintln!(
        "loadgen: {msg}\nusage: loadgen ws-echo|http|ws-rate|ws-hold|tls-hs|free-ports \
         --target ADDR [--conns N] [--size BYTES] [--secs S] [--warmup S] [--path P] \
         [--threads N] [--n N] [--parallel N] [--echo 0|1] [--tls] [--tls-version 1.2|1.3] \
         [--ca FILE] [--sni NAME] [--resume] [--label NAME]"
    );
    process::exit(2)
}

/// Prints `n` currently free 127.0.0.1 ports, one a line (all bound at once, so distinct).
fn free_ports(n: usize) {
    let ls: Vec<_> = (0..n.clamp(1, 64))
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    for l in &ls {
        println!("{}", l.local_addr().expect("local_addr").port());
    }
}

/// What one thread measured.
#[derive(Default)]
struct Stats {
    lat_us: Vec<u32>,
    ops: u64,
    errors: BTreeMap<&'static str, u64>,
    reconnects: u64,
    held: u64,
    lost: u64,
    /// tls-hs: handshakes that resumed a session, and TLS 1.3 ones that saw no ticket.
    resumed: u64,
    tickets_missing: u64,
    /// TLS: what the first established connection negotiated.
    tls: Option<String>,
}

impl Stats {
    fn error(&mut self, kind: &'static str) {
        *self.errors.entry(kind).or_default() += 1;
    }

    fn merge(&mut self, o: Stats) {
        self.lat_us.extend(o.lat_us);
        self.ops += o.ops;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.reconnects += o.reconnects;
        self.held += o.held;
        self.lost += o.lost;
        self.resumed += o.resumed;
        self.tickets_missing += o.tickets_missing;
        self.tls = self.tls.take().or(o.tls);
    }
}

fn run(cfg: &Cfg) -> serde_json::Value {
    let threads = cfg.threads.min(cfg.conns);
    let barrier = Arc::new(Barrier::new(threads));
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel::<(u64, u64)>();
    let mut handles = Vec::new();
    for t in 0..threads {
        let share = cfg.conns / threads + usize::from(t < cfg.conns % threads);
        let (cfg, barrier, stop, ready_tx) =
            (cfg.clone(), barrier.clone(), stop.clone(), ready_tx.clone());
        handles.push(thread::spawn(move || {
            if cfg.scenario == Scenario::TlsHs {
                return tls::HsWorker::new(cfg, share).run(&barrier);
            }
            Worker::new(cfg, share).run(&barrier, &stop, &ready_tx)
        }));
    }
    drop(ready_tx);
    if cfg.scenario == Scenario::WsHold {
        let (mut held, mut errors) = (0, 0);
        for (h, e) in ready_rx.iter().take(threads) {
            held += h;
            errors += e;
        }
        let line = json!({"scenario": "ws-hold", "ready": true, "target": cfg.target.to_string(),
            "requested": cfg.conns, "held": held, "errors": errors});
        println!("{line}");
        io::stdout().flush().expect("flush stdout");
        // Hold until stdin closes (the script closes its end) or we are killed.
        let stdin = io::stdin();
        let mut sink = String::new();
        while stdin.lock().read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
        stop.store(true, Ordering::SeqCst);
    }
    let mut total = Stats::default();
    for h in handles {
        total.merge(h.join().expect("worker thread panicked"));
    }
    report(cfg, total)
}

fn report(cfg: &Cfg, mut s: Stats) -> serde_json::Value {
    s.lat_us.sort_unstable();
    let pct = |p: f64| -> u32 {
        if s.lat_us.is_empty() {
            return 0;
        }
        let i = ((s.lat_us.len() as f64 * p).ceil() as usize).clamp(1, s.lat_us.len()) - 1;
        s.lat_us[i]
    };
    let errors: u64 = s.errors.values().sum();
    let name = match cfg.scenario {
        Scenario::WsEcho => "ws-echo",
        Scenario::Http => "http",
        Scenario::WsRate => "ws-rate",
        Scenario::WsHold => "ws-hold",
        Scenario::TlsHs => "tls-hs",
    };
    let name = cfg.label.as_deref().unwrap_or(name);
    let secs = if cfg.scenario == Scenario::WsHold {
        0.0
    } else {
        cfg.secs
    };
    let ops_per_sec = if secs > 0.0 {
        (s.ops as f64 / secs).round()
    } else {
        0.0
    };
    let mut v = json!({
        "scenario": name,
        "target": cfg.target.to_string(),
        "conns": cfg.conns,
        "secs": secs,
        "ops": s.ops,
        "ops_per_sec": ops_per_sec,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "p999_us": pct(0.999),
        "max_us": s.lat_us.last().copied().unwrap_or(0),
        "errors": errors,
        "error_kinds": s.errors,
        "reconnects": s.reconnects,
    });
    if cfg.scenario == Scenario::WsEcho {
        v["size"] = json!(cfg.size);
    }
    if cfg.scenario == Scenario::WsHold {
        v["held"] = json!(s.held);
        v["lost"] = json!(s.lost);
    }
    if let Some(t) = &cfg.tls {
        v["tls"] = json!(s.tls);
        if cfg.scenario == Scenario::TlsHs {
            v["resume"] = json!(t.resume);
            v["resumed"] = json!(s.resumed);
            v["resumed_frac"] = json!(if s.ops > 0 {
                (s.resumed as f64 / s.ops as f64 * 1000.0).round() / 1000.0
            } else {
                0.0
            });
            v["tickets_missing"] = json!(s.tickets_missing);
        }
    }
    v
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum State {
    /// Not started yet (ws-hold pacing) or given up.
    Off,
    Connecting,
    /// Upgrade request sent, waiting for the 101.
    Handshake,
    /// A message or request is outstanding.
    Waiting,
    /// ws-rate: close frame sent, waiting for the server's.
    Closing,
    /// ws-hold: established and idle.
    Held,
}

struct Client {
    sock: Option<TcpStream>,
    state: State,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    accept: String,
    /// The masked frame to send (ws) or the request (http).
    msg: Vec<u8>,
    /// The payload the echo must carry.
    payload: Vec<u8>,
    sent_at: Instant,
    cycle_start: Instant,
    attempts: u32,
    /// `--tls`: the session over `sock`, new with each connection.
    tls: Option<rustls::ClientConnection>,
}

struct Worker {
    cfg: Cfg,
    poll: Poll,
    clients: Vec<Client>,
    stats: Stats,
    scratch: Vec<u8>,
    measure_from: Instant,
    measure_to: Instant,
    /// ws-hold: clients not yet started.
    next_to_start: usize,
    in_flight: usize,
    rng: SmallRng,
    /// `--tls`: one configuration for all the clients (no resumption).
    tls_config: Option<Arc<rustls::ClientConfig>>,
}

impl Worker {
    fn new(cfg: Cfg, n: usize) -> Worker {
        let now = Instant::now();
        let clients = (0..n)
            .map(|_| Client {
                sock: None,
                state: State::Off,
                rbuf: Vec::with_capacity(4096),
                wbuf: Vec::with_capacity(4096),
                wpos: 0,
                accept: String::new(),
                msg: Vec::new(),
                payload: Vec::new(),
                sent_at: now,
                cycle_start: now,
                attempts: 0,
                tls: None,
            })
            .collect();
        let est = if cfg.scenario == Scenario::WsHold {
            0
        } else {
            ((cfg.secs * 300_000.0) as usize).min(50_000_000)
        };
        Worker {
            poll: Poll::new().expect("mio Poll"),
            clients,
            stats: Stats {
                lat_us: Vec::with_capacity(est),
                ..Stats::default()
            },
            scratch: vec![0u8; 64 * 1024],
            measure_from: now,
            measure_to: now,
            next_to_start: 0,
            in_flight: 0,
            rng: SmallRng::from_os_rng(),
            tls_config: cfg.tls.as_ref().map(tls::Opts::fresh_config),
            cfg,
        }
    }

    fn run(
        mut self,
        barrier: &Barrier,
        stop: &AtomicBool,
        ready: &mpsc::Sender<(u64, u64)>,
    ) -> Stats {
        let mut events = Events::with_capacity(1024);
        if self.cfg.scenario == Scenario::WsHold {
            self.hold(&mut events, stop, ready);
            return self.stats;
        }
        // Set-up: every connection established (ws: upgraded) before the clock starts;
        // ws-rate connects inside the measured loop, that is what it measures.
        if self.cfg.scenario != Scenario::WsRate {
            for i in 0..self.clients.len() {
                self.connect(i);
            }
            let setup_end = Instant::now() + OP_TIMEOUT * 2;
            while Instant::now() < setup_end && self.clients.iter().any(|c| c.state != State::Off) {
                self.turn(&mut events, Duration::from_millis(50), true);
            }
        }
        barrier.wait();
        let now = Instant::now();
        self.measure_from = now + Duration::from_secs_f64(self.cfg.warmup);
        self.measure_to = self.measure_from + Duration::from_secs_f64(self.cfg.secs);
        for i in 0..self.clients.len() {
            if self.clients[i].sock.is_none() {
                self.connect(i); // ws-rate, or set-up failed: start (again) now
            } else {
                self.start_op(i, now);
            }
        }
        loop {
            let now = Instant::now();
            if now >= self.measure_to {
                break;
            }
            let wait = (self.measure_to - now).min(Duration::from_millis(100));
            self.turn(&mut events, wait, false);
            self.check_timeouts();
        }
        let end = self.measure_to;
        for c in &self.clients {
            if c.state != State::Off && c.state != State::Held && end - c.sent_at.min(end) > STALL {
                *self.stats.errors.entry("stalled").or_default() += 1;
            }
        }
        self.stats
    }

    /// ws-hold: open the connections `parallel` at a time, report, idle until `stop`.
    fn hold(&mut self, events: &mut Events, stop: &AtomicBool, ready: &mpsc::Sender<(u64, u64)>) {
        let deadline = Instant::now() + HOLD_SETUP;
        loop {
            while self.in_flight < self.cfg.parallel && self.next_to_start < self.clients.len() {
                let i = self.next_to_start;
                self.next_to_start += 1;
                self.connect(i);
            }
            if self.in_flight == 0 || Instant::now() >= deadline {
                break;
            }
            self.turn(events, Duration::from_millis(50), false);
            self.check_timeouts();
        }
        let held = self
            .clients
            .iter()
            .filter(|c| c.state == State::Held)
            .count() as u64;
        self.stats.held = held;
        let errors = self.stats.errors.values().sum();
        let _ = ready.send((held, errors));
        while !stop.load(Ordering::SeqCst) {
            self.turn(events, Duration::from_millis(100), false);
        }
        let still = self
            .clients
            .iter()
            .filter(|c| c.state == State::Held)
            .count() as u64;
        self.stats.lost = held.saturating_sub(still);
    }

    fn turn(&mut self, events: &mut Events, timeout: Duration, setup: bool) {
        if let Err(e) = self.poll.poll(events, Some(timeout)) {
            if e.kind() != ErrorKind::Interrupted {
                eprintln!("loadgen: poll: {e}");
                process::exit(1);
            }
            return;
        }
        for ev in events.iter() {
            let i = ev.token().0;
            if i >= self.clients.len() {
                continue;
            }
            self.on_event(i, setup);
        }
    }

    /// Starts a fresh TCP connection for client `i`.
    fn connect(&mut self, i: usize) {
        let c = &mut self.clients[i];
        if let Some(mut s) = c.sock.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        c.rbuf.clear();
        c.wbuf.clear();
        c.wpos = 0;
        c.attempts += 1;
        let now = Instant::now();
        c.sent_at = now;
        c.cycle_start = now;
        c.tls = None;
        if let (Some(opts), Some(cfg)) = (&self.cfg.tls, &self.tls_config) {
            match opts.connection(cfg) {
                Ok(conn) => c.tls = Some(conn),
                Err(kind) => {
                    c.state = State::Off;
                    return self.stats.error(kind);
                }
            }
        }
        match TcpStream::connect(self.cfg.target) {
            Ok(mut s) => {
                let interest = Interest::READABLE | Interest::WRITABLE;
                if self
                    .poll
                    .registry()
                    .register(&mut s, Token(i), interest)
                    .is_err()
                {
                    c.state = State::Off;
                    self.stats.error("register");
                    return;
                }
                c.sock = Some(s);
                c.state = State::Connecting;
                if self.cfg.scenario == Scenario::WsHold {
                    self.in_flight += 1;
                }
            }
            Err(_) => {
                c.state = State::Off;
                self.stats.error("connect");
            }
        }
    }

    /// The connection failed: count it and (outside set-up) reconnect.
    fn fail(&mut self, i: usize, kind: &'static str, setup: bool) {
        self.stats.error(kind);
        let c = &mut self.clients[i];
        if let Some(mut s) = c.sock.take() {
            let _ = self.poll.registry().deregister(&mut s);
        }
        let was = c.state;
        c.state = State::Off;
        match self.cfg.scenario {
            Scenario::WsHold => {
                if was == State::Held || was == State::Off {
                    return; // lost while held: counted at the end
                }
                self.in_flight -= 1;
                if c.attempts < HOLD_ATTEMPTS {
                    self.connect(i);
                }
            }
            _ if setup => {}
            _ => {
                self.stats.reconnects += 1;
                self.connect(i);
            }
        }
    }

    fn on_event(&mut self, i: usize, setup: bool) {
        if self.clients[i].state == State::Connecting {
            let s = self.clients[i].sock.as_ref().expect("socket");
            match connect_result(s) {
                Ok(true) => {}
                Ok(false) => return,
                Err(kind) => return self.fail(i, kind, setup),
            }
            let _ = s.set_nodelay(true);
            self.on_connected(i);
        }
        if let Err(kind) = self.flush(i) {
            return self.fail(i, kind, setup);
        }
        if self.clients[i].tls.is_some() {
            return self.on_tls_readable(i, setup);
        }
        // Read until WouldBlock, processing as we go.
        loop {
            let c = &mut self.clients[i];
            let Some(sock) = c.sock.as_mut() else { return };
            match sock.read(&mut self.scratch) {
                Ok(0) => {
                    let kind = eof_kind(c.state);
                    return self.fail(i, kind, setup);
                }
                Ok(n) => {
                    c.rbuf.extend_from_slice(&self.scratch[..n]);
                    if let Err(kind) = self.process(i, setup) {
                        return self.fail(i, kind, setup);
                    }
                    if let Err(kind) = self.flush(i) {
                        return self.fail(i, kind, setup);
                    }
                    if n < self.scratch.len() {
                        return; // short read: drained (edge-triggered: new data re-arms)
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    return self.fail(i, "reset", setup)
                }
                Err(_) => return self.fail(i, "read", setup),
            }
        }
    }

    /// `--tls`: [`tls::read`] to `WouldBlock`, then the same processing as plain reads.
    fn on_tls_readable(&mut self, i: usize, setup: bool) {
        let c = &mut self.clients[i];
        let (Some(sock), Some(conn)) = (c.sock.as_mut(), c.tls.as_mut()) else {
            return;
        };
        let closed = match tls::read(conn, sock, &mut c.rbuf) {
            Ok(closed) => closed,
            Err(kind) => return self.fail(i, kind, setup),
        };
        if self.stats.tls.is_none() && !conn.is_handshaking() {
            self.stats.tls = Some(tls::describe(conn));
        }
        let attempts = c.attempts;
        if let Err(kind) = self.process(i, setup) {
            return self.fail(i, kind, setup);
        }
        if let Err(kind) = self.flush(i) {
            return self.fail(i, kind, setup);
        }
        // (ws-rate may have finished this connection and started the next one meanwhile)
        let c = &self.clients[i];
        if closed && c.sock.is_some() && c.attempts == attempts {
            let kind = eof_kind(c.state);
            self.fail(i, kind, setup);
        }
    }

    fn on_connected(&mut self, i: usize) {
        let cfg = &self.cfg;
        let c = &mut self.clients[i];
        if cfg.scenario == Scenario::Http {
            c.msg = format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: wslb-loadgen\r\n\r\n",
                cfg.path, cfg.target
            )
            .into_bytes();
            c.state = State::Off; // ready; start_op sends
            if self.measure_to > self.measure_from {
                // reconnect during the run: resume at once
                self.start_op(i, Instant::now());
            }
            return;
        }
        let key = tungstenite::handshake::client::generate_key();
        c.accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
            cfg.path, cfg.target
        );
        c.wbuf.extend_from_slice(req.as_bytes());
        c.state = State::Handshake;
        let size = match cfg.scenario {
            Scenario::WsEcho => cfg.size,
            _ => 16,
        };
        if c.payload.len() != size {
            c.payload = vec![0u8; size];
            self.rng.fill_bytes(&mut c.payload);
            let mut mask = [0u8; 4];
            self.rng.fill_bytes(&mut mask);
            c.msg = client_frame(0x82, &c.payload, mask);
        }
    }

    /// Sends the next message/request of client `i` (if it is ready and the run goes on).
    fn start_op(&mut self, i: usize, now: Instant) {
        let running = now < self.measure_to;
        let c = &mut self.clients[i];
        if c.sock.is_none() || c.state != State::Off || !running {
            return;
        }
        c.wbuf.extend_from_slice(&c.msg);
        c.sent_at = now;
        c.state = State::Waiting;
        if let Err(kind) = self.flush(i) {
            self.fail(i, kind, false);
        }
    }

    fn flush(&mut self, i: usize) -> Result<(), &'static str> {
        let c = &mut self.clients[i];
        let Some(sock) = c.sock.as_mut() else {
            return Ok(());
        };
        if let Some(conn) = c.tls.as_mut() {
            tls::send(conn, sock, &c.wbuf, &mut c.wpos)?;
            if c.wpos >= c.wbuf.len() {
                c.wbuf.clear();
                c.wpos = 0;
            }
            return Ok(());
        }
        while c.wpos < c.wbuf.len() {
            match sock.write(&c.wbuf[c.wpos..]) {
                Ok(0) => return Err("write"),
                Ok(n) => c.wpos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(()),
                Err(_) => return Err("write"),
            }
        }
        c.wbuf.clear();
        c.wpos = 0;
        Ok(())
    }

    fn record(&mut self, now: Instant, since: Instant) {
        if now >= self.measure_from && now < self.measure_to {
            self.stats.ops += 1;
            let us = (now - since).as_micros().min(u32::MAX as u128) as u32;
            self.stats.lat_us.push(us);
        }
    }

    /// Consumes what client `i` has buffered.
    fn process(&mut self, i: usize, setup: bool) -> Result<(), &'static str> {
        loop {
            let c = &mut self.clients[i];
            match c.state {
                State::Handshake => {
                    let Some(n) = parse_101(&c.rbuf, &c.accept)? else {
                        return Ok(());
                    };
                    c.rbuf.drain(..n);
                    let now = Instant::now();
                    match self.cfg.scenario {
                        Scenario::WsHold if !self.cfg.hold_echo => {
                            c.state = State::Held;
                            self.in_flight -= 1;
                        }
                        Scenario::WsRate | Scenario::WsHold => {
                            // one echo on the fresh connection
                            c.wbuf.extend_from_slice(&c.msg);
                            c.sent_at = now;
                            c.state = State::Waiting;
                        }
                        _ => {
                            c.state = State::Off; // established; start_op sends
                            if !setup {
                                self.start_op(i, now);
                            }
                        }
                    }
                }
                State::Waiting if self.cfg.scenario == Scenario::Http => {
                    let Some((n, close)) = parse_response(&c.rbuf)? else {
                        return Ok(());
                    };
                    c.rbuf.drain(..n);
                    c.state = State::Off;
                    let now = Instant::now();
                    let since = c.sent_at;
                    self.record(now, since);
                    if close {
                        self.stats.reconnects += 1;
                        self.connect(i);
                        return Ok(());
                    }
                    self.start_op(i, now);
                }
                State::Waiting => {
                    let Some((n, opcode, range)) = parse_frame(&c.rbuf)? else {
                        return Ok(());
                    };
                    if opcode != 0x2 {
                        return Err(if opcode == 0x8 {
                            "close_frame"
                        } else {
                            "bad_opcode"
                        });
                    }
                    if c.rbuf[range] != c.payload[..] {
                        return Err("bad_echo");
                    }
                    c.rbuf.drain(..n);
                    let now = Instant::now();
                    match self.cfg.scenario {
                        Scenario::WsEcho => {
                            c.state = State::Off;
                            let since = c.sent_at;
                            self.record(now, since);
                            self.start_op(i, now);
                        }
                        Scenario::WsRate => {
                            let mut mask = [0u8; 4];
                            self.rng.fill_bytes(&mut mask);
                            let close = client_frame(0x88, &1000u16.to_be_bytes(), mask);
                            c.wbuf.extend_from_slice(&close);
                            c.state = State::Closing;
                        }
                        _ => {
                            c.state = State::Held;
                            self.in_flight -= 1;
                        }
                    }
                }
                State::Closing => {
                    let Some((_, opcode, _)) = parse_frame(&c.rbuf)? else {
                        return Ok(());
                    };
                    if opcode != 0x8 {
                        return Err("bad_opcode");
                    }
                    let now = Instant::now();
                    let since = c.cycle_start;
                    if let Some(mut s) = c.sock.take() {
                        let _ = self.poll.registry().deregister(&mut s);
                    }
                    c.state = State::Off;
                    self.record(now, since);
                    if now < self.measure_to {
                        self.connect(i);
                    }
                    return Ok(());
                }
                State::Held => {
                    if c.rbuf.is_empty() {
                        return Ok(());
                    }
                    return Err("unexpected_data");
                }
                State::Off | State::Connecting => {
                    if c.rbuf.is_empty() {
                        return Ok(());
                    }
                    return Err("unexpected_data");
                }
            }
        }
    }

    /// Connections stuck in set-up (or ops unanswered) past [`OP_TIMEOUT`] are failed.
    fn check_timeouts(&mut self) {
        let now = Instant::now();
        for i in 0..self.clients.len() {
            let c = &self.clients[i];
            let since = match c.state {
                State::Connecting | State::Handshake => c.cycle_start,
                State::Waiting | State::Closing => c.sent_at,
                State::Off | State::Held => continue,
            };
            if now - since > OP_TIMEOUT {
                let kind = match c.state {
                    State::Connecting => "timeout_connect",
                    State::Handshake => "timeout_handshake",
                    _ => "timeout_op",
                };
                self.fail(i, kind, false);
            }
        }
    }
}

/// A non-blocking connect's outcome once the socket signalled: `Ok(false)` = not yet.
fn connect_result(s: &TcpStream) -> Result<bool, &'static str> {
    match s.take_error() {
        Ok(Some(_)) | Err(_) => return Err("connect"),
        Ok(None) => {}
    }
    match s.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotConnected => Ok(false),
        Err(_) => Err("connect"),
    }
}

/// The error kind of a connection the server closed while in `state`.
fn eof_kind(state: State) -> &'static str {
    match state {
        State::Handshake => "eof_handshake",
        State::Waiting => "eof_waiting",
        State::Closing => "eof_closing",
        _ => "eof_idle",
    }
}

/// A masked client frame, FIN set.
fn client_frame(b0: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(b0);
    let len = payload.len();
    if len < 126 {
        f.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        f.push(0x80 | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    f
}

/// An unmasked server frame: `(frame length, opcode, payload range)`.
type Frame = (usize, u8, std::ops::Range<usize>);

fn parse_frame(b: &[u8]) -> Result<Option<Frame>, &'static str> {
    if b.len() < 2 {
        return Ok(None);
    }
    if b[1] & 0x80 != 0 {
        return Err("masked_server_frame");
    }
    if b[0] & 0x80 == 0 {
        return Err("fragmented");
    }
    let (len, pos) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (
            u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")) as usize,
            10,
        ),
        126 | 127 => return Ok(None),
        n => (n as usize, 2),
    };
    if len > 1 << 24 {
        return Err("frame_too_big");
    }
    if b.len() < pos + len {
        return Ok(None);
    }
    Ok(Some((pos + len, b[0] & 0x0f, pos..pos + len)))
}

/// The length of a complete `101` head with the right accept key.
fn parse_101(b: &[u8], accept: &str) -> Result<Option<usize>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(b) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if b.len() < 64 * 1024 => return Ok(None),
        _ => return Err("bad_handshake"),
    };
    if resp.code != Some(101) {
        return Err(match resp.code {
            Some(502) => "status_502",
            Some(503) => "status_503",
            Some(504) => "status_504",
            _ => "status_not_101",
        });
    }
    let ok = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("sec-websocket-accept") && h.value == accept.as_bytes()
    });
    if !ok {
        return Err("bad_accept");
    }
    Ok(Some(n))
}

/// A complete `200` response with a Content-Length body: `(length, server closes)`.
fn parse_response(b: &[u8]) -> Result<Option<(usize, bool)>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(b) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if b.len() < 64 * 1024 => return Ok(None),
        _ => return Err("bad_response"),
    };
    if resp.code != Some(200) {
        return Err(match resp.code {
            Some(502) => "status_502",
            Some(503) => "status_503",
            Some(504) => "status_504",
            _ => "status_not_200",
        });
    }
    let (mut len, mut close) = (None, false);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).map_err(|_| "bad_response")?;
            len = Some(v.trim().parse::<usize>().map_err(|_| "bad_response")?);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked_unsupported");
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .contains("close");
        }
    }
    let len = len.ok_or("no_content_length")?;
    if b.len() < n + len {
        return Ok(None);
    }
    Ok(Some((n + len, close)))
}

/// `loadgen report`: summary JSON + markdown from `bench/run.sh`'s raw records.
mod report {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;

    use serde_json::{json, Value};

    const PROXIES: [&str; 3] = ["wslb", "haproxy", "nginx"];
    const COLUMNS: [&str; 4] = ["direct", "wslb", "haproxy", "nginx"];
    /// `bench/run.sh` labels of the full-handshake runs: (scenario, row label, short label).
    const TLS_HANDSHAKE_ROWS: [(&str, &str, &str); 4] = [
        ("tls-hs-ecdsa-1.3", "ECDSA P-256, TLS 1.3", "ecdsa 1.3"),
        ("tls-hs-ecdsa-1.2", "ECDSA P-256, TLS 1.2", "ecdsa 1.2"),
        ("tls-hs-rsa-1.3", "RSA 2048, TLS 1.3", "rsa 1.3"),
        ("tls-hs-rsa-1.2", "RSA 2048, TLS 1.2", "rsa 1.2"),
    ];
    /// The resumption runs: (scenario, row label).
    const TLS_RESUME_ROWS: [(&str, &str); 2] = [
        ("tls-resume-1.3", "TLS 1.3 session ticket"),
        ("tls-resume-1.2", "TLS 1.2 session id/ticket"),
    ];

    pub fn main(input: &str, json_out: &str, md_out: &str) {
        let text = std::fs::read_to_string(input).unwrap_or_else(|e| {
            eprintln!("loadgen report: cannot read {input}: {e}");
            std::process::exit(1)
        });
        let recs: Vec<Value> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| match serde_json::from_str(l) {
                Ok(v) => Some(v),
                Err(e) => {
                    eprintln!("loadgen report: skipping a bad record ({e}): {l}");
                    None
                }
            })
            .collect();
        let summary = summarise(&recs);
        let md = markdown(&summary);
        let write = |path: &str, body: String| {
            std::fs::write(path, body).unwrap_or_else(|e| {
                eprintln!("loadgen report: cannot write {path}: {e}");
                std::process::exit(1)
            })
        };
        write(
            json_out,
            serde_json::to_string_pretty(&summary).expect("json") + "\n",
        );
        write(md_out, md);
    }

    fn median(mut v: Vec<f64>) -> Option<f64> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        })
    }

    fn f(v: &Value, k: &str) -> Option<f64> {
        v.get(k).and_then(Value::as_f64)
    }

    fn summarise(recs: &[Value]) -> Value {
        fn of_kind<'a>(recs: &'a [Value], k: &'static str) -> impl Iterator<Item = &'a Value> {
            recs.iter().filter(move |r| r["kind"] == k)
        }
        let kind = |k: &'static str| of_kind(recs, k);
        let mut meta = kind("meta").next().cloned().unwrap_or(Value::Null);
        if let (Some(end), Some(m)) = (kind("end").next(), meta.as_object_mut()) {
            for (k, v) in end.as_object().into_iter().flatten() {
                if k != "kind" {
                    m.insert(k.clone(), v.clone());
                }
            }
        }
        // scenario -> target -> runs
        let mut runs: BTreeMap<String, BTreeMap<String, Vec<&Value>>> = BTreeMap::new();
        for r in kind("run") {
            let scen = r["result"]["scenario"].as_str().unwrap_or("?").to_string();
            let target = r["target"].as_str().unwrap_or("?").to_string();
            runs.entry(scen)
                .or_default()
                .entry(target)
                .or_default()
                .push(r);
        }
        let mut scenarios = serde_json::Map::new();
        for (scen, by_target) in &runs {
            let mut out = serde_json::Map::new();
            for (target, rs) in by_target {
                let col = |k: &str| median(rs.iter().filter_map(|r| f(&r["result"], k)).collect());
                // CPU microseconds the target spent per op, per round, then the median.
                let us_per_op = median(
                    rs.iter()
                        .filter_map(|r| {
                            let (cpu, ops) = (f(r, "cpu_pct")?, f(&r["result"], "ops_per_sec")?);
                            (ops > 0.0).then(|| (cpu * 1e4 / ops * 100.0).round() / 100.0)
                        })
                        .collect(),
                );
                let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
                for r in rs {
                    if let Some(m) = r["result"]["error_kinds"].as_object() {
                        for (k, v) in m {
                            *kinds.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0);
                        }
                    }
                }
                out.insert(
                    target.clone(),
                    json!({
                        "ops_per_sec": col("ops_per_sec"),
                        "p50_us": col("p50_us"),
                        "p99_us": col("p99_us"),
                        "p999_us": col("p999_us"),
                        "cpu_pct": median(rs.iter().filter_map(|r| f(r, "cpu_pct")).collect()),
                        "cpu_us_per_op": us_per_op,
                        "errors": rs.iter().filter_map(|r| r["result"]["errors"].as_u64()).sum::<u64>(),
                        "error_kinds": kinds,
                        "rounds_ops_per_sec": rs.iter().filter_map(|r| f(&r["result"], "ops_per_sec")).collect::<Vec<_>>(),
                        "resumed_frac": col("resumed_frac"),
                        "tickets_missing": rs.iter().filter_map(|r| r["result"]["tickets_missing"].as_u64()).reduce(|a, b| a + b),
                        "tls": rs.iter().find_map(|r| r["result"]["tls"].as_str()),
                        "rounds_p99_us": rs.iter().filter_map(|r| f(&r["result"], "p99_us")).collect::<Vec<_>>(),
                    }),
                );
            }
            scenarios.insert(scen.clone(), Value::Object(out));
        }
        let mut size = serde_json::Map::new();
        for s in kind("size") {
            let target = s["target"].as_str().unwrap_or("?").to_string();
            size.insert(
                target,
                json!({"bytes": s["bytes"], "with_libs": s["with_libs"]}),
            );
        }
        let mut v = json!({
            "meta": meta,
            "scenarios": scenarios,
            "memory": memory(kind("mem")),
            "memory_tls": memory(kind("mem-tls")),
            "size": size,
        });
        let ratios = ratios(&v);
        v["ratios"] = ratios;
        v["goals"] = goals(&v);
        v
    }

    /// The `mem` (plain) or `mem-tls` records by target: RSS and bytes per held connection.
    fn memory<'a>(recs: impl Iterator<Item = &'a Value>) -> Value {
        let mut memory = serde_json::Map::new();
        for m in recs {
            let target = m["target"].as_str().unwrap_or("?").to_string();
            let held = m["hold"]["held"]
                .as_f64()
                .or_else(|| f(&m["ready"], "held"));
            let (idle, with) = (f(m, "rss_idle_kb"), f(m, "rss_held_kb"));
            let per_conn = match (held, idle, with) {
                (Some(h), Some(i), Some(w)) if h > 0.0 => Some(((w - i) * 1024.0 / h).round()),
                _ => None,
            };
            memory.insert(
                target,
                json!({
                    "rss_start_kb": m["rss_start_kb"],
                    "rss_idle_kb": m["rss_idle_kb"],
                    "rss_held_kb": m["rss_held_kb"],
                    "requested": m["ready"]["requested"],
                    "held": held,
                    "lost": m["hold"]["lost"],
                    "errors": m["hold"]["errors"],
                    "error_kinds": m["hold"]["error_kinds"],
                    "per_conn_bytes": per_conn,
                    "per_conn_kib": per_conn.map(|b| (b / 1024.0 * 10.0).round() / 10.0),
                    "tls": m["hold"]["tls"],
                }),
            );
        }
        Value::Object(memory)
    }

    fn get(v: &Value, path: &[&str]) -> Option<f64> {
        let mut cur = v;
        for p in path {
            cur = cur.get(p)?;
        }
        cur.as_f64()
    }

    fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
        match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some((a / b * 1000.0).round() / 1000.0),
            _ => None,
        }
    }

    fn ratios(v: &Value) -> Value {
        let mut out = serde_json::Map::new();
        let scen = v["scenarios"].as_object().cloned().unwrap_or_default();
        for (name, by) in &scen {
            for metric in ["ops_per_sec", "p50_us", "p99_us"] {
                let mut m = serde_json::Map::new();
                for other in ["haproxy", "nginx"] {
                    let r = ratio(get(by, &["wslb", metric]), get(by, &[other, metric]));
                    m.insert(format!("wslb/{other}"), json!(r));
                }
                out.insert(format!("{name}.{metric}"), Value::Object(m));
            }
        }
        for section in ["memory", "memory_tls"] {
            let mut m = serde_json::Map::new();
            for other in ["haproxy", "nginx"] {
                let r = ratio(
                    get(v, &[section, "wslb", "per_conn_bytes"]),
                    get(v, &[section, other, "per_conn_bytes"]),
                );
                m.insert(format!("wslb/{other}"), json!(r));
            }
            out.insert(format!("{section}.per_conn_bytes"), Value::Object(m));
        }
        Value::Object(out)
    }

    fn goals(v: &Value) -> Value {
        let s = |scen: &str, t: &str, k: &str| get(v, &["scenarios", scen, t, k]);
        let mut out = Vec::new();
        let mut goal = |text: String, ok: Option<bool>, detail: String| {
            out.push(json!({"goal": text, "met": ok, "detail": detail}));
        };
        for other in ["haproxy", "nginx"] {
            let (w, o) = (
                s("ws-echo", "wslb", "ops_per_sec"),
                s("ws-echo", other, "ops_per_sec"),
            );
            let (wp, op) = (
                s("ws-echo", "wslb", "p99_us"),
                s("ws-echo", other, "p99_us"),
            );
            let ok = match (w, o, wp, op) {
                (Some(w), Some(o), Some(wp), Some(op)) => Some(w >= 1.2 * o && wp <= op),
                _ => None,
            };
            goal(
                format!("WebSocket msgs/s >= 1.2 x {other} with p99 no worse"),
                ok,
                format!(
                    "msgs/s ratio {}, p99 {} vs {} us",
                    fmt_ratio(ratio(w, o)),
                    fmt_num(wp),
                    fmt_num(op)
                ),
            );
        }
        let (w, o) = (
            s("http", "wslb", "ops_per_sec"),
            s("http", "haproxy", "ops_per_sec"),
        );
        goal(
            "HTTP req/s >= 1.1 x haproxy".into(),
            w.zip(o).map(|(w, o)| w >= 1.1 * o),
            format!("req/s ratio {}", fmt_ratio(ratio(w, o))),
        );
        let mem = |t: &str| get(v, &["memory", t, "per_conn_bytes"]);
        let best = [mem("haproxy"), mem("nginx")]
            .into_iter()
            .flatten()
            .reduce(f64::min);
        goal(
            "memory per idle WebSocket <= half of the better anchor".into(),
            mem("wslb").zip(best).map(|(w, b)| w <= b / 2.0),
            format!(
                "wslb {} B vs better anchor {} B",
                fmt_num(mem("wslb")),
                fmt_num(best)
            ),
        );
        for (key, label, _) in TLS_HANDSHAKE_ROWS {
            let (w, o) = (
                s(key, "wslb", "ops_per_sec"),
                s(key, "haproxy", "ops_per_sec"),
            );
            if w.is_none() && o.is_none() {
                continue;
            }
            goal(
                format!("TLS handshakes/s >= haproxy ({label})"),
                w.zip(o).map(|(w, o)| w >= o),
                format!(
                    "{} vs {} handshakes/s, ratio {}",
                    fmt_num(w),
                    fmt_num(o),
                    fmt_ratio(ratio(w, o))
                ),
            );
        }
        let kib = |t: &str| get(v, &["memory_tls", t, "per_conn_kib"]);
        let best = [kib("haproxy"), kib("nginx")]
            .into_iter()
            .flatten()
            .reduce(f64::min);
        if kib("wslb").is_some() || best.is_some() {
            goal(
                "KiB per idle TLS WebSocket <= 0.5 x the better of haproxy/nginx".into(),
                kib("wslb").zip(best).map(|(w, b)| w <= b / 2.0),
                format!(
                    "wslb {} KiB vs better anchor {} KiB",
                    fmt_num(kib("wslb")),
                    fmt_num(best)
                ),
            );
        }
        Value::Array(out)
    }

    fn fmt_num(v: Option<f64>) -> String {
        match v {
            None => "-".into(),
            Some(x) if x.abs() >= 1000.0 => {
                let s = format!("{:.0}", x);
                let (sign, digits) = s.split_at(usize::from(s.starts_with('-')));
                let mut out = String::new();
                for (i, ch) in digits.chars().enumerate() {
                    if i > 0 && (digits.len() - i) % 3 == 0 {
                        out.push(',');
                    }
                    out.push(ch);
                }
                format!("{sign}{out}")
            }
            Some(x) if x.fract() == 0.0 => format!("{x:.0}"),
            Some(x) => format!("{x:.1}"),
        }
    }

    /// For a resumption row's label: the targets that resumed under 95% of their
    /// handshakes (their rate is then mostly of full handshakes), or "".
    fn not_resumed(by: &Value) -> String {
        let low: Vec<String> = PROXIES
            .iter()
            .filter_map(|t| {
                let frac = get(by, &[t, "resumed_frac"])?;
                (frac < 0.95).then(|| format!("{t} {:.0}%", frac * 100.0))
            })
            .collect();
        if low.is_empty() {
            String::new()
        } else {
            format!(" (NOT resumed: {})", low.join(", "))
        }
    }

    fn fmt_ratio(v: Option<f64>) -> String {
        v.map_or("-".into(), |r| format!("{r:.2}x"))
    }

    fn markdown(v: &Value) -> String {
        let mut md = String::new();
        let meta = &v["meta"];
        let _ = writeln!(md, "## wslb benchmark\n");
        let _ = writeln!(
            md,
            "{} | host {} ({}) | {} CPUs, {} | kernel {} | {}\n",
            meta["date"].as_str().unwrap_or("?"),
            meta["host"].as_str().unwrap_or("?"),
            meta["cpu_model"].as_str().unwrap_or("?"),
            meta["cpus"],
            meta["placement"].as_str().unwrap_or("?"),
            meta["kernel"].as_str().unwrap_or("?"),
            meta["versions"].as_str().unwrap_or("?"),
        );
        let _ = writeln!(
            md,
            "Median of {} rounds, targets interleaved; {} s per throughput run ({} s warm-up \
             not counted), {} s for the connection rate. Ratios are wslb / anchor: above 1 is \
             better for rates, below 1 is better for latency, memory and size. CPU % is the \
             proxy's own (direct: the two backends'); CPU us per op = CPU % / ops per second, \
             the cost of one op to that process whatever bounded the rate. Machine busy before \
             the run: {}% (load average {} at start, {} at end).\n",
            meta["rounds"],
            meta["secs"],
            meta["warmup"],
            meta["rate_secs"],
            meta["busy_before_pct"],
            meta["loadavg_start"].as_str().unwrap_or("?"),
            meta["loadavg_end"].as_str().unwrap_or("?"),
        );
        let _ = writeln!(
            md,
            "| scenario | metric | direct | wslb | haproxy | nginx | wslb/haproxy | wslb/nginx |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|");
        let mut row = |label: &str, metric: &str, vals: [Option<f64>; 4], ratios: bool| {
            let cells: Vec<String> = vals.iter().map(|x| fmt_num(*x)).collect();
            let (rh, rn) = if ratios {
                (
                    fmt_ratio(ratio(vals[1], vals[2])),
                    fmt_ratio(ratio(vals[1], vals[3])),
                )
            } else {
                ("".into(), "".into())
            };
            let _ = writeln!(
                md,
                "| {label} | {metric} | {} | {rh} | {rn} |",
                cells.join(" | ")
            );
        };
        let mut scen_rows: Vec<(&str, String, &str, &str)> = vec![
            (
                "ws-echo",
                "WS echo, 64 conns x 128 B".into(),
                "msgs/s",
                "op",
            ),
            (
                "http",
                "HTTP keep-alive GET, 64 conns".into(),
                "req/s",
                "op",
            ),
            (
                "http-wrk",
                "HTTP keep-alive GET, 64 conns (wrk)".into(),
                "req/s",
                "op",
            ),
            (
                "ws-rate",
                "WS connect+upgrade+echo+close, 8 workers".into(),
                "conns/s",
                "op",
            ),
        ];
        for (key, label, _) in TLS_HANDSHAKE_ROWS {
            let label = format!("TLS full handshake, {label}, 8 workers");
            scen_rows.push((key, label, "handshakes/s", "handshake"));
        }
        for (key, label) in TLS_RESUME_ROWS {
            let label = format!(
                "TLS resumed handshake, {label}, ECDSA, 8 workers{}",
                not_resumed(&v["scenarios"][key])
            );
            scen_rows.push((key, label, "handshakes/s", "handshake"));
        }
        scen_rows.push((
            "wss-echo",
            "wss echo (ECDSA, TLS 1.3), 64 conns x 128 B".into(),
            "msgs/s",
            "msg",
        ));
        for (key, label, unit, op) in scen_rows {
            let Some(by) = v["scenarios"].get(key) else {
                continue;
            };
            let col = |k: &str| COLUMNS.map(|t| get(by, &[t, k]));
            row(&label, unit, col("ops_per_sec"), true);
            if key.starts_with("tls-resume") {
                let pct = col("resumed_frac").map(|x| x.map(|f| (f * 1000.0).round() / 10.0));
                row("", "resumed %", pct, false);
            }
            row("", "p50 us", col("p50_us"), true);
            row("", "p99 us", col("p99_us"), true);
            row("", "CPU %", col("cpu_pct"), false);
            row("", &format!("CPU us per {op}"), col("cpu_us_per_op"), true);
            row("", "errors", col("errors"), false);
        }
        if let Some(mem) = v["memory"].as_object().filter(|m| !m.is_empty()) {
            let col = |k: &str| COLUMNS.map(|t| get(&Value::Object(mem.clone()), &[t, k]));
            let held = PROXIES
                .iter()
                .filter_map(|t| get(&v["memory"], &[t, "held"]))
                .fold(0.0, f64::max);
            row("Memory (RSS)", "at start, KiB", col("rss_start_kb"), true);
            row("", "idle after load, KiB", col("rss_idle_kb"), true);
            row(
                "",
                &format!("{} idle WS held, KiB", fmt_num(Some(held))),
                col("rss_held_kb"),
                true,
            );
            row("", "per idle WS conn, bytes", col("per_conn_bytes"), true);
            row("", "WS held", col("held"), false);
            row("", "lost while held", col("lost"), false);
        }
        if let Some(mem) = v["memory_tls"].as_object().filter(|m| !m.is_empty()) {
            let mem = Value::Object(mem.clone());
            let col = |k: &str| COLUMNS.map(|t| get(&mem, &[t, k]));
            let held = PROXIES
                .iter()
                .filter_map(|t| get(&mem, &[t, "held"]))
                .fold(0.0, f64::max);
            row(
                "Memory, TLS (ECDSA, TLS 1.3)",
                "idle after load, KiB",
                col("rss_idle_kb"),
                true,
            );
            row(
                "",
                &format!("{} idle wss held, KiB", fmt_num(Some(held))),
                col("rss_held_kb"),
                true,
            );
            row("", "per idle wss conn, KiB", col("per_conn_kib"), true);
            row("", "wss held", col("held"), false);
            row("", "lost while held", col("lost"), false);
        }
        if let Some(size) = v["size"].as_object().filter(|m| !m.is_empty()) {
            let sz = Value::Object(size.clone());
            row(
                "Binary (stripped)",
                "bytes",
                COLUMNS.map(|t| get(&sz, &[t, "bytes"])),
                true,
            );
            row(
                "",
                "bytes + shared libs",
                COLUMNS.map(|t| get(&sz, &[t, "with_libs"])),
                true,
            );
        }
        let _ = writeln!(md, "\n### Goals\n");
        for g in v["goals"].as_array().into_iter().flatten() {
            let mark = match g["met"].as_bool() {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "n/a",
            };
            let _ = writeln!(
                md,
                "- {}: **{mark}** ({})",
                g["goal"].as_str().unwrap_or("?"),
                g["detail"].as_str().unwrap_or("")
            );
        }
        let mut negotiated = String::new();
        for (scen, by) in v["scenarios"].as_object().into_iter().flatten() {
            let tls: Vec<String> = PROXIES
                .iter()
                .filter_map(|t| Some(format!("{t} {}", by.get(t)?["tls"].as_str()?)))
                .collect();
            if !tls.is_empty() {
                let _ = writeln!(negotiated, "- {scen}: {}", tls.join("; "));
            }
        }
        if !negotiated.is_empty() {
            let _ = writeln!(md, "\n### TLS negotiated (first connection of each run)\n");
            let _ = write!(md, "{negotiated}");
        }
        let mut errs = String::new();
        for (scen, by) in v["scenarios"].as_object().into_iter().flatten() {
            for (t, r) in by.as_object().into_iter().flatten() {
                if let Some(k) = r["error_kinds"].as_object().filter(|k| !k.is_empty()) {
                    let _ = writeln!(errs, "- {scen} / {t}: {}", Value::Object(k.clone()));
                }
            }
        }
        for (section, name) in [("memory", "ws-hold"), ("memory_tls", "ws-hold --tls")] {
            for (t, m) in v[section].as_object().into_iter().flatten() {
                if let Some(k) = m["error_kinds"].as_object().filter(|k| !k.is_empty()) {
                    let _ = writeln!(errs, "- {name} / {t}: {}", Value::Object(k.clone()));
                }
            }
        }
        if !errs.is_empty() {
            let _ = writeln!(md, "\n### Errors\n\n{errs}");
        }
        md
    }
}
