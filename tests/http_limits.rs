//! What a hostile or broken HTTP client can hold: 1,500 slow connections
//! are cut within the source's timeouts while a normal client still gets
//! 202, and a chunked media upload stops at `spool.min_free`.

mod harness;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use harness::http::{HttpClient, IngestReq};
use harness::media::{Bucket, media_files, media_source, mib, proc_status_bytes, put_chunked};
use harness::payload::json_event;
use harness::tmpfs::tmpfs_or_skip;
use harness::{Agent, S3Server, Scratch, config, deadline, free_port, note};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SLOW_CLIENTS: usize = 1_500;
const MAX_CONNECTIONS: usize = 512;
const HEADER_TIMEOUT_S: u64 = 2;
const BODY_IDLE_S: u64 = 3;
/// The documented bound on what 1,500 slow clients may cost (README).
const RSS_BOUND_MIB: u64 = 64;

/// Lets this process (and the agent it starts) open more sockets than
/// the usual soft limit of 1,024, so the agent's own cap is what is tested.
fn raise_open_files(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = want.min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// How a slow client behaves.
#[derive(Clone, Copy)]
enum Slow {
    /// Half a request line, then silence.
    HalfLine,
    /// A head declaring a 10 MB body, then a byte every 500 ms.
    Trickle,
}

/// Runs one slow client until the server closes on it (or `give_up`);
/// returns how long the connection lived, None if the agent never closed it.
async fn slow_client(port: u16, kind: Slow, give_up: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let head = match kind {
        Slow::HalfLine => "POST /v1/ingest/rea".to_string(),
        Slow::Trickle => format!(
            "POST /v1/ingest/readings HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
        ),
    };
    if s.write_all(head.as_bytes()).await.is_err() {
        return Some(t.elapsed());
    }
    let (mut rd, mut wr) = s.split();
    let mut buf = [0u8; 4096];
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => match n {
                Ok(0) | Err(_) => return Some(t.elapsed()),
                Ok(_) => continue,
            },
            _ = tick.tick(), if matches!(kind, Slow::Trickle) => {
                if wr.write_all(b" ").await.is_err() {
                    return Some(t.elapsed());
                }
            }
            _ = tokio::time::sleep(give_up.saturating_sub(t.elapsed())) => return None,
        }
    }
}

/// 1,500 connections, half stopping midway through the request line, half
/// trickling a 10 MB body a byte at a time, against `header_timeout = 2s`,
/// `body_idle_timeout = 3s` and `max_connections = 512`: the agent never
/// holds more than its cap of connections, closes every slow one within
/// its timeouts (those over the cap at once, with 503), stays within a
/// memory bound, and a normal client retrying on 503 gets its 202.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_and_a_normal_client_gets_through() {
    raise_open_files(8192);
    let t0 = Instant::now();
    let scratch = Scratch::new("http-slow-clients");
    let s3 = S3Server::start(scratch.path(), "telemetry");
    let (port, api) = (free_port(), free_port());
    let cfg = config::agent_with_api("gw-slow", api, "5m")
        + config::http_source("api", port, None, "16MiB").trim_end()
        + &format!(
            "\nheader_timeout = \"{HEADER_TIMEOUT_S}s\"\nbody_idle_timeout = \"{BODY_IDLE_S}s\"\n\
             max_connections = {MAX_CONNECTIONS}\n\n"
        )
        + &config::s3_sink(
            "lake",
            &["api"],
            &s3,
            "gzip",
            &config::batch(100, "4MiB", "1s"),
        );
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;
    let pid = agent.pid().expect("agent runs");
    let idle_rss = proc_status_bytes(pid, "VmRSS").unwrap_or(0);
    let idle_fds = open_fds(pid);

    let give_up = Duration::from_secs(40);
    let clients: Vec<_> = (0..SLOW_CLIENTS)
        .map(|i| {
            let kind = if i % 2 == 0 {
                Slow::HalfLine
            } else {
                Slow::Trickle
            };
            tokio::spawn(slow_client(port, kind, give_up))
        })
        .collect();
    let peak_fds = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak_fds = peak_fds.clone();
        tokio::spawn(async move {
            loop {
                peak_fds.fetch_max(open_fds(pid) as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    note(t0, format!("{SLOW_CLIENTS} slow clients started"));

    // A normal client, while the slow ones hold every slot: 503 (or a
    // closed connection) until a slot frees, then 202.
    let client = HttpClient::new(port, None);
    let req = IngestReq::single("readings", json_event("normal-1", 1, 200));
    let started = Instant::now();
    let (mut busy, end) = (0, deadline(30));
    loop {
        match client.ingest(&req).await {
            Ok(r) if r.status == 202 => break,
            Ok(r) if r.status == 503 => busy += 1,
            Ok(r) => panic!("normal client: unexpected {} {}", r.status, r.body),
            Err(_) => busy += 1,
        }
        assert!(Instant::now() < end, "the normal client got no 202 in 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    note(
        t0,
        format!(
            "normal client: 202 after {:?} ({busy} refused tries)",
            started.elapsed()
        ),
    );

    let mut lived = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        match c.await.unwrap() {
            Some(d) => lived.push((i, d)),
            None => panic!("slow client {i} was still open after {give_up:?}"),
        }
    }
    sampler.abort();
    let longest = |kind: usize| {
        lived
            .iter()
            .filter(|(i, _)| i % 2 == kind)
            .map(|(_, d)| *d)
            .max()
            .unwrap_or_default()
    };
    let (half_line, trickle) = (longest(0), longest(1));
    let peak_rss = proc_status_bytes(pid, "VmHWM")
        .unwrap_or(0)
        .saturating_sub(idle_rss);
    let peak_fds = peak_fds.load(Ordering::Relaxed) as usize;
    note(
        t0,
        format!(
            "all {SLOW_CLIENTS} closed; longest half-line {half_line:?}, longest trickle \
             {trickle:?}; peak fds {peak_fds} (idle {idle_fds}); peak RSS above idle {:.1} MiB",
            mib(peak_rss)
        ),
    );
    // Slack: the client's own scheduling of 1,500 tasks on two cores.
    let slack = Duration::from_secs(4);
    assert!(
        half_line <= Duration::from_secs(HEADER_TIMEOUT_S) + slack,
        "a half request line lived {half_line:?}; header_timeout is {HEADER_TIMEOUT_S} s"
    );
    assert!(
        trickle <= Duration::from_secs(BODY_IDLE_S) + slack,
        "a trickling body lived {trickle:?}; body_idle_timeout is {BODY_IDLE_S} s at 1 KiB/s"
    );
    assert!(
        peak_fds <= idle_fds + MAX_CONNECTIONS + 8,
        "the agent held {peak_fds} file descriptors (idle {idle_fds}, max_connections {MAX_CONNECTIONS})"
    );
    assert!(
        peak_rss <= RSS_BOUND_MIB << 20,
        "1,500 slow clients cost {:.1} MiB of RSS; the README promises at most {RSS_BOUND_MIB} MiB",
        mib(peak_rss)
    );
    let metrics = harness::http::get(&format!("http://127.0.0.1:{api}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refused: u64 = metrics
        .lines()
        .find(|l| l.starts_with("silt_http_connections_refused_total{source=\"api\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no refused-connections counter in /metrics"));
    assert!(refused > 0, "connections over the cap are counted");

    let ids: HashSet<String> = ["normal-1".to_string()].into();
    let snap = harness::S3Lake::new(&s3)
        .wait_for(&ids, deadline(30), t0)
        .await
        .unwrap();
    assert_eq!(
        snap.records.len(),
        1,
        "only the normal client's event is stored"
    );
    let status = agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(status.success(), "silt must exit 0, got {status}");
}

/// Bytes free to unprivileged users on the filesystem of `dir`.
fn free_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs fills the zeroed struct; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(path.as_ptr(), &mut st), 0);
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

/// A chunked media upload (no Content-Length, so nothing to check up front)
/// into a data_dir on a 64 MiB tmpfs with `min_free = "40MiB"`: it is cut
/// with 507 before free space falls under the floor (sampled every 5 ms
/// while it streams) and leaves no file;
/// a small upload afterwards is stored and reaches S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upload_stops_at_min_free_and_leaves_nothing() {
    let t0 = Instant::now();
    let scratch = Scratch::new("http-chunked-floor");
    let Some(disk) = tmpfs_or_skip(&scratch.join("disk"), "64m") else {
        return;
    };
    let s3 = S3Server::start(scratch.path(), "media-lake");
    let port = free_port();
    let cfg = config::agent("gw-floor").replace(
        "when_full = \"block\"",
        "when_full = \"block\"\nmin_free = \"40MiB\"",
    ) + &media_source("cam", port, None, None)
        + &harness::media::raw_sink("media", &["cam"], &s3.endpoint(), &s3.bucket, "8MiB", &[]);
    let data_dir = disk.0.join("data");
    let cfg = cfg.replace("{data_dir}", &data_dir.display().to_string());
    let mut agent = Agent::start(&scratch.join("agent"), &cfg);
    agent
        .wait_ready(&[("http listening", 1), ("silt running", 1)], 60)
        .await;

    let within = Duration::from_secs(60);
    let lowest_free = Arc::new(AtomicU64::new(u64::MAX));
    let sampler = {
        let (lowest_free, dir) = (lowest_free.clone(), data_dir.clone());
        tokio::spawn(async move {
            loop {
                lowest_free.fetch_min(free_bytes(&dir), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let big = put_chunked(port, None, "/v1/media/cam/big.bin", 48 << 20, 1, within).await;
    sampler.abort();
    let lowest_free = lowest_free.load(Ordering::Relaxed);
    note(
        t0,
        format!(
            "48 MiB chunked upload: {big:?}; lowest free space {:.1} MiB",
            mib(lowest_free)
        ),
    );
    assert!(
        lowest_free >= 40 << 20,
        "free space fell to {:.1} MiB during the upload; min_free is 40 MiB",
        mib(lowest_free)
    );
    agent
        .wait_log("media upload refused midway", deadline(30))
        .await
        .unwrap();
    // The client may see the reset of its unsent bytes before the reply.
    assert!(
        big.status.is_none_or(|s| s == 507),
        "an upload crossing min_free is answered 507: {big:?}"
    );
    assert!(
        media_files(&data_dir).is_empty(),
        "a refused upload leaves no file: {:?}",
        media_files(&data_dir)
    );

    let small = put_chunked(port, None, "/v1/media/cam/small.bin", 1 << 20, 2, within).await;
    assert_eq!(
        small.status,
        Some(201),
        "a small upload still fits: {small:?}"
    );
    let bucket = Bucket::new(&s3);
    let end = deadline(30);
    let objects = loop {
        let objects = bucket.list("").await.unwrap_or_default();
        if !objects.is_empty() || Instant::now() >= end {
            break objects;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(objects.len(), 1, "only the small upload lands: {objects:?}");
    assert!(objects[0].0.ends_with("-small.bin"), "{objects:?}");
    let status = agent.sigterm_and_wait(Duration::from_secs(60)).await;
    assert!(status.success(), "silt must exit 0, got {status}");
}
