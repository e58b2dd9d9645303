//! `silt spool check --repair` on a sealed batch with one damaged record:
//! every good record of the batch still reaches S3, exactly once. Before
//! repair re-sealed such batches, the batcher read the gap as "uploaded
//! before a crash" and deleted the good records without uploading them.

mod harness;

use std::collections::HashSet;

use harness::http::IngestReq;
use harness::{Expected, Stack, Verdict, config};
use serde_json::json;

const N: usize = 30;

fn id(i: usize) -> String {
    format!("repair-{i:03}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repaired_sealed_batch_uploads_all_its_good_records() {
    let mut st = Stack::start(
        "repair",
        "gw-repair",
        &config::batch(1_000, "8MiB", "2s"),
        &["repair/#"],
    )
    .await;
    st.s3.stop();
    // One request at a time, each answered before the next: one chunk per
    // event, so damaging one payload damages one record.
    let client = st.http();
    let mut exp = Expected::new(&st.agent_id);
    let mut requests = Vec::new();
    for i in 0..N {
        let req = IngestReq::single("rp", json!({ "id": id(i), "pad": "p".repeat(200) }));
        let reply = client.ingest(&req).await.unwrap();
        assert_eq!(reply.status, 202, "request {i}");
        requests.push(req);
    }
    st.agent
        .wait_log("sink unreachable", harness::deadline(30))
        .await
        .unwrap();
    st.agent.kill9();

    let victim = id(N / 2);
    let segments = st.agent.data_dir.join("spool/chunks/lake");
    let needle = format!("\"{victim}\"");
    let mut flipped = false;
    for entry in std::fs::read_dir(&segments).unwrap() {
        let path = entry.unwrap().path();
        let mut raw = std::fs::read(&path).unwrap();
        if let Some(at) = raw
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
        {
            raw[at + 3] ^= 0x20;
            std::fs::write(&path, raw).unwrap();
            flipped = true;
        }
    }
    assert!(
        flipped,
        "{victim} is stored in a segment of {}",
        segments.display()
    );

    let data_dir = st.agent.data_dir.to_str().unwrap().to_string();
    let repair = harness::agent::silt_output(&["spool", "check", "--repair", "-d", &data_dir], &[]);
    let report = String::from_utf8_lossy(&repair.stdout).to_string();
    st.note(format!("check --repair:\n{report}"));
    assert!(repair.status.success(), "{report}");
    assert!(
        report.contains("batch 0 (key ") && report.contains(": 1 of its "),
        "the report names the batch and how many records it lost: {report}"
    );

    for req in &requests {
        for (event_id, body) in &req.events {
            if *event_id != victim {
                exp.add(event_id, &req.stream, body.clone());
            }
        }
    }
    let good: HashSet<String> = (0..N).map(id).filter(|i| *i != victim).collect();
    st.s3.start_again();
    st.agent.spawn();
    let mut lake = st.lake();
    let snap = lake
        .wait_for(&good, harness::deadline(60), st.t0)
        .await
        .unwrap();
    assert!(
        st.agent
            .log_run()
            .contains("uploading the good records of a batch"),
        "the agent says it uploads a repaired batch"
    );
    st.stop_agent_cleanly().await;
    let verdict = Verdict::compute(&exp, &good, &snap);
    st.note(verdict.summary());
    verdict.assert_exactly_once();
}
