//! One link: the thread that keeps a control WebSocket to one balancer, registers on
//! it, answers its messages and reconnects with jittered back-off.

use super::*;

/// A message from the balancer (docs/PROTOCOL.md, "Balancer → backend").
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum BalancerMsg {
    /// Its `heartbeat_ms` is not needed: the balancer's pings are answered within a tick
    /// whatever its interval, and ours draw pongs at our own.
    Registered,
    /// `clients` present: the balancer will send `drain_complete` (older ones do not).
    Drained {
        clients: Option<u64>,
    },
    /// The last client of ours is gone from that balancer.
    DrainComplete,
    Deregistered,
    Unreachable {
        binding: String,
        reason: String,
    },
    Error {
        code: String,
        message: String,
    },
    /// Unknown types are ignored: a newer balancer may say more than this agent knows.
    Other,
}

pub(super) fn parse_balancer_msg(text: &str) -> Option<BalancerMsg> {
    let v: Value = serde_json::from_str(text).ok()?;
    let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    Some(match v.get("type")?.as_str()? {
        "registered" => BalancerMsg::Registered,
        "drained" => BalancerMsg::Drained {
            clients: v.get("clients").and_then(Value::as_u64),
        },
        "drain_complete" => BalancerMsg::DrainComplete,
        "deregistered" => BalancerMsg::Deregistered,
        "unreachable" => BalancerMsg::Unreachable {
            binding: field("binding"),
            reason: field("reason"),
        },
        "error" => BalancerMsg::Error {
            code: field("code"),
            message: field("message"),
        },
        _ => BalancerMsg::Other,
    })
}

/// The next ceiling of the exponential back-off.
pub(super) fn next_ceiling(cur: Duration, max: Duration) -> Duration {
    cur.saturating_mul(2).min(max)
}

/// A delay drawn uniformly from `[min, ceiling]`: jitter spreads reconnect storms after a
/// balancer restart, the floor keeps a refused agent from spinning.
pub(super) fn jittered(rng: &mut impl Rng, min: Duration, ceiling: Duration) -> Duration {
    let lo = u64::try_from(min.as_micros()).unwrap_or(u64::MAX);
    let hi = u64::try_from(ceiling.as_micros())
        .unwrap_or(u64::MAX)
        .max(lo);
    Duration::from_micros(rng.random_range(lo..=hi))
}

pub(super) fn log(msg: fmt::Arguments<'_>) {
    eprintln!("wslb agent: {msg}");
}

pub(super) fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Why a connection ended, when it was not a requested stop.
pub(super) struct Lost {
    pub(super) reason: String,
    /// Reached `registered` on this connection (only then is it "lost" in the log).
    pub(super) registered: bool,
    /// Reached `registered` and stayed up a full heartbeat: the back-off starts over.
    pub(super) stable: bool,
    /// Refused with `replaced` or `guid_in_use`: another process holds this guid; retry
    /// slowly rather than evicting it every 100 ms.
    pub(super) slow: bool,
}

impl Lost {
    pub(super) fn new(reason: impl Into<String>) -> Self {
        Lost {
            reason: reason.into(),
            registered: false,
            stable: false,
            slow: false,
        }
    }
}

/// `Ok(())` for a write that went out or is queued behind a full socket buffer (the next
/// flush retries it); anything else loses the link.
pub(super) fn sent(r: tungstenite::Result<()>) -> Result<(), Lost> {
    match r {
        Ok(()) => Ok(()),
        Err(tungstenite::Error::Io(e)) if would_block(&e) => Ok(()),
        Err(e) => Err(Lost::new(format!("write failed: {e}"))),
    }
}

/// One balancer link, owned by its thread.
pub(super) struct Link {
    pub(super) index: usize,
    pub(super) target: Target,
    pub(super) register: String,
    pub(super) auth: Option<HeaderValue>,
    pub(super) guid: String,
    pub(super) tls: Option<Arc<rustls::ClientConfig>>,
    pub(super) heartbeat: Duration,
    pub(super) backoff_min: Duration,
    pub(super) backoff_max: Duration,
    pub(super) shared: Arc<Shared>,
}

/// Decrements `running` however the thread ends.
pub(super) struct Running(Arc<Shared>, usize);

impl Drop for Running {
    fn drop(&mut self) {
        let i = self.1;
        self.0.update(|b| {
            if let Some(s) = b.links.get_mut(i) {
                *s = LinkState::Stopped;
            }
            b.running = b.running.saturating_sub(1);
        });
    }
}

pub(super) type Ws = WebSocket<LinkStream>;

/// The control connection: plain TCP or TLS (rustls, blocking with timeouts).
pub(super) enum LinkStream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl LinkStream {
    pub(super) fn tcp(&self) -> &TcpStream {
        match self {
            LinkStream::Plain(s) => s,
            LinkStream::Tls(t) => &t.sock,
        }
    }
}

impl io::Read for LinkStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            LinkStream::Plain(s) => s.read(buf),
            LinkStream::Tls(t) => t.read(buf),
        }
    }
}

impl io::Write for LinkStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            LinkStream::Plain(s) => s.write(buf),
            LinkStream::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            LinkStream::Plain(s) => s.flush(),
            LinkStream::Tls(t) => t.flush(),
        }
    }
}

impl Link {
    pub(super) fn run(self) {
        let _running = Running(Arc::clone(&self.shared), self.index);
        let mut rng = SmallRng::from_os_rng();
        let mut ceiling = self.backoff_min;
        let url = &self.target.url;
        while !self.stopping() {
            self.set_state(LinkState::Connecting);
            let lost = match self.connect() {
                Err(reason) => Lost::new(reason),
                Ok(ws) => match self.session(ws) {
                    Ok(()) => break,
                    Err(lost) => lost,
                },
            };
            if lost.stable {
                ceiling = self.backoff_min;
            }
            if lost.slow {
                ceiling = self.backoff_max;
            }
            let delay = jittered(&mut rng, self.backoff_min, ceiling);
            self.set_state(LinkState::Backoff);
            log(format_args!(
                "{url}{} {}; retrying in {:.1}s",
                if lost.registered { " lost:" } else { ":" },
                lost.reason,
                delay.as_secs_f64()
            ));
            ceiling = next_ceiling(ceiling, self.backoff_max);
            if self.sleep_unless_stopped(delay) {
                break;
            }
        }
    }

    pub(super) fn stopping(&self) -> bool {
        self.shared.lock().stop
    }

    pub(super) fn drain_wanted(&self) -> bool {
        self.shared.lock().drain
    }

    pub(super) fn set_state(&self, s: LinkState) {
        self.shared.update(|b| {
            if let Some(slot) = b.links.get_mut(self.index) {
                *slot = s;
            }
        });
    }

    pub(super) fn set_drained(&self, drained: bool) {
        self.shared.update(|b| {
            if let Some(slot) = b.drained.get_mut(self.index) {
                *slot = drained;
            }
        });
    }

    /// Waits `d`; `true` if a stop was requested meanwhile (the wait ends at once).
    pub(super) fn sleep_unless_stopped(&self, d: Duration) -> bool {
        let board = self.shared.lock();
        let (board, _) = self
            .shared
            .changed
            .wait_timeout_while(board, d, |b| !b.stop)
            .unwrap_or_else(PoisonError::into_inner);
        board.stop
    }

    /// TCP connect (each resolved address in turn) and the WebSocket upgrade.
    pub(super) fn connect(&self) -> Result<Ws, String> {
        let t = &self.target;
        let addrs = (t.host.as_str(), t.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", t.host))?;
        let mut last = format!("{} resolves to no address", t.host);
        let mut stream = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = format!("connect to {a}: {e}"),
            }
        }
        let stream = stream.ok_or(last)?;
        let setup = |s: &TcpStream| -> io::Result<()> {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
            s.set_write_timeout(Some(WRITE_TIMEOUT))
        };
        setup(&stream).map_err(|e| format!("socket setup: {e}"))?;
        let stream = match (&self.tls, t.tls) {
            (Some(cfg), true) => {
                let name = rustls::pki_types::ServerName::try_from(t.host.clone())
                    .map_err(|e| format!("bad TLS name {}: {e}", t.host))?;
                let conn = rustls::ClientConnection::new(cfg.clone(), name)
                    .map_err(|e| format!("tls setup: {e}"))?;
                LinkStream::Tls(Box::new(rustls::StreamOwned::new(conn, stream)))
            }
            (None, true) => return Err("no TLS configuration for a wss:// balancer".into()),
            (_, false) => LinkStream::Plain(stream),
        };
        let mut req = t
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| format!("bad request: {e}"))?;
        if let Some(auth) = &self.auth {
            req.headers_mut().insert(AUTHORIZATION, auth.clone());
        }
        let config = WebSocketConfig::default()
            .max_message_size(Some(protocol::MAX_MESSAGE))
            .max_frame_size(Some(protocol::MAX_MESSAGE));
        let ws = match tungstenite::client::client_with_config(req, stream, Some(config)) {
            Ok((ws, _)) => ws,
            Err(HandshakeError::Interrupted(_)) => return Err("handshake timed out".into()),
            Err(HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                return Err(match resp.status().as_u16() {
                    401 => {
                        "unauthorized: the balancer refused the token (set --token or WSLB_TOKEN)"
                            .to_string()
                    }
                    403 => "forbidden: a balancer without a token accepts loopback only".into(),
                    404 => "not found: wrong control path (expected /register)".into(),
                    s => format!("upgrade refused with HTTP {s}"),
                })
            }
            Err(HandshakeError::Failure(e)) => return Err(format!("handshake failed: {e}")),
        };
        let tick = (self.heartbeat / 2).min(MAX_TICK);
        ws.get_ref()
            .tcp()
            .set_read_timeout(Some(tick))
            .map_err(|e| format!("socket setup: {e}"))?;
        Ok(ws)
    }

    /// Registers and keeps the link alive. `Ok(())` = stopped on request.
    pub(super) fn session(&self, ws: Ws) -> Result<(), Lost> {
        let mut inflight = Vec::new();
        let result = self.session_loop(ws, &mut inflight);
        self.fail_pending(&mut inflight);
        result
    }

    pub(super) fn session_loop(&self, mut ws: Ws, inflight: &mut Vec<u64>) -> Result<(), Lost> {
        sent(ws.send(Message::text(self.register.as_str())))?;
        let opened = Instant::now();
        let mut last_rx = opened;
        let mut next_ping = opened + self.heartbeat;
        let mut registered_at: Option<Instant> = None;
        let mut drain_sent = false;
        let mut close_reason: Option<String> = None;
        let window = self.heartbeat * MISSED_HEARTBEATS;
        let result = loop {
            match ws.read() {
                Ok(msg) => {
                    last_rx = Instant::now();
                    match msg {
                        Message::Text(t) => {
                            if let Some(a) = crate::control::messaging::parse_answer(&t) {
                                self.on_answer(a, inflight);
                            } else if let Err(lost) = self.on_message(&t, &mut registered_at) {
                                break Err(lost);
                            }
                        }
                        Message::Close(frame) => {
                            // tungstenite answers the close; the next read ends the loop.
                            close_reason = Some(match frame {
                                Some(f) => {
                                    format!("closed by the balancer ({} {})", f.code, f.reason)
                                }
                                None => "closed by the balancer".into(),
                            });
                        }
                        _ => {}
                    }
                }
                Err(tungstenite::Error::Io(e)) if would_block(&e) => {}
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    break Err(Lost::new(
                        close_reason
                            .take()
                            .unwrap_or_else(|| "closed by the balancer".into()),
                    ));
                }
                Err(e) => break Err(Lost::new(e.to_string())),
            }
            let now = Instant::now();
            if registered_at.is_some() && !drain_sent && self.drain_wanted() {
                drain_sent = true;
                if let Err(lost) =
                    sent(ws.send(Message::text(protocol::encode(&BackendMsg::Drain))))
                {
                    break Err(lost);
                }
            }
            if self.stopping() {
                self.goodbye(&mut ws, registered_at.is_some());
                return Ok(());
            }
            if registered_at.is_some() {
                if let Err(lost) = self.write_outbox(&mut ws, inflight) {
                    break Err(lost);
                }
            }
            if now.duration_since(last_rx) >= window {
                break Err(Lost::new(format!(
                    "no frame from the balancer for {:.1}s",
                    window.as_secs_f64()
                )));
            }
            if registered_at.is_none() && now.duration_since(opened) >= window {
                break Err(Lost::new("no answer to register"));
            }
            if now >= next_ping {
                next_ping = now + self.heartbeat;
                // Dispatch mode's count rides with the heartbeat (at least one per interval).
                let load = registered_at.and(self.shared.lock().load);
                if let Some(n) = load {
                    let msg = Message::text(protocol::encode(&BackendMsg::Load(n)));
                    if let Err(lost) = sent(ws.send(msg)) {
                        break Err(lost);
                    }
                }
                if let Err(lost) = sent(ws.send(Message::Ping(Bytes::new()))) {
                    break Err(lost);
                }
            } else if let Err(lost) = sent(ws.flush()) {
                // Pushes out what a full socket buffer held back, and automatic pongs.
                break Err(lost);
            }
        };
        result.map_err(|mut lost| {
            lost.registered = registered_at.is_some();
            lost.stable = registered_at.is_some_and(|t| t.elapsed() >= self.heartbeat);
            lost
        })
    }

    pub(super) fn on_message(
        &self,
        text: &str,
        registered_at: &mut Option<Instant>,
    ) -> Result<(), Lost> {
        let url = &self.target.url;
        match parse_balancer_msg(text) {
            Some(BalancerMsg::Registered) => {
                // Only the first `registered` of a connection is a state change.
                if registered_at.is_none() {
                    *registered_at = Some(Instant::now());
                    self.set_drained(false);
                    self.set_state(LinkState::Registered);
                    log(format_args!("registered with {url} as {}", self.guid));
                }
                Ok(())
            }
            Some(BalancerMsg::Drained { clients }) => {
                match clients {
                    Some(n) => log(format_args!("draining on {url}: {n} clients to move")),
                    None => {
                        // A balancer that will not say when our clients are gone: nothing
                        // to wait for.
                        log(format_args!("draining on {url}"));
                        self.set_drained(true);
                    }
                }
                Ok(())
            }
            Some(BalancerMsg::DrainComplete) => {
                log(format_args!("drained on {url}: no client left"));
                self.set_drained(true);
                Ok(())
            }
            Some(BalancerMsg::Deregistered) | Some(BalancerMsg::Other) => Ok(()),
            Some(BalancerMsg::Unreachable { binding, reason }) => {
                log(format_args!("{url} cannot reach {binding}: {reason}"));
                Ok(())
            }
            Some(BalancerMsg::Error { code, message }) => Err(Lost {
                // Neither clears up at once: the other holder of the guid must go first.
                slow: code == "replaced" || code == "guid_in_use",
                ..Lost::new(format!("refused: {code}: {message}"))
            }),
            None => {
                log(format_args!("{url} sent an unreadable message; ignored"));
                Ok(())
            }
        }
    }

    /// Best effort: `deregister` (after an owed `drain`), wait for its answer, close 1000.
    pub(super) fn goodbye(&self, ws: &mut Ws, registered: bool) {
        let deadline = Instant::now() + GOODBYE_TIMEOUT;
        let url = &self.target.url;
        if registered {
            if sent(ws.send(Message::text(protocol::encode(&BackendMsg::Deregister)))).is_err() {
                return;
            }
            while Instant::now() < deadline {
                match ws.read() {
                    Ok(Message::Text(t)) => {
                        if parse_balancer_msg(&t) == Some(BalancerMsg::Deregistered) {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e)) if would_block(&e) => {}
                    // The balancer closes after `deregistered`; nothing more to do.
                    Err(_) => {
                        log(format_args!("deregistered from {url}"));
                        return;
                    }
                }
            }
        }
        let close = CloseFrame {
            code: CloseCode::Normal,
            reason: "stopping".into(),
        };
        if ws.close(Some(close)).is_ok() {
            while Instant::now() < deadline {
                match ws.read() {
                    Err(tungstenite::Error::Io(e)) if would_block(&e) => {}
                    Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        if registered {
            log(format_args!("deregistered from {url}"));
        }
    }
}
