use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::engine::EPOCH_TICK;
use super::{PluginEngine, PluginError, codec};
use crate::event::Event;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/silt-plugin-0.2.0",
        world: "transform",
    });
}

use bindings::silt::plugin::host::Level;
use bindings::{Transform, TransformPre};

/// The version of the `silt:plugin` contract this host implements.
const CONTRACT_VERSION: &str = "0.2.0";

/// Per-plugin resource limits, enforced on every call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginLimits {
    /// Bytes of linear memory the instance may hold in total.
    pub max_memory: u64,
    /// Wall-clock budget of one `init`, `process` or `tick` call.
    pub timeout: Duration,
    /// Optional deterministic instruction budget per call. Costs some speed
    /// (metering code is compiled in), so leave `None` unless you need
    /// limits that do not depend on machine load.
    pub fuel: Option<u64>,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            max_memory: 64 * 1024 * 1024,
            timeout: Duration::from_secs(1),
            fuel: None,
        }
    }
}

/// The encoded-input buffer is kept between calls only up to this capacity,
/// so one huge batch does not pin its size for the plugin's lifetime.
const MAX_KEPT_INPUT: usize = 4 * 1024 * 1024;
/// Guest log lines longer than this are cut, so a misbehaving plugin cannot
/// flood the agent's log with megabyte lines.
const MAX_LOG_LINE: usize = 8 * 1024;
/// Function-table entries; generous for any real plugin, bounded for a
/// hostile one.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// One loaded plugin instance. See the module docs for the failure model.
pub struct Plugin {
    name: Arc<str>,
    config_json: String,
    limits: PluginLimits,
    engine: wasmtime::Engine,
    /// Keeps the shared epoch ticker running while this plugin lives: the
    /// caller may drop its `PluginEngine` right after loading (the agent
    /// does), and without the ticker timeouts never fire.
    _ticker: PluginEngine,
    pre: TransformPre<State>,
    /// `None` after a fatal failure until the next call re-creates it.
    live: Option<Live>,
    /// The encoded input batch, kept between calls so its allocation (and
    /// the page faults of a fresh one) is paid once, not per batch.
    input: Vec<u8>,
}

struct Live {
    store: Store<State>,
    bindings: Transform,
}

struct State {
    plugin: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    memory: MemoryLimiter,
}

impl Plugin {
    /// Compile (or load from the cache), link, instantiate and `init` the
    /// component at `wasm` with `config_json` (a JSON object, `{}` for none).
    pub fn load(
        engine: &PluginEngine,
        name: &str,
        wasm: &Path,
        config_json: &str,
        limits: PluginLimits,
    ) -> Result<Plugin, PluginError> {
        let load_err = |message: String| PluginError::Load {
            plugin: name.to_string(),
            path: wasm.to_path_buf(),
            message,
        };
        let fueled = limits.fuel.is_some();
        let component = engine.component(name, wasm, fueled)?;
        check_contract(&component, engine.engine(fueled), name, wasm)?;
        let ticker = engine.clone();
        let engine = engine.engine(fueled).clone();

        let mut linker = Linker::<State>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| load_err(format!("cannot link WASI: {e:#}")))?;
        Transform::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)
            .map_err(|e| load_err(format!("cannot link the silt host API: {e:#}")))?;
        let pre = linker
            .instantiate_pre(&component)
            .and_then(TransformPre::new)
            .map_err(|e| load_err(format!("{e:#}")))?;

        let mut plugin = Plugin {
            name: name.into(),
            config_json: config_json.to_string(),
            limits,
            engine,
            _ticker: ticker,
            pre,
            live: None,
            input: Vec::new(),
        };
        plugin.live = Some(plugin.instantiate()?);
        Ok(plugin)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Transform one batch.
    pub fn process(&mut self, events: Vec<Event>) -> Result<Vec<Event>, PluginError> {
        let mut input = std::mem::take(&mut self.input);
        let out = match codec::encode_into(&events, &mut input) {
            Ok(()) => self.call("process", |live| {
                live.bindings.call_process(&mut live.store, &input)
            }),
            Err(source) => Err(PluginError::BadInput {
                plugin: self.name.to_string(),
                call: "process",
                source,
            }),
        };
        if input.capacity() <= MAX_KEPT_INPUT {
            self.input = input;
        }
        self.decode("process", out?, events)
    }

    /// Let the plugin emit time-based output; `now_ms` is the wall clock in
    /// ms since the Unix epoch (negative values are clamped to 0).
    pub fn tick(&mut self, now_ms: i64) -> Result<Vec<Event>, PluginError> {
        let now = u64::try_from(now_ms).unwrap_or(0);
        let out = self.call("tick", |live| live.bindings.call_tick(&mut live.store, now))?;
        self.decode("tick", out, Vec::new())
    }

    fn decode(
        &self,
        call: &'static str,
        out: Vec<u8>,
        input: Vec<Event>,
    ) -> Result<Vec<Event>, PluginError> {
        codec::decode(Bytes::from(out), input).map_err(|source| PluginError::BadOutput {
            plugin: self.name.to_string(),
            call,
            source,
        })
    }

    /// Throw the current instance away and start a fresh one (new memory,
    /// `init` again). Use after a failure when the plugin's state may be bad
    /// even though it did not trap.
    pub fn reinstantiate(&mut self) -> Result<(), PluginError> {
        self.live = None;
        self.live = Some(self.instantiate()?);
        Ok(())
    }

    fn instantiate(&self) -> Result<Live, PluginError> {
        let mut wasi = WasiCtx::builder();
        wasi.inherit_stderr()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        let state = State {
            plugin: self.name.clone(),
            wasi: wasi.build(),
            table: ResourceTable::new(),
            memory: MemoryLimiter::new(self.limits.max_memory),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.memory);
        store.epoch_deadline_trap();
        // Instantiation runs the guest's start code, so it is a call too.
        arm(&mut store, &self.limits);
        let instantiated = self
            .pre
            .instance_pre()
            .instantiate(&mut store)
            .and_then(|instance| Transform::new(&mut store, &instance));
        let bindings = match instantiated {
            Ok(b) => b,
            Err(e) => return Err(classify(&self.name, "instantiate", &self.limits, &store, e)),
        };
        arm(&mut store, &self.limits);
        match bindings.call_init(&mut store, &self.config_json) {
            Ok(Ok(())) => Ok(Live { store, bindings }),
            Ok(Err(message)) => Err(PluginError::Init {
                plugin: self.name.to_string(),
                message,
            }),
            Err(e) => Err(classify(&self.name, "init", &self.limits, &store, e)),
        }
    }

    fn call<R>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(&mut Live) -> wasmtime::Result<Result<R, String>>,
    ) -> Result<R, PluginError> {
        let live = match &mut self.live {
            Some(live) => live,
            None => {
                tracing::info!(plugin = %self.name, "starting a fresh plugin instance after a failure");
                self.live.insert(self.instantiate()?)
            }
        };
        arm(&mut live.store, &self.limits);
        match f(live) {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(message)) => Err(PluginError::Failed {
                plugin: self.name.to_string(),
                call,
                message,
            }),
            Err(e) => {
                let err = classify(&self.name, call, &self.limits, &live.store, e);
                // wasmtime refuses re-entry after a trap, and after a timeout
                // or OOM the guest's heap may be half-updated anyway.
                self.live = None;
                Err(err)
            }
        }
    }
}

/// Reset the per-call budgets.
fn arm(store: &mut Store<State>, limits: &PluginLimits) {
    let ticks = limits
        .timeout
        .as_nanos()
        .div_ceil(EPOCH_TICK.as_nanos())
        .max(1);
    store.set_epoch_deadline(u64::try_from(ticks).unwrap_or(u64::MAX));
    if let Some(fuel) = limits.fuel {
        store
            .set_fuel(fuel)
            .expect("fuel-metered plugins always use the engine with consume_fuel");
    }
    store.data_mut().memory.denied = false;
}

fn classify(
    plugin: &str,
    call: &'static str,
    limits: &PluginLimits,
    store: &Store<State>,
    err: wasmtime::Error,
) -> PluginError {
    let plugin = plugin.to_string();
    // A denied memory.grow surfaces as an allocation-failure abort (a plain
    // trap) in the guest, so the limiter's record is the reliable signal.
    if store.data().memory.denied {
        return PluginError::MemoryLimit {
            plugin,
            call,
            limit: limits.max_memory,
        };
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => PluginError::Timeout {
            plugin,
            call,
            timeout: limits.timeout,
        },
        Some(Trap::OutOfFuel) => PluginError::FuelExhausted {
            plugin,
            call,
            fuel: limits.fuel.unwrap_or_default(),
        },
        Some(trap) => PluginError::Trap {
            plugin,
            call,
            message: trap.to_string(),
        },
        None => PluginError::Trap {
            plugin,
            call,
            message: format!("{err:#}"),
        },
    }
}

/// Refuse components built against another version of the contract with a
/// message that says what to do, instead of wasmtime's missing-import error.
/// Plugins that import nothing from `silt:plugin` are left to the linker.
fn check_contract(
    component: &Component,
    engine: &wasmtime::Engine,
    plugin: &str,
    wasm: &Path,
) -> Result<(), PluginError> {
    let ty = component.component_type();
    let found = ty
        .imports(engine)
        .filter_map(|(name, _)| name.strip_prefix("silt:plugin/"))
        .filter_map(|rest| rest.split_once('@').map(|(_, version)| version))
        .find(|version| *version != CONTRACT_VERSION);
    match found {
        Some(found) => Err(PluginError::Contract {
            plugin: plugin.to_string(),
            path: wasm.to_path_buf(),
            found: found.to_string(),
            expected: CONTRACT_VERSION,
        }),
        None => Ok(()),
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::silt::plugin::host::Host for State {
    fn log(&mut self, level: Level, mut message: String) {
        if message.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" [truncated]");
        }
        let plugin = &*self.plugin;
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

/// Caps the sum of all linear memories of one instance and remembers whether
/// it said no during the current call.
struct MemoryLimiter {
    limit: u64,
    in_use: u64,
    denied: bool,
}

impl MemoryLimiter {
    fn new(limit: u64) -> Self {
        MemoryLimiter {
            limit,
            in_use: 0,
            denied: false,
        }
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.in_use.saturating_sub(current as u64) + desired as u64;
        if total > self.limit {
            self.denied = true;
            return Ok(false);
        }
        self.in_use = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

// The pipeline moves plugins into `spawn_blocking`; keep that possible.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<Plugin>();
};
