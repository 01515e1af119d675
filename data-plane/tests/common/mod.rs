//! The harness shared by the `*_with_mock_upstreams` tests: a control plane on SQLite in a
//! temporary directory, a data plane that takes its config from it through the real config
//! stream, and helpers around the one mock upstream (`llm_proxy_mock_upstream::MockUpstream`).
// Each test crate uses a part of it.
#![allow(dead_code)]
#![allow(
    clippy::disallowed_methods,
    reason = "test tasks end with the test's runtime"
)]

use llm_proxy_control_plane::server::{self as cp_server, RunningControlPlane, ServerSettings};
use llm_proxy_control_plane::store::{
    NewAssignment, NewConnection, NewModel, NewVirtualKey, Store,
};
use llm_proxy_data_plane::gateway::{self, GatewaySettings, RunningGateway};
use llm_proxy_data_plane::sync::SyncSettings;
use secrecy::SecretString;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub const PATIENCE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Control plane + data plane

/// A control plane on `dir/cp.db`, listening on `addr`, that pushes changes quickly.
pub fn control_plane_settings(dir: &Path, addr: SocketAddr, key: &SecretString) -> ServerSettings {
    let mut settings = ServerSettings::new(
        addr,
        SecretString::from(format!("sqlite://{}", dir.join("cp.db").display())),
        SecretString::from(secrecy::ExposeSecret::expose_secret(key).to_owned()),
    );
    settings.hub = llm_proxy_control_plane::hub::HubTimings {
        coalesce: Duration::from_millis(10),
        poll: Duration::from_millis(500),
    };
    settings
}

/// Starts a control plane on a new database in `dir`, with a new master key (returned too).
pub async fn start_control_plane(dir: &Path) -> (RunningControlPlane, SecretString) {
    let master_key = llm_proxy_control_plane::crypto::MasterKeys::generate_encoded();
    let cp = cp_server::start(control_plane_settings(
        dir,
        "127.0.0.1:0".parse().unwrap(),
        &master_key,
    ))
    .await
    .unwrap();
    (cp, master_key)
}

/// Caps on upstream answers in the test data planes: small, so that the garbage-upstream tests
/// (bodies and events larger than the caps) stay fast and light; every real answer is far below.
pub const TEST_MAX_UPSTREAM_BODY_BYTES: usize = 1024 * 1024;
pub const TEST_MAX_STREAM_EVENT_BYTES: usize = 256 * 1024;

/// Settings of a data plane on a local port that syncs from `cp` as `node_id` (64 KiB body limit,
/// [`TEST_MAX_UPSTREAM_BODY_BYTES`], [`TEST_MAX_STREAM_EVENT_BYTES`], no metrics listener).
pub fn data_plane_settings(
    cp: &RunningControlPlane,
    node_id: &str,
    redis_url: Option<SecretString>,
) -> GatewaySettings {
    GatewaySettings {
        limits: llm_proxy_data_plane::limits::Limits {
            max_body_bytes: 64 * 1024,
            max_upstream_body_bytes: TEST_MAX_UPSTREAM_BODY_BYTES,
            max_stream_event_bytes: TEST_MAX_STREAM_EVENT_BYTES,
            ..Default::default()
        },
        redis_url,
        ratelimit_redis_budget: Duration::from_millis(200),
        ..GatewaySettings::on_loopback(SyncSettings::plaintext(
            format!("http://{}", cp.grpc_addr),
            node_id,
        ))
    }
}

/// Starts a data plane with [`data_plane_settings`].
pub async fn start_data_plane(
    cp: &RunningControlPlane,
    node_id: &str,
    redis_url: Option<SecretString>,
) -> RunningGateway {
    gateway::start(data_plane_settings(cp, node_id, redis_url))
        .await
        .unwrap()
}

/// Waits until `dp` has applied the control plane's current config version.
pub async fn wait_applied(cp: &RunningControlPlane, dp: &RunningGateway) {
    let version = cp.store.current_version().await.unwrap().1;
    tokio::time::timeout(PATIENCE, dp.config.wait_for_version(version))
        .await
        .expect("data plane did not apply the config");
}

/// A connection's options from `(name, value)` pairs.
pub fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Adds `connections` (name, credential, options) of `provider`, all at `endpoint`.
pub async fn add_connections<'a>(
    store: &Store,
    provider: &str,
    endpoint: &str,
    connections: impl IntoIterator<Item = (&'a str, String, BTreeMap<String, String>)>,
) {
    for (name, credential, options) in connections {
        store
            .create_connection(NewConnection {
                name: name.into(),
                provider: provider.into(),
                endpoint: endpoint.to_owned(),
                credential: SecretString::from(credential),
                options,
            })
            .await
            .unwrap();
    }
}

/// Adds `models` (connection, model name, remote), then the virtual key `vkey` with the secret
/// `key`, assigned every one of them with its name as the alias.
pub async fn add_models_for_key(
    store: &Store,
    vkey: &str,
    key: &str,
    models: &[(&str, &str, &str)],
) {
    for (connection, name, remote) in models {
        store
            .create_model(NewModel {
                connection: (*connection).into(),
                name: (*name).into(),
                remote: (*remote).into(),
                deployment: None,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    store
        .create_vkey(NewVirtualKey {
            name: vkey.into(),
            key: Some(SecretString::from(key)),
            expires_at: None,
            ..Default::default()
        })
        .await
        .unwrap();
    for (_, name, _) in models {
        store
            .create_assignment(NewAssignment {
                vkey: vkey.into(),
                model: (*name).into(),
                alias: Some((*name).into()),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// POSTs a JSON `body` to `url` with the client key `key` as a bearer token.
pub async fn post_json(
    http: &reqwest::Client,
    url: String,
    key: &str,
    body: &str,
) -> reqwest::Response {
    http.post(url)
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The mock upstream (`llm_proxy_mock_upstream::MockUpstream`)

pub use llm_proxy_mock_upstream::Recorded;

// ---------------------------------------------------------------------------------------------
// Assertions

/// Asserts that the client's key `key` is in none of the headers and not in the body of a request
/// the gateway sent upstream.
pub fn assert_key_not_forwarded(recorded: &Recorded, key: &str) {
    for (name, value) in &recorded.headers {
        assert!(
            !value.to_str().unwrap_or_default().contains(key),
            "virtual key forwarded in {name}"
        );
    }
    assert!(!String::from_utf8_lossy(&recorded.body).contains(key));
}

/// The `data:` payloads of a client SSE body (which must use `\n\n` terminators throughout).
pub fn sse_data(text: &str) -> Vec<String> {
    assert!(text.ends_with("\n\n"), "unterminated stream: {text:?}");
    text.split("\n\n")
        .filter(|event| !event.is_empty())
        .map(|event| {
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {event:?}"))
                .to_owned()
        })
        .collect()
}

/// The data plane's `llm_proxy_tokens_total` series of `alias`, as kind → count (summed over
/// providers): a kind without a series is absent.
pub fn token_counts(dp: &RunningGateway, alias: &str) -> BTreeMap<String, u64> {
    let text = dp.metrics.render(&dp.config, &dp.limiter);
    let mut counts = BTreeMap::new();
    let alias = format!("alias=\"{alias}\"");
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("llm_proxy_tokens_total{") else {
            continue;
        };
        let (labels, value) = rest.rsplit_once("} ").expect("a sample line");
        if !labels.split(',').any(|label| label == alias) {
            continue;
        }
        let kind = labels
            .split(',')
            .find_map(|label| label.strip_prefix("kind=\""))
            .and_then(|kind| kind.strip_suffix('"'))
            .expect("a kind label");
        *counts.entry(kind.to_owned()).or_default() += value.parse::<u64>().expect("a count");
    }
    counts
}

/// `pairs` as [`token_counts`] returns them.
pub fn kinds(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
}

// ---------------------------------------------------------------------------------------------
// The real data plane binary

/// A `llm-proxy-data-plane` child process (killed on drop).
pub struct DataPlaneProcess {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    /// Every line the child wrote on stderr so far.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    drain: tokio::task::JoinHandle<()>,
}

/// The addresses in the data plane's listening line: `llm-proxy data plane listening on ADDR
/// (metrics on ADDR)`, or under `LLM_PROXY_LOG_FORMAT=json` a JSON line with that message and the
/// `addr` and `metrics_addr` fields. `None` for any other line.
pub fn dp_listening_line(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    const PREFIX: &str = "llm-proxy data plane listening on ";
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(line) {
        let fields = &json["fields"];
        if !fields["message"].as_str()?.starts_with(PREFIX) {
            return None;
        }
        let addr = |name: &str| fields[name].as_str().and_then(|a| a.parse().ok());
        return Some((addr("addr")?, addr("metrics_addr")?));
    }
    let words: Vec<&str> = line.strip_prefix(PREFIX)?.split_whitespace().collect();
    Some((
        words.first()?.parse().ok()?,
        words.get(3)?.trim_end_matches(')').parse().ok()?,
    ))
}

impl DataPlaneProcess {
    /// Starts the binary on local ports, subscribed to the control plane at `cp`, with `args`.
    pub async fn start(cp: SocketAddr, node: &str, args: &[&str]) -> Self {
        Self::start_with_env(cp, node, args, &[]).await
    }

    /// [`DataPlaneProcess::start`] with `env` on top of `RUST_LOG=warn`.
    pub async fn start_with_env(
        cp: SocketAddr,
        node: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        use std::process::Stdio;
        use tokio::io::{AsyncBufReadExt as _, BufReader};
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-proxy-data-plane"))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args([
                "--control-plane",
                &format!("http://{cp}"),
                "--node-id",
                node,
            ])
            .args(args)
            .env_remove("REDIS_URL")
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (addr, metrics) = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let found = dp_listening_line(&line);
                log.lock().unwrap().push(line);
                if let Some(addrs) = found {
                    return addrs;
                }
            }
            panic!(
                "data plane exited before listening: {:?}",
                log.lock().unwrap()
            );
        })
        .await
        .expect("data plane did not start");
        // Keep draining stderr so the child never blocks on a full pipe.
        let sink = log.clone();
        let drain = tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            addr,
            metrics,
            log,
            drain,
        }
    }

    /// Sends SIGTERM, waits for the process to end and returns how it ended and all its stderr.
    pub async fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>) {
        let pid = self.child.id().expect("data plane exited").to_string();
        let sent = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("data plane did not stop after SIGTERM")
            .unwrap();
        // The pipe is closed once the process is gone: the drain ends with it.
        tokio::time::timeout(PATIENCE, &mut self.drain)
            .await
            .expect("stderr not closed")
            .unwrap();
        let log = self.log.lock().unwrap().clone();
        (status, log)
    }

    /// A line of the child's `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
    pub fn memory_kib(&self, field: &str) -> u64 {
        let pid = self.child.id().expect("data plane exited");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
    }

    /// Resets the process's peak resident size (`VmHWM`) to its current one.
    pub fn reset_peak(&self) {
        let pid = self.child.id().expect("data plane exited");
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    }

    /// The `/metrics` text of the data plane.
    pub async fn metrics_text(&self, http: &reqwest::Client) -> String {
        http.get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits until `/v1/models` with `key` lists `alias` (the snapshot is applied).
    pub async fn wait_serving(&self, http: &reqwest::Client, key: &str, alias: &str) {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let models = http
                .get(format!("http://{}/v1/models", self.addr))
                .bearer_auth(key)
                .send()
                .await;
            if let Ok(r) = models
                && r.status() == 200
                && r.text().await.unwrap_or_default().contains(alias)
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "data plane {} never got its config",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
