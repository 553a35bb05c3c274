//! Who may open control connections, and as whom: the shared `--token`, per-backend tokens
//! from `--token-file`, or (with neither) loopback peers.
//!
//! Tokens are never compared directly. Each configured token is kept as an HMAC tag under a
//! key drawn at startup; a presented token is MACed under the same key and the tags are
//! compared with `ring::hmac::verify` (constant time). The time taken therefore depends on
//! neither the configured token's content nor its length, only on the presented one's.

use std::net::SocketAddr;

use ring::hmac;

/// What a control connection proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// No token is configured and the peer is on loopback: full rights.
    Local,
    /// Presented the shared `--token`: may register any guid and use the admin API.
    Shared,
    /// Presented a `--token-file` token: may register this guid only, no admin API.
    Guid(String),
}

impl Identity {
    /// May use the admin API (status, metrics, messaging, drain).
    pub fn is_admin(&self) -> bool {
        matches!(self, Identity::Local | Identity::Shared)
    }

    /// May register `guid`.
    pub fn may_register(&self, guid: &str) -> bool {
        match self {
            Identity::Guid(g) => g == guid,
            _ => true,
        }
    }
}

/// The credentials the control listener accepts.
#[derive(Debug)]
pub struct ControlAuth {
    key: hmac::Key,
    shared: Option<hmac::Tag>,
    per_guid: Vec<(String, hmac::Tag)>,
    /// A token source is configured (then loopback alone proves nothing).
    required: bool,
}

/// A `--token-file` line that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFileError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub why: &'static str,
}

impl std::fmt::Display for TokenFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.why)
    }
}

/// Parses `--token-file` text: one `guid token` per line, `#` comments and blank lines
/// ignored. A guid may appear once (two tokens for one backend would be an ambiguity, not
/// a rotation scheme); tokens are 1-4096 visible ASCII characters.
pub fn parse_token_file(text: &str) -> Result<Vec<(String, String)>, TokenFileError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |why| TokenFileError { line: i + 1, why };
        let mut parts = line.split_ascii_whitespace();
        let (Some(guid), Some(token), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(err("expected `guid token`"));
        };
        if !crate::control::protocol::valid_guid(guid) {
            return Err(err("guid must be 1-128 characters of A-Z a-z 0-9 - _ . :"));
        }
        if token.len() > 4096 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(err("token must be 1-4096 visible ASCII characters"));
        }
        if out.iter().any(|(g, _)| g == guid) {
            return Err(err("guid listed twice"));
        }
        out.push((guid.to_string(), token.to_string()));
    }
    Ok(out)
}

/// The credentials of `Authorization: Bearer <token>`. The scheme is case-insensitive
/// (RFC 9110 §11.1); one or more spaces separate it from the token.
pub fn bearer(authorization: &[u8]) -> Option<&[u8]> {
    let scheme = authorization.get(..6)?;
    let rest = authorization.get(6..)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || rest.first() != Some(&b' ') {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

impl ControlAuth {
    /// Draws a fresh MAC key and tags the configured tokens. `per_guid` is `None` without
    /// `--token-file`; a configured but empty file still requires credentials (an empty
    /// file must not open the listener to every local process).
    pub fn new(
        token: Option<&str>,
        per_guid: Option<&[(String, String)]>,
    ) -> Result<Self, ring::error::Unspecified> {
        let rng = ring::rand::SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)?;
        let mut auth = ControlAuth {
            shared: token.map(|t| hmac::sign(&key, t.as_bytes())),
            key,
            per_guid: Vec::new(),
            required: token.is_some() || per_guid.is_some(),
        };
        auth.set_per_guid(per_guid.unwrap_or_default());
        Ok(auth)
    }

    /// Replaces the per-guid tokens (SIGHUP).
    pub fn set_per_guid(&mut self, per_guid: &[(String, String)]) {
        self.per_guid = per_guid
            .iter()
            .map(|(g, t)| (g.clone(), hmac::sign(&self.key, t.as_bytes())))
            .collect();
    }

    /// Are credentials required (a token or a token file is configured)?
    pub fn required(&self) -> bool {
        self.required
    }

    /// The identity a connection from `peer` proves with `authorization` and, on TLS with
    /// `--control-client-ca`, the name on its verified client certificate; or the status to
    /// refuse with. `via_proxy`: the connection was opened by wslb's own proxy, so its
    /// loopback address says nothing about who is behind it.
    pub fn check(
        &self,
        peer: SocketAddr,
        via_proxy: bool,
        authorization: Option<&[u8]>,
        cert_name: Option<&str>,
    ) -> Result<Identity, u16> {
        if via_proxy {
            return Err(403);
        }
        if self.required {
            if let Some(given) = authorization.and_then(bearer) {
                // A wrong token is refused even beside a good certificate: a client that
                // sends credentials means them.
                return self.token_identity(given).ok_or(401);
            }
        }
        if let Some(name) = cert_name.filter(|n| crate::control::protocol::valid_guid(n)) {
            return Ok(Identity::Guid(name.to_string()));
        }
        if self.required {
            Err(401)
        } else if peer.ip().to_canonical().is_loopback() {
            Ok(Identity::Local)
        } else {
            Err(403)
        }
    }

    fn token_identity(&self, given: &[u8]) -> Option<Identity> {
        // Every tag is checked, so timing does not tell which entry (if any) matched.
        let shared = self
            .shared
            .as_ref()
            .is_some_and(|t| hmac::verify(&self.key, given, t.as_ref()).is_ok());
        let mut guid = None;
        for (g, t) in &self.per_guid {
            if hmac::verify(&self.key, given, t.as_ref()).is_ok() {
                guid = Some(g);
            }
        }
        match (shared, guid) {
            (true, _) => Some(Identity::Shared),
            (false, Some(g)) => Some(Identity::Guid(g.clone())),
            (false, None) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(v: &str) -> SocketAddr {
        v.parse().unwrap()
    }

    #[test]
    fn loopback_only_without_credentials() {
        let open = ControlAuth::new(None, None).unwrap();
        assert!(!open.required());
        assert_eq!(
            open.check(sa("127.0.0.1:5"), false, None, None),
            Ok(Identity::Local)
        );
        assert_eq!(
            open.check(sa("[::1]:5"), false, None, None),
            Ok(Identity::Local)
        );
        assert_eq!(
            open.check(sa("[::ffff:127.0.0.1]:5"), false, None, None),
            Ok(Identity::Local)
        );
        assert_eq!(open.check(sa("10.1.2.3:5"), false, None, None), Err(403));
        assert_eq!(
            open.check(sa("127.0.0.1:5"), true, None, None),
            Err(403),
            "proxied"
        );
    }

    #[test]
    fn shared_token() {
        let a = ControlAuth::new(Some("s3cret"), None).unwrap();
        let lo = sa("127.0.0.1:5");
        assert_eq!(
            a.check(sa("10.1.2.3:5"), false, Some(b"Bearer s3cret"), None),
            Ok(Identity::Shared)
        );
        assert_eq!(
            a.check(lo, false, Some(b"bearer s3cret"), None),
            Ok(Identity::Shared)
        );
        assert_eq!(
            a.check(lo, false, Some(b"BEARER  s3cret "), None),
            Ok(Identity::Shared)
        );
        for bad in [
            &b"Bearer s3cre"[..],
            b"Bearer s3cret!",
            b"Bearer S3CRET",
            b"Basic s3cret",
            b"Bearers3cret",
            b"Bearer ",
            b"",
        ] {
            assert_eq!(a.check(lo, false, Some(bad), None), Err(401), "{bad:?}");
        }
        assert_eq!(
            a.check(lo, false, None, None),
            Err(401),
            "loopback is not enough"
        );
        assert_eq!(a.check(lo, true, Some(b"Bearer s3cret"), None), Err(403));
    }

    #[test]
    fn per_guid_tokens() {
        let file = parse_token_file("# backends\napi-1 t-one\n\n  api-2\tt-two  \n").unwrap();
        let mut a = ControlAuth::new(None, Some(&file)).unwrap();
        assert!(a.required());
        let lo = sa("127.0.0.1:5");
        assert_eq!(
            a.check(lo, false, Some(b"Bearer t-one"), None),
            Ok(Identity::Guid("api-1".into()))
        );
        assert_eq!(a.check(lo, false, None, None), Err(401));
        let id = a.check(lo, false, Some(b"Bearer t-two"), None).unwrap();
        assert!(id.may_register("api-2") && !id.may_register("api-1") && !id.is_admin());
        assert!(Identity::Shared.may_register("x") && Identity::Shared.is_admin());
        a.set_per_guid(&[("api-3".into(), "t-three".into())]);
        assert_eq!(
            a.check(lo, false, Some(b"Bearer t-one"), None),
            Err(401),
            "reloaded"
        );
        a.set_per_guid(&[]);
        assert_eq!(
            a.check(lo, false, None, None),
            Err(401),
            "an emptied file stays closed"
        );
    }

    #[test]
    fn client_certificate_names_the_guid() {
        let remote = sa("10.1.2.3:5");
        let open = ControlAuth::new(None, None).unwrap();
        assert_eq!(
            open.check(remote, false, None, Some("api-1")),
            Ok(Identity::Guid("api-1".into()))
        );
        assert_eq!(
            open.check(remote, false, None, Some("not a guid!")),
            Err(403)
        );
        assert_eq!(open.check(remote, true, None, Some("api-1")), Err(403));
        let locked = ControlAuth::new(Some("s3cret"), None).unwrap();
        assert_eq!(
            locked.check(remote, false, None, Some("api-1")),
            Ok(Identity::Guid("api-1".into()))
        );
        assert_eq!(
            locked.check(remote, false, Some(b"Bearer wrong"), Some("api-1")),
            Err(401),
            "a wrong token is not rescued by a certificate"
        );
        assert_eq!(
            locked.check(remote, false, Some(b"Bearer s3cret"), Some("api-1")),
            Ok(Identity::Shared)
        );
    }

    #[test]
    fn token_file_errors_name_the_line() {
        for (text, line) in [
            ("api-1\n", 1),
            ("a t\nb t u\n", 2),
            ("bad guid! t\n", 1),
            ("# c\na t\na u\n", 3),
            ("a t\u{7f}\n", 1),
        ] {
            assert_eq!(parse_token_file(text).unwrap_err().line, line, "{text:?}");
        }
    }

    #[test]
    fn bearer_scheme() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bEaReR   abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Bearer"), None);
        assert_eq!(bearer(b"Bearerabc"), None);
        assert_eq!(bearer(b"Token abc"), None);
    }
}
