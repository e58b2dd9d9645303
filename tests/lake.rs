//! A query-ready lake, read back the way an analyst would:
//!
//! * MQTT from several topics -> the `route` plugin (site from a JSON field)
//!   -> a Parquet sink keyed `site={attr.site}/year={yyyy}/month={MM}/...` on
//!   s3s-fs; pyarrow (`pyarrow.dataset`, hive partitioning) reads the
//!   downloaded objects: row counts and values per partition, no object
//!   mixing partitions, ints widened to float, a field with conflicting
//!   types kept as JSON text, binary payloads in `payload_raw`, events
//!   without a site under `site=__missing__`.
//! * HTTP -> an NDJSON + gzip sink keyed by `{field.plant}`, read back with
//!   Python's gzip and json: every line in the partition its field names.
//! * Storage class, content type and user metadata on moto (s3s-fs does not
//!   record storage classes): NDJSON objects with `STANDARD_IA`, a media
//!   object written by multipart upload with `INTELLIGENT_TIERING`, read
//!   back with boto3 `head_object` and `list_objects_v2`.

mod harness;

use std::collections::BTreeMap;
use std::time::Instant;

use harness::http::HttpClient;
use harness::mqtt::{Msg, PubOpts, spawn_publisher};
use harness::procs::{S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY};
use harness::python::{self, BOTO3_PRELUDE, MotoServer};
use harness::*;
use serde_json::{Value, json};

/// An s3 sink on `endpoint` with the given extra lines (format, key, ...).
fn sink(name: &str, inputs: &str, endpoint: &str, bucket: &str, extra: &str) -> String {
    format!(
        "[sinks.{name}]\ntype = \"s3\"\ninputs = [{inputs}]\nbucket = \"{bucket}\"\nendpoint = \"{endpoint}\"\n\
         region = \"{S3_REGION}\"\naccess_key_id = \"{S3_ACCESS_KEY}\"\nsecret_access_key = \"{S3_SECRET_KEY}\"\n\
         retry_max = \"1s\"\n{extra}\n\n"
    )
}

/// Downloads every object of `bucket` into `dir` (keys become paths).
const DOWNLOAD: &str = "
def download(client, bucket, dir):
    import os
    keys = []
    for page in client.get_paginator('list_objects_v2').paginate(Bucket=bucket):
        for o in page.get('Contents', []):
            path = os.path.join(dir, o['Key'])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            client.download_file(bucket, o['Key'], path)
            keys.append(o['Key'])
    return keys
";

/// Reads the Parquet lake with pyarrow and prints a JSON summary.
const READ_PARQUET: &str = "
import pyarrow.dataset as ds, pyarrow as pa, tempfile, collections
endpoint, bucket = sys.argv[1], sys.argv[2]
client = s3(endpoint, sys.argv[3], sys.argv[4])
root = tempfile.mkdtemp()
keys = download(client, bucket, root)
part = ds.partitioning(pa.schema([('site', pa.string()), ('year', pa.int32()), ('month', pa.int32())]), flavor='hive')
first = ds.dataset(root + '/lake', format='parquet', partitioning=part)
# Each object carries its batch's schema. Read them under the union, with
# silt's own rule for a field whose type differs: int and double -> double,
# anything else -> string (a number cast to text is its JSON text).
types = {}
for fragment in first.get_fragments():
    for f in fragment.physical_schema:
        t = types.setdefault(f.name, f.type)
        if t != f.type:
            numeric = {t, f.type} <= {pa.int64(), pa.float64()}
            types[f.name] = pa.float64() if numeric else pa.string()
schema = pa.schema(list(types.items()) + list(part.schema))
dataset = ds.dataset(root + '/lake', format='parquet', partitioning=part, schema=schema)
table = dataset.to_table()
rows = table.to_pylist()
out = {'objects': len(keys), 'rows': len(rows), 'per_site': collections.Counter(r['site'] for r in rows)}
out['schema'] = {f.name: str(f.type) for f in table.schema}
out['mixed'] = [r['id'] for r in rows if r['payload_raw'] is None and r['site'] != (r.get('plant') or '__missing__')]
out['ids'] = sorted(r['id'] for r in rows if r['id'] is not None)
out['raw'] = sorted(r['payload_raw'].decode() for r in rows if r['payload_raw'] is not None)
out['reading'] = {str(r['id']): r['reading'] for r in rows if r['id'] is not None}
out['value'] = {str(r['id']): r['value'] for r in rows if r['id'] is not None}
out['topics'] = sorted(set(r['topic'] for r in rows))
out['agents'] = sorted(set(r['agent'] for r in rows))
out['years'] = sorted(set(r['year'] for r in rows))
out['ts_type'] = str(table.schema.field('ts').type)
files_per_partition = collections.Counter(k.rsplit('/', 1)[0] for k in keys)
out['partitions'] = sorted(files_per_partition)
print(json.dumps(out))
";

fn payload(i: usize) -> Value {
    let plants = ["berlin", "lyon", "oslo"];
    let mut v = json!({ "id": i, "seq": i * 10 });
    // Every 7th reading lacks its plant: it lands under __missing__.
    if !i.is_multiple_of(7) {
        v["plant"] = json!(plants[i % 3]);
    }
    // Integers and floats in one field widen to float.
    v["value"] = if i.is_multiple_of(2) {
        json!(i)
    } else {
        json!(i as f64 + 0.5)
    };
    // Numbers and strings in one field, in every batch: kept as text.
    v["reading"] = if i.is_multiple_of(2) {
        json!(format!("r{i}"))
    } else {
        json!(i)
    };
    v["meta"] = json!({ "unit": "C", "sensor": format!("s{}", i % 4) });
    v
}

/// POSTs `events` as one JSON array; the agent must accept them all.
async fn post_readings(client: &HttpClient, events: Vec<Value>) {
    let body = serde_json::to_vec(&events).unwrap();
    let reply = client
        .post_raw("/v1/ingest/readings", "application/json", body, None)
        .await
        .unwrap();
    assert_eq!(reply.status, 202, "{}", reply.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_lake_partitioned_by_plugin_attribute_reads_back_in_pyarrow() {
    let (Some(py), Some(route)) = (python::python(), plugin_wasm("route")) else {
        return;
    };
    let t0 = Instant::now();
    let scratch = Scratch::new("lake-parquet");
    let broker = Mosquitto::start(&scratch.join("mosquitto"));
    let s3 = S3Server::start(scratch.path(), "lake");
    let cfg = config::agent("gw-lake")
        + &config::mqtt_source("sensors", &broker.url(), &["plant/#"])
        + &format!(
            "[transforms.route]\nplugin = \"{}\"\ninputs = [\"sensors\"]\n\
             config = {{ field = \"plant\", attribute = \"site\" }}\n\n",
            route.display()
        )
        + &sink(
            "lake",
            "\"route\"",
            &s3.endpoint(),
            &s3.bucket,
            "format = \"parquet\"\ncompression = \"zstd\"\nrow_group_size = 16\n\
             key = \"{sink}/site={attr.site}/year={yyyy}/month={MM}/{agent}-{batch}.parquet\"\n\
             batch = { max_records = 40, max_bytes = \"8MiB\", max_age = \"1s\" }",
        );
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("mqtt subscribed", 1), ("silt running", 1)], 60)
        .await;

    let topics = ["plant/temp", "plant/humidity", "plant/pressure"];
    let n = 300;
    let mut msgs: Vec<Msg> = (0..n)
        .map(|i| Msg {
            id: format!("m-{i}"),
            topic: topics[i % 3].to_string(),
            payload: serde_json::to_vec(&payload(i)).unwrap(),
        })
        .collect();
    for i in 0..3 {
        msgs.push(Msg {
            id: format!("bin-{i}"),
            topic: "plant/camera".into(),
            payload: format!("raw-{i}").into_bytes(),
        });
    }
    let total = msgs.len();
    let (_p, h) = spawn_publisher(broker.port, "lake-pub", msgs, PubOpts::default());
    let report = h.await.unwrap();
    assert_eq!(report.acked.len(), total, "{:?}", report.error);
    wait_until(deadline(60), "every event uploaded", || {
        agent.uploaded_records() == total as u64
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_all()));
    note(t0, format!("{total} events uploaded"));

    let script = format!("{BOTO3_PRELUDE}{DOWNLOAD}{READ_PARQUET}");
    let out = python::run(
        &py,
        &script,
        &[&s3.endpoint(), &s3.bucket, S3_ACCESS_KEY, S3_SECRET_KEY],
    );
    let got: Value = serde_json::from_str(out.trim()).unwrap();
    note(
        t0,
        format!(
            "pyarrow: {} objects, {} rows, per site {}",
            got["objects"], got["rows"], got["per_site"]
        ),
    );

    let mut per_site: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..n {
        let site = if i % 7 == 0 {
            "__missing__"
        } else {
            ["berlin", "lyon", "oslo"][i % 3]
        };
        *per_site.entry(site.into()).or_default() += 1;
    }
    // Binary payloads have no plant field either.
    *per_site.entry("__missing__".into()).or_default() += 3;
    assert_eq!(got["rows"], json!(total));
    assert_eq!(got["per_site"], json!(per_site));
    assert_eq!(got["mixed"], json!([]), "rows in the wrong partition");
    assert_eq!(got["ids"], json!((0..n).collect::<Vec<_>>()));
    assert_eq!(got["raw"], json!(["raw-0", "raw-1", "raw-2"]));
    assert_eq!(got["agents"], json!(["gw-lake"]));
    assert_eq!(got["topics"].as_array().unwrap().len(), 4);
    assert_eq!(got["ts_type"], "timestamp[ms, tz=UTC]");
    // Widened: every value is a float, the integers exact.
    assert_eq!(got["schema"]["value"], "double");
    assert_eq!(got["value"]["4"], json!(4.0));
    assert_eq!(got["value"]["5"], json!(5.5));
    // Conflicting types: text (strings as they are, numbers as JSON),
    // nothing dropped.
    assert_eq!(got["schema"]["reading"], "string");
    assert_eq!(got["reading"]["4"], json!("r4"));
    assert_eq!(got["reading"]["3"], json!("3"));
    assert_eq!(got["schema"]["meta.unit"], "string");
    let partitions = got["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 4, "{partitions:?}");
    assert!(
        partitions
            .iter()
            .all(|p| p.as_str().unwrap().starts_with("lake/site=")),
        "{partitions:?}"
    );
    assert!(
        got["objects"].as_u64().unwrap() > 4,
        "batches of 40 should give several objects per partition"
    );
}

/// Reads the NDJSON+gzip lake with gzip and json.
const READ_NDJSON_GZIP: &str = "
import gzip, tempfile, os, collections
endpoint, bucket = sys.argv[1], sys.argv[2]
client = s3(endpoint, sys.argv[3], sys.argv[4])
root = tempfile.mkdtemp()
keys = download(client, bucket, root)
per_plant, wrong, ids = collections.Counter(), [], []
for key in keys:
    plant = key.split('/')[1].split('=')[1]
    with gzip.open(os.path.join(root, key), 'rt') as f:
        for line in f:
            rec = json.loads(line)
            per_plant[plant] += 1
            ids.append(rec['payload']['id'])
            if rec['payload'].get('plant', '__missing__') != plant:
                wrong.append(key)
heads = [client.head_object(Bucket=bucket, Key=k) for k in keys]
print(json.dumps({'objects': len(keys), 'per_plant': per_plant, 'wrong': wrong, 'ids': sorted(ids),
    'encodings': sorted(set(h.get('ContentEncoding', '') for h in heads)),
    'types': sorted(set(h.get('ContentType', '') for h in heads))}))
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_gzip_lake_partitioned_by_field_reads_back_in_python() {
    let Some(py) = python::python() else {
        return;
    };
    let scratch = Scratch::new("lake-ndjson");
    let s3 = S3Server::start(scratch.path(), "lake");
    let port = free_port();
    let cfg = config::agent("gw-nd")
        + &config::http_source("api", port, None, "1MiB")
        + &sink(
            "lake",
            "\"api\"",
            &s3.endpoint(),
            &s3.bucket,
            "compression = \"gzip\"\n\
             key = \"{sink}/plant={field.plant}/{agent}-{batch}.ndjson.gz\"\n\
             batch = { max_records = 25, max_bytes = \"8MiB\", max_age = \"1s\" }",
        );
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;
    let client = HttpClient::new(port, None);
    let n = 200;
    for chunk in (0..n).collect::<Vec<_>>().chunks(20) {
        post_readings(&client, chunk.iter().map(|&i| payload(i)).collect()).await;
    }
    wait_until(deadline(60), "every event uploaded", || {
        agent.uploaded_records() == n as u64
    })
    .await
    .unwrap();
    let script = format!("{BOTO3_PRELUDE}{DOWNLOAD}{READ_NDJSON_GZIP}");
    let out = python::run(
        &py,
        &script,
        &[&s3.endpoint(), &s3.bucket, S3_ACCESS_KEY, S3_SECRET_KEY],
    );
    let got: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got["wrong"], json!([]));
    assert_eq!(got["ids"], json!((0..n).collect::<Vec<_>>()));
    let per_plant = got["per_plant"].as_object().unwrap();
    assert_eq!(
        per_plant["__missing__"],
        json!((0..n).filter(|i| i % 7 == 0).count())
    );
    assert_eq!(per_plant.len(), 4);
    assert_eq!(got["encodings"], json!(["gzip"]));
    assert_eq!(got["types"], json!(["application/x-ndjson"]));
}

/// Storage class, content type and metadata of every object, via boto3.
const READ_HEADS: &str = "
endpoint, bucket = sys.argv[1], sys.argv[2]
client = s3(endpoint, 'k', 's')
out = {}
for o in client.list_objects_v2(Bucket=bucket).get('Contents', []):
    h = client.head_object(Bucket=bucket, Key=o['Key'])
    out[o['Key']] = {'listed': o.get('StorageClass'), 'head': h.get('StorageClass', 'STANDARD'),
        'type': h.get('ContentType'), 'meta': h.get('Metadata', {}), 'size': h['ContentLength'],
        'parts': h.get('PartsCount')}
print(json.dumps(out))
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_class_and_metadata_on_every_put_and_multipart_upload() {
    let Some(py) = python::python() else {
        return;
    };
    let scratch = Scratch::new("lake-class");
    let moto = MotoServer::start(&py, &scratch.join("moto"), "archive");
    let port = free_port();
    let cfg = config::agent("gw-cls")
        + &config::http_source("api", port, None, "1MiB")
        + &sink(
            "events",
            "\"api\"",
            &moto.endpoint(),
            &moto.bucket,
            "storage_class = \"STANDARD_IA\"\nmetadata_attributes = [\"site\"]\n\
             key = \"events/{agent}-{batch}.ndjson\"\ncompression = \"none\"\n\
             batch = { max_records = 5, max_bytes = \"8MiB\", max_age = \"1s\" }",
        )
        + &sink(
            "media",
            "\"api\"",
            &moto.endpoint(),
            &moto.bucket,
            "format = \"raw\"\nstorage_class = \"INTELLIGENT_TIERING\"\npart_size = \"5MiB\"\n\
             metadata_attributes = [\"site\"]\nkey = \"media/{attr.stream}/{attr.name}-{batch}\"",
        );
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;
    let client = HttpClient::new(port, None);
    post_readings(&client, (0..5).map(payload).collect()).await;
    // 12 MiB: three parts of a multipart upload.
    let video: Vec<u8> = (0..12 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let put = harness::http::client_builder()
        .build()
        .unwrap()
        .put(format!(
            "http://127.0.0.1:{port}/v1/media/cam-1/clip.mp4?site=plant-1"
        ))
        .header("content-type", "video/mp4")
        .body(video.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 201, "{}", put.text().await.unwrap());

    let expected_objects = 1 + 1;
    let mut heads = Value::Null;
    wait_until(deadline(60), "objects in moto", || {
        heads = serde_json::from_str(
            python::run(
                &py,
                &format!("{BOTO3_PRELUDE}{READ_HEADS}"),
                &[&moto.endpoint(), &moto.bucket],
            )
            .trim(),
        )
        .unwrap();
        heads.as_object().unwrap().len() >= expected_objects
            && agent.count_log("uploaded object") >= expected_objects
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_all()));
    let heads = heads.as_object().unwrap();
    let (events, media): (Vec<_>, Vec<_>) =
        heads.iter().partition(|(k, _)| k.starts_with("events/"));
    assert_eq!(media.len(), 1, "{heads:?}");
    for (key, h) in &events {
        assert_eq!(h["head"], "STANDARD_IA", "{key}: {h}");
        assert_eq!(h["type"], "application/x-ndjson", "{key}");
    }
    let (key, h) = media[0];
    assert!(key.starts_with("media/cam-1/clip.mp4-"), "{key}");
    assert_eq!(h["head"], "INTELLIGENT_TIERING", "{h}");
    assert_eq!(h["listed"], "INTELLIGENT_TIERING", "{h}");
    assert_eq!(h["type"], "video/mp4");
    assert_eq!(h["size"], json!(video.len()));
    assert_eq!(h["meta"]["site"], "plant-1");
    assert_eq!(h["meta"]["sha256"].as_str().unwrap().len(), 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_binary_payloads_become_raw_objects_keyed_by_topic_fields() {
    let scratch = Scratch::new("lake-raw");
    let broker = Mosquitto::start(&scratch.join("mosquitto"));
    let s3 = S3Server::start(scratch.path(), "frames");
    let cfg = config::agent("gw-raw")
        + &config::mqtt_source("cams", &broker.url(), &["cam/#"])
            .replace("qos = 1\n", "qos = 1\ntopic_fields = [\"\", \"camera\"]\n")
        + &sink(
            "frames",
            "\"cams\"",
            &s3.endpoint(),
            &s3.bucket,
            "format = \"raw\"\nkey = \"frames/{attr.camera}/{agent}-{batch}.jpg\"",
        );
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("mqtt subscribed", 1), ("silt running", 1)], 60)
        .await;
    let frames: Vec<Msg> = (0..6u8)
        .map(|i| Msg {
            id: format!("f-{i}"),
            topic: format!("cam/{}", ["door", "yard"][i as usize % 2]),
            payload: [0xff, 0xd8, i].repeat(1000),
        })
        .collect();
    let (_p, h) = spawn_publisher(broker.port, "raw-pub", frames.clone(), PubOpts::default());
    assert_eq!(h.await.unwrap().acked.len(), frames.len());
    wait_until(deadline(60), "6 raw objects", || {
        agent.uploaded_records() == 6
    })
    .await
    .unwrap();
    let lake = S3Lake::new(&s3);
    let mut keys = lake.keys().await.unwrap();
    keys.sort();
    assert_eq!(keys.len(), 6, "{keys:?}");
    let mut bodies = Vec::new();
    for key in &keys {
        let camera = key.split('/').nth(1).unwrap();
        let body = lake.get(key).await.unwrap();
        let i = body[2] as usize;
        assert_eq!(camera, ["door", "yard"][i % 2], "{key}");
        bodies.push(body);
    }
    bodies.sort();
    let mut sent: Vec<Vec<u8>> = frames.into_iter().map(|f| f.payload).collect();
    sent.sort();
    assert_eq!(bodies, sent, "raw objects are the payloads, byte for byte");
}
