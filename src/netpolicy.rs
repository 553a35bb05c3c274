//! Which addresses wslb may be told to dial, and which peers it believes: CIDR blocks
//! (`--backend-allow`, `--trusted-proxy`), the binding rules for registered backends, and
//! the record of connections wslb itself opened (so neither its proxy nor its control
//! listener mistakes them for local clients). Pure except [`is_local_ip`].

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

/// An address block: `10.0.0.0/8`, `fd00::/8`, or a bare address (a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Does the block hold `ip`? IPv4-mapped IPv6 addresses count as their IPv4 form, so a
    /// dual-stack listener's peers match IPv4 blocks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        // A block written in IPv4-mapped form (`::ffff:10.0.0.0/104`) is the IPv4 block it
        // maps; addresses are compared canonically (a dual-stack socket reports IPv4 peers
        // as `::ffff:a.b.c.d`). Other IPv6 blocks, `::/0` included, hold no IPv4 address.
        let (net, prefix) = match self.net {
            IpAddr::V6(n) if self.prefix >= 96 => match n.to_ipv4_mapped() {
                Some(v4) => (IpAddr::V4(v4), self.prefix - 96),
                None => (self.net, self.prefix),
            },
            other => (other, self.prefix),
        };
        match (net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    /// Network address (host bits zero).
    pub fn network(&self) -> IpAddr {
        self.net
    }

    /// Prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// Parses `ADDR/PREFIX` or a bare address. Host bits set below the prefix are refused
/// (`10.0.0.1/8` is more likely a typo than a wish to allow all of 10/8).
pub fn parse_cidr(v: &str) -> Result<Cidr, &'static str> {
    const WHY: &str = "expected an address block like 10.0.0.0/8 or fd00::/8";
    let (addr, prefix) = match v.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (v, None),
    };
    let net: IpAddr = addr.parse().map_err(|_| WHY)?;
    let max = if net.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
            p.parse::<u8>().map_err(|_| WHY)?
        }
        Some(_) => return Err(WHY),
    };
    if prefix > max {
        return Err("prefix longer than the address");
    }
    let cidr = Cidr { net, prefix };
    let masked = match net {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(
            u32::from(a) & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0),
        )),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(
            u128::from(a) & u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0),
        )),
    };
    if masked != net {
        return Err("address has bits set beyond the prefix");
    }
    Ok(cidr)
}

/// Is `ip` in any of `blocks`?
pub fn any_contains(blocks: &[Cidr], ip: IpAddr) -> bool {
    blocks.iter().any(|c| c.contains(ip))
}

/// Why a registered binding was refused. [`BindingRule::rule`] names the rule in the
/// `error` message, the log line and the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingRule {
    /// One of wslb's own listeners (proxy, TLS, control): a self-loop, or the control
    /// API reached through the proxy.
    OwnListener,
    /// `0.0.0.0` / `::`: dials "this host", any port on it.
    Unspecified,
    /// `255.255.255.255`.
    Broadcast,
    /// Multicast groups are not TCP peers.
    Multicast,
    /// 169.254.0.0/16 and fe80::/10: cloud metadata services live here.
    LinkLocal,
    /// Not the control connection's own address and not in `--backend-allow`.
    NotPeer,
}

impl BindingRule {
    /// Stable name of the rule.
    pub fn rule(self) -> &'static str {
        match self {
            BindingRule::OwnListener => "own_listener",
            BindingRule::Unspecified => "unspecified",
            BindingRule::Broadcast => "broadcast",
            BindingRule::Multicast => "multicast",
            BindingRule::LinkLocal => "link_local",
            BindingRule::NotPeer => "not_peer_address",
        }
    }

    /// Every rule, for metrics.
    pub const ALL: [BindingRule; 6] = [
        BindingRule::OwnListener,
        BindingRule::Unspecified,
        BindingRule::Broadcast,
        BindingRule::Multicast,
        BindingRule::LinkLocal,
        BindingRule::NotPeer,
    ];
}

impl fmt::Display for BindingRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BindingRule::OwnListener => "binding points at one of the balancer's own listeners",
            BindingRule::Unspecified => "binding address is unspecified (0.0.0.0 or ::)",
            BindingRule::Broadcast => "binding address is a broadcast address",
            BindingRule::Multicast => "binding address is a multicast address",
            BindingRule::LinkLocal => "binding address is link-local (169.254.0.0/16, fe80::/10)",
            BindingRule::NotPeer => {
                "binding address is not this control connection's own address (see --backend-allow)"
            }
        })
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// Would dialling `target` reach one of `own` (wslb's listening addresses)? A listener on
/// an unspecified address takes connections to every local address of its family (and, for
/// `::`, IPv4 too), so there `is_local` decides.
pub fn hits_own_listener(
    target: SocketAddr,
    own: &[SocketAddr],
    is_local: &dyn Fn(IpAddr) -> bool,
) -> bool {
    let ip = target.ip().to_canonical();
    own.iter().any(|l| {
        if l.port() != target.port() {
            return false;
        }
        let lip = l.ip().to_canonical();
        if lip == ip {
            return true;
        }
        let family_ok = lip.is_ipv6() || ip.is_ipv4();
        lip.is_unspecified() && family_ok && (ip.is_unspecified() || is_local(ip))
    })
}

/// Checks one binding of a registration. The fixed rules come first: no flag relaxes them.
pub fn check_binding(
    target: SocketAddr,
    peer: IpAddr,
    allow: &[Cidr],
    own: &[SocketAddr],
    is_local: &dyn Fn(IpAddr) -> bool,
) -> Result<(), BindingRule> {
    let ip = target.ip().to_canonical();
    if ip.is_unspecified() {
        return Err(BindingRule::Unspecified);
    }
    if ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Err(BindingRule::Broadcast);
    }
    if ip.is_multicast() {
        return Err(BindingRule::Multicast);
    }
    if is_link_local(ip) {
        return Err(BindingRule::LinkLocal);
    }
    if hits_own_listener(target, own, is_local) {
        return Err(BindingRule::OwnListener);
    }
    if ip == peer.to_canonical() || any_contains(allow, ip) {
        Ok(())
    } else {
        Err(BindingRule::NotPeer)
    }
}

/// Is `ip` an address of this host? Binding a UDP socket to it succeeds only for local
/// addresses (no packet is sent), which covers every interface without listing them.
pub fn is_local_ip(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Outgoing connections wslb opened recently, by their local address: an accepted
/// connection whose peer is one of them (and whose local end is that connection's
/// destination) is wslb talking to itself. Entries live a bounded time: the accept that
/// matters follows the connect within a poll turn or two, and a connect is abandoned after
/// `--connect-timeout` anyway.
#[derive(Debug)]
pub struct SelfDial {
    by_source: HashMap<SocketAddr, (SocketAddr, Instant)>,
    /// Age beyond which entries may go (the last one [`SelfDial::prune`] was given).
    max_age: Duration,
}

impl Default for SelfDial {
    fn default() -> Self {
        SelfDial {
            by_source: HashMap::new(),
            max_age: Duration::from_secs(5),
        }
    }
}

/// Most outgoing connections remembered (about 100 bytes each, so ~1.5 MiB at most): under
/// heavier connection churn than this per `max_age`, new ones go unrecorded and the binding
/// rules alone keep wslb from dialling itself.
const SELF_DIAL_MAX: usize = 16_384;

impl SelfDial {
    /// Records an outgoing connection `source → dest`.
    pub fn note(&mut self, source: SocketAddr, dest: SocketAddr, now: Instant) {
        if self.by_source.len() >= SELF_DIAL_MAX {
            self.prune(now, self.max_age);
        }
        if self.by_source.len() < SELF_DIAL_MAX {
            self.by_source
                .insert(canonical(source), (canonical(dest), now));
        }
    }

    /// Might a connection from `peer` be one of ours? Cheap: one lookup, no system call.
    pub fn maybe_own(&self, peer: SocketAddr) -> bool {
        self.by_source.contains_key(&canonical(peer))
    }

    /// Is the accepted connection `peer → local` one wslb opened?
    pub fn is_own(&self, peer: SocketAddr, local: SocketAddr) -> bool {
        let local = canonical(local);
        self.by_source
            .get(&canonical(peer))
            .is_some_and(|(dest, _)| *dest == local)
    }

    /// Forgets entries older than `max_age`.
    pub fn prune(&mut self, now: Instant, max_age: Duration) {
        self.max_age = max_age;
        self.by_source
            .retain(|_, (_, at)| now.saturating_duration_since(*at) <= max_age);
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.by_source.len()
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.by_source.is_empty()
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(v: &str) -> Cidr {
        parse_cidr(v).unwrap()
    }

    fn ip(v: &str) -> IpAddr {
        v.parse().unwrap()
    }

    fn sa(v: &str) -> SocketAddr {
        v.parse().unwrap()
    }

    #[test]
    fn cidr_parse_and_contains() {
        assert!(c("10.0.0.0/8").contains(ip("10.200.1.1")));
        assert!(!c("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(c("0.0.0.0/0").contains(ip("1.2.3.4")));
        assert!(!c("0.0.0.0/0").contains(ip("::1")));
        assert!(c("::/0").contains(ip("::1")));
        assert!(c("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!c("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(c("fd00::/8").contains(ip("fd12::1")));
        assert!(!c("fd00::/8").contains(ip("fe80::1")));
        assert!(
            c("10.213.7.0/24").contains(ip("::ffff:10.213.7.9")),
            "mapped"
        );
        // A block written IPv4-mapped holds the IPv4 addresses it maps (found by the fuzzer:
        // it used to hold nothing, not even itself); plain IPv6 blocks hold no IPv4 address.
        assert!(c("::ffff:1.1.2.3").contains(ip("::ffff:1.1.2.3")));
        assert!(c("::ffff:10.0.0.0/104").contains(ip("10.9.9.9")));
        assert!(!c("::ffff:10.0.0.0/104").contains(ip("11.0.0.1")));
        assert!(!c("::/0").contains(ip("10.0.0.1")));
        assert_eq!(c("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(c("::1").prefix(), 128);
        for bad in [
            "",
            "/8",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.1/8",
            "10.0.0.0/+8",
            "10.0.0.0/ 8",
            "10.0.0.0/0008",
            "example.com/8",
            "10.0.0.0/8/8",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fixed_rules_come_before_any_allowance() {
        let all = [c("0.0.0.0/0"), c("::/0")];
        let own = [sa("127.0.0.1:8080"), sa("0.0.0.0:9090")];
        let local = |i: IpAddr| i.is_loopback() || i == ip("10.0.0.1");
        let peer = ip("10.0.0.7");
        let cases = [
            ("0.0.0.0:80", BindingRule::Unspecified),
            ("[::]:80", BindingRule::Unspecified),
            ("255.255.255.255:80", BindingRule::Broadcast),
            ("224.0.0.1:80", BindingRule::Multicast),
            ("[ff02::1]:80", BindingRule::Multicast),
            ("169.254.169.254:80", BindingRule::LinkLocal),
            ("[fe80::1]:80", BindingRule::LinkLocal),
            ("127.0.0.1:8080", BindingRule::OwnListener),
            ("127.0.0.1:9090", BindingRule::OwnListener),
            ("10.0.0.1:9090", BindingRule::OwnListener),
            ("[::ffff:127.0.0.1]:8080", BindingRule::OwnListener),
        ];
        for (target, rule) in cases {
            assert_eq!(
                check_binding(sa(target), peer, &all, &own, &local),
                Err(rule),
                "{target}"
            );
        }
        // A different host on the control port is not us.
        assert_eq!(
            check_binding(sa("10.0.0.8:9090"), peer, &all, &own, &local),
            Ok(())
        );
    }

    #[test]
    fn peer_rule_and_allow_list() {
        let own = [sa("127.0.0.1:8080")];
        let local = |i: IpAddr| i.is_loopback();
        let peer = ip("10.0.0.7");
        assert_eq!(
            check_binding(sa("10.0.0.7:9000"), peer, &[], &own, &local),
            Ok(())
        );
        assert_eq!(
            check_binding(sa("127.0.0.1:23720"), peer, &[], &own, &local),
            Err(BindingRule::NotPeer)
        );
        assert_eq!(
            check_binding(sa("10.0.0.8:9000"), peer, &[], &own, &local),
            Err(BindingRule::NotPeer)
        );
        assert_eq!(
            check_binding(sa("10.0.0.8:9000"), peer, &[c("10.0.0.0/24")], &own, &local),
            Ok(())
        );
        // A dual-stack control listener sees IPv4 peers as mapped addresses.
        assert_eq!(
            check_binding(
                sa("10.0.0.7:9000"),
                ip("::ffff:10.0.0.7"),
                &[],
                &own,
                &local
            ),
            Ok(())
        );
    }

    #[test]
    fn own_listener_on_unspecified_address() {
        let local = |i: IpAddr| i.is_loopback() || i == ip("192.0.2.1");
        let v4 = [sa("0.0.0.0:80")];
        assert!(hits_own_listener(sa("127.0.0.1:80"), &v4, &local));
        assert!(hits_own_listener(sa("192.0.2.1:80"), &v4, &local));
        assert!(!hits_own_listener(sa("192.0.2.9:80"), &v4, &local));
        assert!(!hits_own_listener(sa("127.0.0.1:81"), &v4, &local));
        assert!(!hits_own_listener(sa("[::1]:80"), &v4, &local), "v4 only");
        let v6 = [sa("[::]:80")];
        assert!(hits_own_listener(sa("[::1]:80"), &v6, &local));
        assert!(hits_own_listener(sa("127.0.0.1:80"), &v6, &local), "dual");
    }

    #[test]
    fn local_ip_probe() {
        assert!(is_local_ip(ip("127.0.0.1")));
        assert!(is_local_ip(ip("127.3.4.5")));
        // TEST-NET-3: never assigned to a host.
        assert!(!is_local_ip(ip("203.0.113.77")));
    }

    #[test]
    fn self_dial_matches_source_and_destination() {
        let mut s = SelfDial::default();
        let t0 = Instant::now();
        s.note(sa("127.0.0.1:40000"), sa("127.0.0.1:8080"), t0);
        assert!(s.maybe_own(sa("127.0.0.1:40000")));
        assert!(s.is_own(sa("127.0.0.1:40000"), sa("127.0.0.1:8080")));
        assert!(s.is_own(sa("[::ffff:127.0.0.1]:40000"), sa("127.0.0.1:8080")));
        assert!(!s.is_own(sa("127.0.0.1:40000"), sa("127.0.0.1:9090")));
        assert!(!s.maybe_own(sa("127.0.0.1:40001")));
        s.prune(t0 + Duration::from_secs(5), Duration::from_secs(10));
        assert_eq!(s.len(), 1);
        s.prune(t0 + Duration::from_secs(11), Duration::from_secs(10));
        assert!(s.is_empty());
    }

    #[test]
    fn self_dial_is_bounded() {
        let mut s = SelfDial::default();
        let t0 = Instant::now();
        let dest = sa("127.0.0.1:8080");
        for i in 0..SELF_DIAL_MAX + 10 {
            let port = u16::try_from(1024 + i % 60_000).unwrap();
            let ip = IpAddr::V4(Ipv4Addr::from(
                0x7f00_0000 + u32::try_from(i / 60_000 + 1).unwrap(),
            ));
            s.note(SocketAddr::new(ip, port), dest, t0);
        }
        assert_eq!(s.len(), SELF_DIAL_MAX, "full: new ones are not recorded");
        // Once the old ones are past max_age, a new note makes room.
        let later = t0 + Duration::from_secs(6);
        s.note(sa("127.9.9.9:1"), dest, later);
        assert_eq!(s.len(), 1);
        assert!(s.is_own(sa("127.9.9.9:1"), dest));
    }
}
