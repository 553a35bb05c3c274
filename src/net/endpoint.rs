//! One socket's side of a connection: readiness kept in userland, and non-blocking reads and
//! writes turned into [`Io`] so state code never matches on `io::ErrorKind`.

use crate::net::buffer::Buffer;
use crate::net::transport::Transport;

pub use crate::net::transport::{Io, Ready};

/// Reads once into `dst`.
pub fn read_some(stream: &mut Transport, ready: &mut Ready, dst: &mut [u8]) -> Io {
    stream.read(ready, dst)
}

/// Reads once into the free space of `buf`, at most `max` bytes.
pub fn read_into(stream: &mut Transport, ready: &mut Ready, buf: &mut Buffer, max: usize) -> Io {
    let space = buf.space();
    let len = space.len().min(max);
    let io = stream.read(ready, space.get_mut(..len).unwrap_or_default());
    if let Io::Progress(n) = io {
        buf.commit(n);
    }
    if buf.is_empty() {
        // Nothing arrived: an idle connection keeps no buffer.
        buf.release();
    }
    io
}

/// Bytes owed to one peer: an optional head (a rewritten HTTP head or a frame the balancer
/// made, which may exceed a buffer) always written before the relayed bytes in `buf`.
#[derive(Debug, Default)]
pub struct Outbox {
    head: Vec<u8>,
    head_pos: usize,
    /// Relayed bytes, written after `head`.
    pub buf: Buffer,
}

impl Outbox {
    /// Nothing left to write.
    pub fn is_empty(&self) -> bool {
        self.head_pos >= self.head.len() && self.buf.is_empty()
    }

    /// Bytes of the head not written yet (the balancer's own frames wait here while the
    /// peer does not read: callers bound it).
    pub fn head_pending(&self) -> usize {
        self.head.len().saturating_sub(self.head_pos)
    }

    /// A head may be queued only when no relayed bytes wait, or it would overtake them.
    pub fn can_queue_head(&self) -> bool {
        self.buf.is_empty()
    }

    /// Hands out the head storage to write into directly (same rule as `queue_head`).
    pub fn head_vec(&mut self) -> &mut Vec<u8> {
        if self.head_pos >= self.head.len() {
            self.head.clear();
            self.head_pos = 0;
        }
        &mut self.head
    }

    /// Rewinds the head so it is written again on a fresh connection.
    pub fn rewind_head(&mut self) {
        self.head_pos = 0;
    }

    /// Forgets the head once it can no longer be needed, and frees it if large.
    pub fn drop_head(&mut self) {
        self.head.clear();
        self.head_pos = 0;
        if self.head.capacity() > 4096 {
            self.head = Vec::new();
        }
    }

    /// Frees the head storage once it is all written: a tunnel rarely queues a head again
    /// (only the balancer's own frames), so thousands of idle tunnels keep none.
    pub fn shed_written_head(&mut self) {
        if self.head_pos >= self.head.len() && self.head.capacity() > 0 {
            self.head = Vec::new();
            self.head_pos = 0;
        }
    }

    /// Writes as much as the socket takes (and any TLS records pending, even with nothing
    /// queued here). Returns bytes written, or the blocking outcome.
    pub fn flush(&mut self, stream: &mut Transport, ready: &mut Ready) -> Io {
        let mut total = 0;
        while ready.writable {
            if stream.wants_write() {
                match stream.flush_tls(ready) {
                    Io::Progress(n) => total += n,
                    Io::Failed => return Io::Failed,
                    _ => {}
                }
                continue;
            }
            if self.is_empty() {
                break;
            }
            let head = self.head.get(self.head_pos..).unwrap_or_default();
            let io = stream.write_pair(ready, head, self.buf.data());
            if let Io::Progress(n) = io {
                let from_head = n.min(head.len());
                self.head_pos += from_head;
                self.buf.consume(n - from_head);
            }
            match io {
                Io::Progress(n) => total += n,
                Io::WouldBlock => {
                    if !stream.wants_write() {
                        break;
                    }
                }
                other => return other,
            }
        }
        if total > 0 {
            Io::Progress(total)
        } else {
            Io::WouldBlock
        }
    }
}
