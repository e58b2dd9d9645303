//! External servers the tests run against: mosquitto and s3s-fs.
//!
//! Both can be stopped and restarted on the same port (and the same data
//! directory), and are killed by PID when dropped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, port_open, wait_until_blocking};

pub const S3_ACCESS_KEY: &str = "silt-test-key";
pub const S3_SECRET_KEY: &str = "silt-test-secret";
pub const S3_REGION: &str = "us-east-1";

/// Sends a signal to a child by PID.
pub fn signal(child: &Child, sig: i32) {
    // SAFETY: plain kill(2) on a PID we spawned and have not reaped yet.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL. Returns whether it exited by itself.
pub fn terminate(child: &mut Child, grace: Duration) -> bool {
    if let Ok(Some(_)) = child.try_wait() {
        return true;
    }
    signal(child, libc::SIGTERM);
    let end = Instant::now() + grace;
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

fn tail(path: &Path, max_lines: usize) -> String {
    let text = fs::read_to_string(path)
        .unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(max_lines);
    lines[from..].join("\n")
}

/// Where `.ci/run` caches test tools: `${SILT_TOOLS:-$HOME/.cache/silt/tools}`.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("SILT_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/silt/tools")
        })
}

/// Finds an executable: env var override, then extra candidates, then PATH.
pub fn find_exe(env: &str, name: &str, extra: &[PathBuf]) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    for c in extra {
        if c.is_file() {
            return c.clone();
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&paths) {
            let c = d.join(name);
            if c.is_file() {
                return c;
            }
        }
    }
    panic!("{name} not found: set {env}, or install it (see .ci/run)");
}

// ---------------------------------------------------------------- mosquitto

pub struct Mosquitto {
    pub port: u16,
    started: bool,
    dir: PathBuf,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Appended to the config: more listeners and their options.
    extra: String,
}

impl Mosquitto {
    /// Starts mosquitto on a free loopback port with persistence under `dir`.
    pub fn start(dir: &Path) -> Mosquitto {
        Mosquitto::start_with(dir, "")
    }

    /// [`Mosquitto::start`] with `extra` appended to its config, e.g. a
    /// TLS listener (options after a `listener` line belong to it).
    pub fn start_with(dir: &Path, extra: &str) -> Mosquitto {
        let dir = dir.to_path_buf();
        fs::create_dir_all(dir.join("persist")).unwrap();
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        let log = dir.join("mosquitto.log");
        let mut m = Mosquitto {
            port,
            dir,
            conf,
            log,
            child: None,
            started: false,
            extra: extra.to_string(),
        };
        m.write_conf();
        m.spawn();
        m
    }

    fn write_conf(&self) {
        let (port, dir, log, conf) = (self.port, &self.dir, &self.log, &self.conf);
        // Running as root, mosquitto drops to user `mosquitto`, which cannot
        // write into our 0700 temp dirs; keep it as root in that case.
        let is_root = unsafe { libc::geteuid() } == 0;
        let text = format!(
            "listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             persistence true\n\
             persistence_location {}/\n\
             autosave_interval 1\n\
             max_inflight_messages 1000\n\
             max_queued_messages 0\n\
             max_queued_bytes 0\n\
             set_tcp_nodelay true\n\
             log_dest file {}\n\
             log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
             connection_messages true\n\
             log_timestamp_format %H:%M:%S\n\
             {}{}",
            dir.join("persist").display(),
            log.display(),
            if is_root { "user root\n" } else { "" },
            self.extra,
        );
        fs::write(conf, text).unwrap();
    }

    fn exe() -> PathBuf {
        find_exe(
            "SILT_MOSQUITTO",
            "mosquitto",
            &[PathBuf::from("/usr/sbin/mosquitto")],
        )
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "mosquitto already running");
        // The port may still be held briefly after a stop; retry a few times.
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let mut child = Command::new(Self::exe())
                .arg("-c")
                .arg(&self.conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn mosquitto");
            let ok = wait_until_blocking(
                Instant::now() + Duration::from_secs(10),
                "mosquitto port",
                || port_open(self.port) || matches!(child.try_wait(), Ok(Some(_))),
            );
            if ok.is_ok() && matches!(child.try_wait(), Ok(None)) {
                self.child = Some(child);
                self.started = true;
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            if !self.started {
                // First start: the free port may have been taken meanwhile.
                self.port = free_port();
                self.write_conf();
            }
            if Instant::now() > end {
                panic!(
                    "mosquitto did not start on port {}; log tail:\n{}",
                    self.port,
                    tail(&self.log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_secs(10));
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Restarts without the saved state: every client session (and what
    /// was in flight in it) is gone, as after a restart of a broker that
    /// runs without persistence.
    pub fn restart_forgetting_sessions(&mut self) {
        self.stop();
        let persist = self.dir.join("persist");
        fs::remove_dir_all(&persist).unwrap();
        fs::create_dir_all(&persist).unwrap();
        self.spawn();
    }

    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- mosquitto log tail ({}) -----\n{}",
                self.log.display(),
                tail(&self.log, 40)
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------- s3s-fs

pub struct S3Server {
    pub port: u16,
    pub root: PathBuf,
    pub bucket: String,
    log: PathBuf,
    child: Option<Child>,
    pub starts: usize,
}

impl S3Server {
    /// s3s-fs binary: `SILT_S3S_FS`, then `${SILT_TOOLS:-$HOME/.cache/silt/tools}/bin/s3s-fs`, then PATH.
    pub fn exe() -> PathBuf {
        find_exe("SILT_S3S_FS", "s3s-fs", &[tools_dir().join("bin/s3s-fs")])
    }

    /// Starts s3s-fs on a free port, serving `dir/s3root`, with bucket `bucket`
    /// (with s3s-fs a bucket is a directory under the root).
    pub fn start(dir: &Path, bucket: &str) -> S3Server {
        let root = dir.join("s3root");
        fs::create_dir_all(root.join(bucket)).unwrap();
        let mut s = S3Server {
            port: free_port(),
            root,
            bucket: bucket.to_string(),
            log: dir.join("s3s-fs.log"),
            child: None,
            starts: 0,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "s3s-fs already running");
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            let log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .unwrap();
            let mut child = Command::new(Self::exe())
                .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
                .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
                .arg(&self.root)
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn s3s-fs");
            let ok = wait_until_blocking(
                Instant::now() + Duration::from_secs(10),
                "s3s-fs port",
                || port_open(self.port) || matches!(child.try_wait(), Ok(Some(_))),
            );
            if ok.is_ok() && matches!(child.try_wait(), Ok(None)) {
                self.child = Some(child);
                self.starts += 1;
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            if self.starts == 0 {
                // First start: the free port may have been taken meanwhile.
                self.port = free_port();
            }
            if Instant::now() > end {
                panic!(
                    "s3s-fs did not start on port {}; log tail:\n{}",
                    self.port,
                    tail(&self.log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Hard stop (SIGKILL): the server vanishes as in a network outage.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_again(&mut self) {
        self.spawn();
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- s3s-fs log tail ({}) -----\n{}",
                self.log.display(),
                tail(&self.log, 20)
            );
        }
        self.stop();
    }
}
