//! Fault acceptance of the durability promise: SIGKILL loops, a long S3
//! outage, a broker restart, a full spool under each `when_full` policy, and
//! a damaged spool. Every test prints its counts (`-- --nocapture`).
//!
//! Knobs: `SILT_CRASH_TRIALS` (25), `SILT_OUTAGE_SECS` (120),
//! `SILT_FAULTS_SEED` (replays the random kill moments of a run).

mod faults_support;
mod harness;

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use faults_support::*;
use harness::config;
use harness::http::{IngestReq, mixed_requests, spawn_load, spawn_retrying_load};
use harness::mqtt::{PubOpts, messages, spawn_publisher};
use harness::payload::json_event;

fn ids_of(reqs: &[IngestReq]) -> Vec<String> {
    reqs.iter()
        .flat_map(|r| r.events.iter().map(|(id, _)| id.clone()))
        .collect()
}

// ------------------------------------------------------------ 1. crash loop

/// N times: SIGKILL the agent at a random moment under MQTT + HTTP load and
/// restart it on the same data dir. Every acknowledged event must be in S3,
/// and no event may be in the lake twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_keeps_every_acked_event_once() {
    const MQTT_RATE: u32 = 400;
    const HTTP_RATE: u32 = 150;
    let trials: usize = env_num("SILT_CRASH_TRIALS", 25);
    let (mut rng, seed) = rng("crash-loop");
    let mut st = FStack::start(
        "faults-crash",
        StackOpts {
            agent_id: "gw-crashloop",
            max_bytes: "1GiB",
            when_full: "block",
            batch: config::batch(200, "8MiB", "1s"),
            mqtt_topics: &["loop/#"],
            s3_down: false,
            proxies: true,
        },
    )
    .await;
    st.note(format!("{trials} trials, seed {seed} (SILT_FAULTS_SEED)"));

    // Enough load for the longest run; stopped when the trials are over.
    let secs = trials * 6 + 30;
    let msgs = messages(
        "cl",
        MQTT_RATE as usize * secs,
        &["loop/a", "loop/b/c"],
        4,
        200,
    );
    let reqs = mixed_requests("clh", HTTP_RATE as usize * secs, &["crashloop"], 200);
    let mut sent: HashSet<String> = msgs.iter().map(|m| m.id.clone()).collect();
    sent.extend(ids_of(&reqs));
    let (mp, mh) = spawn_publisher(
        st.broker.port,
        "crashloop-pub",
        msgs,
        PubOpts {
            inflight: 200,
            rate: Some(MQTT_RATE),
            ..Default::default()
        },
    );
    // HTTP clients retry every request under its Idempotency-Key after any
    // transport error or 5xx: a request committed just before a kill is
    // answered from the spool by the next run, not stored twice.
    let (hp, hh) = spawn_retrying_load(st.http(), reqs, 4, Some(HTTP_RATE));

    let t_trials = Instant::now();
    let (mut aimed_s3, mut aimed_mqtt, mut s3_down_kills) = (0, 0, 0);
    for trial in 1..=trials {
        // Four kinds of trial, in turn:
        // 1. SIGKILL at a random moment, 0.3 .. 4.5 s into this run;
        // 2. after 0.3 .. 3 s, SIGKILL as soon as S3 has written an object
        //    whose reply the proxy swallows: uploaded but not completed;
        // 3. S3 stopped, SIGKILL 1.2 .. 3 s later while a sealed batch waits
        //    for its upload; S3 comes back with the restart;
        // 4. after 0.3 .. 3 s, SIGKILL as soon as the agent sends a PUBACK,
        //    which the proxy swallows: committed but not acked.
        let alive = Instant::now();
        let (s3p, mqttp) = st.proxy.as_ref().expect("crash loop runs with proxies");
        let trap = |p: &Proxy| {
            let caught = p.arm();
            async move {
                tokio::time::timeout(Duration::from_secs(10), caught)
                    .await
                    .is_ok_and(|r| r.is_ok())
            }
        };
        let how = match trial % 4 {
            1 => {
                tokio::time::sleep(Duration::from_millis(300 + rng.below(4_200))).await;
                "random moment".to_string()
            }
            2 => {
                tokio::time::sleep(Duration::from_millis(300 + rng.below(2_700))).await;
                let hit = trap(s3p).await;
                s3p.disarm();
                aimed_s3 += hit as usize;
                format!("object written, reply swallowed: {hit}")
            }
            3 => {
                st.s3.stop();
                tokio::time::sleep(Duration::from_millis(1_200 + rng.below(1_800))).await;
                s3_down_kills += 1;
                "S3 down".to_string()
            }
            _ => {
                tokio::time::sleep(Duration::from_millis(300 + rng.below(2_700))).await;
                let hit = trap(mqttp).await;
                mqttp.disarm();
                aimed_mqtt += hit as usize;
                format!("committed, PUBACK swallowed: {hit}")
            }
        };
        assert!(
            st.agent.is_running(),
            "agent died by itself before kill #{trial}"
        );
        st.agent.kill9();
        let alive = alive.elapsed();
        if !st.s3.is_running() {
            st.s3.start_again();
        }
        let down = Duration::from_millis(rng.below(500));
        tokio::time::sleep(down).await;
        st.restart_agent(60).await;
        st.note(format!(
            "trial {trial}/{trials}: killed after {alive:.1?} ({how}), down {down:.1?}; acked so far mqtt {} http {}",
            mp.acked.load(Ordering::Relaxed),
            hp.acked_events.load(Ordering::Relaxed)
        ));
    }
    let trials_took = t_trials.elapsed();
    mp.stop.store(true, Ordering::Relaxed);
    hp.stop.store(true, Ordering::Relaxed);
    let mrep = mh.await.unwrap();
    let hrep = hh.await.unwrap();
    st.note(format!(
        "mqtt: {} sent, {} PUBACKed, error {:?}; http: {}",
        mrep.sent,
        mrep.acked.len(),
        mrep.error,
        hrep.summary()
    ));
    assert_eq!(
        mrep.acked.len(),
        mrep.sent,
        "the broker PUBACKs; it should ack every message"
    );

    let acked: HashSet<String> = mrep.acked.iter().chain(&hrep.acked).cloned().collect();
    let mut lake = st.lake();
    let (drained, _) = wait_lake(
        &mut lake,
        &acked,
        Duration::from_millis(500),
        harness::deadline(180),
        st.t0,
    )
    .await;
    st.stop_agent_cleanly().await;
    let snap = lake.snapshot().await.expect("read lake");
    let t = Tally::compute(&snap, &sent, &acked, &HashSet::new(), |id| {
        id.starts_with("cl-")
    });
    let log = st.agent.log_all();
    let resumed = log.matches("uploading batch sealed earlier").count();
    let already = log.matches("already_there=true").count();
    let conflicts = log.matches("already exists under this key").count();
    let redelivered: u64 = log
        .lines()
        .filter(|l| l.contains("mqtt redeliveries of messages already committed"))
        .filter_map(|l| harness::agent::field(l, "messages")?.parse::<u64>().ok())
        .sum();
    println!(
        "crash loop: N={trials} kills ({aimed_s3} after S3 wrote an object the agent was not told of, {s3_down_kills} with S3 down, \
         {aimed_mqtt} after a commit whose PUBACK was lost) in {trials_took:.1?} (seed {seed}); events acked {} (mqtt {}, http {}); \
         lost {}; duplicated ids {} ({} across objects: {} same spool record, {} mqtt redelivery, {} http); \
         sealed batches resumed after a kill {resumed}, objects found already written {already}, key conflicts {conflicts}, \
         mqtt redeliveries recognised and not stored again {redelivered}; http requests retried {} ({} answered with \
         the first reply of their Idempotency-Key)",
        acked.len(),
        mrep.acked.len(),
        hrep.acked.len(),
        t.lost.len(),
        t.dup_ids,
        t.dup_across_objects,
        t.dup_same_record.len(),
        t.dup_mqtt_redelivered.len(),
        t.dup_http.len(),
        hrep.retried,
        hrep.replayed,
    );
    st.note(t.summary());
    assert!(
        drained.is_some(),
        "acknowledged events did not all reach S3 within 180 s:\n{}",
        t.summary()
    );
    assert!(!t.hard_failures(), "{}", t.summary());
    assert_eq!(conflicts, 0, "a resumed batch hit a key conflict");
    assert_eq!(
        (aimed_s3, aimed_mqtt),
        ((trials + 2) / 4, trials / 4),
        "the proxies should have caught an upload / a PUBACK in every trial of kind 2 / 4"
    );
    assert_eq!(
        t.dup_ids,
        0,
        "events appear in the lake more than once. MQTT redeliveries are messages the agent \
         committed but whose PUBACK was lost in the SIGKILL; the broker sent them again:\n{}",
        t.summary()
    );
}

// ------------------------------------------------------------ 2. S3 outage

/// S3 down for `SILT_OUTAGE_SECS` under steady load; everything arrives
/// exactly once after it comes back. Prints the drain rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_s3_outage_drains_exactly_once() {
    const MQTT_RATE: u32 = 250;
    const HTTP_RATE: u32 = 100;
    const LEAD: u64 = 5;
    let outage: u64 = env_num("SILT_OUTAGE_SECS", 120);
    let mut st = FStack::start(
        "faults-outage",
        StackOpts {
            agent_id: "gw-outage",
            max_bytes: "1GiB",
            when_full: "block",
            batch: config::batch(2_000, "8MiB", "1s"),
            mqtt_topics: &["site/#"],
            s3_down: false,
            proxies: false,
        },
    )
    .await;
    let load_secs = (LEAD + outage) as usize;
    let msgs = messages(
        "ou",
        MQTT_RATE as usize * load_secs,
        &["site/a/temp", "site/b/cam"],
        6,
        256,
    );
    let reqs = mixed_requests("ouh", HTTP_RATE as usize * load_secs, &["outage"], 256);
    let mut sent: HashSet<String> = msgs.iter().map(|m| m.id.clone()).collect();
    sent.extend(ids_of(&reqs));
    let t_load = Instant::now();
    let (mp, mh) = spawn_publisher(
        st.broker.port,
        "outage-pub",
        msgs,
        PubOpts {
            inflight: 200,
            rate: Some(MQTT_RATE),
            ack_wait: Duration::from_secs(60),
        },
    );
    let (hp, hh) = spawn_load(st.http(), reqs, 4, Some(HTTP_RATE));
    let mut lake = st.lake();

    tokio::time::sleep_until((t_load + Duration::from_secs(LEAD)).into()).await;
    st.s3.stop();
    let t_down = Instant::now();
    st.note(format!(
        "S3 stopped for {outage} s; acked so far mqtt {} http {}",
        mp.acked.load(Ordering::Relaxed),
        hp.acked_events.load(Ordering::Relaxed)
    ));
    let warned = st
        .agent
        .wait_log("sink unreachable", t_down + Duration::from_secs(outage))
        .await;
    st.note(format!("`sink unreachable` logged: {warned:?}"));

    // The load ends with the outage; then S3 comes back.
    let mrep = mh.await.unwrap();
    let hrep = hh.await.unwrap();
    tokio::time::sleep_until((t_down + Duration::from_secs(outage)).into()).await;
    assert!(st.agent.is_running(), "agent died during the outage");
    let acked: HashSet<String> = mrep.acked.iter().chain(&hrep.acked).cloned().collect();
    st.s3.start_again();
    let t_up = Instant::now();
    let in_lake = lake.count().await;
    let backlog = acked.len().saturating_sub(in_lake);
    st.note(format!(
        "S3 back after {:.1?}; {} acked, {} in the lake, backlog {backlog}",
        t_down.elapsed(),
        acked.len(),
        in_lake
    ));
    let (drained, _) = wait_lake(
        &mut lake,
        &acked,
        Duration::from_millis(250),
        t_up + Duration::from_secs(300),
        st.t0,
    )
    .await;
    st.stop_agent_cleanly().await;
    let snap = lake.snapshot().await.expect("read lake");
    let t = Tally::compute(&snap, &sent, &acked, &HashSet::new(), |id| {
        id.starts_with("ou-")
    });
    let rate = drained.map(|d| backlog as f64 / d.as_secs_f64().max(1e-3));
    println!(
        "s3 outage: {outage} s down; events acked {} (mqtt {}, http {}); backlog at restart {backlog}; \
         drained in {:?} = {:.0} records/s; lost {}; duplicated {}; unreachable warnings {}",
        acked.len(),
        mrep.acked.len(),
        hrep.acked.len(),
        drained,
        rate.unwrap_or(0.0),
        t.lost.len(),
        t.dup_ids,
        st.agent.log_all().matches("sink unreachable").count(),
    );
    st.note(t.summary());
    assert_eq!(
        mrep.acked.len(),
        mrep.sent,
        "broker must PUBACK every message"
    );
    assert_eq!(
        hrep.acked.len(),
        HTTP_RATE as usize * load_secs,
        "every HTTP event must get 202 (the spool is large): {}",
        hrep.summary()
    );
    assert!(
        drained.is_some(),
        "backlog not drained within 300 s:\n{}",
        t.summary()
    );
    assert!(!t.hard_failures(), "{}", t.summary());
    assert_eq!(t.dup_ids, 0, "duplicates after an outage:\n{}", t.summary());
    warned.expect("agent must log `sink unreachable` while S3 is down");
}

// ------------------------------------------------------- 3. broker restart

/// mosquitto (persistent) restarted under load: the publisher reconnects
/// and resends what was not PUBACKed; the agent's persistent session gets
/// what was queued for it. Nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_nothing() {
    const RATE: u32 = 500;
    const SECS: usize = 20;
    let mut st = FStack::start(
        "faults-broker",
        StackOpts {
            agent_id: "gw-broker",
            max_bytes: "1GiB",
            when_full: "block",
            batch: config::batch(500, "8MiB", "1s"),
            mqtt_topics: &["bk/#"],
            s3_down: false,
            proxies: false,
        },
    )
    .await;
    let msgs = messages("bk", RATE as usize * SECS, &["bk/x", "bk/y/z"], 5, 256);
    let sent: HashSet<String> = msgs.iter().map(|m| m.id.clone()).collect();
    let t_load = Instant::now();
    let (p, h) = spawn_resilient_publisher(
        st.broker.port,
        "broker-pub",
        msgs,
        RATE,
        Duration::from_secs(60),
    );
    for (at, down) in [(6u64, 4u64), (13, 1)] {
        tokio::time::sleep_until((t_load + Duration::from_secs(at)).into()).await;
        st.broker.stop();
        st.note(format!(
            "mosquitto stopped (SIGTERM, persistence on); publisher sent {} acked {}",
            p.sent.load(Ordering::Relaxed),
            p.acked.load(Ordering::Relaxed)
        ));
        tokio::time::sleep(Duration::from_secs(down)).await;
        st.broker.restart();
        st.note("mosquitto restarted on the same port");
    }
    let rep = h.await.unwrap();
    st.note(format!(
        "publisher: {} sent, {} acked, {} resent, {} reconnects, {} never acked, {:.1?}",
        rep.sent,
        rep.acked.len(),
        rep.resent.len(),
        rep.reconnects,
        rep.unacked.len(),
        rep.elapsed
    ));
    let acked: HashSet<String> = rep.acked.iter().cloned().collect();
    let mut lake = st.lake();
    let (drained, _) = wait_lake(
        &mut lake,
        &acked,
        Duration::from_millis(500),
        harness::deadline(120),
        st.t0,
    )
    .await;
    let sessions = st.agent.count_log("session_present=true");
    let lost_conn = st.agent.count_log("mqtt connection lost");
    let recognised: u64 = st
        .agent
        .log_all()
        .lines()
        .filter(|l| l.contains("mqtt redeliveries of messages already committed"))
        .filter_map(|l| harness::agent::field(l, "messages")?.parse::<u64>().ok())
        .sum();
    st.stop_agent_cleanly().await;
    let snap = lake.snapshot().await.expect("read lake");
    let resent: HashSet<String> = rep.resent.iter().cloned().collect();
    let t = Tally::compute(&snap, &sent, &acked, &resent, |_| true);
    println!(
        "broker restart: 2 restarts; events acked {} (publisher resent {}); lost {}; duplicated {} \
         (client resend {}, mqtt redelivery {}, same record {}); agent reconnects {lost_conn}, \
         resumed sessions {sessions}, redeliveries recognised and not stored again {recognised}",
        acked.len(),
        rep.resent.len(),
        t.lost.len(),
        t.dup_ids,
        t.dup_client_resent.len(),
        t.dup_mqtt_redelivered.len(),
        t.dup_same_record.len()
    );
    st.note(t.summary());
    assert_eq!(
        rep.unacked.len(),
        0,
        "publisher could not get every message PUBACKed"
    );
    assert!(drained.is_some(), "not all acked in S3:\n{}", t.summary());
    assert!(!t.hard_failures(), "{}", t.summary());
    assert!(
        lost_conn >= 1,
        "the agent should notice the broker going away"
    );
    assert!(
        sessions >= 1,
        "the agent should resume its persistent session (session_present=true)"
    );
}

/// Whether every thread of `pid` is in the stopped state (`T`), so none
/// can read a socket any more.
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| Some(stat.rsplit_once(") ")?.1.starts_with('T')))
            .unwrap_or(false)
    })
}

/// Bytes the kernel holds, unread, on connections from `port` to this
/// host (the receive queues in `/proc/net/tcp`).
fn unread_from_port(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let remote_port = u16::from_str_radix(cols.get(2)?.rsplit(':').next()?, 16).ok()?;
            let rx = cols.get(4)?.split(':').nth(1)?;
            (remote_port == port).then(|| u64::from_str_radix(rx, 16).ok())?
        })
        .sum()
}

/// The broker forgets the agent's session (restart without persistence),
/// so packet ids start at 1 again, and a sensor repeats a payload: the new
/// message gets the packet id and the content of one committed in the old
/// session. The agent dies before committing it; the broker redelivers it
/// (DUP). It must be stored, not taken for a redelivery of the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_payload_under_a_reused_packet_id_is_stored() {
    let mut st = FStack::start(
        "faults-reused-pkid",
        StackOpts {
            agent_id: "gw-pkid",
            max_bytes: "1GiB",
            when_full: "block",
            batch: config::batch(100, "8MiB", "1s"),
            mqtt_topics: &["door/#"],
            s3_down: false,
            proxies: false,
        },
    )
    .await;
    let door = || {
        vec![harness::mqtt::Msg {
            id: "same".into(),
            topic: "door/1".into(),
            payload: br#"{"id":"same","door":"open"}"#.to_vec(),
        }]
    };
    let copies = |snap: &harness::lake::Snapshot| {
        snap.records
            .iter()
            .filter(|r| r.id().as_deref() == Some("same"))
            .count()
    };
    let mut lake = st.lake();
    let publish = |port| async move {
        let rep = harness::mqtt::publish(
            port,
            "door-sensor",
            door(),
            PubOpts::default(),
            Default::default(),
        )
        .await;
        assert_eq!(rep.acked.len(), 1, "broker did not PUBACK: {:?}", rep.error);
    };

    publish(st.broker.port).await;
    wait_copies(&mut lake, copies, 1, harness::deadline(30)).await;
    st.note("first message (packet id 1 of the first broker session) is in S3");

    st.broker.restart_forgetting_sessions();
    st.agent
        .wait_log_n("mqtt subscribed", 2, harness::deadline(30))
        .await
        .expect("agent subscribes again in the broker's new session");
    st.note("mosquitto restarted without its sessions; agent subscribed again");

    let pid = st.agent.pid().expect("agent runs");
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
    harness::wait_until(harness::deadline(10), "every agent thread stopped", || {
        all_threads_stopped(pid)
    })
    .await
    .unwrap();
    publish(st.broker.port).await;
    harness::wait_until(
        harness::deadline(10),
        "publish in the agent's socket",
        || unread_from_port(st.broker.port) > 0,
    )
    .await
    .expect("mosquitto sent the message to the stopped agent");
    st.agent.kill9();
    st.note("same payload published again (packet id 1 again) and agent killed before reading it");

    st.restart_agent(30).await;
    assert!(
        st.agent.count_log("session_present=true") >= 1,
        "the restarted agent should resume its session, where mosquitto redelivers"
    );
    let got = wait_copies(&mut lake, copies, 2, harness::deadline(30)).await;
    let recognised = st
        .agent
        .count_log("mqtt redeliveries of messages already committed");
    st.stop_agent_cleanly().await;
    let snap = lake.snapshot().await.expect("read lake");
    println!(
        "reused packet id: copies in S3 {} of 2 (after the wait: {got}); redeliveries taken as already committed {recognised}",
        copies(&snap)
    );
    assert_eq!(
        copies(&snap),
        2,
        "both messages were PUBACKed to the publisher and delivered to the agent's session"
    );
}

/// Waits until `count` of the lake's snapshot reaches `want` (or the
/// deadline); returns the last count.
async fn wait_copies(
    lake: &mut harness::lake::S3Lake,
    count: impl Fn(&harness::lake::Snapshot) -> usize,
    want: usize,
    deadline: Instant,
) -> usize {
    loop {
        let n = lake.snapshot().await.map(|s| count(&s)).unwrap_or(0);
        if n >= want || Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A full spool (S3 down, 8 MiB cap) under a flood of 100 x 1 MiB MQTT
/// messages: the source holds at most `max_inflight_bytes` (16 MiB) of
/// them and leaves the rest with the broker, instead of reading everything
/// mosquitto's window sends into memory. Once S3 is back, every message
/// arrives exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_flood_stays_within_the_inflight_byte_budget() {
    const N: usize = 100;
    const BUDGET_MIB: u64 = 16;
    let t0 = Instant::now();
    let scratch = harness::Scratch::new("faults-mqtt-budget");
    let broker = harness::Mosquitto::start(&scratch.join("mosquitto"));
    let mut s3 = harness::S3Server::start(scratch.path(), "telemetry");
    s3.stop();
    let cfg = agent_section("gw-budget", "8MiB", "block")
        + mqtt_source("sensors", &broker.url(), &["big/#"]).trim_end()
        + &format!("\nmax_inflight_bytes = \"{BUDGET_MIB}MiB\"\n\n")
        + &config::s3_sink(
            "lake",
            &["sensors"],
            &s3,
            "gzip",
            &config::batch(100, "4MiB", "1s"),
        );
    let mut agent = harness::Agent::start(&scratch.join("agent"), &cfg);
    agent.wait_ready(&[("mqtt subscribed", 1)], 60).await;
    let pid = agent.pid().expect("agent runs");
    let rss = |field| harness::media::proc_status_bytes(pid, field).unwrap_or(0);
    let idle = rss("VmRSS");

    let msgs = messages("big", N, &["big/a"], 0, 1 << 20);
    let ids: HashSet<String> = msgs.iter().map(|m| m.id.clone()).collect();
    let opts = PubOpts {
        inflight: 50,
        ..PubOpts::default()
    };
    let (_p, h) = spawn_publisher(broker.port, "big-pub", msgs, opts);
    let rep = h.await.unwrap();
    assert_eq!(rep.acked.len(), N, "broker PUBACKs: {:?}", rep.error);
    harness::note(
        t0,
        format!(
            "{N} x 1 MiB published; agent idle RSS {:.1} MiB",
            harness::media::mib(idle)
        ),
    );

    // Either the budget holds (the agent stops reading, mosquitto's data
    // waits in the socket) or memory runs past it.
    let over = (4 * BUDGET_MIB) << 20;
    harness::wait_until(
        harness::deadline(60),
        "budget pause or memory past it",
        || {
            (agent.count_log("byte budget used up") > 0 && unread_from_port(broker.port) > 0)
                || rss("VmHWM").saturating_sub(idle) > over
        },
    )
    .await
    .unwrap();
    let peak = rss("VmHWM").saturating_sub(idle);
    harness::note(
        t0,
        format!(
            "peak RSS above idle with S3 down: {:.1} MiB",
            harness::media::mib(peak)
        ),
    );
    assert!(
        peak <= over,
        "the agent held {:.1} MiB above idle; max_inflight_bytes is {BUDGET_MIB} MiB",
        harness::media::mib(peak)
    );

    s3.start_again();
    let mut lake = harness::S3Lake::new(&s3);
    let (drained, snap) = wait_lake(
        &mut lake,
        &ids,
        Duration::from_millis(500),
        harness::deadline(180),
        t0,
    )
    .await;
    let st = agent.sigterm_and_wait(Duration::from_secs(60)).await;
    let records = snap.records.iter().filter(|r| r.id().is_some()).count();
    println!(
        "mqtt byte budget: {N} x 1 MiB with the spool full; peak RSS {:.1} MiB above idle (budget {BUDGET_MIB} MiB); \
         drained after S3 came back in {drained:?}; {records} records for {N} ids",
        harness::media::mib(peak)
    );
    assert!(drained.is_some(), "not every message reached S3");
    assert_eq!(records, N, "a message is in S3 more than once");
    assert!(
        st.success(),
        "silt run should exit 0 after SIGTERM, got {st}"
    );
}

// ------------------------------------------------------------ 4. spool cap

fn cap_stack(name: &'static str, when_full: &'static str) -> StackOpts<'static> {
    StackOpts {
        agent_id: name,
        max_bytes: "200KiB",
        when_full,
        batch: config::batch(200, "8MiB", "1s"),
        mqtt_topics: &["cap/#"],
        s3_down: true,
        proxies: false,
    }
}

/// Last value of `name=N` in the agent's log lines containing `needle`.
fn last_field(log: &str, needle: &str, name: &str) -> Option<u64> {
    log.lines()
        .filter(|l| l.contains(needle))
        .rev()
        .find_map(|l| harness::agent::field(l, name)?.parse().ok())
}

/// `block`: HTTP answers 503 + Retry-After, MQTT acks are held; once S3 is
/// back everything drains and no acknowledged event is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_full_block() {
    let mut st = FStack::start("faults-block", cap_stack("gw-block", "block")).await;
    let c = st.http();
    let mut acked_http = Vec::new();
    let mut sent: HashSet<String> = HashSet::new();
    let mut refusal = None;
    for i in 0..5_000u64 {
        let req = IngestReq::single("cap", json_event(&format!("blk-{i}"), i, 300));
        sent.insert(format!("blk-{i}"));
        let r = c.ingest(&req).await.expect("agent must stay reachable");
        match r.status {
            202 => acked_http.push(format!("blk-{i}")),
            503 => {
                refusal = Some(r);
                break;
            }
            other => panic!("status {other} while filling: {}", r.body),
        }
    }
    let r = refusal.unwrap_or_else(|| panic!("no 503 after {} events", acked_http.len()));
    assert_eq!(
        r.retry_after.as_deref(),
        Some("1"),
        "503 must carry Retry-After"
    );
    st.note(format!(
        "503 + Retry-After {:?} after {} x ~300 B events",
        r.retry_after,
        acked_http.len()
    ));
    // MQTT while full: the broker takes the messages, the agent holds its acks.
    let msgs = messages("blm", 600, &["cap/m"], 0, 300);
    sent.extend(msgs.iter().map(|m| m.id.clone()));
    let mrep = harness::mqtt::publish(
        st.broker.port,
        "block-pub",
        msgs,
        PubOpts::default(),
        Default::default(),
    )
    .await;
    assert_eq!(
        mrep.acked.len(),
        600,
        "broker must PUBACK: {:?}",
        mrep.error
    );
    st.agent
        .wait_log("holding mqtt acks", harness::deadline(20))
        .await
        .expect("agent must hold MQTT acks while the spool is full");
    let still = c
        .ingest(&IngestReq::single("cap", json_event("blk-probe", 0, 300)))
        .await
        .unwrap();
    sent.insert("blk-probe".into());
    assert_eq!(still.status, 503, "still full: {}", still.body);
    assert!(st.agent.is_running());

    st.s3.start_again();
    st.note("S3 back");
    let acked: HashSet<String> = acked_http.iter().chain(&mrep.acked).cloned().collect();
    let mut lake = st.lake();
    let (drained, _) = wait_lake(
        &mut lake,
        &acked,
        Duration::from_millis(500),
        harness::deadline(120),
        st.t0,
    )
    .await;
    st.agent
        .wait_log("mqtt acks resume", harness::deadline(30))
        .await
        .expect("MQTT acks must resume once the spool has room");
    // And HTTP accepts again.
    let again = c
        .ingest(&IngestReq::single("cap", json_event("blk-after", 1, 300)))
        .await
        .unwrap();
    sent.insert("blk-after".into());
    assert_eq!(again.status, 202, "{}", again.body);
    st.stop_agent_cleanly().await;
    let snap = lake.snapshot().await.unwrap();
    let mut acked = acked;
    acked.insert("blk-after".into());
    let t = Tally::compute(&snap, &sent, &acked, &HashSet::new(), |id| {
        id.starts_with("blm-")
    });
    println!(
        "spool cap block: http accepted {} then 503 (Retry-After {:?}); mqtt 600 held then drained; \
         events acked {}; lost {}; duplicated {}; refused event in lake: {}",
        acked_http.len(),
        r.retry_after,
        acked.len(),
        t.lost.len(),
        t.dup_ids,
        snap.records
            .iter()
            .any(|r| r.id().as_deref() == Some("blk-probe"))
    );
    st.note(t.summary());
    assert!(drained.is_some(), "{}", t.summary());
    assert!(!t.hard_failures(), "{}", t.summary());
    assert_eq!(t.dup_ids, 0, "{}", t.summary());
}

/// Fills a 200 KiB spool (S3 down) with sequential HTTP requests of 1..=10
/// events; returns the requests and their replies.
async fn overfill(st: &FStack, prefix: &str) -> Vec<(IngestReq, harness::http::Reply)> {
    let reqs = {
        let mut rng = harness::payload::Rng::seeded(prefix);
        let mut out = Vec::new();
        let mut i = 0u64;
        while i < 1_500 {
            let k = 1 + rng.below(10);
            let vs = (i..i + k)
                .map(|j| json_event(&format!("{prefix}-{j}"), j, 300))
                .collect();
            out.push(IngestReq::ndjson("cap", vs));
            i += k;
        }
        out
    };
    let replies = send_each(&st.http(), &reqs).await;
    reqs.into_iter()
        .zip(replies)
        .map(|(q, r)| (q, r.expect("agent must stay reachable")))
        .collect()
}

/// `drop_newest`: HTTP keeps answering 202; `{"accepted":N,"dropped":M}`
/// says exactly which requests were kept, and exactly those arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_full_drop_newest() {
    let mut st = FStack::start("faults-dropnew", cap_stack("gw-dropnew", "drop_newest")).await;
    let sent_reqs = overfill(&st, "dn").await;
    let mut accepted = Vec::new();
    let (mut dropped, mut partial) = (0u64, Vec::new());
    for (q, r) in &sent_reqs {
        assert_eq!(
            r.status, 202,
            "drop_newest must keep answering 202: {}",
            r.body
        );
        let v = r.json().expect("JSON reply");
        let a = v["accepted"].as_u64().unwrap_or(u64::MAX);
        let d = v.get("dropped").and_then(|d| d.as_u64()).unwrap_or(0);
        let n = q.events.len() as u64;
        if a + d != n || (a != 0 && a != n) {
            partial.push(r.body.clone());
        }
        if a == n {
            accepted.extend(q.events.iter().map(|(id, _)| id.clone()));
        }
        dropped += d;
    }
    assert!(
        partial.is_empty(),
        "replies that do not add up: {partial:?}"
    );
    assert!(
        dropped > 0,
        "a 200 KiB spool must overflow with 1,500 x 300 B"
    );
    assert!(st.agent.is_running(), "agent must stay alive");
    // The drop counter is logged at most once a second: send one more event
    // (dropped too) until the log's total matches what the replies said.
    let c = st.http();
    let mut extra = 0u64;
    let dl = harness::deadline(15);
    loop {
        let logged = last_field(
            &st.agent.log_run(),
            "events dropped",
            "dropped_newest_total",
        );
        if logged == Some(dropped + extra) {
            break;
        }
        assert!(
            Instant::now() < dl,
            "log says dropped_newest_total={logged:?}, replies say {}",
            dropped + extra
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = c
            .ingest(&IngestReq::single("cap", json_event("dn-probe", 0, 300)))
            .await
            .unwrap();
        assert_eq!(r.json().unwrap()["dropped"], 1, "{}", r.body);
        extra += 1;
    }
    st.s3.start_again();
    let acked: HashSet<String> = accepted.iter().cloned().collect();
    let mut lake = st.lake();
    let (drained, _) = wait_lake(
        &mut lake,
        &acked,
        Duration::from_millis(500),
        harness::deadline(60),
        st.t0,
    )
    .await;
    st.stop_agent_cleanly().await;
    let snap = lake.snapshot().await.unwrap();
    let sent: HashSet<String> =
        ids_of(&sent_reqs.iter().map(|(q, _)| q.clone()).collect::<Vec<_>>())
            .into_iter()
            .chain(["dn-probe".to_string()])
            .collect();
    let t = Tally::compute(&snap, &sent, &acked, &HashSet::new(), |_| false);
    let in_lake: HashSet<String> = snap.records.iter().filter_map(|r| r.id()).collect();
    let dropped_arrived = in_lake.difference(&acked).count();
    let total = sent.len() - 1;
    println!(
        "spool cap drop_newest: sent {total} events in {} requests, accepted {}, dropped {dropped} \
         (+{extra} probes); accepted + dropped = {}; in lake {}; lost {}; dropped-but-arrived {dropped_arrived}; duplicated {}",
        sent_reqs.len(),
        accepted.len(),
        accepted.len() as u64 + dropped,
        snap.records.len(),
        t.lost.len(),
        t.dup_ids
    );
    st.note(t.summary());
    assert_eq!(accepted.len() as u64 + dropped, total as u64);
    assert!(drained.is_some(), "{}", t.summary());
    assert!(!t.hard_failures(), "{}", t.summary());
    assert_eq!(dropped_arrived, 0, "dropped events must not reach the lake");
    assert_eq!(t.dup_ids, 0, "{}", t.summary());
}

/// `drop_oldest`: HTTP keeps answering 202; what arrives is the sealed batch
/// (never dropped) plus the newest events, and accepted = arrived + dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_full_drop_oldest() {
    let mut st = FStack::start("faults-dropold", cap_stack("gw-dropold", "drop_oldest")).await;
    let sent_reqs = overfill(&st, "do").await;
    let mut order = Vec::new();
    for (q, r) in &sent_reqs {
        assert_eq!(
            r.status, 202,
            "drop_oldest must keep answering 202: {}",
            r.body
        );
        let v = r.json().expect("JSON reply");
        assert_eq!(
            v["accepted"].as_u64(),
            Some(q.events.len() as u64),
            "drop_oldest stores every new event: {}",
            r.body
        );
        order.extend(q.events.iter().map(|(id, _)| id.clone()));
    }
    assert!(st.agent.is_running(), "agent must stay alive");
    // The drop counter is logged at most once a second; after a quiet second
    // one more event makes the agent log the final total.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let r = st
        .http()
        .ingest(&IngestReq::single("cap", json_event("do-probe", 0, 300)))
        .await
        .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    order.push("do-probe".into());
    // The probe's drop is logged before its reply is sent.
    let log = st.agent.log_run();
    let dropped = last_field(&log, "events dropped", "dropped_oldest_total")
        .expect("the agent must log dropped_oldest_total");
    let dropped_new = last_field(
        &st.agent.log_run(),
        "events dropped",
        "dropped_newest_total",
    );
    st.s3.start_again();
    let expect_n = order.len() as u64 - dropped;
    let mut lake = st.lake();
    let dl = harness::deadline(60);
    loop {
        let n = lake.count().await as u64;
        if n >= expect_n || Instant::now() > dl {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    st.stop_agent_cleanly().await;
    let snap = lake.snapshot().await.unwrap();
    let sent: HashSet<String> = order.iter().cloned().collect();
    let in_lake: HashSet<String> = snap.records.iter().filter_map(|r| r.id()).collect();
    let t = Tally::compute(&snap, &sent, &HashSet::new(), &HashSet::new(), |_| false);
    // The object with the lowest batch number is the batch sealed before S3
    // was reached: never dropped, and the oldest events.
    let mut keys: Vec<&str> = snap.records.iter().map(|r| &*r.object).collect();
    keys.sort();
    keys.dedup();
    let first_obj = keys.first().copied().unwrap_or("");
    let sealed: HashSet<String> = snap
        .records
        .iter()
        .filter(|r| &*r.object == first_obj)
        .filter_map(|r| r.id())
        .collect();
    let k = sealed.len();
    let prefix_ok = order[..k].iter().all(|id| sealed.contains(id));
    let rest = in_lake.len() - k;
    let suffix_ok = order[order.len() - rest..]
        .iter()
        .all(|id| in_lake.contains(id));
    println!(
        "spool cap drop_oldest: accepted {} events, dropped (log) {dropped} oldest, newest-dropped {:?}; \
         in lake {} = sealed batch {k} (oldest, prefix {prefix_ok}) + newest {rest} (suffix {suffix_ok}); \
         accepted - dropped = {expect_n}; duplicated {}",
        order.len(),
        dropped_new,
        in_lake.len(),
        t.dup_ids
    );
    st.note(t.summary());
    assert!(dropped > 0, "a 200 KiB spool must overflow");
    assert!(
        t.unknown.is_empty() && t.unreadable.is_empty(),
        "{}",
        t.summary()
    );
    assert_eq!(t.dup_ids, 0, "{}", t.summary());
    assert_eq!(
        snap.records.len() as u64,
        expect_n,
        "accepted ({}) must equal arrived ({}) + dropped ({dropped})",
        order.len(),
        snap.records.len()
    );
    assert!(prefix_ok, "the sealed batch should hold the oldest events");
    assert!(
        suffix_ok,
        "apart from the sealed batch, the newest events must survive"
    );
}

// ---------------------------------------------------------- 5. corrupt spool

#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Damage {
    /// Flip bytes inside sled's files.
    #[default]
    FlipBytes,
    /// Cut the last 1% of sled's log (a torn tail, which sled recovers).
    TruncateTail,
    /// Truncate sled's log to 60% of its size.
    TruncateHalf,
    /// Corrupt record values through sled itself (checksums must catch it).
    BadValues,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

fn damage(spool: &Path, how: Damage, rng: &mut harness::payload::Rng) -> String {
    let files = files_under(spool);
    let (biggest, size) = files
        .iter()
        .max_by_key(|(_, s)| *s)
        .cloned()
        .expect("sled files");
    let name = biggest.strip_prefix(spool).unwrap().display().to_string();
    match how {
        Damage::FlipBytes => {
            let mut data = std::fs::read(&biggest).unwrap();
            let n = 16;
            for _ in 0..n {
                let at = (data.len() / 4) + rng.below((data.len() / 2) as u64) as usize;
                data[at] ^= 1 << rng.below(8);
            }
            std::fs::write(&biggest, &data).unwrap();
            format!("flipped {n} bits in the middle half of {name} ({size} B)")
        }
        Damage::TruncateTail | Damage::TruncateHalf => {
            let to = if how == Damage::TruncateTail {
                size * 99 / 100
            } else {
                size * 6 / 10
            };
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&biggest)
                .unwrap();
            f.set_len(to).unwrap();
            format!("truncated {name} from {size} B to {to} B")
        }
        Damage::BadValues => {
            let db = sled::open(spool).expect("open the stopped agent's spool");
            let records = db.open_tree("records/lake").unwrap();
            let n = records.len();
            let mut hit = 0;
            for (i, item) in records.iter().enumerate() {
                let (k, v) = item.unwrap();
                if i % 250 == 7 {
                    let mut bad = v.to_vec();
                    let at = 13 + rng.below((bad.len() - 13) as u64) as usize;
                    bad[at] ^= 0x20;
                    records.insert(k, bad).unwrap();
                    hit += 1;
                }
            }
            let batches = db.open_tree("batches/lake").unwrap();
            let mut bad_batches = 0;
            if let Some((k, v)) = batches.first().unwrap() {
                let mut bad = v.to_vec();
                bad[6] ^= 0x01;
                batches.insert(k, bad).unwrap();
                bad_batches += 1;
            }
            db.flush().unwrap();
            format!(
                "corrupted {hit} of {n} record values and {bad_batches} sealed batch through sled"
            )
        }
    }
}

fn outcome((ok, out, err): &(bool, String, String)) -> String {
    let last = |s: &str| {
        s.lines()
            .filter(|l| !l.trim().is_empty() && !l.contains("RUST_BACKTRACE"))
            .rfind(|l| !l.starts_with("stack backtrace"))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    if *ok {
        format!("ok: {}", last(out))
    } else {
        format!("FAILED: {} {}", last(out), last(err))
    }
}

#[derive(Debug, Default)]
struct CaseResult {
    how: Damage,
    what: String,
    check_ok: bool,
    check_reported: bool,
    repair_ok: bool,
    clean_after_repair: bool,
    stats_ok: bool,
    export_ok: bool,
    exported: usize,
    start_failure: Option<String>,
    served: usize,
    probes_in_s3: bool,
    survived: usize,
    quarantine_files: usize,
    moved_aside: bool,
    records_quarantined: usize,
    batches_quarantined: usize,
    tally: Tally,
}

impl CaseResult {
    fn line(&self, n: usize) -> String {
        let head = format!(
            "corrupt spool {:?}: {}; check ok={} reported={}; repair ok={} clean after={}; stats ok={}; \
             export ok={} ({} records)",
            self.how,
            self.what,
            self.check_ok,
            self.check_reported,
            self.repair_ok,
            self.clean_after_repair,
            self.stats_ok,
            self.export_ok,
            self.exported
        );
        match &self.start_failure {
            Some(e) => format!("{head}; AGENT DID NOT START: {e}"),
            None => format!(
                "{head}; agent started, served {}/20, probes in S3 {}; survived {}/{n} ({:.1}%); \
                 quarantine files {} (spool moved aside {}, records quarantined {}, batches {}); duplicated {}",
                self.served,
                self.probes_in_s3,
                self.survived,
                100.0 * self.survived as f64 / n as f64,
                self.quarantine_files,
                self.moved_aside,
                self.records_quarantined,
                self.batches_quarantined,
                self.tally.dup_ids
            ),
        }
    }
}

/// Events spooled while S3 is down; SIGKILL; damage the spool four ways.
/// Each time the agent must start and keep serving; `silt spool check`
/// reports, `--repair` fixes, `stats` / `export` work on the stopped dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_spool_is_quarantined_and_agent_starts() {
    const N: usize = 3_000;
    let (mut rng, seed) = rng("corrupt");
    let mut st = FStack::start(
        "faults-corrupt",
        StackOpts {
            agent_id: "gw-corrupt",
            max_bytes: "1GiB",
            when_full: "block",
            batch: config::batch(500, "8MiB", "1s"),
            mqtt_topics: &["corrupt/#"],
            s3_down: true,
            proxies: false,
        },
    )
    .await;
    st.note(format!("seed {seed}"));
    let reqs = mixed_requests("cs", N, &["spooled"], 256);
    let (_p, h) = spawn_load(st.http(), reqs, 4, None);
    let rep = h.await.unwrap();
    assert_eq!(rep.acked.len(), N, "{}", rep.summary());
    st.agent
        .wait_log("sink unreachable", harness::deadline(20))
        .await
        .unwrap();
    st.agent.kill9();
    let data = st.agent.data_dir.clone();
    let spool = data.join("spool");
    let pristine = st.scratch.join("pristine-spool");
    copy_dir(&spool, &pristine);
    let (ok, out, err) = silt(&["spool", "stats", "-d", data.to_str().unwrap()]);
    st.note(format!("pristine stats ok={ok}:\n{out}{err}"));
    assert!(
        ok && out.contains("lake"),
        "stats on a stopped agent: {out}{err}"
    );
    let files: Vec<String> = files_under(&spool)
        .iter()
        .map(|(p, s)| format!("{}={s}", p.strip_prefix(&spool).unwrap().display()))
        .collect();
    st.note(format!("sled files: {files:?}"));
    let acked: HashSet<String> = rep.acked.iter().cloned().collect();
    let bucket_dir = st.s3.root.join(&st.s3.bucket);
    let mut results: Vec<CaseResult> = Vec::new();

    for how in [
        Damage::FlipBytes,
        Damage::TruncateTail,
        Damage::TruncateHalf,
        Damage::BadValues,
    ] {
        // Fresh copy of the spool, empty quarantine and bucket.
        let _ = std::fs::remove_dir_all(&spool);
        let _ = std::fs::remove_dir_all(data.join("quarantine"));
        copy_dir(&pristine, &spool);
        if st.s3.is_running() {
            st.s3.stop();
        }
        let _ = std::fs::remove_dir_all(&bucket_dir);
        std::fs::create_dir_all(&bucket_dir).unwrap();
        let what = damage(&spool, how, &mut rng);
        st.note(format!("{how:?}: {what}"));

        let d = data.to_str().unwrap();
        let check = silt(&["spool", "check", "-d", d]);
        let stats = silt(&["spool", "stats", "-d", d]);
        let export = silt(&["spool", "export", "-d", d]);
        let exported = if export.0 {
            export.1.lines().count()
        } else {
            0
        };
        // --repair on a copy, then a clean check.
        let side = st.scratch.join(&format!("repair-{how:?}"));
        copy_dir(&spool, &side.join("spool"));
        let s = side.to_str().unwrap();
        let repair = silt(&["spool", "check", "--repair", "-d", s]);
        let after = silt(&["spool", "check", "-d", s]);
        st.note(format!(
            "{how:?}: check {}; stats {}; export {} ({exported} records); check --repair {}; check after repair {}",
            outcome(&check),
            outcome(&stats),
            outcome(&export),
            outcome(&repair),
            outcome(&after)
        ));
        let mut r = CaseResult {
            how,
            what,
            check_ok: check.0,
            check_reported: check.1.contains("problems"),
            repair_ok: repair.0,
            clean_after_repair: after.0,
            // Succeeds, or (sled-level damage) fails saying so, never panics.
            stats_ok: stats.0 || stats.2.contains("is damaged"),
            export_ok: export.0 || export.2.contains("is damaged"),
            exported,
            ..CaseResult::default()
        };

        // The agent must start on the damaged spool and keep serving.
        st.s3.start_again();
        st.agent.spawn();
        let dl = harness::deadline(60);
        let started = match st.agent.wait_log("http listening", dl).await {
            Ok(()) => st.agent.wait_log("mqtt subscribed", dl).await,
            e => e,
        };
        if let Err(e) = started {
            let log = st.agent.log_run();
            let why: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("panicked") || l.contains("error") || l.contains("tried to"))
                .take(3)
                .collect();
            r.start_failure = Some(format!("{e}: {}", why.join(" | ")));
            if st.agent.is_running() {
                st.agent.kill9();
            }
            println!("{}", r.line(N));
            results.push(r);
            continue;
        }
        let probe: Vec<IngestReq> = (0..20)
            .map(|i| IngestReq::single("after", json_event(&format!("cp{how:?}-{i}"), i, 200)))
            .collect();
        let replies = send_each(&st.http(), &probe).await;
        r.served = replies
            .iter()
            .filter(|r| r.as_ref().is_ok_and(|r| r.status == 202))
            .count();
        let probe_ids: HashSet<String> = ids_of(&probe).into_iter().collect();
        let mut lake = st.lake();
        let (probe_in, _) = wait_lake(
            &mut lake,
            &probe_ids,
            Duration::from_millis(500),
            harness::deadline(60),
            st.t0,
        )
        .await;
        r.probes_in_s3 = probe_in.is_some();
        // Give the rest of the old spool its chance, then stop cleanly.
        let _ = wait_lake(
            &mut lake,
            &acked,
            Duration::from_millis(500),
            harness::deadline(10),
            st.t0,
        )
        .await;
        let log = st.agent.log_run();
        st.stop_agent_cleanly().await;
        let snap = lake.snapshot().await.unwrap();
        let in_lake: HashSet<String> = snap.records.iter().filter_map(|r| r.id()).collect();
        r.survived = acked.iter().filter(|id| in_lake.contains(*id)).count();
        r.quarantine_files = files_under(&data.join("quarantine")).len();
        r.moved_aside = log.contains("moved aside");
        r.records_quarantined = log.matches("corrupt spool record quarantined").count();
        r.batches_quarantined = log.matches("corrupt sealed batch record").count();
        let mut sent = acked.clone();
        sent.extend(probe_ids.iter().cloned());
        r.tally = Tally::compute(&snap, &sent, &probe_ids, &HashSet::new(), |_| false);
        println!("{}", r.line(N));
        results.push(r);
    }
    let mut failures = Vec::new();
    for r in &results {
        let how = r.how;
        if let Some(e) = &r.start_failure {
            failures.push(format!(
                "{how:?}: the agent did not start on the damaged spool: {e}"
            ));
            continue;
        }
        if r.served != 20 || !r.probes_in_s3 {
            failures.push(format!(
                "{how:?}: agent must keep serving: {}/20 accepted, in S3 {}",
                r.served, r.probes_in_s3
            ));
        }
        if !r.tally.unknown.is_empty() || !r.tally.unreadable.is_empty() || r.tally.dup_ids > 0 {
            failures.push(format!("{how:?}: {}", r.tally.summary()));
        }
        if !r.stats_ok || !r.export_ok {
            failures.push(format!(
                "{how:?}: spool stats / export fail on a stopped agent's spool"
            ));
        }
        if !r.check_ok && (!r.repair_ok || !r.clean_after_repair) {
            failures.push(format!(
                "{how:?}: check found problems that --repair did not fix"
            ));
        }
        if how == Damage::BadValues {
            if r.check_ok || !r.check_reported {
                failures.push(format!("{how:?}: check must report the corrupt values"));
            }
            if r.quarantine_files == 0 {
                failures.push(format!("{how:?}: corrupt values must be quarantined"));
            }
            if r.survived < N * 9 / 10 {
                failures.push(format!(
                    "{how:?}: intact records must survive ({}/{N})",
                    r.survived
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "corrupt spool:\n  {}",
        failures.join("\n  ")
    );
}
