//! Reused per-connection byte buffers for monoio's owned-buffer I/O.
//!
//! monoio hands a buffer to the kernel for the duration of a read or write, so a connection
//! keeps one boxed slice per direction and lends it out for each operation. Positions are kept
//! as offsets (`start..end`), never as borrowed views across an `.await`.
//!
//! These buffers hold plaintext (opened records, messages to seal). A buffer is zeroed when its
//! memory goes back to the allocator: a [`ReadBuf`] dropped with its storage, a buffer the full
//! [`BufPool`] does not keep, the pool's buffers when the pool is dropped. Going back to the
//! pool it is not zeroed: that is the per-message path, and the next connection to take it
//! only ever reads what it wrote itself.

use std::cell::RefCell;
use std::io;
use std::ops::Range;

use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use zeroize::Zeroize;

/// A fixed-size buffer holding the unconsumed bytes `start..end`.
#[derive(Debug)]
pub struct ReadBuf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    /// A zeroed buffer of `capacity` bytes (zeroed once, so every slice of it is initialised).
    pub fn new(capacity: usize) -> Self {
        Self::from_storage(vec![0; capacity].into_boxed_slice())
    }

    /// A buffer over storage taken from a [`BufPool`].
    pub fn from_storage(data: Box<[u8]>) -> Self {
        Self {
            data,
            start: 0,
            end: 0,
        }
    }

    /// A buffer without storage (no allocation); [`ReadBuf::attach`] gives it some.
    pub fn detached() -> Self {
        Self::from_storage(Box::default())
    }

    /// True if the buffer currently has no storage.
    pub fn is_detached(&self) -> bool {
        self.data.is_empty()
    }

    /// Give a detached buffer storage from `pool`.
    pub fn attach(&mut self, pool: &BufPool) {
        if self.is_detached() {
            self.data = pool.take();
            self.clear();
        }
    }

    /// Return the storage of an empty buffer to `pool`, so an idle connection holds none.
    pub fn detach(&mut self, pool: &BufPool) {
        if self.is_empty() && !self.is_detached() {
            pool.give(std::mem::take(&mut self.data));
        }
    }

    /// Hand the storage back to `pool` (whatever it still holds is dropped).
    pub fn release(mut self, pool: &BufPool) {
        pool.give(std::mem::take(&mut self.data));
    }

    /// The unconsumed bytes.
    pub fn data(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// The unconsumed bytes, writable (records are opened in place).
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.start..self.end]
    }

    /// Number of unconsumed bytes.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// True if nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Total size of the buffer.
    pub fn capacity(&self) -> usize {
        self.data.len()
    }

    /// Mark `n` bytes at the front as used.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n.min(self.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Forget everything buffered.
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Free space after the data, moving the data to the front first if bytes before it were
    /// consumed (so the free space is all there is).
    pub fn spare_mut(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.data[self.end..]
    }

    /// Record that `n` bytes were written into [`ReadBuf::spare_mut`].
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.data.len());
    }

    /// Read once from `io` into the free space. Returns 0 at end of stream.
    ///
    /// Errors with `OutOfMemory` if the buffer is full: callers bound what they accumulate.
    /// Not cancel-safe: bytes read by an operation whose future is dropped are lost.
    pub async fn fill_from<R: AsyncReadRent>(&mut self, io: &mut R) -> io::Result<usize> {
        let _ = self.spare_mut();
        if self.end == self.data.len() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "read buffer full",
            ));
        }
        let range = self.end..self.data.len();
        let n = read_into(io, &mut self.data, range).await?;
        self.end += n;
        Ok(n)
    }

    /// Write all unconsumed bytes to `io` and empty the buffer.
    pub async fn drain_to<W: AsyncWriteRent>(&mut self, io: &mut W) -> io::Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        write_from(io, &mut self.data, self.start..self.end).await?;
        self.clear();
        Ok(())
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        wipe(&mut self.data);
    }
}

/// Zeroes a buffer whose memory is about to go back to the allocator: it may have held
/// plaintext.
pub(crate) fn wipe(buf: &mut [u8]) {
    if buf.is_empty() {
        return;
    }
    buf.zeroize();
    #[cfg(test)]
    WIPED.with(|wiped| wiped.set(wiped.get() + 1));
}

#[cfg(test)]
thread_local! {
    /// Buffers [`wipe`] zeroed on this thread, for tests.
    pub(crate) static WIPED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Size of the buffers a worker lends to its connections: the largest TLS record a client may
/// send fits whole, and so does one sealed record of the largest plaintext.
pub const POOL_BUFFER_BYTES: usize = 20 * 1024;

const _: () = assert!(POOL_BUFFER_BYTES >= crate::tls::record::MAX_RECORD_LEN);
const _: () = assert!(
    POOL_BUFFER_BYTES
        >= crate::tls::record::MAX_SEAL_HEADER
            + crate::tls::MAX_PLAINTEXT
            + crate::tls::record::MAX_SEAL_TRAILER
            + crate::tls::record::CONTROL_RECORD_ROOM
);

/// Free buffers a worker keeps for reuse; beyond this they go back to the allocator.
pub const MAX_POOLED_BUFFERS: usize = 64;

/// A worker-local pool of I/O buffers. Connections hold buffers only while bytes are moving:
/// an idle session waits for readiness without one, which keeps idle connections small.
#[derive(Debug)]
pub struct BufPool {
    free: RefCell<Vec<Box<[u8]>>>,
    size: usize,
}

impl Default for BufPool {
    /// A pool of [`POOL_BUFFER_BYTES`] buffers.
    fn default() -> Self {
        BufPool::sized(POOL_BUFFER_BYTES)
    }
}

impl BufPool {
    /// A pool of `size`-byte buffers.
    pub fn sized(size: usize) -> Self {
        BufPool {
            free: RefCell::default(),
            size,
        }
    }

    /// A buffer of the pool's size, reused if one is free.
    pub fn take(&self) -> Box<[u8]> {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0; self.size].into_boxed_slice())
    }

    /// Hand a buffer back (zeroed and freed if the pool is full or it has another size).
    pub fn give(&self, mut buf: Box<[u8]>) {
        let mut free = self.free.borrow_mut();
        if buf.len() == self.size && free.len() < MAX_POOLED_BUFFERS {
            free.push(buf);
        } else {
            wipe(&mut buf);
        }
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        for buf in self.free.get_mut() {
            wipe(buf);
        }
    }
}

/// Lends `buf[range]` to the kernel for one read; returns how many bytes came (0: end of
/// stream). Not cancel-safe: dropping the call drops the buffer with the operation.
pub async fn read_into<R: AsyncReadRent>(
    io: &mut R,
    buf: &mut Box<[u8]>,
    range: Range<usize>,
) -> io::Result<usize> {
    let owned = std::mem::take(buf);
    let (result, slice) = io.read(owned.slice_mut(range)).await;
    *buf = slice.into_inner();
    result
}

/// Lends `buf[range]` to the kernel until all of it is written. Not cancel-safe, as above.
pub async fn write_from<W: AsyncWriteRent>(
    io: &mut W,
    buf: &mut Box<[u8]>,
    range: Range<usize>,
) -> io::Result<()> {
    let owned = std::mem::take(buf);
    let (result, slice) = io.write_all(owned.slice(range)).await;
    *buf = slice.into_inner();
    result.map(|_| ())
}

/// Write all of `buf` to `io`, then clear it, keeping its allocation.
pub async fn write_all_vec<W: AsyncWriteRent>(io: &mut W, buf: &mut Vec<u8>) -> io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let owned = std::mem::take(buf);
    let (result, mut owned) = io.write_all(owned).await;
    owned.clear();
    *buf = owned;
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_returns_storage_to_the_pool() {
        let pool = BufPool::default();
        let mut b = ReadBuf::detached();
        assert!(b.is_detached());
        b.attach(&pool);
        assert_eq!(b.capacity(), POOL_BUFFER_BYTES);
        b.spare_mut()[0] = 1;
        b.commit(1);
        b.detach(&pool);
        assert!(!b.is_detached(), "a buffer holding data keeps its storage");
        b.consume(1);
        b.detach(&pool);
        assert!(b.is_detached());
        assert_eq!(pool.free.borrow().len(), 1);
        b.attach(&pool);
        assert!(pool.free.borrow().is_empty(), "storage is reused");
    }

    fn wiped() -> usize {
        WIPED.with(|wiped| wiped.get())
    }

    /// Plaintext is zeroed when its buffer is freed, not when it goes back to the pool.
    #[test]
    fn buffers_are_zeroed_when_freed_not_when_pooled() {
        let pool = BufPool::default();
        let before = wiped();
        let buf = ReadBuf::from_storage(pool.take());
        buf.release(&pool);
        assert_eq!(wiped(), before, "back in the pool: kept as it is");
        drop(ReadBuf::detached());
        assert_eq!(wiped(), before, "no storage, nothing to wipe");
        let mut buf = ReadBuf::detached();
        buf.attach(&pool);
        drop(buf);
        assert_eq!(wiped(), before + 1, "dropped with its storage");
        for _ in 0..MAX_POOLED_BUFFERS + 2 {
            pool.give(vec![1; POOL_BUFFER_BYTES].into_boxed_slice());
        }
        assert_eq!(
            wiped(),
            before + 3,
            "the pool keeps 64, frees and wipes the rest"
        );
        pool.give(vec![1; 10].into_boxed_slice());
        assert_eq!(wiped(), before + 4, "another size is freed");
        drop(pool);
        assert_eq!(wiped(), before + 4 + MAX_POOLED_BUFFERS, "the pool dropped");
    }

    #[test]
    fn consume_and_compact() {
        let mut b = ReadBuf::new(8);
        b.spare_mut()[..6].copy_from_slice(b"abcdef");
        b.commit(6);
        b.consume(4);
        assert_eq!(b.data(), b"ef");
        // Bytes were consumed: compaction moves "ef" to the front, so all the room is free
        // space (a whole record fits beside a partial message).
        assert_eq!(b.spare_mut().len(), 6);
        assert_eq!(b.data(), b"ef");
        b.spare_mut()[..2].copy_from_slice(b"gh");
        b.commit(2);
        assert_eq!(b.spare_mut().len(), 4);
        assert_eq!(b.data(), b"efgh");
        b.consume(4);
        assert!(b.is_empty());
        assert_eq!(b.spare_mut().len(), 8);
    }
}
