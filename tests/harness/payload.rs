//! Test events: unique ids, JSON and binary payloads that carry the id.

use serde_json::{Value, json};

/// Binary payloads start with this marker, then `<id>:`, then random bytes.
/// The leading NUL makes sure they are never valid JSON.
pub const BIN_MAGIC: &[u8] = b"\x00\xffBIN:";

/// Small deterministic PRNG (xorshift64*), seeded from a string.
pub struct Rng(u64);

impl Rng {
    pub fn seeded(seed: &str) -> Rng {
        let mut h: u64 = 0xcbf29ce484222325;
        for b in seed.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        Rng(h | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545F4914F6CDD1D)
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// What a test expects to find in the lake for one id.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Json(Value),
    Binary(Vec<u8>),
}

/// A JSON object of roughly `size` bytes carrying `id`.
pub fn json_event(id: &str, seq: u64, size: usize) -> Value {
    let mut rng = Rng::seeded(id);
    let mut v = json!({
        "id": id,
        "seq": seq,
        "temp": (rng.below(10_000) as f64) / 100.0 - 20.0,
        "ok": rng.below(2) == 1,
        "tags": ["a", "b\"q", "ü€"],
        "nested": { "n": rng.below(1_000_000), "s": "line1\nline2\ttab" },
        "pad": "",
    });
    let cur = serde_json::to_vec(&v).unwrap().len();
    if cur < size {
        const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
        let pad: String = (0..size - cur)
            .map(|_| ALNUM[rng.below(ALNUM.len() as u64) as usize] as char)
            .collect();
        v["pad"] = Value::String(pad);
    }
    // serde_json's default float parsing is not exactly round-trip; pass the
    // value through text once so it equals what the lake reader parses.
    serde_json::from_slice(&serde_json::to_vec(&v).unwrap()).unwrap()
}

/// `BIN_MAGIC ++ id ++ ":" ++ random bytes`, `size` bytes in total (at least the header).
pub fn binary_event(id: &str, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(BIN_MAGIC);
    out.extend_from_slice(id.as_bytes());
    out.push(b':');
    let mut rest = vec![0u8; size.saturating_sub(out.len())];
    Rng::seeded(id).fill(&mut rest);
    out.extend_from_slice(&rest);
    out
}

/// Id embedded in a binary payload made by [`binary_event`].
pub fn binary_id(bytes: &[u8]) -> Option<String> {
    let rest = bytes.strip_prefix(BIN_MAGIC)?;
    let end = rest.iter().position(|&b| b == b':')?;
    String::from_utf8(rest[..end].to_vec()).ok()
}
