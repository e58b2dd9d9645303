//! Checks that go beyond types: names, the source -> transform -> sink graph,
//! key templates, and keys that belong to one sink type only.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use super::load::{ConfigError, Origins};
use super::{Compression, Config, Format, Signing, SinkConfig, SinkKind, SourceConfig};
use crate::batch::{KeyTemplate, MAX_KEY_LEN, MAX_VALUE_LEN, TOO_LONG};

/// What a valid config may still do that its author should know about.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for (name, source) in &config.sources {
        let SourceConfig::Http(http) = source else {
            continue;
        };
        if http.auth_token.as_ref().is_some_and(|t| t.is_empty()) {
            out.push(format!(
                "sources.{name}.auth_token is empty (an unset `${{VAR:-}}`?): the source takes requests from anyone; set the token, or `auth = \"none\"` if that is meant"
            ));
        } else if http.auth.is_none()
            && http.auth_token.is_none()
            && http.auth_tokens_file.is_none()
            && http.tls.as_ref().is_none_or(|t| t.client_ca_file.is_none())
        {
            out.push(format!(
                "sources.{name}: no `auth_token`, `auth_tokens_file` or `tls.client_ca_file`, so the source takes requests from anyone; set one, or `auth = \"none\"` if that is meant"
            ));
        }
    }
    for (name, sink) in &config.sinks {
        let Ok(template) = KeyTemplate::parse(&sink.key()) else {
            continue;
        };
        let (longest, _) = template.len_bounds(&config.agent.id, name);
        if longest > MAX_KEY_LEN {
            out.push(format!(
                "sinks.{name}.key: with {{attr.*}}/{{field.*}} values near their {MAX_VALUE_LEN}-byte cap a key reaches {longest} bytes, over S3's {MAX_KEY_LEN}; such events are stored under `{TOO_LONG}` in every data placeholder"
            ));
        }
    }
    out
}

pub(super) fn validate(config: &Config, origins: &Origins) -> Result<(), ConfigError> {
    let fail =
        |key: String, message: String| Err(ConfigError::invalid(origins.locate(&key), message));

    if !valid_name(&config.agent.id) {
        return fail(
            "agent.id".into(),
            format!(
                "`{}` is not a valid agent id: use letters, digits, `.`, `_` and `-`",
                config.agent.id
            ),
        );
    }
    if config.sources.is_empty() {
        return fail(
            "sources".into(),
            "no sources configured: add a [sources.NAME] table".into(),
        );
    }
    if config.sinks.is_empty() {
        return fail(
            "sinks".into(),
            "no sinks configured: add a [sinks.NAME] table".into(),
        );
    }

    if config.api.ready_max_backlog_age.is_zero() {
        return fail(
            "api.ready_max_backlog_age".into(),
            "must be greater than 0, e.g. \"5m\"".into(),
        );
    }
    for (name, source) in &config.sources {
        if let SourceConfig::Http(http) = source
            && http.listen == config.api.listen
        {
            return fail(
                "api.listen".into(),
                format!(
                    "{} is also the listen address of http source `{name}`: give [api] another port",
                    config.api.listen
                ),
            );
        }
    }

    let mut names = HashSet::new();
    let components = config
        .sources
        .keys()
        .map(|n| ("sources", n))
        .chain(config.transforms.keys().map(|n| ("transforms", n)))
        .chain(config.sinks.keys().map(|n| ("sinks", n)));
    for (section, name) in components {
        if !valid_name(name) {
            return fail(
                format!("{section}.{name}"),
                format!("`{name}` is not a valid name: use letters, digits, `.`, `_` and `-`"),
            );
        }
        if !names.insert(name.as_str()) {
            return fail(
                format!("{section}.{name}"),
                format!(
                    "the name `{name}` is used twice; sources, transforms and sinks share one namespace"
                ),
            );
        }
    }

    for (name, source) in &config.sources {
        if let Err((key, message)) = validate_source(source) {
            return fail(format!("sources.{name}.{key}"), message);
        }
    }

    let is_node = |n: &str| config.sources.contains_key(n) || config.transforms.contains_key(n);
    for (name, transform) in &config.transforms {
        for input in &transform.inputs {
            if !is_node(input) {
                return fail(
                    format!("transforms.{name}.inputs"),
                    format!("input `{input}` is not a source or transform"),
                );
            }
        }
        if transform.inputs.is_empty() {
            return fail(
                format!("transforms.{name}.inputs"),
                "a transform needs at least one input".into(),
            );
        }
    }
    if let Some(name) = find_cycle(config) {
        return fail(
            format!("transforms.{name}.inputs"),
            format!(
                "transform `{name}` feeds back into itself; transforms must form a chain without loops"
            ),
        );
    }

    for (name, sink) in &config.sinks {
        let indexes_media = config
            .sinks
            .values()
            .any(|s| s.sidecar_sinks.contains(name));
        if sink.inputs.is_empty() && !indexes_media {
            return fail(
                format!("sinks.{name}.inputs"),
                "a sink needs at least one input (or to be another sink's `sidecar_sinks` target)"
                    .into(),
            );
        }
        for input in &sink.inputs {
            if !is_node(input) {
                return fail(
                    format!("sinks.{name}.inputs"),
                    format!("input `{input}` is not a source or transform"),
                );
            }
        }
        match KeyTemplate::parse(&sink.key()) {
            Err(message) => return fail(format!("sinks.{name}.key"), message),
            Ok(template) if template.len_bounds(&config.agent.id, name).1 > MAX_KEY_LEN => {
                return fail(
                    format!("sinks.{name}.key"),
                    format!(
                        "keys of this template are over S3's {MAX_KEY_LEN}-byte limit even with every data value as `{TOO_LONG}`: shorten its literal parts"
                    ),
                );
            }
            Ok(_) => {}
        }
        if let Err((key, message)) = validate_sink_format(name, sink, config) {
            return fail(format!("sinks.{name}.{key}"), message);
        }
        if let Err((key, message)) = validate_sink_kind(sink) {
            return fail(format!("sinks.{name}.{key}"), message);
        }
        if sink.request_timeout.is_zero() || sink.min_upload_rate.as_u64() == 0 {
            return fail(
                format!("sinks.{name}.request_timeout"),
                "request_timeout and min_upload_rate must be above zero".into(),
            );
        }
        if sink.batch.max_records == 0 || sink.batch.max_bytes.as_u64() == 0 {
            return fail(
                format!("sinks.{name}.batch"),
                "max_records and max_bytes must be above zero".into(),
            );
        }
    }

    for name in config.sources.keys() {
        if config.sinks_reached_from(name).is_empty() {
            return fail(
                format!("sources.{name}"),
                format!(
                    "source `{name}` feeds no sink: list it (or a transform reading it) in a sink's inputs"
                ),
            );
        }
    }
    Ok(())
}

fn valid_name(name: &str) -> bool {
    // Names become directory names (media/sink/<name>).
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The offending key (below the source's table) and what is wrong.
fn validate_source(source: &SourceConfig) -> Result<(), (&'static str, String)> {
    match source {
        SourceConfig::Mqtt(mqtt) => {
            crate::sources::mqtt::parse_broker_url(&mqtt.url).map_err(|e| ("url", e))?;
            if mqtt.topics.is_empty() {
                return Err((
                    "topics",
                    "`topics` is empty: give at least one topic filter".into(),
                ));
            }
            if mqtt.qos > 1 {
                return Err((
                    "qos",
                    format!("qos {} is not supported: use 0 or 1", mqtt.qos),
                ));
            }
            if !matches!(mqtt.protocol, 3 | 5) {
                return Err((
                    "protocol",
                    format!(
                        "protocol {} is not supported: use 3 (MQTT 3.1.1) or 5",
                        mqtt.protocol
                    ),
                ));
            }
            if mqtt.protocol != 5 && mqtt.receive_maximum.is_some() {
                return Err((
                    "receive_maximum",
                    "`receive_maximum` is an MQTT 5 property: set `protocol = 5`".into(),
                ));
            }
            if mqtt.receive_maximum == Some(0) {
                return Err((
                    "receive_maximum",
                    "must be 1 to 65535 (MQTT 5 forbids 0)".into(),
                ));
            }
            if mqtt.keep_alive < Duration::from_secs(5) {
                return Err((
                    "keep_alive",
                    "must be at least 5s (the MQTT client refuses shorter ones)".into(),
                ));
            }
            if mqtt.session_expiry.as_secs() > u64::from(u32::MAX) {
                return Err((
                    "session_expiry",
                    "at most 4294967295s (about 136 years, which MQTT 5 reads as never)".into(),
                ));
            }
            if mqtt.password.is_some() && mqtt.password_file.is_some() {
                return Err((
                    "password_file",
                    "set `password` or `password_file`, not both".into(),
                ));
            }
            if mqtt.username.is_none() && mqtt.password.is_some() {
                return Err(("password", "`password` is set without `username`".into()));
            }
            if mqtt.username.is_none() && mqtt.password_file.is_some() {
                return Err((
                    "password_file",
                    "`password_file` is set without `username`".into(),
                ));
            }
            if mqtt.client_cert_file.is_some() != mqtt.client_key_file.is_some() {
                return Err((
                    "client_cert_file",
                    "set both `client_cert_file` and `client_key_file`, or neither".into(),
                ));
            }
            if mqtt.client_cert_file.is_some() {
                let (_, _, tls) =
                    crate::sources::mqtt::parse_broker_url(&mqtt.url).map_err(|e| ("url", e))?;
                if !tls {
                    return Err((
                        "client_cert_file",
                        "a client certificate needs TLS: use an `mqtts://` url".into(),
                    ));
                }
                if mqtt.ca_file.is_none() {
                    return Err((
                        "ca_file",
                        "a client certificate needs `ca_file`, the CA that signed the broker's certificate (AWS IoT Core: AmazonRootCA1.pem)".into(),
                    ));
                }
            }
            let inflight = mqtt.max_inflight_bytes.as_u64();
            if !(1..=u64::from(u32::MAX)).contains(&inflight) {
                return Err((
                    "max_inflight_bytes",
                    "must be above 0 and at most 4GiB, e.g. \"64MiB\"".into(),
                ));
            }
            if let Some(f) = mqtt
                .topic_fields
                .iter()
                .find(|f| f.starts_with(crate::event::RESERVED_ATTRIBUTE_PREFIX))
            {
                return Err((
                    "topic_fields",
                    format!("`{f}`: attribute names starting with `silt.` are reserved"),
                ));
            }
            Ok(())
        }
        SourceConfig::Http(http) => {
            if http.idempotency_window.is_zero() {
                return Err((
                    "idempotency_window",
                    "must be greater than 0, e.g. \"24h\"".into(),
                ));
            }
            if http.idempotency_max_keys == 0 {
                return Err(("idempotency_max_keys", "must be at least 1".into()));
            }
            if http.idempotency_max_bytes.as_u64() < 4096 {
                return Err((
                    "idempotency_max_bytes",
                    "must be at least 4KiB, e.g. \"4MiB\"".into(),
                ));
            }
            for (key, timeout) in [
                ("header_timeout", http.header_timeout),
                ("body_idle_timeout", http.body_idle_timeout),
            ] {
                if timeout.is_zero() {
                    return Err((key, "must be greater than 0, e.g. \"10s\"".into()));
                }
            }
            if http.min_body_rate.as_u64() == 0 {
                return Err((
                    "min_body_rate",
                    "must be above 0 (bytes per second), e.g. \"1KiB\"".into(),
                ));
            }
            if http.max_connections == 0 {
                return Err(("max_connections", "must be at least 1".into()));
            }
            if http.auth == Some(super::HttpAuth::None)
                && (http.auth_token.is_some() || http.auth_tokens_file.is_some())
            {
                return Err((
                    "auth",
                    "`auth = \"none\"` accepts requests without a token, but a token is set: remove one of them".into(),
                ));
            }
            Ok(())
        }
    }
}

fn validate_sink_kind(sink: &SinkConfig) -> Result<(), (&'static str, String)> {
    let s3_keys = [
        ("bucket", sink.bucket.is_some()),
        ("endpoint", sink.endpoint.is_some()),
        ("region", sink.region.is_some()),
        ("access_key_id", sink.access_key_id.is_some()),
        ("secret_access_key", sink.secret_access_key.is_some()),
        (
            "secret_access_key_file",
            sink.secret_access_key_file.is_some(),
        ),
        ("ca_file", sink.ca_file.is_some()),
    ];
    match sink.kind {
        SinkKind::S3 => {
            if sink.path.is_some() {
                return Err((
                    "path",
                    "`path` belongs to `file` sinks; an s3 sink takes `bucket`".into(),
                ));
            }
            if sink.bucket.as_deref().is_none_or(str::is_empty) {
                return Err(("bucket", "an s3 sink needs `bucket`".into()));
            }
            if sink.secret_access_key.is_some() && sink.secret_access_key_file.is_some() {
                return Err((
                    "secret_access_key_file",
                    "set `secret_access_key` or `secret_access_key_file`, not both".into(),
                ));
            }
            let has_secret =
                sink.secret_access_key.is_some() || sink.secret_access_key_file.is_some();
            if sink.access_key_id.is_some() != has_secret {
                return Err((
                    "access_key_id",
                    "set both `access_key_id` and `secret_access_key` (or `secret_access_key_file`), or neither".into(),
                ));
            }
            Ok(())
        }
        SinkKind::File => {
            if let Some((key, _)) = s3_keys.iter().find(|(_, set)| *set) {
                return Err((
                    key,
                    format!("`{key}` belongs to `s3` sinks; a file sink takes `path`"),
                ));
            }
            if sink.path.is_none() {
                return Err(("path", "a file sink needs `path`".into()));
            }
            Ok(())
        }
    }
}

/// Storage classes S3 documents for PUT and CreateMultipartUpload.
pub const STORAGE_CLASSES: [&str; 10] = [
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "GLACIER_IR",
    "DEEP_ARCHIVE",
    "OUTPOSTS",
    "EXPRESS_ONEZONE",
];

fn validate_sink_format(
    name: &str,
    sink: &SinkConfig,
    config: &Config,
) -> Result<(), (&'static str, String)> {
    let allowed: &[Compression] = match sink.format {
        Format::Ndjson => &[Compression::Gzip, Compression::Zstd, Compression::None],
        Format::Parquet => &[Compression::Zstd, Compression::Snappy, Compression::None],
        Format::Raw => &[Compression::None],
    };
    if !allowed.contains(&sink.compression()) {
        return Err((
            "compression",
            format!(
                "{:?} sinks take compression {}",
                sink.format,
                allowed
                    .iter()
                    .map(|c| format!("{c:?}").to_lowercase())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    if let Some(level) = sink.compression_level {
        let range = match (sink.format, sink.compression()) {
            (Format::Ndjson, Compression::Gzip) => 1..=9,
            (Format::Ndjson, Compression::Zstd) => 1..=19,
            _ => {
                return Err((
                    "compression_level",
                    "applies to NDJSON sinks with gzip or zstd compression only; remove it".into(),
                ));
            }
        };
        if !range.contains(&level) {
            return Err((
                "compression_level",
                format!(
                    "{level} is out of range: {} takes {} to {}",
                    format!("{:?}", sink.compression()).to_lowercase(),
                    range.start(),
                    range.end()
                ),
            ));
        }
    }
    if sink.row_group_size == 0 {
        return Err(("row_group_size", "must be above zero".into()));
    }
    if let Some(table) = &sink.table {
        if sink.format != Format::Parquet {
            return Err((
                "table",
                "an Iceberg table takes Parquet files: set `format = \"parquet\"`".into(),
            ));
        }
        if !cfg!(feature = "iceberg") {
            return Err((
                "table",
                "this silt was built without the `iceberg` feature".into(),
            ));
        }
        super::table::validate(table)?;
        if sink.kind != SinkKind::S3
            && Signing::from_properties(&table.properties, &table.uri, None)
                .is_ok_and(|s| s.is_some())
        {
            return Err((
                "table.properties",
                format!(
                    "{} signs with the sink's AWS credentials: it needs an s3 sink",
                    super::table::ENABLED
                ),
            ));
        }
    }
    if let Some(class) = &sink.storage_class {
        if sink.kind != SinkKind::S3 {
            return Err((
                "storage_class",
                "`storage_class` belongs to s3 sinks".into(),
            ));
        }
        if !STORAGE_CLASSES.contains(&class.as_str()) {
            return Err((
                "storage_class",
                format!(
                    "unknown storage class `{class}`; known: {}",
                    STORAGE_CLASSES.join(", ")
                ),
            ));
        }
    }
    let header_token = |a: &String| {
        !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    };
    if let Some(bad) = sink.metadata_attributes.iter().find(|a| !header_token(a)) {
        return Err((
            "metadata_attributes",
            format!("`{bad}` cannot be an object metadata name: use letters, digits, `-` and `_`"),
        ));
    }
    if sink.kind == SinkKind::S3 && sink.part_size.as_u64() < 5 * 1024 * 1024 {
        return Err(("part_size", "S3 needs parts of at least 5MiB".into()));
    }
    for target in &sink.sidecar_sinks {
        match config.sinks.get(target) {
            Some(t) if target != name && t.format != Format::Raw => {}
            _ => {
                return Err((
                    "sidecar_sinks",
                    format!("`{target}` must be another sink of this config, not a raw one"),
                ));
            }
        }
    }
    if !sink.sidecar_sinks.is_empty() && sink.format != Format::Raw {
        return Err((
            "sidecar_sinks",
            "only raw sinks write media objects that need an index".into(),
        ));
    }
    Ok(())
}

/// Returns a transform that is part of a cycle, if any.
fn find_cycle(config: &Config) -> Option<&str> {
    fn visit<'a>(
        config: &'a Config,
        name: &'a str,
        stack: &mut Vec<&'a str>,
        done: &mut HashSet<&'a str>,
    ) -> Option<&'a str> {
        if stack.contains(&name) {
            return Some(name);
        }
        if done.contains(name) {
            return None;
        }
        stack.push(name);
        if let Some(t) = config.transforms.get(name) {
            for input in &t.inputs {
                if let Some(hit) = visit(config, input, stack, done) {
                    return Some(hit);
                }
            }
        }
        stack.pop();
        done.insert(name);
        None
    }
    let mut done = HashSet::new();
    config
        .transforms
        .keys()
        .find_map(|name| visit(config, name, &mut Vec::new(), &mut done))
}

impl Config {
    /// Sinks that events entering at `node` end up in, through any transforms.
    pub fn sinks_reached_from(&self, node: &str) -> BTreeSet<&str> {
        let mut out = BTreeSet::new();
        let mut todo = vec![node];
        let mut seen = HashSet::new();
        while let Some(n) = todo.pop() {
            if !seen.insert(n) {
                continue;
            }
            for (sink, cfg) in &self.sinks {
                if cfg.inputs.iter().any(|i| i == n) {
                    out.insert(sink.as_str());
                }
            }
            for (t, cfg) in &self.transforms {
                if cfg.inputs.iter().any(|i| i == n) {
                    todo.push(t.as_str());
                }
            }
        }
        out
    }

    /// The pipeline as text, one edge per line, for `silt check`.
    pub fn graph(&self) -> String {
        let mut out = String::new();
        for (name, source) in &self.sources {
            let kind = match source {
                SourceConfig::Mqtt(m) => format!(
                    "mqtt {} {:?} qos {} (MQTT {})",
                    m.url,
                    m.topics,
                    m.qos,
                    if m.protocol == 5 { "5" } else { "3.1.1" }
                ),
                SourceConfig::Http(h) => format!("http {}", h.listen),
            };
            out.push_str(&format!("source    {name} ({kind})\n"));
        }
        for (name, t) in &self.transforms {
            out.push_str(&format!(
                "transform {name} ({}) <- {}\n",
                t.plugin.display(),
                t.inputs.join(", ")
            ));
        }
        for (name, sink) in &self.sinks {
            let target = match sink.kind {
                SinkKind::S3 => format!("s3://{}", sink.bucket.as_deref().unwrap_or("")),
                SinkKind::File => format!(
                    "file {}",
                    sink.path
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ),
            };
            out.push_str(&format!(
                "sink      {name} ({target}, key {}) <- {}\n",
                sink.key(),
                sink.inputs.join(", ")
            ));
        }
        out
    }
}
