//! Iceberg tables from Parquet sinks, read back by the tools analysts use:
//! s3s-fs as the warehouse, the SQL catalog on SQLite, pyiceberg through
//! the same catalog, and DuckDB's iceberg extension (from PyPI, loaded from
//! the wheel's files, nothing downloaded).
//!
//! * 3 sites x 1,000 rows over HTTP land exactly once, partitioned by day
//!   and site; a later batch with a new field adds an optional column that
//!   the earlier rows read as null; every snapshot names its batches.
//! * Crashes: objects uploaded but not committed when the agent is killed
//!   are committed once after the restart; a spool put back to its state
//!   before a commit (what a SIGKILL between the commit and the spool's
//!   completion leaves) re-commits nothing; and a real SIGKILL while the
//!   agent waits for the reply to a commit the REST catalog applied (a proxy
//!   swallows it) appends nothing twice after the restart.
//! * A fleet: three agents commit to one table in a PostgreSQL catalog at
//!   the same time; every row lands once, every object is in the table, and
//!   no metadata file of a commit that lost a race is left behind.

mod harness;

use std::time::{Duration, Instant};

use harness::http::HttpClient;
use harness::procs::{S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY};
use harness::proxy::{Proxy, Trap};
use harness::*;
use serde_json::{Value, json};

const SITES: [&str; 3] = ["berlin", "lyon", "oslo"];

/// A Parquet sink on `s3` appending to `telemetry.readings` in the SQL
/// catalog at `catalog`.
fn table_sink(s3: &S3Server, catalog: &str, commit_every: &str, max_records: u64) -> String {
    format!(
        "[sinks.lake]\ntype = \"s3\"\ninputs = [\"readings\"]\nbucket = \"{bucket}\"\nendpoint = \"{endpoint}\"\n\
         region = \"{S3_REGION}\"\naccess_key_id = \"{S3_ACCESS_KEY}\"\nsecret_access_key = \"{S3_SECRET_KEY}\"\n\
         retry_max = \"1s\"\nformat = \"parquet\"\n\
         key = \"data/site={{field.site}}/{{yyyy}}-{{MM}}-{{dd}}/{{agent}}-{{batch}}.parquet\"\n\
         batch = {{ max_records = {max_records}, max_bytes = \"8MiB\", max_age = \"1s\" }}\n\
         table = {{ catalog = \"sql\", uri = \"{catalog}\", warehouse = \"s3://{bucket}/warehouse\", \
         namespace = \"telemetry\", name = \"readings\", create = true, commit_every = \"{commit_every}\" }}\n\n",
        bucket = s3.bucket,
        endpoint = s3.endpoint(),
    )
}

fn readings(site: &str, from: usize, n: usize, humidity: bool) -> Vec<Value> {
    (from..from + n)
        .map(|i| {
            let mut v = json!({ "site": site, "id": i, "temp": 20.5 + (i % 10) as f64 });
            if humidity {
                v["humidity"] = json!(40 + i % 20);
            }
            v
        })
        .collect()
}

async fn post(client: &HttpClient, events: Vec<Value>) {
    for chunk in events.chunks(250) {
        let body = serde_json::to_vec(chunk).unwrap();
        let reply = client
            .post_raw("/v1/ingest/readings", "application/json", body, None)
            .await
            .unwrap();
        assert_eq!(reply.status, 202, "{}", reply.body);
    }
}

/// Reads the table with pyiceberg and queries it with DuckDB; prints JSON.
const READ_TABLE: &str = r#"
import sys, json, collections, importlib, pathlib, tempfile
from pyiceberg.catalog.sql import SqlCatalog
uri, warehouse, endpoint, ak, sk = sys.argv[1:6]
catalog = SqlCatalog("silt", uri=uri, warehouse=warehouse, **{
    "s3.endpoint": endpoint, "s3.access-key-id": ak, "s3.secret-access-key": sk, "s3.region": "us-east-1"})
table = catalog.load_table("telemetry.readings")
rows = table.scan().to_arrow().to_pylist()
keys = collections.Counter(f"{r['site']}/{r['id']}/{r.get('humidity') is not None}" for r in rows)
summaries = []
for s in table.snapshots():
    props = s.summary.additional_properties if hasattr(s.summary, "additional_properties") else dict(s.summary)
    summaries.append(props.get("silt.batches"))
files = table.inspect.files().to_pylist()
out = {
    "rows": len(rows),
    "distinct": len(keys),
    "duplicates": sorted(k for k, n in keys.items() if n > 1)[:10],
    "per_site": collections.Counter(r["site"] for r in rows),
    "with_humidity": sum(1 for r in rows if r.get("humidity") is not None),
    "schema": {f.name: str(f.field_type) for f in table.schema().fields},
    "spec": [f"{f.name}:{f.transform}" for f in table.spec().fields],
    "batches": summaries,
    "files": len(files),
    "file_partitions": sorted(set(str(f["partition"]) for f in files)),
    "bounds": all(f["lower_bounds"] and f["upper_bounds"] for f in files),
}
import boto3
client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ak, aws_secret_access_key=sk, region_name="us-east-1")
bucket, prefix = table.location().split("://", 1)[1].split("/", 1)
listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/metadata/").get("Contents", [])
out["metadata_files"] = sum(1 for o in listed if o["Key"].endswith(".metadata.json"))
out["metadata_log"] = len(table.metadata.metadata_log) + 1
import duckdb
def ext_file(name):
    mod = importlib.import_module(f"duckdb_extension_{name}")
    return str(next(pathlib.Path(mod.__file__).parent.glob(f"extensions/v{duckdb.__version__}/{name}.duckdb_extension")))
con = duckdb.connect(config={"autoinstall_known_extensions": "false", "autoload_known_extensions": "false",
    "extension_directory": tempfile.mkdtemp(), "custom_extension_repository": "http://127.0.0.1:9"})
for name in ("httpfs", "avro", "iceberg"):
    con.execute(f"LOAD '{ext_file(name)}'")
host = endpoint.split("://", 1)[1]
con.execute(f"CREATE SECRET s3s (TYPE s3, KEY_ID '{ak}', SECRET '{sk}', REGION 'us-east-1', ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false)")
humidity = "count(humidity)" if "humidity" in out["schema"] else "0"
out["duckdb"] = list(con.execute(
    f"SELECT count(*), count(DISTINCT site || '/' || id), {humidity} FROM iceberg_scan('{table.metadata_location}')").fetchone())
print(json.dumps(out))
"#;

/// `catalog` as SQLAlchemy takes it (pyiceberg).
fn read_table(py: &std::path::Path, catalog: &str, s3: &S3Server) -> Value {
    let out = python::run(
        py,
        READ_TABLE,
        &[
            &catalog
                .replace("sqlite://", "sqlite:///")
                .replace("postgres://", "postgresql+psycopg2://"),
            &format!("s3://{}/warehouse", s3.bucket),
            &s3.endpoint(),
            S3_ACCESS_KEY,
            S3_SECRET_KEY,
        ],
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Sum of `appended=N` over the agent's commit lines.
fn committed_objects(agent: &Agent, field_name: &str) -> u64 {
    agent
        .log_all()
        .lines()
        .filter(|l| l.contains("committed to the Iceberg table"))
        .filter_map(|l| agent::field(l, field_name).and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sites_land_once_and_a_new_field_adds_a_column() {
    let Some(py) = python::python() else { return };
    let t0 = Instant::now();
    let scratch = Scratch::new("iceberg-sites");
    let s3 = S3Server::start(scratch.path(), "lake");
    let catalog = format!("sqlite://{}", scratch.join("catalog.db").display());
    let port = free_port();
    let cfg = config::agent("gw-ice")
        + &config::http_source("readings", port, None, "4MiB")
        + &table_sink(&s3, &catalog, "2s", 400);
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;
    let client = HttpClient::new(port, None);

    for site in SITES {
        post(&client, readings(site, 0, 1000, false)).await;
    }
    wait_until(deadline(90), "3,000 rows committed", || {
        agent.uploaded_records() == 3000 && committed_objects(&agent, "objects") >= 9
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_all()));
    note(t0, "3,000 rows committed");
    // A new field: an optional column, null in the rows before it.
    post(&client, readings("oslo", 1000, 100, true)).await;
    wait_until(deadline(60), "the humidity batch committed", || {
        agent.uploaded_records() == 3100
            && agent.count_log("added columns to the Iceberg table") == 1
            && agent.count_log("committed to the Iceberg table") >= 2
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_all()));
    wait_until(deadline(30), "every object committed", || {
        let uploaded = agent.count_log("uploaded object") as u64;
        committed_objects(&agent, "objects") == uploaded
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_all()));
    agent.sigterm_and_wait(Duration::from_secs(30)).await;

    let got = read_table(&py, &catalog, &s3);
    note(t0, format!("pyiceberg: {got}"));
    assert_eq!(got["rows"], json!(3100), "{got}");
    assert_eq!(got["distinct"], json!(3100), "{got}");
    assert_eq!(
        got["per_site"],
        json!({"berlin": 1000, "lyon": 1000, "oslo": 1100})
    );
    assert_eq!(got["with_humidity"], json!(100));
    assert_eq!(got["schema"]["humidity"], "long");
    assert_eq!(got["schema"]["temp"], "double");
    assert_eq!(got["schema"]["ts"], "timestamptz");
    assert_eq!(got["spec"], json!(["ts_day:day", "site:identity"]));
    assert!(
        got["bounds"].as_bool().unwrap(),
        "column bounds from the footer: {got}"
    );
    let names: Vec<&str> = got["batches"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b.as_str())
        .flat_map(|b| b.split(','))
        .collect();
    assert_eq!(names.len() as u64, got["files"].as_u64().unwrap(), "{got}");
    assert!(
        names.iter().all(|n| n.starts_with("gw-ice/lake/")),
        "{names:?}"
    );
    assert_eq!(got["duckdb"], json!([3100, 3100, 100]), "DuckDB: {got}");

    // `silt check` shows the table as the catalog has it.
    let out = agent::silt_output(&["check", "-c", &agent.config.display().to_string()], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("sink lake: table telemetry.readings:"),
        "{stdout}"
    );
    assert!(stdout.contains(" humidity long optional"), "{stdout}");
    assert!(
        stdout.contains("partitioned by: day(ts_day), identity(site)"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_before_or_after_the_commit_leaves_every_row_once() {
    let Some(py) = python::python() else { return };
    let t0 = Instant::now();
    let scratch = Scratch::new("iceberg-kill");
    let s3 = S3Server::start(scratch.path(), "lake");
    let catalog = format!("sqlite://{}", scratch.join("catalog.db").display());
    let port = free_port();
    let cfg = |commit_every: &str| {
        config::agent("gw-kill")
            + &config::http_source("readings", port, None, "4MiB")
            + &table_sink(&s3, &catalog, commit_every, 100)
    };
    // 1. Uploaded, not committed (the commit is an hour away), then SIGKILL.
    let mut agent = Agent::start(&scratch.join("agent"), &cfg("1h"));
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;
    let client = HttpClient::new(port, None);
    for site in SITES {
        post(&client, readings(site, 0, 200, false)).await;
    }
    wait_until(deadline(60), "600 rows uploaded", || {
        agent.uploaded_records() == 600
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_all()));
    let objects = agent.count_log("uploaded object");
    assert_eq!(agent.count_log("committed to the Iceberg table"), 0);
    agent.kill9();
    note(
        t0,
        format!("killed with {objects} objects uploaded, none committed"),
    );

    // The spool as it stands before any commit: what a SIGKILL between a
    // commit and the spool's completion leaves behind.
    let before_commit = scratch.join("data-before-commit");
    copy_dir(&agent.data_dir, &before_commit);

    // 2. Restarted: the sealed batches upload again (same bytes, same keys);
    // the commit is still an hour away, so SIGTERM commits them, once.
    agent.spawn();
    wait_until(deadline(60), "the batches uploaded again", || {
        agent.uploaded_records() == 1200
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_all()));
    assert_eq!(agent.count_log("committed to the Iceberg table"), 0);
    agent.sigterm_and_wait(Duration::from_secs(30)).await;
    assert_eq!(
        committed_objects(&agent, "appended"),
        objects as u64,
        "{}",
        agent.log_all()
    );
    note(t0, "SIGTERM committed what was waiting");

    // 3. The spool put back to before the commit: the batches upload again
    // and are found in the table, so nothing is appended twice.
    std::fs::remove_dir_all(&agent.data_dir).unwrap();
    copy_dir(&before_commit, &agent.data_dir);
    std::fs::write(
        &agent.config,
        cfg("1s").replace("{data_dir}", &agent.data_dir.display().to_string()),
    )
    .unwrap();
    agent.spawn();
    wait_until(deadline(60), "the batches found committed", || {
        committed_objects(&agent, "already_committed") == objects as u64
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_all()));
    agent.sigterm_and_wait(Duration::from_secs(30)).await;
    assert_eq!(committed_objects(&agent, "appended"), objects as u64);
    assert_eq!(
        agent.count_log("already exists with other content"),
        0,
        "{}",
        agent.log_all()
    );

    let got = read_table(&py, &catalog, &s3);
    note(t0, format!("pyiceberg: {got}"));
    assert_eq!(got["rows"], json!(600), "{got}");
    assert_eq!(got["distinct"], json!(600), "{got}");
    assert_eq!(got["files"], json!(objects), "{got}");
    assert_eq!(got["duckdb"], json!([600, 600, 0]), "DuckDB: {got}");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_commit_to_one_table_in_a_postgres_catalog() {
    let Some(py) = python::python() else { return };
    let t0 = Instant::now();
    let scratch = Scratch::new("iceberg-fleet");
    let Some(pg) = postgres::Postgres::start(scratch.path()) else {
        return;
    };
    let s3 = S3Server::start(scratch.path(), "lake");
    note(t0, format!("postgres :{}, s3 :{}", pg.port, s3.port));
    let mut agents = Vec::new();
    for (i, site) in SITES.iter().enumerate() {
        let port = free_port();
        let cfg = config::agent(&format!("gw-{i}"))
            + &config::http_source("readings", port, None, "4MiB")
            + &table_sink(&s3, &pg.url(), "1s", 100);
        // Debug for the table module: it logs each metadata file of a lost
        // race it deletes.
        let env = [("SILT_LOG", "info,silt::table=debug")];
        let agent = Agent::start_with_env(&scratch.join(&format!("agent-{i}")), &cfg, &env);
        agents.push((agent, port, *site));
    }
    for (agent, ..) in &mut agents {
        agent
            .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
            .await;
    }
    // All three post at once, in rounds, so their commits overlap.
    let mut posts = Vec::new();
    for (_, port, site) in &agents {
        let (port, site) = (*port, site.to_string());
        posts.push(tokio::spawn(async move {
            let client = HttpClient::new(port, None);
            for round in 0..4 {
                post(&client, readings(&site, round * 250, 250, false)).await;
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
        }));
    }
    for p in posts {
        p.await.unwrap();
    }
    for (agent, ..) in &mut agents {
        wait_until(deadline(120), "1,000 rows uploaded and committed", || {
            agent.uploaded_records() == 1000
                && committed_objects(agent, "objects") == agent.count_log("uploaded object") as u64
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_all()));
    }
    let mut objects = 0;
    for (agent, ..) in &mut agents {
        agent.sigterm_and_wait(Duration::from_secs(30)).await;
        objects += agent.count_log("uploaded object");
        assert_eq!(
            committed_objects(agent, "appended"),
            agent.count_log("uploaded object") as u64
        );
    }
    let lost_races: usize = agents
        .iter()
        .map(|(a, ..)| a.count_log("deleted the metadata file of a commit that lost a race"))
        .sum();
    note(
        t0,
        format!("{lost_races} commits lost a race and were retried"),
    );
    let got = read_table(&py, &pg.url(), &s3);
    note(t0, format!("pyiceberg: {got}"));
    assert_eq!(got["rows"], json!(3000), "{got}");
    assert_eq!(got["distinct"], json!(3000), "{got}");
    assert_eq!(
        got["per_site"],
        json!({"berlin": 1000, "lyon": 1000, "oslo": 1000})
    );
    assert_eq!(got["files"], json!(objects), "{got}");
    assert_eq!(got["duckdb"], json!([3000, 3000, 0]), "DuckDB: {got}");
    // Commits that lost a race to another agent wrote metadata files the
    // table never referenced; none is left behind.
    assert_eq!(got["metadata_files"], got["metadata_log"], "{got}");
}

/// The REST catalog of tests/fixtures/iceberg_rest_catalog.py on a free
/// port, stopped on drop.
struct RestCatalog {
    port: u16,
    child: std::process::Child,
}

impl RestCatalog {
    /// With `tls` (a server certificate), the catalog speaks HTTPS.
    fn start(
        py: &std::path::Path,
        scratch: &Scratch,
        s3: &S3Server,
        token: &str,
        tls: Option<&pki::Issued>,
    ) -> RestCatalog {
        let port = free_port();
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/iceberg_rest_catalog.py");
        let log = std::fs::File::create(scratch.join("rest-catalog.log")).unwrap();
        let child = std::process::Command::new(py)
            .arg(script)
            .arg(port.to_string())
            .arg(token)
            .arg(scratch.join("rest-backend.db"))
            .arg(format!("s3://{}/warehouse", s3.bucket))
            .arg(s3.endpoint())
            .args([S3_ACCESS_KEY, S3_SECRET_KEY])
            .args(tls.iter().flat_map(|t| [&t.cert_file, &t.key_file]))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_until_blocking(deadline(30), "REST catalog port", || port_open(port)).unwrap();
        RestCatalog { port, child }
    }
}

impl Drop for RestCatalog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `rest` table sink on the catalog at `uri`; `auth` is the rest of the
/// `table = { ... }` line (token or properties).
fn rest_sink(s3: &S3Server, uri: &str, auth: &str, commit_every: &str, max_records: u64) -> String {
    table_sink(s3, "unused", commit_every, max_records).replace(
        "catalog = \"sql\", uri = \"unused\"",
        &format!("catalog = \"rest\", uri = \"{uri}\", {auth}"),
    )
}

/// How the REST catalog of a round trip is reached.
#[derive(Clone, Copy, PartialEq)]
enum CatalogLink {
    Http,
    /// HTTPS with a certificate from a private CA, which the sink trusts
    /// through its `ca_file`.
    HttpsPrivateCa,
}

/// 1,550 rows through a REST catalog that checks `token` (a bearer token, or
/// `sigv4:SERVICE:REGION`), read back through its backing SQL catalog.
async fn rest_round_trip(name: &str, token: &str, auth: &str, link: CatalogLink) {
    let Some(py) = python::python() else { return };
    let t0 = Instant::now();
    let scratch = Scratch::new(name);
    let s3 = S3Server::start(scratch.path(), "lake");
    let ca = pki::Ca::new(scratch.path(), "catalog-ca");
    let tls = (link == CatalogLink::HttpsPrivateCa).then(|| ca.server("catalog"));
    let rest = RestCatalog::start(&py, &scratch, &s3, token, tls.as_ref());
    let port = free_port();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut sink = rest_sink(
        &s3,
        &format!("{scheme}://127.0.0.1:{}", rest.port),
        auth,
        "1s",
        250,
    );
    if tls.is_some() {
        sink = sink.replace(
            "[sinks.lake]\n",
            &format!("[sinks.lake]\nca_file = \"{}\"\n", ca.cert_file.display()),
        );
    }
    let cfg = config::agent(name) + &config::http_source("readings", port, None, "4MiB") + &sink;
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;
    let client = HttpClient::new(port, None);
    for site in SITES {
        post(&client, readings(site, 0, 500, false)).await;
    }
    post(&client, readings("oslo", 500, 50, true)).await;
    wait_until(deadline(60), "1,550 rows committed", || {
        agent.uploaded_records() == 1550
            && committed_objects(&agent, "objects") == agent.count_log("uploaded object") as u64
    })
    .await
    .unwrap_or_else(|e| {
        let catalog_log =
            std::fs::read_to_string(scratch.join("rest-catalog.log")).unwrap_or_default();
        panic!("{e}\n{}\nREST catalog:\n{catalog_log}", agent.log_all())
    });
    agent.sigterm_and_wait(Duration::from_secs(30)).await;
    let catalog_log = std::fs::read_to_string(scratch.join("rest-catalog.log")).unwrap();
    let requests = catalog_log
        .lines()
        .filter(|l| l.contains("\"POST /v1/namespaces/telemetry/tables/readings "))
        .count();
    note(t0, format!("REST catalog took {requests} commits"));
    assert!(requests > 0, "{catalog_log}");
    assert!(!catalog_log.contains("refused"), "{catalog_log}");
    // pyiceberg reads the catalog the REST server keeps.
    let got = read_table(
        &py,
        &format!("sqlite://{}", scratch.join("rest-backend.db").display()),
        &s3,
    );
    note(
        t0,
        format!("pyiceberg via the REST server's backing catalog: {got}"),
    );
    assert_eq!(got["rows"], json!(1550), "{got}");
    assert_eq!(got["distinct"], json!(1550), "{got}");
    assert_eq!(got["with_humidity"], json!(50), "{got}");
    assert_eq!(got["spec"], json!(["ts_day:day", "site:identity"]));
    assert_eq!(got["duckdb"], json!([1550, 1550, 50]), "DuckDB: {got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_catalog_takes_the_same_commits() {
    rest_round_trip(
        "iceberg-rest",
        "t0ken",
        "token = \"t0ken\"",
        CatalogLink::Http,
    )
    .await;
}

/// A catalog behind HTTPS, its certificate signed by the operator's own CA
/// (the sink's `ca_file`), as a self-hosted Polaris or Nessie often is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_rest_catalog_with_a_private_ca_takes_the_same_commits() {
    rest_round_trip(
        "iceberg-rest-tls",
        "t0ken",
        "token = \"t0ken\"",
        CatalogLink::HttpsPrivateCa,
    )
    .await;
}

/// AWS Glue's and S3 Tables' Iceberg endpoints take SigV4-signed requests:
/// the catalog checks each signature with botocore's signer, keyed by the
/// sink's credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigv4_rest_catalog_takes_signed_commits() {
    rest_round_trip(
        "iceberg-sigv4",
        &format!("sigv4:glue:{S3_REGION}"),
        "properties = { \"rest.sigv4-enabled\" = \"true\", \"rest.signing-name\" = \"glue\" }",
        CatalogLink::Http,
    )
    .await;
}

/// The SIGKILL between the commit and the spool's completion, for real: a
/// proxy in front of the REST catalog lets a commit through and swallows
/// its reply, and the agent is killed while it waits. The restart uploads
/// the same objects again, finds every batch in the table's snapshots, and
/// appends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_after_a_commit_the_agent_never_heard_of_appends_nothing_twice() {
    let Some(py) = python::python() else { return };
    let t0 = Instant::now();
    let scratch = Scratch::new("iceberg-lost-reply");
    let s3 = S3Server::start(scratch.path(), "lake");
    let rest = RestCatalog::start(&py, &scratch, &s3, "t0ken", None);
    let proxy = Proxy::start(
        rest.port,
        Trap::HttpReplyTo("POST /v1/namespaces/telemetry/tables/readings "),
    )
    .await;
    let port = free_port();
    let sink = rest_sink(
        &s3,
        &format!("http://127.0.0.1:{}", proxy.port),
        "token = \"t0ken\"",
        "2s",
        100,
    );
    let cfg = config::agent("gw-lost-reply")
        + &config::http_source("readings", port, None, "4MiB")
        + &sink;
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;
    let caught = proxy.arm();
    let client = HttpClient::new(port, None);
    for site in SITES {
        post(&client, readings(site, 0, 200, false)).await;
    }
    tokio::time::timeout(Duration::from_secs(30), caught)
        .await
        .unwrap_or_else(|_| panic!("no commit reached the catalog\n{}", agent.log_all()))
        .unwrap();
    agent.kill9();
    let objects = agent.count_log("uploaded object");
    assert_eq!(
        agent.count_log("committed to the Iceberg table"),
        0,
        "{}",
        agent.log_all()
    );
    let backing = format!("sqlite://{}", scratch.join("rest-backend.db").display());
    let committed = read_table(&py, &backing, &s3);
    let files = committed["files"].as_u64().unwrap();
    note(
        t0,
        format!(
            "killed with {objects} objects uploaded; the catalog took a commit of {files} of them, its reply swallowed"
        ),
    );
    assert!(files > 0, "{committed}");

    // Nothing was completed, so the restart uploads all 600 rows again.
    agent.spawn();
    wait_until(
        deadline(60),
        "600 rows uploaded again and committed",
        || {
            agent.uploaded_records_this_run() == 600
                && committed_objects(&agent, "objects") == agent.count_log("uploaded object") as u64
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_all()));
    agent.sigterm_and_wait(Duration::from_secs(30)).await;
    let found = committed_objects(&agent, "already_committed");
    note(
        t0,
        format!("restart: {found} batches found already committed"),
    );
    assert_eq!(found, files, "{}", agent.log_all());
    assert_eq!(agent.count_log("already exists with other content"), 0);

    let got = read_table(&py, &backing, &s3);
    note(t0, format!("pyiceberg: {got}"));
    assert_eq!(got["rows"], json!(600), "{got}");
    assert_eq!(got["distinct"], json!(600), "{got}");
    assert_eq!(got["duckdb"], json!([600, 600, 0]), "DuckDB: {got}");
}
