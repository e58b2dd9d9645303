//! `test-sandbox` (test only): on every `process` call, tries to reach
//! outside the sandbox (files and environment with plain `std`, the network
//! through `wasi:sockets`, see below) and reports what really happened, so
//! the host can check that each attempt was refused. The input batch is
//! replaced by one event on topic `sandbox` whose JSON payload has, in order:
//!
//! | key | attempt | value |
//! | --- | --- | --- |
//! | `file` | `std::fs::read(config.file)` | `"ok: <n> bytes: <text>"` or `"error: ..."` |
//! | `read_dir_root` | `std::fs::read_dir("/")` | `"ok: [names]"` or `"error: ..."` |
//! | `read_dir_cwd` | `std::fs::read_dir(".")` | same |
//! | `write` | `std::fs::write(config.write, ..)` | `"ok: wrote <n> bytes"` or `"error: ..."` |
//! | `preopens` | `wasi:filesystem/preopens.get-directories` | array of the directories' paths (`null` off wasm) |
//! | `env_count` | `std::env::vars().count()` | number |
//! | `env_names` | names from `std::env::vars()` | array of strings |
//! | `env_var` | `std::env::var(config.env)` | `"ok: <value>"` or `"error: ..."` |
//! | `args_count` | `std::env::args().count()` | number |
//! | `tcp_connect` | TCP connect to `127.0.0.1:<config.port>` | `"ok: connected from <addr>"` or `"error: ..."` |
//! | `udp_bind` | UDP bind to `127.0.0.1:0` | `"ok: bound <addr>"` or `"error: ..."` |
//! | `lookup` | resolve `localhost` | `"ok: [addrs]"` or `"error: ..."` |
//!
//! Config (all optional): `file` (default `/etc/hostname`), `write` (default
//! `sandbox-probe.txt`), `env` (default `PATH`), `port` (default 9).
//!
//! Files and the environment are probed with plain `std`. The network is
//! probed one layer lower on `wasm32-wasip2`: `std::net` there is built on
//! wasi-libc's `socket`/`connect`/`bind`/`getaddrinfo`, which Debian's
//! wasi-libc (the preview 1 build that `plugins/build.sh` links against)
//! does not have, so a component using `std::net` does not link. The probes
//! instead make the same `wasi:sockets` calls those functions make
//! (`create-tcp-socket` + `start-connect`/`finish-connect`,
//! `create-udp-socket` + `start-bind`/`finish-bind`, `resolve-addresses` +
//! `resolve-next-address`) through the `wasip2` bindings, and report the
//! first call that fails, e.g. `"error: create-tcp-socket: access-denied
//! (error 1)"`. On other targets (the host unit test) they use `std::net`.
//!
//! In a sandbox without preopened directories the file probes fail inside
//! the guest: wasi-libc finds no preopen covering the path and returns
//! `ENOTCAPABLE` ("Capabilities insufficient") without calling the host:
//! there is no directory handle to open the path under. `preopens` shows
//! that (empty) list, straight from the host.

use std::fmt::Display;

use serde_json::{Map, Value, json};
use silt_sdk::{Config, Error, Event, Transform};

pub struct Sandbox {
    file: String,
    write: String,
    env: String,
    port: u16,
}

/// What the write probe puts in the file, if it ever gets that far.
pub const WRITE_CONTENT: &[u8] = b"written from inside the sandbox\n";

fn outcome<T, E: Display>(result: Result<T, E>, ok: impl FnOnce(T) -> String) -> Value {
    match result {
        Ok(v) => Value::String(format!("ok: {}", ok(v))),
        Err(e) => Value::String(format!("error: {e}")),
    }
}

impl Sandbox {
    /// Run every probe once; each value is the real result of the attempt.
    pub fn probe(&self) -> Map<String, Value> {
        let mut r = Map::new();
        r.insert(
            "file".into(),
            outcome(std::fs::read(&self.file), |bytes| {
                format!("{} bytes: {}", bytes.len(), String::from_utf8_lossy(&bytes))
            }),
        );
        for (key, dir) in [("read_dir_root", "/"), ("read_dir_cwd", ".")] {
            let listing = std::fs::read_dir(dir).and_then(|entries| {
                entries
                    .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect::<Result<Vec<_>, _>>()
            });
            r.insert(key.into(), outcome(listing, |names| format!("{names:?}")));
        }
        r.insert(
            "write".into(),
            outcome(std::fs::write(&self.write, WRITE_CONTENT), |()| {
                format!("wrote {} bytes", WRITE_CONTENT.len())
            }),
        );
        r.insert("preopens".into(), preopens());
        let names: Vec<String> = std::env::vars_os()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        r.insert("env_count".into(), json!(std::env::vars_os().count()));
        r.insert("env_names".into(), json!(names));
        r.insert("env_var".into(), outcome(std::env::var(&self.env), |v| v));
        r.insert("args_count".into(), json!(std::env::args_os().count()));
        r.insert(
            "tcp_connect".into(),
            outcome(net::tcp_connect(self.port), |s| s),
        );
        r.insert("udp_bind".into(), outcome(net::udp_bind(), |s| s));
        r.insert("lookup".into(), outcome(net::lookup("localhost"), |s| s));
        r
    }
}

/// The directories the host preopened for this instance.
#[cfg(all(target_os = "wasi", target_env = "p2"))]
fn preopens() -> Value {
    let dirs = wasip2::filesystem::preopens::get_directories();
    json!(dirs.into_iter().map(|(_, path)| path).collect::<Vec<_>>())
}

#[cfg(not(all(target_os = "wasi", target_env = "p2")))]
fn preopens() -> Value {
    Value::Null
}

/// The network probes through `wasi:sockets` (see the crate docs for why
/// not `std::net`). Each returns the first failing call as `"<call>: <code>"`.
#[cfg(all(target_os = "wasi", target_env = "p2"))]
mod net {
    use wasip2::sockets::instance_network::instance_network;
    use wasip2::sockets::ip_name_lookup::resolve_addresses;
    use wasip2::sockets::network::{
        ErrorCode, IpAddressFamily, IpSocketAddress, Ipv4SocketAddress,
    };
    use wasip2::sockets::tcp_create_socket::create_tcp_socket;
    use wasip2::sockets::udp_create_socket::create_udp_socket;

    fn at(call: &'static str) -> impl Fn(ErrorCode) -> String {
        move |e| format!("{call}: {e}")
    }

    fn localhost(port: u16) -> IpSocketAddress {
        IpSocketAddress::Ipv4(Ipv4SocketAddress {
            port,
            address: (127, 0, 0, 1),
        })
    }

    pub fn tcp_connect(port: u16) -> Result<String, String> {
        let socket = create_tcp_socket(IpAddressFamily::Ipv4).map_err(at("create-tcp-socket"))?;
        socket
            .start_connect(&instance_network(), localhost(port))
            .map_err(at("start-connect"))?;
        let (_input, _output) = loop {
            match socket.finish_connect() {
                Err(ErrorCode::WouldBlock) => socket.subscribe().block(),
                other => break other.map_err(at("finish-connect"))?,
            }
        };
        Ok(format!("connected from {:?}", socket.local_address()))
    }

    pub fn udp_bind() -> Result<String, String> {
        let socket = create_udp_socket(IpAddressFamily::Ipv4).map_err(at("create-udp-socket"))?;
        socket
            .start_bind(&instance_network(), localhost(0))
            .map_err(at("start-bind"))?;
        loop {
            match socket.finish_bind() {
                Err(ErrorCode::WouldBlock) => socket.subscribe().block(),
                other => break other.map_err(at("finish-bind"))?,
            }
        }
        Ok(format!("bound {:?}", socket.local_address()))
    }

    pub fn lookup(name: &str) -> Result<String, String> {
        let stream =
            resolve_addresses(&instance_network(), name).map_err(at("resolve-addresses"))?;
        let mut addrs = Vec::new();
        loop {
            match stream.resolve_next_address() {
                Ok(Some(addr)) => addrs.push(format!("{addr:?}")),
                Ok(None) => break,
                Err(ErrorCode::WouldBlock) => stream.subscribe().block(),
                Err(e) => return Err(at("resolve-next-address")(e)),
            }
        }
        Ok(format!("{addrs:?}"))
    }
}

/// The same probes with `std::net`, for the host unit test.
#[cfg(not(all(target_os = "wasi", target_env = "p2")))]
mod net {
    use std::net::{TcpStream, ToSocketAddrs, UdpSocket};

    fn text(e: std::io::Error) -> String {
        e.to_string()
    }

    pub fn tcp_connect(port: u16) -> Result<String, String> {
        let s = TcpStream::connect(("127.0.0.1", port)).map_err(text)?;
        Ok(format!("connected from {:?}", s.local_addr()))
    }

    pub fn udp_bind() -> Result<String, String> {
        let s = UdpSocket::bind("127.0.0.1:0").map_err(text)?;
        Ok(format!("bound {:?}", s.local_addr()))
    }

    pub fn lookup(name: &str) -> Result<String, String> {
        let addrs = (name, 80).to_socket_addrs().map_err(text)?;
        Ok(format!("{:?}", addrs.collect::<Vec<_>>()))
    }
}

impl Transform for Sandbox {
    fn init(config: Config) -> Result<Self, Error> {
        Ok(Sandbox {
            file: config
                .get("file")?
                .unwrap_or_else(|| "/etc/hostname".into()),
            write: config
                .get("write")?
                .unwrap_or_else(|| "sandbox-probe.txt".into()),
            env: config.get("env")?.unwrap_or_else(|| "PATH".into()),
            port: config.get("port")?.unwrap_or(9),
        })
    }

    fn process(&mut self, _events: Vec<Event>) -> Result<Vec<Event>, Error> {
        Ok(vec![Event::from_json("sandbox", &self.probe())?])
    }
}

silt_sdk::export!(Sandbox);

#[cfg(test)]
mod tests {
    //! Natively (no sandbox) the same probes succeed, so a refusal seen
    //! through the agent is the sandbox's doing, not a broken probe.
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn probes_succeed_outside_the_sandbox() {
        let dir = std::env::temp_dir().join(format!("silt-test-sandbox-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret.txt");
        std::fs::write(&secret, "host secret").unwrap();
        let written = dir.join("written.txt");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let config = Config::from_value(json!({
            "file": secret,
            "write": written,
            "env": "PATH",
            "port": listener.local_addr().unwrap().port(),
        }))
        .unwrap();
        let mut plugin = Sandbox::init(config).unwrap();
        let out = plugin.process(Vec::new()).unwrap();
        assert_eq!(out.len(), 1);
        let r: Value = out[0].json().unwrap();
        let ok = |key: &str| {
            let v = r[key].as_str().unwrap();
            assert!(v.starts_with("ok: "), "{key}: {v}");
            v.to_owned()
        };
        assert!(ok("file").contains("host secret"));
        ok("read_dir_root");
        ok("read_dir_cwd");
        ok("write");
        assert_eq!(std::fs::read(&written).unwrap(), WRITE_CONTENT);
        assert!(r["env_count"].as_u64().unwrap() > 0);
        assert_eq!(
            ok("env_var"),
            format!("ok: {}", std::env::var("PATH").unwrap())
        );
        assert!(r["args_count"].as_u64().unwrap() > 0);
        ok("tcp_connect");
        listener.accept().unwrap();
        ok("udp_bind");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
