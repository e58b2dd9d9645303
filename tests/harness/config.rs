//! TOML snippets for agent configs. `{data_dir}` is filled in by [`super::Agent`].

use super::procs::{S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, S3Server};

/// `[agent]`, `[spool]`, and `[api]` on a free port, so agents of tests
/// running in parallel do not compete for the default admin port.
pub fn agent(id: &str) -> String {
    agent_with_api(id, super::free_port(), "5m")
}

/// [`agent`] with the admin api on `api_port` and readiness failing once a
/// sink's backlog is `ready_max_backlog_age` old.
pub fn agent_with_api(id: &str, api_port: u16, ready_max_backlog_age: &str) -> String {
    format!(
        "[agent]\nid = \"{id}\"\ndata_dir = \"{{data_dir}}\"\nshutdown_timeout = \"30s\"\n\n\
         [spool]\nmax_bytes = \"1GiB\"\nwhen_full = \"block\"\n\n\
         [api]\nlisten = \"127.0.0.1:{api_port}\"\nready_max_backlog_age = \"{ready_max_backlog_age}\"\n\n"
    )
}

pub fn mqtt_source(name: &str, broker_url: &str, topics: &[&str]) -> String {
    let topics = topics
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[sources.{name}]\ntype = \"mqtt\"\nurl = \"{broker_url}\"\ntopics = [{topics}]\nqos = 1\n\n"
    )
}

pub fn http_source(name: &str, port: u16, token: Option<&str>, max_body: &str) -> String {
    let mut s = format!(
        "[sources.{name}]\ntype = \"http\"\nlisten = \"127.0.0.1:{port}\"\nmax_body = \"{max_body}\"\n"
    );
    if let Some(t) = token {
        s.push_str(&format!("auth_token = \"{t}\"\n"));
    }
    s.push('\n');
    s
}

/// Batch settings, e.g. `batch(1000, "8MiB", "2s")`.
pub fn batch(max_records: u64, max_bytes: &str, max_age: &str) -> String {
    format!(
        "{{ max_records = {max_records}, max_bytes = \"{max_bytes}\", max_age = \"{max_age}\" }}"
    )
}

pub const S3_KEY: &str = "{sink}/year={yyyy}/month={MM}/day={dd}/hour={HH}/{agent}-{batch}.ndjson";

pub fn s3_sink(
    name: &str,
    inputs: &[&str],
    s3: &S3Server,
    compression: &str,
    batch: &str,
) -> String {
    let inputs = inputs
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let ext = ext(compression);
    format!(
        "[sinks.{name}]\ntype = \"s3\"\ninputs = [{inputs}]\nbucket = \"{}\"\nendpoint = \"{}\"\n\
         region = \"{S3_REGION}\"\naccess_key_id = \"{S3_ACCESS_KEY}\"\nsecret_access_key = \"{S3_SECRET_KEY}\"\n\
         key = \"{S3_KEY}{ext}\"\ncompression = \"{compression}\"\nbatch = {batch}\nretry_max = \"1s\"\n\n",
        s3.bucket,
        s3.endpoint()
    )
}

pub fn file_sink(
    name: &str,
    inputs: &[&str],
    path: &std::path::Path,
    compression: &str,
    batch: &str,
) -> String {
    let inputs = inputs
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let ext = ext(compression);
    format!(
        "[sinks.{name}]\ntype = \"file\"\ninputs = [{inputs}]\npath = \"{}\"\n\
         key = \"{{sink}}/{{yyyy}}-{{MM}}-{{dd}}/{{agent}}-{{batch}}.ndjson{ext}\"\ncompression = \"{compression}\"\n\
         batch = {batch}\nretry_max = \"1s\"\n\n",
        path.display()
    )
}

fn ext(compression: &str) -> &'static str {
    match compression {
        "gzip" => ".gz",
        "zstd" => ".zst",
        _ => "",
    }
}
