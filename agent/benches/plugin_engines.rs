//! What a plugin costs on wasmtime's Pulley interpreter against native code.
//!
//! `cargo bench -p silt-agent --features pulley --bench plugin_engines`
//! (needs `plugins/build.sh` first).
//!
//! armv7 devices run plugins on Pulley: Cranelift has no 32-bit ARM backend,
//! and wasmtime picks the interpreter there by itself. An armv7 board is not
//! at hand and qemu distorts interpreter and native code differently, so
//! this compares the two on one host: the same plugin, the same batches,
//! compiled by Cranelift for the host and for `pulley64`. The ratio, not the
//! host's absolute figure, is what carries over to a device.
//!
//! * `process/{identity,json-clean}/{native,pulley}`: `Plugin::process` on
//!   batches of 500 events (the HTTP source's batch in bench/footprint),
//!   payloads of about 256 bytes. Throughput is in events, so criterion's
//!   time reads per event. `identity` measures the boundary (copying the
//!   batch in and out, the SDK's decode and encode); `json-clean` parses each
//!   payload, removes, renames and converts fields, and writes it again,
//!   which is plugin work as a user writes it.
//! * `compile/{identity,json-clean}/{native,pulley}`: a cold `Plugin::load`
//!   (compile, link, instantiate, `init`), what a device pays once per
//!   plugin version before the compile cache holds it.

use std::path::Path;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use silt::event::Event;
use silt::plugin::{Plugin, PluginEngine, PluginLimits};
use support::wasm;

mod support;

const BATCH: usize = 500;

const JSON_CLEAN_CONFIG: &str = r#"{
  "remove": ["debug", "rssi"],
  "rename": {"temp": "temperature_c", "dev": "device"},
  "convert": {"temperature_c": {"from": "F", "to": "C", "decimals": 2}},
  "required": ["device", "temperature_c"]
}"#;

/// (plugin, its config)
const PLUGINS: [(&str, &str); 2] = [("identity", "{}"), ("json-clean", JSON_CLEAN_CONFIG)];

/// (name, wasmtime target): the host's native code, and the interpreter.
const ENGINES: [(&str, Option<&str>); 2] = [("native", None), ("pulley", Some("pulley64"))];

fn batch() -> Vec<Event> {
    (0..BATCH)
        .map(|i| {
            let temp = 50.0 + (i % 400) as f64 / 10.0;
            let mut payload = format!(
                r#"{{"dev":"dev-{:03}","seq":{i},"temp":{temp:.1},"rssi":-{},"debug":"fw 1.4.2","pad":""#,
                i % 100,
                40 + i % 50
            );
            while payload.len() < 256 - 2 {
                payload.push('x');
            }
            payload.push_str("\"}");
            Event::new(
                1_700_000_000_000 + i as i64,
                "plant-1/line-3/temperature",
                payload.into_bytes(),
            )
        })
        .collect()
}

fn load(engine: &PluginEngine, plugin: &str, config: &str) -> Plugin {
    Plugin::load(
        engine,
        plugin,
        &wasm(plugin),
        config,
        PluginLimits::default(),
    )
    .unwrap()
}

fn engine(cache: &Path, target: Option<&str>) -> PluginEngine {
    PluginEngine::for_target(cache, target).unwrap()
}

fn process(c: &mut Criterion) {
    let events = batch();
    for (plugin, config) in PLUGINS {
        let mut group = c.benchmark_group(format!("process/{plugin}"));
        group.throughput(Throughput::Elements(BATCH as u64));
        let mut outputs = Vec::new();
        for (name, target) in ENGINES {
            let cache = tempfile::tempdir().unwrap();
            // Kept alive while measuring: dropping it stops the epoch
            // ticker the agent runs beside every plugin.
            let engine = engine(cache.path(), target);
            let mut loaded = load(&engine, plugin, config);
            outputs.push(loaded.process(events.clone()).unwrap());
            group.bench_function(name, |b| {
                b.iter_batched(
                    || events.clone(),
                    |input| loaded.process(input).unwrap(),
                    BatchSize::SmallInput,
                )
            });
        }
        // Both engines must do the same work for the comparison to mean anything.
        assert_eq!(
            outputs[0], outputs[1],
            "{plugin}: native and Pulley disagree"
        );
        assert_eq!(outputs[0].len(), BATCH, "{plugin} dropped events");
        group.finish();
    }
}

fn compile(c: &mut Criterion) {
    for (plugin, config) in PLUGINS {
        let mut group = c.benchmark_group(format!("compile/{plugin}"));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(15));
        for (name, target) in ENGINES {
            let cache = tempfile::tempdir().unwrap();
            let engine = engine(cache.path(), target);
            group.bench_function(name, |b| {
                b.iter_batched(
                    || {
                        for entry in std::fs::read_dir(cache.path()).unwrap() {
                            std::fs::remove_file(entry.unwrap().path()).unwrap();
                        }
                    },
                    |()| load(&engine, plugin, config),
                    BatchSize::PerIteration,
                )
            });
        }
        group.finish();
    }
}

criterion_group!(benches, process, compile);
criterion_main!(benches);
