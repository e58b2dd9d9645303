//! A store that refuses a sink's batches for good (moto answers
//! `400 InvalidStorageClass` to `storage_class = "OUTPOSTS"` on a normal
//! bucket, as S3 does): each batch, and a raw sink's media object, goes to
//! the dead-letter area, counted and listed, and the sink keeps taking new events instead of retrying
//! one batch forever. Once the operator fixes the class, `silt dead-letter
//! replay` writes every batch under its own key, exactly once. Files a
//! failing transform left are listed and replayed through it the same way.

mod harness;

use std::collections::HashMap;
use std::time::Duration;

use harness::agent::silt_output;
use harness::http::{HttpClient, IngestReq};
use harness::media::{MIB, put_stream, raw_sink};
use harness::payload::json_event;
use harness::procs::{S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY};
use harness::python::{self, BOTO3_PRELUDE, MotoServer};
use harness::{Agent, Scratch, config, deadline, free_port, wait_until};
use serde_json::Value;

const EVENTS: usize = 15;

/// Every object of the bucket: key -> (storage class, ids of its lines).
const READ_OBJECTS: &str = "
endpoint, bucket = sys.argv[1], sys.argv[2]
client = s3(endpoint, 'k', 's')
out = {}
for o in client.list_objects_v2(Bucket=bucket).get('Contents', []):
    h = client.head_object(Bucket=bucket, Key=o['Key'])
    ids = []
    if o['Key'].startswith('lake/'):
        body = client.get_object(Bucket=bucket, Key=o['Key'])['Body'].read().decode()
        ids = [json.loads(l)['payload']['id'] for l in body.splitlines() if l]
    out[o['Key']] = {'class': h.get('StorageClass', 'STANDARD'), 'ids': ids, 'size': o['Size']}
print(json.dumps(out))
";

/// The NDJSON sink `lake` and the raw sink `clips`, both with `class`.
fn lake_sink(moto: &MotoServer, class: &str) -> String {
    let clips = raw_sink(
        "clips",
        &["api"],
        &moto.endpoint(),
        &moto.bucket,
        "5MiB",
        &[],
    )
    .replace(
        "retry_max",
        &format!("storage_class = \"{class}\"\nretry_max"),
    );
    clips
        + &format!(
            "[sinks.lake]\ntype = \"s3\"\ninputs = [\"api\"]\nbucket = \"{}\"\nendpoint = \"{}\"\n\
         region = \"{S3_REGION}\"\naccess_key_id = \"{S3_ACCESS_KEY}\"\nsecret_access_key = \"{S3_SECRET_KEY}\"\n\
         retry_max = \"1s\"\nstorage_class = \"{class}\"\ncompression = \"none\"\n\
         key = \"lake/{{agent}}-{{batch}}.ndjson\"\n\
         batch = {{ max_records = 5, max_bytes = \"8MiB\", max_age = \"1s\" }}\n\n",
            moto.bucket,
            moto.endpoint()
        )
}

/// `silt dead-letter list`: (records, reason, state, key) per entry.
fn listed(agent: &Agent) -> Vec<(u64, String, String, String)> {
    let out = silt_output(
        &[
            "dead-letter",
            "list",
            "-d",
            agent.data_dir.to_str().unwrap(),
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split("  ").collect();
            assert_eq!(f.len(), 6, "id, sink, records, reason, state, key: {l}");
            let records = f[2].trim_end_matches(" records").parse().unwrap();
            (records, f[3].into(), f[4].into(), f[5].into())
        })
        .collect()
}

fn objects(py: &std::path::Path, moto: &MotoServer) -> HashMap<String, Value> {
    let out = python::run(
        py,
        &format!("{BOTO3_PRELUDE}{READ_OBJECTS}"),
        &[&moto.endpoint(), &moto.bucket],
    );
    serde_json::from_str(out.trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_batches_go_to_dead_letter_and_replay_under_their_keys() {
    let Some(py) = python::python() else {
        return;
    };
    let scratch = Scratch::new("dead-letter");
    let moto = MotoServer::start(&py, &scratch.join("moto"), "archive");
    let (port, api) = (free_port(), free_port());
    let head = config::agent_with_api("gw-dl", api, "5m")
        + &config::http_source("api", port, None, "1MiB");
    let mut agent = Agent::start(
        &scratch.join("agent"),
        &(head.clone() + &lake_sink(&moto, "OUTPOSTS")),
    );
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;
    let client = HttpClient::new(port, None);
    for chunk in 0..EVENTS / 5 {
        let req = IngestReq::array(
            "readings",
            (0..5)
                .map(|i| json_event(&format!("dl-{chunk}-{i}"), i as u64, 100))
                .collect(),
        );
        let reply = client.ingest(&req).await.unwrap();
        assert_eq!(reply.status, 202, "{reply:?}");
        // One batch after another: each must leave the queue by itself.
        let n = chunk + 1;
        wait_until(deadline(30), "the batch to go to dead-letter", || {
            listed(&agent).iter().map(|e| e.0).sum::<u64>() == 5 * n as u64
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", listed(&agent), agent.log_run()));
    }
    // A 12 MiB media object for `clips`: refused at CreateMultipartUpload.
    let put = put_stream(
        port,
        None,
        "/v1/media/cam-1/clip.mp4",
        12 * MIB,
        3,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(put.status, Some(201), "{put:?}");
    wait_until(
        deadline(30),
        "the media object to go to dead-letter",
        || listed(&agent).iter().any(|e| e.3.starts_with("clips/")),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", listed(&agent), agent.log_run()));
    let entries = listed(&agent);
    println!("dead-lettered: {entries:?}");
    for (_, reason, state, key) in &entries {
        assert_eq!(reason, "InvalidStorageClass", "{entries:?}");
        assert_eq!(state, "waiting");
        assert!(
            key.starts_with("lake/gw-dl-") || key.starts_with("clips/cam-1/"),
            "{key}"
        );
    }
    assert_eq!(entries.len(), EVENTS / 5 + 1, "{entries:?}");
    assert!(
        harness::media::media_files(&agent.data_dir).is_empty(),
        "the media file moved to dead-letter: {:?}",
        harness::media::media_files(&agent.data_dir)
    );
    let metrics = harness::http::get(&format!("http://127.0.0.1:{api}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted = format!(
        "silt_batches_dead_lettered_total{{sink=\"lake\",reason=\"InvalidStorageClass\"}} {}",
        EVENTS / 5
    );
    assert!(metrics.contains(&counted), "want `{counted}` in\n{metrics}");
    assert!(objects(&py, &moto).is_empty(), "nothing written yet");

    let status = agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(status.success(), "{status}");
    // The operator fixes the class and asks for the batches again while
    // the agent is stopped: the next start writes them.
    std::fs::write(
        &agent.config,
        (head + &lake_sink(&moto, "STANDARD_IA"))
            .replace("{data_dir}", &agent.data_dir.display().to_string()),
    )
    .unwrap();
    let data = agent.data_dir.display().to_string();
    let out = silt_output(&["dead-letter", "replay", "-d", &data, "--all"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        listed(&agent).iter().all(|e| e.2 == "replay-requested"),
        "{:?}",
        listed(&agent)
    );
    agent.spawn();
    wait_until(deadline(60), "every replay to be written", || {
        listed(&agent).is_empty()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", listed(&agent), agent.log_run()));

    let stored = objects(&py, &moto);
    let mut keys: Vec<&String> = stored.keys().collect();
    keys.sort();
    let mut want: Vec<&String> = entries.iter().map(|e| &e.3).collect();
    want.sort();
    assert_eq!(keys, want, "each batch under the key it was sealed with");
    let mut ids: Vec<String> = Vec::new();
    for (key, o) in &stored {
        assert_eq!(o["class"], "STANDARD_IA", "{key}: {o}");
        if key.starts_with("clips/") {
            assert_eq!(o["size"], 12 * MIB, "{key}: {o}");
        }
        ids.extend(
            o["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string()),
        );
    }
    ids.sort();
    let mut expected: Vec<String> = (0..EVENTS / 5)
        .flat_map(|c| (0..5).map(move |i| format!("dl-{c}-{i}")))
        .collect();
    expected.sort();
    assert_eq!(ids, expected, "every event once");
    println!("replayed: {} objects, {} events", stored.len(), ids.len());
    let status = agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(status.success(), "{status}");
}

/// A transform that fails on every batch (`test-error`): each posted batch
/// goes to the plugin dead-letter directory and is listed. With the
/// transform's plugin swapped for `identity` and the agent restarted,
/// `silt dead-letter replay --transform t --all`, run while it runs, sends
/// every file through the transform again: its events reach S3 once and
/// the files are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transforms_dead_letter_files_replay_through_the_fixed_transform() {
    let (Some(failing), Some(identity)) = (
        harness::plugin_wasm("test-error"),
        harness::plugin_wasm("identity"),
    ) else {
        return;
    };
    let scratch = Scratch::new("dead-letter-plugin");
    let s3 = harness::S3Server::start(scratch.path(), "telemetry");
    let port = free_port();
    let cfg = |wasm: &std::path::Path| {
        config::agent("gw-dlp")
            + &config::http_source("api", port, None, "1MiB")
            + &format!(
                "[transforms.t]\nplugin = \"{}\"\ninputs = [\"api\"]\n\n",
                wasm.display()
            )
            + &config::s3_sink(
                "lake",
                &["t"],
                &s3,
                "gzip",
                &config::batch(100, "8MiB", "1s"),
            )
    };
    let mut agent = Agent::start(&scratch.join("agent"), &cfg(&failing));
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;
    let client = HttpClient::new(port, None);
    let mut ids = std::collections::HashSet::new();
    for chunk in 0..2 {
        let req = IngestReq::array(
            "readings",
            (0..3)
                .map(|i| json_event(&format!("dlp-{chunk}-{i}"), i, 100))
                .collect(),
        );
        ids.extend(req.events.iter().map(|(id, _)| id.clone()));
        let reply = client.ingest(&req).await.unwrap();
        assert_eq!(reply.status, 202, "{reply:?}");
    }
    let data = agent.data_dir.display().to_string();
    let transform_lines = || -> Vec<String> {
        let out = silt_output(&["dead-letter", "list", "-d", &data], &[]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter(|l| l.contains("  transform:t  3 events  "))
            .map(str::to_string)
            .collect()
    };
    let listed = transform_lines();
    println!("transform dead-letter files: {listed:?}");
    assert_eq!(listed.len(), 2, "{listed:?}");

    let status = agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(status.success(), "{status}");
    std::fs::write(
        &agent.config,
        cfg(&identity).replace("{data_dir}", &agent.data_dir.display().to_string()),
    )
    .unwrap();
    agent.spawn();
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;
    let out = silt_output(
        &[
            "dead-letter",
            "replay",
            "-d",
            &data,
            "--transform",
            "t",
            "--all",
        ],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    wait_until(deadline(60), "the files to be replayed", || {
        transform_lines().is_empty()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_run()));
    let snap = harness::S3Lake::new(&s3)
        .wait_for(&ids, deadline(30), std::time::Instant::now())
        .await
        .unwrap();
    let stored: Vec<String> = snap.records.iter().filter_map(|r| r.id()).collect();
    assert_eq!(stored.len(), ids.len(), "every event once: {stored:?}");
    let status = agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(status.success(), "{status}");
}
