//! The backend pool: every backend the balancer may pick, its load, its health, and its idle
//! keep-alive connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::Token;
use rand::Rng;
use rustls_pki_types::ServerName;
use slab::Slab;

use crate::backends::balance::{Algorithm, Candidate, Selector};
use crate::backends::load::LoadView;
use crate::backends::pool::{IdlePool, POOL_PER_BACKEND};
use crate::config::{authority_host, is_tls_url, parse_backend_url, BackendSpec};
use crate::control::protocol::Registration;
use crate::net::proxy_protocol::Version;
use crate::net::transport::Transport;
use crate::observe::log;

/// First back-off after a failed connect; doubles per consecutive failure.
const DOWN_BASE: Duration = Duration::from_millis(500);
/// Longest back-off.
const DOWN_MAX: Duration = Duration::from_secs(30);

/// Where a backend is in its life (docs/PROTOCOL.md, "Backend states").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    /// Eligible for new clients.
    Ready,
    /// Asked for no new clients; existing ones stay.
    Draining,
    /// Control connection lost or deregistered: kept only while connections still use it.
    Gone,
}

impl BackendState {
    /// Lower-case name for logs and APIs.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Ready => "ready",
            BackendState::Draining => "draining",
            BackendState::Gone => "gone",
        }
    }
}

/// Where a backend came from; only registered ones leave by themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `-B` on the command line.
    Flag,
    /// `--backends-file`, re-read on SIGHUP.
    File,
    /// `POST /api/backends`.
    Api,
    /// A control connection announced it.
    Registration,
}

impl Source {
    /// Name in `GET /api/backends`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Flag => "flag",
            Source::File => "file",
            Source::Api => "api",
            Source::Registration => "registration",
        }
    }
}

/// A control connection, by slab key and generation.
pub type Owner = (usize, u64);

/// A connect failure the backend's control connection should hear about.
#[derive(Debug)]
pub struct Unreachable {
    /// Control connection to tell.
    pub owner: Owner,
    /// The binding that failed.
    pub binding: String,
}

/// One backend.
#[derive(Debug)]
pub struct Backend {
    /// Stable name: the URL for static backends, the guid for registered ones.
    pub name: String,
    /// "backend connect failed", at most once per interval per backend: many connects in
    /// flight can fail at the same moment.
    connect_failed_log: log::Repeated,
    /// Registered (not `-B`) backends have a guid.
    pub guid: Option<String>,
    /// Flag, file, API or registration.
    pub source: Source,
    /// Id used by sticky sessions: the guid, or a hash of the `-B` URL (same on every
    /// balancer given the same flags).
    pub sticky_id: String,
    /// URLs as given or announced.
    pub bindings: Vec<String>,
    /// Where to connect, same order as `bindings`.
    pub addrs: Vec<SocketAddr>,
    /// TLS server name per binding (`None` = plain), same order.
    tls_names: Vec<Option<ServerName<'static>>>,
    next_addr: usize,
    /// Life-cycle state.
    pub state: BackendState,
    /// The control connection that registered it.
    pub owner: Option<Owner>,
    /// Most connections at once; 0 = no limit.
    pub max_connections: u32,
    /// Labels from the registration.
    pub tags: BTreeMap<String, String>,
    /// `proxy=v1|v2` / registration `proxy_protocol`: each connection names its client, so
    /// none is pooled for another client.
    pub proxy: Option<Version>,
    /// Relative weight.
    pub weight: u32,
    /// Active connections: WebSocket tunnels plus in-flight HTTP exchanges.
    pub active: u32,
    /// Consecutive failed connects; 0 = healthy.
    pub failures: u32,
    /// Not preferred until then (passive health check).
    pub down_until: Option<Instant>,
    /// Times this backend was picked.
    pub selected: u64,
    /// Issue 18: public bindings, reported and provisional load, dispatches.
    pub dispatch: crate::backends::load::DispatchLoad,
    idle: IdlePool,
}

/// Where to dial a backend: address and, for TLS bindings, the name to verify and send as SNI.
#[derive(Debug, Clone)]
pub struct Dial {
    /// Socket address.
    pub addr: SocketAddr,
    /// TLS server name; `None` = plain TCP.
    pub tls: Option<ServerName<'static>>,
    /// PROXY header to open the connection with.
    pub proxy: Option<Version>,
}

/// The TLS server name for a binding URL (`None` for plain ones).
fn tls_name(url: &str) -> Option<ServerName<'static>> {
    if !is_tls_url(url) {
        return None;
    }
    let host = authority_host(parse_backend_url(url).ok()?);
    ServerName::try_from(host.to_string()).ok()
}

/// All backends.
#[derive(Debug, Default)]
pub struct Registry {
    backends: Slab<Backend>,
    selector: Selector,
    scratch: Vec<Candidate>,
    /// Connect failures of registered backends, for the server to pass on.
    pub unreachable: Vec<Unreachable>,
    /// Most idle pooled connections over all backends (their descriptors are budgeted).
    pool_max: usize,
    /// Descriptors the clients leave free for idle pooled connections (None: unbounded,
    /// until the server sets it).
    pool_room: Option<usize>,
    /// Connections this process opened, so its listeners can recognise them.
    pub self_dial: crate::netpolicy::SelfDial,
    /// Which load `pick` compares; [`Registry::choose_for_dispatch`] switches it for one
    /// choice so that dispatching goes through the same `route::choose` as proxying.
    view: crate::backends::load::LoadView,
}

impl Registry {
    /// A registry holding the static `-B` backends.
    pub fn from_specs(specs: &[BackendSpec]) -> Self {
        let mut r = Registry {
            // Until the server sizes it from the descriptor limit.
            pool_max: POOL_PER_BACKEND,
            ..Registry::default()
        };
        for s in specs {
            r.add_static(s, Source::Flag);
        }
        r
    }

    /// Adds a static backend (flag, file or API); refuses a URL already in use.
    pub fn add_static(&mut self, s: &BackendSpec, source: Source) -> Option<usize> {
        if self.find(&s.url).is_some() {
            return None;
        }
        let mut b = Backend::new(
            s.url.clone(),
            None,
            vec![s.url.clone()],
            vec![s.addr],
            s.weight,
        );
        b.max_connections = s.max_connections;
        b.proxy = s.proxy;
        b.dispatch.public = s.public.clone();
        b.source = source;
        Some(self.backends.insert(b))
    }

    /// The live (not gone) backend named `name` (URL) or with that guid.
    pub fn find(&self, name: &str) -> Option<usize> {
        self.backends
            .iter()
            .find(|(_, b)| {
                b.state != BackendState::Gone && (b.name == name || b.guid.as_deref() == Some(name))
            })
            .map(|(id, _)| id)
    }

    /// New weight (1..=1000) and/or connection cap (0 = none) for a backend.
    pub fn update(&mut self, id: usize, weight: Option<u32>, max_connections: Option<u32>) {
        if let Some(b) = self.backends.get_mut(id) {
            if let Some(w) = weight {
                b.weight = w;
            }
            if let Some(m) = max_connections {
                b.max_connections = m;
            }
        }
    }

    /// The backend as the admin API and logs describe it.
    pub fn get(&self, id: usize) -> Option<&Backend> {
        self.backends.get(id)
    }

    /// Caps the idle pooled connections over all backends.
    pub fn set_pool_max(&mut self, max: usize) {
        self.pool_max = max;
    }

    /// Descriptors the clients do not need now (two per client slot still free): idle pooled
    /// connections may use them and no more. Past it, the oldest idle ones close at once, so
    /// a client accepted near the descriptor limit finds one for its backend leg.
    pub fn set_pool_room(&mut self, room: usize) {
        self.pool_room = Some(room);
        let mut pooled = self.pooled();
        while pooled > room {
            // The backend whose oldest idle connection goes: the one holding the most.
            let fullest = self
                .backends
                .iter_mut()
                .max_by_key(|(_, b)| b.idle.len())
                .map(|(_, b)| b);
            if !fullest.is_some_and(|b| b.idle.close_oldest()) {
                break;
            }
            pooled -= 1;
        }
    }

    fn pooled(&self) -> usize {
        self.backends.iter().map(|(_, b)| b.idle.len()).sum()
    }

    /// Remembers a backend connection just opened (its source port is now bound), so that
    /// if it lands on one of wslb's own listeners the accept refuses it.
    pub fn note_dialled(&mut self, stream: &Transport, dest: SocketAddr, now: Instant) {
        if let Ok(src) = stream.socket().local_addr() {
            self.self_dial.note(src, dest, now);
        }
    }

    /// Number of backends known, in any state.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// Adds or updates a registered backend. Returns its id, whether it is new (as opposed
    /// to a guid seen before), and the previous owner if another control connection held it.
    pub fn register(&mut self, reg: &Registration, owner: Owner) -> (usize, bool, Option<Owner>) {
        let existing = self
            .backends
            .iter()
            .find(|(_, b)| b.guid.as_deref() == Some(reg.guid.as_str()))
            .map(|(id, _)| id);
        let fresh = existing.is_none();
        let id = match existing {
            Some(id) => id,
            None => self.backends.insert(Backend::new(
                reg.guid.clone(),
                Some(reg.guid.clone()),
                Vec::new(),
                Vec::new(),
                reg.weight,
            )),
        };
        let Some(b) = self.backends.get_mut(id) else {
            return (id, fresh, None);
        };
        if b.addrs != reg.addrs {
            // New bindings: old pooled connections point elsewhere, old failures do not apply.
            b.idle.clear();
            b.failures = 0;
            b.down_until = None;
            b.next_addr = 0;
        }
        b.bindings = reg.bindings.clone();
        b.tls_names = reg.bindings.iter().map(|u| tls_name(u)).collect();
        b.addrs = reg.addrs.clone();
        b.weight = reg.weight;
        b.max_connections = reg.max_connections;
        b.tags = reg.tags.clone();
        b.dispatch.public = reg.public_bindings.clone();
        if b.proxy != reg.proxy_protocol {
            b.idle.clear();
            b.proxy = reg.proxy_protocol;
        }
        b.state = BackendState::Ready;
        let previous = b.owner.replace(owner).filter(|&o| o != owner);
        (id, fresh, previous)
    }

    /// Changes a backend's state; a `Gone` backend with no connections is removed.
    /// Backends with a live control connection that may take clients now: what a binary
    /// upgrade's new process waits to see registered again.
    pub fn registered_eligible(&self) -> usize {
        self.backends
            .iter()
            .filter(|(_, b)| b.owner.is_some() && b.eligible())
            .count()
    }

    /// Forgets the backend's control connection but keeps it as it is (a binary upgrade
    /// moved its agent to the new process; this one serves until it drains).
    pub fn orphan(&mut self, id: usize) {
        if let Some(b) = self.backends.get_mut(id) {
            b.owner = None;
        }
    }

    pub fn set_state(&mut self, id: usize, state: BackendState) {
        if let Some(b) = self.backends.get_mut(id) {
            b.state = state;
            if state == BackendState::Gone {
                b.owner = None;
                b.idle.clear();
            }
        }
        self.remove_if_unused(id);
    }

    fn remove_if_unused(&mut self, id: usize) {
        let unused = self
            .backends
            .get(id)
            .is_some_and(|b| b.state == BackendState::Gone && b.active == 0);
        if unused {
            self.backends.remove(id);
            self.selector.forget(id);
        }
    }

    /// Next binding to connect to for `id` (rotating over its bindings).
    pub fn next_dial(&mut self, id: usize) -> Option<Dial> {
        let b = self.backends.get_mut(id)?;
        let i = b.next_addr % b.addrs.len().max(1);
        let addr = *b.addrs.get(i)?;
        let tls = b.tls_names.get(i).cloned().flatten();
        b.next_addr = b.next_addr.wrapping_add(1);
        Some(Dial {
            addr,
            tls,
            proxy: b.proxy,
        })
    }

    /// Name of a backend (guid for registered ones).
    pub fn name(&self, id: usize) -> Option<&str> {
        self.backends
            .get(id)
            .map(|b| b.guid.as_deref().unwrap_or(&b.name))
    }

    /// Eligible backends not in `exclude`, with their names (for selection hooks).
    pub fn eligible(&self, exclude: &[usize]) -> Vec<(usize, String)> {
        self.backends
            .iter()
            .filter(|(id, b)| b.eligible() && !exclude.contains(id))
            .map(|(id, b)| (id, b.guid.clone().unwrap_or_else(|| b.name.clone())))
            .collect()
    }

    /// The eligible backend whose sticky id is `sticky_id`, unless excluded or backing off.
    pub fn find_sticky(&self, sticky_id: &str, exclude: &[usize], now: Instant) -> Option<usize> {
        self.backends
            .iter()
            .find(|(id, b)| {
                b.sticky_id == sticky_id
                    && b.eligible()
                    && !exclude.contains(id)
                    && b.down_until.is_none_or(|t| t <= now)
            })
            .map(|(id, _)| id)
    }

    /// Sticky id of a backend.
    pub fn sticky_id(&self, id: usize) -> Option<&str> {
        self.backends.get(id).map(|b| b.sticky_id.as_str())
    }

    /// Rendezvous hashing of `key` over eligible backends (healthy ones first), so that a
    /// backend leaving remaps only the keys it held.
    pub fn pick_by_key(&mut self, key: &[u8], exclude: &[usize], now: Instant) -> Option<usize> {
        for allow_down in [false, true] {
            let cands: Vec<(usize, &Backend)> = self
                .backends
                .iter()
                .filter(|(id, b)| {
                    b.eligible()
                        && !exclude.contains(id)
                        && (allow_down || b.down_until.is_none_or(|t| t <= now))
                })
                .collect();
            let pick = crate::backends::sticky::rendezvous_pick(
                key,
                cands.iter().map(|(_, b)| (b.sticky_id.as_str(), b.weight)),
            )
            .and_then(|i| cands.get(i))
            .map(|(id, _)| *id);
            if let Some(id) = pick {
                if let Some(b) = self.backends.get_mut(id) {
                    b.selected += 1;
                }
                return Some(id);
            }
        }
        None
    }

    /// Has at least one backend that could take a client (else the answer is 503).
    pub fn any_eligible(&self) -> bool {
        self.backends.iter().any(|(_, b)| b.eligible())
    }

    /// Picks a backend not in `exclude`. Backends marked down are used only when every
    /// other choice is exhausted: trying a possibly-recovered backend beats a certain 502.
    pub fn pick<R: Rng + ?Sized>(
        &mut self,
        alg: Algorithm,
        exclude: &[usize],
        now: Instant,
        rng: &mut R,
    ) -> Option<usize> {
        for allow_down in [false, true] {
            self.scratch.clear();
            for (id, b) in &self.backends {
                let down = b.down_until.is_some_and(|t| t > now);
                if !b.eligible() || exclude.contains(&id) || (down && !allow_down) {
                    continue;
                }
                self.scratch.push(Candidate {
                    id,
                    active: match self.view {
                        LoadView::Active => b.active,
                        LoadView::Reported => b.dispatch.load(),
                    },
                    weight: b.weight,
                });
            }
            if let Some(i) = self.selector.pick(alg, &self.scratch, rng) {
                let id = self.scratch.get(i)?.id;
                if let Some(b) = self.backends.get_mut(id) {
                    b.selected += 1;
                }
                return Some(id);
            }
        }
        None
    }

    /// One more connection/exchange on `id`.
    pub fn acquire(&mut self, id: usize) {
        if let Some(b) = self.backends.get_mut(id) {
            b.active += 1;
        }
    }

    /// One fewer connection/exchange on `id`.
    pub fn release(&mut self, id: usize) {
        if let Some(b) = self.backends.get_mut(id) {
            b.active = b.active.saturating_sub(1);
        }
        self.remove_if_unused(id);
    }

    /// A connect to `id` failed: back off exponentially before preferring it again.
    pub fn connect_failed(
        &mut self,
        id: usize,
        addr: Option<SocketAddr>,
        now: Instant,
        why: &dyn std::fmt::Display,
    ) {
        if let Some(b) = self.backends.get_mut(id) {
            if let Some(owner) = b.owner {
                let binding = addr
                    .and_then(|a| b.addrs.iter().position(|x| *x == a))
                    .and_then(|i| b.bindings.get(i))
                    .cloned()
                    .unwrap_or_default();
                self.unreachable.push(Unreachable { owner, binding });
            }
            b.failures = b.failures.saturating_add(1);
            let backoff = DOWN_BASE
                .saturating_mul(1 << b.failures.min(7).saturating_sub(1))
                .min(DOWN_MAX);
            b.down_until = Some(now + backoff);
            b.idle.clear();
            if let Some(times) = b.connect_failed_log.hit(now) {
                let secs = b.connect_failed_log.interval_secs();
                log::error(
                    &format!("backend connect failed ({times} times in the last {secs} s)"),
                    &[
                        ("backend", &b.name),
                        ("error", why),
                        ("retry_in_ms", &backoff.as_millis()),
                    ],
                );
            }
        }
    }

    /// A connect to `id` succeeded.
    pub fn connect_ok(&mut self, id: usize) {
        if let Some(b) = self.backends.get_mut(id) {
            if b.failures > 0 {
                log::info("backend up again", &[("backend", &b.name)]);
            }
            b.failures = 0;
            b.down_until = None;
        }
    }

    /// Takes an idle keep-alive connection to `id` that still looks open, preferring one
    /// still registered with the poll under `token` (the caller's own, returned by it after
    /// its last exchange): reusing that one needs no `epoll_ctl`. Returns the connection
    /// and whether it is registered under `token` already.
    pub fn checkout(&mut self, id: usize, now: Instant, token: Token) -> Option<(Transport, bool)> {
        self.backends
            .get_mut(id)
            .filter(|b| b.proxy.is_none())?
            .idle
            .take(now, token)
    }

    /// Returns a quiet keep-alive connection to `id`'s pool. It stays registered with the
    /// poll under `token`, the token of the connection that used it last.
    pub fn checkin(&mut self, id: usize, stream: Transport, now: Instant, token: Token) {
        // The descriptor budget counts idle pooled connections: over it, this one closes.
        // (O(backends) per check-in; a handful in practice.)
        if self.pooled() >= self.pool_max.min(self.pool_room.unwrap_or(usize::MAX)) {
            return;
        }
        if let Some(b) = self
            .backends
            .get_mut(id)
            .filter(|b| b.state != BackendState::Gone && b.proxy.is_none())
        {
            b.idle.put(stream, now, token);
        }
    }

    /// A poll event arrived for `token` while it may have been for idle pooled connections
    /// registered under it (they keep their last owner's token). An idle connection only
    /// gets an event when its backend closed it, reset it or sent something: each such one
    /// leaves the pool now, so the next request is not sent into a dead socket. Returns how
    /// many left.
    pub fn evict_closed_pooled(&mut self, token: Token) -> usize {
        self.backends
            .iter_mut()
            .map(|(_, b)| b.idle.evict_closed(token))
            .sum()
    }

    /// Drops pooled connections past their age.
    pub fn sweep_idle(&mut self, now: Instant) {
        for (_, b) in &mut self.backends {
            b.idle.sweep(now);
        }
    }

    /// A `load` report from backend `id`.
    pub fn report_load(&mut self, id: usize, clients: u32) {
        if let Some(b) = self.backends.get_mut(id) {
            b.dispatch.report(clients);
        }
    }

    /// Runs one choice (`route::choose`) the way dispatching needs it: the algorithm
    /// compares reported + provisional load, and backends without a public binding or at
    /// their `max_connections` by that load are excluded. The sticky rules and states are
    /// the proxy's own. Returns the choice and its public URL, counted as dispatched.
    pub fn choose_for_dispatch(
        &mut self,
        choose: impl FnOnce(&mut Registry, &[usize]) -> Option<usize>,
    ) -> Option<(usize, String)> {
        let exclude: Vec<usize> = self
            .backends
            .iter()
            .filter(|(_, b)| !b.dispatch.has_room(b.max_connections))
            .map(|(id, _)| id)
            .collect();
        self.view = LoadView::Reported;
        let id = choose(self, &exclude);
        self.view = LoadView::Active;
        let id = id.filter(|id| !exclude.contains(id))?;
        let url = self.backends.get_mut(id)?.dispatch.dispatch()?.to_string();
        Some((id, url))
    }

    /// Iterates all backends.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &Backend)> {
        self.backends.iter()
    }
}

impl Backend {
    fn new(
        name: String,
        guid: Option<String>,
        bindings: Vec<String>,
        addrs: Vec<SocketAddr>,
        weight: u32,
    ) -> Self {
        Backend {
            sticky_id: guid
                .clone()
                .unwrap_or_else(|| crate::backends::sticky::static_backend_id(&name)),
            name,
            guid,
            source: Source::Registration,
            tls_names: bindings.iter().map(|u| tls_name(u)).collect(),
            bindings,
            addrs,
            next_addr: 0,
            state: BackendState::Ready,
            owner: None,
            max_connections: 0,
            tags: BTreeMap::new(),
            proxy: None,
            weight,
            active: 0,
            failures: 0,
            down_until: None,
            selected: 0,
            dispatch: Default::default(),
            idle: IdlePool::default(),
            connect_failed_log: log::Repeated::every(Duration::from_secs(10)),
        }
    }

    /// May take a new client now (state and connection cap; health is a preference).
    pub fn eligible(&self) -> bool {
        self.state == BackendState::Ready
            && (self.max_connections == 0 || self.active < self.max_connections)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_backend;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    #[test]
    fn down_backends_are_last_resort() {
        let specs = [
            parse_backend("ws://127.0.0.1:1").unwrap(),
            parse_backend("ws://127.0.0.1:2").unwrap(),
        ];
        let mut r = Registry::from_specs(&specs);
        let mut rng = SmallRng::seed_from_u64(3);
        let now = Instant::now();
        r.connect_failed(0, None, now, &"refused");
        for _ in 0..20 {
            assert_eq!(r.pick(Algorithm::Random, &[], now, &mut rng), Some(1));
        }
        assert_eq!(r.pick(Algorithm::Random, &[1], now, &mut rng), Some(0));
        assert_eq!(r.pick(Algorithm::Random, &[0, 1], now, &mut rng), None);
        // Back-off expires.
        let later = now + Duration::from_secs(1);
        let picks: Vec<_> = (0..40)
            .filter_map(|_| r.pick(Algorithm::Random, &[], later, &mut rng))
            .collect();
        assert!(picks.contains(&0));
    }

    /// A connected loopback socket, as a pooled backend connection, and its local port.
    fn pooled_socket(listener: &std::net::TcpListener) -> (Transport, u16) {
        let std = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        std.set_nonblocking(true).unwrap();
        let port = std.local_addr().unwrap().port();
        (Transport::Plain(mio::net::TcpStream::from_std(std)), port)
    }

    #[test]
    fn checkout_prefers_the_callers_own_pooled_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let mut r = Registry::from_specs(&[parse_backend(&url).unwrap()]);
        let now = Instant::now();
        let (mine, mine_port) = pooled_socket(&listener);
        let (other, other_port) = pooled_socket(&listener);
        r.checkin(0, mine, now, Token(7));
        r.checkin(0, other, now, Token(9));
        // Token 7 gets its own back although token 9's is the most recent.
        let (s, same) = r.checkout(0, now, Token(7)).unwrap();
        assert_eq!(
            (s.socket().local_addr().unwrap().port(), same),
            (mine_port, true)
        );
        // Another caller takes what is left and must re-register it.
        let (s, same) = r.checkout(0, now, Token(11)).unwrap();
        assert_eq!(
            (s.socket().local_addr().unwrap().port(), same),
            (other_port, false)
        );
        assert!(r.checkout(0, now, Token(7)).is_none());
        // Too old: never handed out, even to its own user.
        let (old, _) = pooled_socket(&listener);
        r.checkin(0, old, now, Token(7));
        assert!(r
            .checkout(
                0,
                now + crate::backends::pool::POOL_MAX_AGE + Duration::from_millis(1),
                Token(7)
            )
            .is_none());
    }

    #[test]
    fn idle_pooled_connections_give_their_descriptors_to_clients() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let mut r = Registry::from_specs(&[parse_backend(&url).unwrap()]);
        let now = Instant::now();
        for token in 0..4 {
            r.checkin(0, pooled_socket(&listener).0, now, Token(token));
        }
        assert_eq!(r.pooled(), 4);
        // Clients near the limit leave room for 2: the two oldest close at once.
        r.set_pool_room(2);
        assert_eq!(r.pooled(), 2);
        let (s, _) = r.checkout(0, now, Token(100)).unwrap();
        r.checkin(0, s, now, Token(100));
        r.checkin(0, pooled_socket(&listener).0, now, Token(5));
        assert_eq!(r.pooled(), 2, "a check-in past the room closes");
        r.set_pool_room(0);
        assert_eq!(r.pooled(), 0);
        assert!(r.checkout(0, now, Token(100)).is_none());
    }

    #[test]
    fn a_pooled_connection_its_backend_closed_leaves_on_the_event() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("ws://{}", listener.local_addr().unwrap());
        let mut r = Registry::from_specs(&[parse_backend(&url).unwrap()]);
        let now = Instant::now();
        let (closed, _) = pooled_socket(&listener);
        let (server_side, _) = listener.accept().unwrap();
        let (talking, _) = pooled_socket(&listener);
        let (mut server_talks, _) = listener.accept().unwrap();
        let (quiet, quiet_port) = pooled_socket(&listener);
        r.checkin(0, closed, now, Token(7));
        r.checkin(0, talking, now, Token(7));
        r.checkin(0, quiet, now, Token(7));
        drop(server_side);
        std::io::Write::write_all(&mut server_talks, b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            .unwrap();
        // The FIN and the bytes are in flight on loopback; wait until both are visible.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut evicted = 0;
        while evicted < 2 && Instant::now() < deadline {
            evicted += r.evict_closed_pooled(Token(9)); // another token: nothing to do
            evicted += r.evict_closed_pooled(Token(7));
            std::thread::yield_now();
        }
        assert_eq!(evicted, 2);
        // The quiet one stays and is handed out even though it is young enough to skip a peek.
        let (s, same) = r.checkout(0, now, Token(7)).unwrap();
        assert_eq!(
            (s.socket().local_addr().unwrap().port(), same),
            (quiet_port, true)
        );
        assert!(r.checkout(0, now, Token(7)).is_none());
    }
}
