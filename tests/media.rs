//! Media uploads: `PUT /v1/media/{stream}/{name}` -> raw S3 sink (one object
//! per upload, multipart above `part_size`) -> sidecar index line in the
//! NDJSON lake. Each test has its own scratch dir, s3s-fs and agent.
//!
//! - `large_upload_bounded_memory_byte_identical`: a 200 MiB upload streamed
//!   by the client (generated and hashed chunk by chunk) gets 201 with the
//!   client's sha256; the object in S3 streams back byte-identical (size,
//!   sha256, `x-amz-meta-sha256`); the agent's peak RSS (VmHWM) stays within
//!   64 MiB of its idle RSS; exactly one sidecar line in the lake with the
//!   object's key, size, sha256 and attributes (query `site=plant-1` among
//!   them); `<data_dir>/media` holds no file afterwards.
//! - `sigkill_mid_multipart_upload_resumes`: 120 MiB in 8 MiB parts (15)
//!   through a throttling proxy; SIGKILL once part 3 is logged; s3s-fs shows
//!   the parts it holds (boto3 `list_parts`); after a restart the agent logs
//!   `resuming multipart upload` with parts_done > 0 and re-sends only the
//!   missing parts; one object (sha256 intact, no duplicate under another
//!   key), no multipart upload left open, exactly one sidecar line.
//! - `disconnect_midway_stores_nothing`: a client declaring 50 MiB that
//!   drops after 10 MiB gets no 2xx; the partial file goes, nothing reaches
//!   S3 or the lake (checked after a later upload has landed, the barrier),
//!   and that later upload gets 201.
//! - `over_max_media_is_413_and_stores_nothing`: `max_media = "1MiB"`; a
//!   declared 2 MiB body gets 413 before any body is sent, a chunked 2 MiB
//!   body (no declared length) is refused too; nothing stored, and a
//!   512 KiB upload still goes through.
//! - `a_sweep_spares_the_media_of_a_sink_its_name_prefixes`: raw sinks `cam`
//!   and `cam-hd` read one HTTP source; three uploads get 201 with S3 down;
//!   the agent stops, a stray file goes into `media/sink/cam/`, and once
//!   every file is past the sweep's 60 s settle time (ctime; about a minute
//!   of waiting) the agent restarts with S3 up: each upload reaches S3 once
//!   per sink, byte-identical; no `media file is gone`, and the sweeps
//!   remove the stray file and nothing else.

mod harness;

use std::time::{Duration, Instant};

use harness::lake::LakeRecord;
use harness::media::*;
use harness::payload::Body;
use harness::python::{self, BOTO3_PRELUDE};
use harness::*;
use serde_json::{Value, json};

const AGENT: &str = "cam-gw";
const STREAM: &str = "cam1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_bounded_memory_byte_identical() {
    let mut st = MediaStack::start("media-large", "8MiB", None, None).await;
    let pid = st.agent.pid().expect("agent running");
    let idle = proc_status_bytes(pid, "VmRSS").expect("VmRSS");
    let hwm_at_start = proc_status_bytes(pid, "VmHWM").expect("VmHWM");
    st.note(format!(
        "agent idle: VmRSS {:.1} MiB (VmHWM so far {:.1} MiB)",
        mib(idle),
        mib(hwm_at_start)
    ));

    const LEN: u64 = 200 * MIB;
    let name = "clip-200m.mp4";
    let reply = st.put(name, "?site=plant-1", LEN, 1).await;
    st.note(format!(
        "PUT {name}: {:?} in {:.2?} ({:.0} MiB/s) {}",
        reply.status,
        reply.took,
        mib(LEN) / reply.took.as_secs_f64(),
        reply.body
    ));
    assert_eq!(reply.status, Some(201), "PUT reply: {reply:?}");
    assert_eq!(reply.sent, LEN);
    let ack = reply.json();
    assert_eq!(ack["sha256"], json!(reply.sha256), "201 body: {ack}");
    assert_eq!(ack["size"], json!(LEN), "201 body: {ack}");
    assert_eq!(ack["stream"], json!(STREAM));
    assert_eq!(ack["name"], json!(name));

    let key = st.wait_object(name, 300).await;
    // The index line is written only after the object is confirmed.
    let line = st.sidecar_line(name, 60).await;
    let peak = proc_status_bytes(pid, "VmHWM").expect("VmHWM");
    let parts = st.agent.count_log("multipart part written");
    st.note(format!(
        "object written in {parts} parts; agent VmHWM {:.1} MiB, idle VmRSS {:.1} MiB: peak - idle = {:.1} MiB",
        mib(peak),
        mib(idle),
        mib(peak.saturating_sub(idle))
    ));
    assert_eq!(parts, 25, "200 MiB in 8 MiB parts");
    // One 8 MiB part in memory at a time, plus the HTTP clients' buffers;
    // four parts' worth means buffers are kept or read ahead.
    assert!(
        peak.saturating_sub(idle) < 32 * MIB,
        "agent memory grew by {:.1} MiB (idle {:.1} MiB, peak {:.1} MiB) for a 200 MiB upload; expected < 32 MiB",
        mib(peak.saturating_sub(idle)),
        mib(idle),
        mib(peak)
    );

    assert_eq!(st.only_object(name).await, key);
    let t = Instant::now();
    let (size, sha) = st.bucket.sha256(&key).await.unwrap();
    st.note(format!(
        "read back {key}: {size} bytes in {:.2?}",
        t.elapsed()
    ));
    assert_eq!(size, LEN, "object size");
    assert_eq!(
        sha, reply.sha256,
        "object sha256 differs from what was sent"
    );
    assert_eq!(
        st.bucket.metadata(&key, "sha256").await.unwrap().as_deref(),
        Some(reply.sha256.as_str()),
        "x-amz-meta-sha256"
    );

    check_index_line(
        &line,
        &key,
        LEN,
        &reply.sha256,
        name,
        &[("site", "plant-1")],
    );
    st.assert_media_dir_empty().await;
    assert_eq!(st.sidecar_lines().await.len(), 1, "one index line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_multipart_upload_resumes() {
    // 24 MiB/s to S3: ~0.33 s per 8 MiB part, ~5 s for all 15, so the
    // SIGKILL after part 3 lands well inside the upload.
    const RATE: u64 = 24 * MIB;
    let mut st = MediaStack::start("media-resume", "8MiB", None, Some(RATE)).await;
    const LEN: u64 = 120 * MIB;
    const PARTS: usize = 15;
    let name = "clip-120m.mp4";
    let reply = st.put(name, "?site=plant-2", LEN, 2).await;
    assert_eq!(reply.status, Some(201), "PUT reply: {reply:?}");
    assert_eq!(reply.json()["sha256"], json!(reply.sha256));
    st.note(format!("PUT {name}: 201 in {:.2?}", reply.took));

    // SIGKILL as soon as part 3 is logged (parts are written in order).
    let pid = st.agent.pid();
    st.agent
        .wait_log_n("multipart part written", 3, deadline(120))
        .await
        .unwrap();
    st.agent.kill9();
    let run1 = st.agent.log_run();
    let parts_before: Vec<u64> = part_numbers(&run1);
    let key = run1
        .lines()
        .find(|l| l.contains("multipart part written"))
        .and_then(|l| agent::field(l, "key"))
        .expect("key in the part log line");
    st.note(format!(
        "SIGKILLed agent (pid {pid:?}) after parts {parts_before:?} of {PARTS} were logged; key {key}"
    ));
    assert!(
        parts_before.len() >= 3 && parts_before.len() < PARTS,
        "the kill must land mid-upload; parts logged: {parts_before:?}"
    );
    assert_eq!(
        parts_before,
        (1..=parts_before.len() as u64).collect::<Vec<_>>()
    );
    assert!(
        st.bucket.list("media/").await.unwrap().is_empty(),
        "no object may exist before the upload is completed"
    );

    // Evidence from the server: the open upload and the parts it holds.
    let uploads = open_uploads(&st.s3);
    assert_eq!(uploads.len(), 1, "one open multipart upload: {uploads:?}");
    let server_parts = match python::python() {
        Some(py) => {
            let out = python::run(
                &py,
                &format!("{BOTO3_PRELUDE}{LIST_PARTS}"),
                &[
                    &st.s3.endpoint(),
                    procs::S3_ACCESS_KEY,
                    procs::S3_SECRET_KEY,
                    &st.s3.bucket,
                    &key,
                    &uploads[0],
                ],
            );
            let v: Value = serde_json::from_str(out.trim()).expect("script output is JSON");
            st.note(format!(
                "s3s-fs: list_multipart_uploads -> {}; list_parts({}) -> {}",
                v["list_multipart_uploads"], uploads[0], v["parts"]
            ));
            let parts: Vec<(u64, u64)> = v["parts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap(), p[1].as_u64().unwrap()))
                .collect();
            Some(parts)
        }
        None => None,
    };
    if let Some(parts) = &server_parts {
        let numbers: Vec<u64> = parts.iter().map(|p| p.0).collect();
        // Every logged part is on the server (logged after the store's OK
        // and the checkpoint); one more may have finished unlogged.
        assert!(
            numbers.starts_with(&parts_before) && numbers.len() <= parts_before.len() + 1,
            "server parts {numbers:?} vs logged {parts_before:?}"
        );
        assert!(
            parts.iter().all(|p| p.1 == 8 * MIB),
            "part sizes: {parts:?}"
        );
    }

    st.proxy.as_ref().unwrap().set_rate(0);
    st.agent.spawn();
    st.wait_up().await;
    st.note("agent restarted");
    let line = st.sidecar_line(name, 180).await;
    let run2 = st.agent.log_run();
    let resume = run2
        .lines()
        .find(|l| l.contains("resuming multipart upload"))
        .unwrap_or_else(|| panic!("no `resuming multipart upload` in the second run"));
    let parts_done: usize = agent::field(resume, "parts_done").unwrap().parse().unwrap();
    let parts_total: usize = agent::field(resume, "parts").unwrap().parse().unwrap();
    let resent = part_numbers(&run2);
    st.note(format!(
        "resumed with parts_done={parts_done} of {parts_total}; second run wrote parts {resent:?}"
    ));
    assert_eq!(agent::field(resume, "key").as_deref(), Some(key.as_str()));
    assert_eq!(parts_total, PARTS);
    assert!(parts_done > 0, "resume must keep finished parts");
    // The part in flight at the kill may have been checkpointed, not logged.
    assert!(
        (parts_before.len()..=parts_before.len() + 1).contains(&parts_done),
        "parts_done {parts_done} vs {} logged before the kill",
        parts_before.len()
    );
    if let Some(parts) = &server_parts {
        assert!(
            parts_done <= parts.len(),
            "checkpointed parts the server did not have"
        );
    }
    assert!(
        resent.len() < PARTS,
        "all parts were sent again: {resent:?}"
    );
    assert_eq!(
        resent,
        ((parts_done as u64 + 1)..=PARTS as u64).collect::<Vec<_>>(),
        "the second run sends exactly the missing parts"
    );

    let objects = st.bucket.list("").await.unwrap();
    let media: Vec<_> = objects
        .iter()
        .filter(|(k, _)| k.starts_with("media/"))
        .collect();
    assert_eq!(media.len(), 1, "exactly one media object: {objects:?}");
    assert_eq!(
        media[0].0, key,
        "the object is under the key the upload began with"
    );
    let (size, sha) = st.bucket.sha256(&key).await.unwrap();
    assert_eq!(
        (size, sha.as_str()),
        (LEN, reply.sha256.as_str()),
        "object content"
    );
    assert_eq!(
        open_uploads(&st.s3),
        Vec::<String>::new(),
        "the interrupted upload was completed, not abandoned for a new one"
    );
    check_index_line(
        &line,
        &key,
        LEN,
        &reply.sha256,
        name,
        &[("site", "plant-2")],
    );
    st.assert_media_dir_empty().await;
    assert_eq!(st.sidecar_lines().await.len(), 1, "exactly one index line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_midway_stores_nothing() {
    let mut st = MediaStack::start("media-disconnect", "8MiB", None, None).await;
    let incoming = st.agent.data_dir.join("media/incoming");
    let sock = put_partial(
        st.http_port,
        Some(TOKEN),
        &format!("/v1/media/{STREAM}/partial.mp4"),
        50 * MIB,
        10 * MIB,
        3,
    )
    .await;
    // The agent is streaming it to disk: a partial file exists.
    wait_until(deadline(30), "a partial file under media/incoming", || {
        std::fs::read_dir(&incoming).is_ok_and(|mut d| d.next().is_some())
    })
    .await
    .unwrap();
    // Without the rest of the body there is no reply, let alone a 2xx.
    let mut peek = [0u8; 64];
    match sock.try_read(&mut peek) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!(
            "the agent answered an incomplete upload: {other:?} {:?}",
            &peek[..]
        ),
    }
    drop(sock);
    st.note("sent 10 MiB of a declared 50 MiB, then dropped the connection");

    wait_until(deadline(30), "media/ to hold no file", || {
        media_files(&st.agent.data_dir).is_empty()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", media_files(&st.agent.data_dir)));
    st.note("partial file removed");

    // Barrier: a later upload that lands proves the pipeline has moved past
    // anything the broken one could have committed.
    let reply = st.put("after.mp4", "", 64 * 1024, 4).await;
    assert_eq!(reply.status, Some(201), "the agent still serves: {reply:?}");
    let line = st.sidecar_line("after.mp4", 60).await;
    let key = st.only_object("after.mp4").await;
    check_index_line(&line, &key, 64 * 1024, &reply.sha256, "after.mp4", &[]);
    let objects = st.bucket.list("").await.unwrap();
    assert!(
        !objects.iter().any(|(k, _)| k.contains("partial")),
        "the broken upload reached S3: {objects:?}"
    );
    let lines = st.sidecar_lines().await;
    assert_eq!(
        lines.len(),
        1,
        "only the later upload is indexed: {lines:?}"
    );
    st.assert_media_dir_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_media_is_413_and_stores_nothing() {
    let mut st = MediaStack::start("media-413", "8MiB", Some("1MiB"), None).await;
    let target = format!("/v1/media/{STREAM}/big.mp4");
    // Declared too large: refused from the head, before any body is sent.
    let mut sock = put_partial(st.http_port, Some(TOKEN), &target, 2 * MIB, 0, 5).await;
    let declared = read_reply(&mut sock, Duration::from_secs(30)).await;
    drop(sock);
    st.note(format!("declared 2 MiB: {declared:?}"));
    assert_eq!(
        declared.0,
        Some(413),
        "declared 2 MiB over max_media 1MiB: {declared:?}"
    );
    assert!(
        declared.1.contains("max_media"),
        "the reply says why: {}",
        declared.1
    );

    // No declared length: refused once more than 1 MiB has streamed in. The
    // agent may answer and close while the client is still writing, so the
    // client may see a reset instead of the 413; never a 2xx.
    let chunked = put_chunked(
        st.http_port,
        Some(TOKEN),
        &target,
        2 * MIB,
        6,
        Duration::from_secs(30),
    )
    .await;
    st.note(format!(
        "chunked 2 MiB: status {:?}, write error {:?}, read error {:?}",
        chunked.status, chunked.write_error, chunked.read_error
    ));
    assert!(
        chunked.status == Some(413) || chunked.status.is_none(),
        "chunked 2 MiB over max_media: {chunked:?}"
    );
    wait_until(deadline(30), "media/ to hold no file", || {
        media_files(&st.agent.data_dir).is_empty()
    })
    .await
    .unwrap();

    let ok = st.put("small.mp4", "", 512 * 1024, 7).await;
    assert_eq!(ok.status, Some(201), "under max_media: {ok:?}");
    st.sidecar_line("small.mp4", 60).await;
    let objects = st.bucket.list("").await.unwrap();
    let media: Vec<_> = objects
        .iter()
        .filter(|(k, _)| k.starts_with("media/"))
        .collect();
    assert_eq!(
        media.len(),
        1,
        "only the small upload is stored: {objects:?}"
    );
    assert!(media[0].0.ends_with("-small.mp4"));
    assert_eq!(st.sidecar_lines().await.len(), 1);
    st.assert_media_dir_empty().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_spares_the_media_of_a_sink_its_name_prefixes() {
    // `cam` is a prefix of `cam-hd`: releases that kept every link flat in
    // media/ as `<sink>-...` let `cam`'s sweep take `cam-hd`'s files.
    const SINKS: [&str; 2] = ["cam", "cam-hd"];
    let mut st = MediaStack::start_with("media-sweep", None, |endpoint, s3, http_port| {
        SINKS.iter().fold(
            media_source("cameras", http_port, Some(TOKEN), None),
            |cfg, sink| cfg + &raw_sink(sink, &["cameras"], endpoint, &s3.bucket, "8MiB", &[]),
        )
    })
    .await;
    // Down before the first upload, so every reference stays in the spool
    // across the restart and the sweep has something to get wrong.
    st.s3.stop();
    let mut sent = Vec::new();
    for (name, len, seed) in [
        ("a.mp4", 64 * 1024, 11),
        ("b.mp4", MIB + 5, 12),
        ("c.mp4", 3 * MIB, 13),
    ] {
        let reply = st.put(name, "", len, seed).await;
        assert_eq!(
            reply.status,
            Some(201),
            "PUT {name} with S3 down: {reply:?}"
        );
        assert_eq!(
            reply.json()["sha256"],
            json!(reply.sha256),
            "201 body of {name}"
        );
        sent.push((name, len, reply.sha256));
    }
    let data = st.agent.data_dir.clone();
    // One link per sink and upload, wherever the layout puts them.
    let links = media_files(&data);
    assert_eq!(
        links.len(),
        SINKS.len() * sent.len(),
        "media files: {links:?}"
    );
    // Proof that the restart's sweep ran on settled files: it must remove
    // this one, which no record refers to. (This run swept at its start.)
    let stray = "sink/cam/1795496858123-77-0";
    let stray_path = data.join("media").join(stray);
    std::fs::create_dir_all(stray_path.parent().unwrap()).unwrap();
    std::fs::write(&stray_path, b"orphan").unwrap();
    st.note("3 uploads answered 201 with S3 down");
    let t = Instant::now();
    let status = st.agent.sigterm_and_wait(Duration::from_secs(60)).await;
    st.note(format!(
        "agent stopped ({status}) {:.1?} after SIGTERM",
        t.elapsed()
    ));

    // The sweep removes only files whose ctime is SWEEP_SETTLE (60 s,
    // agent/src/batch/media.rs) old, and no call sets a ctime back
    // (utimensat moves atime and mtime only): so a minute has to pass.
    let settled = Duration::from_secs(62);
    let t = Instant::now();
    wait_until(
        deadline(120),
        "every media file to be 62 s old by ctime",
        || {
            media_files(&data)
                .iter()
                .all(|p| ctime_age(p).is_some_and(|age| age >= settled))
        },
    )
    .await
    .unwrap();
    st.note(format!(
        "waited {:.1?} for the files to settle",
        t.elapsed()
    ));

    st.s3.start_again();
    st.agent.spawn();
    st.wait_up().await;
    st.note("agent restarted with S3 up");
    let want = SINKS.len() * sent.len();
    let end = deadline(120);
    loop {
        let log = st.agent.log_run();
        assert!(
            !log.contains(GONE),
            "a sink lost a referenced media file: {}",
            lines_with(&log, GONE)
        );
        let objects = st.bucket.list("").await.unwrap_or_default();
        if objects.len() >= want && media_files(&data).is_empty() {
            break;
        }
        if let Some(status) = st.agent.try_exit() {
            panic!("silt exited ({status}) before uploading the media; objects {objects:?}");
        }
        assert!(
            Instant::now() < end,
            "{want} objects and an empty media/ expected within 120 s; objects {objects:?}, files {:?}",
            media_files(&data)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    st.note(format!("{want} objects in S3, media/ empty"));
    let status = st.agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(status.success(), "silt exited with {status} after SIGTERM");

    let log = st.agent.log_all();
    assert!(!log.contains(GONE), "{}", lines_with(&log, GONE));
    let swept: Vec<String> = log
        .lines()
        .filter(|l| l.contains(SWEPT))
        .map(|l| agent::field(l, "file").unwrap_or_else(|| l.to_string()))
        .collect();
    assert_eq!(swept, [stray], "the sweeps removed exactly the stray file");
    let objects = st.bucket.list("").await.unwrap();
    assert_eq!(
        objects.len(),
        want,
        "one object per sink and upload: {objects:?}"
    );
    for sink in SINKS {
        for (name, len, sha256) in &sent {
            let prefix = format!("{sink}/{STREAM}/");
            let hits: Vec<_> = objects
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix) && k.ends_with(&format!("-{name}")))
                .collect();
            assert_eq!(
                hits.len(),
                1,
                "one object of `{sink}` for {name}: {objects:?}"
            );
            let (size, sha) = st.bucket.sha256(&hits[0].0).await.unwrap();
            assert_eq!(
                (size, sha.as_str()),
                (*len, sha256.as_str()),
                "content of {}",
                hits[0].0
            );
        }
    }
}

// ---------------------------------------------------------------- helpers

/// boto3 against s3s-fs: `list_multipart_uploads` (s3s-fs 0.14 does not
/// implement it; its answer is reported, not relied on) and `list_parts` of
/// the upload found on disk. Prints `{"list_multipart_uploads", "parts": [[n, size]...]}`.
const LIST_PARTS: &str = r#"
endpoint, key_id, secret, bucket, key, upload_id = sys.argv[1:7]
c = s3(endpoint, key_id, secret)
try:
    ups = c.list_multipart_uploads(Bucket=bucket).get('Uploads', [])
    listed = [[u['Key'], u['UploadId']] for u in ups]
except Exception as e:
    listed = 'error: %s' % getattr(e, 'response', {}).get('Error', {}).get('Code', type(e).__name__)
parts = c.list_parts(Bucket=bucket, Key=key, UploadId=upload_id).get('Parts', [])
parts = sorted([p['PartNumber'], p['Size']] for p in parts)
print(json.dumps({'list_multipart_uploads': listed, 'parts': parts}))
"#;

/// s3s-fs, a raw sink `media` (through a throttling proxy when `throttle`
/// is set) and an NDJSON sink `lake` that takes the index lines, fed by the
/// HTTP source `cam`.
/// A query value becomes object metadata; with a control character in it
/// (`?site=a%0Ab`) the upload request could not be built, was retried
/// forever, and every later upload of the sink waited behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_metadata_do_not_stall_the_sink() {
    let mut st = MediaStack::start_with("media-header", None, |endpoint, s3, http_port| {
        media_source("cam", http_port, Some(TOKEN), None)
            + &raw_sink("media", &["cam"], endpoint, &s3.bucket, "8MiB", &[])
                .replace("retry_max", "metadata_attributes = [\"site\"]\nretry_max")
    })
    .await;
    for (name, query, seed) in [
        ("bad.jpg", "?site=a%0Ab", 1),
        ("good.jpg", "?site=plant-1", 2),
    ] {
        let reply = st.put(name, query, 4096, seed).await;
        assert_eq!(reply.status, Some(201), "PUT {name}{query}: {reply:?}");
    }
    let end = deadline(30);
    let objects = loop {
        let objects = st.bucket.list("").await.unwrap_or_default();
        if objects.len() >= 2 {
            break objects;
        }
        if Instant::now() >= end {
            st.agent.dump_log(40);
            panic!("both uploads should reach S3 within 30 s; objects {objects:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut sites = Vec::new();
    for (key, _) in &objects {
        sites.push(st.bucket.metadata(key, "site").await.unwrap());
    }
    sites.sort();
    st.note(format!("objects {objects:?}, site metadata {sites:?}"));
    assert_eq!(
        sites,
        [Some("a%0Ab".to_string()), Some("plant-1".to_string())]
    );
    let status = st.agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "silt run should exit 0 after SIGTERM, got {status}"
    );
}

/// A link slower than a fixed request timeout allows: 192 KiB through a
/// 32 KiB/s proxy (6 s). With `min_upload_rate = "1GiB"` every attempt gets
/// about `request_timeout` (2 s) whatever its size, as with the old fixed
/// timeout: each is cut short and the object never lands. With the rate
/// lowered to 8 KiB/s the deadline is 2 s + 24 s, and after a restart the
/// same sealed batch goes up under its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_deadlines_grow_with_the_object_on_a_slow_link() {
    let rate = |r: &str| format!("request_timeout = \"2s\"\nmin_upload_rate = \"{r}\"\nretry_max");
    let mut st =
        MediaStack::start_with("media-slow-link", Some(32 * 1024), |endpoint, s3, port| {
            media_source("cam", port, Some(TOKEN), None)
                + &raw_sink("media", &["cam"], endpoint, &s3.bucket, "8MiB", &[])
                    .replace("retry_max", &rate("1GiB"))
        })
        .await;
    let reply = st.put("slow.bin", "", 192 * 1024, 9).await;
    assert_eq!(reply.status, Some(201), "{reply:?}");
    let cut = "did not finish within";
    st.agent
        .wait_log_n(cut, 3, deadline(30))
        .await
        .expect("attempts cut at the fixed deadline");
    let objects = st.bucket.list("").await.unwrap_or_default();
    assert!(objects.is_empty(), "nothing can land in 2 s: {objects:?}");
    st.agent.kill9();
    st.note("3 attempts cut at about 2 s; restarting with min_upload_rate = 8KiB");

    // A fresh proxy: the old one still forwards, at the shared rate, what
    // the cut attempts had written into its socket buffers.
    let old = st.proxy.take().expect("throttled").endpoint();
    let proxy = ThrottleProxy::start(st.s3.port, 32 * 1024).await;
    let config = std::fs::read_to_string(&st.agent.config).unwrap();
    let config = config
        .replace("\"1GiB\"", "\"8KiB\"")
        .replace(&old, &proxy.endpoint());
    std::fs::write(&st.agent.config, config).unwrap();
    st.proxy = Some(proxy);
    st.agent.spawn();
    st.wait_up().await;
    let end = deadline(60);
    let objects = loop {
        let objects = st.bucket.list("").await.unwrap_or_default();
        if !objects.is_empty() {
            break objects;
        }
        if Instant::now() >= end {
            st.agent.dump_log(40);
            panic!("the object should be written within 60 s at a 26 s deadline");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let timeouts = st.agent.count_log(cut);
    st.note(format!(
        "written: {objects:?}; attempts cut in this run: {timeouts}"
    ));
    assert_eq!(objects.len(), 1);
    assert_eq!(objects[0].1, 192 * 1024);
    assert_eq!(
        timeouts, 0,
        "no attempt should be cut at 2 s + size / 8 KiB/s"
    );
    let status = st.agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "silt run should exit 0 after SIGTERM, got {status}"
    );
}

struct MediaStack {
    agent: Agent,
    proxy: Option<ThrottleProxy>,
    s3: S3Server,
    bucket: Bucket,
    http_port: u16,
    t0: Instant,
    _scratch: Scratch,
}

impl MediaStack {
    async fn start(
        name: &str,
        part_size: &str,
        max_media: Option<&str>,
        throttle: Option<u64>,
    ) -> MediaStack {
        MediaStack::start_with(name, throttle, |endpoint, s3, http_port| {
            // `lake` must have an input; `cam` only sends it events on POST
            // /v1/ingest, which these tests do not use.
            media_source("cam", http_port, Some(TOKEN), max_media)
                + &raw_sink(
                    "media",
                    &["cam"],
                    endpoint,
                    &s3.bucket,
                    part_size,
                    &["lake"],
                )
                + &config::s3_sink(
                    "lake",
                    &["cam"],
                    s3,
                    "none",
                    &config::batch(1000, "8MiB", "1s"),
                )
        })
        .await
    }

    /// s3s-fs (behind a throttling proxy when `throttle` is set) and an
    /// agent whose sources and sinks `config(endpoint, s3, http_port)` gives.
    async fn start_with(
        name: &str,
        throttle: Option<u64>,
        config: impl FnOnce(&str, &S3Server, u16) -> String,
    ) -> MediaStack {
        let t0 = Instant::now();
        let scratch = Scratch::new(name);
        let s3 = S3Server::start(scratch.path(), "media-lake");
        let proxy = match throttle {
            Some(rate) => Some(ThrottleProxy::start(s3.port, rate).await),
            None => None,
        };
        let endpoint = proxy
            .as_ref()
            .map(|p| p.endpoint())
            .unwrap_or_else(|| s3.endpoint());
        let http_port = free_port();
        let cfg = config::agent(AGENT) + &config(&endpoint, &s3, http_port);
        let agent = Agent::start(&scratch.join("agent"), &cfg);
        let mut st = MediaStack {
            agent,
            proxy,
            bucket: Bucket::new(&s3),
            s3,
            http_port,
            t0,
            _scratch: scratch,
        };
        st.wait_up().await;
        st.note(format!("agent up: http :{}, s3 :{}", http_port, st.s3.port));
        st
    }

    async fn wait_up(&mut self) {
        self.agent
            .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
            .await;
    }

    fn note(&self, msg: impl AsRef<str>) {
        note(self.t0, msg)
    }

    async fn put(&self, name: &str, query: &str, len: u64, seed: u64) -> PutReply {
        put_stream(
            self.http_port,
            Some(TOKEN),
            &format!("/v1/media/{STREAM}/{name}{query}"),
            len,
            seed,
            Duration::from_secs(300),
        )
        .await
    }

    /// Index lines in the lake (topic `media/<stream>`), as JSON payloads.
    async fn sidecar_lines(&mut self) -> Vec<Value> {
        // Only the lake's prefix: the media objects are not NDJSON.
        let (records, problems) = self.bucket.ndjson("lake/").await.unwrap();
        assert!(problems.is_empty(), "lake problems: {problems:?}");
        records
            .into_iter()
            .filter(|r| r.topic.as_deref() == Some(&format!("media/{STREAM}")))
            .map(|r: LakeRecord| match r.body {
                Body::Json(v) => v,
                Body::Binary(b) => panic!("index line with a binary payload: {b:?}"),
            })
            .collect()
    }

    /// Waits for the index line of upload `name`.
    async fn sidecar_line(&mut self, name: &str, secs: u64) -> Value {
        let end = deadline(secs);
        loop {
            let lines = self.sidecar_lines().await;
            if let Some(l) = lines
                .iter()
                .find(|l| l["attributes"]["name"] == json!(name))
            {
                self.note(format!("index line for {name} in the lake"));
                return l.clone();
            }
            if let Some(st) = self.agent.try_exit() {
                panic!("silt exited ({st}) while waiting for the index line of {name}");
            }
            assert!(
                Instant::now() < end,
                "no index line for {name} within {secs} s; lines: {lines:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until an object for upload `name` is listed; its key.
    async fn wait_object(&self, name: &str, secs: u64) -> String {
        let (end, suffix) = (deadline(secs), format!("-{name}"));
        loop {
            let found = self.bucket.list("media/").await.unwrap_or_default();
            if let Some((key, _)) = found.into_iter().find(|(k, _)| k.ends_with(&suffix)) {
                self.note(format!("object {key} listed"));
                return key;
            }
            assert!(Instant::now() < end, "no object for {name} within {secs} s");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The one object whose key ends with `-<name>` (the default raw key).
    async fn only_object(&self, name: &str) -> String {
        let objects = self.bucket.list("media/").await.unwrap();
        let hits: Vec<_> = objects
            .iter()
            .filter(|(k, _)| k.ends_with(&format!("-{name}")))
            .collect();
        assert_eq!(hits.len(), 1, "one object for {name}: {objects:?}");
        let key = hits[0].0.clone();
        let prefix = format!("media/{STREAM}/");
        assert!(
            key.starts_with(&prefix) && key.contains(&format!("/{AGENT}-")),
            "default raw key {{sink}}/{{attr.stream}}/yyyy/MM/dd/{{agent}}-{{batch}}-{{attr.name}}: {key}"
        );
        key
    }

    /// No file under `<data_dir>/media`, only the `incoming` and (once a
    /// file was linked) `sink/<sink>` directories.
    async fn assert_media_dir_empty(&self) {
        let data = &self.agent.data_dir;
        wait_until(deadline(30), "media/ to hold no file", || {
            media_files(data).is_empty()
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: {:?}", media_files(data)));
        let mut entries: Vec<_> = std::fs::read_dir(data.join("media"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        entries.sort();
        entries.retain(|e| e != "sink");
        assert_eq!(entries, ["incoming"], "media/ entries");
    }
}

/// The index line for one media object.
fn check_index_line(
    line: &Value,
    key: &str,
    size: u64,
    sha256: &str,
    name: &str,
    query: &[(&str, &str)],
) {
    assert_eq!(line["sink"], json!("media"), "{line}");
    assert_eq!(line["key"], json!(key), "{line}");
    assert_eq!(line["size"], json!(size), "{line}");
    assert_eq!(line["sha256"], json!(sha256), "{line}");
    assert_eq!(line["content_type"], json!("video/mp4"), "{line}");
    assert_eq!(line["stream"], json!(STREAM), "{line}");
    assert!(
        line["ts"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{line}"
    );
    let mut want = serde_json::Map::new();
    for (k, v) in query {
        want.insert(k.to_string(), json!(v));
    }
    want.insert("stream".into(), json!(STREAM));
    want.insert("name".into(), json!(name));
    want.insert("content_type".into(), json!("video/mp4"));
    assert_eq!(
        line["attributes"],
        Value::Object(want),
        "attributes of {line}"
    );
}

/// The agent's line for a referenced media file that vanished.
const GONE: &str = "media file is gone";
/// The agent's line for each file a sweep removes.
const SWEPT: &str = "removing a media file no spool record refers to";

fn lines_with(log: &str, needle: &str) -> String {
    log.lines()
        .filter(|l| l.contains(needle))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Time since the file's inode last changed: the age the sweep measures.
fn ctime_age(path: &std::path::Path) -> Option<Duration> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    let changed = std::time::UNIX_EPOCH
        + Duration::new(u64::try_from(m.ctime()).ok()?, m.ctime_nsec() as u32);
    changed.elapsed().ok()
}

/// `part=N` of every `multipart part written` line in `log`, in order.
fn part_numbers(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("multipart part written"))
        .filter_map(|l| agent::field(l, "part")?.parse().ok())
        .collect()
}
