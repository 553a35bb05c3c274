//! The library surface: a Server run in-process with hooks, driven through its ServerHandle.
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tungstenite::Message;
use wslb::config::{parse_args, Command};
use wslb::hooks::Hooks;
use wslb::{Outgoing, Server, Target};

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Hooks for Seen {
    fn on_client_paired(&mut self, client: u64, backend: &str) {
        self.0
            .lock()
            .unwrap()
            .push(format!("paired {client} {backend}"));
    }
    fn select_backend(&mut self, _client: u64, candidates: &[&str]) -> Option<usize> {
        // Always the backend whose URL sorts last.
        (0..candidates.len()).max_by_key(|&i| candidates[i])
    }
    fn on_client_message(&mut self, client: u64, text: bool, payload: &[u8]) {
        let kind = if text { "text" } else { "binary" };
        self.0.lock().unwrap().push(format!(
            "message {client} {kind} {}",
            String::from_utf8_lossy(payload)
        ));
    }
    fn on_request_head(&mut self, head: &mut Vec<u8>) {
        head.truncate(head.len() - 2);
        head.extend_from_slice(b"X-Hooked: yes\r\n\r\n");
    }
}

#[test]
fn hooks_and_handle_in_process() {
    let (a, b) = (Backend::start("la"), Backend::start("lb"));
    let last = if a.url() > b.url() { "la" } else { "lb" };
    let args: Vec<String> = [
        "-l",
        "127.0.0.1:0",
        "-B",
        &a.url(),
        "-B",
        &b.url(),
        "-q",
        "--inspect",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let Ok(Command::Run(cfg)) = parse_args(&args) else {
        panic!("flags")
    };
    let mut server = Server::bind(*cfg).unwrap();
    let addr = server.local_addrs()[0];
    let seen = Seen::default();
    server.set_hooks(Box::new(seen.clone()));
    let handle = server.handle();
    let loop_thread = std::thread::spawn(move || server.run());

    // select_backend overrides `fewest` for every connection.
    let mut clients: Vec<_> = (0..3).map(|_| ws_connect(addr, "/")).collect();
    for ws in &mut clients {
        assert_eq!(whoami(ws), last);
    }
    // --inspect: client messages are seen (unmasked, whole) before they are forwarded.
    clients[0].send(Message::text("seen by hooks")).unwrap();
    assert_eq!(clients[0].read().unwrap(), Message::text("seen by hooks"));
    assert!(
        seen.0
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.ends_with("text seen by hooks")),
        "{:?}",
        seen.0.lock().unwrap()
    );
    assert!(seen
        .0
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.ends_with("text whoami")));
    // on_request_head edits what the backend receives.
    let r = get(addr, "/headers");
    assert!(
        r.text().to_ascii_lowercase().contains("x-hooked: yes"),
        "{}",
        r.text()
    );
    assert!(
        seen.0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("paired"))
            .count()
            >= 4
    );

    // Broadcast and WriteData from another thread.
    assert_eq!(handle.broadcast("to all").unwrap(), 3);
    for ws in &mut clients {
        assert_eq!(ws.read().unwrap(), Message::text("to all"));
    }
    let n = handle
        .send(
            Target::Backend(if last == "la" { a.url() } else { b.url() }),
            Outgoing::Binary(vec![1, 2, 3]),
        )
        .unwrap();
    assert_eq!(n, 3);
    for ws in &mut clients {
        assert_eq!(ws.read().unwrap(), Message::binary(vec![1, 2, 3]));
    }
    assert_eq!(
        handle
            .send(Target::Client(999_999), Outgoing::Text("x".into()))
            .unwrap(),
        0
    );

    handle.shutdown();
    drop(clients);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !loop_thread.is_finished() {
        assert!(std::time::Instant::now() < deadline, "server did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    loop_thread.join().unwrap().unwrap();
}
