//! PROXY protocol v1 (text) and v2 (binary), as HAProxy's `proxy-protocol.txt` defines
//! them: the header an L4 load balancer puts before a connection's first byte to say whose
//! connection it is. Pure: bytes in, [`Status`] out, no sockets, no allocation on parsing.
//!
//! The parser never consumes: the listener peeks (`MSG_PEEK`) at the socket, asks
//! [`parse`] how long the header is, and reads exactly that many bytes, so whatever follows
//! (a TLS ClientHello, an HTTP request) stays in the socket for the next stage.
//!
//! Strict by default: a header is refused as soon as a prefix shows it cannot become valid,
//! so a peer gets no further than the first wrong byte.
#![deny(clippy::indexing_slicing)]

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest v1 header, CRLF included (the specification's own bound).
pub const V1_MAX: usize = 107;
/// The 12 bytes that open every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Most v2 bytes after the 16-byte fixed part. Addresses take at most 216 (AF_UNIX); the
/// rest is room for TLVs (AWS and GCP put an endpoint id there, HAProxy a unique id or
/// TLS facts). A larger header is refused instead of buffered.
pub const V2_MAX_PAYLOAD: usize = 1024;
/// Longest header of either version: what a reader needs to peek at once.
pub const MAX_HEADER: usize = 16 + V2_MAX_PAYLOAD;

/// `Partial` = every byte so far is valid and more are needed; not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status<T> {
    /// A whole header.
    Complete(T),
    /// A valid prefix of a header.
    Partial,
}

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Bytes the header takes at the start of the stream.
    pub len: usize,
    /// 1 or 2.
    pub version: u8,
    /// The client's and the original destination's addresses; `None` for v1 `UNKNOWN`,
    /// v2 `LOCAL` (the L4 tier's own health check) and families without an IP address:
    /// the connection's own endpoints apply then.
    pub addrs: Option<Addrs>,
}

/// Source (the client) and destination (the address it connected to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addrs {
    /// The client.
    pub src: SocketAddr,
    /// Where the client connected.
    pub dst: SocketAddr,
}

/// Why a PROXY header (or the connection that should carry one) was refused. Each variant
/// is one `reason` label of `wslb_proxy_protocol_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PpError {
    /// Neither a v1 nor a v2 signature, or a v2 version nibble other than 2.
    UnknownVersion,
    /// v1 text that breaks the grammar (fields, spaces, ports, CRLF, characters).
    Malformed,
    /// v1 without CRLF within 107 bytes, or v2 longer than [`MAX_HEADER`].
    Oversized,
    /// An address family or transport other than TCP over IPv4/IPv6 (or v2 UNSPEC/UNIX),
    /// or v1 addresses that do not match the family named.
    BadFamily,
    /// v2 length too short for the addresses of the family named.
    BadAddressLength,
    /// v2 command other than LOCAL or PROXY.
    BadCommand,
    // The three below are the listener's, never the parser's.
    /// The peer is not in `--trusted-proxy`.
    Untrusted,
    /// The peer closed (or reset) the connection before the header was complete.
    Truncated,
    /// The header did not arrive within `--header-timeout`.
    Timeout,
}

impl PpError {
    /// Every variant, for metrics.
    pub const ALL: [PpError; 9] = [
        PpError::UnknownVersion,
        PpError::Malformed,
        PpError::Oversized,
        PpError::BadFamily,
        PpError::BadAddressLength,
        PpError::BadCommand,
        PpError::Untrusted,
        PpError::Truncated,
        PpError::Timeout,
    ];

    /// Stable metrics label.
    pub fn reason(self) -> &'static str {
        match self {
            PpError::UnknownVersion => "unknown_version",
            PpError::Malformed => "malformed",
            PpError::Oversized => "oversized",
            PpError::BadFamily => "bad_family",
            PpError::BadAddressLength => "bad_address_length",
            PpError::BadCommand => "bad_command",
            PpError::Untrusted => "untrusted",
            PpError::Truncated => "truncated",
            PpError::Timeout => "timeout",
        }
    }
}

impl fmt::Display for PpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PpError::UnknownVersion => "not a PROXY protocol v1 or v2 header",
            PpError::Malformed => "malformed PROXY v1 header",
            PpError::Oversized => "PROXY header too long",
            PpError::BadFamily => "unsupported or inconsistent PROXY address family",
            PpError::BadAddressLength => "PROXY v2 length too short for its address family",
            PpError::BadCommand => "unknown PROXY v2 command",
            PpError::Untrusted => "PROXY header expected from a peer not in --trusted-proxy",
            PpError::Truncated => "connection closed before the PROXY header was complete",
            PpError::Timeout => "PROXY header not received within --header-timeout",
        })
    }
}

impl std::error::Error for PpError {}

/// Parses the header at the start of `buf` (which may hold more: the stream's first bytes).
pub fn parse(buf: &[u8]) -> Result<Status<Header>, PpError> {
    match buf.first() {
        None => Ok(Status::Partial),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Err(PpError::UnknownVersion),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Status<Header>, PpError> {
    const PREFIX: &[u8] = b"PROXY ";
    let n = buf.len().min(PREFIX.len());
    if buf.get(..n) != PREFIX.get(..n) {
        return Err(PpError::UnknownVersion);
    }
    let window = buf.get(..buf.len().min(V1_MAX)).unwrap_or_default();
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        // Refuse a bad character now rather than after 107 bytes; a lone CR is allowed
        // only as the last byte seen (its LF may be on the way).
        let body = window.strip_suffix(b"\r").unwrap_or(window);
        if !body.iter().all(|b| (0x20..0x7f).contains(b)) {
            return Err(PpError::Malformed);
        }
        return if buf.len() >= V1_MAX {
            Err(PpError::Oversized)
        } else {
            Ok(Status::Partial)
        };
    };
    let line = window
        .get(..lf)
        .and_then(|l| l.strip_suffix(b"\r"))
        .ok_or(PpError::Malformed)?;
    if !line.iter().all(|b| (0x20..0x7f).contains(b)) {
        return Err(PpError::Malformed);
    }
    // Printable ASCII only, checked above.
    let line = std::str::from_utf8(line).map_err(|_| PpError::Malformed)?;
    let mut fields = line.split(' ');
    let _proxy = fields.next();
    let addrs = match fields.next() {
        // Anything may follow UNKNOWN: the sender could not say, the receiver ignores it.
        Some("UNKNOWN") => None,
        Some(proto @ ("TCP4" | "TCP6")) => {
            let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
                fields.next(),
            ) else {
                return Err(PpError::Malformed);
            };
            let (src, dst) = if proto == "TCP4" {
                (v1_ip::<Ipv4Addr>(src)?, v1_ip::<Ipv4Addr>(dst)?)
            } else {
                (v1_ip::<Ipv6Addr>(src)?, v1_ip::<Ipv6Addr>(dst)?)
            };
            Some(Addrs {
                src: SocketAddr::new(src, v1_port(sport)?),
                dst: SocketAddr::new(dst, v1_port(dport)?),
            })
        }
        Some("") | None => return Err(PpError::Malformed),
        Some(_) => return Err(PpError::BadFamily),
    };
    Ok(Status::Complete(Header {
        len: lf + 1,
        version: 1,
        addrs,
    }))
}

/// An address of the family the line names; one of the other family is a spoofed family.
fn v1_ip<T: std::str::FromStr + Into<IpAddr>>(s: &str) -> Result<IpAddr, PpError> {
    match s.parse::<T>() {
        Ok(a) => Ok(a.into()),
        Err(_) if s.parse::<IpAddr>().is_ok() => Err(PpError::BadFamily),
        Err(_) => Err(PpError::Malformed),
    }
}

/// 0-65535 in decimal, without sign or leading zeros.
fn v1_port(s: &str) -> Result<u16, PpError> {
    let ok = (1..=5).contains(&s.len())
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    if !ok {
        return Err(PpError::Malformed);
    }
    s.parse().map_err(|_| PpError::Malformed)
}

const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 1;
const AF_INET6: u8 = 2;
const AF_UNIX: u8 = 3;

fn parse_v2(buf: &[u8]) -> Result<Status<Header>, PpError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf.get(..n) != V2_SIGNATURE.get(..n) {
        return Err(PpError::UnknownVersion);
    }
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(Status::Partial);
    };
    if ver_cmd >> 4 != 2 {
        return Err(PpError::UnknownVersion);
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(PpError::BadCommand),
    };
    let Some(&fam) = buf.get(13) else {
        return Ok(Status::Partial);
    };
    let (family, transport) = (fam >> 4, fam & 0x0f);
    // LOCAL (health checks of the L4 tier itself): the block is ignored, whatever it says.
    let family_ok = match family {
        AF_UNSPEC => transport == 0,
        AF_INET | AF_INET6 | AF_UNIX => transport == 1,
        _ => false,
    };
    if !local && !family_ok {
        return Err(PpError::BadFamily);
    }
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return Ok(Status::Partial);
    };
    let payload = usize::from(u16::from_be_bytes([hi, lo]));
    if payload > V2_MAX_PAYLOAD {
        return Err(PpError::Oversized);
    }
    let need = match family {
        AF_INET => 12,
        AF_INET6 => 36,
        AF_UNIX => 216,
        _ => 0,
    };
    if !local && payload < need {
        return Err(PpError::BadAddressLength);
    }
    let len = 16 + payload;
    let Some(body) = buf.get(16..len) else {
        return Ok(Status::Partial);
    };
    let addrs = if local { None } else { v2_addrs(family, body) };
    Ok(Status::Complete(Header {
        len,
        version: 2,
        addrs,
    }))
}

/// The addresses of an INET/INET6 block (`body` is long enough: checked by the caller).
fn v2_addrs(family: u8, body: &[u8]) -> Option<Addrs> {
    let port = |at: usize| Some(u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]));
    let (src, dst, ports) = match family {
        AF_INET => {
            let a: [u8; 4] = body.get(0..4)?.try_into().ok()?;
            let b: [u8; 4] = body.get(4..8)?.try_into().ok()?;
            (IpAddr::from(a), IpAddr::from(b), 8)
        }
        AF_INET6 => {
            let a: [u8; 16] = body.get(0..16)?.try_into().ok()?;
            let b: [u8; 16] = body.get(16..32)?.try_into().ok()?;
            (IpAddr::from(a), IpAddr::from(b), 32)
        }
        // UNSPEC and UNIX carry no IP address: the socket's own endpoints apply.
        _ => return None,
    };
    Some(Addrs {
        src: SocketAddr::new(src, port(ports)?),
        dst: SocketAddr::new(dst, port(ports + 2)?),
    })
}

/// Which header to send a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Text.
    V1,
    /// Binary.
    V2,
}

impl Version {
    /// `v1` or `v2`, as in `-B ...,proxy=v2` and the registration field.
    pub fn parse(v: &str) -> Option<Version> {
        match v {
            "v1" => Some(Version::V1),
            "v2" => Some(Version::V2),
            _ => None,
        }
    }

    /// The spelling [`Version::parse`] takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// Appends the header announcing `src → dst` to `out`. IPv4-mapped addresses are written
/// as IPv4; when only one side is IPv4, both are written as IPv6 (v1 and v2 carry one
/// family per header).
pub fn encode(version: Version, src: SocketAddr, dst: SocketAddr, out: &mut Vec<u8>) {
    let (s, d) = (src.ip().to_canonical(), dst.ip().to_canonical());
    let v6 = |ip: IpAddr| match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    let pair = match (s, d) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (IpAddr::V4(a), IpAddr::V4(b)),
        _ => (IpAddr::V6(v6(s)), IpAddr::V6(v6(d))),
    };
    match version {
        Version::V1 => {
            let proto = if pair.0.is_ipv4() { "TCP4" } else { "TCP6" };
            let line = format!(
                "PROXY {proto} {} {} {} {}\r\n",
                pair.0,
                pair.1,
                src.port(),
                dst.port()
            );
            out.extend_from_slice(line.as_bytes());
        }
        Version::V2 => {
            out.extend_from_slice(&V2_SIGNATURE);
            out.push(0x21);
            match pair {
                (IpAddr::V4(a), IpAddr::V4(b)) => {
                    out.extend_from_slice(&[0x11, 0, 12]);
                    out.extend_from_slice(&a.octets());
                    out.extend_from_slice(&b.octets());
                }
                _ => {
                    out.extend_from_slice(&[0x21, 0, 36]);
                    out.extend_from_slice(&v6(pair.0).octets());
                    out.extend_from_slice(&v6(pair.1).octets());
                }
            }
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn complete(buf: &[u8]) -> Header {
        match parse(buf) {
            Ok(Status::Complete(h)) => h,
            other => panic!("{other:?} for {buf:?}"),
        }
    }

    /// Every proper prefix is Partial, and the whole (with trailing bytes) is the same header.
    fn byte_by_byte(buf: &[u8]) -> Header {
        let h = complete(buf);
        for k in 0..h.len {
            assert_eq!(
                parse(&buf[..k]),
                Ok(Status::Partial),
                "prefix {k} of {buf:?}"
            );
        }
        let mut more = buf[..h.len].to_vec();
        more.extend_from_slice(b"\x16\x03\x01GET / HTTP/1.1\r\n");
        assert_eq!(complete(&more), h);
        h
    }

    fn v2(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(ver_cmd);
        v.push(fam);
        v.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn v1_good() {
        let h = byte_by_byte(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n");
        assert_eq!(h.version, 1);
        assert_eq!(h.len, 45);
        assert_eq!(
            h.addrs,
            Some(Addrs {
                src: sa("192.0.2.1:56324"),
                dst: sa("198.51.100.2:443")
            })
        );
        let h = byte_by_byte(b"PROXY TCP6 2001:db8::1 ::1 0 65535\r\n");
        assert_eq!(h.addrs.unwrap().src, sa("[2001:db8::1]:0"));
        assert_eq!(h.addrs.unwrap().dst.port(), 65535);
        assert_eq!(byte_by_byte(b"PROXY UNKNOWN\r\n").addrs, None);
        assert_eq!(
            byte_by_byte(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").addrs,
            None
        );
    }

    #[test]
    fn v1_longest_is_107_bytes() {
        let src = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";
        let tcp6 = format!("PROXY TCP6 {src} {src} 65535 65535\r\n");
        assert_eq!(byte_by_byte(tcp6.as_bytes()).len, V1_MAX - 3);
        // The specification's worst case: UNKNOWN followed by the longest TCP6 fields.
        let line = format!("PROXY UNKNOWN {src} {src} 65535 65535\r\n");
        assert_eq!(line.len(), V1_MAX);
        assert_eq!(byte_by_byte(line.as_bytes()).len, V1_MAX);
        // One byte more without a line end is refused, not waited for.
        let long = format!("PROXY UNKNOWN {}", "x".repeat(V1_MAX));
        assert_eq!(parse(long.as_bytes()), Err(PpError::Oversized));
        assert_eq!(parse(&long.as_bytes()[..V1_MAX - 1]), Ok(Status::Partial));
    }

    #[test]
    fn v1_bad() {
        let cases: &[(&[u8], PpError)] = &[
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", PpError::Malformed),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", PpError::Malformed),
            (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", PpError::Malformed),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", PpError::Malformed),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", PpError::Malformed),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
                PpError::Malformed,
            ),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", PpError::Malformed),
            (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", PpError::Malformed),
            (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", PpError::BadFamily),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", PpError::BadFamily),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", PpError::BadFamily),
            (b"PROXY \r\n", PpError::Malformed),
            (b"PROXY\r\n", PpError::UnknownVersion),
            (b"PROXY TCP4 1.2.3.4\x005.6.7.8", PpError::Malformed),
            (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", PpError::Malformed),
            (b"GET / HTTP/1.1\r\n", PpError::UnknownVersion),
            (b"PROXZ", PpError::UnknownVersion),
            (b"\x16\x03\x01", PpError::UnknownVersion),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse(input),
                Err(*want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn v2_good() {
        let mut body = vec![192, 0, 2, 1, 10, 0, 0, 1];
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(&8080u16.to_be_bytes());
        let h = byte_by_byte(&v2(0x21, 0x11, &body));
        assert_eq!(h.len, 28);
        assert_eq!(
            h.addrs,
            Some(Addrs {
                src: sa("192.0.2.1:443"),
                dst: sa("10.0.0.1:8080")
            })
        );
        // TLVs after the addresses are skipped.
        body.extend_from_slice(&[0x04, 0, 3, b'a', b'b', b'c']);
        assert_eq!(byte_by_byte(&v2(0x21, 0x11, &body)).len, 34);
        // LOCAL: whatever the block says, no addresses.
        assert_eq!(byte_by_byte(&v2(0x20, 0x00, &[])).addrs, None);
        assert_eq!(byte_by_byte(&v2(0x20, 0x99, &[1, 2])).addrs, None);
        assert_eq!(byte_by_byte(&v2(0x21, 0x00, &[])).addrs, None);
        assert_eq!(byte_by_byte(&v2(0x21, 0x31, &[0; 216])).addrs, None);
        let mut six = vec![0u8; 36];
        six[15] = 1;
        six[32..34].copy_from_slice(&7u16.to_be_bytes());
        let h = byte_by_byte(&v2(0x21, 0x21, &six));
        assert_eq!(h.addrs.unwrap().src, sa("[::1]:7"));
        let max = v2(0x21, 0x11, &[0; V2_MAX_PAYLOAD]);
        assert_eq!(byte_by_byte(&max).len, MAX_HEADER);
    }

    #[test]
    fn v2_bad() {
        let cases: Vec<(Vec<u8>, PpError)> = vec![
            (v2(0x11, 0x11, &[0; 12]), PpError::UnknownVersion),
            (v2(0x31, 0x11, &[0; 12]), PpError::UnknownVersion),
            (v2(0x22, 0x11, &[0; 12]), PpError::BadCommand),
            (v2(0x21, 0x41, &[0; 12]), PpError::BadFamily),
            (v2(0x21, 0x12, &[0; 12]), PpError::BadFamily),
            (v2(0x21, 0x10, &[0; 12]), PpError::BadFamily),
            (v2(0x21, 0x01, &[]), PpError::BadFamily),
            (v2(0x21, 0x11, &[0; 11]), PpError::BadAddressLength),
            (v2(0x21, 0x21, &[0; 12]), PpError::BadAddressLength),
            (v2(0x21, 0x31, &[0; 36]), PpError::BadAddressLength),
            (v2(0x21, 0x11, &[0; V2_MAX_PAYLOAD + 1]), PpError::Oversized),
            (b"\r\n\r\n\0\r\nQUIX".to_vec(), PpError::UnknownVersion),
            (b"\r\nGET".to_vec(), PpError::UnknownVersion),
        ];
        for (input, want) in cases {
            assert_eq!(parse(&input), Err(want), "{input:?}");
            // Decided from the fixed part: nothing after byte 16 is awaited.
            if input.len() > 16 && want != PpError::UnknownVersion {
                assert_eq!(parse(&input[..16]), Err(want), "{input:?}");
            }
        }
    }

    #[test]
    fn encode_round_trips() {
        let pairs = [
            ("192.0.2.1:5000", "10.0.0.1:80"),
            ("[2001:db8::7]:1", "[::1]:65535"),
            ("[::ffff:192.0.2.1]:5000", "10.0.0.1:80"),
            ("192.0.2.1:5000", "[2001:db8::1]:80"),
        ];
        for (s, d) in pairs {
            for version in [Version::V1, Version::V2] {
                let mut out = Vec::new();
                encode(version, sa(s), sa(d), &mut out);
                let h = byte_by_byte(&out);
                assert_eq!(h.len, out.len());
                let a = h.addrs.unwrap();
                assert_eq!(a.src.ip().to_canonical(), sa(s).ip().to_canonical());
                assert_eq!(a.dst.ip().to_canonical(), sa(d).ip().to_canonical());
                assert_eq!((a.src.port(), a.dst.port()), (sa(s).port(), sa(d).port()));
            }
        }
        let mut out = Vec::new();
        encode(
            Version::V1,
            sa("192.0.2.1:5000"),
            sa("10.0.0.1:80"),
            &mut out,
        );
        assert_eq!(out, b"PROXY TCP4 192.0.2.1 10.0.0.1 5000 80\r\n");
    }
}
