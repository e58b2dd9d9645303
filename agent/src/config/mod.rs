//! The agent's configuration: serde structs, their defaults, and loading.
//!
//! Every struct denies unknown keys so that a typo fails loudly at start-up
//! instead of silently falling back to a default on a device in the field.

mod load;
mod secret;
mod table;
mod validate;

pub use validate::warnings;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

pub use secret::{REDACTED, Secret};
pub use table::{CatalogKind, Signing, TableConfig};

pub use load::{
    ConfigError, ENV_FILE, FLEET_BASE, FLEET_DEVICE, FLEET_SITE_DIR, config_files, load,
    load_annotated, load_str,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub agent: AgentConfig,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
    #[serde(default)]
    pub transforms: BTreeMap<String, TransformConfig>,
    #[serde(default)]
    pub sinks: BTreeMap<String, SinkConfig>,
    #[serde(default)]
    pub api: ApiConfig,
}

/// The admin listener: `/metrics`, `/healthz`, `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Where the admin endpoints listen. If the address cannot be bound the
    /// agent logs an error and runs without them: data matters more.
    #[serde(default = "default_api_listen")]
    pub listen: SocketAddr,
    /// `/readyz` fails once a sink's oldest unsent record is this old.
    #[serde(default = "default_ready_max_backlog_age", with = "humantime_serde")]
    pub ready_max_backlog_age: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: default_api_listen(),
            ready_max_backlog_age: default_ready_max_backlog_age(),
        }
    }
}

fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8686))
}

fn default_ready_max_backlog_age() -> Duration {
    Duration::from_secs(5 * 60)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    #[serde(default = "default_agent_id")]
    pub id: String,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Where batches a plugin failed on are written; `<data_dir>/dead-letter` when unset.
    #[serde(default)]
    pub dead_letter: Option<PathBuf>,
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            id: default_agent_id(),
            data_dir: default_data_dir(),
            dead_letter: None,
            shutdown_timeout: default_shutdown_timeout(),
        }
    }
}

impl AgentConfig {
    pub fn dead_letter_dir(&self) -> PathBuf {
        self.dead_letter
            .clone()
            .unwrap_or_else(|| self.data_dir.join("dead-letter"))
    }
}

fn default_agent_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "silt".to_string())
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Cap on the bytes of events held in the spool (encoded size).
    #[serde(default = "default_spool_max_bytes")]
    pub max_bytes: ByteSize,
    #[serde(default)]
    pub when_full: WhenFull,
    /// Free disk space to leave on the filesystem of `data_dir`; below it the
    /// spool counts as full, so the disk never fills up under sled.
    #[serde(default = "default_min_free")]
    pub min_free: ByteSize,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            max_bytes: default_spool_max_bytes(),
            when_full: WhenFull::default(),
            min_free: default_min_free(),
        }
    }
}

fn default_min_free() -> ByteSize {
    ByteSize::mib(64)
}

fn default_spool_max_bytes() -> ByteSize {
    ByteSize::gib(1)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Refuse new events: HTTP answers 503, MQTT stops acknowledging.
    #[default]
    Block,
    DropOldest,
    DropNewest,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceConfig {
    Mqtt(MqttSourceConfig),
    Http(HttpSourceConfig),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    pub topics: Vec<String>,
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// MQTT protocol version: 3 (3.1.1) or 5.
    #[serde(default = "default_mqtt_protocol")]
    pub protocol: u8,
    /// MQTT 5: how long the broker keeps the session (subscriptions and
    /// unacked QoS 1 messages) after silt disconnects. A v5 broker drops it
    /// at once when this is 0, so the default is long.
    #[serde(default = "default_session_expiry", with = "humantime_serde")]
    pub session_expiry: Duration,
    /// MQTT 5: QoS 1 messages the broker may have in flight to silt at a
    /// time (its own limit applies too); unset leaves it to the broker.
    #[serde(default)]
    pub receive_maximum: Option<u16>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// A file holding the password (read at start and on reload), instead
    /// of `password`.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Defaults to `silt-{agent}-{source}` so the broker keeps one session per source.
    #[serde(default)]
    pub client_id: Option<String>,
    /// PEM CA bundle for `mqtts://`; the system roots are used when unset.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for `mqtts://`, for brokers that
    /// authenticate devices by certificate (AWS IoT Core, `require_certificate`).
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file` (PKCS#8, RSA or EC).
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    #[serde(default = "default_mqtt_max_packet")]
    pub max_packet_size: ByteSize,
    /// Bytes of received messages held in memory until they are committed
    /// and acked; past it the source stops reading from the broker, which
    /// keeps the rest.
    #[serde(default = "default_mqtt_inflight_bytes")]
    pub max_inflight_bytes: ByteSize,
    /// Cap of the exponential backoff between reconnect attempts.
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Names for the topic's segments, set as event attributes
    /// (`["site","device"]` on `plant-1/pump-7/...` sets `site` and `device`);
    /// `""` skips a segment.
    #[serde(default)]
    pub topic_fields: Vec<String>,
}

fn default_qos() -> u8 {
    1
}

fn default_mqtt_protocol() -> u8 {
    3
}

fn default_session_expiry() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}

fn default_mqtt_inflight_bytes() -> ByteSize {
    ByteSize::mib(64)
}

fn default_mqtt_max_packet() -> ByteSize {
    ByteSize::mib(16)
}

fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSourceConfig {
    pub listen: SocketAddr,
    /// Bearer token clients must send.
    #[serde(default)]
    pub auth_token: Option<Secret>,
    /// A file of bearer tokens, one per line (`#` starts a comment); any of
    /// them is accepted, and the file is re-read when it changes, so a token
    /// is rotated by adding the new one, moving clients, removing the old.
    #[serde(default)]
    pub auth_tokens_file: Option<PathBuf>,
    /// `"none"`: accept requests without a token on purpose (silences the
    /// warning for a source that has none).
    #[serde(default)]
    pub auth: Option<HttpAuth>,
    /// Serve HTTPS instead of HTTP.
    #[serde(default)]
    pub tls: Option<HttpTlsConfig>,
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// Largest media upload (`PUT /v1/media/...`), streamed to disk.
    #[serde(default = "default_max_media")]
    pub max_media: ByteSize,
    /// How long a reply is kept for requests repeated with the same
    /// `Idempotency-Key`.
    #[serde(default = "default_idempotency_window", with = "humantime_serde")]
    pub idempotency_window: std::time::Duration,
    /// Most keys kept; the oldest go first.
    #[serde(default = "default_idempotency_max_keys")]
    pub idempotency_max_keys: usize,
    /// Most bytes of keys and replies kept; the oldest go first.
    #[serde(default = "default_idempotency_max_bytes")]
    pub idempotency_max_bytes: ByteSize,
    /// Time a client has to send a request's head, counted from when the
    /// connection is ready for one: on accept, and after each reply (so it
    /// is also how long an idle keep-alive connection stays open).
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A request whose body sends no byte for this long is cut (408) and
    /// nothing of it is stored.
    #[serde(default = "default_body_idle_timeout", with = "humantime_serde")]
    pub body_idle_timeout: Duration,
    /// Slowest body accepted on average: after `body_idle_timeout`, a body
    /// must have sent this many bytes per second since it started, so a
    /// trickle of a byte now and then cannot hold a connection forever.
    #[serde(default = "default_min_body_rate")]
    pub min_body_rate: ByteSize,
    /// Connections open at once; beyond it a client gets 503 and the
    /// connection is closed at once (`silt_http_connections_refused`).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpAuth {
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTlsConfig {
    /// PEM certificate chain, leaf first. Re-read when it changes: new
    /// connections get the new certificate, open ones keep theirs.
    pub cert_file: PathBuf,
    /// PEM private key of the certificate (PKCS#8, RSA or EC).
    pub key_file: PathBuf,
    /// PEM CA bundle: when set, every client must present a certificate it
    /// signed, and the certificate's subject (CN, else its first SAN)
    /// becomes the events' `client_id` attribute.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_body_idle_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_min_body_rate() -> ByteSize {
    ByteSize::kib(1)
}

fn default_max_connections() -> usize {
    512
}

fn default_idempotency_window() -> std::time::Duration {
    std::time::Duration::from_secs(24 * 3600)
}

fn default_idempotency_max_keys() -> usize {
    10_000
}

fn default_idempotency_max_bytes() -> ByteSize {
    ByteSize::mib(4)
}

fn default_max_body() -> ByteSize {
    ByteSize::mib(16)
}

fn default_max_media() -> ByteSize {
    ByteSize::gib(4)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    pub plugin: PathBuf,
    pub inputs: Vec<String>,
    /// Handed to the plugin's `init` as JSON.
    #[serde(default)]
    pub config: toml::Table,
    #[serde(default = "default_plugin_memory")]
    pub max_memory: ByteSize,
    #[serde(default = "default_plugin_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default)]
    pub fuel: Option<u64>,
}

fn default_plugin_memory() -> ByteSize {
    ByteSize::mib(64)
}

fn default_plugin_timeout() -> Duration {
    Duration::from_secs(1)
}

/// One sink. `s3` and `file` share almost every key, so they share one
/// struct; keys that belong to the other type are rejected by validation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    #[serde(rename = "type")]
    pub kind: SinkKind,
    pub inputs: Vec<String>,
    #[serde(default)]
    pub format: Format,
    /// Object key template; the default depends on `format` ([`default_key`]).
    #[serde(default)]
    pub key: Option<String>,
    /// NDJSON: gzip (default), zstd or none, for the whole object. Parquet:
    /// zstd (default), snappy or none, inside the file. Raw: none.
    #[serde(default)]
    pub compression: Option<Compression>,
    /// NDJSON: gzip 1-9 (default 6), zstd 1-19 (default 3). Lower levels
    /// cost less CPU per event and give larger objects.
    #[serde(default)]
    pub compression_level: Option<u32>,
    /// Parquet: rows per row group.
    #[serde(default = "default_row_group_size")]
    pub row_group_size: usize,
    #[serde(default)]
    pub batch: BatchConfig,
    /// Cap of the exponential backoff between upload retries.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// Time an upload gets besides moving its bytes at `min_upload_rate`.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// The slowest link (bytes per second) an upload must still finish on:
    /// an object of N bytes gets `request_timeout` + N / this.
    #[serde(default = "default_min_upload_rate")]
    pub min_upload_rate: ByteSize,
    /// `s3`: storage class of every object (`STANDARD_IA`, `GLACIER_IR`, ...).
    #[serde(default)]
    pub storage_class: Option<String>,
    /// Attributes copied into each object's user metadata (`x-amz-meta-NAME`),
    /// from the first event of the object.
    #[serde(default)]
    pub metadata_attributes: Vec<String>,
    /// Raw: objects larger than this go up as a resumable multipart upload
    /// in parts of this size (S3 needs at least 5 MiB).
    #[serde(default = "default_part_size")]
    pub part_size: ByteSize,
    /// Raw: sinks that get one index line per media object written (key,
    /// size, sha256, content type, stream, ts, attributes).
    #[serde(default)]
    pub sidecar_sinks: Vec<String>,
    /// `file`: the directory objects are written under.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `s3`: the bucket, which must exist.
    #[serde(default)]
    pub bucket: Option<String>,
    /// `s3`: custom endpoint (MinIO, s3s, Garage...); requests are path-style with it.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// `s3`: falls back to `AWS_REGION`, then `us-east-1`.
    #[serde(default)]
    pub region: Option<String>,
    /// `s3`: falls back to `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    /// `s3`: a file holding the secret key, instead of `secret_access_key`.
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
    /// `s3`: PEM CA bundle trusted for the endpoint (a private CA in front
    /// of MinIO or Ceph) and the table's REST catalog, in addition to the
    /// system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Parquet: also append each object to this Iceberg table.
    #[serde(default)]
    pub table: Option<TableConfig>,
}

impl SinkConfig {
    pub fn key(&self) -> String {
        self.key.clone().unwrap_or_else(|| default_key(self.format))
    }

    pub fn compression(&self) -> Compression {
        self.compression.unwrap_or(match self.format {
            Format::Ndjson => Compression::Gzip,
            Format::Parquet => Compression::Zstd,
            Format::Raw => Compression::None,
        })
    }

    pub fn compression_level(&self) -> u32 {
        self.compression_level
            .unwrap_or_else(|| default_compression_level(self.compression()))
    }
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_min_upload_rate() -> ByteSize {
    ByteSize::kib(32)
}

fn default_compression_level(compression: Compression) -> u32 {
    match compression {
        Compression::Gzip => 6,
        Compression::Zstd => 3,
        Compression::None | Compression::Snappy => 0,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    S3,
    File,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One JSON line per event.
    #[default]
    Ndjson,
    /// Columns inferred from the JSON payloads.
    Parquet,
    /// Each event's payload as its own object (media).
    Raw,
}

pub fn default_key(format: Format) -> String {
    let partitioned = "{sink}/year={yyyy}/month={MM}/day={dd}/hour={HH}/{agent}-{batch}";
    match format {
        Format::Ndjson => format!("{partitioned}.ndjson"),
        Format::Parquet => format!("{partitioned}.parquet"),
        Format::Raw => "{sink}/{attr.stream}/{yyyy}/{MM}/{dd}/{agent}-{batch}-{attr.name}".into(),
    }
}

fn default_row_group_size() -> usize {
    65_536
}

fn default_part_size() -> ByteSize {
    ByteSize::mib(8)
}

fn default_retry_max() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Gzip,
    Zstd,
    Snappy,
    None,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    #[serde(default = "default_max_records")]
    pub max_records: usize,
    #[serde(default = "default_batch_bytes")]
    pub max_bytes: ByteSize,
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// Open batches (one per rendered key prefix) before the oldest is
    /// closed early.
    #[serde(default = "default_max_partitions")]
    pub max_partitions: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_records: default_max_records(),
            max_bytes: default_batch_bytes(),
            max_age: default_max_age(),
            max_partitions: default_max_partitions(),
        }
    }
}

fn default_max_partitions() -> usize {
    1_000
}

fn default_max_records() -> usize {
    10_000
}

fn default_batch_bytes() -> ByteSize {
    ByteSize::mib(8)
}

fn default_max_age() -> Duration {
    Duration::from_secs(30)
}
