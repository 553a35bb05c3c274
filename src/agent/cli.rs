//! `wslb agent ...`: register a backend with one or more balancers from the command line,
//! optionally starting and supervising the backend process itself (`-- CMD ARGS`).
//!
//! Flags become an [`AgentConfig`] in [`parse_args`] (pure, every refusal names its flag, exit
//! 2); [`main`] runs the [`crate::agent`] links until SIGTERM/SIGINT, then drains, deregisters
//! and stops the child.

use std::collections::BTreeMap;
use std::process::{Child, Command, ExitCode, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::agent::local::LocalConfig;
use crate::agent::{self, AgentConfig, AgentError};
use crate::config::{parse_duration, ConfigError};

/// How often the main thread looks at the signal flag and the child.
const POLL: Duration = Duration::from_millis(20);
/// Child restart back-off: first delay, ceiling, and the run time that resets it.
const RESTART_MIN: Duration = Duration::from_millis(100);
const RESTART_MAX: Duration = Duration::from_secs(10);
const RESTART_RESET: Duration = Duration::from_secs(10);
/// After SIGTERM the child gets this long to exit before SIGKILL.
const CHILD_GRACE: Duration = Duration::from_secs(5);
/// `--drain-wait` default: the balancer's default `--backend-drain-window` (60 s) plus
/// room for the last clients' closing handshakes.
const DRAIN_WAIT: Duration = Duration::from_secs(70);

/// What `wslb agent ...` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
// Built once per process at start-up: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum AgentCommand {
    /// Print this text and exit 0.
    Help(String),
    /// Run the agent; supervise `child` (program and arguments) when it is not empty.
    Run {
        /// Links to start (boxed: it dwarfs the other variant).
        cfg: Box<AgentConfig>,
        /// The command after `--`, if any.
        child: Vec<String>,
        /// On SIGTERM, how long to wait for `drain_complete` before deregistering (zero =
        /// not at all).
        drain_wait: Duration,
        /// `--local`: the messaging endpoint for the backend.
        local: Option<Box<LocalConfig>>,
        /// `--load-url`: polled each heartbeat for the client count (dispatch mode).
        load_url: Option<(std::net::SocketAddr, String)>,
    },
}

fn options() -> getopts::Options {
    let mut o = getopts::Options::new();
    o.optmulti(
        "b",
        "balancer",
        "control URL ws://HOST:PORT/register or wss:// (repeatable, one link each)",
        "URL",
    );
    o.optopt(
        "",
        "balancer-ca",
        "CA certificates (PEM) to verify wss:// balancers [default: platform roots]",
        "FILE",
    );
    o.optmulti(
        "",
        "binding",
        "where clients are sent: ws://IP:PORT or http://IP:PORT (repeatable)",
        "URL",
    );
    o.optmulti(
        "",
        "public-binding",
        "what dispatched clients connect to directly: ws:// wss:// http:// https:// URL (repeatable)",
        "URL",
    );
    o.optopt(
        "",
        "load-url",
        "http://IP:PORT/PATH answering the backend's live client count, polled each heartbeat and reported for dispatch mode",
        "URL",
    );
    o.optopt("", "guid", "stable backend id [default: random]", "ID");
    o.optopt(
        "",
        "token",
        "bearer token for the balancer (prefer env WSLB_TOKEN: argv is visible to ps)",
        "TOKEN",
    );
    o.optopt("", "weight", "relative weight 1-1000 [default: 1]", "N");
    o.optopt(
        "",
        "max-connections",
        "most client connections at once, 0 = no limit [default: 0]",
        "N",
    );
    o.optmulti("", "tag", "label K=V (repeatable)", "K=V");
    o.optopt(
        "",
        "proxy-protocol",
        "ask the balancers to open each connection to this backend with a PROXY header naming the client",
        "v1|v2",
    );
    o.optopt(
        "",
        "heartbeat",
        "ping interval; 3 silent intervals = link lost [default: 5s]",
        "DUR",
    );
    o.optopt(
        "",
        "drain-wait",
        "on SIGTERM, wait this long for the balancers to report our last client gone (drain_complete) before deregistering; off = do not wait [default: 70s]",
        "DUR|off",
    );
    o.optopt(
        "",
        "local",
        "serve the messaging endpoint (POST /broadcast, /send, /close, /ping) on this loopback address; the command gets WSLB_AGENT_URL and WSLB_AGENT_TOKEN",
        "ADDR",
    );
    o.optopt(
        "",
        "local-token",
        "bearer token the --local endpoint requires (prefer env WSLB_LOCAL_TOKEN) [default: random, passed to the command]",
        "TOKEN",
    );
    o.optflag("h", "help", "print this help and exit");
    o
}

fn bad(flag: &'static str, value: &str, why: &'static str) -> ConfigError {
    ConfigError::Value {
        flag,
        value: value.to_string(),
        why,
    }
}

/// Maps a library refusal to the flag that caused it.
fn flag_error(e: AgentError) -> ConfigError {
    match e {
        AgentError::NoBalancer => ConfigError::Usage("agent needs --balancer URL".into()),
        AgentError::Balancer { url, why } => bad("--balancer", &url, why),
        AgentError::BindingCount => ConfigError::Usage("agent needs 1 to 16 --binding URLs".into()),
        AgentError::Binding { url, why } => bad("--binding", &url, why),
        AgentError::Guid => {
            ConfigError::Usage("--guid must be 1-128 characters of A-Z a-z 0-9 - _ . :".into())
        }
        AgentError::Weight => ConfigError::Usage("--weight must be 1-1000".into()),
        AgentError::Tags => ConfigError::Usage("at most 32 --tag values".into()),
        // Never echo the token itself.
        AgentError::Token => ConfigError::Usage("--token must be visible ASCII".into()),
        AgentError::Timing(why) => ConfigError::Usage(format!("--heartbeat: {why}")),
        AgentError::Registration(why) => ConfigError::Usage(format!("registration refused: {why}")),
        AgentError::Spawn(e) => ConfigError::Usage(e),
        AgentError::Tls(e) => ConfigError::Usage(format!("--balancer-ca: {e}")),
    }
}

/// Parses the arguments after `agent`. `env_token` is `WSLB_TOKEN`; `--token` wins over it.
pub fn parse_args(
    args: &[String],
    env_token: Option<String>,
    env_local_token: Option<String>,
) -> Result<AgentCommand, ConfigError> {
    // Split at the first `--` ourselves: getopts would mix the child's words into `free`.
    let (flags, child) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], args[i + 1..].to_vec()),
        None => (args, Vec::new()),
    };
    let opts = options();
    let m = opts
        .parse(flags)
        .map_err(|e| ConfigError::Usage(e.to_string()))?;
    if m.opt_present("help") {
        return Ok(AgentCommand::Help(opts.usage(
            "Usage: wslb agent --balancer URL --binding URL [OPTIONS] [-- CMD ARGS...]\n\n\
             Registers a backend with wslb balancers and keeps it registered; with -- CMD,\n\
             also runs CMD and restarts it when it exits. SIGTERM: drain, wait until the\n\
             balancers report no client left (--drain-wait), deregister, stop CMD.",
        )));
    }
    if let Some(extra) = m.free.first() {
        return Err(ConfigError::Usage(format!(
            "unexpected argument {extra:?} (put the backend command after --)"
        )));
    }
    let balancers = m.opt_strs("balancer");
    let bindings = m.opt_strs("binding");
    let mut cfg = AgentConfig::new("", "");
    cfg.balancers = balancers;
    cfg.bindings = bindings;
    cfg.balancer_ca = m.opt_str("balancer-ca").map(Into::into);
    cfg.public_bindings = m.opt_strs("public-binding");
    if let Some(v) = cfg
        .public_bindings
        .iter()
        .find(|u| crate::config::check_public_url(u).is_err())
    {
        let why = crate::config::check_public_url(v).err().unwrap_or_default();
        return Err(bad("--public-binding", v, why));
    }
    if let Some(g) = m.opt_str("guid") {
        cfg.guid = g;
    }
    cfg.token = m.opt_str("token").or(env_token).filter(|t| !t.is_empty());
    if let Some(v) = m.opt_str("weight") {
        cfg.weight = v
            .parse()
            .map_err(|_| bad("--weight", &v, "expected an integer from 1 to 1000"))?;
    }
    if let Some(v) = m.opt_str("max-connections") {
        cfg.max_connections = v
            .parse()
            .map_err(|_| bad("--max-connections", &v, "expected a non-negative integer"))?;
    }
    if let Some(v) = m.opt_str("proxy-protocol") {
        cfg.proxy_protocol = Some(
            crate::net::proxy_protocol::Version::parse(&v)
                .ok_or_else(|| bad("--proxy-protocol", &v, "expected v1 or v2"))?,
        );
    }
    let mut tags = BTreeMap::new();
    for v in m.opt_strs("tag") {
        match v.split_once('=') {
            Some((k, val)) if !k.is_empty() => {
                tags.insert(k.to_string(), val.to_string());
            }
            _ => return Err(bad("--tag", &v, "expected KEY=VALUE")),
        }
    }
    cfg.tags = tags;
    if let Some(v) = m.opt_str("heartbeat") {
        cfg.heartbeat = parse_duration(&v).map_err(|why| bad("--heartbeat", &v, why))?;
    }
    let drain_wait = match m.opt_str("drain-wait") {
        None => DRAIN_WAIT,
        Some(v) if v.trim().eq_ignore_ascii_case("off") => Duration::ZERO,
        Some(v) => parse_duration(&v).map_err(|why| bad("--drain-wait", &v, why))?,
    };
    agent::validate(&cfg).map_err(flag_error)?;
    let local = local_endpoint(&m, env_local_token)?;
    let load_url = match m.opt_str("load-url") {
        Some(v) => Some(agent::load::parse_load_url(&v).map_err(|why| bad("--load-url", &v, why))?),
        None => None,
    };
    Ok(AgentCommand::Run {
        cfg: Box::new(cfg),
        child,
        drain_wait,
        local,
        load_url,
    })
}

/// `--local ADDR` and its token (flag, else env, else a random one for the child).
fn local_endpoint(
    m: &getopts::Matches,
    env_token: Option<String>,
) -> Result<Option<Box<LocalConfig>>, ConfigError> {
    let Some(v) = m.opt_str("local") else {
        if m.opt_present("local-token") {
            return Err(ConfigError::Usage("--local-token needs --local".into()));
        }
        return Ok(None);
    };
    let addr = crate::config::parse_addr(&v)
        .ok()
        .filter(|a| a.ip().is_loopback())
        .ok_or_else(|| {
            bad(
                "--local",
                &v,
                "expected a loopback address like 127.0.0.1:7070",
            )
        })?;
    let token = match m.opt_str("local-token").or(env_token) {
        Some(t) if (1..=4096).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_graphic()) => t,
        Some(_) => {
            return Err(bad(
                "--local-token",
                "",
                "expected 1-4096 visible ASCII characters",
            ))
        }
        None => agent::random_guid(),
    };
    Ok(Some(Box::new(LocalConfig { addr, token })))
}

/// Entry point of `wslb agent`; `args` are the words after `agent`.
pub fn main(args: &[String]) -> ExitCode {
    let env_token = std::env::var("WSLB_TOKEN").ok();
    let env_local_token = std::env::var("WSLB_LOCAL_TOKEN").ok();
    match parse_args(args, env_token, env_local_token) {
        Ok(AgentCommand::Help(text)) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Ok(AgentCommand::Run {
            cfg,
            child,
            drain_wait,
            local,
            load_url,
        }) => match run(*cfg, child, drain_wait, local, load_url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("wslb agent: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

/// Runs until SIGTERM or SIGINT, then shuts down in order: drain, wait (at most
/// `drain_wait`) until the balancers report our last client gone, deregister, stop the child.
/// `local`: the messaging endpoint for the backend, if any.
pub fn run(
    cfg: AgentConfig,
    child: Vec<String>,
    drain_wait: Duration,
    local: Option<Box<LocalConfig>>,
    load_url: Option<(std::net::SocketAddr, String)>,
) -> Result<(), String> {
    let term = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&term))
            .map_err(|e| format!("cannot install signal handler: {e}"))?;
    }
    let heartbeat = cfg.heartbeat;
    let agent = agent::spawn(cfg).map_err(|e| e.to_string())?;
    let poller_stop = Arc::new(AtomicBool::new(false));
    if let Some(url) = load_url {
        agent::load::spawn_poller(
            agent.load_reporter(),
            url,
            heartbeat,
            Arc::clone(&poller_stop),
        )
        .map_err(|e| format!("cannot start the --load-url poller: {e}"))?;
    }
    let mut env = Vec::new();
    if let Some(l) = &local {
        let bound = agent::local::start(l, agent.messenger())
            .map_err(|e| format!("--local {}: {e}", l.addr))?;
        // One line a supervisor or test can read the port from.
        eprintln!("wslb agent: local endpoint on http://{bound}");
        env.push(("WSLB_AGENT_URL", format!("http://{bound}")));
        env.push(("WSLB_AGENT_TOKEN", l.token.clone()));
    }
    let mut sup = (!child.is_empty()).then(|| Supervisor::new(child, env));
    // Signal delivery only sets the flag; a short poll keeps shutdown prompt.
    let mut until = |stop: &mut dyn FnMut() -> bool| {
        while !stop() {
            if let Some(s) = sup.as_mut() {
                s.tick(Instant::now());
            }
            thread::sleep(POLL);
        }
    };
    until(&mut || term.load(Ordering::Relaxed));
    eprintln!("wslb agent: stopping: drain, wait for our clients to move, deregister, then stop the command");
    agent.drain();
    // The child keeps serving (and is restarted if it dies) while the balancers move its
    // clients away (1012 spread over their --backend-drain-window): stopping it before
    // would drop them all at once. A second signal stops waiting.
    term.store(false, Ordering::Relaxed);
    let deadline = Instant::now() + drain_wait;
    until(&mut || {
        agent.wait_drained(Duration::ZERO) || term.load(Ordering::Relaxed) || {
            let late = Instant::now() >= deadline;
            if late && !drain_wait.is_zero() {
                eprintln!(
                    "wslb agent: clients still connected after {}s; stopping anyway",
                    drain_wait.as_secs()
                );
            }
            late
        }
    });
    poller_stop.store(true, Ordering::Relaxed);
    agent.stop();
    if let Some(s) = sup {
        s.shutdown();
    }
    Ok(())
}

/// Keeps one child process running, restarting it with back-off.
struct Supervisor {
    cmd: Vec<String>,
    /// Set in the command's environment (the `--local` endpoint's URL and token).
    env: Vec<(&'static str, String)>,
    /// The running child and when it started.
    child: Option<(Child, Instant)>,
    /// When the next start is due (none while a child runs).
    start_at: Instant,
    delay: Duration,
}

impl Supervisor {
    fn new(cmd: Vec<String>, env: Vec<(&'static str, String)>) -> Self {
        Supervisor {
            cmd,
            env,
            child: None,
            start_at: Instant::now(),
            delay: RESTART_MIN,
        }
    }

    fn name(&self) -> &str {
        self.cmd.first().map(String::as_str).unwrap_or("")
    }

    /// Reaps an exited child and starts one when due.
    fn tick(&mut self, now: Instant) {
        if let Some((c, started)) = self.child.as_mut() {
            let ran = now.duration_since(*started);
            let done: Result<Option<ExitStatus>, String> = c.try_wait().map_err(|e| e.to_string());
            match done {
                Ok(None) => return,
                Ok(Some(status)) => self.schedule(now, ran, &format!("exited ({status})")),
                Err(e) => self.schedule(now, ran, &format!("cannot be waited for: {e}")),
            }
            self.child = None;
        }
        if now < self.start_at {
            return;
        }
        let (prog, args) = match self.cmd.split_first() {
            Some(p) => p,
            None => return,
        };
        match Command::new(prog)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .spawn()
        {
            Ok(c) => self.child = Some((c, now)),
            Err(e) => self.schedule(now, Duration::ZERO, &format!("cannot start: {e}")),
        }
    }

    fn schedule(&mut self, now: Instant, ran: Duration, what: &str) {
        if ran >= RESTART_RESET {
            self.delay = RESTART_MIN;
        }
        eprintln!(
            "wslb agent: command {} {what} after {:.1}s; restarting in {:.1}s",
            self.name(),
            ran.as_secs_f64(),
            self.delay.as_secs_f64()
        );
        self.start_at = now + self.delay;
        self.delay = self.delay.saturating_mul(2).min(RESTART_MAX);
    }

    /// SIGTERM, up to [`CHILD_GRACE`] to exit, then SIGKILL.
    fn shutdown(self) {
        let Some((mut c, _)) = self.child else {
            return;
        };
        // std has no SIGTERM and libc is not a dependency: kill(1) sends it.
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + CHILD_GRACE;
        while Instant::now() < deadline {
            match c.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => thread::sleep(POLL),
            }
        }
        eprintln!(
            "wslb agent: command did not exit within {}s of SIGTERM; killing it",
            CHILD_GRACE.as_secs()
        );
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    const BASE: [&str; 4] = [
        "--balancer",
        "ws://127.0.0.1:9090/register",
        "--binding",
        "ws://127.0.0.1:9001",
    ];

    #[test]
    fn full_command_line() {
        let mut a = args(&BASE);
        a.extend(args(&[
            "--guid",
            "api-1",
            "--weight",
            "3",
            "--max-connections",
            "100",
            "--tag",
            "zone=a",
            "--heartbeat",
            "2s",
            "--",
            "sh",
            "-c",
            "exec backend --port 1",
        ]));
        let AgentCommand::Run { cfg, child, .. } =
            parse_args(&a, Some("env".into()), None).unwrap()
        else {
            panic!()
        };
        assert_eq!(cfg.guid, "api-1");
        assert_eq!((cfg.weight, cfg.max_connections), (3, 100));
        assert_eq!(cfg.tags.get("zone").map(String::as_str), Some("a"));
        assert_eq!(cfg.heartbeat, Duration::from_secs(2));
        assert_eq!(cfg.token.as_deref(), Some("env"));
        assert_eq!(child, ["sh", "-c", "exec backend --port 1"]);
        let mut a = args(&BASE);
        a.extend(args(&["--token", "flag"]));
        let AgentCommand::Run { cfg, child, .. } =
            parse_args(&a, Some("env".into()), None).unwrap()
        else {
            panic!()
        };
        assert_eq!((cfg.token.as_deref(), child.len()), (Some("flag"), 0));
    }

    #[test]
    fn refusals_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (&["--binding", "ws://127.0.0.1:1"], "--balancer"),
            (&["--balancer", "ws://127.0.0.1:1/register"], "--binding"),
            (
                &["--balancer", "ftp://h:1/", "--binding", "ws://127.0.0.1:1"],
                "--balancer",
            ),
            (
                &[
                    "--balancer",
                    "ws://h:1/",
                    "--binding",
                    "ws://host.example:1",
                ],
                "--binding",
            ),
            (&["--weight", "0"], "--weight"),
            (&["--weight", "x"], "--weight"),
            (&["--max-connections", "-1"], "--max-connections"),
            (&["--tag", "novalue"], "--tag"),
            (&["--heartbeat", "0s"], "--heartbeat"),
            (&["--drain-wait", "soon"], "--drain-wait"),
            (&["--guid", "a b"], "--guid"),
            (&["--bogus"], "bogus"),
            (&["stray"], "stray"),
        ];
        for (extra, flag) in cases {
            let mut a = if extra.iter().any(|e| e.starts_with("--b")) {
                vec![]
            } else {
                args(&BASE)
            };
            a.extend(args(extra));
            let e = parse_args(&a, None, None).unwrap_err().to_string();
            assert!(e.contains(flag), "{a:?}: {e:?} does not name {flag}");
        }
    }

    #[test]
    fn help() {
        let AgentCommand::Help(text) = parse_args(&args(&["--help"]), None, None).unwrap() else {
            panic!()
        };
        assert!(text.contains("--balancer") && text.contains("--binding"));
    }
}
