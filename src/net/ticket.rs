//! Dispatch tickets (issue 18): what lets a backend accept only clients the balancer sent.
//!
//! A ticket is `<guid>.<expires>.<mac>`: the backend's guid (the registration guid, or the
//! sticky id of a `-B` backend; `A-Z a-z 0-9 - _ . :`), the expiry in unix seconds
//! (decimal, no leading zero), and the HMAC-SHA256 (ring) under `--dispatch-secret` of
//! `<guid>.<expires>`, in lowercase hex. It rides on the dispatched URL as the query
//! parameter `wslb_ticket`. docs/DISPATCH.md gives the verification steps and
//! examples/verify_ticket.py does them in Python with the standard library.
//!
//! [`verify`] parses untrusted input: bounded length, no allocation, constant-time MAC check.

use ring::hmac;

use crate::backends::sticky::valid_id;

/// The query parameter the ticket travels in.
pub const PARAM: &str = "wslb_ticket";
const MAC_LEN: usize = 32;
/// Longest well-formed ticket (guid 128, 20 digits, 64 hex, two dots).
pub const MAX_TICKET_LEN: usize = 128 + 1 + 20 + 1 + 2 * MAC_LEN;

/// Why a ticket was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketError {
    /// Not `<guid>.<expires>.<mac>`.
    Malformed,
    /// The MAC does not match (tampered, or another secret).
    BadMac,
    /// Past its expiry.
    Expired,
    /// Issued for another backend.
    OtherBackend,
}

/// Issues and checks tickets under one secret.
pub struct TicketSigner {
    key: hmac::Key,
}

impl std::fmt::Debug for TicketSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketSigner { key: <redacted> }")
    }
}

impl TicketSigner {
    /// A signer keyed by `secret` (`--dispatch-secret`).
    pub fn new(secret: &[u8]) -> Self {
        TicketSigner {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// The ticket for backend `guid` valid until unix second `expires`; `None` if the guid
    /// has characters a ticket cannot carry.
    pub fn issue(&self, guid: &str, expires: u64) -> Option<String> {
        if !valid_id(guid) {
            return None;
        }
        let mut out = format!("{guid}.{expires}");
        let tag = hmac::sign(&self.key, out.as_bytes());
        out.push('.');
        for b in tag.as_ref() {
            out.push_str(&format!("{b:02x}"));
        }
        Some(out)
    }

    /// Checks a ticket at unix second `now`; `guid`: the backend checking it (a ticket for
    /// another backend is refused). Returns the expiry.
    pub fn verify(&self, ticket: &[u8], now: u64, guid: Option<&str>) -> Result<u64, TicketError> {
        if ticket.len() > MAX_TICKET_LEN {
            return Err(TicketError::Malformed);
        }
        let (signed, mac_hex) = split_last_dot(ticket)?;
        let (id, exp) = split_last_dot(signed)?;
        let id = std::str::from_utf8(id)
            .ok()
            .filter(|id| valid_id(id))
            .ok_or(TicketError::Malformed)?;
        let expires = parse_decimal(exp).ok_or(TicketError::Malformed)?;
        let mut tag = [0u8; MAC_LEN];
        decode_hex(mac_hex, &mut tag).ok_or(TicketError::Malformed)?;
        hmac::verify(&self.key, signed, &tag).map_err(|_| TicketError::BadMac)?;
        if now >= expires {
            return Err(TicketError::Expired);
        }
        if guid.is_some_and(|g| g != id) {
            return Err(TicketError::OtherBackend);
        }
        Ok(expires)
    }
}

/// `a.b` at the last dot: `(a, b)`.
fn split_last_dot(s: &[u8]) -> Result<(&[u8], &[u8]), TicketError> {
    let dot = s
        .iter()
        .rposition(|&b| b == b'.')
        .ok_or(TicketError::Malformed)?;
    let (head, tail) = s.split_at(dot);
    Ok((head, tail.get(1..).ok_or(TicketError::Malformed)?))
}

/// 1-20 decimal digits without a leading zero, fitting a u64 (one spelling per number).
fn parse_decimal(d: &[u8]) -> Option<u64> {
    if d.is_empty() || d.len() > 20 || (d.len() > 1 && d.first() == Some(&b'0')) {
        return None;
    }
    d.iter().try_fold(0u64, |acc, &b| {
        let digit = b.checked_sub(b'0').filter(|v| *v < 10)?;
        acc.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

fn decode_hex(hex: &[u8], out: &mut [u8]) -> Option<()> {
    if hex.len() != 2 * out.len() {
        return None;
    }
    let val = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let [hi, lo] = pair else { return None };
        *o = (val(*hi)? << 4) | val(*lo)?;
    }
    Some(())
}

/// `url` with the ticket appended as the `wslb_ticket` query parameter.
pub fn ticketed_url(url: &str, ticket: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{PARAM}={ticket}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_verify_and_every_refusal() {
        let s = TicketSigner::new(b"0123456789abcdef");
        let t = s.issue("backend-a", 1000).unwrap();
        assert_eq!(s.verify(t.as_bytes(), 999, Some("backend-a")), Ok(1000));
        assert_eq!(s.verify(t.as_bytes(), 999, None), Ok(1000));
        assert_eq!(
            s.verify(t.as_bytes(), 1000, None),
            Err(TicketError::Expired)
        );
        assert_eq!(
            s.verify(t.as_bytes(), 1, Some("backend-b")),
            Err(TicketError::OtherBackend)
        );
        // Any one byte changed is refused.
        for i in 0..t.len() {
            let mut bad = t.clone().into_bytes();
            bad[i] = if bad[i] == b'0' { b'1' } else { b'0' };
            assert!(s.verify(&bad, 1, None).is_err(), "byte {i}");
        }
        // Prolonged expiry: the MAC no longer matches.
        let forged = t.replacen("1000", "9000", 1);
        assert_eq!(
            s.verify(forged.as_bytes(), 1, None),
            Err(TicketError::BadMac)
        );
        let other = TicketSigner::new(b"another secret!!");
        assert_eq!(
            other.verify(t.as_bytes(), 1, None),
            Err(TicketError::BadMac)
        );
        for junk in ["", ".", "..", "a.1.", "a.01.00", "a..x", "a b.1.00"] {
            assert_eq!(
                s.verify(junk.as_bytes(), 1, None),
                Err(TicketError::Malformed)
            );
        }
        assert!(s.issue("bad guid", 1).is_none());
        assert!(s.verify(&[b'a'; MAX_TICKET_LEN + 1], 1, None).is_err());
    }

    #[test]
    fn urls() {
        assert_eq!(ticketed_url("ws://a:1/x", "t"), "ws://a:1/x?wslb_ticket=t");
        assert_eq!(
            ticketed_url("ws://a:1/x?y=1", "t"),
            "ws://a:1/x?y=1&wslb_ticket=t"
        );
    }
}
