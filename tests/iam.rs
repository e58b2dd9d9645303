//! The README's minimal IAM policy against a server that enforces it: moto
//! with IAM on checks every S3 call silt makes against the policy of the
//! user that signed it. One user holds exactly the README's policy
//! (`s3:PutObject` + `s3:GetObject` on the sink's prefix) and writes NDJSON
//! batches and a multipart media object; a second holds `s3:PutObject`
//! only, so the HEAD silt sends before a multipart upload is answered 403,
//! as S3 answers it for a missing key without `s3:ListBucket`.

mod harness;

use std::time::Duration;

use harness::http::{HttpClient, IngestReq};
use harness::media::{MIB, media_source, put_stream, raw_sink};
use harness::payload::json_event;
use harness::procs::{S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY};
use harness::python::{self, BOTO3_PRELUDE, IamUser, MotoServer};
use harness::{Agent, Scratch, config, deadline, free_port, wait_until};
use serde_json::{Value, json};

const BUCKET: &str = "archive";
const MEDIA_LEN: u64 = 12 * MIB;

/// Every object: key -> size, read with the admin user's keys.
const LIST: &str = "
endpoint, bucket, key, secret = sys.argv[1:5]
client = s3(endpoint, key, secret)
out = {}
for o in client.list_objects_v2(Bucket=bucket).get('Contents', []):
    out[o['Key']] = o['Size']
print(json.dumps(out))
";

fn allow(actions: &[&str], prefixes: &[&str]) -> Value {
    let resources: Vec<String> = prefixes
        .iter()
        .map(|p| format!("arn:aws:s3:::{BUCKET}/{p}*"))
        .collect();
    json!({
        "Version": "2012-10-17",
        "Statement": [{ "Effect": "Allow", "Action": actions, "Resource": resources }]
    })
}

/// A sink's config with `user`'s keys instead of the harness defaults.
fn signed_by(sink: String, user: &IamUser) -> String {
    sink.replace(
        &format!("access_key_id = \"{S3_ACCESS_KEY}\""),
        &format!("access_key_id = \"{}\"", user.access_key),
    )
    .replace(
        &format!("secret_access_key = \"{S3_SECRET_KEY}\""),
        &format!("secret_access_key = \"{}\"", user.secret_key),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_minimal_iam_policy_allows_every_call_silt_makes() {
    let Some(py) = python::python() else {
        return;
    };
    let scratch = Scratch::new("iam");
    let readme_policy = allow(&["s3:PutObject", "s3:GetObject"], &["lake/", "clips/"]);
    let (moto, users) = MotoServer::start_with_iam(
        &py,
        &scratch.join("moto"),
        BUCKET,
        &[
            (
                "admin",
                json!({
                    "Version": "2012-10-17",
                    "Statement": [{ "Effect": "Allow", "Action": "s3:*", "Resource": "*" }]
                }),
            ),
            ("silt", readme_policy),
            ("silt-put-only", allow(&["s3:PutObject"], &["media/"])),
        ],
    );
    let (admin, silt, put_only) = (&users[0], &users[1], &users[2]);
    let endpoint = moto.endpoint();
    let port = free_port();
    let lake = format!(
        "[sinks.lake]\ntype = \"s3\"\ninputs = [\"cam\"]\nbucket = \"{BUCKET}\"\nendpoint = \"{endpoint}\"\n\
         region = \"{S3_REGION}\"\naccess_key_id = \"{S3_ACCESS_KEY}\"\nsecret_access_key = \"{S3_SECRET_KEY}\"\n\
         retry_max = \"1s\"\ncompression = \"none\"\n\
         batch = {{ max_records = 5, max_bytes = \"8MiB\", max_age = \"1s\" }}\n\n"
    );
    let cfg = config::agent("gw-iam")
        + &media_source("cam", port, None, None)
        + &signed_by(lake, silt)
        + &signed_by(
            raw_sink("clips", &["cam"], &endpoint, BUCKET, "5MiB", &[]),
            silt,
        )
        + &signed_by(
            raw_sink("media", &["cam"], &endpoint, BUCKET, "5MiB", &[]),
            put_only,
        );
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;

    let client = HttpClient::new(port, None);
    for chunk in 0..2 {
        let req = IngestReq::array(
            "readings",
            (0..5)
                .map(|i| json_event(&format!("iam-{chunk}-{i}"), i, 100))
                .collect(),
        );
        let reply = client.ingest(&req).await.unwrap();
        assert_eq!(reply.status, 202, "{reply:?}");
    }
    let put = put_stream(
        port,
        None,
        "/v1/media/cam-1/clip.mp4",
        MEDIA_LEN,
        7,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(put.status, Some(201), "{put:?}");

    let list = || -> serde_json::Map<String, Value> {
        let out = python::run(
            &py,
            &format!("{BOTO3_PRELUDE}{LIST}"),
            &[&endpoint, BUCKET, &admin.access_key, &admin.secret_key],
        );
        serde_json::from_str(out.trim()).unwrap()
    };
    let landed = |objects: &serde_json::Map<String, Value>, prefix: &str| {
        objects.keys().filter(|k| k.starts_with(prefix)).count()
    };
    let mut objects = serde_json::Map::new();
    wait_until(
        deadline(90),
        "NDJSON batches and both media objects",
        || {
            objects = list();
            landed(&objects, "lake/") >= 2
                && landed(&objects, "clips/") == 1
                && landed(&objects, "media/") == 1
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {objects:?}\n{}", agent.log_run()));
    println!("objects under the enforced policies: {objects:?}");
    for (key, size) in &objects {
        if !key.starts_with("lake/") {
            assert_eq!(size.as_u64(), Some(MEDIA_LEN), "{key}");
        }
    }
    let log = agent.log_run();
    assert_eq!(
        agent.count_log("refuses"),
        0,
        "no call may be refused by the policy:\n{log}"
    );
    assert!(
        log.contains("multipart part written"),
        "the media went up in parts:\n{log}"
    );
    let status = agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(status.success(), "{status}");
}
