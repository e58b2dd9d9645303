//! Python-side checks: pyarrow reads the lake the way an analyst would,
//! boto3 asks the S3 server what it stored (storage class, multipart parts),
//! and moto is the S3 server that records storage classes.
//!
//! The interpreter is `SILT_PYTHON`, else the venv `.ci/run` creates at
//! `${SILT_TOOLS:-$HOME/.cache/silt/tools}/py`. Without it the tests that
//! need it skip with a message, except under CI (`CI` set).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, port_open, wait_until_blocking};

fn venv() -> PathBuf {
    super::procs::tools_dir().join("py")
}

/// The interpreter with pyarrow, boto3 and moto, or `None` (test skips).
pub fn python() -> Option<PathBuf> {
    let path = std::env::var_os("SILT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| venv().join("bin/python"));
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing: .ci/run installs the Python test tools",
        path.display()
    );
    eprintln!(
        "SKIPPED: {} missing; create it with: python3 -m venv {} && {}/bin/pip install pyarrow boto3 'moto[server]'",
        path.display(),
        venv().display(),
        venv().display()
    );
    None
}

/// Runs `script` with `args`; panics with its output unless it exits 0.
/// Returns stdout.
pub fn run(python: &Path, script: &str, args: &[&str]) -> String {
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("spawn python");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "python check failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// moto's S3 server (in memory, no auth): it records storage classes,
/// which s3s-fs does not.
pub struct MotoServer {
    pub port: u16,
    pub bucket: String,
    child: Child,
    log: PathBuf,
}

/// Access keys of a moto IAM user.
#[derive(Debug, Clone)]
pub struct IamUser {
    pub access_key: String,
    pub secret_key: String,
}

/// Creates the users, attaches one inline policy each, and prints their
/// keys as JSON; 3 moto actions per user.
const CREATE_USERS: &str = "
import sys, json, boto3
iam = boto3.client('iam', endpoint_url=sys.argv[1], region_name='us-east-1',
                   aws_access_key_id='k', aws_secret_access_key='s')
out = []
for name, policy in json.loads(sys.argv[2]):
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName=name, PolicyDocument=json.dumps(policy))
    k = iam.create_access_key(UserName=name)['AccessKey']
    out.append([k['AccessKeyId'], k['SecretAccessKey']])
print(json.dumps(out))
";

impl MotoServer {
    pub fn start(python: &Path, dir: &Path, bucket: &str) -> MotoServer {
        Self::start_with_env(python, dir, bucket, &[])
    }

    /// moto enforcing IAM: `users` (name, policy document) are created
    /// while requests are still free, then every request must be signed by
    /// one of them and be allowed by its policy. Returns their keys.
    pub fn start_with_iam(
        python: &Path,
        dir: &Path,
        bucket: &str,
        users: &[(&str, serde_json::Value)],
    ) -> (MotoServer, Vec<IamUser>) {
        // One action creates the bucket, three set up each user.
        let free = (1 + 3 * users.len()).to_string();
        let server = Self::start_with_env(
            python,
            dir,
            bucket,
            &[("INITIAL_NO_AUTH_ACTION_COUNT", &free)],
        );
        let spec = serde_json::to_string(users).unwrap();
        let out = run(python, CREATE_USERS, &[&server.endpoint(), &spec]);
        let keys: Vec<(String, String)> = serde_json::from_str(out.trim()).unwrap();
        let users = keys
            .into_iter()
            .map(|(access_key, secret_key)| IamUser {
                access_key,
                secret_key,
            })
            .collect();
        (server, users)
    }

    fn start_with_env(python: &Path, dir: &Path, bucket: &str, env: &[(&str, &str)]) -> MotoServer {
        let moto = python.with_file_name("moto_server");
        let port = free_port();
        let log = dir.join("moto.log");
        fs::create_dir_all(dir).unwrap();
        let out = fs::File::create(&log).unwrap();
        let mut child = Command::new(&moto)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", moto.display()));
        let up = wait_until_blocking(
            Instant::now() + Duration::from_secs(60),
            "moto_server port",
            || port_open(port) || matches!(child.try_wait(), Ok(Some(_))),
        );
        let server = MotoServer {
            port,
            bucket: bucket.to_string(),
            child,
            log,
        };
        assert!(
            up.is_ok() && port_open(port),
            "moto_server did not start: {}",
            fs::read_to_string(&server.log).unwrap_or_default()
        );
        run(
            python,
            "import sys, boto3\nboto3.client('s3', endpoint_url=sys.argv[1], region_name='us-east-1', \
             aws_access_key_id='k', aws_secret_access_key='s').create_bucket(Bucket=sys.argv[2])",
            &[&server.endpoint(), bucket],
        );
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// boto3 client setup shared by the scripts: `s3(endpoint, key, secret)`.
pub const BOTO3_PRELUDE: &str = "
import sys, json, boto3
def s3(endpoint, key, secret):
    return boto3.client('s3', endpoint_url=endpoint, region_name='us-east-1',
                        aws_access_key_id=key, aws_secret_access_key=secret)
";
