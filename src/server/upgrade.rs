//! Binary upgrade without a refused connection (HAProxy's seamless reload, nginx's USR2).
//!
//! The old process hands its listening sockets to the new one over a Unix socket
//! (SCM_RIGHTS). Both hold the same kernel sockets, so connections keep queueing on them
//! whoever accepts; at no moment is a port closed. In order:
//!
//! 1. new → connects to the old one's upgrade socket (`--takeover PATH`); old → sends one
//!    message: a JSON description and the descriptors (proxy listeners, control listener).
//! 2. new: accepts on the control listener only, then says `control`. old: stops accepting
//!    control connections and closes its control sessions with 1012, keeping their
//!    backends eligible (it still serves); the agents reconnect, to the new process.
//! 3. new: once as many backends registered with it as the old one had (or after
//!    [`REGISTRATION_WAIT`]), accepts on the proxy listeners too and says `ready`, then
//!    tells systemd it is the main process. old: stops accepting and drains (like SIGTERM)
//!    and exits when its last connection is gone.
//!
//! If the new process dies before `ready`, the old one takes its control listener back and
//! goes on as if nothing happened.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use mio::net::{UnixListener, UnixStream};
use serde_json::Value;

use super::*;
use crate::net::fdpass::{recv_fds, sd_notify, send_fds};

/// The upgrade socket's listener (`--upgrade-socket`, or a temporary one for SIGUSR2).
pub(super) const UPGRADE_LISTENER: Token = Token(RESERVED_TOKENS - 2);
/// The old process's end of a handoff in progress.
pub(super) const UPGRADE_STREAM: Token = Token(RESERVED_TOKENS - 3);
/// Longest the new process waits for the old one's backends to register again before it
/// accepts clients anyway (a backend that does not come back would otherwise hold it).
pub(super) const REGISTRATION_WAIT: Duration = Duration::from_secs(5);
/// Longest a handoff message may be.
const MAX_MESSAGE: usize = 16 * 1024;

/// Both sides of an upgrade, as far as this process is concerned.
#[derive(Debug, Default)]
pub(super) struct Upgrade {
    /// Where a new process connects to take over.
    listener: Option<UnixListener>,
    /// The socket file made for a SIGUSR2 upgrade, removed when it ends.
    temp_path: Option<PathBuf>,
    /// Old side: the process SIGUSR2 started, until it exits or we do.
    child: Option<Child>,
    /// Old side: the handoff in progress.
    handoff: Option<Handoff>,
    /// Old side: control sessions were closed for the new process; their backends stay.
    pub(super) handing_over: bool,
    /// New side: the old process, until it has been told `ready`.
    pub(super) takeover: Option<Takeover>,
    /// This binary's path and flags at start, for the SIGUSR2 child.
    exe: Option<(PathBuf, Vec<OsString>)>,
}

#[derive(Debug)]
struct Handoff {
    stream: UnixStream,
    /// Bytes of the new process's words (`control\n`, `ready\n`) not yet complete.
    heard: Vec<u8>,
}

/// New side: what the old process said, and what is still to do.
#[derive(Debug)]
pub(super) struct Takeover {
    stream: StdUnixStream,
    /// Backends registered with the old process: wait for as many before accepting.
    registered: usize,
    /// Accepting on the proxy listeners waits until then at the latest.
    until: Instant,
}

/// Descriptors taken over, by the address they were configured with.
#[derive(Debug, Default)]
pub(super) struct Inherited {
    listeners: Vec<(String, bool, OwnedFd)>,
    control: Option<(String, OwnedFd)>,
    takeover: Option<Takeover>,
}

impl Inherited {
    /// The inherited listener configured as `addr` (with TLS or not), if any.
    pub(super) fn take_listener(&mut self, addr: &SocketAddr, tls: bool) -> Option<TcpListener> {
        let want = addr.to_string();
        let i = self
            .listeners
            .iter()
            .position(|(a, t, _)| *a == want && *t == tls)?;
        let (_, _, fd) = self.listeners.remove(i);
        Some(TcpListener::from_std(std::net::TcpListener::from(fd)))
    }

    /// The inherited control listener configured as `addr`, if any.
    pub(super) fn take_control(&mut self, addr: &SocketAddr) -> Option<TcpListener> {
        if self.control.as_ref()?.0 != addr.to_string() {
            return None;
        }
        let (_, fd) = self.control.take()?;
        Some(TcpListener::from_std(std::net::TcpListener::from(fd)))
    }

    /// The conversation with the old process, for the loop.
    pub(super) fn into_takeover(self) -> Option<Takeover> {
        self.takeover
    }
}

/// New side, before binding anything: connects to the old process and receives its
/// listening sockets.
pub(super) fn take_over(path: &Path) -> io::Result<Inherited> {
    let named =
        |e: io::Error| io::Error::new(e.kind(), format!("--takeover {}: {e}", path.display()));
    let stream = StdUnixStream::connect(path).map_err(named)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (n, fds) = recv_fds(&stream, &mut buf).map_err(named)?;
    let desc: Value = serde_json::from_slice(buf.get(..n).unwrap_or_default())
        .map_err(|e| io::Error::other(format!("--takeover: bad handoff message: {e}")))?;
    let mut fds = fds.into_iter();
    let mut inherited = Inherited::default();
    let listeners = desc
        .get("listeners")
        .unwrap_or(&Value::Null)
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for l in listeners {
        let (Some(addr), Some(fd)) = (l.get("addr").unwrap_or(&Value::Null).as_str(), fds.next())
        else {
            return Err(io::Error::other(
                "--takeover: fewer descriptors than listeners",
            ));
        };
        let tls = l
            .get("tls")
            .unwrap_or(&Value::Null)
            .as_bool()
            .unwrap_or(false);
        inherited.listeners.push((addr.to_string(), tls, fd));
    }
    if let Some(addr) = desc.get("control").unwrap_or(&Value::Null).as_str() {
        let fd = fds
            .next()
            .ok_or_else(|| io::Error::other("--takeover: no control listener descriptor"))?;
        inherited.control = Some((addr.to_string(), fd));
    }
    stream.set_read_timeout(None)?;
    let registered = desc
        .get("registered")
        .unwrap_or(&Value::Null)
        .as_u64()
        .unwrap_or(0) as usize;
    log::info(
        "takeover: listening sockets received",
        &[
            ("from", &path.display()),
            ("listeners", &inherited.listeners.len()),
            ("registered_backends", &registered),
        ],
    );
    inherited.takeover = Some(Takeover {
        stream,
        registered,
        until: Instant::now() + REGISTRATION_WAIT,
    });
    Ok(inherited)
}

/// Binds a Unix listener at `path`, replacing a socket file left there (by a process that
/// is gone, or the old process of an upgrade, which no longer needs the name).
fn bind_unix(path: &Path, poll: &Poll) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path)?
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(_) => {}
    }
    let mut l = UnixListener::bind(path)?;
    poll.registry()
        .register(&mut l, UPGRADE_LISTENER, Interest::READABLE)?;
    Ok(l)
}

/// This binary and its flags, without `--takeover`, to start it again.
fn own_command_line() -> Option<(PathBuf, Vec<OsString>)> {
    let exe = std::env::current_exe().ok()?;
    let mut args: Vec<OsString> = Vec::new();
    let mut skip_value = false;
    for a in std::env::args_os().skip(1) {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        if a == "--takeover" {
            skip_value = true;
        } else if !a.to_string_lossy().starts_with("--takeover=") {
            args.push(a);
        }
    }
    Some((exe, args))
}

impl Upgrade {
    /// Remembers how this process was started, and listens on `--upgrade-socket`.
    pub(super) fn prepare(cfg: &Config, poll: &Poll) -> io::Result<Upgrade> {
        let mut up = Upgrade {
            exe: own_command_line(),
            ..Upgrade::default()
        };
        if let Some(path) = &cfg.upgrade_socket {
            let l = bind_unix(path, poll).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("--upgrade-socket {}: {e}", path.display()),
                )
            })?;
            log::info("upgrade socket listening", &[("path", &path.display())]);
            up.listener = Some(l);
        }
        Ok(up)
    }
}

impl Server {
    /// SIGUSR2: start this binary again with the same flags, taking over through the
    /// upgrade socket (a temporary one without `--upgrade-socket`).
    pub(super) fn start_upgrade(&mut self) {
        let up = &self.upgrade;
        if self.draining || up.handoff.is_some() || up.child.is_some() || up.takeover.is_some() {
            log::warn(
                "SIGUSR2 ignored: an upgrade or a drain is already under way",
                &[],
            );
            return;
        }
        let Some((exe, args)) = up.exe.clone() else {
            log::error("SIGUSR2: cannot tell this binary's path; no upgrade", &[]);
            return;
        };
        let path = match (&self.cfg.upgrade_socket, &self.upgrade.listener) {
            (Some(p), Some(_)) => p.clone(),
            _ => {
                let name = format!("wslb-upgrade-{}.sock", std::process::id());
                let p = std::env::temp_dir().join(name);
                match bind_unix(&p, &self.poll) {
                    Ok(l) => self.upgrade.listener = Some(l),
                    Err(e) => {
                        log::error("SIGUSR2: cannot make an upgrade socket", &[("error", &e)]);
                        return;
                    }
                }
                self.upgrade.temp_path = Some(p.clone());
                p
            }
        };
        let spawned = std::process::Command::new(&exe)
            .args(&args)
            .arg("--takeover")
            .arg(&path)
            .stdin(Stdio::null())
            .spawn();
        match spawned {
            Ok(child) => {
                log::info(
                    "upgrade: new process started",
                    &[("pid", &child.id()), ("binary", &exe.display())],
                );
                self.upgrade.child = Some(child);
            }
            Err(e) => {
                log::error("upgrade: cannot start the new process", &[("error", &e)]);
                self.end_upgrade();
            }
        }
    }

    /// A new process connected to the upgrade socket: hand it the listeners.
    pub(super) fn accept_upgrade(&mut self) {
        let Some(listener) = &self.upgrade.listener else {
            return;
        };
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        if self.draining || self.upgrade.handoff.is_some() {
            log::warn(
                "upgrade refused: one is already under way, or draining",
                &[],
            );
            return;
        }
        let configured = self.cfg.listen.iter().chain(self.cfg.tls_listen.iter());
        let listeners: Vec<Value> = self
            .listeners
            .iter()
            .zip(configured)
            .map(|((_, tls), addr)| json!({"addr": addr.to_string(), "tls": tls}))
            .collect();
        let mut fds: Vec<i32> = self.listeners.iter().map(|(l, _)| l.as_raw_fd()).collect();
        let control = match (&self.control_listener, self.cfg.control) {
            (Some(l), Some(addr)) => {
                fds.push(l.as_raw_fd());
                Some(addr.to_string())
            }
            _ => None,
        };
        let registered = self.backends.registered_eligible();
        let desc = json!({"version": 1, "listeners": listeners, "control": control,
                          "registered": registered});
        if let Err(e) = send_fds(&stream, desc.to_string().as_bytes(), &fds) {
            log::error("upgrade: cannot send the listeners", &[("error", &e)]);
            return;
        }
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut stream, UPGRADE_STREAM, Interest::READABLE)
        {
            log::error("upgrade: register failed", &[("error", &e)]);
            return;
        }
        log::info(
            "upgrade: listening sockets handed over; waiting for the new process",
            &[("listeners", &self.listeners.len())],
        );
        self.upgrade.handoff = Some(Handoff {
            stream,
            heard: Vec::new(),
        });
    }

    /// The new process spoke (or went away).
    pub(super) fn hear_upgrade(&mut self) {
        let Some(h) = &mut self.upgrade.handoff else {
            return;
        };
        let mut buf = [0u8; 64];
        let gone = loop {
            match h.stream.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) if h.heard.len() + n <= 64 => {
                    h.heard.extend_from_slice(buf.get(..n).unwrap_or_default())
                }
                Ok(_) => break true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        while let Some(end) = self
            .upgrade
            .handoff
            .as_ref()
            .and_then(|h| h.heard.iter().position(|&b| b == b'\n'))
        {
            let Some(h) = &mut self.upgrade.handoff else {
                return;
            };
            let word: Vec<u8> = h.heard.drain(..=end).collect();
            match word.as_slice() {
                b"control\n" => self.hand_over_control(),
                b"ready\n" => {
                    log::info("upgrade: the new process accepts; draining this one", &[]);
                    self.end_upgrade();
                    self.begin_handover_drain();
                    return;
                }
                _ => {}
            }
        }
        if gone {
            log::error(
                "upgrade failed: the new process went away before accepting; carrying on",
                &[],
            );
            self.take_control_back();
            self.end_upgrade();
        }
    }

    /// Old side: the new process accepts control connections. Stop accepting them here
    /// (the listener is kept, in case the new process fails) and close the sessions so
    /// their agents register with it; their backends stay eligible here meanwhile.
    fn hand_over_control(&mut self) {
        if let Some(l) = &mut self.control_listener {
            let _ = self.poll.registry().deregister(l);
        }
        self.upgrade.handing_over = true;
        let keys: Vec<usize> = self.controls.iter().map(|(k, _)| k).collect();
        for key in keys {
            if let Some(c) = self.controls.live(key) {
                c.close_for_restart();
            }
            self.drive_control(key);
        }
        log::info("upgrade: control sessions closed for the new process", &[]);
    }

    /// Old side: the new process failed; accept control connections here again.
    fn take_control_back(&mut self) {
        if !std::mem::take(&mut self.upgrade.handing_over) {
            return;
        }
        if let Some(l) = &mut self.control_listener {
            let registered = self
                .poll
                .registry()
                .register(l, CONTROL_LISTENER, Interest::READABLE);
            if let Err(e) = registered {
                log::error("cannot accept control connections again", &[("error", &e)]);
            }
        }
        self.accept_controls();
    }

    /// Either side: the upgrade is over (done or failed); nothing of it is kept.
    fn end_upgrade(&mut self) {
        if let Some(mut h) = self.upgrade.handoff.take() {
            let _ = self.poll.registry().deregister(&mut h.stream);
        }
        if let Some(mut child) = self.upgrade.child.take() {
            // Reaped if it already exited; otherwise it is the new main process.
            let _ = child.try_wait();
        }
        if let Some(path) = self.upgrade.temp_path.take() {
            if let Some(mut l) = self.upgrade.listener.take() {
                let _ = self.poll.registry().deregister(&mut l);
            }
            let _ = std::fs::remove_file(path);
        }
    }

    /// New side: accept control connections now, and tell the old process, which then
    /// sends its agents here.
    pub(super) fn begin_takeover(&mut self) {
        if let Some(t) = &mut self.upgrade.takeover {
            if let Err(e) = t.stream.write_all(b"control\n") {
                log::error("takeover: the old process went away", &[("error", &e)]);
            }
            let until = t.until;
            self.timers.add(
                until,
                TimerKey {
                    key: 0,
                    gen: 0,
                    kind: TimerKind::Takeover,
                },
            );
        }
        self.check_takeover(Instant::now());
    }

    /// New side: once the old process's backends registered here (or the wait is over),
    /// accept clients and tell the old process to stop.
    pub(super) fn check_takeover(&mut self, now: Instant) {
        let Some(t) = &self.upgrade.takeover else {
            return;
        };
        let registered = self.backends.registered_eligible();
        if registered < t.registered && now < t.until {
            return;
        }
        let Some(mut t) = self.upgrade.takeover.take() else {
            return;
        };
        for (i, (l, _)) in self.listeners.iter_mut().enumerate() {
            let token = Token(FIRST_LISTENER + i);
            if let Err(e) = self.poll.registry().register(l, token, Interest::READABLE) {
                log::error("takeover: cannot accept on a listener", &[("error", &e)]);
            }
        }
        let _ = t.stream.write_all(b"ready\n");
        let _ = sd_notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
        log::info(
            "takeover complete: accepting",
            &[
                ("pid", &std::process::id()),
                ("backends", &registered),
                ("expected", &t.registered),
            ],
        );
        self.accept_all();
    }
}
