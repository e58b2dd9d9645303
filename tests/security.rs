//! Security of the links: HTTPS ingest, client certificates, certificate
//! rotation, and secrets that never reach a log or `silt check --print`.
//! Certificates are made per test (rcgen); the client is tokio-rustls.
//!
//! - `https_ingest_refuses_plain_http_and_strangers`: an https source with
//!   an `auth_tokens_file`: a good token gets 202, a wrong one 401; plain
//!   HTTP to the port gets no HTTP reply; a client trusting another CA fails
//!   the handshake. Then the certificate files are replaced: new connections
//!   present the new certificate, a connection opened before keeps working,
//!   and every accepted event is in the lake once.
//! - `client_certificates_are_required_and_name_the_device`: with
//!   `tls.client_ca_file`, no certificate and one from another CA are
//!   refused; a good one is accepted, its CN is the `client_id` attribute,
//!   here a segment of the lake key.
//! - `mqtt_client_certificate_to_a_broker_that_requires_one`: mosquitto with
//!   a TLS listener, `require_certificate true` and
//!   `use_identity_as_username true`; silt with `client_cert_file` gets every
//!   QoS 1 message into S3 exactly once, the broker names it by its
//!   certificate's CN; a second agent without the certificate is refused and
//!   its log says why.
//! - `s3_over_https_with_a_private_ca`: s3s-fs behind a TLS-terminating
//!   proxy (this file) with a certificate from a private CA: with `ca_file`
//!   every event reaches the bucket; without it the sink does not trust the
//!   endpoint, says so, and uploads nothing.
//! - `no_secret_reaches_a_log_or_print`: secrets inline and from files in an
//!   MQTT password, an S3 secret key and HTTP tokens; `check --print` and
//!   the log of a run whose broker and S3 endpoint are down hold none of
//!   them.

mod harness;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::Duration;

use harness::http::{HttpClient, IngestReq};
use harness::pki::{self, Ca};
use harness::*;

const TOKEN: &str = "tls-token-7f3a";

fn https_source(port: u16, cert: &pki::Issued, extra: &str) -> String {
    format!(
        "[sources.api]\ntype = \"http\"\nlisten = \"127.0.0.1:{port}\"\n{extra}\
         tls = {{ cert_file = \"{}\", key_file = \"{}\"{} }}\n\n",
        cert.cert_file.display(),
        cert.key_file.display(),
        ""
    )
}

fn lake_sink(lake: &std::path::Path, key: &str) -> String {
    format!(
        "[sinks.files]\ntype = \"file\"\ninputs = [\"api\"]\npath = \"{}\"\nkey = \"{key}\"\n\
         compression = \"none\"\nbatch = {}\nretry_max = \"1s\"\n\n",
        lake.display(),
        config::batch(1_000_000, "64MiB", "1s")
    )
}

fn event(id: &str) -> String {
    format!("{{\"id\":\"{id}\"}}")
}

/// Plain HTTP to a TLS port: whatever comes back is no HTTP reply.
fn plain_http_gets_no_reply(port: u16) -> bool {
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let body = event("plain");
    let _ = write!(
        tcp,
        "POST /v1/ingest/t HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut got = Vec::new();
    let _ = tcp.read_to_end(&mut got);
    !got.starts_with(b"HTTP/")
}

async fn wait_for_ids(lake: &FileLake, ids: &HashSet<String>) -> Vec<harness::lake::LakeRecord> {
    let mut records = Vec::new();
    wait_until(deadline(60), "accepted events in the lake", || {
        records = lake.snapshot().records;
        let have: HashSet<String> = records.iter().filter_map(|r| r.id()).collect();
        ids.iter().all(|id| have.contains(id))
    })
    .await
    .unwrap();
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_ingest_refuses_plain_http_and_strangers() {
    let s = Scratch::new("https-ingest");
    let ca = Ca::new(s.path(), "device-ca");
    let cert = ca.server("server");
    let tokens = s.join("tokens");
    std::fs::write(&tokens, format!("# rotated by the fleet\n{TOKEN}\n")).unwrap();
    let port = free_port();
    let lake_dir = s.join("lake");
    let cfg = config::agent("gw-tls")
        + &https_source(
            port,
            &cert,
            &format!("auth_tokens_file = \"{}\"\n", tokens.display()),
        )
        + &lake_sink(&lake_dir, "{sink}/{agent}-{batch}.ndjson");
    let mut agent = Agent::start(&s.join("agent"), &cfg);
    agent.wait_ready(&[("http listening", 1)], 60).await;

    let mut accepted = HashSet::new();
    let ok = pki::post_once(
        port,
        &ca.cert_file,
        None,
        "/v1/ingest/t",
        Some(TOKEN),
        &event("a1"),
    )
    .await
    .unwrap();
    assert_eq!(ok.status, 202);
    assert_eq!(
        ok.server_cert, cert.der,
        "the configured certificate is served"
    );
    accepted.insert("a1".to_string());
    let wrong = pki::post_once(
        port,
        &ca.cert_file,
        None,
        "/v1/ingest/t",
        Some("nope"),
        &event("x1"),
    )
    .await
    .unwrap();
    assert_eq!(wrong.status, 401);

    assert!(
        plain_http_gets_no_reply(port),
        "plain HTTP must not be served on a TLS port"
    );
    let other = Ca::new(s.path(), "other-ca");
    let err = pki::post_once(
        port,
        &other.cert_file,
        None,
        "/v1/ingest/t",
        Some(TOKEN),
        &event("x2"),
    )
    .await
    .err()
    .expect("a client that does not trust the server's CA must fail the handshake");
    assert!(err.contains("handshake"), "{err}");
    agent
        .wait_log("tls handshake refused", deadline(10))
        .await
        .unwrap();

    // Rotation: a connection opened before keeps its session; new
    // connections get the new certificate, with no restart.
    let mut before = pki::connect(port, &ca.cert_file, None).await.unwrap();
    let reply = pki::post(&mut before, "/v1/ingest/t", Some(TOKEN), &event("a2"))
        .await
        .unwrap();
    assert_eq!(reply.status, 202);
    accepted.insert("a2".to_string());
    let renewed = ca.server("renewed");
    std::fs::copy(&renewed.key_file, &cert.key_file).unwrap();
    std::fs::copy(&renewed.cert_file, &cert.cert_file).unwrap();
    let until = deadline(20);
    for n in 1.. {
        let id = format!("r{n}");
        let reply = pki::post_once(
            port,
            &ca.cert_file,
            None,
            "/v1/ingest/t",
            Some(TOKEN),
            &event(&id),
        )
        .await
        .unwrap();
        assert_eq!(reply.status, 202);
        accepted.insert(id);
        if reply.server_cert == renewed.der {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "the renewed certificate is not served after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reply = pki::post(&mut before, "/v1/ingest/t", Some(TOKEN), &event("a3"))
        .await
        .unwrap();
    assert_eq!(
        reply.status, 202,
        "an open connection survives the rotation"
    );
    accepted.insert("a3".to_string());
    assert_eq!(agent.runs, 1);

    let records = wait_for_ids(&FileLake::new(&lake_dir), &accepted).await;
    let ids: Vec<String> = records.iter().filter_map(|r| r.id()).collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no event twice: {ids:?}");
    assert!(
        !ids.iter().any(|id| id.starts_with('x') || id == "plain"),
        "{ids:?}"
    );
    agent.sigterm_and_wait(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_required_and_name_the_device() {
    let s = Scratch::new("https-mtls");
    let ca = Ca::new(s.path(), "fleet-ca");
    let cert = ca.server("server");
    let device = ca.client("device", "sensor-7");
    let other = Ca::new(s.path(), "rogue-ca");
    let rogue = other.client("rogue", "sensor-9");
    let port = free_port();
    let lake_dir = s.join("lake");
    let mut cfg = config::agent("gw-mtls")
        + &https_source(port, &cert, "")
        + &lake_sink(&lake_dir, "{sink}/{attr.client_id}/{agent}-{batch}.ndjson");
    cfg = cfg.replacen(
        "\" }\n",
        &format!("\", client_ca_file = \"{}\" }}\n", ca.cert_file.display()),
        1,
    );
    let mut agent = Agent::start(&s.join("agent"), &cfg);
    agent.wait_ready(&[("http listening", 1)], 60).await;

    let refused = |r: Result<pki::TlsReply, String>| match r {
        Ok(reply) => panic!("accepted with status {}", reply.status),
        Err(e) => e,
    };
    let none = refused(
        pki::post_once(
            port,
            &ca.cert_file,
            None,
            "/v1/ingest/t",
            None,
            &event("x1"),
        )
        .await,
    );
    let wrong = refused(
        pki::post_once(
            port,
            &ca.cert_file,
            Some(&rogue),
            "/v1/ingest/t",
            None,
            &event("x2"),
        )
        .await,
    );
    eprintln!("refused: no certificate: {none}; other CA: {wrong}");
    let ok = pki::post_once(
        port,
        &ca.cert_file,
        Some(&device),
        "/v1/ingest/t",
        None,
        &event("d1"),
    )
    .await
    .unwrap();
    assert_eq!(ok.status, 202);

    let lake = FileLake::new(&lake_dir);
    let records = wait_for_ids(&lake, &HashSet::from(["d1".to_string()])).await;
    assert_eq!(records.len(), 1, "only the device's event is stored");
    assert!(
        records[0].object.contains("/sensor-7/"),
        "client_id in the key: {}",
        records[0].object
    );
    assert!(
        agent.count_log("tls handshake refused") >= 2,
        "{}",
        agent.log_run()
    );
    agent.sigterm_and_wait(Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_or_print() {
    let s = Scratch::new("secrets");
    let secrets = [
        "mqtt-pass-Q8w2",
        "s3-secret-Z4k9",
        "http-token-J1v6",
        "file-token-M3x5",
        "file-pass-P7r1",
    ];
    let password_file = s.join("mqtt-password");
    std::fs::write(&password_file, format!("{}\n", secrets[4])).unwrap();
    let tokens = s.join("tokens");
    std::fs::write(&tokens, format!("{}\n", secrets[3])).unwrap();
    let dead = free_port();
    // S3 is down: at SIGTERM the agent gives up its upload after 2 s.
    let cfg = config::agent("gw-secret")
        .replace("shutdown_timeout = \"30s\"", "shutdown_timeout = \"2s\"")
        + &format!(
            "[sources.m1]\ntype = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{dead}\"\ntopics = [\"t\"]\n\
             username = \"u\"\npassword = \"{}\"\n\n\
             [sources.m2]\ntype = \"mqtt\"\nurl = \"mqtt://127.0.0.1:{dead}\"\ntopics = [\"t\"]\n\
             username = \"u\"\npassword_file = \"{}\"\n\n\
             [sources.api]\ntype = \"http\"\nlisten = \"127.0.0.1:{}\"\nauth_token = \"{}\"\nauth_tokens_file = \"{}\"\n\n\
             [sinks.cloud]\ntype = \"s3\"\ninputs = [\"m1\", \"m2\", \"api\"]\nbucket = \"b\"\n\
             endpoint = \"http://127.0.0.1:{dead}\"\nregion = \"us-east-1\"\naccess_key_id = \"AKID\"\n\
             secret_access_key = \"{}\"\nretry_max = \"1s\"\nbatch = {}\n\n",
            secrets[0],
            password_file.display(),
            free_port(),
            secrets[2],
            tokens.display(),
            secrets[1],
            config::batch(1, "1MiB", "100ms"),
        );
    let mut agent = Agent::start(&s.join("agent"), &cfg);
    agent
        .wait_ready(&[("http listening", 1), ("mqtt connection lost", 2)], 60)
        .await;
    let port: u16 = cfg
        .split("[sources.api]")
        .nth(1)
        .and_then(|t| t.split("127.0.0.1:").nth(1))
        .and_then(|t| t.split('"').next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    let reply = HttpClient::new(port, Some(secrets[3]))
        .ingest(&IngestReq::single("t", serde_json::json!({"id": "s1"})))
        .await
        .unwrap();
    assert_eq!(reply.status, 202);
    let bad = HttpClient::new(port, Some("guess"))
        .ingest(&IngestReq::single("t", serde_json::json!({"id": "s2"})))
        .await
        .unwrap();
    assert_eq!(bad.status, 401);
    agent
        .wait_log("sink unreachable", deadline(60))
        .await
        .unwrap();
    agent.sigterm_and_wait(Duration::from_secs(30)).await;

    let print = harness::agent::silt_output(
        &["check", "--print", "-c", agent.config.to_str().unwrap()],
        &[],
    );
    let shown = String::from_utf8_lossy(&print.stdout).to_string()
        + &String::from_utf8_lossy(&print.stderr);
    assert!(print.status.success(), "{shown}");
    assert!(shown.contains("<redacted>"), "{shown}");
    let log = agent.log_all();
    for secret in secrets {
        assert!(
            !shown.contains(secret),
            "`{secret}` in check --print:\n{shown}"
        );
        assert!(!log.contains(secret), "`{secret}` in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_client_certificate_to_a_broker_that_requires_one() {
    let s = Scratch::new("mqtt-mtls");
    let ca = Ca::new(s.path(), "broker-ca");
    let server = ca.server("broker");
    let device = ca.client("device", "gw-7");
    let tls_port = free_port();
    let broker = Mosquitto::start_with(
        &s.join("mosquitto"),
        &format!(
            "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
             require_certificate true\nuse_identity_as_username true\n",
            ca.cert_file.display(),
            server.cert_file.display(),
            server.key_file.display()
        ),
    );
    let s3 = S3Server::start(s.path(), "mtls");
    let mqtts = |cert: bool| {
        let mut source =
            config::mqtt_source("m", &format!("mqtts://localhost:{tls_port}"), &["dev/#"])
                .trim_end()
                .to_string();
        source.push_str(&format!("\nca_file = \"{}\"\n", ca.cert_file.display()));
        if cert {
            source.push_str(&format!(
                "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
                device.cert_file.display(),
                device.key_file.display()
            ));
        }
        source + "\n"
    };
    let sink = config::s3_sink(
        "lake",
        &["m"],
        &s3,
        "gzip",
        &config::batch(1_000, "8MiB", "1s"),
    );
    let mut agent = Agent::start(
        &s.join("agent"),
        &(config::agent("gw-7") + &mqtts(true) + &sink),
    );
    agent.wait_ready(&[("mqtt subscribed", 1)], 60).await;
    assert!(
        broker.log_tail(200).contains("u'gw-7'"),
        "the broker takes the certificate's CN as the user name:\n{}",
        broker.log_tail(40)
    );

    let msgs = harness::mqtt::messages("tls", 300, &["dev/a", "dev/b"], 0, 128);
    let progress = std::sync::Arc::new(harness::mqtt::Progress::default());
    let report =
        harness::mqtt::publish(broker.port, "pub", msgs, Default::default(), progress).await;
    assert_eq!(report.acked.len(), 300, "{:?}", report.error);
    let ids: HashSet<String> = report.acked.iter().cloned().collect();
    let snap = S3Lake::new(&s3)
        .wait_for(&ids, deadline(60), std::time::Instant::now())
        .await
        .unwrap();
    assert_eq!(snap.records.len(), 300, "every message once");

    let mut stranger = Agent::start(
        &s.join("stranger"),
        &(config::agent("gw-8") + &mqtts(false) + &sink),
    );
    stranger
        .wait_log("mqtt connection lost", deadline(30))
        .await
        .unwrap();
    let log = stranger.log_run();
    let line = log
        .lines()
        .find(|l| l.contains("mqtt connection lost"))
        .unwrap()
        .to_string();
    eprintln!("refused: {line}");
    assert!(stranger.count_log("mqtt subscribed") == 0, "{log}");
    assert!(
        line.to_lowercase().contains("certificate"),
        "the log says why: {line}"
    );
    stranger.sigterm_and_wait(Duration::from_secs(30)).await;
    agent.sigterm_and_wait(Duration::from_secs(30)).await;
}

/// Terminates TLS on a free port with `cert` and forwards to `upstream`.
async fn tls_proxy(cert: &pki::Issued, upstream: u16) -> (u16, tokio::task::JoinHandle<()>) {
    let acceptor = pki::acceptor(cert);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_over_https_with_a_private_ca() {
    let s = Scratch::new("s3-tls");
    let ca = Ca::new(s.path(), "storage-ca");
    let cert = ca.server("storage");
    let s3 = S3Server::start(s.path(), "private");
    let upstream: u16 = s3
        .endpoint()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let (proxy, proxy_task) = tls_proxy(&cert, upstream).await;
    let sink = |trusted: bool| {
        let mut sink = config::s3_sink(
            "lake",
            &["api"],
            &s3,
            "gzip",
            &config::batch(1_000, "8MiB", "1s"),
        )
        .replace(&s3.endpoint(), &format!("https://localhost:{proxy}"))
        .trim_end()
        .to_string();
        if trusted {
            sink.push_str(&format!("\nca_file = \"{}\"", ca.cert_file.display()));
        }
        sink + "\n\n"
    };
    let run = |name: &str, trusted: bool| {
        let port = free_port();
        let cfg = config::agent(name)
            + &config::http_source("api", port, Some(TOKEN), "1MiB")
            + &sink(trusted);
        (Agent::start(&s.join(name), &cfg), port)
    };

    let (mut stranger, port) = run("untrusting", false);
    stranger.wait_ready(&[("http listening", 1)], 60).await;
    let reply = HttpClient::new(port, Some(TOKEN))
        .ingest(&IngestReq::single("t", serde_json::json!({"id": "u1"})))
        .await
        .unwrap();
    assert_eq!(reply.status, 202);
    stranger
        .wait_log("sink unreachable", deadline(60))
        .await
        .unwrap();
    let log = stranger.log_run();
    let line = log
        .lines()
        .find(|l| l.contains("sink unreachable"))
        .unwrap()
        .to_string();
    eprintln!("untrusted endpoint: {line}");
    assert!(
        line.contains("certificate") || line.contains("UnknownIssuer"),
        "the log says why: {line}"
    );
    // Its batch can never upload: a SIGTERM would wait out `shutdown_timeout`.
    stranger.kill9();

    let (mut agent, port) = run("trusting", true);
    agent.wait_ready(&[("http listening", 1)], 60).await;
    let ids: HashSet<String> = (0..50).map(|i| format!("s{i}")).collect();
    let client = HttpClient::new(port, Some(TOKEN));
    for id in &ids {
        let reply = client
            .ingest(&IngestReq::single("t", serde_json::json!({"id": id})))
            .await
            .unwrap();
        assert_eq!(reply.status, 202);
    }
    let mut lake = S3Lake::new(&s3);
    let snap = lake
        .wait_for(&ids, deadline(60), std::time::Instant::now())
        .await
        .unwrap();
    assert_eq!(
        snap.records.len(),
        50,
        "the untrusting agent uploaded nothing, this one each event once"
    );
    agent.sigterm_and_wait(Duration::from_secs(30)).await;
    proxy_task.abort();
}
