//! The in-memory config index built from a control-plane [`Snapshot`] (DESIGN §5, §7, §8).
//!
//! Everything the request path needs is resolved here once per snapshot: virtual keys by the
//! SHA-256 of the key, each key's aliases to a [`Pool`] of [`Target`]s, and every target's model
//! and connection. Lookups ([`ConfigIndex::authenticate`], [`KeyEntry::pool`],
//! [`Pool::attempt_order`]) do not allocate; they return small views borrowing the index, whose
//! records are laid out compactly (see [`ConfigIndex`]). [`IndexBuilder`] builds it from a
//! snapshot sent in parts.
//!
//! Invalid parts of a snapshot (dangling references, unknown providers, malformed hashes or
//! limits) are skipped with a warning instead of rejecting the whole snapshot: the control plane
//! validates every write and enforces referential integrity, so such entries can only come from a
//! bug or a version skew, and refusing the snapshot would leave *every* key on stale config (a
//! revoked key would keep working) to protect a handful of broken entries. A skipped assignment
//! simply does not route (404 `model_not_found`), which fails closed.

use llm_proxy_proto::v1::{
    Snapshot, SnapshotAssignment, SnapshotConnection, SnapshotModel, SnapshotVirtualKey,
};
use secrecy::SecretString;
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

pub use llm_proxy_catalog::{ConnectionOption, DEFAULT_UPSTREAM_TIMEOUT, Provider};

/// A provider connection. `Debug` redacts the credential (via [`SecretString`]).
#[derive(Debug)]
pub struct ConnectionEntry {
    pub id: String,
    pub name: String,
    pub provider: Provider,
    /// Base URL without a trailing `/`.
    pub endpoint: String,
    pub credential: SecretString,
    pub options: BTreeMap<String, String>,
    /// From option `timeout_s` (seconds, fractional allowed); [`DEFAULT_UPSTREAM_TIMEOUT`] otherwise.
    pub timeout: Duration,
}

impl ConnectionEntry {
    /// A provider option (`--set key=value`).
    pub fn option(&self, option: ConnectionOption) -> Option<&str> {
        self.options.get(option.name()).map(String::as_str)
    }
}

#[derive(Debug)]
pub struct ModelEntry {
    pub id: String,
    pub name: String,
    /// The provider's model name.
    pub remote: String,
    /// Azure deployment name.
    pub deployment: Option<String>,
}

/// Rate limits of one assignment; `None` = unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Limits {
    /// Requests per second.
    pub tps: Option<u32>,
    /// Bucket capacity for requests; `None` = `tps`.
    pub burst: Option<u32>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
}

impl Limits {
    /// Request bucket capacity: `burst`, defaulting to `tps`.
    pub fn effective_burst(&self) -> Option<u32> {
        self.burst.or(self.tps)
    }
}

/// Where and how one assignment routes: its alias, model, connection, weight and limits. Many
/// assignments share one (a config of 300k assignments typically has a handful), so the index
/// stores each distinct one once and every assignment refers to it by number.
#[derive(Debug)]
struct Route {
    /// Shared by every route with this alias in the index (also the metrics label).
    alias: Arc<str>,
    weight: u32,
    limits: Limits,
    model: Arc<ModelEntry>,
    connection: Arc<ConnectionEntry>,
}

/// A string in [`ConfigIndex`]'s id arena.
#[derive(Debug, Clone, Copy)]
struct IdRef {
    start: u32,
    len: u32,
}

/// One assignment: its id (for rate-limit buckets and logs) and its route.
#[derive(Debug, Clone, Copy)]
struct TargetRecord {
    id: IdRef,
    route: u32,
}

/// [`KeyRecord::expires_at_unix`] of a key that never expires.
const NEVER: u32 = u32::MAX;

/// One virtual key: its targets are `targets[first_target..first_target + target_count]`, grouped
/// by alias (each alias's targets contiguous, in snapshot order). 24 bytes.
#[derive(Debug)]
struct KeyRecord {
    id: IdRef,
    first_target: u32,
    target_count: u32,
    /// Unix seconds, [`NEVER`] if the key does not expire. 32 bits reach the year 2106: an expiry
    /// before 1970 is stored as 0 (expired) and one after 2106 as 2106.
    expires_at_unix: u32,
    enabled: bool,
}

/// One assignment as the request path sees it: where a request for an alias may go.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub assignment_id: &'a str,
    pub alias: &'a Arc<str>,
    pub weight: u32,
    pub limits: Limits,
    pub model: &'a ModelEntry,
    pub connection: &'a ConnectionEntry,
}

/// The targets of one key sharing an alias (declaration order = snapshot order).
#[derive(Debug, Clone, Copy)]
pub struct Pool<'a> {
    index: &'a ConfigIndex,
    records: &'a [TargetRecord],
}

/// Maps a uniformly random `roll` to `[0, bound)` (Lemire's multiply-shift, no division).
fn scale(roll: u64, bound: u64) -> u64 {
    // The product of two u64 fits u128; the high half is < bound.
    ((u128::from(roll) * u128::from(bound)) >> 64) as u64
}

/// SplitMix64 step: derives the next independent-looking roll from the previous one.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<'a> Pool<'a> {
    /// The pool's alias.
    pub fn alias(&self) -> &'a Arc<str> {
        // A pool is never empty: it exists because one assignment has its alias.
        &self.index.route(self.records[0]).alias
    }

    /// Number of targets.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Always false (a pool exists because it has a target); for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The `i`-th target in snapshot order.
    pub fn target(&self, i: usize) -> Option<Target<'a>> {
        self.records.get(i).map(|r| self.index.target(*r))
    }

    /// The targets in snapshot order.
    pub fn targets(&self) -> impl ExactSizeIterator<Item = Target<'a>> + 'a {
        let index = self.index;
        self.records.iter().map(move |r| index.target(*r))
    }

    fn weight(&self, i: usize) -> u64 {
        self.records
            .get(i)
            .map_or(0, |r| u64::from(self.index.route(*r).weight))
    }

    /// Sum of the targets' weights.
    pub fn total_weight(&self) -> u64 {
        (0..self.records.len()).map(|i| self.weight(i)).sum()
    }

    /// Order in which to try targets: first a weighted random pick (by `weight`), then the
    /// remaining targets for failover, each again picked by weight among those not yet tried
    /// (weighted sampling without replacement, so failover traffic also follows the weights).
    /// Every target appears exactly once. `roll` is a uniformly random u64 supplied by the caller.
    ///
    /// No heap allocation for pools of up to 64 targets (a bitmask tracks tried targets); larger
    /// pools allocate one small vector when failover starts (the first pick never allocates).
    pub fn attempt_order(&self, roll: u64) -> AttemptOrder<'a> {
        AttemptOrder {
            pool: *self,
            roll,
            step: 0,
            first: 0,
            tried: Tried::Bits(0),
            remaining_weight: self.total_weight(),
        }
    }
}

#[derive(Debug)]
enum Tried {
    Bits(u64),
    Many(Vec<bool>),
}

/// Iterator returned by [`Pool::attempt_order`].
#[derive(Debug)]
pub struct AttemptOrder<'a> {
    pool: Pool<'a>,
    roll: u64,
    step: usize,
    /// The weighted pick, marked as tried only when failover starts (keeps step 0 cheap).
    first: usize,
    tried: Tried,
    remaining_weight: u64,
}

impl AttemptOrder<'_> {
    fn is_tried(&self, i: usize) -> bool {
        match &self.tried {
            Tried::Bits(bits) => i < 64 && bits & (1u64 << i) != 0,
            Tried::Many(v) => v.get(i).copied().unwrap_or(false),
        }
    }

    fn mark(&mut self, i: usize) {
        let n = self.pool.len();
        if let Tried::Bits(bits) = &self.tried {
            if n <= 64 {
                self.tried = Tried::Bits(bits | (1u64 << i));
                return;
            }
            let bits = *bits;
            self.tried = Tried::Many((0..n).map(|j| j < 64 && bits & (1u64 << j) != 0).collect());
        }
        if let Tried::Many(v) = &mut self.tried
            && let Some(slot) = v.get_mut(i)
        {
            *slot = true;
        }
    }

    /// The first target (in snapshot order) not yet tried whose cumulative weight among the
    /// untried ones exceeds `point`; the last untried one if rounding leaves none.
    fn pick_untried(&self, point: u64) -> usize {
        let mut acc = 0u64;
        let mut last_untried = 0;
        for i in 0..self.pool.len() {
            if self.is_tried(i) {
                continue;
            }
            last_untried = i;
            acc += self.pool.weight(i);
            if point < acc {
                return i;
            }
        }
        last_untried
    }
}

impl<'a> Iterator for AttemptOrder<'a> {
    type Item = Target<'a>;

    fn next(&mut self) -> Option<Target<'a>> {
        let len = self.pool.len();
        if self.step >= len {
            return None;
        }
        let chosen = if self.step == 0 {
            self.first = self.pick_untried(scale(self.roll, self.remaining_weight));
            self.first
        } else {
            if self.step == 1 {
                self.mark(self.first);
            }
            self.roll = mix(self.roll);
            self.pick_untried(scale(self.roll, self.remaining_weight))
        };
        let target = self.pool.target(chosen)?;
        self.remaining_weight = self
            .remaining_weight
            .saturating_sub(u64::from(target.weight));
        if self.step > 0 && self.step + 1 < len {
            self.mark(chosen);
        }
        self.step += 1;
        Some(target)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.pool.len() - self.step.min(self.pool.len());
        (left, Some(left))
    }
}

impl ExactSizeIterator for AttemptOrder<'_> {}

/// A virtual key and the aliases it may call.
#[derive(Debug, Clone, Copy)]
pub struct KeyEntry<'a> {
    index: &'a ConfigIndex,
    record: &'a KeyRecord,
}

impl<'a> KeyEntry<'a> {
    pub fn id(&self) -> &'a str {
        self.index.id(self.record.id)
    }

    pub fn enabled(&self) -> bool {
        self.record.enabled
    }

    /// Unix seconds; the key is expired from this instant on.
    pub fn expires_at_unix(&self) -> Option<i64> {
        (self.record.expires_at_unix != NEVER).then_some(i64::from(self.record.expires_at_unix))
    }

    fn records(&self) -> &'a [TargetRecord] {
        let start = self.record.first_target as usize;
        let end = start + self.record.target_count as usize;
        self.index.targets.get(start..end).unwrap_or_default()
    }

    /// The key's pools, each alias once (in index order, not sorted).
    fn pools(&self) -> impl Iterator<Item = Pool<'a>> + 'a {
        let index = self.index;
        let mut rest = self.records();
        std::iter::from_fn(move || {
            let first = rest.first()?;
            let alias = &index.route(*first).alias;
            let run = rest
                .iter()
                .position(|r| !Arc::ptr_eq(&index.route(*r).alias, alias))
                .unwrap_or(rest.len());
            let (records, tail) = rest.split_at(run);
            rest = tail;
            Some(Pool { index, records })
        })
    }

    /// The pool of targets for `alias`, if this key may call it.
    pub fn pool(&self, alias: &str) -> Option<Pool<'a>> {
        self.pools().find(|p| &**p.alias() == alias)
    }

    /// This key's aliases, sorted (for `GET /v1/models`).
    pub fn alias_names(&self) -> Vec<&'a str> {
        let mut names: Vec<&str> = self.pools().map(|p| &**p.alias()).collect();
        names.sort_unstable();
        names
    }
}

/// Why a presented key was refused. Messages are safe for a 401 body: they never contain the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("Incorrect API key provided.")]
    UnknownKey,
    #[error("This API key is disabled.")]
    Disabled,
    #[error("This API key has expired.")]
    Expired,
}

/// A snapshot that cannot be used at all (individual bad entries are skipped instead).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("snapshot has no cluster_epoch")]
    MissingEpoch,
    #[error("snapshot has a negative version ({0})")]
    NegativeVersion(i64),
    #[error(
        "snapshot part belongs to {got_epoch}/{got_version}, not to the snapshot being assembled ({epoch}/{version})"
    )]
    PartMismatch {
        epoch: String,
        version: i64,
        got_epoch: String,
        got_version: i64,
    },
    #[error("snapshot ids exceed the index's 4 GiB id arena")]
    TooLarge,
}

/// The first 128 bits of a virtual key's SHA-256, the lookup key of [`ConfigIndex`]. Half the
/// digest keeps the table small (20 bytes a slot instead of 36) and is still far beyond reach: a
/// presented key matching a stored one on 128 bits of SHA-256 takes ~2^128 attempts.
#[derive(Clone, Copy, PartialEq, Eq)]
struct KeyDigest([u8; 16]);

impl KeyDigest {
    fn of(sha256: &[u8; 32]) -> Self {
        let mut prefix = [0u8; 16];
        prefix.copy_from_slice(&sha256[..16]);
        Self(prefix)
    }
}

impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// Hasher for [`KeyDigest`]: the digest is already uniformly distributed, so its first 8 bytes are
/// the hash (no SipHash round on the hot path). Lookups cannot be steered into collisions cheaply
/// either: the presented key goes through SHA-256 first, and the table's contents come from the
/// control plane, not from callers.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than `KeyDigest` is hashed; FNV-1a keeps it correct.
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Digest -> position in `ConfigIndex::keys`.
type KeyMap = HashMap<KeyDigest, u32, BuildHasherDefault<DigestHasher>>;

/// How much of a snapshot made it into the index (for logs and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexCounts {
    pub connections: usize,
    pub models: usize,
    pub keys: usize,
    pub assignments: usize,
    /// Entries of any kind left out (see the module docs).
    pub skipped: usize,
}

/// The whole routing config of one snapshot, immutable once built.
///
/// Laid out for size (DESIGN §15: ≤ 64 MiB with 100k keys): flat vectors of small records that
/// refer to each other by position, all ids in one string arena, and each distinct route (alias,
/// model, weight, limits) stored once; about 50 bytes per key and 40 per assignment.
pub struct ConfigIndex {
    pub version: i64,
    pub cluster_epoch: String,
    pub live_data_planes: i64,
    pub counts: IndexCounts,
    by_digest: KeyMap,
    keys: Vec<KeyRecord>,
    targets: Vec<TargetRecord>,
    routes: Vec<Route>,
    ids: String,
}

impl fmt::Debug for ConfigIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigIndex")
            .field("version", &self.version)
            .field("cluster_epoch", &self.cluster_epoch)
            .field("live_data_planes", &self.live_data_planes)
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

fn parse_timeout(conn_id: &str, options: &BTreeMap<String, String>) -> Duration {
    let Some(raw) = options.get(ConnectionOption::TimeoutS.name()) else {
        return DEFAULT_UPSTREAM_TIMEOUT;
    };
    llm_proxy_catalog::timeout_s(raw).unwrap_or_else(|err| {
        tracing::warn!(connection_id = %conn_id, error = %err, "invalid timeout_s option; using the default of 600 s");
        DEFAULT_UPSTREAM_TIMEOUT
    })
}

fn connection_entry(c: SnapshotConnection) -> Result<ConnectionEntry, String> {
    let provider = c.provider.parse::<Provider>().map_err(|e| e.to_string())?;
    let options: BTreeMap<String, String> = c.options.into_iter().collect();
    let timeout = parse_timeout(&c.id, &options);
    Ok(ConnectionEntry {
        provider,
        endpoint: c.endpoint.trim().trim_end_matches('/').to_owned(),
        credential: SecretString::from(c.credential),
        options,
        timeout,
        name: c.name,
        id: c.id,
    })
}

/// A positive limit as `T`, saturating; `Err` for zero or negative values.
fn limit<T: TryFrom<i64> + Copy>(value: Option<i64>, max: T) -> Result<Option<T>, i64> {
    match value {
        None => Ok(None),
        Some(v) if v <= 0 => Err(v),
        Some(v) => Ok(Some(T::try_from(v).unwrap_or(max))),
    }
}

fn limits(a: &SnapshotAssignment) -> Result<Limits, String> {
    let bad = |field: &str, v: i64| format!("{field} must be positive, got {v}");
    Ok(Limits {
        tps: limit(a.tps, u32::MAX).map_err(|v| bad("tps", v))?,
        burst: limit(a.burst, u32::MAX).map_err(|v| bad("burst", v))?,
        tpm: limit(a.tpm, u64::MAX).map_err(|v| bad("tpm", v))?,
    })
}

impl ConfigIndex {
    /// Builds the index from a whole (single-part) snapshot. Bad entries are skipped with a
    /// `warn!` (see the module docs); only a snapshot without identity (epoch, version) is
    /// rejected.
    pub fn build(snapshot: Snapshot) -> Result<ConfigIndex, IndexError> {
        let mut builder = IndexBuilder::new(&snapshot)?;
        builder.add_part(snapshot)?;
        Ok(builder.finish())
    }

    /// Looks up a presented virtual key by its SHA-256. `now_unix` decides expiry: a key whose
    /// `expires_at_unix <= now_unix` is expired.
    pub fn authenticate(
        &self,
        presented_key: &str,
        now_unix: i64,
    ) -> Result<KeyEntry<'_>, AuthError> {
        let digest = KeyDigest::of(&Sha256::digest(presented_key.as_bytes()).into());
        let record = self
            .by_digest
            .get(&digest)
            .and_then(|&at| self.keys.get(at as usize))
            .ok_or(AuthError::UnknownKey)?;
        if !record.enabled {
            return Err(AuthError::Disabled);
        }
        if i64::from(record.expires_at_unix) <= now_unix {
            return Err(AuthError::Expired);
        }
        Ok(KeyEntry {
            index: self,
            record,
        })
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    fn id(&self, id: IdRef) -> &str {
        let start = id.start as usize;
        self.ids
            .get(start..start + id.len as usize)
            .unwrap_or_default()
    }

    fn route(&self, record: TargetRecord) -> &Route {
        // The builder only stores route numbers it has just pushed.
        &self.routes[record.route as usize]
    }

    fn target(&self, record: TargetRecord) -> Target<'_> {
        let route = self.route(record);
        Target {
            assignment_id: self.id(record.id),
            alias: &route.alias,
            weight: route.weight,
            limits: route.limits,
            model: &route.model,
            connection: &route.connection,
        }
    }
}

/// What makes two assignments route alike (see [`Route`]).
#[derive(PartialEq, Eq, Hash)]
struct RouteKey {
    alias: Arc<str>,
    model: u32,
    weight: u32,
    limits: Limits,
}

/// Builds a [`ConfigIndex`] from the parts of a snapshot (see `Snapshot.more` in
/// `proto/llmproxy/v1/config.proto`), one part at a time, so that a large config never exists as
/// one decoded message on the data plane.
pub struct IndexBuilder {
    index: ConfigIndex,
    connections: HashMap<String, Arc<ConnectionEntry>>,
    /// Model id -> (model, its connection, its number in route keys).
    models: HashMap<String, (Arc<ModelEntry>, Arc<ConnectionEntry>, u32)>,
    next_model_number: u32,
    route_numbers: HashMap<RouteKey, u32>,
    /// One allocation per distinct alias, however many keys use it.
    aliases: HashSet<Arc<str>>,
}

impl fmt::Debug for IndexBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IndexBuilder")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// An assignment waiting for its key's targets to be laid out.
struct StagedTarget {
    key: u32,
    record: TargetRecord,
}

impl IndexBuilder {
    /// Starts a snapshot from its first part (which is not consumed: pass it to
    /// [`IndexBuilder::add_part`] next).
    pub fn new(first: &Snapshot) -> Result<Self, IndexError> {
        if first.cluster_epoch.is_empty() {
            return Err(IndexError::MissingEpoch);
        }
        if first.version < 0 {
            return Err(IndexError::NegativeVersion(first.version));
        }
        Ok(Self {
            index: ConfigIndex {
                version: first.version,
                cluster_epoch: first.cluster_epoch.clone(),
                live_data_planes: first.live_data_planes,
                counts: IndexCounts::default(),
                by_digest: KeyMap::default(),
                keys: Vec::new(),
                targets: Vec::new(),
                routes: Vec::new(),
                ids: String::new(),
            },
            connections: HashMap::new(),
            models: HashMap::new(),
            next_model_number: 0,
            route_numbers: HashMap::new(),
            aliases: HashSet::new(),
        })
    }

    /// Reserves room for a config the size of `previous` (configs change little between
    /// versions), so that the key table is not rehashed while it grows: a rehash holds the old
    /// and the new table at once, on top of the index being replaced.
    pub fn reserve_like(&mut self, previous: &ConfigIndex) {
        let index = &mut self.index;
        index.by_digest.reserve(previous.keys.len());
        index.keys.reserve(previous.keys.len());
        index.targets.reserve(previous.targets.len());
        index.ids.reserve(previous.ids.len());
    }

    /// The epoch and version being assembled.
    pub fn identity(&self) -> (&str, i64) {
        (&self.index.cluster_epoch, self.index.version)
    }

    fn store_id(&mut self, id: &str) -> Result<IdRef, IndexError> {
        let start = u32::try_from(self.index.ids.len()).map_err(|_| IndexError::TooLarge)?;
        let len = u32::try_from(id.len()).map_err(|_| IndexError::TooLarge)?;
        if start.checked_add(len).is_none() {
            return Err(IndexError::TooLarge);
        }
        self.index.ids.push_str(id);
        Ok(IdRef { start, len })
    }

    /// Adds one part: its connections, then models, then keys with their assignments. An
    /// assignment whose key is not in the same part is skipped (the control plane keeps them
    /// together).
    pub fn add_part(&mut self, part: Snapshot) -> Result<(), IndexError> {
        let Snapshot {
            cluster_epoch,
            version,
            connections,
            models,
            virtual_keys,
            assignments,
            live_data_planes,
            more: _,
            part: _,
        } = part;
        if cluster_epoch != self.index.cluster_epoch || version != self.index.version {
            return Err(IndexError::PartMismatch {
                epoch: self.index.cluster_epoch.clone(),
                version: self.index.version,
                got_epoch: cluster_epoch,
                got_version: version,
            });
        }
        self.index.live_data_planes = live_data_planes;
        for c in connections {
            self.add_connection(c);
        }
        for m in models {
            self.add_model(m);
        }
        self.add_keys(virtual_keys, assignments)
    }

    fn add_connection(&mut self, c: SnapshotConnection) {
        let counts = &mut self.index.counts;
        let id = c.id.clone();
        match connection_entry(c) {
            Ok(entry) => {
                if self
                    .connections
                    .insert(id.clone(), Arc::new(entry))
                    .is_some()
                {
                    tracing::warn!(connection_id = %id, "duplicate connection id in snapshot; keeping the last");
                    counts.skipped += 1;
                } else {
                    counts.connections += 1;
                }
            }
            Err(reason) => {
                tracing::warn!(connection_id = %id, %reason, "skipping connection");
                counts.skipped += 1;
            }
        }
    }

    fn add_model(&mut self, m: SnapshotModel) {
        let SnapshotModel {
            id,
            connection_id,
            name,
            remote,
            deployment,
        } = m;
        let counts = &mut self.index.counts;
        let Some(conn) = self.connections.get(&connection_id) else {
            tracing::warn!(model_id = %id, %connection_id, "skipping model: its connection is missing from the snapshot");
            counts.skipped += 1;
            return;
        };
        // Never reused, even when a duplicate id replaces a model: routes are told apart by it.
        let number = self.next_model_number;
        self.next_model_number = self.next_model_number.saturating_add(1);
        let entry = Arc::new(ModelEntry {
            id: id.clone(),
            name,
            remote,
            deployment,
        });
        if self
            .models
            .insert(id.clone(), (entry, conn.clone(), number))
            .is_some()
        {
            tracing::warn!(model_id = %id, "duplicate model id in snapshot; keeping the last");
            counts.skipped += 1;
        } else {
            counts.models += 1;
        }
    }

    /// The number of the route `a` takes, adding it if new; `None` (after a warning) if the
    /// assignment cannot route.
    fn route_of(&mut self, a: &SnapshotAssignment) -> Option<u32> {
        let Some((model, connection, model_number)) = self.models.get(&a.model_id) else {
            tracing::warn!(assignment_id = %a.id, model_id = %a.model_id, "skipping assignment: its model is missing from the snapshot");
            return None;
        };
        let limits = match limits(a) {
            Ok(l) => l,
            Err(reason) => {
                tracing::warn!(assignment_id = %a.id, %reason, "skipping assignment: invalid limit");
                return None;
            }
        };
        let weight = if a.weight <= 0 {
            tracing::warn!(assignment_id = %a.id, weight = a.weight, "assignment weight must be positive; using 1");
            1
        } else {
            u32::try_from(a.weight).unwrap_or(u32::MAX)
        };
        let alias_name = if a.alias.is_empty() {
            model.name.as_str()
        } else {
            a.alias.as_str()
        };
        let alias = match self.aliases.get(alias_name) {
            Some(alias) => alias.clone(),
            None => {
                let alias: Arc<str> = Arc::from(alias_name);
                self.aliases.insert(alias.clone());
                alias
            }
        };
        let key = RouteKey {
            alias,
            model: *model_number,
            weight,
            limits,
        };
        if let Some(&number) = self.route_numbers.get(&key) {
            return Some(number);
        }
        let number = u32::try_from(self.index.routes.len()).ok()?;
        self.index.routes.push(Route {
            alias: key.alias.clone(),
            weight,
            limits,
            model: model.clone(),
            connection: connection.clone(),
        });
        self.route_numbers.insert(key, number);
        Some(number)
    }

    fn add_keys(
        &mut self,
        virtual_keys: Vec<SnapshotVirtualKey>,
        assignments: Vec<SnapshotAssignment>,
    ) -> Result<(), IndexError> {
        // Key id -> position in `index.keys`, for this part's keys only.
        let mut part_keys: HashMap<&str, u32> = HashMap::with_capacity(virtual_keys.len());
        for k in &virtual_keys {
            let Ok(digest) = <[u8; 32]>::try_from(k.key_sha256.as_slice()) else {
                tracing::warn!(vkey_id = %k.id, len = k.key_sha256.len(), "skipping virtual key: key_sha256 is not 32 bytes");
                self.index.counts.skipped += 1;
                continue;
            };
            let digest = KeyDigest::of(&digest);
            let Ok(position) = u32::try_from(self.index.keys.len()) else {
                return Err(IndexError::TooLarge);
            };
            if self.index.by_digest.contains_key(&digest) || part_keys.contains_key(k.id.as_str()) {
                tracing::warn!(vkey_id = %k.id, "skipping virtual key: duplicate id or key hash in snapshot");
                self.index.counts.skipped += 1;
                continue;
            }
            let id = self.store_id(&k.id)?;
            self.index.by_digest.insert(digest, position);
            self.index.keys.push(KeyRecord {
                id,
                expires_at_unix: k.expires_at_unix.map_or(NEVER, |at| {
                    u32::try_from(at.clamp(0, i64::from(NEVER - 1))).unwrap_or(NEVER - 1)
                }),
                first_target: 0,
                target_count: 0,
                enabled: k.enabled,
            });
            part_keys.insert(&k.id, position);
        }

        let mut staged: Vec<StagedTarget> = Vec::with_capacity(assignments.len());
        for a in &assignments {
            let Some(&key) = part_keys.get(a.vkey_id.as_str()) else {
                tracing::warn!(assignment_id = %a.id, vkey_id = %a.vkey_id, "skipping assignment: its virtual key is missing from the snapshot (or from its part)");
                self.index.counts.skipped += 1;
                continue;
            };
            let Some(route) = self.route_of(a) else {
                self.index.counts.skipped += 1;
                continue;
            };
            let id = self.store_id(&a.id)?;
            staged.push(StagedTarget {
                key,
                record: TargetRecord { id, route },
            });
        }
        drop(part_keys);
        // Each key's targets contiguous, grouped by alias; the sort is stable, so a pool keeps
        // snapshot order.
        let routes = &self.index.routes;
        staged.sort_by(|a, b| {
            a.key.cmp(&b.key).then_with(|| {
                routes[a.record.route as usize]
                    .alias
                    .cmp(&routes[b.record.route as usize].alias)
            })
        });
        self.index.targets.reserve(staged.len());
        for StagedTarget { key, record } in staged {
            let Ok(at) = u32::try_from(self.index.targets.len()) else {
                return Err(IndexError::TooLarge);
            };
            if let Some(entry) = self.index.keys.get_mut(key as usize) {
                if entry.target_count == 0 {
                    entry.first_target = at;
                }
                entry.target_count += 1;
            }
            self.index.targets.push(record);
            self.index.counts.assignments += 1;
        }
        Ok(())
    }

    /// The finished index.
    pub fn finish(mut self) -> ConfigIndex {
        let index = &mut self.index;
        index.counts.keys = index.keys.len();
        index.keys.shrink_to_fit();
        index.targets.shrink_to_fit();
        index.ids.shrink_to_fit();
        index.by_digest.shrink_to_fit();
        self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(key: &str) -> Vec<u8> {
        Sha256::digest(key.as_bytes()).to_vec()
    }

    fn conn(id: &str, provider: &str, options: &[(&str, &str)]) -> SnapshotConnection {
        SnapshotConnection {
            id: id.into(),
            name: format!("name-{id}"),
            provider: provider.into(),
            endpoint: "https://api.example.com/".into(),
            credential: "sk-top-secret-credential".into(),
            options: options
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn model(id: &str, conn: &str, name: &str) -> SnapshotModel {
        SnapshotModel {
            id: id.into(),
            connection_id: conn.into(),
            name: name.into(),
            remote: format!("{name}-remote"),
            deployment: None,
        }
    }

    fn vkey(id: &str, key: &str, enabled: bool, expires: Option<i64>) -> SnapshotVirtualKey {
        SnapshotVirtualKey {
            id: id.into(),
            name: format!("name-{id}"),
            key_sha256: sha(key),
            enabled,
            expires_at_unix: expires,
        }
    }

    fn asg(id: &str, vkey: &str, model: &str, alias: &str, weight: i64) -> SnapshotAssignment {
        SnapshotAssignment {
            id: id.into(),
            vkey_id: vkey.into(),
            model_id: model.into(),
            alias: alias.into(),
            tps: Some(5),
            burst: None,
            tpm: Some(1000),
            weight,
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            cluster_epoch: "epoch-1".into(),
            version: 7,
            connections: vec![
                conn("conn-a", "openai", &[("timeout_s", "2.5")]),
                conn("conn-b", "azure", &[]),
                conn("conn-bad", "palm", &[]),
            ],
            models: vec![
                model("model-a", "conn-a", "gpt-4"),
                model("model-b", "conn-b", "gpt-4-azure"),
                model("model-orphan", "conn-missing", "orphan"),
                model("model-badprov", "conn-bad", "palm-2"),
            ],
            virtual_keys: vec![
                vkey("vkey-ok", "vk-ok-123456", true, None),
                vkey("vkey-off", "vk-off-123456", false, None),
                vkey("vkey-old", "vk-old-123456", true, Some(1_000)),
                SnapshotVirtualKey {
                    key_sha256: vec![1, 2, 3],
                    ..vkey("vkey-short", "x", true, None)
                },
            ],
            assignments: vec![
                asg("asg-1", "vkey-ok", "model-a", "gpt-4", 3),
                asg("asg-2", "vkey-ok", "model-b", "gpt-4", 1),
                asg("asg-3", "vkey-ok", "model-b", "", 1),
                asg("asg-4", "vkey-missing", "model-a", "x", 1),
                asg("asg-5", "vkey-ok", "model-orphan", "orphan", 1),
                asg("asg-6", "vkey-ok", "model-badprov", "palm", 1),
                asg("asg-7", "vkey-off", "model-a", "gpt-4", 1),
            ],
            live_data_planes: 3,
            more: false,
            part: 0,
        }
    }

    #[test]
    fn builds_and_counts() {
        let index = ConfigIndex::build(snapshot()).unwrap();
        assert_eq!(index.version, 7);
        assert_eq!(index.cluster_epoch, "epoch-1");
        assert_eq!(index.live_data_planes, 3);
        assert_eq!(index.key_count(), 3);
        assert_eq!(
            index.counts,
            IndexCounts {
                connections: 2,
                models: 2,
                keys: 3,
                assignments: 4,
                // conn-bad, model-orphan, model-badprov, vkey-short, asg-4, asg-5, asg-6
                skipped: 7,
            }
        );
    }

    #[test]
    fn authenticates() {
        let index = ConfigIndex::build(snapshot()).unwrap();
        let key = index.authenticate("vk-ok-123456", 2_000).unwrap();
        assert_eq!(key.id(), "vkey-ok");
        assert_eq!(
            index.authenticate("vk-nope-123456", 2_000).unwrap_err(),
            AuthError::UnknownKey
        );
        assert_eq!(
            index.authenticate("vk-off-123456", 2_000).unwrap_err(),
            AuthError::Disabled
        );
        assert_eq!(
            index.authenticate("vk-old-123456", 1_000).unwrap_err(),
            AuthError::Expired
        );
        assert_eq!(
            index.authenticate("vk-old-123456", 999).unwrap().id(),
            "vkey-old"
        );
        for err in [
            AuthError::UnknownKey,
            AuthError::Disabled,
            AuthError::Expired,
        ] {
            assert!(!err.to_string().contains("vk-"));
        }
    }

    #[test]
    fn aliases_form_pools() {
        let index = ConfigIndex::build(snapshot()).unwrap();
        let key = index.authenticate("vk-ok-123456", 0).unwrap();
        assert_eq!(key.alias_names(), vec!["gpt-4", "gpt-4-azure"]);
        let pool = key.pool("gpt-4").unwrap();
        assert_eq!(&**pool.alias(), "gpt-4");
        let ids: Vec<&str> = pool.targets().map(|t| t.assignment_id).collect();
        assert_eq!(ids, ["asg-1", "asg-2"]);
        assert_eq!(pool.total_weight(), 4);
        let t = pool.target(0).unwrap();
        assert_eq!(t.connection.provider, Provider::OpenAi);
        assert_eq!(t.connection.endpoint, "https://api.example.com");
        assert_eq!(t.model.remote, "gpt-4-remote");
        assert_eq!(
            t.limits,
            Limits {
                tps: Some(5),
                burst: None,
                tpm: Some(1000)
            }
        );
        assert_eq!(t.limits.effective_burst(), Some(5));
        // An empty alias defaults to the model's name.
        let azure = key.pool("gpt-4-azure").unwrap();
        assert_eq!(
            azure.target(0).unwrap().connection.provider,
            Provider::Azure
        );
        assert!(key.pool("orphan").is_none());
        assert!(key.pool("palm").is_none());
    }

    #[test]
    fn timeout_option() {
        let index = ConfigIndex::build(snapshot()).unwrap();
        let key = index.authenticate("vk-ok-123456", 0).unwrap();
        let a = key.pool("gpt-4").unwrap().target(0).unwrap().connection;
        assert_eq!(a.timeout, Duration::from_millis(2500));
        let b = key
            .pool("gpt-4-azure")
            .unwrap()
            .target(0)
            .unwrap()
            .connection;
        assert_eq!(b.timeout, DEFAULT_UPSTREAM_TIMEOUT);
        let opts = |v: &str| BTreeMap::from([("timeout_s".to_owned(), v.to_owned())]);
        assert_eq!(parse_timeout("c", &opts("30")), Duration::from_secs(30));
        assert_eq!(
            parse_timeout("c", &opts(" 0.25 ")),
            Duration::from_millis(250)
        );
        for bad in ["abc", "-1", "0", "NaN", "inf", ""] {
            assert_eq!(
                parse_timeout("c", &opts(bad)),
                DEFAULT_UPSTREAM_TIMEOUT,
                "{bad}"
            );
        }
    }

    #[test]
    fn debug_never_prints_credentials() {
        let index = ConfigIndex::build(snapshot()).unwrap();
        let key = index.authenticate("vk-ok-123456", 0).unwrap();
        let target = key.pool("gpt-4").unwrap().target(0).unwrap();
        let text = format!("{index:?} {key:?} {target:?}");
        assert!(!text.contains("sk-top-secret"), "{text}");
        assert!(text.contains("conn-a"));
    }

    #[test]
    fn rejects_snapshot_without_identity() {
        let mut s = snapshot();
        s.cluster_epoch.clear();
        assert_eq!(ConfigIndex::build(s).unwrap_err(), IndexError::MissingEpoch);
        let mut s = snapshot();
        s.version = -1;
        assert_eq!(
            ConfigIndex::build(s).unwrap_err(),
            IndexError::NegativeVersion(-1)
        );
    }

    #[test]
    fn invalid_limits_and_weights() {
        let mut s = snapshot();
        s.assignments = vec![
            SnapshotAssignment {
                tps: Some(0),
                ..asg("asg-zero", "vkey-ok", "model-a", "a", 1)
            },
            SnapshotAssignment {
                tpm: Some(i64::MAX),
                tps: Some(i64::MAX),
                ..asg("asg-big", "vkey-ok", "model-a", "b", i64::MAX)
            },
            asg("asg-w0", "vkey-ok", "model-a", "c", 0),
        ];
        let index = ConfigIndex::build(s).unwrap();
        let key = index.authenticate("vk-ok-123456", 0).unwrap();
        assert!(key.pool("a").is_none());
        let big = key.pool("b").unwrap().target(0).unwrap();
        assert_eq!(big.limits.tps, Some(u32::MAX));
        assert_eq!(big.limits.tpm, Some(i64::MAX as u64));
        assert_eq!(big.weight, u32::MAX);
        assert_eq!(key.pool("c").unwrap().target(0).unwrap().weight, 1);
    }

    fn index_with_weights(weights: &[i64]) -> ConfigIndex {
        let mut s = snapshot();
        s.assignments = weights
            .iter()
            .enumerate()
            .map(|(i, w)| asg(&format!("asg-{i}"), "vkey-ok", "model-a", "p", *w))
            .collect();
        ConfigIndex::build(s).unwrap()
    }

    fn pool(index: &ConfigIndex) -> Pool<'_> {
        index
            .authenticate("vk-ok-123456", 0)
            .unwrap()
            .pool("p")
            .unwrap()
    }

    /// Position of `target` in its pool (assignment ids are unique).
    fn position(pool: &Pool<'_>, target: &Target<'_>) -> usize {
        pool.targets()
            .position(|t| t.assignment_id == target.assignment_id)
            .unwrap()
    }

    /// `n` rolls evenly spread over the u64 range: deterministic, so the test cannot flake.
    fn sweep(n: u64) -> impl Iterator<Item = u64> {
        let step = u64::MAX / n;
        (0..n).map(move |i| i * step + step / 2)
    }

    #[test]
    fn weighted_pick_follows_weights() {
        let index = index_with_weights(&[1, 3, 6]);
        let pool = pool(&index);
        let n = 100_000u64;
        let mut firsts = [0u64; 3];
        let mut seconds = [0u64; 3];
        for roll in sweep(n) {
            let mut order = pool.attempt_order(roll);
            let first = order.next().unwrap();
            let second = order.next().unwrap();
            firsts[position(&pool, &first)] += 1;
            seconds[position(&pool, &second)] += 1;
        }
        for (count, weight) in firsts.iter().zip([1u64, 3, 6]) {
            let expected = n * weight / 10;
            assert!(count.abs_diff(expected) <= n / 1000, "{firsts:?}");
        }
        // Failover picks follow the weights among the targets not yet tried:
        // P(second = j) = sum over i != j of P(first = i) * w_j / (10 - w_i).
        let w = [1.0f64, 3.0, 6.0];
        for j in 0..3 {
            let p: f64 = (0..3)
                .filter(|&i| i != j)
                .map(|i| w[i] / 10.0 * w[j] / (10.0 - w[i]))
                .sum();
            let expected = (p * n as f64) as u64;
            assert!(seconds[j].abs_diff(expected) <= n / 100, "{seconds:?}");
        }
    }

    #[test]
    fn extreme_rolls_stay_in_range() {
        let index = index_with_weights(&[1, 1]);
        let pool = pool(&index);
        for roll in [0, 1, u64::MAX - 1, u64::MAX] {
            assert_eq!(pool.attempt_order(roll).count(), 2);
        }
        assert_eq!(pool.attempt_order(0).next().unwrap().assignment_id, "asg-0");
        assert_eq!(
            pool.attempt_order(u64::MAX).next().unwrap().assignment_id,
            "asg-1"
        );
    }

    fn assert_each_once(pool: &Pool<'_>, roll: u64) {
        let order: Vec<Target<'_>> = pool.attempt_order(roll).collect();
        assert_eq!(order.len(), pool.len());
        for t in pool.targets() {
            assert_eq!(
                order
                    .iter()
                    .filter(|o| o.assignment_id == t.assignment_id)
                    .count(),
                1,
                "roll {roll}"
            );
        }
    }

    #[test]
    fn failover_order_contains_every_target_once() {
        for weights in [
            vec![1],
            vec![1, 1],
            vec![5, 1, 1, 100],
            vec![1; 64],
            vec![2; 70],
        ] {
            let index = index_with_weights(&weights);
            let pool = pool(&index);
            assert_eq!(pool.attempt_order(0).len(), weights.len());
            for roll in sweep(200) {
                assert_each_once(&pool, roll);
            }
            assert_each_once(&pool, u64::MAX);
        }
    }

    /// The parts of `snapshot()`: connections and models first, then each key with its
    /// assignments, the way the control plane splits a snapshot.
    fn parts() -> Vec<Snapshot> {
        let whole = snapshot();
        let identity = |more: bool| Snapshot {
            cluster_epoch: whole.cluster_epoch.clone(),
            version: whole.version,
            live_data_planes: whole.live_data_planes,
            more,
            ..Snapshot::default()
        };
        let mut first = identity(true);
        first.connections = whole.connections.clone();
        first.models = whole.models.clone();
        let mut parts = vec![first];
        for key in &whole.virtual_keys {
            let mut part = identity(true);
            part.virtual_keys = vec![key.clone()];
            part.assignments = whole
                .assignments
                .iter()
                .filter(|a| a.vkey_id == key.id)
                .cloned()
                .collect();
            parts.push(part);
        }
        if let Some(last) = parts.last_mut() {
            last.more = false;
        }
        parts
    }

    #[test]
    fn parts_build_the_same_index_as_the_whole() {
        let mut parts = parts().into_iter();
        let first = parts.next().unwrap();
        let mut builder = IndexBuilder::new(&first).unwrap();
        builder.add_part(first).unwrap();
        for part in parts {
            builder.add_part(part).unwrap();
        }
        let index = builder.finish();
        let mut expected = ConfigIndex::build(snapshot()).unwrap().counts;
        // asg-4 names a key that is in no part, so the split leaves it out altogether.
        expected.skipped -= 1;
        assert_eq!(index.counts, expected);
        let key = index.authenticate("vk-ok-123456", 0).unwrap();
        assert_eq!(key.alias_names(), vec!["gpt-4", "gpt-4-azure"]);
        let ids: Vec<&str> = key
            .pool("gpt-4")
            .unwrap()
            .targets()
            .map(|t| t.assignment_id)
            .collect();
        assert_eq!(ids, ["asg-1", "asg-2"]);
    }

    #[test]
    fn a_part_of_another_snapshot_is_refused() {
        let whole = snapshot();
        let mut builder = IndexBuilder::new(&whole).unwrap();
        let mut other = snapshot();
        other.version = 8;
        assert_eq!(
            builder.add_part(other).unwrap_err(),
            IndexError::PartMismatch {
                epoch: "epoch-1".into(),
                version: 7,
                got_epoch: "epoch-1".into(),
                got_version: 8,
            }
        );
        assert_eq!(builder.identity(), ("epoch-1", 7));
    }

    #[test]
    fn an_assignment_away_from_its_key_is_skipped() {
        let mut parts = parts();
        // Move vkey-ok's assignments into the next key's part.
        let moved = std::mem::take(&mut parts[1].assignments);
        parts[2].assignments.extend(moved);
        let mut builder = IndexBuilder::new(&parts[0]).unwrap();
        for part in parts {
            builder.add_part(part).unwrap();
        }
        let index = builder.finish();
        let key = index.authenticate("vk-ok-123456", 0).unwrap();
        assert!(key.alias_names().is_empty());
        assert!(key.pool("gpt-4").is_none());
    }

    #[test]
    fn identical_routes_are_stored_once() {
        let mut s = snapshot();
        s.virtual_keys = (0..50)
            .map(|i| vkey(&format!("vkey-{i}"), &format!("vk-{i}-123456"), true, None))
            .collect();
        s.assignments = (0..50)
            .flat_map(|i| {
                [
                    asg(
                        &format!("asg-{i}-a"),
                        &format!("vkey-{i}"),
                        "model-a",
                        "gpt-4",
                        1,
                    ),
                    asg(
                        &format!("asg-{i}-b"),
                        &format!("vkey-{i}"),
                        "model-b",
                        "azure",
                        1,
                    ),
                ]
            })
            .collect();
        let index = ConfigIndex::build(s).unwrap();
        assert_eq!(index.routes.len(), 2);
        assert_eq!(index.counts.assignments, 100);
        let key = index.authenticate("vk-49-123456", 0).unwrap();
        assert_eq!(key.id(), "vkey-49");
        assert_eq!(
            key.pool("azure").unwrap().target(0).unwrap().assignment_id,
            "asg-49-b"
        );
    }
}
