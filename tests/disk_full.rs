//! A real full filesystem (ENOSPC) under the spool: the agent pushes back
//! instead of crashing, keeps what it acknowledged, and resumes by itself
//! when space returns. The data_dir sits on a small tmpfs mounted for the
//! test (needs root, as in CI; skipped with a message otherwise).

mod harness;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use harness::http::{HttpClient, IngestReq};
use harness::payload::json_event;
use harness::{Agent, S3Server, Scratch, config, free_port};

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount of {} failed", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enospc_blocks_keeps_acked_events_and_recovers() {
    let scratch = Scratch::new("disk-full");
    let Some(disk) = Tmpfs::mount(&scratch.join("disk"), "6m") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root and must be able to mount a tmpfs"
        );
        eprintln!("skipped: cannot mount a tmpfs (not root?)");
        return;
    };
    let mut s3 = S3Server::start(scratch.path(), "telemetry");
    s3.stop();
    let port = free_port();
    // No free-disk floor: the filesystem itself must run out.
    let cfg = config::agent("gw-full").replace(
        "when_full = \"block\"",
        "when_full = \"block\"\nmin_free = \"0B\"",
    ) + &config::http_source("api", port, None, "16MiB")
        + &config::s3_sink(
            "lake",
            &["api"],
            &s3,
            "gzip",
            &config::batch(200, "8MiB", "1s"),
        );
    let data_dir = disk.0.join("data");
    let cfg = cfg.replace("{data_dir}", &data_dir.display().to_string());
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;
    let client = HttpClient::new(port, None);

    let mut acked: HashSet<String> = HashSet::new();
    let mut refused = 0;
    for i in 0..600 {
        let req = IngestReq::array(
            "readings",
            (0..50)
                .map(|j| json_event(&format!("f{i}-{j}"), j, 400))
                .collect(),
        );
        match client.ingest(&req).await {
            Ok(r) if r.status == 202 => acked.extend(req.events.iter().map(|(id, _)| id.clone())),
            _ => refused += 1,
        }
        if refused >= 20 {
            break;
        }
    }
    assert!(
        refused >= 20,
        "the 6 MiB disk never filled up ({} events acked)",
        acked.len()
    );
    assert!(
        !acked.is_empty(),
        "nothing was accepted before the disk filled"
    );
    agent
        .wait_log("waiting for free disk space", harness::deadline(30))
        .await
        .expect("the agent must notice the full disk and wait for space");
    assert!(agent.is_running(), "a full disk must not stop the agent");

    disk.resize("64m");
    agent
        .wait_log("spool reopened", harness::deadline(60))
        .await
        .unwrap();
    harness::wait_until(harness::deadline(30), "http back", || {
        harness::port_open(port)
    })
    .await
    .unwrap();
    let after = IngestReq::single("readings", json_event("after-full", 0, 100));
    let reply = client.ingest(&after).await.unwrap();
    assert_eq!(reply.status, 202, "accepts again once space returned");
    acked.insert("after-full".into());

    s3.start_again();
    let mut lake = harness::S3Lake::new(&s3);
    let t0 = std::time::Instant::now();
    let snap = lake
        .wait_for(&acked, harness::deadline(120), t0)
        .await
        .unwrap();
    let ids: Vec<String> = snap.records.iter().filter_map(|r| r.id()).collect();
    let distinct: HashSet<&String> = ids.iter().collect();
    println!(
        "disk full: {} events acked before/after ENOSPC, {refused} requests refused, {} in S3, {} duplicates",
        acked.len(),
        distinct.len(),
        ids.len() - distinct.len()
    );
    assert_eq!(ids.len(), distinct.len(), "no event may be uploaded twice");
    let status = agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(status.success(), "silt must exit 0, got {status}");
}
