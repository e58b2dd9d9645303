use std::collections::VecDeque;

use bytesize::ByteSize;
use proptest::prelude::*;

use super::*;
use crate::config::WhenFull;

fn config(max_bytes: u64, when_full: WhenFull) -> SpoolConfig {
    SpoolConfig {
        max_bytes: ByteSize::b(max_bytes),
        when_full,
        min_free: ByteSize::b(0),
    }
}

fn sinks() -> Vec<String> {
    vec!["a".to_string(), "b".to_string()]
}

/// Sink `a` unpartitioned; sink `b` partitioned by payload length parity,
/// so the model test covers both.
fn partitioned_sinks() -> Vec<SinkSpec> {
    vec![
        SinkSpec::unpartitioned("a"),
        SinkSpec {
            name: "b".to_string(),
            partition_of: std::sync::Arc::new(|e: &Event| (e.payload.len() % 2).to_string()),
        },
    ]
}

fn partition_of(sink: SinkId, e: &Event) -> String {
    match sink {
        0 => String::new(),
        _ => (e.payload.len() % 2).to_string(),
    }
}

/// Seal whatever is oldest, at most `max_records`.
fn forced(max_records: u64) -> SealRule {
    SealRule {
        max_records,
        max_bytes: u64::MAX,
        max_age_ms: i64::MAX,
        max_partitions: usize::MAX,
        force: true,
    }
}

fn ev(ts: i64, payload: &[u8]) -> Event {
    Event::new(ts, "t", payload.to_vec())
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn seal_all(spool: &Spool, sink: SinkId) -> Option<(BatchMeta, Vec<Event>)> {
    spool
        .seal(sink, forced(u64::MAX), |_, seq| format!("k{seq}"))
        .await
        .unwrap()
}

#[test]
fn block_policy_refuses_when_full_and_accepts_after_upload() {
    let dir = tempfile::tempdir().unwrap();
    let one = encoded_len(&ev(0, &[0; 100]));
    let spool = Spool::open(dir.path(), &sinks(), &config(one * 3, WhenFull::Block)).unwrap();
    rt().block_on(async {
        let out = spool
            .append(&[0], vec![ev(1, &[0; 100]), ev(2, &[0; 100])])
            .await
            .unwrap();
        assert_eq!(out.stored, 2);
        let err = spool
            .append(&[0], vec![ev(3, &[0; 100]), ev(4, &[0; 100])])
            .await
            .unwrap_err();
        assert!(matches!(err, SpoolError::Full), "{err}");
        let (meta, events) = seal_all(&spool, 0).await.unwrap();
        assert_eq!(events.len(), 2);
        spool.complete(0, meta).await.unwrap();
        assert_eq!(spool.bytes(), 0);
        let out = spool
            .append(&[0], vec![ev(3, &[0; 100]), ev(4, &[0; 100])])
            .await
            .unwrap();
        assert_eq!(out.stored, 2);
    });
}

#[test]
fn drop_newest_counts_and_keeps_what_was_there() {
    let dir = tempfile::tempdir().unwrap();
    let one = encoded_len(&ev(0, &[0; 100]));
    let spool = Spool::open(dir.path(), &sinks(), &config(one * 2, WhenFull::DropNewest)).unwrap();
    rt().block_on(async {
        spool
            .append(&[0], vec![ev(1, &[0; 100]), ev(2, &[0; 100])])
            .await
            .unwrap();
        let out = spool.append(&[0], vec![ev(3, &[0; 100])]).await.unwrap();
        assert_eq!((out.stored, out.dropped_new, out.dropped_old), (0, 1, 0));
        let (_, events) = seal_all(&spool, 0).await.unwrap();
        let ts: Vec<i64> = events.iter().map(|e| e.ts_ms).collect();
        assert_eq!(ts, [1, 2]);
    });
}

/// A media index line is metadata of data already accepted: a full spool
/// refuses it (the batcher retries) under every policy, never drops it.
#[test]
fn never_drop_appends_are_refused_not_dropped_when_full() {
    for when_full in [WhenFull::DropNewest, WhenFull::DropOldest, WhenFull::Block] {
        let dir = tempfile::tempdir().unwrap();
        let one = encoded_len(&ev(0, &[0; 100]));
        let spool = Spool::open(dir.path(), &sinks(), &config(one * 2, when_full)).unwrap();
        rt().block_on(async {
            let (meta, _) = {
                spool
                    .append(&[0], vec![ev(1, &[0; 100]), ev(2, &[0; 100])])
                    .await
                    .unwrap();
                seal_all(&spool, 0).await.unwrap()
            };
            let line = vec![(vec![1], vec![ev(3, &[0; 100])])];
            let err = spool
                .append_admitted(line.clone(), Vec::new(), Admission::NeverDrop)
                .await
                .unwrap_err();
            assert!(matches!(err, SpoolError::Full), "{when_full:?}: {err}");
            spool.complete(0, meta).await.unwrap();
            let out = spool
                .append_admitted(line, Vec::new(), Admission::NeverDrop)
                .await
                .unwrap();
            assert_eq!((out.stored, out.dropped_new), (1, 0), "{when_full:?}");
        });
    }
}

#[test]
fn drop_oldest_removes_the_oldest_unsealed_records_across_sinks() {
    let dir = tempfile::tempdir().unwrap();
    let one = encoded_len(&ev(0, &[0; 100]));
    let spool = Spool::open(dir.path(), &sinks(), &config(one * 3, WhenFull::DropOldest)).unwrap();
    rt().block_on(async {
        spool.append(&[1], vec![ev(1, &[0; 100])]).await.unwrap();
        spool
            .append(&[0], vec![ev(2, &[0; 100]), ev(3, &[0; 100])])
            .await
            .unwrap();
        let out = spool
            .append(&[0], vec![ev(4, &[0; 100]), ev(5, &[0; 100])])
            .await
            .unwrap();
        assert_eq!((out.stored, out.dropped_old), (2, 2));
        assert!(spool.bytes() <= one * 3);
        assert!(
            seal_all(&spool, 1).await.is_none(),
            "sink b's older record was dropped"
        );
        let (_, events) = seal_all(&spool, 0).await.unwrap();
        let ts: Vec<i64> = events.iter().map(|e| e.ts_ms).collect();
        assert_eq!(ts, [3, 4, 5]);
    });
}

#[test]
fn corrupt_chunk_is_quarantined_and_the_rest_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), &sinks(), &config(1 << 30, WhenFull::Block)).unwrap();
    rt().block_on(async {
        for (ts, payload) in [(1, &b"one"[..]), (2, b"two"), (3, b"three")] {
            spool.append(&[0], vec![ev(ts, payload)]).await.unwrap();
        }
    });
    let (key, value) = spool.shared.sinks[0].chunks.iter().nth(1).unwrap().unwrap();
    let (_, _, r) = sink_log::decode_ref(&key, &value).unwrap();
    let segment = std::fs::read_dir(&spool.shared.sinks[0].segments)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut raw = std::fs::read(&segment).unwrap();
    raw[(r.offset + r.len as u64 - 1) as usize] ^= 0xff;
    std::fs::write(&segment, raw).unwrap();
    spool.close().unwrap();

    let spool = Spool::open(dir.path(), &sinks(), &config(1 << 30, WhenFull::Block)).unwrap();
    rt().block_on(async {
        let (meta, events) = seal_all(&spool, 0).await.unwrap();
        let payloads: Vec<&[u8]> = events.iter().map(|e| e.payload.as_ref()).collect();
        assert_eq!(payloads, [b"one".as_slice(), b"three".as_slice()]);
        assert_eq!((meta.records, meta.count), (2, 3));
        spool.complete(0, meta).await.unwrap();
    });
    let quarantined: Vec<_> = std::fs::read_dir(dir.path().join("quarantine"))
        .unwrap()
        .collect();
    assert_eq!(quarantined.len(), 1);
    assert_eq!(spool.bytes(), 0);
}

#[test]
fn free_disk_floor_counts_as_full() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(1 << 30, WhenFull::Block);
    cfg.min_free = ByteSize::b(u64::MAX / 2);
    let spool = Spool::open(dir.path(), &sinks(), &cfg).unwrap();
    let err = rt()
        .block_on(spool.append(&[0], vec![ev(1, b"x")]))
        .unwrap_err();
    assert!(matches!(err, SpoolError::Full), "{err}");
}

#[derive(Debug, Clone)]
enum Op {
    Append {
        sinks: Vec<SinkId>,
        payloads: Vec<Vec<u8>>,
    },
    Seal {
        sink: SinkId,
        max_records: u64,
    },
    Complete {
        sink: SinkId,
    },
    /// Several appends in flight at once, so one group commit gathers them
    /// (runs of several partitions and sinks in one chunk write).
    AppendConcurrent {
        appends: Vec<(Vec<SinkId>, Vec<Vec<u8>>)>,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (
            prop_oneof![Just(vec![0]), Just(vec![1]), Just(vec![0, 1])],
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..48), 1..6)
        )
            .prop_map(|(sinks, payloads)| Op::Append { sinks, payloads }),
        1 => prop::collection::vec(
            (
                prop_oneof![Just(vec![0]), Just(vec![1]), Just(vec![0, 1])],
                prop::collection::vec(prop::collection::vec(any::<u8>(), 0..48), 1..4)
            ),
            2..5
        )
            .prop_map(|appends| Op::AppendConcurrent { appends }),
        2 => (0..2usize, 1..6u64).prop_map(|(sink, max_records)| Op::Seal { sink, max_records }),
        2 => (0..2usize).prop_map(|sink| Op::Complete { sink }),
        1 => Just(Op::Reopen),
    ]
}

/// Open partitions in creation order, each with its unsealed events.
#[derive(Default)]
struct ModelSink {
    unsealed: Vec<(String, VecDeque<Event>)>,
    sealed: VecDeque<(BatchMeta, Vec<Event>)>,
    last_batch_seq: Option<u64>,
}

impl ModelSink {
    fn unsealed_events(&self) -> impl Iterator<Item = &Event> {
        self.unsealed.iter().flat_map(|(_, events)| events)
    }

    fn append(&mut self, partition: String, event: Event) {
        match self.unsealed.iter_mut().find(|(p, _)| *p == partition) {
            Some((_, events)) => events.push_back(event),
            None => self.unsealed.push((partition, VecDeque::from([event]))),
        }
    }

    /// What the spool's forced seal takes: the fullest full partition (the
    /// first created among equals), else the one with the oldest event.
    fn seal(&mut self, max_records: u64) -> Vec<Event> {
        let full = self
            .unsealed
            .iter()
            .enumerate()
            .filter(|(_, (_, e))| e.len() as u64 >= max_records)
            .max_by_key(|&(i, (_, e))| (e.len(), std::cmp::Reverse(i)))
            .map(|(i, _)| i);
        let oldest = || {
            (0..self.unsealed.len()).min_by_key(|&i| self.unsealed[i].1.front().map(|e| e.ts_ms))
        };
        let Some(i) = full.or_else(oldest) else {
            return Vec::new();
        };
        let events = &mut self.unsealed[i].1;
        let take = (max_records as usize).min(events.len());
        let out = events.drain(..take).collect();
        if events.is_empty() {
            self.unsealed.remove(i);
        }
        out
    }
}

fn check(spool: &Spool, model: &[ModelSink]) {
    for (sink, m) in model.iter().enumerate() {
        let stats = spool.stats(sink);
        assert_eq!(
            stats.unsealed_records,
            m.unsealed_events().count() as u64,
            "unsealed records of sink {sink}"
        );
        assert_eq!(stats.partitions, m.unsealed.len());
        let unsealed_bytes: u64 = m.unsealed_events().map(encoded_len).sum();
        assert_eq!(
            stats.unsealed_bytes, unsealed_bytes,
            "unsealed bytes of sink {sink}"
        );
        assert_eq!(
            stats.oldest_unsealed_ms,
            m.unsealed_events().map(|e| e.ts_ms).min()
        );
        assert_eq!(
            stats.sealed_batches,
            m.sealed.len() as u64,
            "sealed batches of sink {sink}"
        );
        for (meta, events) in &m.sealed {
            assert_eq!(
                &spool.load_batch(sink, meta).unwrap().events,
                events,
                "batch {} of sink {sink}",
                meta.seq
            );
        }
    }
    let total: u64 = model
        .iter()
        .flat_map(|m| {
            m.unsealed_events()
                .chain(m.sealed.iter().flat_map(|(_, e)| e))
        })
        .map(encoded_len)
        .sum();
    assert_eq!(spool.bytes(), total);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The spool against an in-memory model: random appends, seals,
    /// completions and restarts, compared after every step. A restart must
    /// hand back exactly the sealed batches, in order, under the same keys,
    /// and batch numbers never go backwards.
    #[test]
    fn spool_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(1 << 30, WhenFull::Block);
        let mut spool = Spool::open_partitioned(dir.path(), &partitioned_sinks(), &cfg).unwrap();
        let mut model = vec![ModelSink::default(), ModelSink::default()];
        let mut ts = 0;
        let rt = rt();
        for op in ops {
            match op {
                Op::Append { sinks, payloads } => {
                    let events: Vec<Event> = payloads.iter().map(|p| { ts += 1; ev(ts, p) }).collect();
                    let out = rt.block_on(spool.append(&sinks, events.clone())).unwrap();
                    prop_assert_eq!(out.stored, events.len());
                    for s in sinks {
                        for e in &events {
                            model[s].append(partition_of(s, e), e.clone());
                        }
                    }
                }
                Op::AppendConcurrent { appends } => {
                    let batches: Vec<(Vec<SinkId>, Vec<Event>)> = appends
                        .iter()
                        .map(|(sinks, payloads)| {
                            (sinks.clone(), payloads.iter().map(|p| { ts += 1; ev(ts, p) }).collect())
                        })
                        .collect();
                    let outs = rt.block_on(futures::future::join_all(
                        batches.iter().map(|(sinks, events)| spool.append(sinks, events.clone())),
                    ));
                    for ((sinks, events), out) in batches.iter().zip(outs) {
                        prop_assert_eq!(out.unwrap().stored, events.len());
                        for &s in sinks {
                            for e in events {
                                model[s].append(partition_of(s, e), e.clone());
                            }
                        }
                    }
                }
                Op::Seal { sink, max_records } => {
                    let sealed = rt.block_on(spool.seal(sink, forced(max_records), |_, seq| format!("k{seq}"))).unwrap();
                    let m = &mut model[sink];
                    let expect = m.seal(max_records);
                    match sealed {
                        None => prop_assert!(expect.is_empty()),
                        Some((meta, events)) => {
                            prop_assert_eq!(&events, &expect);
                            prop_assert!(events.iter().all(|e| partition_of(sink, e) == partition_of(sink, &events[0])), "batch mixes partitions");
                            prop_assert_eq!(&meta.key, &format!("k{}", meta.seq));
                            prop_assert!(m.last_batch_seq.is_none_or(|last| meta.seq > last), "batch sequence went backwards");
                            m.last_batch_seq = Some(meta.seq);
                            m.sealed.push_back((meta, events));
                        }
                    }
                }
                Op::Complete { sink } => {
                    if let Some((meta, _)) = model[sink].sealed.pop_front() {
                        rt.block_on(spool.complete(sink, meta)).unwrap();
                    }
                }
                Op::Reopen => {
                    spool.close().unwrap();
                    spool = Spool::open_partitioned(dir.path(), &partitioned_sinks(), &cfg).unwrap();
                    for (sink, m) in model.iter().enumerate() {
                        let pending = spool.take_pending(sink);
                        let expect: Vec<BatchMeta> = m.sealed.iter().map(|(meta, _)| meta.clone()).collect();
                        prop_assert_eq!(pending, expect);
                    }
                }
            }
            check(&spool, &model);
        }
    }
}

#[test]
fn partitions_seal_separately_and_the_cap_closes_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let by_topic = SinkSpec {
        name: "lake".into(),
        partition_of: std::sync::Arc::new(|e: &Event| e.topic.clone()),
    };
    let cfg = config(1 << 30, WhenFull::Block);
    let spool = Spool::open_partitioned(dir.path(), &[by_topic], &cfg).unwrap();
    let at = |ts: i64, topic: &str| Event::new(ts, topic, b"x".to_vec());
    let rule = |max_partitions: usize| SealRule {
        max_records: 100,
        max_bytes: u64::MAX,
        max_age_ms: i64::MAX,
        max_partitions,
        force: false,
    };
    rt().block_on(async {
        let events = vec![at(3, "b"), at(1, "a"), at(2, "c"), at(4, "a")];
        spool.append(&[0], events).await.unwrap();
        let stats = spool.stats(0);
        assert_eq!((stats.partitions, stats.fullest_records), (3, 2));
        // Nothing is full or old, and 3 partitions fit under a cap of 3.
        let key = |_: &Event, seq: u64| format!("k{seq}");
        assert!(spool.seal(0, rule(3), key).await.unwrap().is_none());
        // Over a cap of 2: the partition with the oldest event goes first.
        let (meta, events) = spool.seal(0, rule(2), key).await.unwrap().unwrap();
        assert_eq!(events, vec![at(1, "a"), at(4, "a")]);
        assert_eq!(meta.records, 2);
        assert!(spool.seal(0, rule(2), key).await.unwrap().is_none());
        assert_eq!(spool.stats(0).partitions, 2);
        // A full partition is sealed without waiting for age.
        let full = SealRule {
            max_records: 1,
            ..rule(10)
        };
        let (_, events) = spool.seal(0, full, key).await.unwrap().unwrap();
        assert_eq!(events.len(), 1);
    });
}

#[test]
fn large_events_and_many_chunks_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), &sinks(), &config(1 << 30, WhenFull::Block)).unwrap();
    let big = vec![7u8; 300 * 1024];
    rt().block_on(async {
        let events: Vec<Event> = (0..8).map(|i| ev(i, &big)).collect();
        spool.append(&[0], events.clone()).await.unwrap();
        let (meta, sealed) = spool
            .seal(0, forced(3), |_, seq| format!("k{seq}"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sealed, events[..3]);
        assert_eq!(spool.load_batch(0, &meta).unwrap().events, events[..3]);
        spool.complete(0, meta).await.unwrap();
        let (_, rest) = seal_all(&spool, 0).await.unwrap();
        assert_eq!(rest, events[3..]);
    });
    assert!(
        !dir.path()
            .join("spool/blobs")
            .read_dir()
            .is_ok_and(|mut d| d.next().is_some()),
        "sled wrote blob files"
    );
}
