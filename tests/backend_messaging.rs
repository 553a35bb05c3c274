//! Issue 17: backends message clients through the balancers, over the control channel.
//! Real processes throughout: two `wslb` balancers, backends registered with both through
//! `wslb agent --local`, WebSocket clients (tungstenite, and Python `websockets` for a
//! witness we did not write), messages posted to the agents' local endpoints.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::thread;
use std::time::Instant;

use common::*;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

const TOKEN: &str = "local-secret";

/// `wslb --control 127.0.0.1:0 EXTRA...` with no static backend.
fn balancer(extra: &[&str]) -> Balancer {
    let mut args = vec!["--control", "127.0.0.1:0", "--message-rate", "0"];
    args.extend_from_slice(extra);
    Balancer::start(&args, &[])
}

fn control_url(b: &Balancer) -> String {
    format!("ws://{}/register", b.control_addr())
}

/// Waits until `b` has logged `n` "server ready" lines.
fn wait_ready(b: &Balancer, n: usize) {
    let ok = wait_until(TIMEOUT, || {
        b.stderr_lines()
            .iter()
            .filter(|l| l.contains("server ready"))
            .count()
            >= n
    });
    assert!(ok, "backends did not register: {:#?}", b.stderr_lines());
}

/// A keep-alive connection to an agent's local endpoint.
struct Local(HttpClient);

impl Local {
    fn connect(addr: SocketAddr) -> Local {
        Local(HttpClient::connect(addr))
    }

    /// POSTs `body` to `target`; returns the status and the JSON answer.
    fn post(&mut self, target: &str, body: &[u8]) -> (u16, serde_json::Value) {
        let head = format!(
            "POST {target} HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.0.send(&[head.as_bytes(), body].concat());
        let resp = self.0.read_response().expect("agent answer");
        let json = serde_json::from_slice(&resp.body).unwrap_or_default();
        (resp.status, json)
    }

    /// POSTs and expects `200 {"sent": N}`; returns N.
    fn sent(&mut self, target: &str, body: &[u8]) -> u64 {
        let (status, answer) = self.post(target, body);
        assert_eq!(status, 200, "{target}: {answer}");
        answer["sent"].as_u64().expect("a count")
    }
}

/// A WebSocket client and the id the balancer gave it (asked of the echo backend, which
/// saw it in `X-Wslb-Client`).
fn client(addr: SocketAddr) -> (WebSocket<TcpStream>, String) {
    let mut ws = upgrade(addr, || connect(addr));
    ws.send(Message::text("whoami-id")).expect("send");
    let id = ws.read().expect("id answer").into_text().expect("text");
    assert!(
        id.contains('.'),
        "no X-Wslb-Client reached the backend: {id:?}"
    );
    (ws, id.to_string())
}

/// A WebSocket upgrade through the balancer at `addr` on a socket from `tcp`, retried: an
/// agent registers its backend as it starts the command, which may not listen yet, so the
/// first upgrades can get a 502.
fn upgrade(addr: SocketAddr, tcp: impl Fn() -> TcpStream) -> WebSocket<TcpStream> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match tungstenite::client::client(format!("ws://{addr}/").as_str(), tcp()) {
            Ok((ws, _)) => return ws,
            Err(e) => assert!(Instant::now() < deadline, "upgrade through {addr}: {e}"),
        }
        thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Reads data messages until `n` arrived; panics on a close or a timeout.
fn read_n(ws: &mut WebSocket<TcpStream>, n: usize) -> Vec<String> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        match ws.read() {
            Ok(Message::Text(t)) => got.push(t.to_string()),
            Ok(Message::Close(f)) => panic!("closed after {} messages: {f:?}", got.len()),
            Ok(_) => {}
            Err(e) => panic!("after {} messages: {e}", got.len()),
        }
    }
    got
}

/// A client socket with a small receive buffer, so that a client that stops reading
/// backs up into the balancer's queue after little data rather than megabytes.
fn stalled_client(addr: SocketAddr) -> (WebSocket<TcpStream>, String) {
    let small = || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&addr.into()).unwrap();
        let tcp: TcpStream = s.into();
        tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
        tcp
    };
    let mut ws = upgrade(addr, small);
    ws.send(Message::text("whoami-id")).unwrap();
    let id = ws.read().unwrap().into_text().unwrap().to_string();
    (ws, id)
}

fn metric(b: &Balancer, name: &str) -> u64 {
    let m = get(b.control_addr(), "/metrics").text();
    m.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

/// Two balancers, three backends registered with both through `wslb agent`, 600 clients
/// spread over both; each backend broadcasts 100 numbered messages: every client gets every
/// message once, in order per sender. Meanwhile one more client stops reading and is sent
/// large messages: its queue limit closes it with 1013, counted, and nobody else notices.
#[test]
fn broadcasts_from_every_backend_reach_every_client_of_every_balancer_in_order() {
    const CLIENTS: usize = 600;
    const MESSAGES: usize = 100;
    const BACKENDS: usize = 3;
    let started = Instant::now();
    let lbs = [
        balancer(&["--client-queue-max", "64KiB"]),
        balancer(&["--client-queue-max", "64KiB"]),
    ];
    let urls: Vec<String> = lbs.iter().map(control_url).collect();
    let agents: Vec<(Agent, SocketAddr)> = (0..BACKENDS)
        .map(|i| {
            let args = ["-b", &urls[0], "-b", &urls[1]];
            Agent::start_local(&args, &format!("g{i}"), &format!("b{i}"), TOKEN)
        })
        .collect();
    for lb in &lbs {
        wait_ready(lb, BACKENDS);
    }
    // The stalled client first: it is in every broadcast, never reads.
    let (stalled, stalled_id) = stalled_client(lbs[0].addr());
    let readers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (mut ws, _) = client(lbs[i % 2].addr());
            thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || read_n(&mut ws, BACKENDS * MESSAGES))
                .unwrap()
        })
        .collect();
    let senders: Vec<_> = agents
        .iter()
        .enumerate()
        .map(|(b, (_, local))| {
            let local = *local;
            thread::spawn(move || {
                let mut l = Local::connect(local);
                for i in 0..MESSAGES {
                    let (status, answer) = l.post("/broadcast", format!("g{b}:{i}").as_bytes());
                    assert_eq!(status, 200, "{answer}");
                    // Every reader, plus the stalled client until its queue closes it.
                    let sent = answer["sent"].as_u64().unwrap_or(0) as usize;
                    assert!(sent == CLIENTS || sent == CLIENTS + 1, "{answer}");
                }
            })
        })
        .collect();
    // Fill the stalled client's queue with messages addressed to it alone.
    let mut l = Local::connect(agents[2].1);
    let big = vec![b'x'; 60 * 1024];
    let mut flooded = 0;
    let closed = loop {
        let (status, answer) = l.post(&format!("/send?to={stalled_id}"), &big);
        match status {
            200 => flooded += 1,
            404 => break answer,
            _ => panic!("{status} {answer}"),
        }
        assert!(flooded < 400, "the stalled client was never closed");
    };
    assert_eq!(closed["error"], "unknown_client", "{closed}");
    // It reads again at once (the balancer gives a closing client 2 s to take what it is
    // owed): what it gets ends with the balancer's 1013.
    let drained = thread::spawn(move || close_code_after_draining(stalled));
    for s in senders {
        s.join().expect("sender");
    }
    for (i, r) in readers.into_iter().enumerate() {
        let got = r.join().unwrap_or_else(|_| panic!("client {i} failed"));
        let mut next: HashMap<String, usize> = HashMap::new();
        for m in &got {
            let (sender, n) = m.split_once(':').expect("numbered message");
            let want = next.entry(sender.to_string()).or_default();
            assert_eq!(n.parse::<usize>().ok(), Some(*want), "client {i}: {got:?}");
            *want += 1;
        }
        assert!(
            next.values().all(|&n| n == MESSAGES),
            "client {i}: {next:?}"
        );
    }
    assert_eq!(
        metric(&lbs[0], "wslb_websocket_slow_clients_closed_total"),
        1
    );
    assert_eq!(
        metric(&lbs[1], "wslb_websocket_slow_clients_closed_total"),
        0
    );
    let code = drained.join().expect("stalled client");
    assert_eq!(code, Some(1013), "flooded {flooded} times");
    eprintln!(
        "{CLIENTS} clients x {} messages in {:.1}s",
        BACKENDS * MESSAGES,
        started.elapsed().as_secs_f64()
    );
}

/// Reads everything queued for `ws` and returns the close code it ends with, if any.
fn close_code_after_draining(mut ws: WebSocket<TcpStream>) -> Option<u16> {
    loop {
        match ws.read() {
            Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// `send` to a client connected to the other balancer reaches it; `close` and `ping` work
/// by id too; unknown ids and bad requests get clear errors and the agent stays usable.
#[test]
fn send_close_and_ping_find_a_client_on_either_balancer() {
    let lbs = [balancer(&["--instance-id", "east"]), balancer(&[])];
    let urls: Vec<String> = lbs.iter().map(control_url).collect();
    let (_agent, local) = Agent::start_local(&["-b", &urls[0], "-b", &urls[1]], "g0", "b0", TOKEN);
    for lb in &lbs {
        wait_ready(lb, 1);
    }
    let (mut east, east_id) = client(lbs[0].addr());
    let (mut west, west_id) = client(lbs[1].addr());
    assert!(east_id.starts_with("east."), "{east_id}");
    assert!(!west_id.starts_with("east."), "{west_id}");
    let mut l = Local::connect(local);
    assert_eq!(l.sent(&format!("/send?to={west_id}"), b"to west"), 1);
    assert_eq!(read_n(&mut west, 1), ["to west"]);
    assert_eq!(l.sent(&format!("/send?to={east_id},{west_id}"), b"both"), 2);
    assert_eq!(read_n(&mut east, 1), ["both"]);
    assert_eq!(read_n(&mut west, 1), ["both"]);
    // Broadcast except the sender: only the other one gets it.
    assert_eq!(
        l.sent(&format!("/broadcast?except={east_id}"), b"not east"),
        1
    );
    assert_eq!(read_n(&mut west, 1), ["not east"]);
    for (target, status, code) in [
        ("/send?to=nowhere.1", 404, "unknown_client"),
        ("/send?to=bad", 400, "bad_field"),
        ("/close?client=east.1&code=1005", 400, "bad_field"),
        ("/nothing", 404, "bad_field"),
    ] {
        let (got, answer) = l.post(target, b"x");
        assert_eq!(
            (got, answer["error"].as_str()),
            (status, Some(code)),
            "{target}"
        );
    }
    let (status, _) = l.post(&format!("/ping?client={east_id}"), b"");
    assert_eq!(status, 200);
    let (status, _) = l.post(&format!("/close?client={west_id}&code=4000"), b"bye");
    assert_eq!(status, 200);
    match west.read() {
        Ok(Message::Close(Some(f))) => {
            assert_eq!((f.code, f.reason.as_str()), (CloseCode::from(4000), "bye"))
        }
        other => panic!("expected close 4000: {other:?}"),
    }
    // Still usable afterwards, and the wrong token is refused.
    assert_eq!(l.sent("/broadcast", b"still here"), 1);
    assert_eq!(read_n(&mut east, 1), ["still here"]);
    let mut raw = HttpClient::connect(local);
    raw.send(b"POST /broadcast HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer nope\r\nContent-Length: 1\r\n\r\nx");
    assert_eq!(raw.read_response().unwrap().status, 401);
}

/// The control channel itself, spoken by a raw WebSocket client: every kind of bad request
/// gets a `failed` answer naming the problem, and the session goes on.
#[test]
fn bad_requests_are_answered_and_the_session_survives() {
    let lb = balancer(&["--message-max", "1KiB"]);
    let lb_rate = Balancer::start(&["--control", "127.0.0.1:0", "--message-rate", "2"], &[]);
    let backend = Backend::start("raw");
    for (b, rate_limited) in [(&lb, false), (&lb_rate, true)] {
        let (mut ctl, _) =
            tungstenite::client::client(control_url(b).as_str(), connect(b.control_addr()))
                .unwrap();
        let mut ask = |msg: Message| -> serde_json::Value {
            ctl.send(msg).unwrap();
            loop {
                if let Message::Text(t) = ctl.read().unwrap() {
                    return serde_json::from_str(t.as_str()).unwrap();
                }
            }
        };
        let text = |s: String| Message::text(s);
        let before = ask(text(r#"{"type":"broadcast","id":1,"text":"x"}"#.into()));
        assert_eq!(
            (&before["code"], &before["id"]),
            (&"not_registered".into(), &1.into())
        );
        let reg = format!(
            r#"{{"type":"register","version":1,"guid":"raw","bindings":["{}"]}}"#,
            backend.url()
        );
        assert_eq!(ask(text(reg))["type"], "registered");
        if rate_limited {
            let answers: Vec<_> = (0..3)
                .map(|i| {
                    ask(text(format!(
                        r#"{{"type":"broadcast","id":{i},"text":"x"}}"#
                    )))
                })
                .collect();
            assert_eq!(answers[2]["code"], "rate_limited", "{answers:?}");
            continue;
        }
        let cases = [
            (
                format!(
                    r#"{{"type":"broadcast","id":2,"text":"{}"}}"#,
                    "x".repeat(2000)
                ),
                "too_large",
            ),
            (
                r#"{"type":"send","id":3,"to":"nobody.1","text":"x"}"#.into(),
                "unknown_client",
            ),
            (
                r#"{"type":"send","id":4,"to":5,"text":"x"}"#.into(),
                "bad_field",
            ),
            (
                r#"{"type":"close","id":5,"client":"a.1","code":1006}"#.into(),
                "bad_field",
            ),
        ];
        for (msg, code) in cases {
            let a = ask(text(msg));
            assert_eq!(
                (a["type"].as_str(), a["code"].as_str()),
                (Some("failed"), Some(code)),
                "{a}"
            );
        }
        // Binary: 2-byte header length, JSON header, payload.
        let header = br#"{"type":"broadcast","id":6}"#;
        let mut frame = (header.len() as u16).to_be_bytes().to_vec();
        frame.extend_from_slice(header);
        frame.extend_from_slice(&[0, 1, 2]);
        let a = ask(Message::binary(frame));
        assert_eq!(
            (a["type"].as_str(), a["count"].as_u64()),
            (Some("sent"), Some(0)),
            "{a}"
        );
        let a = ask(Message::binary(vec![0, 200, 1]));
        assert_eq!(a["code"], "bad_field", "{a}");
        // The session survived it all.
        let a = ask(text(r#"{"type":"broadcast","id":7,"text":"ok"}"#.into()));
        assert_eq!(
            (a["type"].as_str(), a["id"].as_u64()),
            (Some("sent"), Some(7))
        );
    }
}

/// Third-party clients: Python `websockets` clients receive a backend's broadcast, text and
/// binary, once each and in order.
#[test]
fn python_websockets_clients_receive_broadcasts() {
    let probe = Command::new(python())
        .args(["-c", "import websockets"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        panic!("python3 with websockets is needed: `make test-deps` installs it in .venv");
    }
    let lb = balancer(&[]);
    let (_agent, local) = Agent::start_local(&["-b", &control_url(&lb)], "g0", "b0", TOKEN);
    wait_ready(&lb, 1);
    const SCRIPT: &str = r#"
import asyncio, sys, websockets
async def one(url, n, out):
    async with websockets.connect(url) as ws:
        await ws.send("whoami")
        await ws.recv()
        out.append(ws)
        got = [await ws.recv() for _ in range(n)]
        return got
async def main():
    url, clients, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ready = []
    tasks = [asyncio.create_task(one(url, n, ready)) for _ in range(clients)]
    while len(ready) < clients:
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    for got in results:
        texts = [m for m in got if isinstance(m, str)]
        blobs = [m for m in got if isinstance(m, bytes)]
        assert texts == [f"m{i}" for i in range(n - 1)], texts
        assert blobs == [bytes([0, 255, 7])], blobs
    print("ok", len(results), flush=True)
asyncio.run(main())
"#;
    let clients = 20;
    let n = 10;
    let mut child = Command::new(python())
        .args(["-c", SCRIPT, &format!("ws://{}/", lb.addr())])
        .args([clients.to_string(), n.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.ends_with(b"ready\n") {
        assert_eq!(stdout.read(&mut byte).unwrap(), 1, "python ended early");
        seen.push(byte[0]);
    }
    let mut l = Local::connect(local);
    for i in 0..n - 1 {
        let (status, a) = l.post("/broadcast", format!("m{i}").as_bytes());
        assert_eq!(
            (status, a["sent"].as_u64()),
            (200, Some(clients as u64)),
            "{a}"
        );
    }
    let head = format!(
        "POST /broadcast HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: 3\r\n\r\n"
    );
    l.0.send(&[head.as_bytes(), &[0, 255, 7]].concat());
    assert_eq!(l.0.read_response().unwrap().status, 200);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(
        status.success() && rest.contains(&format!("ok {clients}")),
        "{rest}"
    );
}

/// Two clients on two balancers of a chat backend: a line from one reaches the other,
/// prefixed with the sender's id, and not the sender (it gets "sent to 1").
fn chat_check(lbs: &[Balancer; 2]) {
    let mut a = ws_connect(lbs[0].addr(), "/");
    let mut b = ws_connect(lbs[1].addr(), "/");
    let greeting_of = |ws: &mut WebSocket<TcpStream>| {
        // The Python example greets; the Rust one does not: send a probe line instead.
        let _ = ws
            .get_mut()
            .set_read_timeout(Some(std::time::Duration::from_millis(300)));
        let greeting = ws.read().ok().map(|m| m.to_string());
        let _ = ws.get_mut().set_read_timeout(Some(TIMEOUT));
        greeting
    };
    let ga = greeting_of(&mut a);
    let _ = greeting_of(&mut b);
    if let Some(g) = &ga {
        assert!(g.starts_with("welcome "), "{g}");
    }
    // Both are in their balancers' tunnels now: chat.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        a.send(Message::text("hi")).unwrap();
        let answer = a.read().unwrap().to_string();
        if answer == "sent to 1" {
            break;
        }
        assert!(Instant::now() < deadline, "{answer}");
    }
    let heard = read_n(&mut b, 1).remove(0);
    assert!(heard.ends_with(": hi") && heard.contains('.'), "{heard}");
}

#[test]
fn python_chat_example_reaches_clients_of_both_balancers() {
    let probe = Command::new(python())
        .args(["-c", "import websockets"])
        .status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "python3 with websockets needed"
    );
    let lbs = [balancer(&[]), balancer(&[])];
    let port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/python_chat.py");
    let mut cmd = Command::new(wslb_bin().unwrap());
    cmd.arg("agent")
        .args(["-b", &control_url(&lbs[0]), "-b", &control_url(&lbs[1])])
        .args([
            "--binding",
            &format!("ws://127.0.0.1:{port}"),
            "--guid",
            "py-chat",
        ])
        .args(["--local", "127.0.0.1:0", "--"])
        .arg(python())
        .args([script, &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _agent = KillOnDrop(cmd.spawn().expect("wslb agent"));
    for lb in &lbs {
        wait_ready(lb, 1);
    }
    // The agent registers as soon as it starts; the script may take a moment to listen.
    assert!(wait_until(TIMEOUT, || TcpStream::connect((
        "127.0.0.1",
        port
    ))
    .is_ok()));
    chat_check(&lbs);
}

#[test]
fn rust_chat_example_reaches_clients_of_both_balancers() {
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_wslb"))
        .with_file_name("examples")
        .join("rust_backend");
    assert!(bin.exists(), "run cargo build --examples");
    let lbs = [balancer(&[]), balancer(&[])];
    let mut cmd = Command::new(bin);
    cmd.args([
        "--balancer",
        &control_url(&lbs[0]),
        "--balancer",
        &control_url(&lbs[1]),
    ])
    .args(["--guid", "rs-chat", "--chat"])
    .env_remove("WSLB_TOKEN")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let _backend = KillOnDrop(cmd.spawn().expect("rust_backend"));
    for lb in &lbs {
        wait_ready(lb, 1);
    }
    chat_check(&lbs);
}

/// SIGTERM then wait, so a supervising agent stops its child too.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// The library side, in process: `wslb::agent::spawn` registers a backend, then
/// `Agent::broadcast`, `send` and `close` reach its client through the balancer.
#[test]
fn library_agent_broadcasts_sends_and_closes() {
    use wslb::agent::{AgentConfig, ClientRef, Filter, Payload};
    let lb = balancer(&[]);
    let backend = Backend::start("lib");
    let agent =
        wslb::agent::spawn(AgentConfig::new(&control_url(&lb), &backend.url())).expect("agent");
    assert!(agent.wait_registered(TIMEOUT));
    let (mut ws, id) = client(lb.addr());
    let me = ClientRef::parse(&id).expect("client id");
    let all = agent.broadcast(Payload::Text("all".into()), Filter::All, None);
    assert_eq!(all, Ok(1));
    assert_eq!(read_n(&mut ws, 1), ["all"]);
    let one = agent.send(vec![me.clone()], Payload::Binary(vec![1, 2]));
    assert_eq!(one, Ok(1));
    assert_eq!(ws.read().unwrap(), Message::binary(vec![1, 2]));
    let nobody = ClientRef::parse("elsewhere.1").unwrap();
    let err = agent
        .send(vec![nobody], Payload::Text("x".into()))
        .unwrap_err();
    assert_eq!(err.code(), "unknown_client");
    assert_eq!(agent.close(me, 4001, "done"), Ok(1));
    match ws.read() {
        Ok(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 4001),
        other => panic!("expected close 4001: {other:?}"),
    }
    agent.stop();
}
