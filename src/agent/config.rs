//! What an agent is told: balancer URLs checked and resolved, the registration it sends.

use super::*;

/// A balancer URL, checked once in [`spawn`] so link threads never fail on it.
#[derive(Debug, Clone)]
pub(super) struct Target {
    /// Normalised URL (path defaults to `/register`), used in logs and the request.
    pub(super) url: String,
    /// Host without IPv6 brackets, resolved by the link thread on each attempt (a balancer
    /// that moves to a new address is found again).
    pub(super) host: String,
    pub(super) port: u16,
    /// `wss://`: TLS to the balancer's control listener.
    pub(super) tls: bool,
}

pub(super) fn parse_balancer(url: &str) -> Result<Target, AgentError> {
    let bad = |why| AgentError::Balancer {
        url: url.to_string(),
        why,
    };
    let uri: Uri = url
        .parse()
        .map_err(|_| bad("expected ws://HOST:PORT/register"))?;
    match uri.scheme_str() {
        Some("ws") => {}
        Some("wss") => {}
        _ => return Err(bad("expected a ws:// or wss:// URL")),
    }
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad("missing host"))?;
    let tls = uri.scheme_str() == Some("wss");
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    if port == 0 {
        return Err(bad("port must be 1-65535"));
    }
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
    if authority.contains('@') {
        return Err(bad(
            "credentials in the URL are not supported; use the token",
        ));
    }
    // The balancer answers 404 on any other path; a bare `ws://host:port` means the default.
    let path = match uri.path_and_query().map(|p| p.as_str()) {
        None | Some("") | Some("/") => "/register",
        Some(p) => p,
    };
    Ok(Target {
        url: format!("{}://{authority}{path}", if tls { "wss" } else { "ws" }),
        tls,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
    })
}

pub(super) fn valid_guid(g: &str) -> bool {
    (1..=128).contains(&g.len())
        && g.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// Everything a link thread needs, prepared once.
pub(super) struct Prepared {
    pub(super) targets: Vec<Target>,
    /// Client TLS configuration, when a balancer is `wss://`.
    pub(super) tls: Option<Arc<rustls::ClientConfig>>,
    /// The encoded `register` message, identical on every link and every attempt.
    pub(super) register: String,
    pub(super) auth: Option<HeaderValue>,
}

/// Checks `cfg` as [`spawn`] would, without starting anything.
pub fn validate(cfg: &AgentConfig) -> Result<(), AgentError> {
    prepare(cfg).map(|_| ())
}

/// The registration as sent, checked with the balancer's own decoder, which is the final
/// word: never send what it would refuse.
fn encode_checked(msg: &BackendMsg) -> Result<String, AgentError> {
    let register = protocol::encode(msg);
    match protocol::decode(&register) {
        Ok(BackendMsg::Register(_)) => Ok(register),
        Ok(_) => Err(AgentError::Registration(
            "register encodes as another message",
        )),
        Err(protocol::ControlError::BadField(why)) => Err(AgentError::Registration(why)),
        Err(protocol::ControlError::TooLarge) => {
            Err(AgentError::Registration("registration larger than 64 KiB"))
        }
        Err(_) => Err(AgentError::Registration(
            "registration refused by the codec",
        )),
    }
}

pub(super) fn prepare(cfg: &AgentConfig) -> Result<Prepared, AgentError> {
    if cfg.balancers.is_empty() {
        return Err(AgentError::NoBalancer);
    }
    let targets = cfg
        .balancers
        .iter()
        .map(|b| parse_balancer(b))
        .collect::<Result<Vec<_>, _>>()?;
    if cfg.bindings.is_empty() || cfg.bindings.len() > MAX_BINDINGS {
        return Err(AgentError::BindingCount);
    }
    let addrs = cfg
        .bindings
        .iter()
        .map(|b| {
            protocol::binding_addr(b).map_err(|why| AgentError::Binding {
                url: b.clone(),
                why,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !valid_guid(&cfg.guid) {
        return Err(AgentError::Guid);
    }
    if !(1..=1000).contains(&cfg.weight) {
        return Err(AgentError::Weight);
    }
    if cfg.tags.len() > MAX_TAGS {
        return Err(AgentError::Tags);
    }
    if cfg.heartbeat.is_zero() {
        return Err(AgentError::Timing("heartbeat must be greater than zero"));
    }
    if cfg.backoff_min.is_zero() || cfg.backoff_min > cfg.backoff_max {
        return Err(AgentError::Timing(
            "back-off must satisfy 0 < backoff_min <= backoff_max",
        ));
    }
    let auth = match &cfg.token {
        None => None,
        Some(t) => {
            let mut v =
                HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| AgentError::Token)?;
            // Keeps the token out of any Debug output of the request.
            v.set_sensitive(true);
            Some(v)
        }
    };
    let msg = BackendMsg::Register(Registration {
        guid: cfg.guid.clone(),
        bindings: cfg.bindings.clone(),
        addrs,
        weight: cfg.weight,
        max_connections: cfg.max_connections,
        tags: cfg.tags.clone(),
        proxy_protocol: cfg.proxy_protocol,
        public_bindings: cfg.public_bindings.clone(),
    });
    let register = encode_checked(&msg)?;
    let tls = if targets.iter().any(|t| t.tls) {
        let cfg = crate::net::tls::client_config(cfg.balancer_ca.as_deref(), false)
            .map_err(|e| AgentError::Tls(e.to_string()))?;
        Some(cfg)
    } else {
        None
    };
    Ok(Prepared {
        targets,
        tls,
        register,
        auth,
    })
}
