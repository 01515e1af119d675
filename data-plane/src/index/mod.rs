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

use crate::budget::{Budget, BudgetPeriod};
use crate::metrics::RouteMetrics;
use crate::usage_report::UsageKey;
use http::HeaderValue;
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

mod builder;
mod digest;
mod pool;

pub use crate::cost::Prices;
pub use builder::IndexBuilder;
pub use llm_proxy_catalog::{ConnectionOption, DEFAULT_UPSTREAM_TIMEOUT, Provider};
pub use pool::{AttemptOrder, Pool};

use digest::{KeyDigest, KeyMap};

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
    /// The upstream URLs of operations whose path depends only on the connection, parsed once.
    pub cache: ConnectionCache,
}

/// What every call on a connection sends and can be made once, on first use, then cloned: the
/// upstream URL per operation (a parse costs thousands of instructions, a clone two reference
/// counts) and the header value carrying the credential (no `format!` and validation per call).
/// URLs only for paths that depend on the connection alone (OpenAI, Anthropic). Lives and dies
/// with the index, so a changed connection starts afresh.
#[derive(Debug, Default)]
pub struct ConnectionCache {
    urls: [std::sync::OnceLock<Option<CachedUrl>>; 5],
    /// `Debug` shows a sensitive value as `Sensitive`.
    credential_header: std::sync::OnceLock<Option<HeaderValue>>,
}

/// A parsed upstream URL and, for plain HTTP, its `Host` header value.
type CachedUrl = (http::Uri, Option<HeaderValue>);

impl ConnectionCache {
    /// The URL of `operation` and, for plain HTTP, its `Host` header value
    /// ([`crate::providers::host_header`]), made by `make` and parsed the first time; `None` when
    /// it does not parse (the caller sends the text, whose parse reports the error).
    pub fn url(
        &self,
        operation: crate::inbound::Operation,
        make: impl FnOnce() -> String,
    ) -> Option<CachedUrl> {
        let slot = self.urls.get(operation as usize)?;
        slot.get_or_init(|| {
            let uri = crate::providers::parse_uri(&make()).ok()?;
            let host = crate::providers::host_header(&uri);
            Some((uri, host))
        })
        .clone()
    }

    /// The header value carrying the credential, made by `make` the first time; `None` when
    /// `make` has none (no credential, or not a valid header value: the caller reports it).
    pub fn credential_header(
        &self,
        make: impl FnOnce() -> Option<HeaderValue>,
    ) -> Option<HeaderValue> {
        self.credential_header.get_or_init(make).clone()
    }
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
    /// For the cost of each request (DESIGN §18); `None` when the model has no price.
    pub prices: Option<Prices>,
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
    /// The route's metric series, made on first use.
    metrics: Arc<RouteMetrics>,
}

/// A string in [`ConfigIndex`]'s id arena.
#[derive(Debug, Clone, Copy, Default)]
struct IdRef {
    start: u32,
    len: u32,
}

/// One assignment: its id (for rate-limit buckets and logs) and its route.
#[derive(Debug, Clone, Copy, Default)]
struct TargetRecord {
    id: IdRef,
    route: u32,
}

/// [`KeyRecord::budget`] of a key without a budget.
const NO_BUDGET: u32 = u32::MAX;

/// [`KeyRecord::expires_at_unix`] of a key that never expires.
const NEVER: u32 = u32::MAX;

/// One virtual key: its targets are `targets[first_target..first_target + target_count]`, grouped
/// by alias (each alias's targets contiguous, in snapshot order). 28 bytes.
#[derive(Debug)]
struct KeyRecord {
    id: IdRef,
    first_target: u32,
    target_count: u32,
    /// Position in [`ConfigIndex`]'s `budgets`, [`NO_BUDGET`] for a key without one (most keys:
    /// the budget itself stays out of the record).
    budget: u32,
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
    /// The route's metric series (`None` for targets built outside an index).
    pub metrics: Option<&'a Arc<RouteMetrics>>,
    /// Where the assignment is in its index, for [`UsageTarget`] (default: nowhere, for targets
    /// built outside an index).
    pub position: TargetPosition,
}

/// An assignment's place in its [`ConfigIndex`] (see [`Target::position`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct TargetPosition(TargetRecord);

/// What an answer's usage is counted under (DESIGN §18): a virtual key and one of its
/// assignments, held as positions in the config index the request was served from. Making one
/// and cloning it cost a reference count, no allocation; the ids and names are read from the
/// index when the usage is counted. A stream holding one keeps its index alive until it ends,
/// as a request in flight already does while it waits for its upstream.
#[derive(Debug, Clone)]
pub struct UsageTarget {
    index: Arc<ConfigIndex>,
    vkey: IdRef,
    target: TargetRecord,
}

impl UsageTarget {
    /// The usage of `key` (which must come from `index`), before it is routed: [`Self::set_target`]
    /// names the assignment.
    pub fn for_key(index: &Arc<ConfigIndex>, key: &KeyEntry<'_>) -> Self {
        Self {
            index: Arc::clone(index),
            vkey: key.record.id,
            target: TargetRecord::default(),
        }
    }

    /// The assignment a request was routed to (a target of the same index).
    pub fn set_target(&mut self, target: &Target<'_>) {
        self.target = target.position.0;
    }

    /// The ids and names the usage is counted under; `None` only for a target built outside an
    /// index.
    pub fn usage_key(&self) -> Option<UsageKey<'_>> {
        let route = self.index.routes.get(self.target.route as usize)?;
        Some(UsageKey {
            vkey_id: self.index.id(self.vkey),
            assignment_id: self.index.id(self.target.id),
            model_id: &route.model.id,
            model_name: &route.model.name,
            alias: &route.alias,
        })
    }
}

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

    /// The key's budget (DESIGN §18), if it has one.
    pub fn budget(&self) -> Option<Budget> {
        self.index.budgets.get(self.record.budget as usize).copied()
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

    /// Every target of this key, pool by pool (for requests that name a connection rather than
    /// an alias: a stored Responses API response, DESIGN §17).
    pub fn targets(&self) -> impl Iterator<Item = Target<'a>> + 'a {
        let index = self.index;
        self.records().iter().map(move |r| index.target(*r))
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
    budgets: Vec<Budget>,
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
            metrics: Some(&route.metrics),
            position: TargetPosition(record),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::builder::parse_timeout;

    #[test]
    fn a_connections_url_is_parsed_once_per_operation() {
        use crate::inbound::Operation;
        let cache = ConnectionCache::default();
        let made = std::cell::Cell::new(0);
        let make = || {
            made.set(made.get() + 1);
            "https://api.openai.com/v1/chat/completions".to_owned()
        };
        let (first, host) = cache.url(Operation::ChatCompletions, make).unwrap();
        let (again, _) = cache.url(Operation::ChatCompletions, make).unwrap();
        assert_eq!(first, again);
        assert_eq!(
            first.to_string(),
            "https://api.openai.com/v1/chat/completions"
        );
        // Over TLS the client writes `Host` itself (HTTP/1.1 only; HTTP/2 has `:authority`).
        assert_eq!(host, None);
        let (_, host) = cache
            .url(Operation::Embeddings, || {
                "http://10.0.0.7:8000/v1/embeddings".to_owned()
            })
            .unwrap();
        assert_eq!(host.unwrap(), "10.0.0.7:8000");
        assert_eq!(made.get(), 1);
        // Another operation has its own slot.
        let cache = ConnectionCache::default();
        let embeddings = cache
            .url(Operation::Embeddings, || {
                "https://api.openai.com/v1/embeddings".to_owned()
            })
            .unwrap()
            .0;
        assert_eq!(embeddings.path(), "/v1/embeddings");
        // Text that does not parse is not cached as a URL: the caller sends it as text.
        assert!(
            cache
                .url(Operation::Responses, || "not a url".to_owned())
                .is_none()
        );
    }
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
            ..Default::default()
        }
    }

    fn vkey(id: &str, key: &str, enabled: bool, expires: Option<i64>) -> SnapshotVirtualKey {
        SnapshotVirtualKey {
            id: id.into(),
            name: format!("name-{id}"),
            key_sha256: sha(key),
            enabled,
            expires_at_unix: expires,
            ..Default::default()
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
    fn models_keep_their_prices() {
        let mut s = snapshot();
        s.models[0] = SnapshotModel {
            price_input: Some(2_500_000),
            price_output: Some(10_000_000),
            price_cache_read: Some(1_250_000),
            ..model("model-a", "conn-a", "gpt-4")
        };
        // A negative price (only a buggy or skewed control plane sends one) drops the model's
        // prices, not the model.
        s.models[1] = SnapshotModel {
            price_input: Some(3_000_000),
            price_output: Some(-1),
            ..model("model-b", "conn-b", "gpt-4-azure")
        };
        let index = ConfigIndex::build(s).unwrap();
        let key = index.authenticate("vk-ok-123456", 0).unwrap();
        let priced = key.pool("gpt-4").unwrap().target(0).unwrap().model;
        assert_eq!(
            priced.prices,
            Some(Prices {
                input: Some(2_500_000),
                output: Some(10_000_000),
                cache_read: Some(1_250_000),
                cache_write: None,
            })
        );
        let skewed = key.pool("gpt-4-azure").unwrap().target(0).unwrap().model;
        assert_eq!(skewed.id, "model-b");
        assert_eq!(skewed.prices, None);
        assert_eq!(index.counts.models, 2);
    }

    #[test]
    fn a_model_without_prices_has_none() {
        let index = ConfigIndex::build(snapshot()).unwrap();
        let key = index.authenticate("vk-ok-123456", 0).unwrap();
        let unpriced = key.pool("gpt-4").unwrap().target(0).unwrap().model;
        assert_eq!(unpriced.prices, None);
        let free = super::builder::prices(&SnapshotModel {
            price_input: Some(0),
            ..model("m", "c", "free")
        });
        assert_eq!(
            free,
            Ok(Some(Prices {
                input: Some(0),
                ..Prices::default()
            }))
        );
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
