//! Usage shipping (DESIGN §18 "How it travels"): every request answered by an upstream is added
//! to an in-memory aggregate per (virtual key, assignment, hour); a background task turns the
//! aggregate into batches and sends them with `ConfigService.ReportUsage`. A batch stays queued
//! (bounded) until the control plane acknowledges it and is resent with the same sequence number
//! (the control plane ignores one it has already written).

use crate::metrics::Metrics;
use crate::sync::SyncSettings;
use crate::usage::Usage;
use llm_proxy_proto::v1::config_service_client::ConfigServiceClient;
use llm_proxy_proto::v1::{GetSpendRequest, ReportUsageRequest, UsageRow};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Default of `--usage-report-interval-s` (DESIGN §18: at least every 10 s).
pub const DEFAULT_REPORT_INTERVAL_S: u64 = 10;
/// Default of `--usage-queue-max-batches`: an hour of batches at the default interval.
pub const DEFAULT_QUEUE_MAX_BATCHES: usize = 360;
/// The control plane refuses larger batches (`ReportUsageRequest`).
pub const MAX_ROWS_PER_BATCH: usize = 10_000;
/// Bound on one `ReportUsage` call; a batch that times out is resent.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often and how much to keep (`--usage-report-interval-s`, `--usage-queue-max-batches`).
#[derive(Debug, Clone, Copy)]
pub struct UsageSettings {
    pub interval: Duration,
    pub queue_max_batches: usize,
}

impl Default for UsageSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(DEFAULT_REPORT_INTERVAL_S),
            queue_max_batches: DEFAULT_QUEUE_MAX_BATCHES,
        }
    }
}

/// What one answer's usage is counted under, borrowed from wherever the request holds it (the
/// config index, see `index::UsageTarget`): the aggregate copies the ids only for the first
/// answer of a row in an interval.
#[derive(Debug, Clone, Copy)]
pub struct UsageKey<'a> {
    pub vkey_id: &'a str,
    pub assignment_id: &'a str,
    pub model_id: &'a str,
    pub model_name: &'a str,
    pub alias: &'a Arc<str>,
}

/// The sums of one (virtual key, assignment, hour).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Sums {
    requests: u64,
    input: u64,
    output: u64,
    cache_read: u64,
    cache_write: u64,
    reasoning: u64,
    cost_pico_usd: u128,
}

#[derive(Debug)]
struct Slot {
    model_id: Box<str>,
    model_name: Box<str>,
    alias: Arc<str>,
    sums: Sums,
}

/// hour start (unix s) → virtual key id → assignment id → sums. Nested so that a lookup takes the
/// request's `&str` ids as they are: only the first request of a row in an interval allocates.
type Aggregate = HashMap<i64, HashMap<Arc<str>, HashMap<Box<str>, Slot>>>;

/// The in-memory aggregate the request path adds to (a short critical section, no await).
#[derive(Debug, Default)]
pub struct UsageAggregator {
    rows: Mutex<Aggregate>,
}

fn hour_of(unix_s: i64) -> i64 {
    unix_s - unix_s.rem_euclid(3600)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl UsageAggregator {
    /// Counts one request answered by an upstream now.
    pub fn add(&self, target: &UsageKey<'_>, usage: &Usage, cost_pico_usd: u128) {
        self.add_at(target, now_unix(), usage, cost_pico_usd);
    }

    pub fn add_at(&self, target: &UsageKey<'_>, unix_s: i64, usage: &Usage, cost_pico_usd: u128) {
        let hour = hour_of(unix_s);
        // A poisoned lock only means another request panicked mid-add: the sums are still sums.
        let mut rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        let by_key = rows.entry(hour).or_default();
        let by_assignment = match by_key.get_mut(target.vkey_id) {
            Some(m) => m,
            None => by_key.entry(Arc::from(target.vkey_id)).or_default(),
        };
        let slot = match by_assignment.get_mut(target.assignment_id) {
            Some(s) => s,
            None => by_assignment
                .entry(Box::from(target.assignment_id))
                .or_insert_with(|| Slot {
                    model_id: Box::from(target.model_id),
                    model_name: Box::from(target.model_name),
                    alias: target.alias.clone(),
                    sums: Sums::default(),
                }),
        };
        let s = &mut slot.sums;
        s.requests = s.requests.saturating_add(1);
        s.input = s.input.saturating_add(usage.prompt_tokens);
        s.output = s.output.saturating_add(usage.completion_tokens);
        s.cache_read = s.cache_read.saturating_add(usage.cache_read_tokens);
        s.cache_write = s.cache_write.saturating_add(usage.cache_write_tokens);
        s.reasoning = s.reasoning.saturating_add(usage.reasoning_tokens);
        s.cost_pico_usd = s.cost_pico_usd.saturating_add(cost_pico_usd);
    }

    /// Pico-USD aggregated for `vkey_id` in the hours starting at or after `since_unix` (not
    /// shipped yet).
    pub fn cost_since(&self, vkey_id: &str, since_unix: i64) -> u128 {
        let rows = self.rows.lock().unwrap_or_else(PoisonError::into_inner);
        rows.iter()
            .filter(|(hour, _)| **hour >= since_unix)
            .filter_map(|(_, by_key)| by_key.get(vkey_id))
            .flat_map(|by_assignment| by_assignment.values())
            .fold(0u128, |sum, slot| {
                sum.saturating_add(slot.sums.cost_pico_usd)
            })
    }

    /// Empties the aggregate into wire rows (converted after the lock is released).
    pub fn take(&self) -> Vec<UsageRow> {
        let taken = std::mem::take(&mut *self.rows.lock().unwrap_or_else(PoisonError::into_inner));
        let signed = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let mut out = Vec::new();
        for (hour, by_key) in taken {
            for (vkey_id, by_assignment) in by_key {
                for (assignment_id, slot) in by_assignment {
                    let s = slot.sums;
                    out.push(UsageRow {
                        vkey_id: vkey_id.to_string(),
                        assignment_id: assignment_id.into(),
                        model_id: slot.model_id.into(),
                        alias: slot.alias.to_string(),
                        hour_unix: hour,
                        requests: signed(s.requests),
                        input_tokens: signed(s.input),
                        output_tokens: signed(s.output),
                        cache_read_tokens: signed(s.cache_read),
                        cache_write_tokens: signed(s.cache_write),
                        reasoning_tokens: signed(s.reasoning),
                        cost_pico_usd: s.cost_pico_usd.to_string(),
                        // The index keeps no key names (memory); the control plane fills it.
                        vkey_name: String::new(),
                        model_name: slot.model_name.into(),
                    });
                }
            }
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    /// The control plane URL, TLS setting or token is invalid (the config sync says so too).
    #[error("cannot set up usage reports: {0}")]
    Setup(String),
    #[error("usage report refused: {code:?}: {message}")]
    Rpc { code: tonic::Code, message: String },
    #[error("usage report timed out")]
    Timeout,
}

/// Adds the data-plane token to every call.
#[derive(Clone)]
struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

type Client = ConfigServiceClient<InterceptedService<Channel, Auth>>;

#[derive(Debug)]
struct Batch {
    sequence: u64,
    rows: Vec<UsageRow>,
}

#[derive(Debug, Default)]
struct Queue {
    batches: VecDeque<Batch>,
    next_sequence: u64,
}

/// Turns the aggregate into batches and sends them in order.
pub struct UsageShipper {
    pub aggregator: Arc<UsageAggregator>,
    node_id: String,
    boot_id: String,
    max_batches: usize,
    metrics: Arc<Metrics>,
    client: Result<Client, String>,
    /// Held across the sends: one flush at a time keeps the batches in order.
    queue: tokio::sync::Mutex<Queue>,
}

impl std::fmt::Debug for UsageShipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageShipper")
            .field("node_id", &self.node_id)
            .field("boot_id", &self.boot_id)
            .field("max_batches", &self.max_batches)
            .finish_non_exhaustive()
    }
}

/// A random id for this process start (128 bits, hex).
fn new_boot_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl UsageShipper {
    /// A shipper over a lazily connected channel to the control plane of `sync` (the same endpoint,
    /// TLS and token as the config stream; the channel reconnects by itself). Call it inside a
    /// Tokio runtime (the lazy channel spawns its connection task there).
    pub fn new(sync: &SyncSettings, settings: UsageSettings, metrics: Arc<Metrics>) -> Self {
        let client = sync
            .endpoint()
            .and_then(|endpoint| Ok((endpoint, sync.authorization()?)))
            .map(|(endpoint, auth)| {
                ConfigServiceClient::with_interceptor(endpoint.connect_lazy(), Auth(auth))
                    .max_encoding_message_size(llm_proxy_catalog::MAX_GRPC_MESSAGE_BYTES)
            })
            .map_err(|e| e.to_string());
        Self {
            aggregator: Arc::new(UsageAggregator::default()),
            node_id: sync.node_id.clone(),
            boot_id: new_boot_id(),
            max_batches: settings.queue_max_batches.max(1),
            metrics,
            client,
            queue: tokio::sync::Mutex::new(Queue::default()),
        }
    }

    /// Batches waiting for an acknowledgement.
    pub async fn queued_batches(&self) -> usize {
        self.queue.lock().await.batches.len()
    }

    /// Moves the aggregate into the queue (split at [`MAX_ROWS_PER_BATCH`]; past the bound the
    /// oldest batches are dropped and their rows counted).
    fn enqueue(&self, queue: &mut Queue) {
        let mut rows = self.aggregator.take();
        while !rows.is_empty() {
            let rest = rows.split_off(rows.len().min(MAX_ROWS_PER_BATCH));
            let sequence = queue.next_sequence;
            queue.next_sequence += 1;
            queue.batches.push_back(Batch { sequence, rows });
            rows = rest;
        }
        while queue.batches.len() > self.max_batches {
            if let Some(dropped) = queue.batches.pop_front() {
                let n = dropped.rows.len() as u64;
                self.metrics.usage_dropped(n);
                tracing::warn!(
                    sequence = dropped.sequence,
                    rows = n,
                    "usage queue full: oldest batch dropped"
                );
            }
        }
    }

    /// Queues what was aggregated since the last flush and sends every queued batch, oldest
    /// first; stops at the first failure (the rest stay queued, in order).
    pub async fn flush(&self) -> Result<(), ShipError> {
        let mut queue = self.queue.lock().await;
        self.enqueue(&mut queue);
        let client = match &self.client {
            Ok(client) => client,
            Err(message) => return Err(ShipError::Setup(message.clone())),
        };
        while let Some(batch) = queue.batches.front() {
            let request = ReportUsageRequest {
                node_id: self.node_id.clone(),
                boot_id: self.boot_id.clone(),
                sequence: batch.sequence,
                rows: batch.rows.clone(),
            };
            let mut client = client.clone();
            match tokio::time::timeout(REPORT_TIMEOUT, client.report_usage(request)).await {
                Ok(Ok(answer)) => {
                    let result = if answer.into_inner().added {
                        "sent"
                    } else {
                        "duplicate"
                    };
                    self.metrics.usage_batch(result);
                    queue.batches.pop_front();
                }
                // The control plane will never take this batch (a row out of its bounds): resending
                // it would block every later one.
                Ok(Err(status)) if status.code() == tonic::Code::InvalidArgument => {
                    self.metrics.usage_batch("failed");
                    if let Some(dropped) = queue.batches.pop_front() {
                        self.metrics.usage_dropped(dropped.rows.len() as u64);
                        tracing::error!(sequence = dropped.sequence, message = %status.message(), "usage batch refused by the control plane: dropped");
                    }
                }
                Ok(Err(status)) => {
                    self.metrics.usage_batch("failed");
                    return Err(ShipError::Rpc {
                        code: status.code(),
                        message: status.message().to_owned(),
                    });
                }
                Err(_) => {
                    self.metrics.usage_batch("failed");
                    return Err(ShipError::Timeout);
                }
            }
        }
        Ok(())
    }

    /// A key's spend in the hours starting at or after `since_unix`, in pico-USD: the control
    /// plane's recorded usage (`GetSpend`) plus what this data plane holds unshipped. The queue is
    /// held meanwhile, so no batch moves from one side to the other during the count.
    pub async fn spend_since(&self, vkey_id: &str, since_unix: i64) -> Result<u128, ShipError> {
        let client = match &self.client {
            Ok(client) => client,
            Err(message) => return Err(ShipError::Setup(message.clone())),
        };
        let queue = self.queue.lock().await;
        let queued = queue
            .batches
            .iter()
            .flat_map(|b| &b.rows)
            .filter(|r| r.vkey_id == vkey_id && r.hour_unix >= since_unix)
            .map(|r| r.cost_pico_usd.parse::<u128>().unwrap_or(0))
            .fold(0u128, u128::saturating_add);
        let pending = self.aggregator.cost_since(vkey_id, since_unix);
        let request = GetSpendRequest {
            vkey_id: vkey_id.to_owned(),
            since_unix,
        };
        let answer =
            match tokio::time::timeout(REPORT_TIMEOUT, client.clone().get_spend(request)).await {
                Ok(Ok(answer)) => answer.into_inner(),
                Ok(Err(status)) => {
                    return Err(ShipError::Rpc {
                        code: status.code(),
                        message: status.message().to_owned(),
                    });
                }
                Err(_) => return Err(ShipError::Timeout),
            };
        drop(queue);
        let recorded = answer
            .cost_pico_usd
            .parse::<u128>()
            .map_err(|_| ShipError::Rpc {
                code: tonic::Code::Internal,
                message: format!("invalid cost_pico_usd {:?}", answer.cost_pico_usd),
            })?;
        Ok(recorded.saturating_add(queued).saturating_add(pending))
    }

    /// Flushes every `interval` until the task is aborted (a failure is retried on the next tick).
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(100)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            if let Err(err) = self.flush().await {
                let queued = self.queued_batches().await;
                tracing::warn!(error = %err, queued, "usage report failed; retrying on the next tick");
            }
        }
    }
}

impl crate::budget::SpendSource for UsageShipper {
    fn spend_since<'a>(
        &'a self,
        vkey_id: &'a str,
        since_unix: i64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<u128, String>> + Send + 'a>>
    {
        Box::pin(async move {
            UsageShipper::spend_since(self, vkey_id, since_unix)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static ALIAS: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("alias"));

    fn target<'a>(vkey: &'a str, assignment: &'a str) -> UsageKey<'a> {
        UsageKey {
            vkey_id: vkey,
            assignment_id: assignment,
            model_id: "m1",
            model_name: "model",
            alias: &ALIAS,
        }
    }

    fn usage(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cache_read_tokens: 1,
            ..Usage::default()
        }
    }

    #[test]
    fn aggregates_per_key_assignment_and_hour() {
        let agg = UsageAggregator::default();
        let t = target("k1", "a1");
        agg.add_at(&t, 7200 + 5, &usage(10, 2), 7);
        agg.add_at(&t, 7200 + 3599, &usage(5, 1), u128::from(u64::MAX) * 4);
        agg.add_at(&t, 10800, &usage(1, 1), 0);
        agg.add_at(&target("k2", "a1"), 7200, &usage(1, 1), 0);
        let mut rows = agg.take();
        rows.sort_by(|a, b| (&a.vkey_id, a.hour_unix).cmp(&(&b.vkey_id, b.hour_unix)));
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].hour_unix, 7200);
        assert_eq!(rows[0].requests, 2);
        assert_eq!(rows[0].input_tokens, 15);
        assert_eq!(rows[0].output_tokens, 3);
        assert_eq!(rows[0].cache_read_tokens, 2);
        assert_eq!(
            rows[0].cost_pico_usd,
            (u128::from(u64::MAX) * 4 + 7).to_string()
        );
        assert_eq!(rows[1].hour_unix, 10800);
        assert_eq!(rows[1].cost_pico_usd, "0");
        assert_eq!(rows[2].vkey_id, "k2");
        assert!(agg.take().is_empty());
    }

    #[tokio::test]
    async fn the_queue_bound_drops_the_oldest_and_counts_their_rows() {
        let metrics = Arc::new(Metrics::new());
        // Nothing listens on port 1: every send fails.
        let sync = SyncSettings::plaintext("http://127.0.0.1:1", "dp-test");
        let shipper = UsageShipper::new(
            &sync,
            UsageSettings {
                interval: Duration::from_secs(10),
                queue_max_batches: 2,
            },
            metrics.clone(),
        );
        for n in 0..4u64 {
            // Batch n has n + 1 rows.
            for a in 0..=n {
                shipper
                    .aggregator
                    .add(&target("k", &format!("a{a}")), &usage(1, 1), 0);
            }
            assert!(shipper.flush().await.is_err());
        }
        let queue = shipper.queue.lock().await;
        let sequences: Vec<u64> = queue.batches.iter().map(|b| b.sequence).collect();
        assert_eq!(sequences, [2, 3]);
        assert_eq!(queue.next_sequence, 4);
        // Batches 0 and 1 held 1 + 2 rows.
        assert_eq!(metrics.usage_dropped_total(), 3);
    }

    #[tokio::test]
    async fn large_aggregates_are_split() {
        let metrics = Arc::new(Metrics::new());
        let sync = SyncSettings::plaintext("http://127.0.0.1:1", "dp-test");
        let shipper = UsageShipper::new(&sync, UsageSettings::default(), metrics);
        for a in 0..(MAX_ROWS_PER_BATCH + 5) {
            shipper
                .aggregator
                .add(&target("k", &format!("a{a}")), &usage(1, 1), 0);
        }
        let mut queue = Queue::default();
        shipper.enqueue(&mut queue);
        let sizes: Vec<usize> = queue.batches.iter().map(|b| b.rows.len()).collect();
        assert_eq!(sizes, [MAX_ROWS_PER_BATCH, 5]);
    }
}
