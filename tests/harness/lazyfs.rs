//! LazyFS (a FUSE filesystem that keeps written data in its own cache until
//! it is fsynced) mounted over a real directory, to simulate power cuts.
//!
//! `lazyfs::clear-cache` drops everything not fsynced, which is what a power
//! cut does to a disk; `torn-op` / `torn-seq` persist only parts of the next
//! write(s) to a file and then kill LazyFS. Unmounting drops the cache too, so
//! mounting a new LazyFS over the same root is the reboot.
//!
//! The binary comes from `SILT_LAZYFS` or from where
//! `../shared/tools/lazyfs/build.sh` caches it
//! (`${SILT_TOOLS:-~/.cache/silt/tools}/lazyfs/lazyfs/build/lazyfs`). See
//! `/work/shared/tools/lazyfs/README.md` for the commands.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::procs::tools_dir;
use super::strip_ansi;

/// LazyFS reads its FIFO in chunks of 100 bytes (the last one is replaced by
/// NUL): a command must fit in one read, newline included.
const MAX_COMMAND: usize = 99;

/// `../shared/tools/lazyfs` next to the checkout.
pub fn shared_tools() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/lazyfs")
}

/// `fusermount3`, from PATH or the usual places.
fn fusermount() -> Option<PathBuf> {
    let mut cands = vec![
        PathBuf::from("/usr/bin/fusermount3"),
        PathBuf::from("/bin/fusermount3"),
    ];
    if let Some(paths) = std::env::var_os("PATH") {
        cands.extend(std::env::split_paths(&paths).map(|d| d.join("fusermount3")));
    }
    cands.into_iter().find(|c| c.is_file())
}

/// The LazyFS binary, or why LazyFS cannot run here.
pub fn availability() -> Result<PathBuf, String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (LazyFS mounts need root)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("no /dev/fuse".into());
    }
    if fusermount().is_none() {
        return Err("no fusermount3 (apt: fuse3)".into());
    }
    if let Some(p) = std::env::var_os("SILT_LAZYFS") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("SILT_LAZYFS={} is not a file", p.display()))
        };
    }
    let built = tools_dir().join("lazyfs/lazyfs/build/lazyfs");
    if built.is_file() {
        return Ok(built);
    }
    let tools = shared_tools();
    if !tools.join("build.sh").is_file() {
        return Err(format!(
            "no {} (LazyFS source and build script) and SILT_LAZYFS not set",
            tools.display()
        ));
    }
    Err(format!(
        "LazyFS not built: run `bash ../shared/tools/lazyfs/build.sh` from the checkout \
         (or .ci/run), or set SILT_LAZYFS; looked for {}",
        built.display()
    ))
}

/// True when the `CI` environment variable says this is a CI run.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// The LazyFS binary; `None` after printing a SKIP line when LazyFS cannot
/// run here. Under `CI=true` a missing LazyFS fails the test instead.
pub fn binary_or_skip(test: &str) -> Option<PathBuf> {
    match availability() {
        Ok(p) => Some(p),
        Err(why) => {
            assert!(
                !under_ci(),
                "{test}: LazyFS cannot run, and CI=true does not allow skipping: {why}"
            );
            // Straight to stderr, past the test harness's capture, so the
            // skip shows in a plain `cargo test` run.
            let line = format!("SKIP {test}: LazyFS cannot run here: {why}\n");
            let _ = std::io::stderr().write_all(line.as_bytes());
            None
        }
    }
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == want))
}

/// One LazyFS mount over `root` at `mnt`, both under the directory given to
/// [`LazyFs::mount`], with its FIFO, config and log beside them. Dropping it
/// unmounts (also when the test panics) and stops the process.
pub struct LazyFs {
    bin: PathBuf,
    dir: PathBuf,
    /// The real directory; what survives a power cut is here.
    pub root: PathBuf,
    /// The mount point; the program under test works in here.
    pub mnt: PathBuf,
    fifo: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    /// Exit status of the last LazyFS process, once it ended.
    pub exited: Option<ExitStatus>,
    /// Byte offset in `log` where the current mount's output starts.
    run_offset: u64,
    pub mounts: usize,
}

impl LazyFs {
    /// Creates `dir/root` and `dir/mnt` and mounts LazyFS over them.
    pub fn mount(bin: &Path, dir: &Path) -> Result<LazyFs, String> {
        fs::create_dir_all(dir.join("root")).map_err(|e| format!("mkdir root: {e}"))?;
        fs::create_dir_all(dir.join("mnt")).map_err(|e| format!("mkdir mnt: {e}"))?;
        // The subdir module prefixes every path with `root` as given, and the
        // torn faults compare those strings: use the canonical path.
        let dir = fs::canonicalize(dir).map_err(|e| format!("canonicalize: {e}"))?;
        let root = dir.join("root");
        let mnt = dir.join("mnt");
        for p in [&root, &mnt] {
            let s = p.to_string_lossy();
            if s.contains(',') || s.contains(' ') {
                return Err(format!(
                    "{s}: LazyFS mount paths must not contain , or space"
                ));
            }
        }
        let fifo = dir.join("faults.fifo");
        // Relative on purpose: LazyFS ignores a --config-path that contains
        // "-o" anywhere (case-insensitively), which a temp dir name may.
        let config = "lazyfs.toml";
        fs::write(
            dir.join(config),
            format!(
                "[faults]\nfifo_path=\"{}\"\n\n[cache]\napply_eviction=false\n\n\
                 [cache.simple]\ncustom_size=\"256mb\"\nblocks_per_page=1\n\n\
                 [filesystem]\nlog_all_operations=false\nlogfile=\"\"\n",
                fifo.display()
            ),
        )
        .map_err(|e| format!("write LazyFS config: {e}"))?;
        let mut lz = LazyFs {
            bin: bin.to_path_buf(),
            log: dir.join("lazyfs.log"),
            dir,
            root,
            mnt,
            fifo,
            child: None,
            exited: None,
            run_offset: 0,
            mounts: 0,
        };
        lz.spawn()?;
        Ok(lz)
    }

    fn spawn(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "LazyFS already running");
        if is_mount_point(&self.mnt) {
            return Err(format!("{} is still mounted", self.mnt.display()));
        }
        self.mounts += 1;
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("open {}: {e}", self.log.display()))?;
        writeln!(log, "===== harness: mount #{} =====", self.mounts).unwrap();
        self.run_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let child = Command::new(&self.bin)
            .current_dir(&self.dir)
            .arg(&self.mnt)
            .args(["--config-path", "lazyfs.toml"])
            .arg("-o")
            .arg(format!(
                "allow_other,modules=subdir,subdir={}",
                self.root.display()
            ))
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        self.exited = None;
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if self.log_run().contains("waiting for fault commands") && is_mount_point(&self.mnt) {
                return Ok(());
            }
            if let Some(st) = self.try_exit() {
                return Err(format!(
                    "LazyFS exited ({st}) before it was mounted; log:\n{}",
                    self.log_tail(30)
                ));
            }
            if Instant::now() > end {
                return Err(format!(
                    "LazyFS not mounted at {} after 60 s; log:\n{}",
                    self.mnt.display(),
                    self.log_tail(30)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Log of the current mount, ANSI stripped.
    pub fn log_run(&self) -> String {
        let bytes = fs::read(&self.log).unwrap_or_default();
        let from = (self.run_offset as usize).min(bytes.len());
        strip_ansi(&String::from_utf8_lossy(&bytes[from..]))
    }

    pub fn log_tail(&self, n: usize) -> String {
        let all = strip_ansi(&String::from_utf8_lossy(
            &fs::read(&self.log).unwrap_or_default(),
        ));
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Exit status once the LazyFS process has ended (reaps it).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(st)) = c.try_wait()
        {
            self.child = None;
            self.exited = Some(st);
        }
        if self.child.is_none() {
            self.exited
        } else {
            None
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none() && self.child.is_some()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Writes one command to the FIFO and waits until the log of this mount
    /// shows one of `ok` after it (Err on one of `bad`, on exit, or after `timeout`).
    pub fn command(
        &mut self,
        cmd: &str,
        ok: &[&str],
        bad: &[&str],
        timeout: Duration,
    ) -> Result<(), String> {
        if cmd.len() > MAX_COMMAND - 1 {
            return Err(format!(
                "LazyFS command is {} bytes, more than its FIFO reads at once ({}): {cmd:?}; \
                 use a shorter SILT_TEST_TMP",
                cmd.len(),
                MAX_COMMAND - 1
            ));
        }
        if !self.is_running() {
            return Err(format!("LazyFS is not running (command {cmd:?})"));
        }
        let before = self.log_run().len();
        // Non-blocking: with no reader (LazyFS gone) open fails instead of hanging.
        let mut f = fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.fifo)
            .map_err(|e| format!("open FIFO {}: {e}", self.fifo.display()))?;
        f.write_all(format!("{cmd}\n").as_bytes())
            .map_err(|e| format!("write {cmd:?} to the FIFO: {e}"))?;
        drop(f);
        let end = Instant::now() + timeout;
        loop {
            let log = self.log_run();
            let new = &log[before.min(log.len())..];
            if ok.iter().any(|o| new.contains(o)) {
                return Ok(());
            }
            if let Some(b) = bad.iter().find(|b| new.contains(*b)) {
                return Err(format!("LazyFS refused {cmd:?} ({b}); log:\n{new}"));
            }
            if let Some(st) = self.try_exit() {
                return Err(format!(
                    "LazyFS exited ({st}) after {cmd:?}; log:\n{}",
                    self.log_tail(20)
                ));
            }
            if Instant::now() > end {
                return Err(format!(
                    "LazyFS did not answer {cmd:?} with one of {ok:?} within {timeout:?}; log:\n{new}"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The power cut: drop every byte not fsynced.
    pub fn clear_cache(&mut self) -> Result<(), String> {
        self.command(
            "lazyfs::clear-cache",
            &["cache is cleared"],
            &[],
            Duration::from_secs(30),
        )
    }

    /// Files with unsynced data, as LazyFS reports them (for diagnostics).
    pub fn unsynced_report(&mut self) -> Result<String, String> {
        let before = self.log_run().len();
        self.command(
            "lazyfs::unsynced-data-report",
            &[
                "all data blocks are synced",
                "total number of bytes un-fsynced",
            ],
            &[],
            Duration::from_secs(10),
        )?;
        let log = self.log_run();
        Ok(log[before.min(log.len())..].to_string())
    }

    /// Path of `rel` (relative to the mount) as LazyFS names it in faults.
    pub fn fault_path(&self, rel: &str) -> String {
        self.root.join(rel).display().to_string()
    }

    /// Arms a torn write: the next write to `rel` (relative to the mount) is
    /// cut into `parts` equal parts, only those in `persist` (1-based) reach
    /// the root, then LazyFS kills itself, dropping its cache.
    pub fn torn_op(&mut self, rel: &str, parts: u32, persist: &[u32]) -> Result<(), String> {
        let cmd = format!(
            "lazyfs::torn-op::file={}::parts={parts}::persist={}",
            self.fault_path(rel),
            join(persist)
        );
        self.command(
            &cmd,
            &["configured successfully"],
            &["INVALID torn-op"],
            Duration::from_secs(10),
        )
    }

    /// Arms a torn sequence: of the next group of writes to `rel` between two
    /// fsyncs, only the `persist` ones (1-based) reach the root; LazyFS kills
    /// itself after the last of them.
    pub fn torn_seq(&mut self, rel: &str, persist: &[u32]) -> Result<(), String> {
        let cmd = format!(
            "lazyfs::torn-seq::op=write::file={}::persist={}",
            self.fault_path(rel),
            join(persist)
        );
        self.command(
            &cmd,
            &["configured successfully"],
            &["INVALID torn-seq"],
            Duration::from_secs(10),
        )
    }

    fn fusermount_u(&self, lazy: bool) -> bool {
        let Some(fm) = fusermount() else {
            return false;
        };
        Command::new(fm)
            .arg(if lazy { "-uz" } else { "-u" })
            .arg(&self.mnt)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `fusermount3 -u` (retried while busy, then lazily), and waits for the
    /// LazyFS process to end (SIGKILL after 10 s). Whatever LazyFS still
    /// cached is gone. Works on a mount whose LazyFS has crashed.
    pub fn unmount(&mut self) -> Result<(), String> {
        let end = Instant::now() + Duration::from_secs(5);
        while is_mount_point(&self.mnt) {
            if self.fusermount_u(false) {
                break;
            }
            if Instant::now() > end {
                self.fusermount_u(true);
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(mut c) = self.child.take() {
            let end = Instant::now() + Duration::from_secs(10);
            let st = loop {
                if let Ok(Some(st)) = c.try_wait() {
                    break st;
                }
                if Instant::now() > end {
                    let _ = c.kill();
                    break c.wait().expect("wait for LazyFS");
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            self.exited = Some(st);
        }
        if is_mount_point(&self.mnt) {
            return Err(format!("{} is still mounted", self.mnt.display()));
        }
        Ok(())
    }

    /// The reboot: unmount (if still mounted) and mount a new LazyFS over the
    /// same root.
    pub fn remount(&mut self) -> Result<(), String> {
        self.unmount()?;
        self.spawn()
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- LazyFS log tail ({}) -----\n{}",
                self.log.display(),
                self.log_tail(20)
            );
        }
        if let Err(e) = self.unmount() {
            eprintln!("[harness] LazyFS: {e}");
        }
    }
}

fn join(v: &[u32]) -> String {
    v.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}
