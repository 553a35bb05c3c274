//! Single flag values: durations, sizes, addresses, backend URLs and options, the
//! `--backends-file` lines. Pure functions, fuzzed (`config_values`).

use super::*;

/// `10s`, `500ms`, `2m`, `1h`, or a bare number of seconds. Zero is refused: every deadline
/// here protects something.
pub fn parse_duration(v: &str) -> Result<Duration, &'static str> {
    const WHY: &str = "expected a duration like 500ms, 10s, 2m or 1h";
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    if num.is_empty() || num.len() > 12 {
        return Err(WHY);
    }
    let n: u64 = num.parse().map_err(|_| WHY)?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(WHY),
    };
    if d.is_zero() {
        return Err("duration must be greater than zero");
    }
    Ok(d)
}

/// `65536`, `64KiB`, `16MiB`, `1GiB` (also `k`/`m`/`g`, `KB`/`MB`/`GB` as binary multiples).
pub fn parse_size(v: &str) -> Result<u64, &'static str> {
    const WHY: &str = "expected a size like 65536, 64KiB or 16MiB";
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    if num.is_empty() || num.len() > 15 {
        return Err(WHY);
    }
    let n: u64 = num.parse().map_err(|_| WHY)?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(WHY),
    };
    match n.checked_mul(mult) {
        Some(0) => Err("size must be greater than zero"),
        Some(s) => Ok(s),
        None => Err(WHY),
    }
}

pub fn parse_addr(v: &str) -> Result<SocketAddr, &'static str> {
    const WHY: &str = "expected host:port, e.g. 127.0.0.1:8080";
    if let Ok(a) = v.parse::<SocketAddr>() {
        return Ok(a);
    }
    // Names (localhost:8080) resolve once here, at startup.
    v.to_socket_addrs().map_err(|_| WHY)?.next().ok_or(WHY)
}

/// `ws://host:port[/path]` or `http://host:port[/path]` then optional `,weight=N`.
pub fn parse_backend(v: &str) -> Result<BackendSpec, &'static str> {
    let mut parts = v.split(',');
    let url = parts.next().unwrap_or_default().trim();
    let mut weight = 1u32;
    let mut max_connections = 0u32;
    let mut proxy = None;
    let mut public = Vec::new();
    for opt in parts {
        match opt.trim().split_once('=') {
            Some(("weight", w)) => {
                weight = match w.parse::<u32>() {
                    Ok(n) if (1..=1000).contains(&n) => n,
                    _ => return Err("weight must be an integer from 1 to 1000"),
                }
            }
            Some(("max_connections", m)) => {
                max_connections = m
                    .parse::<u32>()
                    .map_err(|_| "max_connections must be a non-negative integer")?;
            }
            Some(("proxy", v)) => {
                proxy = Some(
                    crate::net::proxy_protocol::Version::parse(v)
                        .ok_or("proxy must be v1 or v2")?,
                )
            }
            Some(("public", url)) if public.len() < super::MAX_PUBLIC_BINDINGS => {
                super::check_public_url(url.trim())?;
                public.push(url.trim().to_string());
            }
            _ => {
                return Err(
                    "unknown backend option; expected weight=N, max_connections=N, proxy=v1|v2 or public=URL",
                )
            }
        }
    }
    let authority = parse_backend_url(url)?;
    let addr = parse_addr(authority).map_err(|_| "backend host:port does not resolve")?;
    Ok(BackendSpec {
        url: url.to_string(),
        authority: authority.to_string(),
        addr,
        weight,
        tls: is_tls_url(url),
        max_connections,
        proxy,
        public,
    })
}

/// `--backends-file`: one `-B` value per line; blank lines and `#` comments are skipped.
/// The first bad line fails the whole file (a reload then keeps the backends it had).
pub fn parse_backends_file(text: &str) -> Result<Vec<BackendSpec>, String> {
    let mut specs: Vec<BackendSpec> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let spec = parse_backend(line).map_err(|why| format!("line {}: {why}", i + 1))?;
        if specs.iter().any(|s| s.url == spec.url) {
            return Err(format!("line {}: {} is listed twice", i + 1, spec.url));
        }
        specs.push(spec);
    }
    Ok(specs)
}

/// Is this a `wss://` or `https://` URL (TLS to the backend)?
pub fn is_tls_url(url: &str) -> bool {
    url.starts_with("wss://") || url.starts_with("https://")
}

/// Host part of a `host:port` authority, without IPv6 brackets (the TLS server name).
pub fn authority_host(authority: &str) -> &str {
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Returns the `host:port` of a backend URL. A pure function so the fuzzer can call it.
pub fn parse_backend_url(url: &str) -> Result<&str, &'static str> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("http://"))
        .or_else(|| url.strip_prefix("wss://"))
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("expected a ws://, wss://, http:// or https:// URL")?;
    let authority = rest.split('/').next().unwrap_or_default();
    let port = authority
        .rsplit_once(':')
        .map(|(_, p)| p)
        .ok_or("backend URL needs an explicit port")?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(authority),
        _ => Err("backend port must be 1-65535"),
    }
}

pub(super) fn parse_protocols(v: &str) -> Result<(bool, bool), &'static str> {
    let (mut ws, mut http) = (false, false);
    for p in v.split(',') {
        match p.trim() {
            "ws" | "websocket" => ws = true,
            "http" => http = true,
            _ => return Err("expected a comma list of ws and http"),
        }
    }
    Ok((ws, http))
}
