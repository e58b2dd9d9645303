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
    let cfg = config::agent("gw-secret")
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
