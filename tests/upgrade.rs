//! A spool written by an earlier silt is read on the first start of this
//! one, and everything in it, the batch sealed before the upgrade and the
//! unsealed rest, reaches the lake exactly once: silt 0.1.0's (one sled
//! value per event, before chunks) is migrated, and chunks of version 2
//! are read as they are. The fixtures come from the old binaries
//! (tests/fixtures/make-spool.sh).

mod harness;

use std::collections::HashMap;
use std::path::Path;

use harness::*;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_of_the_previous_release_is_migrated_and_drained_exactly_once() {
    drains_exactly_once("spool-v0.1.0", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_of_version_2_chunks_drains_exactly_once() {
    drains_exactly_once("spool-chunks-v2", 0).await;
}

/// Starts on a copy of `fixture`; `migrations` is how often the log must
/// say the spool was migrated.
async fn drains_exactly_once(fixture: &str, migrations: usize) {
    let scratch = Scratch::new(fixture);
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(fixture);
    copy_dir(&fixture, &scratch.join("agent/data"));
    let lake = scratch.join("lake");
    let config = format!(
        "{}{}[sinks.lake]\ntype = \"file\"\ninputs = [\"in\"]\npath = \"{}\"\n\
         key = \"{{sink}}/site={{field.site}}/{{agent}}-{{batch}}.ndjson\"\ncompression = \"none\"\n\
         batch = {}\nretry_max = \"1s\"\n",
        config::agent("gw-up"),
        config::http_source("in", free_port(), None, "1MiB"),
        lake.display(),
        config::batch(50, "8MiB", "1s"),
    );
    let mut agent = Agent::start(&scratch.join("agent"), &config);
    let expected: Vec<String> = (0..300).map(|i| format!("up-{i}")).collect();
    let file_lake = FileLake::new(&lake);
    let drained = wait_until(deadline(60), "all 300 events in the lake", || {
        let snap = file_lake.snapshot();
        snap.records.len() >= expected.len()
    })
    .await;
    let snap = file_lake.snapshot();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &snap.records {
        *seen.entry(r.id().unwrap_or_default()).or_default() += 1;
    }
    let missing: Vec<_> = expected
        .iter()
        .filter(|id| !seen.contains_key(*id))
        .collect();
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    if drained.is_err() || !missing.is_empty() || !twice.is_empty() {
        agent.dump_log(80);
    }
    assert!(
        missing.is_empty(),
        "{} events lost in the upgrade: {missing:?}",
        missing.len()
    );
    assert!(twice.is_empty(), "events stored twice: {twice:?}");
    assert_eq!(snap.records.len(), expected.len());
    assert!(snap.problems.is_empty(), "{:?}", snap.problems);
    for r in &snap.records {
        let site = match &r.body {
            payload::Body::Json(v) => v["site"].as_str().unwrap_or_default().to_string(),
            _ => String::new(),
        };
        assert!(
            r.object.contains(&format!("site={site}/")),
            "{} in {}",
            site,
            r.object
        );
    }
    assert_eq!(
        agent.count_log("migrated spool records to the chunk format"),
        migrations
    );
    assert_eq!(
        agent.count_log("uploading batch sealed earlier"),
        1,
        "the batch sealed before the upgrade goes out as it was sealed"
    );
    agent
        .sigterm_and_wait(std::time::Duration::from_secs(20))
        .await;
}
