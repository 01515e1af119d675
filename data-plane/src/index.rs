//! The in-memory config index built from a control-plane [`Snapshot`] (DESIGN §5, §7, §8).
//!
//! Everything the request path needs is resolved here once per snapshot: virtual keys by the
//! SHA-256 of the key, each key's aliases to a [`Pool`] of [`Target`]s, and every target's model
//! and connection behind an `Arc`. Lookups ([`ConfigIndex::authenticate`], [`KeyEntry::pool`],
//! [`Pool::attempt_order`]) do not allocate.
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
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

/// Upstream timeout when a connection has no (valid) `timeout_s` option.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Upstream provider family of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    OpenAi,
    Azure,
    Google,
    Bedrock,
}

impl Provider {
    /// The name used in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Azure => "azure",
            Self::Google => "google",
            Self::Bedrock => "bedrock",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown provider {0:?}: expected openai|azure|google|bedrock")]
pub struct UnknownProvider(pub String);

impl std::str::FromStr for Provider {
    type Err = UnknownProvider;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "openai" => Ok(Self::OpenAi),
            "azure" => Ok(Self::Azure),
            "google" => Ok(Self::Google),
            "bedrock" => Ok(Self::Bedrock),
            _ => Err(UnknownProvider(s.to_owned())),
        }
    }
}

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
    /// From option `timeout_s` (seconds, fractional allowed); [`DEFAULT_TIMEOUT`] otherwise.
    pub timeout: Duration,
}

impl ConnectionEntry {
    /// A provider option (`--set key=value`).
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options.get(key).map(String::as_str)
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
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

/// One assignment: where a request for an alias may go.
#[derive(Debug)]
pub struct Target {
    pub assignment_id: String,
    /// Shared by every target with this alias in the index (also the metrics label).
    pub alias: Arc<str>,
    pub weight: u32,
    pub limits: Limits,
    pub model: Arc<ModelEntry>,
    pub connection: Arc<ConnectionEntry>,
}

/// The targets of one key sharing an alias (declaration order = snapshot order).
#[derive(Debug)]
pub struct Pool {
    pub alias: Arc<str>,
    pub targets: Vec<Target>,
    /// `cumulative[i]` = sum of the weights of `targets[..=i]`.
    cumulative: Vec<u64>,
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

impl Pool {
    fn new(alias: Arc<str>, targets: Vec<Target>) -> Self {
        let mut total = 0u64;
        let cumulative = targets
            .iter()
            .map(|t| {
                total += u64::from(t.weight);
                total
            })
            .collect();
        Self {
            alias,
            targets,
            cumulative,
        }
    }

    /// Sum of the targets' weights.
    pub fn total_weight(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// The weighted pick for `roll`: index of the first target whose cumulative weight exceeds
    /// `roll` scaled to `[0, total)`. O(log n).
    fn pick(&self, roll: u64) -> usize {
        let point = scale(roll, self.total_weight());
        self.cumulative
            .partition_point(|&c| c <= point)
            .min(self.targets.len().saturating_sub(1))
    }

    /// Order in which to try targets: first a weighted random pick (by `weight`), then the
    /// remaining targets for failover, each again picked by weight among those not yet tried
    /// (weighted sampling without replacement, so failover traffic also follows the weights).
    /// Every target appears exactly once. `roll` is a uniformly random u64 supplied by the caller.
    ///
    /// No heap allocation for pools of up to 64 targets (a bitmask tracks tried targets); larger
    /// pools allocate one small vector when failover starts (the first pick never allocates).
    pub fn attempt_order(&self, roll: u64) -> AttemptOrder<'_> {
        AttemptOrder {
            pool: self,
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
    pool: &'a Pool,
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
        let n = self.pool.targets.len();
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
}

impl<'a> Iterator for AttemptOrder<'a> {
    type Item = &'a Target;

    fn next(&mut self) -> Option<&'a Target> {
        let targets = &self.pool.targets;
        if self.step >= targets.len() {
            return None;
        }
        let chosen = if self.step == 0 {
            self.first = self.pool.pick(self.roll);
            self.first
        } else {
            if self.step == 1 {
                self.mark(self.first);
            }
            self.roll = mix(self.roll);
            let point = scale(self.roll, self.remaining_weight);
            let mut acc = 0u64;
            let mut chosen = None;
            let mut last_untried = 0;
            for (i, t) in targets.iter().enumerate() {
                if self.is_tried(i) {
                    continue;
                }
                last_untried = i;
                acc += u64::from(t.weight);
                if point < acc {
                    chosen = Some(i);
                    break;
                }
            }
            chosen.unwrap_or(last_untried)
        };
        let target = targets.get(chosen)?;
        self.remaining_weight = self
            .remaining_weight
            .saturating_sub(u64::from(target.weight));
        if self.step > 0 && self.step + 1 < targets.len() {
            self.mark(chosen);
        }
        self.step += 1;
        Some(target)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.pool.targets.len() - self.step.min(self.pool.targets.len());
        (left, Some(left))
    }
}

impl ExactSizeIterator for AttemptOrder<'_> {}

/// A virtual key and the aliases it may call.
#[derive(Debug)]
pub struct KeyEntry {
    pub id: String,
    pub name: String,
    pub enabled: bool,
    /// Unix seconds; the key is expired from this instant on.
    pub expires_at_unix: Option<i64>,
    pub aliases: HashMap<Arc<str>, Arc<Pool>>,
}

impl KeyEntry {
    /// The pool of targets for `alias`, if this key may call it.
    pub fn pool(&self, alias: &str) -> Option<&Arc<Pool>> {
        self.aliases.get(alias)
    }

    /// This key's aliases, sorted (for `GET /v1/models`).
    pub fn alias_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.aliases.keys().map(|a| &**a).collect();
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
}

/// SHA-256 of a virtual key, the lookup key of [`ConfigIndex`].
#[derive(Clone, Copy, PartialEq, Eq)]
struct KeyDigest([u8; 32]);

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

type KeyMap = HashMap<KeyDigest, Arc<KeyEntry>, BuildHasherDefault<DigestHasher>>;

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
pub struct ConfigIndex {
    pub version: i64,
    pub cluster_epoch: String,
    pub live_data_planes: i64,
    pub counts: IndexCounts,
    keys: KeyMap,
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
    let Some(raw) = options.get("timeout_s") else {
        return DEFAULT_TIMEOUT;
    };
    match raw.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 => Duration::try_from_secs_f64(secs)
            .unwrap_or(DEFAULT_TIMEOUT)
            .max(Duration::from_millis(1)),
        _ => {
            tracing::warn!(connection_id = %conn_id, timeout_s = %raw, "invalid timeout_s option; using the default of 600 s");
            DEFAULT_TIMEOUT
        }
    }
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
    /// Builds the index. Bad entries are skipped with a `warn!` (see the module docs); only a
    /// snapshot without identity (epoch, version) is rejected.
    pub fn build(snapshot: Snapshot) -> Result<ConfigIndex, IndexError> {
        let Snapshot {
            cluster_epoch,
            version,
            connections,
            models,
            virtual_keys,
            assignments,
            live_data_planes,
        } = snapshot;
        if cluster_epoch.is_empty() {
            return Err(IndexError::MissingEpoch);
        }
        if version < 0 {
            return Err(IndexError::NegativeVersion(version));
        }
        let mut counts = IndexCounts::default();

        let mut conns: HashMap<String, Arc<ConnectionEntry>> =
            HashMap::with_capacity(connections.len());
        for c in connections {
            let id = c.id.clone();
            match connection_entry(c) {
                Ok(entry) => {
                    if conns.insert(id.clone(), Arc::new(entry)).is_some() {
                        tracing::warn!(connection_id = %id, "duplicate connection id in snapshot; keeping the last");
                        counts.skipped += 1;
                    }
                }
                Err(reason) => {
                    tracing::warn!(connection_id = %id, %reason, "skipping connection");
                    counts.skipped += 1;
                }
            }
        }
        counts.connections = conns.len();

        // model id -> (model, its connection)
        let mut model_map: HashMap<String, (Arc<ModelEntry>, Arc<ConnectionEntry>)> =
            HashMap::with_capacity(models.len());
        for m in models {
            let SnapshotModel {
                id,
                connection_id,
                name,
                remote,
                deployment,
            } = m;
            let Some(conn) = conns.get(&connection_id) else {
                tracing::warn!(model_id = %id, %connection_id, "skipping model: its connection is missing from the snapshot");
                counts.skipped += 1;
                continue;
            };
            let entry = Arc::new(ModelEntry {
                id: id.clone(),
                name,
                remote,
                deployment,
            });
            if model_map
                .insert(id.clone(), (entry, conn.clone()))
                .is_some()
            {
                tracing::warn!(model_id = %id, "duplicate model id in snapshot; keeping the last");
                counts.skipped += 1;
            }
        }
        counts.models = model_map.len();

        // Keys first (without aliases), then their pools, then freeze into `Arc<KeyEntry>`.
        struct PendingKey {
            entry: KeyEntry,
            digest: KeyDigest,
            pools: Vec<(Arc<str>, Vec<Target>)>,
        }
        // One allocation per distinct alias, however many keys use it.
        let mut alias_names: HashMap<String, Arc<str>> = HashMap::new();
        let mut pending: Vec<PendingKey> = Vec::with_capacity(virtual_keys.len());
        let mut key_pos: HashMap<String, usize> = HashMap::with_capacity(virtual_keys.len());
        let mut seen_digests: HashMap<KeyDigest, (), BuildHasherDefault<DigestHasher>> =
            HashMap::with_capacity_and_hasher(virtual_keys.len(), Default::default());
        for k in virtual_keys {
            let SnapshotVirtualKey {
                id,
                name,
                key_sha256,
                enabled,
                expires_at_unix,
            } = k;
            let Ok(digest) = <[u8; 32]>::try_from(key_sha256.as_slice()) else {
                tracing::warn!(vkey_id = %id, len = key_sha256.len(), "skipping virtual key: key_sha256 is not 32 bytes");
                counts.skipped += 1;
                continue;
            };
            let digest = KeyDigest(digest);
            if seen_digests.insert(digest, ()).is_some() || key_pos.contains_key(&id) {
                tracing::warn!(vkey_id = %id, "skipping virtual key: duplicate id or key hash in snapshot");
                counts.skipped += 1;
                continue;
            }
            key_pos.insert(id.clone(), pending.len());
            pending.push(PendingKey {
                entry: KeyEntry {
                    id,
                    name,
                    enabled,
                    expires_at_unix,
                    aliases: HashMap::new(),
                },
                digest,
                pools: Vec::new(),
            });
        }
        drop(seen_digests);

        for a in assignments {
            let Some(&pos) = key_pos.get(&a.vkey_id) else {
                tracing::warn!(assignment_id = %a.id, vkey_id = %a.vkey_id, "skipping assignment: its virtual key is missing from the snapshot");
                counts.skipped += 1;
                continue;
            };
            let Some((model, connection)) = model_map.get(&a.model_id) else {
                tracing::warn!(assignment_id = %a.id, model_id = %a.model_id, "skipping assignment: its model is missing from the snapshot");
                counts.skipped += 1;
                continue;
            };
            let limits = match limits(&a) {
                Ok(l) => l,
                Err(reason) => {
                    tracing::warn!(assignment_id = %a.id, %reason, "skipping assignment: invalid limit");
                    counts.skipped += 1;
                    continue;
                }
            };
            let weight = if a.weight <= 0 {
                tracing::warn!(assignment_id = %a.id, weight = a.weight, "assignment weight must be positive; using 1");
                1
            } else {
                u32::try_from(a.weight).unwrap_or(u32::MAX)
            };
            let alias_name = if a.alias.is_empty() {
                model.name.clone()
            } else {
                a.alias
            };
            let alias = alias_names
                .entry(alias_name)
                .or_insert_with_key(|name| Arc::from(name.as_str()))
                .clone();
            let target = Target {
                assignment_id: a.id,
                alias: alias.clone(),
                weight,
                limits,
                model: model.clone(),
                connection: connection.clone(),
            };
            let Some(key) = pending.get_mut(pos) else {
                continue;
            };
            // Pools per key are few: a linear scan beats hashing the alias here.
            match key.pools.iter_mut().find(|(name, _)| **name == *alias) {
                Some((_, targets)) => targets.push(target),
                None => key.pools.push((alias, vec![target])),
            }
            counts.assignments += 1;
        }
        drop(model_map);

        let mut keys: KeyMap = HashMap::with_capacity_and_hasher(pending.len(), Default::default());
        for PendingKey {
            mut entry,
            digest,
            pools,
        } in pending
        {
            entry.aliases = pools
                .into_iter()
                .map(|(alias, targets)| {
                    let pool = Arc::new(Pool::new(alias.clone(), targets));
                    (alias, pool)
                })
                .collect();
            keys.insert(digest, Arc::new(entry));
        }
        counts.keys = keys.len();

        Ok(ConfigIndex {
            version,
            cluster_epoch,
            live_data_planes,
            counts,
            keys,
        })
    }

    /// Looks up a presented virtual key by its SHA-256. `now_unix` decides expiry: a key whose
    /// `expires_at_unix <= now_unix` is expired.
    pub fn authenticate(
        &self,
        presented_key: &str,
        now_unix: i64,
    ) -> Result<&Arc<KeyEntry>, AuthError> {
        let digest = KeyDigest(Sha256::digest(presented_key.as_bytes()).into());
        let key = self.keys.get(&digest).ok_or(AuthError::UnknownKey)?;
        if !key.enabled {
            return Err(AuthError::Disabled);
        }
        if key.expires_at_unix.is_some_and(|at| at <= now_unix) {
            return Err(AuthError::Expired);
        }
        Ok(key)
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Every key entry (unordered), e.g. for rate-limiter housekeeping.
    pub fn keys(&self) -> impl Iterator<Item = &Arc<KeyEntry>> + '_ {
        self.keys.values()
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
        assert_eq!(key.id, "vkey-ok");
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
            index.authenticate("vk-old-123456", 999).unwrap().id,
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
        assert_eq!(&*pool.alias, "gpt-4");
        let ids: Vec<&str> = pool
            .targets
            .iter()
            .map(|t| t.assignment_id.as_str())
            .collect();
        assert_eq!(ids, ["asg-1", "asg-2"]);
        assert_eq!(pool.total_weight(), 4);
        let t = &pool.targets[0];
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
        assert_eq!(azure.targets[0].connection.provider, Provider::Azure);
        assert!(key.pool("orphan").is_none());
        assert!(key.pool("palm").is_none());
    }

    #[test]
    fn timeout_option() {
        let index = ConfigIndex::build(snapshot()).unwrap();
        let key = index.authenticate("vk-ok-123456", 0).unwrap();
        let a = &key.pool("gpt-4").unwrap().targets[0].connection;
        assert_eq!(a.timeout, Duration::from_millis(2500));
        let b = &key.pool("gpt-4-azure").unwrap().targets[0].connection;
        assert_eq!(b.timeout, DEFAULT_TIMEOUT);
        let opts = |v: &str| BTreeMap::from([("timeout_s".to_owned(), v.to_owned())]);
        assert_eq!(parse_timeout("c", &opts("30")), Duration::from_secs(30));
        assert_eq!(
            parse_timeout("c", &opts(" 0.25 ")),
            Duration::from_millis(250)
        );
        for bad in ["abc", "-1", "0", "NaN", "inf", ""] {
            assert_eq!(parse_timeout("c", &opts(bad)), DEFAULT_TIMEOUT, "{bad}");
        }
    }

    #[test]
    fn debug_never_prints_credentials() {
        let index = ConfigIndex::build(snapshot()).unwrap();
        let key = index.authenticate("vk-ok-123456", 0).unwrap();
        let text = format!("{index:?} {key:?}");
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
        let big = &key.pool("b").unwrap().targets[0];
        assert_eq!(big.limits.tps, Some(u32::MAX));
        assert_eq!(big.limits.tpm, Some(i64::MAX as u64));
        assert_eq!(big.weight, u32::MAX);
        assert_eq!(key.pool("c").unwrap().targets[0].weight, 1);
    }

    fn pool_with_weights(weights: &[i64]) -> Arc<Pool> {
        let mut s = snapshot();
        s.assignments = weights
            .iter()
            .enumerate()
            .map(|(i, w)| asg(&format!("asg-{i}"), "vkey-ok", "model-a", "p", *w))
            .collect();
        let index = ConfigIndex::build(s).unwrap();
        index
            .authenticate("vk-ok-123456", 0)
            .unwrap()
            .pool("p")
            .unwrap()
            .clone()
    }

    /// `n` rolls evenly spread over the u64 range: deterministic, so the test cannot flake.
    fn sweep(n: u64) -> impl Iterator<Item = u64> {
        let step = u64::MAX / n;
        (0..n).map(move |i| i * step + step / 2)
    }

    #[test]
    fn weighted_pick_follows_weights() {
        let pool = pool_with_weights(&[1, 3, 6]);
        let n = 100_000u64;
        let mut firsts = [0u64; 3];
        let mut seconds = [0u64; 3];
        for roll in sweep(n) {
            let mut order = pool.attempt_order(roll);
            let first = order.next().unwrap();
            let second = order.next().unwrap();
            firsts[pool
                .targets
                .iter()
                .position(|t| std::ptr::eq(t, first))
                .unwrap()] += 1;
            seconds[pool
                .targets
                .iter()
                .position(|t| std::ptr::eq(t, second))
                .unwrap()] += 1;
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
        let pool = pool_with_weights(&[1, 1]);
        for roll in [0, 1, u64::MAX - 1, u64::MAX] {
            assert_eq!(pool.attempt_order(roll).count(), 2);
        }
        assert_eq!(pool.attempt_order(0).next().unwrap().assignment_id, "asg-0");
        assert_eq!(
            pool.attempt_order(u64::MAX).next().unwrap().assignment_id,
            "asg-1"
        );
    }

    fn assert_each_once(pool: &Pool, roll: u64) {
        let order: Vec<&Target> = pool.attempt_order(roll).collect();
        assert_eq!(order.len(), pool.targets.len());
        for t in &pool.targets {
            assert_eq!(
                order.iter().filter(|o| std::ptr::eq(**o, t)).count(),
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
            let pool = pool_with_weights(&weights);
            assert_eq!(pool.attempt_order(0).len(), weights.len());
            for roll in sweep(200) {
                assert_each_once(&pool, roll);
            }
            assert_each_once(&pool, u64::MAX);
        }
    }
}
