//! A throwaway PostgreSQL server (Debian's packages) on a free loopback
//! port, with role and database `silt` (password `silt`), for catalogs a
//! fleet shares. Everything lives under the test's scratch directory and
//! the server stops on drop.
//!
//! `initdb` and `postgres` refuse to run as root, so as root they run as
//! the `postgres` user the Debian package creates. Without PostgreSQL the
//! test skips with a message, except under CI (`CI` set).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::free_port;

pub struct Postgres {
    pub port: u16,
    base: PathBuf,
    bin: PathBuf,
}

/// The newest `/usr/lib/postgresql/N/bin`, or `None` (test skips).
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop()
}

/// As the `postgres` user when we are root.
fn as_server_user(exe: &Path) -> Command {
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(exe);
        c
    } else {
        Command::new(exe)
    }
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Postgres {
    pub fn start(dir: &Path) -> Option<Postgres> {
        let Some(bin) = bin_dir() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL is missing: .ci/run installs the postgresql package"
            );
            eprintln!("SKIPPED: PostgreSQL missing; apt-get install postgresql");
            return None;
        };
        let base = dir.join("postgres");
        fs::create_dir_all(&base).unwrap();
        if unsafe { libc::geteuid() } == 0 {
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg("postgres:postgres").arg(&base);
                    c
                },
                "chown",
            );
            // The scratch directories above are 0700 root; the server user
            // must be able to reach its own directory.
            let mut up = base.parent();
            while let Some(p) = up {
                let mode = fs::metadata(p).unwrap().permissions().mode();
                if mode & 0o001 == 0 {
                    fs::set_permissions(p, fs::Permissions::from_mode(mode | 0o001)).unwrap();
                }
                up = p.parent();
            }
        }
        fs::set_permissions(&base, fs::Permissions::from_mode(0o700)).unwrap();
        let data = base.join("data");
        let mut initdb = as_server_user(&bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .args(["-E", "UTF8", "--no-locale", "--no-sync"]);
        run(initdb, "initdb");
        let port = free_port();
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n",
            base.display()
        );
        let path = data.join("postgresql.conf");
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str(&conf);
        fs::write(&path, text).unwrap();
        let pg = Postgres { port, base, bin };
        let mut start = as_server_user(&pg.bin.join("pg_ctl"));
        start
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(pg.base.join("server.log"))
            .args(["-w", "-t", "30", "start"]);
        run(start, "pg_ctl start");
        let mut psql = Command::new("psql");
        psql.arg("-h")
            .arg(&pg.base)
            .args(["-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
            .args(["-v", "ON_ERROR_STOP=1", "-q"])
            .args(["-c", "CREATE ROLE silt LOGIN PASSWORD 'silt'"])
            .args(["-c", "CREATE DATABASE silt OWNER silt"]);
        run(psql, "psql create role");
        Some(pg)
    }

    /// For sqlx (silt).
    pub fn url(&self) -> String {
        format!("postgres://silt:silt@127.0.0.1:{}/silt", self.port)
    }

    /// For SQLAlchemy (pyiceberg).
    pub fn sqlalchemy_url(&self) -> String {
        format!(
            "postgresql+psycopg2://silt:silt@127.0.0.1:{}/silt",
            self.port
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut stop = as_server_user(&self.bin.join("pg_ctl"));
        stop.arg("-D")
            .arg(self.base.join("data"))
            .args(["-m", "immediate", "-w", "stop"]);
        let _ = stop.output();
    }
}
