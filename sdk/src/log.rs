//! Logging into the agent's log, tagged with the plugin's name.
//!
//! Functions take a ready string; the macros take `format!` arguments:
//! `silt_sdk::log::info!("dropped {n} events")`. Outside wasm32 (host unit
//! tests) lines go to stderr.

/// Severity of a log line; maps to the agent's `tracing` levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    {
        use crate::__private::bindings::silt::plugin::host::{self, Level as L};
        let level = match level {
            Level::Trace => L::Trace,
            Level::Debug => L::Debug,
            Level::Info => L::Info,
            Level::Warn => L::Warn,
            Level::Error => L::Error,
        };
        host::log(level, message);
    }
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("[plugin {level:?}] {message}");
}

pub fn trace(message: &str) {
    log(Level::Trace, message)
}
pub fn debug(message: &str) {
    log(Level::Debug, message)
}
pub fn info(message: &str) {
    log(Level::Info, message)
}
pub fn warn(message: &str) {
    log(Level::Warn, message)
}
pub fn error(message: &str) {
    log(Level::Error, message)
}

#[doc(hidden)]
#[macro_export]
macro_rules! __silt_log {
    ($level:ident, $($arg:tt)+) => {
        $crate::log::log($crate::log::Level::$level, &::std::format!($($arg)+))
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __silt_trace { ($($arg:tt)+) => { $crate::__silt_log!(Trace, $($arg)+) }; }
#[doc(hidden)]
#[macro_export]
macro_rules! __silt_debug { ($($arg:tt)+) => { $crate::__silt_log!(Debug, $($arg)+) }; }
#[doc(hidden)]
#[macro_export]
macro_rules! __silt_info { ($($arg:tt)+) => { $crate::__silt_log!(Info, $($arg)+) }; }
#[doc(hidden)]
#[macro_export]
macro_rules! __silt_warn { ($($arg:tt)+) => { $crate::__silt_log!(Warn, $($arg)+) }; }
#[doc(hidden)]
#[macro_export]
macro_rules! __silt_error { ($($arg:tt)+) => { $crate::__silt_log!(Error, $($arg)+) }; }

/// `debug!("fmt", args..)`
pub use crate::__silt_debug as debug;
/// `error!("fmt", args..)`
pub use crate::__silt_error as error;
/// `info!("fmt", args..)`
pub use crate::__silt_info as info;
/// `trace!("fmt", args..)`
pub use crate::__silt_trace as trace;
/// `warn!("fmt", args..)`
pub use crate::__silt_warn as warn;
