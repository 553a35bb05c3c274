//! A private LAN of network namespaces for tests that need several hosts: one bridge in the
//! root namespace (which gets `.254`, so the test process reaches every host), one
//! namespace per host joined to it by a veth pair, addresses `10.213.19.X/24`. Everything
//! is removed on drop; processes started with [`Lan::spawn`] are killed first.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};

/// Runs `ip ARGS`; the error names the command and says what `ip` said.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A process inside a namespace, killed (SIGKILL) on drop.
pub struct Proc(pub Child);

impl Proc {
    /// SIGKILL now: a balancer that dies, not one that drains.
    pub fn kill_hard(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM, then SIGKILL after 3 s: `wslb agent` stops the backend it supervises on
    /// SIGTERM, which SIGKILL would leave running.
    pub fn stop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = Command::new("kill").arg(self.0.id().to_string()).status();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        self.kill_hard();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Lan {
    bridge: String,
    /// (name, namespace, last octet)
    hosts: Vec<(String, String, u8)>,
    procs: Vec<Proc>,
}

impl Lan {
    /// `hosts`: (short name, last octet of its address). Fails when namespaces cannot be
    /// created (not root, no `ip`, no veth/bridge support).
    pub fn create(hosts: &[(&str, u8)]) -> Result<Lan, String> {
        let id = std::process::id() % 100_000;
        let mut lan = Lan {
            bridge: format!("wbr{id}"),
            hosts: Vec::new(),
            procs: Vec::new(),
        };
        ip(&["link", "add", &lan.bridge, "type", "bridge"])?;
        ip(&["addr", "add", "10.213.19.254/24", "dev", &lan.bridge])?;
        ip(&["link", "set", &lan.bridge, "up"])?;
        for (name, octet) in hosts {
            let ns = format!("w{name}{id}");
            ip(&["netns", "add", &ns])?;
            lan.hosts.push((name.to_string(), ns.clone(), *octet));
            let (outer, inner) = (format!("wv{octet}x{id}"), format!("wv{octet}i{id}"));
            let addr = format!("10.213.19.{octet}/24");
            let steps: [&[&str]; 7] = [
                &[
                    "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                ],
                &["link", "set", &outer, "master", &lan.bridge],
                &["link", "set", &outer, "up"],
                &["link", "set", &inner, "netns", &ns],
                &["-n", &ns, "addr", "add", &addr, "dev", &inner],
                &["-n", &ns, "link", "set", &inner, "up"],
                &["-n", &ns, "link", "set", "lo", "up"],
            ];
            for step in steps {
                ip(step)?;
            }
        }
        Ok(lan)
    }

    fn host(&self, name: &str) -> (&str, u8) {
        self.hosts
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, ns, o)| (ns.as_str(), *o))
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// The address of host `name`.
    pub fn addr(&self, name: &str) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 213, 19, self.host(name).1))
    }

    /// Gives host `name` one more address, `10.213.19.<octet>`.
    pub fn add_addr(&self, name: &str, octet: u8) -> Result<(), String> {
        let (ns, own) = self.host(name);
        let dev = format!("wv{own}i{}", std::process::id() % 100_000);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("10.213.19.{octet}/24"),
            "dev",
            &dev,
        ])
    }

    /// `ip netns exec <host> PROGRAM ARGS`, ready to spawn or run.
    pub fn command(&self, host: &str, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.host(host).0, program])
            .args(args);
        c
    }

    /// Starts a long-running process on `host` (stdout discarded, stderr inherited); it is
    /// killed when the LAN goes. Returns its index for [`Lan::kill`].
    pub fn spawn(&mut self, host: &str, program: &str, args: &[&str]) -> usize {
        let child = self
            .command(host, program, args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program} on {host}: {e}"));
        self.procs.push(Proc(child));
        self.procs.len() - 1
    }

    /// SIGKILLs the process [`Lan::spawn`] returned `idx` for.
    pub fn kill(&mut self, idx: usize) {
        if let Some(p) = self.procs.get_mut(idx) {
            p.kill_hard();
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Backends' agents first (they were started last), so they stop their backends.
        for p in self.procs.iter_mut().rev() {
            p.stop();
        }
        // Deleting a namespace deletes its veth end, and with it the pair.
        for (_, ns, _) in &self.hosts {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
