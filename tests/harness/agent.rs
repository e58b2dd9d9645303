//! The `silt` binary under test, run as a child process.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::procs::{signal, terminate};
use super::strip_ansi;

/// Path of the freshly built `silt` binary.
pub fn silt_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_silt"))
}

/// Runs `silt ARGS` to completion (for `check` / `--version`).
pub fn silt_output(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(silt_bin());
    cmd.args(args).env("NO_COLOR", "1").stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run silt")
}

pub struct Agent {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    /// Byte offset of the log file where the current run started.
    run_offset: u64,
    pub runs: usize,
    extra_env: Vec<(String, String)>,
}

impl Agent {
    /// Writes `config` to `dir/silt.toml` and starts `silt run -c` on it.
    /// `{data_dir}` in `config` is replaced by `dir/data`.
    pub fn start(dir: &Path, config: &str) -> Agent {
        Self::start_with_env(dir, config, &[])
    }

    pub fn start_with_env(dir: &Path, config: &str, env: &[(&str, &str)]) -> Agent {
        fs::create_dir_all(dir).unwrap();
        let data_dir = dir.join("data");
        let config_path = dir.join("silt.toml");
        fs::write(
            &config_path,
            config.replace("{data_dir}", &data_dir.display().to_string()),
        )
        .unwrap();
        let mut a = Agent {
            dir: dir.to_path_buf(),
            config: config_path,
            data_dir,
            log: dir.join("agent.log"),
            child: None,
            run_offset: 0,
            runs: 0,
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        a.spawn();
        a
    }

    /// (Re)starts the process with the same config and data dir.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        self.runs += 1;
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        use std::io::Write;
        writeln!(log, "===== harness: starting silt run #{} =====", self.runs).unwrap();
        self.run_offset = log.metadata().unwrap().len();
        let mut cmd = Command::new(silt_bin());
        cmd.arg("run")
            .arg("-c")
            .arg(&self.config)
            .env(
                "SILT_LOG",
                std::env::var("SILT_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn silt"));
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whole log (all runs), ANSI stripped.
    pub fn log_all(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(
            &fs::read(&self.log).unwrap_or_default(),
        ))
    }

    /// Log of the current (or last) run, ANSI stripped.
    pub fn log_run(&self) -> String {
        let bytes = fs::read(&self.log).unwrap_or_default();
        let from = (self.run_offset as usize).min(bytes.len());
        strip_ansi(&String::from_utf8_lossy(&bytes[from..]))
    }

    /// Occurrences of `needle` in the current run's log.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log_run()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until `needle` appears at least `n` times in the current run's
    /// log. Fails early if the process exits.
    pub async fn wait_log_n(
        &mut self,
        needle: &str,
        n: usize,
        deadline: Instant,
    ) -> Result<(), String> {
        loop {
            let c = self.count_log(needle);
            if c >= n {
                return Ok(());
            }
            if let Some(st) = self.try_exit() {
                return Err(format!(
                    "silt exited ({st}) while waiting for {n}x {needle:?} (saw {c})"
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "timed out waiting for {n}x {needle:?} in the agent log (saw {c})"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_log(&mut self, needle: &str, deadline: Instant) -> Result<(), String> {
        self.wait_log_n(needle, 1, deadline).await
    }

    /// Panicking variant of [`Agent::wait_log`] used right after start-up.
    pub async fn wait_ready(&mut self, needles: &[(&str, usize)], secs: u64) {
        let dl = Instant::now() + Duration::from_secs(secs);
        for (n, k) in needles {
            if let Err(e) = self.wait_log_n(n, *k, dl).await {
                panic!("agent not ready: {e}");
            }
        }
    }

    /// Waits for the start-up of the usual MQTT + HTTP stack.
    pub async fn wait_stack_up(&mut self) {
        let up = [
            ("mqtt subscribed", 1),
            ("http listening", 1),
            ("silt running", 1),
        ];
        self.wait_ready(&up, 60).await;
    }

    /// Sum of `records=N` over `uploaded object` lines of all runs.
    pub fn uploaded_records(&self) -> u64 {
        uploaded_records_in(&self.log_all())
    }

    /// Sum of `records=N` over `uploaded object` lines of the current run.
    pub fn uploaded_records_this_run(&self) -> u64 {
        uploaded_records_in(&self.log_run())
    }

    /// Exit status if the process has exited (reaps it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(st)
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            None => false,
            Some(c) => matches!(c.try_wait(), Ok(None)),
        }
    }

    /// SIGTERM and wait up to `timeout` for the exit; SIGKILLs and panics on timeout.
    pub async fn sigterm_and_wait(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("agent not running");
        signal(&child, libc::SIGTERM);
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st;
            }
            if Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                panic!("silt did not exit within {timeout:?} after SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL (no chance to flush) and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Prints the log to stderr: runs of lines that differ only in their
    /// timestamp are collapsed, then the last `max_lines` are shown.
    pub fn dump_log(&self, max_lines: usize) {
        let all = self.log_all();
        let mut lines: Vec<String> = Vec::new();
        let mut prev_key = String::new();
        let mut repeats = 0usize;
        for l in all.lines() {
            // `2026-11-24T06:10:01.943412Z  WARN ...`: drop the timestamp and
            // ignore retry_in=… so retry loops collapse into one line.
            let body = l
                .split_once(' ')
                .map(|(ts, rest)| if ts.ends_with('Z') { rest } else { l })
                .unwrap_or(l);
            let key: String = body
                .split(' ')
                .filter(|w| !w.starts_with("retry_in="))
                .collect::<Vec<_>>()
                .join(" ");
            if key == prev_key {
                repeats += 1;
                continue;
            }
            if repeats > 0 {
                lines.push(format!(
                    "    ... previous line repeated {repeats} more times"
                ));
            }
            repeats = 0;
            prev_key = key;
            lines.push(l.to_string());
        }
        if repeats > 0 {
            lines.push(format!(
                "    ... previous line repeated {repeats} more times"
            ));
        }
        let from = lines.len().saturating_sub(max_lines);
        eprintln!(
            "----- silt log ({}; last {} of {} collapsed lines) -----\n{}\n----- end of silt log -----",
            self.log.display(),
            lines.len() - from,
            lines.len(),
            lines[from..].join("\n")
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, Duration::from_millis(200));
        }
        if std::thread::panicking() {
            self.dump_log(150);
        }
    }
}

/// Value of `name=value` in a tracing text log line (quotes stripped).
fn uploaded_records_in(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("uploaded object"))
        .filter_map(|l| field(l, "records").and_then(|v| v.parse::<u64>().ok()))
        .sum()
}

pub fn field(line: &str, name: &str) -> Option<String> {
    let pat = format!("{name}=");
    let mut search = 0;
    while let Some(pos) = line[search..].find(&pat) {
        let at = search + pos;
        let boundary = at == 0
            || !line.as_bytes()[at - 1].is_ascii_alphanumeric() && line.as_bytes()[at - 1] != b'_';
        if boundary {
            let rest = &line[at + pat.len()..];
            let v = if let Some(r) = rest.strip_prefix('"') {
                r.split('"').next().unwrap_or("")
            } else {
                rest.split(|c: char| c.is_whitespace() || c == ',' || c == '}')
                    .next()
                    .unwrap_or("")
            };
            return Some(v.to_string());
        }
        search = at + pat.len();
    }
    None
}
