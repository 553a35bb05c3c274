//! File descriptors: how many the process may hold, how many client connections that
//! allows, and how many are in use. HAProxy derives its default `maxconn` the same way;
//! without it, clients were accepted that the balancer could not pair with a backend.

use std::io;

/// Descriptors kept free for everything that is neither a client, its backend leg, a
/// pooled connection nor a control session: certificate and token files read at SIGHUP,
/// the events file, a connect racing a close.
pub const RESERVE: u64 = 32;

/// Idle pooled backend connections never exceed this many descriptors (fewer on a small
/// limit: a sixteenth of it). They are not set aside: they use what clients leave free and
/// close when a client needs the descriptor, so a limit of 20,000 holds ~9,980 clients.
pub const POOL_MAX: u64 = 256;

/// Control connections (registered backends and admin requests) are capped at this (fewer
/// on a small limit: a sixteenth of it); beyond, they wait in the listen backlog.
pub const CONTROL_MAX: u64 = 256;

/// How the descriptor limit is shared out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The soft `RLIMIT_NOFILE` in force.
    pub limit: u64,
    /// Most idle pooled backend connections.
    pub pool: usize,
    /// Most control connections.
    pub control: usize,
    /// Most client connections: each needs two descriptors (client and backend). Idle
    /// pooled connections share these descriptors (see [`POOL_MAX`]).
    pub clients: usize,
}

/// Shares `limit` descriptors out, `open` of them already in use (listeners, poll,
/// signals, stdio).
pub fn budget(limit: u64, open: u64, with_control: bool) -> Budget {
    let pool = POOL_MAX.min(limit / 16);
    let control = if with_control {
        CONTROL_MAX.min(limit / 16)
    } else {
        0
    };
    let spare = limit.saturating_sub(open + RESERVE + control);
    Budget {
        limit,
        pool: to_usize(pool),
        control: to_usize(control),
        clients: to_usize(spare / 2),
    }
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit where allowed; returns the soft limit
/// now in force. An infinite limit is reported as `u64::MAX`.
pub fn raise_nofile() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one `rlimit` through a valid pointer. Failure (a hard
        // limit above the kernel's nr_open) leaves the old soft limit, reported below.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    Ok(if lim.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        // rlim_t is u64 on Linux; the conversion keeps other targets building.
        #[allow(clippy::useless_conversion)]
        u64::from(lim.rlim_cur)
    })
}

/// EMFILE, ENFILE, ENOBUFS, ENOMEM: out of descriptors (or kernel memory for sockets);
/// retrying at once would spin, and the peer is not at fault.
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Descriptors open now (Linux: entries of `/proc/self/fd`, less the one reading it).
pub fn open_fds() -> Option<u64> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(n.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_out_the_limit() {
        // This machine's limit: two descriptors per client after the reserves.
        assert_eq!(
            budget(20_000, 10, true),
            Budget {
                limit: 20_000,
                pool: 256,
                control: 256,
                clients: (20_000 - 10 - 32 - 256) / 2,
            }
        );
        // A small limit keeps most of it for clients.
        let small = budget(512, 10, true);
        assert_eq!((small.pool, small.control, small.clients), (32, 32, 219));
        assert_eq!(budget(512, 10, false).clients, 235);
        // Nothing left: zero clients, never an underflow.
        assert_eq!(budget(16, 40, true).clients, 0);
        assert_eq!(budget(u64::MAX, 10, true).pool, 256);
    }

    #[test]
    fn raising_reports_the_limit_in_force() {
        let limit = raise_nofile().unwrap();
        assert!(limit >= 64);
        let open = open_fds().unwrap();
        assert!(open >= 3 && open < limit, "{open} of {limit}");
    }
}
