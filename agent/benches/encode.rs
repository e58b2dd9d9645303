//! Cost of turning one sink batch into the bytes of its object.
//!
//! `cargo bench -p silt-agent --bench encode`
//!
//! * `encode/{none,gzip-1,gzip-6,zstd-3}`: `encode_ndjson` of 10,000 events
//!   shaped like bench/footprint's (a 256-byte JSON object with a
//!   pseudo-random alphanumeric pad), as a sink's batch is when it closes at
//!   `max_records`. Throughput is in events, so the figure reads as time
//!   per event.
//! * `baseline/zlib-rs-gzip-6`: the same NDJSON compressed with flate2's
//!   zlib-rs encoder, which silt used for gzip before libdeflate; the
//!   difference to `encode/gzip-6` is what that change saves per event.

use std::io::Write;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use silt::batch::encode_ndjson;
use silt::config::Compression;
use silt::event::Event;

const EVENTS: usize = 10_000;
const SIZE: usize = 256;

fn events() -> Vec<Event> {
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..EVENTS)
        .map(|i| {
            let mut payload =
                format!("{{\"seq\":{i},\"device\":\"dev-{}\",\"pad\":\"", i % 7).into_bytes();
            while payload.len() < SIZE - 2 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                payload.push(ALNUM[(x % ALNUM.len() as u64) as usize]);
            }
            payload.extend_from_slice(b"\"}");
            Event::new(1_795_496_858_000 + i as i64, "bench", payload)
        })
        .collect()
}

fn encode(c: &mut Criterion) {
    let events = events();
    let mut group = c.benchmark_group("encode");
    group
        .throughput(Throughput::Elements(EVENTS as u64))
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    for (name, compression, level) in [
        ("none", Compression::None, 0),
        ("gzip-1", Compression::Gzip, 1),
        ("gzip-6", Compression::Gzip, 6),
        ("zstd-3", Compression::Zstd, 3),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| encode_ndjson(&events, "gw-01", compression, level))
        });
    }
    group.finish();

    let plain = encode_ndjson(&events, "gw-01", Compression::None, 0);
    let mut group = c.benchmark_group("baseline");
    group
        .throughput(Throughput::Elements(EVENTS as u64))
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    group.bench_function("zlib-rs-gzip-6", |b| {
        b.iter(|| {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            enc.write_all(&plain).unwrap();
            enc.finish().unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
