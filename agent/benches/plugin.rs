//! Cost of the WebAssembly plugin boundary.
//!
//! `cargo bench -p silt-agent --bench plugin` (needs `plugins/build.sh` first).
//!
//! * `boundary/identity/{1,100,1000}`: `Plugin::process` on the `identity`
//!   plugin with batches of 256-byte payloads (topic, no attributes, as the
//!   MQTT source makes them). Throughput is in events, so criterion's
//!   "time" divided by the batch size is the per-event cost of encoding the
//!   batch, copying it into the component, the SDK's decode and encode, and
//!   copying and decoding the output. Identity returns every payload
//!   unchanged, so the host's decode reuses the input's buffers (the
//!   pass-through case); a rewritten payload costs a little more (it stays a
//!   slice of the output buffer, which then lives as long as the events).
//! * `load/identity/{cold,cached}`: `Plugin::load` (read, compile or load
//!   from the compile cache, link, instantiate, `init`) with an empty cache
//!   directory versus one holding the compiled component.

use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use silt::event::Event;
use silt::plugin::{Plugin, PluginEngine, PluginLimits};
use support::wasm;

mod support;

fn batch(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let mut payload = format!(r#"{{"device":"dev-{:03}","seq":{i},"pad":""#, i % 100);
            while payload.len() < 256 - 2 {
                payload.push('x');
            }
            payload.push_str("\"}");
            assert_eq!(payload.len(), 256);
            Event::new(
                1_700_000_000_000 + i as i64,
                "plant-1/line-3/temperature",
                payload.into_bytes(),
            )
        })
        .collect()
}

fn boundary(c: &mut Criterion) {
    let cache = tempfile::tempdir().unwrap();
    let engine = PluginEngine::new(cache.path()).unwrap();
    let mut plugin = Plugin::load(
        &engine,
        "identity",
        &wasm("identity"),
        "{}",
        PluginLimits::default(),
    )
    .unwrap();

    let mut group = c.benchmark_group("boundary/identity");
    for n in [1usize, 100, 1_000] {
        let events = batch(n);
        // Sanity: identity really is identity across the boundary.
        assert_eq!(plugin.process(events.clone()).unwrap(), events);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(n.to_string(), |b| {
            // The input clone is set-up, not measured: the agent hands the
            // plugin a batch it owns.
            b.iter_batched(
                || events.clone(),
                |input| plugin.process(input).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn load(c: &mut Criterion) {
    let wasm = wasm("identity");
    let cache = tempfile::tempdir().unwrap();
    let engine = PluginEngine::new(cache.path()).unwrap();
    let load = || Plugin::load(&engine, "identity", &wasm, "{}", PluginLimits::default()).unwrap();

    let mut group = c.benchmark_group("load/identity");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("cold", |b| {
        b.iter_batched(
            || {
                for entry in std::fs::read_dir(cache.path()).unwrap() {
                    std::fs::remove_file(entry.unwrap().path()).unwrap();
                }
            },
            |()| load(),
            BatchSize::PerIteration,
        )
    });
    drop(load());
    assert!(
        std::fs::read_dir(cache.path()).unwrap().count() > 0,
        "the compile cache must hold the component after a load"
    );
    group.sample_size(50);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("cached", |b| b.iter(load));
    group.finish();
}

criterion_group!(benches, boundary, load);
criterion_main!(benches);
