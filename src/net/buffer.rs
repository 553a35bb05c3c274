//! Fixed-capacity byte buffer for one direction of one connection.
//!
//! Storage is taken on first use and given back when the buffer drains, so thousands of
//! idle WebSocket tunnels hold no buffer memory at all. Given-back storage goes to a small
//! per-thread free list (the loop is single-threaded), so a busy tunnel does not pay an
//! allocation per message. Capacity never grows: a peer that sends faster than the other
//! side reads hits a full buffer, and the loop stops reading it.

use std::cell::RefCell;

/// Bytes read from one side, waiting to be written to the other.
#[derive(Debug, Default)]
pub struct Buffer {
    data: Vec<u8>,
    start: usize,
    end: usize,
}

/// Size of every buffer: big enough for a typical message or response chunk per syscall,
/// small enough that a constrained host can hold many tunnels with traffic in flight.
pub const BUF_SIZE: usize = 16 * 1024;

/// Free storage kept for reuse: enough for a few hundred busy connections at once, bounded
/// so that a burst does not pin memory forever.
const POOL_MAX: usize = 256;

/// Storage blocks of one size kept for reuse on this thread (the loop is single-threaded),
/// at most `max` of them, so that a burst does not pin memory forever. A block of another
/// size (one grown past the standard) is freed, not kept.
#[derive(Debug)]
pub(crate) struct FreeList {
    size: usize,
    max: usize,
    blocks: RefCell<Vec<Vec<u8>>>,
}

impl FreeList {
    /// An empty list of `size`-byte blocks, holding at most `max`.
    pub(crate) const fn new(size: usize, max: usize) -> Self {
        FreeList {
            size,
            max,
            blocks: RefCell::new(Vec::new()),
        }
    }

    /// A kept block, or a fresh zeroed one.
    pub(crate) fn take(&self) -> Vec<u8> {
        self.blocks
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0; self.size])
    }

    /// Keeps `block` for the next `take`, if it is a standard one and there is room.
    pub(crate) fn give_back(&self, block: Vec<u8>) {
        let mut blocks = self.blocks.borrow_mut();
        if block.len() == self.size && blocks.len() < self.max {
            blocks.push(block);
        }
    }
}

thread_local! {
    static POOL: FreeList = const { FreeList::new(BUF_SIZE, POOL_MAX) };
}

fn take_storage() -> Vec<u8> {
    POOL.with(FreeList::take)
}

fn give_back(v: Vec<u8>) {
    POOL.with(|p| p.give_back(v));
}

impl Drop for Buffer {
    fn drop(&mut self) {
        self.release();
    }
}

impl Buffer {
    /// Readable bytes.
    pub fn data(&self) -> &[u8] {
        self.data.get(self.start..self.end).unwrap_or_default()
    }

    /// Readable bytes, to fix up in place (an HTTP version the parser would refuse).
    pub fn data_mut(&mut self) -> &mut [u8] {
        self.data.get_mut(self.start..self.end).unwrap_or_default()
    }

    /// Number of readable bytes.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Nothing to read.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Current capacity: [`BUF_SIZE`] unless grown for a large head.
    fn capacity(&self) -> usize {
        self.data.len().max(BUF_SIZE)
    }

    /// No room left for another byte.
    pub fn is_full(&self) -> bool {
        self.len() >= self.capacity()
    }

    /// Raises the capacity to `max` (only for an HTTP head that may legitimately exceed one
    /// buffer; the storage is freed rather than pooled when it drains).
    pub fn grow(&mut self, max: usize) {
        if self.data.len() >= max {
            return;
        }
        if self.data.is_empty() {
            self.data = take_storage();
        }
        self.data.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        self.data.resize(max, 0);
    }

    /// Free room at the tail, compacting or allocating first so that as much as possible is
    /// contiguous. Call [`Buffer::commit`] with what was written.
    pub fn space(&mut self) -> &mut [u8] {
        if self.data.is_empty() {
            self.data = take_storage();
        } else if self.start > 0 && self.end == self.data.len() {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let end = self.end;
        self.data.get_mut(end..).unwrap_or_default()
    }

    /// Marks `n` bytes of [`Buffer::space`] as written.
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.data.len());
    }

    /// Drops `n` readable bytes from the front; frees the storage once empty.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.release();
        }
    }

    /// Appends as much of `bytes` as fits; returns how much did.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() {
            return 0;
        }
        if self.start > 0 && self.data.len().saturating_sub(self.end) < bytes.len() {
            // The room `has_room` counts includes the consumed front: callers size what they
            // push by it (and have already parsed it), so make it usable rather than take
            // less. A shorter tail only shortens a read; a shorter push would lose bytes.
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let space = self.space();
        let n = space.len().min(bytes.len());
        if let (Some(dst), Some(src)) = (space.get_mut(..n), bytes.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.commit(n);
        n
    }

    /// Room for at least `n` more bytes (possibly after compaction).
    pub fn has_room(&self, n: usize) -> bool {
        self.capacity() - self.len() >= n
    }

    /// Forgets all content and frees the storage.
    pub fn release(&mut self) {
        give_back(std::mem::take(&mut self.data));
        self.start = 0;
        self.end = 0;
    }

    /// Bytes of heap held (0 when idle).
    #[cfg(test)]
    pub fn allocated(&self) -> usize {
        self.data.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lazy_bounded_and_released() {
        let mut b = Buffer::default();
        assert_eq!(b.allocated(), 0);
        let big = vec![7u8; BUF_SIZE + 100];
        assert_eq!(b.push(&big), BUF_SIZE);
        assert!(b.is_full());
        assert_eq!(b.push(b"x"), 0);
        b.consume(100);
        assert!(b.has_room(100));
        assert_eq!(b.push(&big[..100]), 100, "compacts to make room");
        assert_eq!(b.len(), BUF_SIZE);
        b.consume(BUF_SIZE);
        assert!(b.is_empty());
        assert_eq!(b.allocated(), 0, "drained buffers hold no memory");
    }

    #[test]
    fn push_uses_the_consumed_front_even_when_the_tail_is_not_full() {
        let mut b = Buffer::default();
        b.push(&vec![1u8; 10_000]);
        b.consume(4_000);
        // 6,000 bytes held at 4,000..10,000: the tail has 6,384 bytes, the buffer 10,384.
        let more = vec![2u8; BUF_SIZE - 6_000];
        assert!(b.has_room(more.len()));
        assert_eq!(b.push(&more), more.len());
        assert_eq!(b.len(), BUF_SIZE);
        assert!(b.data()[..6_000].iter().all(|&x| x == 1));
        assert!(b.data()[6_000..].iter().all(|&x| x == 2));
    }

    #[test]
    fn grows_for_heads_only_when_asked() {
        let mut b = Buffer::default();
        b.push(&vec![1u8; BUF_SIZE]);
        assert!(b.is_full());
        b.grow(4 * BUF_SIZE);
        assert!(!b.is_full());
        assert_eq!(b.push(&vec![2u8; 4 * BUF_SIZE]), 3 * BUF_SIZE);
        assert_eq!(b.data()[BUF_SIZE - 1], 1);
        assert_eq!(b.data()[BUF_SIZE], 2);
        assert!(b.is_full());
    }

    #[test]
    fn drop_returns_storage() {
        let mut b = Buffer::default();
        b.push(b"x");
        drop(b);
        let mut c = Buffer::default();
        c.push(b"y");
        assert_eq!(c.data(), b"y");
    }

    #[test]
    fn keeps_order_across_compaction() {
        let mut b = Buffer::default();
        b.push(b"hello ");
        b.consume(2);
        b.push(b"world");
        assert_eq!(b.data(), b"llo world");
    }
}
