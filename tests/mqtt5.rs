//! MQTT 5 (`protocol = 5`) against mosquitto, into a file sink.
//!
//! - `mqtt5_session_survives_a_broker_restart`: silt subscribes with
//!   `session_expiry = "1h"` to a plain and a shared (`$share/...`) filter.
//!   Live messages arrive; then silt stops, 300 more QoS 1 messages are
//!   published while it is away, and the broker restarts (its persistence
//!   keeps the session). On its next start silt finds the session
//!   (`session_present=true`) and every message, live or queued, is in the
//!   lake exactly once, with its user property `site` as an attribute (a key
//!   segment) next to the `topic_fields` one. A second agent with
//!   `session_expiry = "0s"` finds no session after a reconnect: the setting
//!   is what keeps it.

mod harness;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

use harness::*;

fn v5_source(name: &str, url: &str, topics: &[&str], session_expiry: &str) -> String {
    config::mqtt_source(name, url, topics)
        .trim_end()
        .to_string()
        + &format!(
            "\nprotocol = 5\nsession_expiry = \"{session_expiry}\"\nreceive_maximum = 100\n\
             topic_fields = [\"\", \"line\"]\n\n"
        )
}

fn sink(lake: &std::path::Path, inputs: &str) -> String {
    format!(
        "[sinks.files]\ntype = \"file\"\ninputs = [\"{inputs}\"]\npath = \"{}\"\n\
         key = \"site={{attr.site}}/line={{attr.line}}/{{agent}}-{{batch}}.ndjson\"\n\
         compression = \"none\"\nbatch = {}\nretry_max = \"1s\"\n\n",
        lake.display(),
        config::batch(1_000_000, "64MiB", "1s")
    )
}

/// Publishes `(topic, id, site)` as QoS 1 MQTT 5 messages with the user
/// property `site`; returns once the broker PUBACKed every one.
async fn publish_v5(port: u16, messages: &[(&str, String, &str)]) {
    let mut options = MqttOptions::new("pub-v5", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let to_send: Vec<_> = messages
        .iter()
        .map(|(topic, id, site)| {
            let props = PublishProperties {
                user_properties: vec![("site".into(), site.to_string())],
                ..PublishProperties::default()
            };
            (topic.to_string(), format!("{{\"id\":\"{id}\"}}"), props)
        })
        .collect();
    let sender = tokio::spawn(async move {
        for (topic, payload, props) in to_send {
            client
                .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props)
                .await
                .unwrap();
        }
        client
    });
    let mut acked = 0;
    let polled = tokio::time::timeout(Duration::from_secs(60), async {
        while acked < messages.len() {
            if let Event::Incoming(Packet::PubAck(_)) = eventloop.poll().await.unwrap() {
                acked += 1;
            }
        }
    })
    .await;
    assert!(polled.is_ok(), "broker acked {acked} of {}", messages.len());
    let client = sender.await.unwrap();
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_session_survives_a_broker_restart() {
    let s = Scratch::new("mqtt5-session");
    let mut broker = Mosquitto::start(&s.join("mosquitto"));
    let lake_dir = s.join("lake");
    let topics = ["plant/+/telemetry", "$share/fleet/shared/#"];
    let cfg = config::agent("gw-5")
        + &v5_source("m", &broker.url(), &topics, "1h")
        + &sink(&lake_dir, "m");
    let mut agent = Agent::start(&s.join("agent"), &cfg);
    agent.wait_ready(&[("mqtt subscribed", 1)], 60).await;
    assert_eq!(agent.count_log("session_present=false"), 1, "a new session");

    let live: Vec<_> = (0..200)
        .map(|i| ("plant/1/telemetry", format!("live-{i}"), "plant-7"))
        .chain((0..50).map(|i| ("shared/x", format!("shared-{i}"), "hub")))
        .collect();
    publish_v5(broker.port, &live).await;
    let lake = FileLake::new(&lake_dir);
    let want_live: HashSet<String> = live.iter().map(|(_, id, _)| id.clone()).collect();
    wait_until(deadline(60), "live messages in the lake", || {
        let have: HashSet<String> = lake
            .snapshot()
            .records
            .iter()
            .filter_map(|r| r.id())
            .collect();
        want_live.is_subset(&have)
    })
    .await
    .unwrap();

    agent.sigterm_and_wait(Duration::from_secs(30)).await;
    let queued: Vec<_> = (0..300)
        .map(|i| ("plant/2/telemetry", format!("queued-{i}"), "plant-8"))
        .collect();
    publish_v5(broker.port, &queued).await;
    broker.restart();
    agent.spawn();
    agent.wait_ready(&[("mqtt connected", 1)], 60).await;
    assert_eq!(
        agent.count_log("session_present=true"),
        1,
        "the session outlived silt's absence and the broker's restart:\n{}",
        agent.log_run()
    );

    let expected: HashMap<String, String> = live
        .iter()
        .chain(&queued)
        .map(|(topic, id, site)| {
            let line = topic.split('/').nth(1).unwrap();
            (id.clone(), format!("site={site}/line={line}/"))
        })
        .collect();
    let mut records = Vec::new();
    wait_until(deadline(60), "queued messages in the lake", || {
        records = lake.snapshot().records;
        let have: HashSet<String> = records.iter().filter_map(|r| r.id()).collect();
        expected.keys().all(|id| have.contains(id))
    })
    .await
    .unwrap();
    let mut seen = HashMap::new();
    for r in &records {
        let id = r.id().unwrap();
        *seen.entry(id.clone()).or_insert(0) += 1;
        let prefix = &expected[&id];
        assert!(
            r.object.starts_with(prefix.as_str()),
            "{id} in {} instead of under {prefix}",
            r.object
        );
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    assert_eq!(seen.len(), 550);
    agent.sigterm_and_wait(Duration::from_secs(30)).await;

    let cfg = config::agent("gw-6")
        + &v5_source("m", &broker.url(), &["other/#"], "0s")
        + &sink(&s.join("lake-0"), "m");
    let mut forgetful = Agent::start(&s.join("agent-0"), &cfg);
    forgetful.wait_ready(&[("mqtt subscribed", 1)], 60).await;
    forgetful.sigterm_and_wait(Duration::from_secs(30)).await;
    forgetful.spawn();
    forgetful.wait_ready(&[("mqtt connected", 1)], 60).await;
    assert_eq!(
        forgetful.count_log("session_present=false"),
        1,
        "with session_expiry 0s the broker drops the session at the disconnect"
    );
    forgetful.sigterm_and_wait(Duration::from_secs(30)).await;
}
