//! The command line: every flag's help line (`options`) and reading them into a
//! [`Config`] (`parse_args`), by groups.

use super::*;

fn options() -> getopts::Options {
    let mut o = getopts::Options::new();
    o.optmulti(
        "l",
        "listen",
        "proxy listener address (repeatable) [default: 127.0.0.1:8080]",
        "ADDR",
    );
    o.optmulti(
        "B",
        "backend",
        "static backend ws://host:port or http://host:port, optional ,weight=N (repeatable)",
        "URL",
    );
    o.optopt(
        "a",
        "algorithm",
        "fewest | random | round-robin | p2c [default: fewest]",
        "ALG",
    );
    o.optopt(
        "",
        "protocols",
        "which client protocols to serve: ws,http [default: ws,http]",
        "LIST",
    );
    o.optopt(
        "",
        "header-timeout",
        "whole request head must arrive within this [default: 10s]",
        "DUR",
    );
    o.optopt(
        "",
        "connect-timeout",
        "backend connect deadline [default: 3s]",
        "DUR",
    );
    o.optopt(
        "",
        "idle-timeout",
        "idle keep-alive / stalled HTTP exchange deadline [default: 60s]",
        "DUR",
    );
    o.optopt(
        "",
        "drain-timeout",
        "after SIGTERM, WebSocket clients get close 1001 spread over this [default: 10s]",
        "DUR",
    );
    o.optopt(
        "",
        "backend-drain-window",
        "a drained backend's WebSocket clients get close 1012 spread over this; off = they stay until they leave [default: 60s]",
        "DUR|off",
    );
    o.optopt(
        "",
        "rebalance",
        "close up to RATE WebSockets per second (1012) from the most loaded backends while loads per weight are over 20% apart [default: off]",
        "RATE",
    );
    o.optopt(
        "",
        "max-connections",
        "client connections held at once; 0 = as many as the descriptor limit allows [default: 0]",
        "N",
    );
    o.optopt(
        "",
        "max-frame-size",
        "largest WebSocket frame payload relayed (close 1009 beyond), e.g. 16MiB; frames are streamed, so this is a policy, not a memory bound [default: off]",
        "SIZE",
    );
    o.optopt(
        "",
        "max-connections-per-ip",
        "client connections from one IP address; more get 429 [default: unlimited]",
        "N",
    );
    o.optopt(
        "",
        "max-memory",
        "memory budget for relay buffers; lowers --max-connections to fit, e.g. 256MiB [default: none]",
        "SIZE",
    );
    o.optmulti(
        "",
        "allowed-origin",
        "Origin allowed to open WebSockets, e.g. https://app.example (repeatable; others get 403) [default: any]",
        "ORIGIN",
    );
    o.optopt(
        "",
        "throttle",
        "bytes per second relayed per connection and direction, e.g. 64KiB [default: unlimited]",
        "SIZE",
    );
    o.optopt(
        "",
        "backlog",
        "listen backlog: connections the kernel queues before accept [default: 1024]",
        "N",
    );
    o.optopt(
        "",
        "min-body-rate",
        "request bodies slower than this over 10 s get 408, e.g. 1KiB; 0 = off [default: 256]",
        "SIZE",
    );
    o.optflag(
        "",
        "inspect",
        "reassemble client WebSocket messages for hooks and client_message events (costs a copy)",
    );
    o.optopt(
        "",
        "sticky",
        "sticky sessions: cookie[:NAME] | ip | header:NAME [default: off]",
        "MODE",
    );
    o.optopt(
        "",
        "sticky-secret",
        "HMAC secret for sticky cookies, shared by all balancers (or env WSLB_STICKY_SECRET) [default: random per process]",
        "SECRET",
    );
    o.optopt(
        "",
        "dispatch-path",
        "answer there with a backend's public binding (JSON, ?redirect=1, or WebSocket) instead of proxying [default: off]",
        "PATH",
    );
    o.optopt(
        "",
        "dispatch-secret",
        "sign dispatched URLs with an HMAC ticket (or env WSLB_DISPATCH_SECRET) [default: no ticket]",
        "SECRET",
    );
    o.optopt(
        "",
        "dispatch-ttl",
        "lifetime of a dispatch answer and its ticket [default: 60s]",
        "DUR",
    );
    o.optopt(
        "",
        "sticky-max-age",
        "lifetime of sticky cookies [default: 24h]",
        "DUR",
    );
    o.optopt(
        "",
        "ws-ping",
        "ping WebSocket clients at this interval; 3 unanswered = closed [default: off]",
        "DUR",
    );
    o.optopt(
        "",
        "events",
        "write one JSON event per line (connect, pair, disconnect, server ready, ...) to FILE or - for stdout [default: off]",
        "FILE",
    );
    o.optopt(
        "",
        "ws-idle-timeout",
        "close WebSockets silent this long both ways (close 1001) [default: never]",
        "DUR",
    );
    o.optmulti(
        "",
        "tls-listen",
        "TLS proxy listener address (repeatable; needs --cert/--key) [default: none]",
        "ADDR",
    );
    o.optmulti(
        "",
        "cert",
        "PEM certificate chain; pairs with the --key at the same position; several pairs are chosen by SNI, the first is the default (repeatable)",
        "FILE",
    );
    o.optmulti(
        "",
        "key",
        "PEM private key for the --cert at the same position (repeatable)",
        "FILE",
    );
    o.optopt(
        "",
        "backend-ca",
        "CA certificates (PEM) to verify wss:// and https:// backends [default: platform roots]",
        "FILE",
    );
    o.optflag(
        "",
        "backend-insecure",
        "do not verify backend certificates (development only)",
    );
    o.optflag(
        "",
        "control-tls",
        "serve the control listener over TLS with the --cert/--key pairs",
    );
    o.optopt(
        "",
        "control",
        "listener for backend self-registration at /register [default: off]",
        "ADDR",
    );
    o.optopt(
        "",
        "token",
        "bearer token backends must present (or env WSLB_TOKEN) [default: none = loopback only]",
        "TOKEN",
    );
    o.optopt(
        "",
        "heartbeat",
        "control ping interval; 3 missed = backend lost [default: 5s]",
        "DUR",
    );
    o.optopt(
        "",
        "on-backend-lost",
        "keep | close: client connections of a backend whose control connection is lost [default: keep]",
        "WHAT",
    );
    security_options(&mut o);
    upgrade_options(&mut o);
    messaging_options(&mut o);
    o.optopt("", "log-format", "text | json [default: text]", "FMT");
    o.optflag("q", "quiet", "log errors only");
    o.optflag("v", "verbose", "log every connection");
    o.optflag("h", "help", "print this help and exit");
    o.optflag("V", "version", "print the version and exit");
    o.optflag(
        "",
        "check",
        "validate flags, certificates and files, then exit without listening (for ExecStartPre)",
    );
    o
}

/// Parses `args` (without the program name).
pub fn parse_args<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<Command, ConfigError> {
    let opts = options();
    let m = opts
        .parse(args)
        .map_err(|e| ConfigError::Usage(e.to_string()))?;
    if m.opt_present("help") {
        return Ok(Command::Help(opts.usage(
            "Usage: wslb [OPTIONS]\n\nA WebSocket + HTTP/1.1 load balancer.",
        )));
    }
    if m.opt_present("version") {
        return Ok(Command::Version);
    }
    if let Some(extra) = m.free.first() {
        return Err(ConfigError::Usage(format!("unexpected argument {extra:?}")));
    }
    let mut cfg = Config::default();
    pool_flags(&m, &mut cfg)?;
    tls_and_control_flags(&m, &mut cfg)?;
    timing_flags(&m, &mut cfg)?;
    limit_flags(&m, &mut cfg)?;
    session_flags(&m, &mut cfg)?;
    security_flags(&m, &mut cfg)?;
    messaging_flags(&m, &mut cfg.messaging)?;
    output_flags(&m, &mut cfg)?;
    Ok(Command::Run(Box::new(cfg)))
}

/// Listeners, static backends, the algorithm, the protocols served.
fn pool_flags(m: &getopts::Matches, cfg: &mut Config) -> Result<(), ConfigError> {
    let listen = m.opt_strs("listen");
    if listen.is_empty() && m.opt_present("tls-listen") {
        // A TLS-only balancer should not also open the default plain port.
        cfg.listen.clear();
    }
    if !listen.is_empty() {
        cfg.listen = listen
            .iter()
            .map(|v| parse_addr(v).map_err(|why| bad("--listen", v, why)))
            .collect::<Result<_, _>>()?;
    }
    for v in m.opt_strs("backend") {
        cfg.backends
            .push(parse_backend(&v).map_err(|why| bad("--backend", &v, why))?);
    }
    if let Some(v) = m.opt_str("algorithm") {
        cfg.algorithm = v.parse().map_err(|_| {
            bad(
                "--algorithm",
                &v,
                "expected fewest, random, round-robin or p2c",
            )
        })?;
    }
    if let Some(v) = m.opt_str("protocols") {
        let (ws, http) = parse_protocols(&v).map_err(|why| bad("--protocols", &v, why))?;
        cfg.websocket = ws;
        cfg.http = http;
    }
    Ok(())
}

/// TLS (certificates, backend verification) and the control listener.
fn tls_and_control_flags(m: &getopts::Matches, cfg: &mut Config) -> Result<(), ConfigError> {
    for v in m.opt_strs("tls-listen") {
        cfg.tls_listen
            .push(parse_addr(&v).map_err(|why| bad("--tls-listen", &v, why))?);
    }
    let (certs, keys) = (m.opt_strs("cert"), m.opt_strs("key"));
    if certs.len() != keys.len() {
        return Err(ConfigError::Usage(format!(
            "--cert and --key must come in pairs ({} --cert, {} --key)",
            certs.len(),
            keys.len()
        )));
    }
    cfg.certs = certs
        .into_iter()
        .zip(keys)
        .map(|(cert, key)| crate::net::tls::CertPair {
            cert: cert.into(),
            key: key.into(),
        })
        .collect();
    cfg.backend_ca = m.opt_str("backend-ca").map(Into::into);
    cfg.backend_insecure = m.opt_present("backend-insecure");
    cfg.control_tls = m.opt_present("control-tls");
    if cfg.certs.is_empty() && (!cfg.tls_listen.is_empty() || cfg.control_tls) {
        return Err(ConfigError::Usage(
            "--tls-listen and --control-tls need at least one --cert/--key pair".into(),
        ));
    }
    if let Some(v) = m.opt_str("control") {
        cfg.control = Some(parse_addr(&v).map_err(|why| bad("--control", &v, why))?);
    }
    if let Some(v) = m.opt_str("token") {
        if v.is_empty() || v.len() > 4096 {
            return Err(bad("--token", "", "expected 1-4096 characters"));
        }
        cfg.token = Some(v);
    }
    if let Some(v) = m.opt_str("on-backend-lost") {
        cfg.on_backend_lost = match v.as_str() {
            "keep" => OnBackendLost::Keep,
            "close" => OnBackendLost::Close,
            _ => return Err(bad("--on-backend-lost", &v, "expected keep or close")),
        };
    }
    Ok(())
}

/// Deadlines, drain windows, rebalancing, pings.
fn timing_flags(m: &getopts::Matches, cfg: &mut Config) -> Result<(), ConfigError> {
    let durations: [(&'static str, &mut Duration); 5] = [
        ("header-timeout", &mut cfg.header_timeout),
        ("connect-timeout", &mut cfg.connect_timeout),
        ("idle-timeout", &mut cfg.idle_timeout),
        ("drain-timeout", &mut cfg.drain_timeout),
        ("heartbeat", &mut cfg.heartbeat),
    ];
    for (name, slot) in durations {
        if let Some(v) = m.opt_str(name) {
            *slot = parse_duration(&v).map_err(|why| bad(flag_name(name), &v, why))?;
        }
    }
    if let Some(v) = m.opt_str("backend-drain-window") {
        cfg.backend_drain_window = if v.trim().eq_ignore_ascii_case("off") {
            None
        } else {
            Some(parse_duration(&v).map_err(|why| bad("--backend-drain-window", &v, why))?)
        };
    }
    if let Some(v) = m.opt_str("rebalance") {
        cfg.rebalance = if v.trim().eq_ignore_ascii_case("off") {
            0
        } else {
            v.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    bad(
                        "--rebalance",
                        &v,
                        "expected connections per second (a positive integer) or off",
                    )
                })?
        };
    }
    Ok(())
}

/// Connection, frame, memory, origin, rate and backlog limits.
fn limit_flags(m: &getopts::Matches, cfg: &mut Config) -> Result<(), ConfigError> {
    if let Some(v) = m.opt_str("max-connections") {
        // 0 = as many as the descriptor limit allows (the default).
        cfg.max_connections = v.parse::<usize>().map_err(|_| {
            bad(
                "--max-connections",
                &v,
                "expected a number (0 = from the descriptor limit)",
            )
        })?;
    }
    if let Some(v) = m.opt_str("max-frame-size") {
        cfg.max_frame_size = if v.trim().eq_ignore_ascii_case("off") {
            u64::MAX
        } else {
            parse_size(&v).map_err(|why| bad("--max-frame-size", &v, why))?
        };
    }
    if let Some(v) = m.opt_str("max-connections-per-ip") {
        cfg.max_connections_per_ip = v.parse::<u32>().ok().filter(|n| *n > 0).ok_or_else(|| {
            bad(
                "--max-connections-per-ip",
                &v,
                "expected a positive integer",
            )
        })?;
    }
    if let Some(v) = m.opt_str("max-memory") {
        let budget = parse_size(&v).map_err(|why| bad("--max-memory", &v, why))?;
        // Worst case per connection: a buffer per direction plus state and kernel-side
        // bookkeeping we do not control; the pool is small and counted in.
        let per_conn = 2 * crate::net::buffer::BUF_SIZE as u64 + 2048;
        let fits = budget / per_conn;
        if fits < 1 {
            return Err(bad("--max-memory", &v, "too small for even one connection"));
        }
        let fits = usize::try_from(fits).unwrap_or(usize::MAX);
        cfg.max_connections = match cfg.max_connections {
            0 => fits,
            n => n.min(fits),
        };
    }
    for v in m.opt_strs("allowed-origin") {
        let ok = (v.starts_with("http://") || v.starts_with("https://") || v == "null")
            && v.len() <= 256
            && v.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(bad(
                "--allowed-origin",
                &v,
                "expected an origin like https://app.example",
            ));
        }
        cfg.allowed_origins
            .push(v.trim_end_matches('/').to_string());
    }
    if let Some(v) = m.opt_str("throttle") {
        let s = v.strip_suffix("/s").unwrap_or(&v);
        cfg.throttle = parse_size(s).map_err(|why| bad("--throttle", &v, why))?;
    }
    if let Some(v) = m.opt_str("backlog") {
        cfg.backlog = v
            .parse::<i32>()
            .ok()
            .filter(|n| (1..=65535).contains(n))
            .ok_or_else(|| bad("--backlog", &v, "expected an integer from 1 to 65535"))?;
    }
    if let Some(v) = m.opt_str("min-body-rate") {
        cfg.min_body_rate = if v == "0" {
            0
        } else {
            parse_size(v.strip_suffix("/s").unwrap_or(&v))
                .map_err(|why| bad("--min-body-rate", &v, why))?
        };
    }
    Ok(())
}

/// Sticky sessions, WebSocket idle timeout, binary upgrade and backends file.
fn session_flags(m: &getopts::Matches, cfg: &mut Config) -> Result<(), ConfigError> {
    if let Some(v) = m.opt_str("ws-ping") {
        cfg.ws_ping = Some(parse_duration(&v).map_err(|why| bad("--ws-ping", &v, why))?);
    }
    if let Some(v) = m.opt_str("sticky") {
        cfg.sticky = Some(parse_mode(&v).map_err(|why| bad("--sticky", &v, why))?);
    }
    if let Some(v) = m.opt_str("sticky-secret") {
        if v.len() < 16 {
            return Err(bad("--sticky-secret", "", "use at least 16 characters"));
        }
        cfg.sticky_secret = Some(v);
    }
    if let Some(v) = m.opt_str("dispatch-path") {
        check_dispatch_path(&v).map_err(|why| bad("--dispatch-path", &v, why))?;
        cfg.dispatch_path = Some(v);
    }
    if let Some(v) = m.opt_str("dispatch-secret") {
        if v.len() < 16 {
            return Err(bad("--dispatch-secret", "", "use at least 16 characters"));
        }
        cfg.dispatch_secret = Some(v);
    }
    if let Some(v) = m.opt_str("dispatch-ttl") {
        cfg.dispatch_ttl = parse_duration(&v).map_err(|why| bad("--dispatch-ttl", &v, why))?;
    }
    if let Some(v) = m.opt_str("sticky-max-age") {
        cfg.sticky_max_age = parse_duration(&v).map_err(|why| bad("--sticky-max-age", &v, why))?;
    }
    if let Some(v) = m.opt_str("ws-idle-timeout") {
        cfg.ws_idle_timeout =
            Some(parse_duration(&v).map_err(|why| bad("--ws-idle-timeout", &v, why))?);
    }
    cfg.upgrade_socket = m.opt_str("upgrade-socket").map(Into::into);
    cfg.takeover = m.opt_str("takeover").map(Into::into);
    cfg.backends_file = m.opt_str("backends-file").map(Into::into);
    Ok(())
}

/// Events, logs, `--check`.
fn output_flags(m: &getopts::Matches, cfg: &mut Config) -> Result<(), ConfigError> {
    cfg.events = m.opt_str("events");
    cfg.inspect = m.opt_present("inspect");
    if let Some(v) = m.opt_str("log-format") {
        cfg.log_format = match v.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => return Err(bad("--log-format", &v, "expected text or json")),
        };
    }
    cfg.check = m.opt_present("check");
    cfg.verbosity = match (m.opt_present("quiet"), m.opt_present("verbose")) {
        (true, true) => return Err(ConfigError::Usage("-q and -v exclude each other".into())),
        (true, false) => 0,
        (false, true) => 2,
        (false, false) => 1,
    };
    Ok(())
}

/// Binary upgrade without a refused connection (README, "Upgrading").
fn upgrade_options(o: &mut getopts::Options) {
    o.optopt(
        "",
        "upgrade-socket",
        "listen on this Unix socket for a new wslb started with --takeover; SIGUSR2 starts one itself (same binary path and flags) through a temporary socket [default: SIGUSR2 only]",
        "PATH",
    );
    o.optopt(
        "",
        "backends-file",
        "static backends, one -B value per line (URL[,weight=N,max_connections=M], # comments), added to the -B ones and re-read on SIGHUP; run-time changes made through the admin API do not survive a restart, this file does [default: none]",
        "FILE",
    );
    o.optopt(
        "",
        "takeover",
        "take the listening sockets of the wslb at this --upgrade-socket; it stops accepting and drains once this one serves",
        "PATH",
    );
}

/// Issue 15's flags, in one block: each relaxes a default, none tightens another flag.
fn security_options(o: &mut getopts::Options) {
    o.optmulti(
        "",
        "backend-allow",
        "registered bindings may also point into this block, e.g. 10.0.0.0/8 (repeatable) [default: only the registering peer's own address]",
        "CIDR",
    );
    o.optmulti(
        "",
        "trusted-proxy",
        "keep X-Forwarded-For/Forwarded from peers in this block, e.g. 10.0.0.0/8; with --proxy-protocol, the peers allowed to send the PROXY header (repeatable) [default: none, they are replaced]",
        "CIDR",
    );
    o.optflag(
        "",
        "proxy-protocol",
        "listeners expect a PROXY protocol v1/v2 header (from an L4 balancer) before anything else, from --trusted-proxy peers only; its source address is the client's",
    );
    o.optflag(
        "",
        "forwarded",
        "send RFC 7239 Forwarded: for=... instead of X-Forwarded-For",
    );
    o.optopt(
        "",
        "token-file",
        "per-backend tokens, one `guid token` per line; a token registers only its guid; re-read on SIGHUP",
        "FILE",
    );
    o.optopt(
        "",
        "control-client-ca",
        "with --control-tls: verify client certificates against this CA (PEM); a certificate's first DNS name is the only guid it may register",
        "FILE",
    );
}

fn security_flags(m: &getopts::Matches, cfg: &mut Config) -> Result<(), ConfigError> {
    for v in m.opt_strs("backend-allow") {
        cfg.backend_allow
            .push(crate::netpolicy::parse_cidr(&v).map_err(|why| bad("--backend-allow", &v, why))?);
    }
    for v in m.opt_strs("trusted-proxy") {
        cfg.trusted_proxies
            .push(crate::netpolicy::parse_cidr(&v).map_err(|why| bad("--trusted-proxy", &v, why))?);
    }
    cfg.forwarded = m.opt_present("forwarded");
    cfg.proxy_protocol = m.opt_present("proxy-protocol");
    if cfg.proxy_protocol && cfg.trusted_proxies.is_empty() {
        // Without a trusted peer every connection would be refused.
        return Err(ConfigError::Usage(
            "--proxy-protocol needs --trusted-proxy CIDR (the L4 balancers allowed to send the header)".into(),
        ));
    }
    cfg.token_file = m.opt_str("token-file").map(Into::into);
    cfg.control_client_ca = m.opt_str("control-client-ca").map(Into::into);
    if cfg.control_client_ca.is_some() && !cfg.control_tls {
        return Err(ConfigError::Usage(
            "--control-client-ca needs --control-tls".into(),
        ));
    }
    Ok(())
}

fn messaging_options(o: &mut getopts::Options) {
    o.optopt(
        "",
        "client-id-header",
        "header carrying the client's id (INSTANCE.N) to backends; the same header from clients is removed; `off` disables [default: X-Wslb-Client]",
        "NAME",
    );
    o.optopt(
        "",
        "instance-id",
        "this balancer's prefix of client ids, 1-32 of A-Z a-z 0-9 - _ [default: random]",
        "ID",
    );
    o.optopt(
        "",
        "message-max",
        "largest payload a backend may broadcast or send, at most 1MiB [default: 64KiB]",
        "SIZE",
    );
    o.optopt(
        "",
        "message-rate",
        "messaging requests per second per backend (bursts as large); 0 = unlimited [default: 1000]",
        "N",
    );
    o.optopt(
        "",
        "client-queue-max",
        "bytes of balancer frames queued for one client before it is closed with 1013, at most 1MiB [default: 1MiB]",
        "SIZE",
    );
    o.optopt(
        "",
        "backend-messages",
        "all | own | off: which clients a registered backend may message [default: all]",
        "WHO",
    );
}

fn messaging_flags(m: &getopts::Matches, msg: &mut Messaging) -> Result<(), ConfigError> {
    const CEILING: u64 = MESSAGE_MAX_CEILING as u64;
    if let Some(v) = m.opt_str("client-id-header") {
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        msg.client_id_header = match v.as_str() {
            "off" => None,
            name if !name.is_empty() && name.len() <= 64 && name.bytes().all(token) => {
                Some(name.to_string())
            }
            _ => {
                return Err(bad(
                    "--client-id-header",
                    &v,
                    "expected a header name (1-64 token characters) or off",
                ))
            }
        };
    }
    if let Some(v) = m.opt_str("instance-id") {
        if !valid_instance(&v) {
            return Err(bad(
                "--instance-id",
                &v,
                "expected 1-32 characters of A-Z a-z 0-9 - _",
            ));
        }
        msg.instance_id = v;
    }
    let sizes: [(&'static str, &mut usize); 2] = [
        ("--message-max", &mut msg.max_payload),
        ("--client-queue-max", &mut msg.client_queue_max),
    ];
    for (flag, slot) in sizes {
        if let Some(v) = m.opt_str(flag.trim_start_matches('-')) {
            let n = parse_size(&v).map_err(|why| bad(flag, &v, why))?;
            if n == 0 || n > CEILING {
                return Err(bad(flag, &v, "expected a size from 1 byte to 1MiB"));
            }
            *slot = n as usize;
        }
    }
    if let Some(v) = m.opt_str("message-rate") {
        msg.rate = v
            .parse()
            .map_err(|_| bad("--message-rate", &v, "expected a number (0 = unlimited)"))?;
    }
    if let Some(v) = m.opt_str("backend-messages") {
        msg.scope = match v.as_str() {
            "all" => MessageScope::All,
            "own" => MessageScope::Own,
            "off" => MessageScope::Off,
            _ => return Err(bad("--backend-messages", &v, "expected all, own or off")),
        };
    }
    Ok(())
}

fn bad(flag: &'static str, value: &str, why: &'static str) -> ConfigError {
    ConfigError::Value {
        flag,
        value: value.to_string(),
        why,
    }
}

/// Maps a getopts long name to its `--flag` spelling for error lines.
fn flag_name(name: &str) -> &'static str {
    match name {
        "header-timeout" => "--header-timeout",
        "connect-timeout" => "--connect-timeout",
        "idle-timeout" => "--idle-timeout",
        "heartbeat" => "--heartbeat",
        _ => "--drain-timeout",
    }
}
