//! Recycled event buffers. In wasm the allocator (dlmalloc) is a large
//! share of the per-event boundary cost, so the topic and payload buffers of
//! events a plugin returns are kept, cleared, for the next batch's decode
//! instead of being freed and allocated again. Batches tend to look alike,
//! so most buffers already have the capacity they need.

use std::cell::RefCell;

use crate::Event;

/// Upper bound on memory held by the pool, so a plugin's memory use stays
/// what its own code makes it plus this.
const MAX_POOLED_BYTES: usize = 1 << 20;
/// Buffers larger than this go back to the allocator: one media-sized
/// payload should not take up the whole pool.
const MAX_POOLED_BUFFER: usize = 16 << 10;

thread_local! {
    // wasm32 components are single-threaded; on the host (unit tests) each
    // thread simply has its own pool.
    static POOL: RefCell<Pool> = const { RefCell::new(Pool::new()) };
}

/// Run `f` with this thread's pool.
pub(crate) fn with<R>(f: impl FnOnce(&mut Pool) -> R) -> R {
    POOL.with_borrow_mut(f)
}

pub(crate) struct Pool {
    topics: Vec<Vec<u8>>,
    payloads: Vec<Vec<u8>>,
    bytes: usize,
}

impl Pool {
    pub(crate) const fn new() -> Self {
        Pool {
            topics: Vec::new(),
            payloads: Vec::new(),
            bytes: 0,
        }
    }

    /// An empty buffer for a topic, recycled when one is available.
    #[inline(always)]
    pub(crate) fn topic(&mut self) -> Vec<u8> {
        let buf = self.topics.pop().unwrap_or_default();
        self.bytes -= buf.capacity();
        buf
    }

    /// An empty buffer for a payload, recycled when one is available.
    #[inline(always)]
    pub(crate) fn payload(&mut self) -> Vec<u8> {
        let buf = self.payloads.pop().unwrap_or_default();
        self.bytes -= buf.capacity();
        buf
    }

    /// Keep the buffers of `events` (while there is room) and drop the rest.
    pub(crate) fn recycle(&mut self, events: Vec<Event>) {
        for e in events {
            if let Some(buf) = self.admit(e.topic.into_bytes()) {
                self.topics.push(buf);
            }
            if let Some(buf) = self.admit(e.payload) {
                self.payloads.push(buf);
            }
        }
    }

    #[inline(always)]
    fn admit(&mut self, mut buf: Vec<u8>) -> Option<Vec<u8>> {
        let cap = buf.capacity();
        if cap == 0 || cap > MAX_POOLED_BUFFER || self.bytes + cap > MAX_POOLED_BYTES {
            return None;
        }
        buf.clear();
        self.bytes += cap;
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_buffers_and_stays_bounded() {
        let mut pool = Pool::new();
        let event = Event::new("topic", 0, vec![7u8; 100]);
        let payload_ptr = event.payload.as_ptr();
        pool.recycle(vec![event]);
        let payload = pool.payload();
        assert_eq!(payload.as_ptr(), payload_ptr);
        assert!(payload.is_empty() && payload.capacity() >= 100);
        assert!(pool.topic().capacity() >= 5);
        assert_eq!(pool.bytes, 0);
        assert!(
            pool.payload().capacity() == 0,
            "an empty pool hands out new buffers"
        );

        let big = Event::new("", 0, vec![0u8; MAX_POOLED_BUFFER + 1]);
        let many = (0..MAX_POOLED_BYTES / 1000 + 10).map(|_| Event::new("", 0, vec![0u8; 1000]));
        pool.recycle(std::iter::once(big).chain(many).collect());
        assert!(pool.bytes <= MAX_POOLED_BYTES);
        assert!(
            pool.payloads
                .iter()
                .all(|b| b.capacity() <= MAX_POOLED_BUFFER)
        );
    }
}
