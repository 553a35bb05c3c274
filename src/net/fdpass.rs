//! Handing open sockets to another process (SCM_RIGHTS over a Unix stream), and telling
//! systemd who the main process is (`sd_notify`). Used by the binary upgrade: the listening
//! sockets move, so the kernel keeps queueing connections on them and none is refused.
//!
//! std has no stable API for ancillary data yet (`UnixStream::send_vectored_with_ancillary`
//! is unstable), so this is the one place with `unsafe`: `sendmsg`/`recvmsg` with the
//! `CMSG_*` macros from libc, as their manual pages describe.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

/// Most descriptors sent in one message (listeners and the control listener).
pub const MAX_FDS: usize = 64;

/// Sends `data` with `fds` attached in one message.
pub fn send_fds(stream: &impl AsRawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS || data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "between 1 data byte and MAX_FDS descriptors",
        ));
    }
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid "no name, no flags" header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: `control` is CMSG_SPACE(fd_bytes) long, so the first header and its
        // data (CMSG_LEN(fd_bytes) bytes from its start) lie inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    // SAFETY: every pointer in `msg` points into live buffers of the stated lengths.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    match sent {
        n if n < 0 => Err(io::Error::last_os_error()),
        n if n as usize != data.len() => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short write of a descriptor message",
        )),
        _ => Ok(()),
    }
}

/// Receives one message into `buf` and the descriptors attached to it (owned: closed when
/// dropped). Returns the data length (0 = the peer closed).
pub fn recv_fds(stream: &impl AsRawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let fd_bytes = MAX_FDS * std::mem::size_of::<RawFd>();
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: as in `send_fds`.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: the buffers outlive the call; MSG_CMSG_CLOEXEC so no descriptor leaks into
    // processes we spawn later.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* walk stays within `msg_controllen` as the kernel set it; each
    // SCM_RIGHTS payload is an array of ints it installed in this process, which we now own.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned((data as *const RawFd).add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many descriptors in one message",
        ));
    }
    Ok((n as usize, fds))
}

/// Tells systemd (`Type=notify`) something about this service, e.g. `READY=1` or
/// `MAINPID=123`; does nothing when not started by systemd (no `NOTIFY_SOCKET`).
pub fn sd_notify(state: &str) -> io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_listening_socket_crosses_and_still_accepts() {
        let (a, b) = UnixStream::pair().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let second = TcpListener::bind("127.0.0.1:0").unwrap();
        send_fds(
            &a,
            br#"{"n":2}"#,
            &[listener.as_raw_fd(), second.as_raw_fd()],
        )
        .unwrap();
        drop(listener);
        let mut buf = [0u8; 64];
        let (n, fds) = recv_fds(&b, &mut buf).unwrap();
        assert_eq!(&buf[..n], br#"{"n":2}"#);
        assert_eq!(fds.len(), 2);
        let got = TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(got.local_addr().unwrap(), addr);
        // The original was closed: the kernel socket lives on through the passed copy.
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (served, _) = got.accept().unwrap();
        assert_eq!(served.peer_addr().unwrap(), client.local_addr().unwrap());
        let _ = got.as_fd();
    }

    #[test]
    fn plain_data_and_a_closed_peer() {
        let (a, b) = UnixStream::pair().unwrap();
        send_fds(&a, b"ready", &[]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv_fds(&b, &mut buf).unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"ready"[..], 0));
        drop(a);
        assert_eq!(recv_fds(&b, &mut buf).unwrap().0, 0);
        assert!(send_fds(&b, b"", &[]).is_err());
    }

    #[test]
    fn notify_without_systemd_is_a_no_op() {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            sd_notify("READY=1").unwrap();
        }
    }
}
