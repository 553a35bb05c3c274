//! Autobahn|Testsuite client testee: tungstenite's own echo client, as in tungstenite's
//! `examples/autobahn-client.rs`, with the server address and agent name as arguments so
//! `scripts/autobahn/conformance.py` can run it against `wstest -m fuzzingserver` directly
//! and through wslb, and compare the two reports case by case.
//!
//! ```sh
//! autobahn_client ws://127.0.0.1:9001 direct
//! ```

use std::process::ExitCode;

use tungstenite::protocol::WebSocketConfig;
use tungstenite::{client::connect_with_config, Error, Message};

/// Autobahn's 9.* cases send messages up to 16 MiB: no limits of our own, so the results
/// say what the relay did, not what a client limit refused.
fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None)
}

fn open(
    url: &str,
) -> tungstenite::Result<
    tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>,
> {
    connect_with_config(url, Some(config()), 3).map(|(ws, _)| ws)
}

fn case_count(base: &str) -> Result<u32, String> {
    let mut ws = open(&format!("{base}/getCaseCount")).map_err(|e| e.to_string())?;
    let msg = ws.read().map_err(|e| e.to_string())?;
    let _ = ws.close(None);
    let text = msg.into_text().map_err(|e| e.to_string())?;
    text.parse().map_err(|_| format!("case count {text:?}"))
}

/// Echoes every message until the server ends the case.
fn run_case(base: &str, case: u32, agent: &str) -> tungstenite::Result<()> {
    let mut ws = open(&format!("{base}/runCase?case={case}&agent={agent}"))?;
    loop {
        match ws.read()? {
            msg @ (Message::Text(_) | Message::Binary(_)) => ws.send(msg)?,
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {}
        }
    }
}

fn update_reports(base: &str, agent: &str) -> tungstenite::Result<()> {
    let mut ws = open(&format!("{base}/updateReports?agent={agent}"))?;
    ws.close(None)?;
    // Wait for the server's close so the report is written before we exit.
    loop {
        match ws.read() {
            Ok(_) => {}
            Err(Error::ConnectionClosed | Error::AlreadyClosed) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [base, agent] = args.as_slice() else {
        eprintln!("usage: autobahn_client ws://HOST:PORT AGENT");
        return ExitCode::from(2);
    };
    let base = base.trim_end_matches('/');
    let total = match case_count(base) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("autobahn_client: getCaseCount: {e}");
            return ExitCode::FAILURE;
        }
    };
    for case in 1..=total {
        match run_case(base, case, agent) {
            Ok(()) | Err(Error::ConnectionClosed | Error::Protocol(_) | Error::Utf8(_)) => {}
            // Resets and the like are part of what Autobahn judges; just note them.
            Err(e) => eprintln!("autobahn_client: case {case}: {e}"),
        }
    }
    if let Err(e) = update_reports(base, agent) {
        eprintln!("autobahn_client: updateReports: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
