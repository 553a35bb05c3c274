//! A backend that registers itself with wslb: a WebSocket echo server (one thread per
//! connection) plus the `wslb::agent` library, which keeps it in the balancer's pool.
//!
//! `rust_backend --balancer ws://127.0.0.1:9090/register [--listen 127.0.0.1:0] [--guid G]`
//! (token from env `WSLB_TOKEN`). Prints `listening on 127.0.0.1:PORT`, then the agent logs
//! `registered with ...` to stderr. Ctrl-C / SIGTERM: deregister, then exit.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use std::{env, process, thread};

use wslb::agent::{self, AgentConfig};

fn main() {
    let (mut balancer, mut listen, mut guid) = (String::new(), "127.0.0.1:0".to_string(), None);
    let mut args = env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--balancer" => balancer = value,
            "--listen" => listen = value,
            "--guid" => guid = Some(value),
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    if balancer.is_empty() {
        usage("--balancer is required");
    }
    let listener = TcpListener::bind(&listen).unwrap_or_else(|e| {
        eprintln!("rust_backend: cannot listen on {listen}: {e}");
        process::exit(1)
    });
    let addr = listener.local_addr().expect("local_addr");
    println!("listening on {addr}");

    // The registration: a few lines. The agent reconnects on its own until stopped.
    let mut cfg = AgentConfig::new(&balancer, &format!("ws://{addr}"));
    cfg.token = env::var("WSLB_TOKEN").ok();
    if let Some(g) = guid {
        cfg.guid = g;
    }
    let registration = agent::spawn(cfg).unwrap_or_else(|e| usage(&e.to_string()));

    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&term)).expect("signal handler");
    }
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || echo(stream));
        }
    });
    while !term.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(50));
    }
    // Leave the pool before going away, so no new client is sent to a closing backend.
    registration.stop();
}

fn echo(stream: TcpStream) {
    let Ok(mut ws) = tungstenite::accept(stream) else {
        return;
    };
    while let Ok(msg) = ws.read() {
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).is_err() {
            return;
        }
    }
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "rust_backend: {msg}\nusage: rust_backend --balancer ws://HOST:PORT/register \
         [--listen ADDR] [--guid G]"
    );
    process::exit(2)
}
