//! Embedding wslb as a library: hooks on the balancer's moments, and messages sent from
//! another thread through a `ServerHandle`.
//!
//! `cargo run --example hooks -- -l 127.0.0.1:8080 -B ws://127.0.0.1:9001 -B ws://127.0.0.1:9002`
//! (the same flags as `wslb`). Every WebSocket client gets a "tick" broadcast every 5 s; a
//! request whose client id is even prefers the first backend by name.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use wslb::config::{parse_args, Command};
use wslb::hooks::Hooks;
use wslb::Server;

struct Logger;

impl Hooks for Logger {
    fn on_client_connect(&mut self, client: u64, peer: SocketAddr) {
        eprintln!("hooks: client {client} connected from {peer}");
    }

    fn on_client_paired(&mut self, client: u64, backend: &str) {
        eprintln!("hooks: client {client} paired with {backend}");
    }

    fn on_client_disconnect(&mut self, client: u64) {
        eprintln!("hooks: client {client} gone");
    }

    fn select_backend(&mut self, client: u64, candidates: &[&str]) -> Option<usize> {
        // OnBeforeSendServerBinding: even clients go to the alphabetically first backend.
        (client % 2 == 0)
            .then(|| (0..candidates.len()).min_by_key(|&i| candidates[i]))
            .flatten()
    }

    fn on_request_head(&mut self, head: &mut Vec<u8>) {
        // OnLoadBalancerHTTPRequest: tag forwarded requests (before the final blank line).
        if head.ends_with(b"\r\n\r\n") {
            head.truncate(head.len() - 2);
            head.extend_from_slice(b"X-Via-Hooks: 1\r\n\r\n");
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match parse_args(&args) {
        Ok(Command::Run(cfg)) => *cfg,
        Ok(_) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut server = match Server::bind(cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hooks: {e}");
            return ExitCode::FAILURE;
        }
    };
    server.set_hooks(Box::new(Logger));
    let handle = server.handle();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(5));
        match handle.broadcast("tick") {
            Ok(n) => eprintln!("hooks: tick sent to {n} websocket clients"),
            Err(e) => {
                eprintln!("hooks: broadcast stopped: {e}");
                return;
            }
        }
    });
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hooks: {e}");
            ExitCode::FAILURE
        }
    }
}
