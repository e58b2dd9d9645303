//! Cost of one spool append as the number of open partitions grows.
//!
//! `cargo bench -p silt-agent --bench spool`
//!
//! * `append/partitions/{1,100,10000}`: one group commit of 100 events of
//!   256 bytes, spread over 10 partitions, into a sink partitioned by an
//!   attribute (as a key with `{attr.device}` is), with that many partitions
//!   already open (one record each, nothing sealed). The spool is on
//!   `/dev/shm` when it exists, so the fsync of each commit costs little and
//!   what grows with the partitions is the writer's bookkeeping (a scan of
//!   every open partition per append before the ordered indexes).

use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use silt::config::SpoolConfig;
use silt::event::Event;
use silt::spool::{SinkSpec, Spool};

const GROUP: usize = 100;

fn event(partition: usize, seq: usize) -> Event {
    let mut e = Event::new(
        1_700_000_000_000 + seq as i64,
        "plant-1/line-3/temperature",
        vec![b'x'; 256],
    );
    e.attributes
        .push(("device".into(), format!("dev-{partition:05}")));
    e
}

fn append(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let shm = std::path::Path::new("/dev/shm");
    let mut group = c.benchmark_group("append/partitions");
    group
        .throughput(Throughput::Elements(GROUP as u64))
        .sample_size(30)
        .measurement_time(Duration::from_secs(5));
    for open in [1usize, 100, 10_000] {
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .unwrap();
        let spec = SinkSpec {
            name: "lake".into(),
            partition_of: Arc::new(|e: &Event| e.attribute("device").unwrap_or("").to_string()),
        };
        let config = SpoolConfig {
            max_bytes: ByteSize::gib(64),
            min_free: ByteSize::b(0),
            ..SpoolConfig::default()
        };
        let spool = Spool::open_partitioned(dir.path(), &[spec], &config).unwrap();
        let existing: Vec<Event> = (0..open).map(|p| event(p, p)).collect();
        runtime
            .block_on(spool.append(&[0], existing))
            .expect("prefill");
        let mut seq = open;
        group.bench_with_input(BenchmarkId::from_parameter(open), &open, |b, &open| {
            b.iter_batched(
                || {
                    seq += GROUP;
                    (0..GROUP)
                        .map(|i| event((seq / GROUP * 7 + i % 10) % open, seq + i))
                        .collect::<Vec<_>>()
                },
                |events| runtime.block_on(spool.append(&[0], events)).unwrap(),
                BatchSize::SmallInput,
            )
        });
        spool.close().unwrap();
    }
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
