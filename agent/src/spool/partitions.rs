//! A sink's open partitions, and what seal and drop decisions ask of them
//! (the fullest, the oldest, the totals) kept in ordered indexes.
//!
//! A key by device id gives thousands of open partitions, and these
//! questions are asked on the single spool writer thread after every group
//! commit and every dropped chunk: a scan of all partitions there made each
//! append cost O(partitions). Indexes are brought up to date once per group
//! ([`Partitions::reindex`]), not once per event: O(touched × log P).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The unsealed tail of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OpenPartition {
    pub prefix: String,
    /// First record sequence not covered by a sealed batch.
    pub unsealed_from: u64,
    pub records: u64,
    pub bytes: u64,
    pub oldest_ms: Option<i64>,
}

/// A partition's values as the indexes hold them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Indexed {
    /// `i64::MIN` for a partition without a known oldest record: it is
    /// picked first, as the scan this replaces did.
    oldest: i64,
    records: u64,
    bytes: u64,
}

impl Indexed {
    fn of(p: &OpenPartition) -> Indexed {
        Indexed {
            oldest: p.oldest_ms.unwrap_or(i64::MIN),
            records: p.records,
            bytes: p.bytes,
        }
    }
}

struct Entry {
    partition: OpenPartition,
    indexed: Indexed,
    /// Changed since the last reindex (and listed in `dirty`).
    dirty: bool,
}

#[derive(Default)]
pub(super) struct Partitions {
    open: BTreeMap<u64, Entry>,
    by_prefix: HashMap<String, u64>,
    by_oldest: BTreeSet<(i64, u64)>,
    /// The last entry is the fullest, the earliest opened among equals.
    by_records: BTreeSet<(u64, Reverse<u64>)>,
    by_bytes: BTreeSet<(u64, Reverse<u64>)>,
    dirty: Vec<u64>,
    /// Sums over `indexed`.
    records: u64,
    bytes: u64,
}

impl Partitions {
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn get(&self, id: u64) -> Option<&OpenPartition> {
        self.open.get(&id).map(|e| &e.partition)
    }

    /// The partition to change; the indexes see the change at the next
    /// [`Partitions::reindex`].
    pub fn get_mut(&mut self, id: u64) -> Option<&mut OpenPartition> {
        let entry = self.open.get_mut(&id)?;
        if !entry.dirty {
            entry.dirty = true;
            self.dirty.push(id);
        }
        Some(&mut entry.partition)
    }

    /// The open partition with this key prefix.
    pub fn by_prefix(&self, prefix: &str) -> Option<u64> {
        self.by_prefix.get(prefix).copied()
    }

    pub fn insert(&mut self, id: u64, partition: OpenPartition) {
        self.remove(id);
        let indexed = Indexed::of(&partition);
        self.index(id, indexed);
        self.by_prefix.insert(partition.prefix.clone(), id);
        self.open.insert(
            id,
            Entry {
                partition,
                indexed,
                dirty: false,
            },
        );
    }

    pub fn remove(&mut self, id: u64) -> Option<OpenPartition> {
        let entry = self.open.remove(&id)?;
        self.unindex(id, entry.indexed);
        if self.by_prefix.get(&entry.partition.prefix) == Some(&id) {
            self.by_prefix.remove(&entry.partition.prefix);
        }
        Some(entry.partition)
    }

    /// Brings the indexes and totals up to date with every change made
    /// through [`Partitions::get_mut`].
    pub fn reindex(&mut self) {
        for id in std::mem::take(&mut self.dirty) {
            let Some(entry) = self.open.get_mut(&id) else {
                continue;
            };
            entry.dirty = false;
            let (old, new) = (entry.indexed, Indexed::of(&entry.partition));
            if old != new {
                entry.indexed = new;
                self.unindex(id, old);
                self.index(id, new);
            }
        }
    }

    fn index(&mut self, id: u64, v: Indexed) {
        self.by_oldest.insert((v.oldest, id));
        self.by_records.insert((v.records, Reverse(id)));
        self.by_bytes.insert((v.bytes, Reverse(id)));
        self.records += v.records;
        self.bytes += v.bytes;
    }

    fn unindex(&mut self, id: u64, v: Indexed) {
        self.by_oldest.remove(&(v.oldest, id));
        self.by_records.remove(&(v.records, Reverse(id)));
        self.by_bytes.remove(&(v.bytes, Reverse(id)));
        self.records -= v.records;
        self.bytes -= v.bytes;
    }

    /// The partition holding the most records if they are at least
    /// `records`, else the one holding the most bytes if at least `bytes`
    /// (the earliest opened among equals). As of the last reindex, like
    /// every query below.
    pub fn full(&self, records: u64, bytes: u64) -> Option<u64> {
        let by_records = self.by_records.last().filter(|(r, _)| *r >= records);
        let by_bytes = self.by_bytes.last().filter(|(b, _)| *b >= bytes);
        by_records.or(by_bytes).map(|&(_, Reverse(id))| id)
    }

    /// The partition whose oldest record is the oldest, with that time.
    pub fn oldest(&self) -> Option<(u64, i64)> {
        self.by_oldest.first().map(|&(oldest, id)| (id, oldest))
    }

    /// The oldest known record time over all partitions.
    pub fn oldest_ms(&self) -> Option<i64> {
        self.by_oldest
            .range((i64::MIN + 1, 0)..)
            .next()
            .map(|&(oldest, _)| oldest)
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The most records and the most bytes one partition holds.
    pub fn fullest(&self) -> (u64, u64) {
        (
            self.by_records.last().map_or(0, |&(r, _)| r),
            self.by_bytes.last().map_or(0, |&(b, _)| b),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(prefix: &str, records: u64, oldest: Option<i64>) -> OpenPartition {
        OpenPartition {
            prefix: prefix.into(),
            unsealed_from: 0,
            records,
            bytes: records * 10,
            oldest_ms: oldest,
        }
    }

    /// What the indexes must say, from a scan.
    fn scanned(open: &BTreeMap<u64, OpenPartition>) -> (u64, u64, Option<i64>, (u64, u64)) {
        (
            open.values().map(|p| p.records).sum(),
            open.values().map(|p| p.bytes).sum(),
            open.values().filter_map(|p| p.oldest_ms).min(),
            (
                open.values().map(|p| p.records).max().unwrap_or(0),
                open.values().map(|p| p.bytes).max().unwrap_or(0),
            ),
        )
    }

    #[test]
    fn indexes_agree_with_a_scan_through_random_changes() {
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut p = Partitions::default();
        let mut model = BTreeMap::new();
        for step in 0..5_000 {
            let id = next(64);
            match next(4) {
                0 => {
                    let new = partition(&format!("p{id}"), next(5), Some(next(1000) as i64));
                    p.insert(id, new.clone());
                    model.insert(id, new);
                }
                1 => {
                    assert_eq!(p.remove(id), model.remove(&id));
                }
                _ => {
                    if let Some(m) = model.get_mut(&id) {
                        let q = p.get_mut(id).expect("open");
                        q.records += next(3);
                        q.bytes += next(100);
                        if next(2) == 0 {
                            q.oldest_ms = Some(next(1000) as i64);
                        }
                        *m = q.clone();
                    }
                }
            }
            if step % 7 == 0 {
                p.reindex();
                let (records, bytes, oldest, fullest) = scanned(&model);
                assert_eq!(
                    (p.records(), p.bytes(), p.oldest_ms(), p.fullest()),
                    (records, bytes, oldest, fullest),
                    "step {step}"
                );
                assert_eq!(p.len(), model.len());
                let min = model.values().filter_map(|m| m.oldest_ms).min();
                assert_eq!(
                    p.oldest().map(|(id, _)| model[&id].oldest_ms),
                    min.map(Some)
                );
                if let Some(id) = p.full(fullest.0, u64::MAX) {
                    assert_eq!(model[&id].records, fullest.0);
                }
                for (id, m) in &model {
                    assert_eq!(p.by_prefix(&m.prefix), Some(*id));
                }
            }
        }
    }

    #[test]
    fn a_partition_without_an_oldest_time_is_picked_first() {
        let mut p = Partitions::default();
        p.insert(1, partition("a", 1, Some(5)));
        p.insert(2, partition("b", 1, None));
        assert_eq!(p.oldest(), Some((2, i64::MIN)));
        assert_eq!(p.oldest_ms(), Some(5));
        assert_eq!(p.full(2, u64::MAX), None);
        assert_eq!(
            p.full(1, u64::MAX).map(|id| p.get(id).unwrap().records),
            Some(1)
        );
    }
}
