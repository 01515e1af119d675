//! Building a [`ConfigIndex`] from a snapshot sent in parts: entries parsed and checked (bad ones
//! skipped with a warning, see the module docs of [`crate::index`]), routes deduplicated, keys
//! laid out.

use super::*;

pub(super) fn parse_timeout(conn_id: &str, options: &BTreeMap<String, String>) -> Duration {
    let Some(raw) = options.get(ConnectionOption::TimeoutS.name()) else {
        return DEFAULT_UPSTREAM_TIMEOUT;
    };
    llm_proxy_catalog::timeout_s(raw).unwrap_or_else(|err| {
        tracing::warn!(connection_id = %conn_id, error = %err, "invalid timeout_s option; using the default of 600 s");
        DEFAULT_UPSTREAM_TIMEOUT
    })
}

pub(super) fn connection_entry(c: SnapshotConnection) -> Result<ConnectionEntry, String> {
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
        cache: Default::default(),
    })
}

/// A positive limit as `T`, saturating; `Err` for zero or negative values.
pub(super) fn limit<T: TryFrom<i64> + Copy>(value: Option<i64>, max: T) -> Result<Option<T>, i64> {
    match value {
        None => Ok(None),
        Some(v) if v <= 0 => Err(v),
        Some(v) => Ok(Some(T::try_from(v).unwrap_or(max))),
    }
}

pub(super) fn limits(a: &SnapshotAssignment) -> Result<Limits, String> {
    let bad = |field: &str, v: i64| format!("{field} must be positive, got {v}");
    Ok(Limits {
        tps: limit(a.tps, u32::MAX).map_err(|v| bad("tps", v))?,
        burst: limit(a.burst, u32::MAX).map_err(|v| bad("burst", v))?,
        tpm: limit(a.tpm, u64::MAX).map_err(|v| bad("tpm", v))?,
    })
}

/// A model's prices from the snapshot; `Err` names the first negative one (the control plane
/// refuses those, so only a bug or a version skew sends one).
pub(super) fn prices(m: &SnapshotModel) -> Result<Option<Prices>, String> {
    let price = |field: &str, value: Option<i64>| {
        value
            .map(|v| u64::try_from(v).map_err(|_| format!("{field} must not be negative, got {v}")))
            .transpose()
    };
    Ok(Prices::new(
        price("price_input", m.price_input)?,
        price("price_output", m.price_output)?,
        price("price_cache_read", m.price_cache_read)?,
        price("price_cache_write", m.price_cache_write)?,
    ))
}

/// What makes two assignments route alike (see [`Route`]).
#[derive(PartialEq, Eq, Hash)]
pub(super) struct RouteKey {
    pub(super) alias: Arc<str>,
    pub(super) model: u32,
    pub(super) weight: u32,
    pub(super) limits: Limits,
}

/// Builds a [`ConfigIndex`] from the parts of a snapshot (see `Snapshot.more` in
/// `proto/llmproxy/v1/config.proto`), one part at a time, so that a large config never exists as
/// one decoded message on the data plane.
pub struct IndexBuilder {
    pub(super) index: ConfigIndex,
    pub(super) connections: HashMap<String, Arc<ConnectionEntry>>,
    /// Model id -> (model, its connection, its number in route keys).
    pub(super) models: HashMap<String, (Arc<ModelEntry>, Arc<ConnectionEntry>, u32)>,
    pub(super) next_model_number: u32,
    pub(super) route_numbers: HashMap<RouteKey, u32>,
    /// One allocation per distinct alias, however many keys use it.
    pub(super) aliases: HashSet<Arc<str>>,
}

impl fmt::Debug for IndexBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IndexBuilder")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// An assignment waiting for its key's targets to be laid out.
pub(super) struct StagedTarget {
    pub(super) key: u32,
    pub(super) record: TargetRecord,
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
                budgets: Vec::new(),
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

    /// Stores a key's budget and returns its position ([`NO_BUDGET`] without one); `None` for a
    /// budget with a negative amount or an unknown period (refused by the control plane's
    /// validation): such a key is skipped, not served without its budget.
    fn budget_of(&mut self, k: &SnapshotVirtualKey) -> Result<Option<u32>, IndexError> {
        let Some(micro) = k.budget_micro_usd else {
            return Ok(Some(NO_BUDGET));
        };
        let (Ok(limit_micro_usd), Ok(period)) = (
            u64::try_from(micro),
            k.budget_period.parse::<BudgetPeriod>(),
        ) else {
            tracing::warn!(vkey_id = %k.id, budget_micro_usd = micro, budget_period = %k.budget_period, "skipping virtual key: invalid budget");
            return Ok(None);
        };
        let Ok(position) = u32::try_from(self.index.budgets.len()) else {
            return Err(IndexError::TooLarge);
        };
        self.index.budgets.push(Budget {
            limit_micro_usd,
            period,
        });
        Ok(Some(position))
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
        // A bad price costs the model its prices (no cost is recorded rather than a wrong one),
        // not its routing.
        let prices = prices(&m).unwrap_or_else(|reason| {
            tracing::warn!(model_id = %m.id, %reason, "ignoring the model's prices");
            None
        });
        let SnapshotModel {
            id,
            connection_id,
            name,
            remote,
            deployment,
            price_input: _,
            price_output: _,
            price_cache_read: _,
            price_cache_write: _,
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
            prices,
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
            metrics: Arc::new(RouteMetrics::new(
                key.alias.clone(),
                connection.provider.as_str(),
            )),
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
            let Some(budget) = self.budget_of(k)? else {
                self.index.counts.skipped += 1;
                continue;
            };
            let id = self.store_id(&k.id)?;
            self.index.by_digest.insert(digest, position);
            self.index.keys.push(KeyRecord {
                id,
                budget,
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
