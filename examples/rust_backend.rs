//! A backend that registers itself with wslb: a WebSocket echo server (one thread per
//! connection) plus the `wslb::agent` library, which keeps it in the balancers' pools.
//! With `--chat`, it is a chat room instead: each line a client sends is broadcast, through
//! the agent and every balancer's control channel, to every client of every balancer.
//!
//! `rust_backend --balancer ws://127.0.0.1:9090/register [--balancer URL...]
//! [--listen 127.0.0.1:0] [--guid G] [--chat]` (token from env `WSLB_TOKEN`). Prints
//! `listening on 127.0.0.1:PORT`, then the agent logs `registered with ...` to stderr.
//! Ctrl-C / SIGTERM: deregister, then exit.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use std::{env, process, thread};

use wslb::agent::{self, AgentConfig, ClientRef, Filter, Messenger, Payload};

fn main() {
    let (mut balancers, mut listen, mut guid) = (Vec::new(), "127.0.0.1:0".to_string(), None);
    let mut chat = false;
    let mut args = env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--chat" {
            chat = true;
            continue;
        }
        let value = args
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--balancer" => balancers.push(value),
            "--listen" => listen = value,
            "--guid" => guid = Some(value),
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    if balancers.is_empty() {
        usage("--balancer is required");
    }
    let listener = TcpListener::bind(&listen).unwrap_or_else(|e| {
        eprintln!("rust_backend: cannot listen on {listen}: {e}");
        process::exit(1)
    });
    let addr = listener.local_addr().expect("local_addr");
    println!("listening on {addr}");

    // The registration: a few lines. The agent reconnects on its own until stopped.
    let mut cfg = AgentConfig::new(&balancers[0], &format!("ws://{addr}"));
    cfg.balancers = balancers;
    cfg.token = env::var("WSLB_TOKEN").ok();
    if let Some(g) = guid {
        cfg.guid = g;
    }
    let registration = agent::spawn(cfg).unwrap_or_else(|e| usage(&e.to_string()));

    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&term)).expect("signal handler");
    }
    let messenger = chat.then(|| registration.messenger());
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let messenger = messenger.clone();
            thread::spawn(move || match messenger {
                Some(m) => chat_room(stream, &m),
                None => echo(stream),
            });
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

/// One chat member: its lines go to everyone else through the balancers; what the others
/// say reaches it the same way, injected by its balancer into this very connection.
// The header callback's error type is tungstenite's `ErrorResponse`, not ours to shrink.
#[allow(clippy::result_large_err)]
fn chat_room(stream: TcpStream, messenger: &Messenger) {
    let mut me: Option<ClientRef> = None;
    let remember = |req: &tungstenite::handshake::server::Request, resp| {
        me = req
            .headers()
            .get("x-wslb-client")
            .and_then(|v| v.to_str().ok())
            .and_then(ClientRef::parse);
        Ok(resp)
    };
    let Ok(mut ws) = tungstenite::accept_hdr(stream, remember) else {
        return;
    };
    let name = me.as_ref().map_or("?".to_string(), ToString::to_string);
    while let Ok(msg) = ws.read() {
        let Ok(line) = msg.to_text() else { continue };
        if !msg.is_text() {
            continue;
        }
        let said = Payload::Text(format!("{name}: {line}"));
        let answer = match messenger.broadcast(said, Filter::All, me.clone()) {
            Ok(n) => format!("sent to {n}"),
            Err(e) => format!("error {e}"),
        };
        if ws.send(tungstenite::Message::text(answer)).is_err() {
            return;
        }
    }
}

fn usage(msg: &str) -> ! {
    eprintln!(
        "rust_backend: {msg}\nusage: rust_backend --balancer ws://HOST:PORT/register \
         [--balancer URL...] [--listen ADDR] [--guid G] [--chat]"
    );
    process::exit(2)
}
