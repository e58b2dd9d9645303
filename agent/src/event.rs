//! The unit that flows through silt: one reading, message or media blob.

use bytes::Bytes;

/// One event as sources produce it, plugins see it and the spool stores it.
///
/// The payload is kept byte for byte; whether it is JSON is decided only when
/// a sink encodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Milliseconds since the Unix epoch, UTC, when silt received the event.
    pub ts_ms: i64,
    /// MQTT topic, or the HTTP stream name.
    pub topic: String,
    /// Key/value pairs set by the source or a plugin, usable in key templates.
    pub attributes: Vec<(String, String)>,
    pub payload: Bytes,
}

impl Event {
    pub fn new(ts_ms: i64, topic: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Event {
            ts_ms,
            topic: topic.into(),
            attributes: Vec::new(),
            payload: payload.into(),
        }
    }

    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Attributes only silt itself sets (sources never take them from clients,
/// and they are removed from plugin output).
pub const RESERVED_ATTRIBUTE_PREFIX: &str = "silt.";

/// Marks an event whose payload is a [`crate::media::MediaRef`] to a file in
/// the data directory, not the data itself.
pub const MEDIA_ATTRIBUTE: &str = "silt.media";

/// Wall-clock now in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
