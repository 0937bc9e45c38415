//! The Kademlia record store of a node that stores other peers' records: libp2p's
//! `MemoryStore` with a ledger in front that charges every stored record to the peer that sent
//! it, so no single peer (and no crowd of them) can take the store over.
//!
//! Kad runs with `StoreInserts::FilterBoth`: records and provider records from other peers
//! come out as events and only enter the store through [`CappedStore::put_from`] /
//! [`CappedStore::add_provider_from`] (see [`admit`]), which check, in order:
//! - the value size;
//! - key ownership: a key ending in `/<peer id>` (every Corolla server record) may only be
//!   written by that peer, and a live record is only replaced by the peer that stored it, so
//!   no one can squat or overwrite another server's entry;
//! - the sender's quota (records and provider records together);
//! - providers per key, total records, total provider keys, total bytes.
//!
//! Kad removes expired records only when someone asks for them, so the ledger sweeps expired
//! entries itself: otherwise dead records would hold their budget forever. The local node's
//! own records (`put_record`, `start_providing`) go through the plain `RecordStore` methods,
//! are never refused by the ledger and are counted in the totals.

use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use libp2p::PeerId;
use libp2p::kad::store::{self, MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::kad::{self, ProviderRecord, Record, RecordKey};

use crate::rt::Instant;

/// Largest Kademlia message a node reads. Only the reader checks it: with libp2p's default
/// (16 KiB) the answer to a provider lookup of ~150 servers with their addresses is refused
/// whole and the lookup finds nothing at all (tests/tests/limits.rs shows it). This carries
/// [`DhtStoreLimits::max_providers_per_key`] providers at 8 addresses each. Buffers grow with
/// what a peer actually sends, not to this.
pub const KAD_MAX_PACKET_BYTES: usize = 256 * 1024;

/// What the store holds at most, and for whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhtStoreLimits {
    /// Largest record value (a Corolla `ServerInfo` is well under 2 KiB).
    pub max_value_bytes: usize,
    /// Records plus provider records stored on behalf of one peer. A Corolla server publishes
    /// two records and two provider records per model.
    pub max_records_per_peer: usize,
    /// Estimated bytes of everything stored (keys, values, addresses, bookkeeping).
    pub max_total_bytes: usize,
    /// Value records in all.
    pub max_records: usize,
    /// Providers kept for one key. Every Corolla server provides `corolla/servers` and
    /// `corolla/model/<fingerprint>`, so this bounds how many servers a lookup can find:
    /// libp2p's default of 20 would hide all but 20 servers of a popular model. 512 still fits
    /// one kad answer ([`KAD_MAX_PACKET_BYTES`]) at 8 addresses each. Kad answers with at most
    /// its replication factor of them (20 unless raised, as the relay does), so on an
    /// ordinary DHT server this only bounds what is stored.
    pub max_providers_per_key: usize,
    /// Distinct keys with providers.
    pub max_provider_keys: usize,
    /// Addresses kept per provider record; the rest are dropped (a server has a handful).
    pub max_addresses_per_provider: usize,
}

impl Default for DhtStoreLimits {
    fn default() -> Self {
        Self {
            max_value_bytes: 16 * 1024,
            max_records_per_peer: 64,
            max_total_bytes: 32 << 20,
            max_records: 16_384,
            max_providers_per_key: 512,
            max_provider_keys: 16_384,
            max_addresses_per_provider: 8,
        }
    }
}

/// Why a record from another peer was not stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("value of {bytes} bytes is over the {max}-byte limit")]
    ValueTooLarge { bytes: usize, max: usize },
    #[error("the key belongs to {owner}")]
    NotOwner { owner: PeerId },
    #[error("{peer} already has {max} records stored here")]
    PeerQuota { peer: PeerId, max: usize },
    #[error("the key already has {max} providers")]
    ProvidersPerKey { max: usize },
    #[error("the store holds its maximum of {max} records")]
    TooManyRecords { max: usize },
    #[error("the store holds providers for its maximum of {max} keys")]
    TooManyProviderKeys { max: usize },
    #[error("the store is at its {max}-byte limit")]
    TotalBytes { max: usize },
    #[error("the record has already expired")]
    Expired,
    #[error("the record store refused it: {0}")]
    Store(String),
}

/// Counters of the store, shared with the application.
#[derive(Debug, Default)]
pub struct DhtStoreStats {
    stored: AtomicU64,
    refused: AtomicU64,
    expired: AtomicU64,
    records: AtomicU64,
    providers: AtomicU64,
    bytes: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DhtStoreSnapshot {
    /// Records and provider records from other peers accepted so far (refreshes included).
    pub stored: u64,
    /// Records and provider records from other peers refused so far.
    pub refused: u64,
    /// Entries swept after they expired.
    pub expired: u64,
    /// Value records held now.
    pub records: u64,
    /// Provider records held now.
    pub providers: u64,
    /// Estimated bytes held now.
    pub bytes: u64,
}

impl DhtStoreStats {
    pub fn snapshot(&self) -> DhtStoreSnapshot {
        DhtStoreSnapshot {
            stored: self.stored.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            records: self.records.load(Ordering::Relaxed),
            providers: self.providers.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// Bookkeeping per stored entry beyond its payload (hash map slots, peer id, expiry).
const ENTRY_OVERHEAD: usize = 96;
/// Expired entries are swept on the insert path at most this often: a flood of inserts against
/// a full store never costs a sweep each, and a refused insert waits at most this long for
/// budget that has expired.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Charge {
    owner: PeerId,
    bytes: usize,
    expires: Option<Instant>,
}

impl Charge {
    fn expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|t| now >= t)
    }
}

fn record_bytes(record: &Record) -> usize {
    record.key.as_ref().len() + record.value.len() + ENTRY_OVERHEAD
}

fn provider_bytes(record: &ProviderRecord) -> usize {
    record.key.as_ref().len() + record.addresses.iter().map(|a| a.as_ref().len()).sum::<usize>() + ENTRY_OVERHEAD
}

/// The peer a key names as its owner: the last `/`-separated part, if it is a peer id.
pub fn key_owner(key: &RecordKey) -> Option<PeerId> {
    let text = std::str::from_utf8(key.as_ref()).ok()?;
    let last = text.rsplit('/').next()?;
    // Peer ids are base58 of at least ~46 characters; skip parsing short parts.
    if last.len() < 40 {
        return None;
    }
    last.parse().ok()
}

/// A `MemoryStore` whose inserts from other peers are charged to them; see the module docs.
pub struct CappedStore {
    inner: MemoryStore,
    local: PeerId,
    limits: DhtStoreLimits,
    records: HashMap<RecordKey, Charge>,
    providers: HashMap<RecordKey, HashMap<PeerId, Charge>>,
    provider_count: usize,
    per_peer: HashMap<PeerId, usize>,
    total_bytes: usize,
    last_sweep: Instant,
    stats: Arc<DhtStoreStats>,
}

impl CappedStore {
    pub fn new(local: PeerId, limits: DhtStoreLimits, stats: Arc<DhtStoreStats>) -> Self {
        let inner = MemoryStore::with_config(
            local,
            MemoryStoreConfig {
                // The ledger enforces these before the store sees a record; the store's own
                // checks stay as a backstop (`max_value_bytes` refuses at `>=`, hence + 1).
                max_records: limits.max_records,
                max_value_bytes: limits.max_value_bytes + 1,
                max_providers_per_key: limits.max_providers_per_key,
                max_provided_keys: limits.max_provider_keys,
            },
        );
        Self {
            inner,
            local,
            limits,
            records: HashMap::new(),
            providers: HashMap::new(),
            provider_count: 0,
            per_peer: HashMap::new(),
            total_bytes: 0,
            last_sweep: Instant::now(),
            stats,
        }
    }

    pub fn limits(&self) -> &DhtStoreLimits {
        &self.limits
    }

    /// Records plus provider records held for `peer`.
    pub fn held_for(&self, peer: &PeerId) -> usize {
        self.per_peer.get(peer).copied().unwrap_or(0)
    }

    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    fn publish(&self) {
        self.stats.records.store(self.records.len() as u64, Ordering::Relaxed);
        self.stats
            .providers
            .store(self.provider_count as u64, Ordering::Relaxed);
        self.stats.bytes.store(self.total_bytes as u64, Ordering::Relaxed);
    }

    fn charge(&mut self, c: &Charge) {
        self.total_bytes += c.bytes;
        *self.per_peer.entry(c.owner).or_default() += 1;
    }

    fn uncharge(&mut self, c: &Charge) {
        self.total_bytes = self.total_bytes.saturating_sub(c.bytes);
        if let Entry::Occupied(mut e) = self.per_peer.entry(c.owner) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    fn forget_record(&mut self, key: &RecordKey) {
        if let Some(c) = self.records.remove(key) {
            self.uncharge(&c);
        }
    }

    fn forget_provider(&mut self, key: &RecordKey, provider: &PeerId) {
        let Some(by_peer) = self.providers.get_mut(key) else {
            return;
        };
        let removed = by_peer.remove(provider);
        if by_peer.is_empty() {
            self.providers.remove(key);
        }
        if let Some(c) = removed {
            self.provider_count -= 1;
            self.uncharge(&c);
        }
    }

    /// Removes every expired entry from the store and frees its budget.
    pub fn sweep(&mut self, now: Instant) {
        self.last_sweep = now;
        let dead_records: Vec<RecordKey> = self
            .records
            .iter()
            .filter(|(_, c)| c.expired(now))
            .map(|(k, _)| k.clone())
            .collect();
        let dead_providers: Vec<(RecordKey, PeerId)> = self
            .providers
            .iter()
            .flat_map(|(k, by_peer)| {
                by_peer
                    .iter()
                    .filter(|(_, c)| c.expired(now))
                    .map(move |(p, _)| (k.clone(), *p))
            })
            .collect();
        let n = (dead_records.len() + dead_providers.len()) as u64;
        for key in dead_records {
            self.inner.remove(&key);
            self.forget_record(&key);
        }
        for (key, provider) in dead_providers {
            self.inner.remove_provider(&key, &provider);
            self.forget_provider(&key, &provider);
        }
        if n > 0 {
            self.stats.expired.fetch_add(n, Ordering::Relaxed);
            tracing::debug!(entries = n, "swept expired DHT entries");
        }
        self.publish();
    }

    fn sweep_if_due(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_sweep) >= SWEEP_INTERVAL {
            self.sweep(now);
        }
    }

    fn count_refusal(&self, source: &PeerId, key: &RecordKey, refusal: &Refusal) {
        let n = self.stats.refused.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(%source, key = %String::from_utf8_lossy(key.as_ref()), %refusal, "DHT record refused");
        if n == 1 || n.is_multiple_of(1000) {
            tracing::info!(
                refused = n,
                records = self.records.len(),
                providers = self.provider_count,
                bytes = self.total_bytes,
                "refusing DHT records over the store's limits"
            );
        }
    }

    /// Checks the budgets for a new entry of `bytes` from `source` that replaces `replaced`.
    fn check_budget(&self, source: &PeerId, bytes: usize, replaced: Option<&Charge>) -> Result<(), Refusal> {
        let held = self.held_for(source) - usize::from(replaced.is_some_and(|c| c.owner == *source));
        if held >= self.limits.max_records_per_peer {
            return Err(Refusal::PeerQuota {
                peer: *source,
                max: self.limits.max_records_per_peer,
            });
        }
        let after = self.total_bytes - replaced.map_or(0, |c| c.bytes) + bytes;
        if after > self.limits.max_total_bytes {
            return Err(Refusal::TotalBytes {
                max: self.limits.max_total_bytes,
            });
        }
        Ok(())
    }

    /// Stores a value record that `source` sent, if the limits allow.
    pub fn put_from(&mut self, source: PeerId, record: Record, now: Instant) -> Result<(), Refusal> {
        self.sweep_if_due(now);
        let key = record.key.clone();
        let result = self.try_put_from(source, record, now);
        match &result {
            Ok(()) => {
                self.stats.stored.fetch_add(1, Ordering::Relaxed);
                self.publish();
            }
            Err(r) => {
                self.count_refusal(&source, &key, r);
            }
        }
        result
    }

    fn try_put_from(&mut self, source: PeerId, record: Record, now: Instant) -> Result<(), Refusal> {
        if record.is_expired(now) {
            return Err(Refusal::Expired);
        }
        if record.value.len() > self.limits.max_value_bytes {
            return Err(Refusal::ValueTooLarge {
                bytes: record.value.len(),
                max: self.limits.max_value_bytes,
            });
        }
        if let Some(owner) = key_owner(&record.key)
            && owner != source
        {
            return Err(Refusal::NotOwner { owner });
        }
        let existing = self.records.get(&record.key).copied().filter(|c| !c.expired(now));
        if let Some(c) = existing
            && c.owner != source
        {
            return Err(Refusal::NotOwner { owner: c.owner });
        }
        if existing.is_none() && self.records.len() >= self.limits.max_records {
            return Err(Refusal::TooManyRecords {
                max: self.limits.max_records,
            });
        }
        let bytes = record_bytes(&record);
        // An expired entry under the same key is replaced either way, so it frees its budget.
        let replaced = self.records.get(&record.key).copied();
        self.check_budget(&source, bytes, replaced.as_ref())?;
        let charge = Charge {
            owner: source,
            bytes,
            expires: record.expires,
        };
        let key = record.key.clone();
        self.inner.put(record).map_err(|e| Refusal::Store(e.to_string()))?;
        self.forget_record(&key);
        self.charge(&charge);
        self.records.insert(key, charge);
        Ok(())
    }

    /// Stores a provider record that its provider sent (kad only passes on provider records
    /// whose provider is the sender), if the limits allow.
    pub fn add_provider_from(&mut self, mut record: ProviderRecord, now: Instant) -> Result<(), Refusal> {
        self.sweep_if_due(now);
        let source = record.provider;
        record.addresses.truncate(self.limits.max_addresses_per_provider);
        let key = record.key.clone();
        let result = self.try_add_provider_from(source, record, now);
        match &result {
            Ok(()) => {
                self.stats.stored.fetch_add(1, Ordering::Relaxed);
                self.publish();
            }
            Err(r) => {
                self.count_refusal(&source, &key, r);
            }
        }
        result
    }

    fn try_add_provider_from(&mut self, source: PeerId, record: ProviderRecord, now: Instant) -> Result<(), Refusal> {
        if record.is_expired(now) {
            return Err(Refusal::Expired);
        }
        let bytes = provider_bytes(&record);
        let existing = self.providers.get(&record.key).and_then(|m| m.get(&source)).copied();
        if existing.is_none() {
            let key_count = self.providers.get(&record.key).map_or(0, HashMap::len);
            if key_count >= self.limits.max_providers_per_key {
                return Err(Refusal::ProvidersPerKey {
                    max: self.limits.max_providers_per_key,
                });
            }
            if key_count == 0 && self.providers.len() >= self.limits.max_provider_keys {
                return Err(Refusal::TooManyProviderKeys {
                    max: self.limits.max_provider_keys,
                });
            }
        }
        self.check_budget(&source, bytes, existing.as_ref())?;
        let charge = Charge {
            owner: source,
            bytes,
            expires: record.expires,
        };
        let key = record.key.clone();
        self.inner
            .add_provider(record)
            .map_err(|e| Refusal::Store(e.to_string()))?;
        self.forget_provider(&key, &source);
        self.charge(&charge);
        self.providers.entry(key).or_default().insert(source, charge);
        self.provider_count += 1;
        Ok(())
    }
}

impl RecordStore for CappedStore {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        self.inner.get(k)
    }

    /// The local node's own record (kad's `put_record`).
    fn put(&mut self, r: Record) -> store::Result<()> {
        let charge = Charge {
            owner: self.local,
            bytes: record_bytes(&r),
            expires: r.expires,
        };
        let key = r.key.clone();
        self.inner.put(r)?;
        self.forget_record(&key);
        self.charge(&charge);
        self.records.insert(key, charge);
        self.publish();
        Ok(())
    }

    fn remove(&mut self, k: &RecordKey) {
        self.inner.remove(k);
        self.forget_record(k);
        self.publish();
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.inner.records()
    }

    /// The local node's own provider record (kad's `start_providing`).
    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()> {
        let charge = Charge {
            owner: record.provider,
            bytes: provider_bytes(&record),
            expires: record.expires,
        };
        let (key, provider) = (record.key.clone(), record.provider);
        let before = self.inner.providers(&key).len();
        let known = self.providers.get(&key).is_some_and(|m| m.contains_key(&provider));
        self.inner.add_provider(record)?;
        // The store ignores a new provider of a full key without an error.
        if known || self.inner.providers(&key).len() > before {
            self.forget_provider(&key, &provider);
            self.charge(&charge);
            self.providers.entry(key).or_default().insert(provider, charge);
            self.provider_count += 1;
        }
        self.publish();
        Ok(())
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.inner.providers(key)
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.inner.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        self.inner.remove_provider(k, p);
        self.forget_provider(k, p);
        self.publish();
    }
}

/// Handles kad's inbound requests under `FilterBoth`: records and provider records from other
/// peers enter the store only through the ledger. Other requests need nothing.
pub fn admit(kad: &mut kad::Behaviour<CappedStore>, request: kad::InboundRequest) {
    let now = Instant::now();
    match request {
        kad::InboundRequest::PutRecord {
            source,
            record: Some(record),
            ..
        } => {
            let _ = kad.store_mut().put_from(source, record, now);
        }
        kad::InboundRequest::AddProvider { record: Some(record) } => {
            let _ = kad.store_mut().add_provider_from(record, now);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> DhtStoreLimits {
        DhtStoreLimits {
            max_value_bytes: 100,
            max_records_per_peer: 3,
            max_total_bytes: 10_000,
            max_records: 1000,
            max_providers_per_key: 4,
            max_provider_keys: 100,
            max_addresses_per_provider: 2,
        }
    }

    fn store(limits: DhtStoreLimits) -> CappedStore {
        CappedStore::new(PeerId::random(), limits, Arc::default())
    }

    fn record(key: &str, value: usize, expires: Option<Instant>) -> Record {
        let mut r = Record::new(RecordKey::new(&key), vec![7; value]);
        r.expires = expires;
        r
    }

    fn provider(key: &str, provider: PeerId, expires: Option<Instant>) -> ProviderRecord {
        let addr: libp2p::Multiaddr = "/ip4/10.0.0.1/tcp/4001".parse().expect("address");
        ProviderRecord {
            key: RecordKey::new(&key),
            provider,
            expires,
            addresses: vec![addr; 5],
        }
    }

    #[test]
    fn per_publisher_quota_leaves_room_for_others() {
        let mut s = store(limits());
        let now = Instant::now();
        let (flooder, other) = (PeerId::random(), PeerId::random());
        let mut stored = 0;
        for i in 0..50 {
            if s.put_from(flooder, record(&format!("k{i}"), 10, None), now).is_ok() {
                stored += 1;
            }
        }
        assert_eq!(stored, 3);
        assert_eq!(s.held_for(&flooder), 3);
        assert!(matches!(
            s.put_from(flooder, record("k99", 10, None), now),
            Err(Refusal::PeerQuota { max: 3, .. })
        ));
        // Refreshing one of its own records is not a new one.
        assert!(s.put_from(flooder, record("k0", 20, None), now).is_ok());
        // Provider records count toward the same quota.
        assert!(matches!(
            s.add_provider_from(provider("p", flooder, None), now),
            Err(Refusal::PeerQuota { .. })
        ));
        assert!(s.put_from(other, record("o1", 10, None), now).is_ok());
        assert!(s.get(&RecordKey::new(&"o1")).is_some());
        assert!(s.get(&RecordKey::new(&"k10")).is_none());
        let snap = s.stats.snapshot();
        assert_eq!((snap.records, snap.refused), (4, 49));
    }

    #[test]
    fn owned_keys_and_live_records_cannot_be_taken_over() {
        let mut s = store(limits());
        let now = Instant::now();
        let (owner, thief) = (PeerId::random(), PeerId::random());
        let key = format!("corolla/peer/{owner}");
        assert_eq!(key_owner(&RecordKey::new(&key)), Some(owner));
        assert_eq!(
            s.put_from(thief, record(&key, 10, None), now),
            Err(Refusal::NotOwner { owner })
        );
        assert!(s.put_from(owner, record(&key, 10, None), now).is_ok());
        // A key that names no peer: first live writer keeps it.
        assert!(
            s.put_from(owner, record("shared", 10, Some(now + Duration::from_secs(5))), now)
                .is_ok()
        );
        assert!(s.put_from(thief, record("shared", 10, None), now).is_err());
        // Once it has expired, anyone may write it.
        let later = now + Duration::from_secs(6);
        assert!(s.put_from(thief, record("shared", 10, None), later).is_ok());
        assert_eq!(s.held_for(&owner), 1);
        assert_eq!(s.held_for(&thief), 1);
    }

    #[test]
    fn value_size_and_total_bytes() {
        let mut s = store(DhtStoreLimits {
            max_records_per_peer: 1000,
            max_total_bytes: 1_000,
            ..limits()
        });
        let now = Instant::now();
        let p = PeerId::random();
        assert!(matches!(
            s.put_from(p, record("big", 101, None), now),
            Err(Refusal::ValueTooLarge { bytes: 101, max: 100 })
        ));
        let mut n = 0;
        for i in 0..100 {
            if s.put_from(PeerId::random(), record(&format!("r{i}"), 100, None), now)
                .is_ok()
            {
                n += 1;
            }
        }
        assert!(n > 0 && n < 10, "{n} records of ~200 bytes in 1000");
        assert!(s.total_bytes() <= 1_000);
    }

    #[test]
    fn providers_per_key_and_address_truncation() {
        let mut s = store(limits());
        let now = Instant::now();
        let mut accepted = 0;
        for _ in 0..10 {
            if s.add_provider_from(provider("corolla/servers", PeerId::random(), None), now)
                .is_ok()
            {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 4);
        let held = s.providers(&RecordKey::new(&"corolla/servers"));
        assert_eq!(held.len(), 4);
        assert!(held.iter().all(|p| p.addresses.len() == 2));
        // A known provider refreshes in place even when the key is full.
        let known = held[0].provider;
        assert!(
            s.add_provider_from(provider("corolla/servers", known, None), now)
                .is_ok()
        );
        assert_eq!(s.stats.snapshot().providers, 4);
    }

    #[test]
    fn expired_entries_free_their_budget() {
        let mut s = store(limits());
        let now = Instant::now();
        let p = PeerId::random();
        let soon = Some(now + Duration::from_secs(10));
        assert!(s.put_from(p, record("a", 10, soon), now).is_ok());
        assert!(s.put_from(p, record("b", 10, soon), now).is_ok());
        assert!(s.add_provider_from(provider("c", p, soon), now).is_ok());
        for i in 0..4 {
            assert!(
                s.add_provider_from(provider("full", PeerId::random(), soon), now)
                    .is_ok(),
                "{i}"
            );
        }
        assert!(s.put_from(p, record("d", 10, None), now).is_err());
        assert!(
            s.add_provider_from(provider("full", PeerId::random(), None), now)
                .is_err()
        );
        let later = now + Duration::from_secs(11);
        // The next insert sweeps the expired entries, and there is room again.
        assert!(
            s.add_provider_from(provider("full", PeerId::random(), None), later)
                .is_ok()
        );
        assert!(s.put_from(p, record("d", 10, None), later).is_ok());
        assert_eq!(s.held_for(&p), 1);
        assert!(s.get(&RecordKey::new(&"a")).is_none());
        assert_eq!(s.providers(&RecordKey::new(&"full")).len(), 1);
        let snap = s.stats.snapshot();
        assert_eq!((snap.records, snap.providers, snap.expired), (1, 1, 7));
    }

    #[test]
    fn local_records_are_never_refused_and_are_counted() {
        let local = PeerId::random();
        let mut s = CappedStore::new(local, limits(), Arc::default());
        for i in 0..10 {
            s.put(record(&format!("mine{i}"), 50, None)).expect("local put");
        }
        s.add_provider(provider("corolla/servers", local, None))
            .expect("local provide");
        assert_eq!(s.held_for(&local), 11);
        assert_eq!(s.provided().count(), 1);
        s.remove(&RecordKey::new(&"mine0"));
        s.remove_provider(&RecordKey::new(&"corolla/servers"), &local);
        assert_eq!(s.held_for(&local), 9);
        let snap = s.stats.snapshot();
        assert_eq!((snap.records, snap.providers), (9, 0));
    }
}
