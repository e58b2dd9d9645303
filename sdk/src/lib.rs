//! Write [silt](https://example.invalid/silt) transform plugins in plain Rust.
//!
//! A plugin is a type implementing [`Transform`] plus one [`export!`] line;
//! the SDK owns every piece of WebAssembly ABI code:
//!
//! ```ignore
//! use silt_sdk::{Config, Error, Event, Transform};
//!
//! struct Passthrough;
//!
//! impl Transform for Passthrough {
//!     fn init(_config: Config) -> Result<Self, Error> {
//!         Ok(Passthrough)
//!     }
//!     fn process(&mut self, events: Vec<Event>) -> Result<Vec<Event>, Error> {
//!         Ok(events)
//!     }
//! }
//!
//! silt_sdk::export!(Passthrough);
//! ```
//!
//! Build with `plugins/build.sh` (target `wasm32-wasip2`). On any other target
//! `export!` expands to nothing, so `cargo test` exercises the plugin's logic
//! on the host by calling the trait methods directly, and [`log`] writes to
//! stderr instead of the agent's log.
//!
//! Lifecycle: the host calls `init` once per instance, then `process` and
//! `tick` in any order, one at a time. After a trap, timeout or memory-limit
//! hit the host discards the instance and starts a fresh one, so in-memory
//! state is lost: keep it an optimisation (dedup windows, partial
//! aggregates), never the only copy of data.

mod codec;
mod config;
mod error;
mod event;
pub mod json;
pub mod log;
mod pool;

pub use config::Config;
pub use error::Error;
pub use event::{Event, now_ms};

/// A transform plugin. One value lives per plugin instance.
pub trait Transform: Sized + 'static {
    /// Build the plugin from its config table (the `[plugins.config]` part
    /// of the agent config). Return an error for invalid config: the agent
    /// refuses to start the pipeline and shows the message.
    fn init(config: Config) -> Result<Self, Error>;

    /// Transform one batch. Returning fewer, more or changed events is fine.
    /// An error sends the whole input batch to the dead-letter directory.
    fn process(&mut self, events: Vec<Event>) -> Result<Vec<Event>, Error>;

    /// Periodic call with the host's wall clock (ms since the Unix epoch),
    /// for output that depends on time rather than input, e.g. closing
    /// windows. The default emits nothing.
    fn tick(&mut self, now_ms: u64) -> Result<Vec<Event>, Error> {
        let _ = now_ms;
        Ok(Vec::new())
    }
}

/// Export a [`Transform`] implementation as the plugin's entry points.
///
/// Use it exactly once per plugin crate, at module level
/// (`silt_sdk::export!(MyPlugin);`). When not compiling for wasm32 it only
/// checks that the type implements [`Transform`], so host unit tests link
/// without the agent.
#[macro_export]
macro_rules! export {
    ($ty:ty) => {
        #[cfg(not(target_arch = "wasm32"))]
        const _: fn() = || {
            fn exported<T: $crate::Transform>() {}
            exported::<$ty>();
        };

        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __SiltGuest;

            impl $crate::__private::bindings::Guest for __SiltGuest {
                fn init(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::init::<$ty>(config)
                }

                fn process(
                    batch: ::std::vec::Vec<u8>,
                ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    $crate::__private::process::<$ty>(batch)
                }

                fn tick(
                    now_ms: u64,
                ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    $crate::__private::tick::<$ty>(now_ms)
                }
            }

            $crate::__private::export_transform!(__SiltGuest with_types_in $crate::__private::bindings);
        };
    };
}

/// Glue used by [`export!`]; not a stable API.
#[doc(hidden)]
pub mod __private {
    use std::any::Any;
    use std::cell::RefCell;

    use crate::{Config, Event, Transform, codec, pool};

    pub use wit_bindgen;

    pub mod bindings {
        wit_bindgen::generate!({
            path: "../wit/silt-plugin-0.2.0",
            world: "transform",
            pub_export_macro: true,
            export_macro_name: "__silt_export_transform",
            default_bindings_module: "::silt_sdk::__private::bindings",
        });
    }

    pub use bindings::__silt_export_transform as export_transform;

    thread_local! {
        // wasm32 components are single-threaded and the host serialises
        // calls, so one slot per instance is all the state there is. `Any`
        // because a `static` cannot be generic over the plugin type.
        static STATE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    }

    pub fn init<T: Transform>(config: String) -> Result<(), String> {
        install_panic_hook();
        let config = Config::parse(&config).map_err(|e| e.to_string())?;
        let plugin = T::init(config).map_err(|e| e.to_string())?;
        STATE.with(|s| *s.borrow_mut() = Some(Box::new(plugin)));
        Ok(())
    }

    pub fn process<T: Transform>(batch: Vec<u8>) -> Result<Vec<u8>, String> {
        let events = pool::with(|pool| codec::decode(&batch, pool)).map_err(|e| e.to_string())?;
        // Free the input buffer before the plugin allocates its output, so
        // the two do not have to fit in linear memory at once.
        drop(batch);
        with_plugin::<T>(|p| p.process(events))
    }

    pub fn tick<T: Transform>(now_ms: u64) -> Result<Vec<u8>, String> {
        with_plugin::<T>(|p| p.tick(now_ms))
    }

    fn with_plugin<T: Transform>(
        f: impl FnOnce(&mut T) -> Result<Vec<Event>, crate::Error>,
    ) -> Result<Vec<u8>, String> {
        STATE.with(|s| {
            let mut slot = s.borrow_mut();
            let plugin = slot
                .as_mut()
                .and_then(|b| b.downcast_mut::<T>())
                .ok_or_else(|| "plugin called before a successful init".to_string())?;
            let out = f(plugin).map_err(|e| e.to_string())?;
            let buf = codec::encode(&out).map_err(|e| e.to_string())?;
            pool::with(|pool| pool.recycle(out));
            Ok(buf)
        })
    }

    /// Route panic messages to the agent's log (tagged with the plugin name)
    /// before the panic turns into a trap and the message would be lost.
    fn install_panic_hook() {
        std::panic::set_hook(Box::new(|info| {
            crate::log::error(&format!("plugin panicked: {info}"));
        }));
    }
}
