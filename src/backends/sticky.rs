//! Sticky sessions (pure): the `--sticky` flag value, signed backend cookies, Cookie header
//! lookup, stable ids for `-B` backends and weighted rendezvous hashing.
//!
//! - `cookie[:NAME]`: the first response carries `Set-Cookie: NAME=<id>.<issued>.<mac>`, where
//!   `<id>` names the backend (registered guid or [`static_backend_id`]), `<issued>` is the
//!   unix time in lowercase hex and `<mac>` is the full HMAC-SHA256 tag (ring) over
//!   `<id>.<issued>`, in lowercase hex. Balancers sharing a secret accept each other's cookies.
//! - `ip` and `header:NAME`: [`rendezvous_pick`] (weighted highest-random-weight hashing over
//!   SHA-256), so a backend leaving only remaps its own clients, identically on every process.
//!
//! Nothing here allocates on the lookup path: [`find_cookie`], [`CookieSigner::verify`] and
//! [`rendezvous_pick`] borrow their input; only [`CookieSigner::issue`],
//! [`set_cookie_value`] and [`static_backend_id`] build strings.

use std::fmt;
use std::net::IpAddr;

use ring::{digest, hmac, rand};

/// Cookie name when the flag is plain `cookie`.
pub use crate::config::DEFAULT_COOKIE_NAME;
/// How far in the future an issue time may be (clock skew between balancers).
pub const MAX_CLOCK_SKEW_SECS: u64 = 60;
/// Longest accepted backend id (same bound as a registration guid).
pub const MAX_ID_LEN: usize = 128;
/// Longest cookie name / header name accepted by [`parse_mode`].
pub use crate::config::MAX_STICKY_NAME_LEN as MAX_NAME_LEN;

const TS_HEX_MAX: usize = 16;
const MAC_LEN: usize = 32; // HMAC-SHA256 tag
const MAC_HEX_LEN: usize = 2 * MAC_LEN;
/// Longest well-formed cookie value; anything longer is rejected before any work.
pub const MAX_COOKIE_VALUE_LEN: usize = MAX_ID_LEN + 1 + TS_HEX_MAX + 1 + MAC_HEX_LEN;

// The flag value lives with the other flag values (config is the layer below).
pub use crate::config::{parse_mode, StickyMode};

/// A backend id that may appear in a cookie: 1-128 characters of `A-Z a-z 0-9 - _ . :` (the
/// registration guid alphabet; all are RFC 6265 cookie-octets).
pub fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// The OS random source failed while generating a per-process secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RngError;

impl fmt::Display for RngError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the system random source failed")
    }
}

impl std::error::Error for RngError {}

/// A cookie that passed [`CookieSigner::verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified<'a> {
    /// The backend id the cookie names.
    pub id: &'a str,
    /// When it was issued (unix seconds).
    pub issued_secs: u64,
}

/// Issues and verifies sticky cookie values with HMAC-SHA256.
pub struct CookieSigner {
    key: hmac::Key,
}

impl fmt::Debug for CookieSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CookieSigner { key: <redacted> }")
    }
}

impl CookieSigner {
    /// A signer keyed by `secret` (`--sticky-secret` / `WSLB_STICKY_SECRET`). Every balancer
    /// given the same secret issues and accepts the same cookies.
    pub fn new(secret: &[u8]) -> Self {
        CookieSigner {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// A signer with a random per-process secret: cookies are only honoured by this process.
    pub fn random() -> Result<Self, RngError> {
        let rng = rand::SystemRandom::new();
        hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map(|key| CookieSigner { key })
            .map_err(|_| RngError)
    }

    /// The cookie value `<id>.<issued_hex>.<mac_hex>` naming backend `id`, issued at unix
    /// seconds `now_secs`; `None` if `id` is not [`valid_id`].
    pub fn issue(&self, id: &str, now_secs: u64) -> Option<String> {
        if !valid_id(id) {
            return None;
        }
        let mut out = String::with_capacity(id.len() + 2 + TS_HEX_MAX + MAC_HEX_LEN);
        out.push_str(id);
        out.push('.');
        out.push_str(&format!("{now_secs:x}"));
        let tag = hmac::sign(&self.key, out.as_bytes());
        out.push('.');
        push_hex(&mut out, tag.as_ref());
        Some(out)
    }

    /// Checks a cookie value and returns the backend id and issue time. `None` when it is
    /// malformed or non-canonical, when the MAC does not match (constant-time, ring),
    /// when it was issued more than [`MAX_CLOCK_SKEW_SECS`] after `now_secs`, or more than
    /// `max_age_secs` before it. A `None` cookie is simply ignored and replaced.
    pub fn verify<'a>(
        &self,
        value: &'a [u8],
        now_secs: u64,
        max_age_secs: u64,
    ) -> Option<Verified<'a>> {
        if value.len() > MAX_COOKIE_VALUE_LEN {
            return None;
        }
        let mac_dot = value.iter().rposition(|&b| b == b'.')?;
        let (signed, mac_hex) = value.split_at(mac_dot);
        let mac_hex = mac_hex.get(1..)?;
        let ts_dot = signed.iter().rposition(|&b| b == b'.')?;
        let (id, ts_hex) = signed.split_at(ts_dot);
        let ts_hex = ts_hex.get(1..)?;

        let id = std::str::from_utf8(id).ok().filter(|id| valid_id(id))?;
        let issued_secs = parse_canonical_hex_u64(ts_hex)?;
        let mut tag = [0u8; MAC_LEN];
        decode_hex(mac_hex, &mut tag)?;
        hmac::verify(&self.key, signed, &tag).ok()?;

        if issued_secs > now_secs.saturating_add(MAX_CLOCK_SKEW_SECS)
            || now_secs.saturating_sub(issued_secs) > max_age_secs
        {
            return None;
        }
        Some(Verified { id, issued_secs })
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_hex(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
}

/// A lowercase hex digit's value.
fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// Exactly `2 * out.len()` lowercase hex digits.
fn decode_hex(hex: &[u8], out: &mut [u8]) -> Option<()> {
    if hex.len() != 2 * out.len() {
        return None;
    }
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let [hi, lo] = pair else { return None };
        *o = (hex_val(*hi)? << 4) | hex_val(*lo)?;
    }
    Some(())
}

/// 1-16 lowercase hex digits without leading zeros (so one number has one spelling and a
/// verified value re-issued with the same time is byte-identical).
fn parse_canonical_hex_u64(hex: &[u8]) -> Option<u64> {
    if hex.is_empty() || hex.len() > TS_HEX_MAX || (hex.len() > 1 && hex.first() == Some(&b'0')) {
        return None;
    }
    hex.iter()
        .try_fold(0u64, |acc, &b| Some((acc << 4) | u64::from(hex_val(b)?)))
}

/// The value of cookie `name` in one `Cookie` header value (`a=1; b=2`), split on `;` as in
/// RFC 6265 §4.2.1/§5.4, tolerant of whitespace around names and values; one pair of
/// surrounding double quotes is removed. Returns the first match. Pairs without `=` are
/// skipped. The caller calls this once per `Cookie` header line, in order.
pub fn find_cookie<'a>(header_value: &'a [u8], name: &str) -> Option<&'a [u8]> {
    if name.is_empty() {
        return None;
    }
    header_value.split(|&b| b == b';').find_map(|pair| {
        let eq = pair.iter().position(|&b| b == b'=')?;
        let (n, v) = pair.split_at(eq);
        if n.trim_ascii() != name.as_bytes() {
            return None;
        }
        let v = v.get(1..)?.trim_ascii();
        Some(match v {
            [b'"', inner @ .., b'"'] => inner,
            _ => v,
        })
    })
}

/// The `Set-Cookie` header value for the sticky cookie.
pub fn set_cookie_value(name: &str, value: &str, secure: bool, max_age_secs: u64) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{name}={value}; Path=/; HttpOnly; SameSite=Lax{secure}; Max-Age={max_age_secs}")
}

/// Stable id of a static `-B` backend: `b-` + the first 8 bytes of SHA-256(url) in hex. The
/// same URL gives the same id on every balancer process.
pub fn static_backend_id(url: &str) -> String {
    let d = digest::digest(&digest::SHA256, url.as_bytes());
    let mut out = String::with_capacity(2 + 16);
    out.push_str("b-");
    push_hex(&mut out, d.as_ref().get(..8).unwrap_or_default());
    out
}

/// The rendezvous key for a client address: IPv4 as its IPv4-mapped IPv6 form, so one
/// client has one key whichever way the listener saw it.
pub fn ip_key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Weighted rendezvous (highest-random-weight) hashing: each candidate `(id, weight)` scores
/// `weight / -ln(u)`, `u` = the first 53 bits of SHA-256(len(key) ‖ key ‖ id) mapped into
/// (0, 1); the index (in iteration order) of the best score is returned. A weight-`w`
/// candidate wins a share `w / Σw` of keys; removing a candidate only moves the keys it held.
/// Weight-0 candidates are never picked. Deterministic on every process and platform.
pub fn rendezvous_pick<'c>(
    key: &[u8],
    candidates: impl IntoIterator<Item = (&'c str, u32)>,
) -> Option<usize> {
    let mut prefix = digest::Context::new(&digest::SHA256);
    prefix.update(&(key.len() as u64).to_be_bytes());
    prefix.update(key);
    let mut best: Option<(usize, f64)> = None;
    for (i, (id, weight)) in candidates.into_iter().enumerate() {
        if weight == 0 {
            continue;
        }
        let mut ctx = prefix.clone();
        ctx.update(id.as_bytes());
        let d = ctx.finish();
        let mut first = [0u8; 8];
        first.copy_from_slice(d.as_ref().get(..8).unwrap_or(&[0u8; 8]));
        let bits = u64::from_be_bytes(first) >> 11;
        // (bits + 0.5) / 2^53 is strictly inside (0, 1), so ln(u) < 0 and the score is finite.
        let u = (bits as f64 + 0.5) / (1u64 << 53) as f64;
        let score = f64::from(weight) / -u.ln();
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((i, score));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const NOW: u64 = 1_700_000_000;
    const DAY: u64 = 86_400;

    fn signer() -> CookieSigner {
        CookieSigner::new(b"test secret, long enough to matter")
    }

    #[test]
    fn parse_mode_table() {
        let cookie = |n: &str| {
            Ok(StickyMode::Cookie {
                name: n.to_string(),
            })
        };
        let header = |n: &str| {
            Ok(StickyMode::Header {
                name: n.to_string(),
            })
        };
        let long = "x".repeat(64);
        let too_long = "x".repeat(65);
        let cases: Vec<(String, Result<StickyMode, ()>)> = vec![
            ("cookie".into(), cookie("wslb")),
            ("cookie:sid".into(), cookie("sid")),
            (
                "cookie:my-app.v1_!#$%&'*+^`|~".into(),
                cookie("my-app.v1_!#$%&'*+^`|~"),
            ),
            (format!("cookie:{long}"), cookie(&long)),
            ("ip".into(), Ok(StickyMode::Ip)),
            ("header:X-User".into(), header("X-User")),
            ("header:authorization".into(), header("authorization")),
            (format!("header:{long}"), header(&long)),
            (format!("cookie:{too_long}"), Err(())),
            (format!("header:{too_long}"), Err(())),
            ("".into(), Err(())),
            ("cookie:".into(), Err(())),
            ("header".into(), Err(())),
            ("header:".into(), Err(())),
            ("header:a b".into(), Err(())),
            ("header:a:b".into(), Err(())),
            ("cookie:a=b".into(), Err(())),
            ("cookie:a;b".into(), Err(())),
            ("cookie:\"a\"".into(), Err(())),
            ("cookie:é".into(), Err(())),
            ("Cookie".into(), Err(())),
            ("IP".into(), Err(())),
            ("ip:x".into(), Err(())),
            (" ip".into(), Err(())),
            ("ip ".into(), Err(())),
            ("source".into(), Err(())),
            ("query:x".into(), Err(())),
        ];
        for (input, want) in cases {
            let got = parse_mode(&input).map_err(|_| ());
            assert_eq!(got, want, "parse_mode({input:?})");
        }
        // Every strict prefix of a valid value is either invalid or a different valid value.
        for full in ["cookie:sid", "header:X-User"] {
            for cut in 0..full.len() {
                let prefix = &full[..cut];
                if let Ok(m) = parse_mode(prefix) {
                    assert_ne!(Ok(m), parse_mode(full), "prefix {prefix:?}");
                }
            }
        }
    }

    #[test]
    fn issue_verify_round_trip() {
        let s = signer();
        for id in [
            "a",
            "b-0123456789abcdef",
            "guid:1.2.3_x-Y",
            &"z".repeat(128),
        ] {
            let v = s.issue(id, NOW).expect("valid id");
            assert!(v.len() <= MAX_COOKIE_VALUE_LEN);
            assert!(v.starts_with(&format!("{id}.{NOW:x}.")), "{v}");
            let got = s.verify(v.as_bytes(), NOW, DAY);
            assert_eq!(
                got,
                Some(Verified {
                    id,
                    issued_secs: NOW
                })
            );
            // Same key, same input, same value: deterministic.
            assert_eq!(s.issue(id, NOW), Some(v.clone()));
            // Another process with the same secret accepts it.
            assert!(signer().verify(v.as_bytes(), NOW, DAY).is_some());
        }
        // Edge times: 0, the full u64, the age boundary, the skew boundary.
        let v = s.issue("x", 0).expect("id");
        assert!(v.starts_with("x.0."));
        assert_eq!(s.verify(v.as_bytes(), 0, 0).map(|c| c.issued_secs), Some(0));
        let v = s.issue("x", u64::MAX).expect("id");
        assert!(s.verify(v.as_bytes(), u64::MAX, 0).is_some());
        let v = s.issue("x", NOW).expect("id");
        assert!(s.verify(v.as_bytes(), NOW + DAY, DAY).is_some());
        assert!(s.verify(v.as_bytes(), NOW + DAY + 1, DAY).is_none());
        assert!(s
            .verify(v.as_bytes(), NOW - MAX_CLOCK_SKEW_SECS, DAY)
            .is_some());
        assert!(s
            .verify(v.as_bytes(), NOW - MAX_CLOCK_SKEW_SECS - 1, DAY)
            .is_none());
    }

    #[test]
    fn issue_rejects_bad_ids() {
        let s = signer();
        for id in ["", "a b", "a;b", "a=b", "é", "a\"", "a,b", &"z".repeat(129)] {
            assert_eq!(s.issue(id, NOW), None, "{id:?}");
        }
    }

    #[test]
    fn verify_rejects() {
        let s = signer();
        let good = s.issue("backend-1", NOW).expect("id");
        let (id_len, ts_len) = (9, format!("{NOW:x}").len());
        let mac_start = id_len + 1 + ts_len + 1;
        let flip = |at: usize| {
            let mut b = good.clone().into_bytes();
            b[at] = if b[at] == b'0' { b'1' } else { b'0' };
            b
        };
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("flipped id byte", flip(0)),
            ("flipped last id byte", flip(id_len - 1)),
            ("flipped ts byte", flip(id_len + 1)),
            ("flipped last ts byte", flip(id_len + ts_len)),
            ("flipped mac byte", flip(mac_start)),
            ("flipped last mac byte", flip(good.len() - 1)),
            ("upper-case mac", {
                let (head, mac) = good.split_at(mac_start);
                format!("{head}{}", mac.to_ascii_uppercase()).into_bytes()
            }),
            ("extra dot at end", format!("{good}.").into_bytes()),
            ("extra field", format!("{good}.00").into_bytes()),
            ("extra dot at start", format!(".{good}").into_bytes()),
            ("leading zero ts", {
                let (id, rest) = good.split_at(id_len + 1);
                format!("{id}0{rest}").into_bytes()
            }),
            ("non-hex mac", {
                let mut b = good.clone().into_bytes();
                b[mac_start + 3] = b'g';
                b
            }),
            ("non-hex ts", {
                let mut b = good.clone().into_bytes();
                b[id_len + 2] = b'x';
                b
            }),
            ("empty", Vec::new()),
            ("dots only", b"..".to_vec()),
            ("no id", good.as_bytes()[id_len..].to_vec()),
            ("no dots", good.replace('.', "").into_bytes()),
            ("huge", "a".repeat(1 << 20).into_bytes()),
            ("huge valid-looking", {
                let big = "a".repeat(4096);
                format!("{big}{}", &good[id_len..]).into_bytes()
            }),
            ("quoted", format!("\"{good}\"").into_bytes()),
            ("trailing space", format!("{good} ").into_bytes()),
            ("invalid utf-8 id", {
                let mut b = good.clone().into_bytes();
                b[0] = 0xff;
                b
            }),
        ];
        // Every strict prefix (truncation) and every single-byte deletion fails.
        for cut in 0..good.len() {
            cases.push(("truncated", good.as_bytes()[..cut].to_vec()));
            let mut d = good.clone().into_bytes();
            d.remove(cut);
            cases.push(("byte deleted", d));
        }
        for (what, value) in &cases {
            assert_eq!(s.verify(value, NOW, DAY), None, "{what}: {value:?}");
        }
        // Time and key.
        assert_eq!(
            s.verify(good.as_bytes(), NOW + DAY + 1, DAY),
            None,
            "expired"
        );
        let future = s
            .issue("backend-1", NOW + MAX_CLOCK_SKEW_SECS + 1)
            .expect("id");
        assert_eq!(s.verify(future.as_bytes(), NOW, DAY), None, "future");
        let other = CookieSigner::new(b"another secret");
        assert_eq!(
            other.verify(good.as_bytes(), NOW, DAY),
            None,
            "other secret"
        );
        let random = CookieSigner::random().expect("rng");
        assert_eq!(
            random.verify(good.as_bytes(), NOW, DAY),
            None,
            "random secret"
        );
        let own = random.issue("backend-1", NOW).expect("id");
        assert!(random.verify(own.as_bytes(), NOW, DAY).is_some());
        // A valid MAC moved onto another id or time does not verify.
        let (_, mac) = good.split_at(mac_start);
        let moved = format!("backend-2.{NOW:x}.{mac}");
        assert_eq!(
            s.verify(moved.as_bytes(), NOW, DAY),
            None,
            "mac moved to other id"
        );
        let moved = format!("backend-1.{:x}.{mac}", NOW + 1);
        assert_eq!(
            s.verify(moved.as_bytes(), NOW, DAY),
            None,
            "mac moved to other ts"
        );
    }

    #[test]
    fn find_cookie_table() {
        // (Cookie header value, cookie name, expected value)
        type Case = (&'static [u8], &'static str, Option<&'static [u8]>);
        let cases: &[Case] = &[
            (b"a=1; wslb=xyz; b=2", "wslb", Some(b"xyz")),
            (b"wslb=", "wslb", Some(b"")),
            (b"wslb", "wslb", None),
            (b"wslbx=1; wslb=2", "wslb", Some(b"2")),
            (b"xwslb=1; wslb=2", "wslb", Some(b"2")),
            (b"wslb=1; wslb=2", "wslb", Some(b"1")),
            (b"WSLB=1; wslb=2", "wslb", Some(b"2")),
            (b"wslb=\"quoted\"", "wslb", Some(b"quoted")),
            (b"wslb=\"\"", "wslb", Some(b"")),
            (b"wslb=\"", "wslb", Some(b"\"")),
            (b"wslb=\"half", "wslb", Some(b"\"half")),
            (b"  wslb  =  v  ;b=2", "wslb", Some(b"v")),
            (b"a=1;wslb=v;b=2", "wslb", Some(b"v")),
            (b"\twslb=v\t", "wslb", Some(b"v")),
            (b"wslb=a=b", "wslb", Some(b"a=b")),
            (b"a=1; b=2", "wslb", None),
            (b"", "wslb", None),
            (b";;;", "wslb", None),
            (b"=v", "wslb", None),
            (b"=v", "", None),
            (b"\xff\xfe=\x00; wslb=\xc3\x28", "wslb", Some(b"\xc3\x28")),
            (b"\xff\x00;;==;wslb", "wslb", None),
            (b"sid=abc", "sid", Some(b"abc")),
        ];
        for &(header, name, want) in cases {
            assert_eq!(
                find_cookie(header, name),
                want,
                "{:?} / {name}",
                header.escape_ascii().to_string()
            );
            // The caller searches Cookie lines in order: cutting the value into two lines at
            // any `;` gives the same first match.
            for (i, _) in header.iter().enumerate().filter(|(_, &b)| b == b';') {
                let (l1, l2) = (&header[..i], &header[i + 1..]);
                let split = find_cookie(l1, name).or_else(|| find_cookie(l2, name));
                assert_eq!(split, want, "split at {i}");
            }
        }
    }

    #[test]
    fn find_then_verify() {
        let s = signer();
        let v = s.issue("b-1", NOW).expect("id");
        let header = format!("theme=dark; wslb={v}; other=1");
        let found = find_cookie(header.as_bytes(), "wslb").expect("found");
        assert_eq!(s.verify(found, NOW, DAY).map(|c| c.id), Some("b-1"));
    }

    #[test]
    fn set_cookie_exact() {
        assert_eq!(
            set_cookie_value("wslb", "b-1.5f.ab", false, 86400),
            "wslb=b-1.5f.ab; Path=/; HttpOnly; SameSite=Lax; Max-Age=86400"
        );
        assert_eq!(
            set_cookie_value("sid", "x", true, 0),
            "sid=x; Path=/; HttpOnly; SameSite=Lax; Secure; Max-Age=0"
        );
    }

    #[test]
    fn static_ids_stable_and_distinct() {
        let a = static_backend_id("ws://127.0.0.1:9001");
        assert_eq!(a, static_backend_id("ws://127.0.0.1:9001"));
        // SHA-256("ws://127.0.0.1:9001") pinned, so a change of scheme is noticed: the id is
        // shared between balancer processes and versions.
        let d = digest::digest(&digest::SHA256, b"ws://127.0.0.1:9001");
        let mut want = String::from("b-");
        push_hex(&mut want, &d.as_ref()[..8]);
        assert_eq!(a, want);
        assert_eq!(static_backend_id(""), "b-e3b0c44298fc1c14");
        assert_eq!(a.len(), 18);
        assert!(valid_id(&a));
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|i| static_backend_id(&format!("ws://10.0.0.1:{i}")))
            .collect();
        assert_eq!(ids.len(), 1000);
        assert_ne!(a, static_backend_id("ws://127.0.0.1:9002"));
    }

    #[test]
    fn ip_keys() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped());
        assert_eq!(ip_key(v4), ip_key(mapped));
        assert_ne!(ip_key(v4), ip_key(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }

    fn keys(n: u32) -> impl Iterator<Item = [u8; 4]> {
        (0..n).map(u32::to_be_bytes)
    }

    fn pick(key: &[u8], c: &[(&str, u32)]) -> Option<usize> {
        rendezvous_pick(key, c.iter().copied())
    }

    #[test]
    fn rendezvous_basics() {
        assert_eq!(pick(b"k", &[]), None);
        assert_eq!(pick(b"k", &[("a", 0), ("b", 0)]), None);
        assert_eq!(pick(b"k", &[("a", 1)]), Some(0));
        assert_eq!(pick(b"k", &[("a", 0), ("b", 1)]), Some(1));
        // Deterministic, and independent of candidate order.
        let four = [("b-1", 1), ("b-2", 1), ("b-3", 1), ("b-4", 1)];
        let rev: Vec<(&str, u32)> = four.iter().rev().copied().collect();
        for k in keys(1000) {
            let a = pick(&k, &four).expect("pick");
            assert_eq!(pick(&k, &four), Some(a));
            assert_eq!(pick(&k, &rev), Some(3 - a));
        }
        // Pinned: the hash is part of the cross-process contract.
        let pinned: Vec<usize> = keys(8).map(|k| pick(&k, &four).expect("pick")).collect();
        assert_eq!(pinned, PINNED);
    }

    const PINNED: [usize; 8] = [0, 0, 0, 3, 3, 3, 1, 2];

    #[test]
    fn rendezvous_uniform_and_weighted() {
        let four = [("b-1", 1), ("b-2", 1), ("b-3", 1), ("b-4", 1)];
        let mut counts = [0u32; 4];
        for k in keys(10_000) {
            counts[pick(&k, &four).expect("pick")] += 1;
        }
        for c in counts {
            assert!((2000..=3000).contains(&c), "{counts:?}");
        }
        let weighted = [("heavy", 3), ("light", 1)];
        let heavy = keys(10_000)
            .filter(|k| pick(k, &weighted) == Some(0))
            .count();
        assert!((7200..=7800).contains(&heavy), "heavy got {heavy}");
    }

    #[test]
    fn rendezvous_minimal_disruption() {
        let four = [("b-1", 1), ("b-2", 1), ("b-3", 1), ("b-4", 1)];
        let ids = |c: &[(&str, u32)], k: &[u8]| c[pick(k, c).expect("pick")].0.to_string();
        // Removing one backend moves exactly the keys it held.
        for removed in 0..4 {
            let rest: Vec<(&str, u32)> = four
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != removed)
                .map(|(_, c)| *c)
                .collect();
            for k in keys(10_000) {
                let before = ids(&four, &k);
                let after = ids(&rest, &k);
                if before != four[removed].0 {
                    assert_eq!(before, after, "key {k:?} moved");
                }
            }
        }
        // Adding a fifth moves about a fifth, all of them onto the new backend.
        let five = [("b-1", 1), ("b-2", 1), ("b-3", 1), ("b-4", 1), ("b-5", 1)];
        let mut moved = 0;
        for k in keys(10_000) {
            let (before, after) = (ids(&four, &k), ids(&five, &k));
            if before != after {
                assert_eq!(after, "b-5");
                moved += 1;
            }
        }
        assert!((1500..=2500).contains(&moved), "moved {moved}");
    }
}
