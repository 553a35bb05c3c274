//! Server-side TLS on buffers we own (rustls' unbuffered API), so that an idle TLS client
//! holds no read or write buffer at all, as a plain one does.
//!
//! rustls' buffered `ServerConnection` keeps a 4 KiB read buffer per connection for its whole
//! life (it shrinks to 4 KiB, never to 0) plus its own queues: with thousands of idle secure
//! WebSockets that buffer was the largest item per connection. Here the TLS bytes read and
//! the records to send live in storage taken from a small per-thread free list when there is
//! something to hold and given back as soon as it is empty.
//!
//! The interface mirrors the buffered stream's in [`super::transport`]: `read` hands out
//! plaintext (decrypting what has arrived, reading the socket when the edge allows), `write`
//! encrypts plaintext into the outgoing records, `flush` puts them on the wire.

use std::io::{self, Read, Write};
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::server::ServerConnectionData;
use rustls::server::{ServerConfig, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
    UnbufferedStatus,
};

use super::buffer::FreeList;
use super::transport::{Io, Ready};

/// The largest TLS record on the wire (rustls' bound: 16 KiB of payload, 2 KiB of
/// expansion, 5 bytes of header). Every storage block holds one.
const RECORD_MAX: usize = 16 * 1024 + 2048 + 5;

/// A handshake message may span records up to 64 KiB (rustls' own limit, e.g. a client
/// certificate chain); the read storage grows that far for it and no further.
const INCOMING_MAX: usize = 0xffff + RECORD_MAX;

/// Plaintext encrypted per `write`: one full record.
const PLAINTEXT_PER_WRITE: usize = 16 * 1024;

/// Storage blocks kept for reuse by busy connections (bounded, so a burst does not pin
/// memory: 64 × 18 KiB).
const POOL_MAX: usize = 64;

thread_local! {
    static BLOCKS: FreeList = const { FreeList::new(RECORD_MAX, POOL_MAX) };
}

fn take_block() -> Vec<u8> {
    BLOCKS.with(FreeList::take)
}

/// Only standard blocks go back; one grown for a large handshake message is freed.
fn give_back(block: Vec<u8>) {
    BLOCKS.with(|b| b.give_back(block));
}

/// An accepted client socket and its server-side TLS state.
pub struct ServerTls {
    sock: TcpStream,
    conn: UnbufferedServerConnection,
    /// TLS bytes read and not processed yet: `incoming[..used]` (no storage while empty).
    incoming: Vec<u8>,
    used: usize,
    /// Records to send: `outgoing[sent..queued]` (no storage while empty).
    outgoing: Vec<u8>,
    sent: usize,
    queued: usize,
    /// Decrypted bytes the reader had no room for: `plain[plain_pos..]`.
    plain: Vec<u8>,
    plain_pos: usize,
    /// The client's close_notify arrived: reads end once `plain` is handed out.
    peer_closed: bool,
    /// A TLS error ended the connection.
    failed: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("sock", &self.sock)
            .field("handshaking", &self.conn.is_handshaking())
            .field("incoming", &self.used)
            .field("outgoing", &(self.queued - self.sent))
            .field("plain", &(self.plain.len() - self.plain_pos))
            .finish()
    }
}

impl ServerTls {
    /// Starts the server side of a handshake on a freshly accepted socket.
    pub fn new(sock: TcpStream, cfg: &Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(ServerTls {
            sock,
            conn: UnbufferedServerConnection::new(cfg.clone())?,
            incoming: Vec::new(),
            used: 0,
            outgoing: Vec::new(),
            sent: 0,
            queued: 0,
            plain: Vec::new(),
            plain_pos: 0,
            peer_closed: false,
            failed: false,
        })
    }

    /// The socket, for registration and shutdown.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// The socket, for (de)registration.
    pub fn socket_mut(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    /// rustls' view of the connection (handshake state, peer certificates).
    pub fn state(&self) -> &rustls::CommonState {
        &self.conn
    }

    /// Records wait to be sent.
    pub fn wants_write(&self) -> bool {
        self.sent < self.queued
    }

    /// Reads plaintext into `dst`: first what was decrypted earlier, then records already
    /// read, then the socket (only while `ready.readable`).
    pub fn read(&mut self, ready: &mut Ready, dst: &mut [u8]) -> Io {
        let mut n = self.take_plain(dst);
        let mut fresh = false;
        loop {
            if n > 0 {
                self.shed();
                self.keep_reading_if_pending(ready);
                return Io::Progress(n);
            }
            if self.failed {
                return Io::Failed;
            }
            if self.used > 0 || fresh {
                match self.process(dst) {
                    Ok(k) => n += k,
                    Err(e) => {
                        self.send_alert(ready);
                        return self.fail(&e);
                    }
                }
                fresh = false;
                if n > 0 {
                    continue;
                }
            }
            if self.peer_closed {
                return Io::Eof;
            }
            if !ready.readable {
                self.shed();
                return Io::WouldBlock;
            }
            if self.used == self.incoming.len() && !self.grow_incoming() {
                return self.fail(&"a handshake message over 64 KiB");
            }
            let space = self.incoming.get_mut(self.used..).unwrap_or_default();
            let room = space.len();
            match self.sock.read(space) {
                Ok(0) => return Io::Eof,
                Ok(k) => {
                    self.used += k;
                    fresh = true;
                    // A short read emptied the socket (see the plain stream's read).
                    if k < room && !ready.read_closed {
                        ready.readable = false;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready.readable = false;
                    self.shed();
                    return Io::WouldBlock;
                }
                Err(_) => return Io::Failed,
            }
        }
    }

    /// Encrypts up to one record of `first` then `second` into the outgoing records (call
    /// [`ServerTls::flush`] after). Nothing is taken during the handshake or while a full
    /// record's worth already waits to be sent.
    pub fn write_pair(&mut self, ready: &mut Ready, first: &[u8], second: &[u8]) -> Io {
        if self.failed {
            return Io::Failed;
        }
        if self.conn.is_handshaking() || self.queued - self.sent >= RECORD_MAX {
            return Io::WouldBlock;
        }
        let mut total = 0;
        for part in [first, second] {
            let take = part.len().min(PLAINTEXT_PER_WRITE - total);
            let Some(chunk) = part.get(..take).filter(|c| !c.is_empty()) else {
                continue;
            };
            let encrypted = self.encrypt(Some(chunk));
            // Records decrypted on the way wait in `plain`: the owner must come and read.
            self.keep_reading_if_pending(ready);
            match encrypted {
                Ok(()) => total += take,
                Err(e) => return self.fail(&e),
            }
            if take < part.len() {
                break;
            }
        }
        if total == 0 {
            Io::WouldBlock
        } else {
            Io::Progress(total)
        }
    }

    /// Queues a close_notify (once the handshake is done; before, closing the socket is all
    /// there is to say).
    pub fn close_notify(&mut self) {
        if !self.failed && !self.conn.is_handshaking() {
            if let Err(e) = self.encrypt(None) {
                self.fail(&e);
            }
        }
    }

    /// Puts queued records on the wire until done or the socket would block.
    pub fn flush(&mut self, ready: &mut Ready) -> Io {
        let mut total = 0;
        while self.sent < self.queued && ready.writable {
            let pending = self
                .outgoing
                .get(self.sent..self.queued)
                .unwrap_or_default();
            match self.sock.write(pending) {
                Ok(0) => return Io::Failed,
                Ok(n) => {
                    self.sent += n;
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.writable = false,
                Err(_) => return Io::Failed,
            }
        }
        if self.sent == self.queued {
            self.release_outgoing();
        }
        if total > 0 {
            Io::Progress(total)
        } else {
            Io::WouldBlock
        }
    }

    /// The owner reads only while `ready.readable`, and no socket edge will announce bytes
    /// already decrypted or records already read: keep the bit set while any wait.
    fn keep_reading_if_pending(&self, ready: &mut Ready) {
        if self.used > 0 || self.plain_pos < self.plain.len() {
            ready.readable = true;
        }
    }

    /// Last gasp after a TLS error: rustls queued an alert saying why (protocol version,
    /// handshake failure, bad record); encode it and try to put it on the wire once.
    fn send_alert(&mut self, ready: &mut Ready) {
        // Only while rustls has records queued: each call then hands out one before looking
        // at the input again (processing input after an error would fail it twice). An
        // empty input keeps rustls from reading anything more.
        let mut budget = 4;
        while self.conn.wants_write() && budget > 0 {
            budget -= 1;
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            let Ok(ConnectionState::EncodeTlsData(mut encoder)) = state else {
                break;
            };
            let (out, sent, queued) = (&mut self.outgoing, &mut self.sent, &mut self.queued);
            if encode_handshake(out, sent, queued, &mut encoder).is_err() {
                break;
            }
        }
        ready.writable = true;
        let _ = self.flush(ready);
    }

    fn fail(&mut self, why: &dyn std::fmt::Display) -> Io {
        crate::observe::log::debug("tls error", &[("error", &why)]);
        self.failed = true;
        Io::Failed
    }

    fn take_plain(&mut self, dst: &mut [u8]) -> usize {
        let pending = self.plain.get(self.plain_pos..).unwrap_or_default();
        let n = pending.len().min(dst.len());
        if let (Some(d), Some(s)) = (dst.get_mut(..n), pending.get(..n)) {
            d.copy_from_slice(s);
        }
        self.plain_pos += n;
        if self.plain_pos >= self.plain.len() {
            self.plain = Vec::new();
            self.plain_pos = 0;
        }
        n
    }

    /// Runs rustls over the records read until it needs more input or has nothing more to
    /// do; decrypted bytes go to `dst`, what does not fit to `plain`. Stops once `dst` is
    /// full so that undelivered plaintext stays bounded by one record.
    fn process(&mut self, dst: &mut [u8]) -> Result<usize, rustls::Error> {
        let mut delivered = 0;
        loop {
            let UnbufferedStatus { mut discard, state } = self
                .conn
                .process_tls_records(self.incoming.get_mut(..self.used).unwrap_or_default());
            let stop = match state? {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record?;
                        discard += record.discard;
                        let room = dst.get_mut(delivered..).unwrap_or_default();
                        let n = room.len().min(record.payload.len());
                        if let (Some(d), Some(s)) = (room.get_mut(..n), record.payload.get(..n)) {
                            d.copy_from_slice(s);
                        }
                        delivered += n;
                        self.plain
                            .extend_from_slice(record.payload.get(n..).unwrap_or_default());
                    }
                    delivered == dst.len()
                }
                ConnectionState::EncodeTlsData(mut encoder) => {
                    let (out, sent, queued) =
                        (&mut self.outgoing, &mut self.sent, &mut self.queued);
                    encode_handshake(out, sent, queued, &mut encoder)
                        .map_err(|e| rustls::Error::General(e.to_string()))?;
                    false
                }
                // The records wait in `outgoing` until `flush`; rustls only needs to know
                // they are taken care of.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    false
                }
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    false
                }
                ConnectionState::Closed => {
                    self.peer_closed = true;
                    true
                }
                ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_) => true,
                // Early data is never enabled in our configuration; a newer state is not one
                // this loop knows how to serve.
                _ => return Err(rustls::Error::General("unexpected TLS state".into())),
            };
            self.discard(discard);
            if stop {
                return Ok(delivered);
            }
        }
    }

    fn discard(&mut self, n: usize) {
        let n = n.min(self.used);
        if n > 0 {
            self.incoming.copy_within(n..self.used, 0);
            self.used -= n;
        }
    }

    /// Encrypts `plaintext` (or a close_notify) into `outgoing`, encoding first whatever
    /// handshake records rustls has queued (a key update, session tickets). Records that
    /// arrived meanwhile are decrypted into `plain` for the next read.
    fn encrypt(&mut self, plaintext: Option<&[u8]>) -> Result<(), EncryptOrTls> {
        loop {
            let UnbufferedStatus { mut discard, state } = self
                .conn
                .process_tls_records(self.incoming.get_mut(..self.used).unwrap_or_default());
            let done = match state.map_err(EncryptOrTls::Tls)? {
                ConnectionState::WriteTraffic(mut writer) => Some(encode_into(
                    &mut self.outgoing,
                    &mut self.sent,
                    &mut self.queued,
                    &mut |out| match plaintext {
                        Some(data) => writer.encrypt(data, out),
                        None => writer.queue_close_notify(out),
                    },
                )),
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(EncryptOrTls::Tls)?;
                        discard += record.discard;
                        self.plain.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut encoder) => {
                    let (out, sent, queued) =
                        (&mut self.outgoing, &mut self.sent, &mut self.queued);
                    encode_handshake(out, sent, queued, &mut encoder)?;
                    None
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                _ => Some(Err(EncryptOrTls::Tls(rustls::Error::General(
                    "cannot write in this TLS state".into(),
                )))),
            };
            self.discard(discard);
            if let Some(result) = done {
                return result;
            }
        }
    }

    fn grow_incoming(&mut self) -> bool {
        if self.incoming.is_empty() {
            self.incoming = take_block();
            return true;
        }
        if self.incoming.len() >= INCOMING_MAX {
            return false;
        }
        let to = (self.incoming.len() * 2).min(INCOMING_MAX);
        self.incoming.resize(to, 0);
        true
    }

    /// Gives back storage that holds nothing (called when a read stops).
    fn shed(&mut self) {
        if self.used == 0 && !self.incoming.is_empty() {
            give_back(std::mem::take(&mut self.incoming));
        }
    }

    fn release_outgoing(&mut self) {
        self.sent = 0;
        self.queued = 0;
        if !self.outgoing.is_empty() {
            give_back(std::mem::take(&mut self.outgoing));
        }
    }
}

impl Drop for ServerTls {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.incoming));
        give_back(std::mem::take(&mut self.outgoing));
    }
}

/// Appends what `produce` writes to `outgoing[queued..]`, growing the storage to the size
/// rustls asks for: small records (a WebSocket message, a close_notify, a ticket) get an
/// allocation of their own size, so a client that does not read holds what it is owed and
/// not a full block; records of 4 KiB and more use a pooled block.
fn encode_into(
    outgoing: &mut Vec<u8>,
    sent: &mut usize,
    queued: &mut usize,
    produce: &mut dyn FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> Result<(), EncryptOrTls> {
    if *sent > 0 {
        outgoing.copy_within(*sent..*queued, 0);
        *queued -= *sent;
        *sent = 0;
    }
    loop {
        match produce(outgoing.get_mut(*queued..).unwrap_or_default()) {
            Ok(n) => {
                *queued += n;
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                let want = *queued + required_size;
                if want <= outgoing.len() {
                    // rustls asked for no more than there is: do not loop on it.
                    return Err(EncryptOrTls::Encrypt(EncryptError::EncryptExhausted));
                }
                if outgoing.is_empty() && (4096..=RECORD_MAX).contains(&want) {
                    *outgoing = take_block();
                } else {
                    outgoing.resize(want, 0);
                }
            }
            Err(e) => return Err(EncryptOrTls::Encrypt(e)),
        }
    }
}

/// Copies one record rustls prepared (handshake, alert, ticket, key update) to `outgoing`.
fn encode_handshake(
    outgoing: &mut Vec<u8>,
    sent: &mut usize,
    queued: &mut usize,
    encoder: &mut EncodeTlsData<'_, ServerConnectionData>,
) -> Result<(), EncryptOrTls> {
    encode_into(outgoing, sent, queued, &mut |out| {
        encoder.encode(out).map_err(encode_error)
    })
}

fn encode_error(e: EncodeError) -> EncryptError {
    match e {
        EncodeError::InsufficientSize(s) => EncryptError::InsufficientSize(s),
        // Each chunk is encoded once by construction; treat a repeat as exhausted.
        EncodeError::AlreadyEncoded => EncryptError::EncryptExhausted,
    }
}

/// Why encrypting failed: the record layer, or the connection state.
#[derive(Debug)]
enum EncryptOrTls {
    Encrypt(EncryptError),
    Tls(rustls::Error),
}

impl std::fmt::Display for EncryptOrTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncryptOrTls::Encrypt(e) => e.fmt(f),
            EncryptOrTls::Tls(e) => e.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::tls::{client_config, server_config, CertPair};
    use std::time::{Duration, Instant};

    fn server_cfg() -> Arc<ServerConfig> {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("wslb-tls-server-{}-{seq}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        server_config(&[CertPair { cert, key }]).unwrap()
    }

    /// A rustls client on a blocking socket (its own thread) against a `ServerTls` driven
    /// here, readiness re-armed each pass as epoll would after every edge.
    fn pair() -> (ServerTls, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (sock, _) = listener.accept().unwrap();
        sock.set_nonblocking(true).unwrap();
        let server = ServerTls::new(TcpStream::from_std(sock), &server_cfg()).unwrap();
        (server, client)
    }

    fn client_stream(
        sock: std::net::TcpStream,
    ) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
        let cfg = client_config(None, true).unwrap();
        let conn = rustls::ClientConnection::new(cfg, "localhost".try_into().unwrap()).unwrap();
        rustls::StreamOwned::new(conn, sock)
    }

    fn armed() -> Ready {
        Ready {
            readable: true,
            writable: true,
            read_closed: false,
        }
    }

    /// Echoes until the client's close_notify; reads into a small buffer so records are
    /// handed out in pieces.
    fn echo_until_eof(server: &mut ServerTls, dst_len: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut pending = Vec::new();
        let mut dst = vec![0u8; dst_len];
        loop {
            assert!(Instant::now() < deadline, "echo did not finish: {server:?}");
            let mut ready = armed();
            match server.read(&mut ready, &mut dst) {
                Io::Progress(n) => pending.extend_from_slice(&dst[..n]),
                Io::Eof => break,
                Io::Failed => panic!("server failed: {server:?}"),
                Io::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
            }
            while !pending.is_empty() {
                let mut ready = armed();
                let _ = server.flush(&mut ready);
                match server.write_pair(&mut ready, &pending, &[]) {
                    Io::Progress(n) => drop(pending.drain(..n)),
                    Io::WouldBlock => break,
                    other => panic!("write: {other:?}"),
                }
            }
            let _ = server.flush(&mut armed());
        }
    }

    #[test]
    fn echoes_in_pieces_across_a_key_update_and_closes_cleanly() {
        let (mut server, sock) = pair();
        let client = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut tls = client_stream(sock);
            let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
            let mut echoed = Vec::new();
            let mut buf = vec![0u8; 65536];
            for (i, piece) in data.chunks(37_000).enumerate() {
                if i == 3 {
                    tls.conn.refresh_traffic_keys().unwrap();
                }
                tls.write_all(piece).unwrap();
                tls.flush().unwrap();
                let want = (i * 37_000 + piece.len()).min(data.len());
                while echoed.len() < want {
                    let n = tls.read(&mut buf).unwrap();
                    assert!(n > 0, "eof after {} bytes", echoed.len());
                    echoed.extend_from_slice(&buf[..n]);
                }
            }
            assert!(echoed == data, "echo differs");
            tls.conn.send_close_notify();
            tls.flush().unwrap();
            let mut rest = Vec::new();
            // The server answers with its own close_notify: a clean end, no truncation error.
            tls.read_to_end(&mut rest).map(|_| rest.len())
        });
        echo_until_eof(&mut server, 777);
        server.close_notify();
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.wants_write() && Instant::now() < deadline {
            let _ = server.flush(&mut armed());
        }
        let _ = server.socket().shutdown(std::net::Shutdown::Write);
        assert_eq!(client.join().unwrap().unwrap(), 0);
    }

    #[test]
    fn an_idle_connection_holds_no_buffer() {
        let (mut server, sock) = pair();
        let client = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut tls = client_stream(sock);
            tls.write_all(&[1u8; 20_000]).unwrap();
            tls.flush().unwrap();
            let mut got = 0;
            let mut buf = vec![0u8; 65536];
            while got < 20_000 {
                got += tls.read(&mut buf).unwrap();
            }
            tls
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut echoed = 0;
        let mut dst = vec![0u8; 16384];
        while echoed < 20_000 {
            assert!(Instant::now() < deadline);
            let mut ready = armed();
            if let Io::Progress(n) = server.read(&mut ready, &mut dst) {
                let mut off = 0;
                while off < n {
                    let _ = server.flush(&mut armed());
                    if let Io::Progress(k) = server.write_pair(&mut armed(), &dst[off..n], &[]) {
                        off += k;
                    }
                }
                echoed += n;
            }
            let _ = server.flush(&mut armed());
        }
        let _tls = client.join().unwrap();
        // The next read finds nothing: storage goes back.
        assert_eq!(server.read(&mut armed(), &mut dst), Io::WouldBlock);
        assert!(!server.wants_write());
        assert_eq!(
            (
                server.incoming.capacity(),
                server.outgoing.capacity(),
                server.plain.capacity()
            ),
            (0, 0, 0),
            "{server:?}"
        );
    }

    #[test]
    fn garbage_fails_the_connection_without_panicking() {
        use std::io::Write;
        let (mut server, mut sock) = pair();
        sock.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut dst = [0u8; 1024];
        loop {
            assert!(Instant::now() < deadline);
            match server.read(&mut armed(), &mut dst) {
                Io::Failed => break,
                Io::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(server.write_pair(&mut armed(), b"x", &[]), Io::Failed);
        // The client is told why: a TLS alert record (content type 21).
        use std::io::Read;
        let mut alert = [0u8; 7];
        sock.read_exact(&mut alert).unwrap();
        assert_eq!(alert[0], 21, "{alert:?}");
    }
}
