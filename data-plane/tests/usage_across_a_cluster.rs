//! Usage accounting across a cluster (DESIGN §18, issue 18): three real data plane processes on
//! one Redis and one real control plane process on Postgres serve a few hundred mixed requests
//! (two virtual keys; an OpenAI model and an Anthropic model with different prices, one with its
//! cache prices unset so that they fall back to the input price; OpenAI chat and Anthropic
//! Messages, streamed and not; cached prompt, cache-write and reasoning tokens; refusals, which
//! are not counted). The control plane is SIGKILLed while requests are in flight, after it has
//! written a batch whose acknowledgement a proxy in front of it held back (so that batch must be
//! sent again and taken for a duplicate), and started again on the same address and database
//! while more requests are answered; data planes queue what they cannot ship and resend it; one
//! data plane ships only at shutdown and is SIGTERMed right after the traffic.
//!
//! The real `llmctl usage -o json` (totals, and grouped by key and model) must then equal, to the
//! token and the micro-dollar, the sums this test computes itself from the usage it asked the mock
//! upstream to report and the prices it set (DESIGN §18 cost formula, exact in pico-USD, rounded
//! half up to micro-USD) — no batch lost, none counted twice — and still equal it once every data
//! plane has shut down and shipped the rest.
//!
//! The control plane and `llmctl` are binaries of other packages: they are taken from the
//! directory of this package's data plane binary, where a workspace test run has built them; when
//! one is missing or older than its sources, this test builds it there first.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::disallowed_methods,
    reason = "test tasks end with the test's runtime"
)]

mod common;

use common::DataPlaneProcess;
use futures_util::StreamExt as _;
use llm_proxy_mock_upstream::MockUpstream;
use llm_proxy_mock_upstream::anthropic::{ANTHROPIC_KEY, CACHE_CREATION_TOKENS, CACHE_READ_TOKENS};
use llm_proxy_mock_upstream::openai::OPENAI_KEY;
use secrecy::ExposeSecret as _;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

const PATIENCE: Duration = Duration::from_secs(30);
/// Requests per phase: before the control plane is killed, while it is down, after its restart.
const PER_PHASE: usize = 100;
const PHASES: usize = 3;
const CONCURRENCY: usize = 12;

const KEYS: [(&str, &str); 2] = [
    ("usage-cluster-frontend", "vk-usage-cluster-frontend-1234"),
    ("usage-cluster-backend", "vk-usage-cluster-backend-5678"),
];

/// A model's prices in micro-USD per million tokens, i.e. pico-USD per token (`None`: unset).
#[derive(Clone, Copy)]
struct Prices {
    input: u128,
    output: u128,
    cache_read: Option<u128>,
    cache_write: Option<u128>,
}

/// The OpenAI model: no cache prices (cached tokens cost the input price).
const GPT: &str = "gpt";
const GPT_PRICES: Prices = Prices {
    input: 2_500_003,
    output: 10_000_003,
    cache_read: None,
    cache_write: None,
};
/// The Anthropic model: every price set, none a whole number of micro-USD per token.
const CLAUDE: &str = "claude";
const CLAUDE_PRICES: Prices = Prices {
    input: 3_000_007,
    output: 15_000_011,
    cache_read: Some(300_013),
    cache_write: Some(3_750_017),
};

/// `micro`-USD per million tokens as `llmctl --price-*` takes it (USD, 6 places).
fn usd_arg(micro: u128) -> String {
    format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

// ---------------------------------------------------------------------------------------------
// What the upstream reports, and what it must cost

/// The usage of one answer as DESIGN §18 counts it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Sums {
    requests: u64,
    input: u64,
    output: u64,
    cache_read: u64,
    cache_write: u64,
    reasoning: u64,
    cost_pico_usd: u128,
}

impl Sums {
    /// One request's usage and its cost: (input − cache read − cache write) × input price + cache
    /// read × cache read price + cache write × cache write price + output × output price, an unset
    /// cache price being the input price.
    fn one(
        input: u64,
        output: u64,
        cache_read: u64,
        cache_write: u64,
        reasoning: u64,
        p: Prices,
    ) -> Self {
        let [i, o, r, w] = [input, output, cache_read, cache_write].map(u128::from);
        let cost = (i - r - w) * p.input
            + r * p.cache_read.unwrap_or(p.input)
            + w * p.cache_write.unwrap_or(p.input)
            + o * p.output;
        Self {
            requests: 1,
            input,
            output,
            cache_read,
            cache_write,
            reasoning,
            cost_pico_usd: cost,
        }
    }

    fn add(&mut self, more: &Sums) {
        self.requests += more.requests;
        self.input += more.input;
        self.output += more.output;
        self.cache_read += more.cache_read;
        self.cache_write += more.cache_write;
        self.reasoning += more.reasoning;
        self.cost_pico_usd += more.cost_pico_usd;
    }

    /// The sums columns of `llmctl usage -o json`: cost rounded half up to micro-USD, and as USD
    /// with 6 places.
    fn columns(&self, into: &mut serde_json::Map<String, Value>) {
        let micro = (self.cost_pico_usd + 500_000) / 1_000_000;
        let micro_json = u64::try_from(micro).unwrap();
        for (name, value) in [
            ("requests", json!(self.requests)),
            ("input_tokens", json!(self.input)),
            ("output_tokens", json!(self.output)),
            ("cache_read_tokens", json!(self.cache_read)),
            ("cache_write_tokens", json!(self.cache_write)),
            ("reasoning_tokens", json!(self.reasoning)),
            ("cost_micro_usd", json!(micro_json)),
            (
                "cost_usd",
                json!(format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)),
            ),
        ] {
            into.insert(name.to_owned(), value);
        }
    }
}

/// How one planned request is sent.
#[derive(Debug, Clone, Copy)]
enum Call {
    /// OpenAI chat to the OpenAI model, asking the mock for `usage-P-C-K-R` (P prompt tokens, K
    /// of them cached; C completion tokens, R of them reasoning).
    GptChat { p: u64, c: u64, k: u64, r: u64 },
    /// Anthropic Messages to the Anthropic model, asking for `usage-P-C` (P uncached input
    /// tokens, C output tokens); with `cache_control` the mock adds its cache write and read.
    ClaudeMessages { p: u64, c: u64, cached: bool },
    /// OpenAI chat to the Anthropic model (translated), `usage-P-C`, no cache.
    ClaudeChat { p: u64, c: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Planned {
    key: usize,
    plane: usize,
    stream: bool,
    call: Call,
}

impl Planned {
    fn model(&self) -> &'static str {
        match self.call {
            Call::GptChat { .. } => GPT,
            Call::ClaudeMessages { .. } | Call::ClaudeChat { .. } => CLAUDE,
        }
    }

    /// What the upstream reports for this request, as DESIGN §18 counts it, and its cost.
    fn expected(&self) -> Sums {
        match self.call {
            Call::GptChat { p, c, k, r } => Sums::one(p, c, k, 0, r, GPT_PRICES),
            Call::ClaudeMessages { p, c, cached } => {
                let (read, write) = if cached {
                    (CACHE_READ_TOKENS, CACHE_CREATION_TOKENS)
                } else {
                    (0, 0)
                };
                Sums::one(p + read + write, c, read, write, 0, CLAUDE_PRICES)
            }
            Call::ClaudeChat { p, c } => Sums::one(p, c, 0, 0, 0, CLAUDE_PRICES),
        }
    }
}

/// The traffic: deterministic but varied counts, keys, planes, dialects and streaming.
fn plan() -> Vec<Planned> {
    (0..PER_PHASE * PHASES)
        .map(|n| {
            let i = n as u64;
            let p = 1 + (i * 7919) % 5000;
            let c = 1 + (i * 104_729) % 900;
            let call = match n % 5 {
                0 | 1 => Call::GptChat {
                    p,
                    c,
                    // Every third without cache, every fourth without reasoning.
                    k: if n % 3 == 0 { 0 } else { (i * 31) % (p + 1) },
                    r: if n % 4 == 0 { 0 } else { (i * 17) % (c + 1) },
                },
                2 | 3 => Call::ClaudeMessages {
                    p,
                    c,
                    cached: n % 2 == 0,
                },
                _ => Call::ClaudeChat { p, c },
            };
            Planned {
                key: (n / 2) % 2,
                plane: n % 3,
                stream: n % 7 < 3,
                call,
            }
        })
        .collect()
}

/// Sends one planned request to `base`, checks the answer and reads it to its end (a stream's
/// usage is counted when its end is settled).
async fn send(http: &reqwest::Client, base: &str, r: Planned) {
    let key = KEYS[r.key].1;
    let stream = r.stream;
    let (url, request) = match r.call {
        Call::GptChat { p, c, k, r } => (
            format!("{base}/v1/chat/completions"),
            http.post(format!("{base}/v1/chat/completions"))
                .bearer_auth(key)
                .body(format!(
                    r#"{{"model":"{GPT}","stream":{stream},"messages":[{{"role":"user","content":"usage-{p}-{c}-{k}-{r}"}}]}}"#
                )),
        ),
        Call::ClaudeMessages { p, c, cached } => {
            let cache = if cached {
                r#","cache_control":{"type":"ephemeral"}"#
            } else {
                ""
            };
            (
                format!("{base}/v1/messages"),
                http.post(format!("{base}/v1/messages"))
                    .header("x-api-key", key)
                    .header("anthropic-version", "2023-06-01")
                    .body(format!(
                        r#"{{"model":"{CLAUDE}","max_tokens":1000,"stream":{stream},"messages":[{{"role":"user","content":[{{"type":"text","text":"usage-{p}-{c}"{cache}}}]}}]}}"#
                    )),
            )
        }
        Call::ClaudeChat { p, c } => (
            format!("{base}/v1/chat/completions"),
            http.post(format!("{base}/v1/chat/completions"))
                .bearer_auth(key)
                .body(format!(
                    r#"{{"model":"{CLAUDE}","stream":{stream},"messages":[{{"role":"user","content":"usage-{p}-{c}"}}]}}"#
                )),
        ),
    };
    let answer = tokio::time::timeout(
        PATIENCE,
        request.header("content-type", "application/json").send(),
    )
    .await
    .unwrap_or_else(|_| panic!("no answer from {url}"))
    .unwrap();
    let status = answer.status();
    let text = tokio::time::timeout(PATIENCE, answer.text())
        .await
        .unwrap_or_else(|_| panic!("answer from {url} never ended"))
        .unwrap();
    assert_eq!(status, 200, "{r:?}: {text}");
    if stream {
        return;
    }
    // Plain answers show the usage the upstream reported: the one this test expects.
    let body: Value = serde_json::from_str(&text).unwrap();
    let usage = &body["usage"];
    let want = r.expected();
    match r.call {
        Call::GptChat { .. } | Call::ClaudeChat { .. } => {
            assert_eq!(usage["prompt_tokens"], want.input, "{r:?}: {text}");
            assert_eq!(usage["completion_tokens"], want.output, "{r:?}: {text}");
        }
        Call::ClaudeMessages { p, .. } => {
            assert_eq!(usage["input_tokens"], p, "{r:?}: {text}");
            assert_eq!(usage["output_tokens"], want.output, "{r:?}: {text}");
            assert_eq!(usage["cache_read_input_tokens"], want.cache_read, "{text}");
            assert_eq!(
                usage["cache_creation_input_tokens"], want.cache_write,
                "{text}"
            );
        }
    }
}

/// Sends `requests` over the planes, [`CONCURRENCY`] at a time; counts the answered ones in
/// `done`. Every 25th request is followed by two refusals (unknown alias, unknown key), which
/// reach no upstream and must not be counted.
///
/// With a `gate` (index, open), the requests from that index on are sent once it is open.
async fn traffic(
    http: &reqwest::Client,
    planes: &[String],
    requests: &[Planned],
    done: &AtomicUsize,
    gate: Option<(usize, &tokio::sync::watch::Sender<bool>)>,
) {
    futures_util::stream::iter(requests.iter().copied().enumerate())
        .for_each_concurrent(CONCURRENCY, |(n, r)| async move {
            if let Some((from, open)) = gate
                && n >= from
            {
                let mut open = open.subscribe();
                tokio::time::timeout(PATIENCE, open.wait_for(|open| *open))
                    .await
                    .expect("the gate never opened")
                    .unwrap();
            }
            let base = &planes[r.plane];
            send(http, base, r).await;
            if n % 25 == 0 {
                let unknown = http
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth(KEYS[r.key].1)
                    .header("content-type", "application/json")
                    .body(r#"{"model":"nope","messages":[{"role":"user","content":"usage-5-5"}]}"#)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(unknown.status(), 404);
                let unauthorized = http
                    .post(format!("{base}/v1/chat/completions"))
                    .bearer_auth("vk-usage-cluster-wrong")
                    .header("content-type", "application/json")
                    .body(r#"{"model":"gpt","messages":[{"role":"user","content":"usage-5-5"}]}"#)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(unauthorized.status(), 401);
            }
            done.fetch_add(1, Ordering::Relaxed);
        })
        .await;
}

// ---------------------------------------------------------------------------------------------
// The binaries of other packages

/// The newest modification time of the sources of `packages` (directories of the workspace):
/// every file but manifests (cargo rebuilds nothing for most manifest edits), tests, examples
/// and benches.
fn newest_source(packages: &[&str]) -> std::time::SystemTime {
    fn walk(path: &Path, newest: &mut std::time::SystemTime) {
        let meta = std::fs::metadata(path).unwrap();
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).unwrap() {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().into_owned();
                let skip = ["target", "tests", "examples", "benches", "Cargo.toml"];
                if !skip.contains(&name.as_str()) {
                    walk(&entry.path(), newest);
                }
            }
        } else {
            *newest = (*newest).max(meta.modified().unwrap());
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for package in packages {
        walk(&root.join(package), &mut newest);
    }
    newest
}

/// The binary `bin` of workspace package `package`, from the directory cargo put this package's
/// data plane binary in (one per profile). A workspace test run (`cargo nextest run --workspace`)
/// has built it there already; when it is missing or older than a source it is built from
/// (`sources`: directories of the workspace), it is built first (`cargo build -p PACKAGE --bin
/// BIN`), so that this test does not run stale code. A fresh binary is left alone: other tests
/// may be running it.
fn workspace_binary(package: &str, bin: &str, sources: &[&str]) -> PathBuf {
    let dir = Path::new(env!("CARGO_BIN_EXE_llm-proxy-data-plane"))
        .parent()
        .unwrap();
    let path = dir.join(bin);
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    if built.is_some_and(|built| built >= newest_source(sources)) {
        return path;
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cargo = std::process::Command::new(env!("CARGO"));
    cargo
        .args(["build", "--quiet", "--manifest-path"])
        .arg(&manifest)
        .args(["--package", package, "--bin", bin]);
    if dir.file_name().is_some_and(|name| name == "release") {
        cargo.arg("--release");
    }
    let status = cargo.status().unwrap();
    assert!(
        status.success(),
        "cargo build -p {package} --bin {bin} failed"
    );
    assert!(
        path.is_file(),
        "{} missing after cargo build",
        path.display()
    );
    path
}

// ---------------------------------------------------------------------------------------------
// Postgres, the control plane process, llmctl

fn postgres_base_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A new, empty schema `t_...` of the test Postgres; the URL selects it via `search_path`.
async fn fresh_postgres() -> String {
    use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
    let base = postgres_base_url();
    let mut conn = AsyncPgConnection::establish(&base)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to test Postgres at {base}: {e}"));
    let schema = format!(
        "t_{}",
        llm_proxy_control_plane::ids::new_id("x").trim_start_matches("x-")
    );
    diesel::sql_query(format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options=-c%20search_path%3D{schema}")
}

/// A `llm-proxy-control-plane serve` process.
struct ControlPlane {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl ControlPlane {
    /// Starts the binary on `listen` (port 0: any) with the database `url` and `master_key`;
    /// returns once it is ready (its database migrated).
    async fn start(exe: &Path, listen: SocketAddr, url: &str, master_key: &str) -> Self {
        use tokio::io::{AsyncBufReadExt as _, BufReader};
        const PREFIX: &str = "llm-proxy control plane listening on ";
        let mut child = tokio::process::Command::new(exe)
            .args(["serve", "--listen", &listen.to_string()])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("DATABASE_URL", url)
            .env("LLM_PROXY_MASTER_KEY", master_key)
            .env("RUST_LOG", "warn")
            .env_remove("LLM_PROXY_LOG_FORMAT")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        // `llm-proxy control plane listening on ADDR (gRPC), metrics on ADDR`
        let (addr, metrics) = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                log.lock().unwrap().push(line.clone());
                if let Some(rest) = line.strip_prefix(PREFIX) {
                    let addr: SocketAddr = rest.split_whitespace().next().unwrap().parse().unwrap();
                    let metrics: SocketAddr = rest.rsplit(' ').next().unwrap().parse().unwrap();
                    return (addr, metrics);
                }
            }
            panic!("control plane exited: {:?}", log.lock().unwrap());
        })
        .await
        .expect("control plane did not print its addresses");
        let sink = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        // It listens before its database is ready: wait for /readyz.
        let http = reqwest::Client::new();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let ready = http
                .get(format!("http://{metrics}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "control plane never ready: {:?}",
                log.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, addr }
    }

    /// SIGKILL: no shutdown of any kind.
    async fn kill(mut self) {
        self.child.start_kill().unwrap();
        let status = self.child.wait().await.unwrap();
        assert!(!status.success(), "killed, not exited: {status}");
    }
}

/// The real `llmctl` against the control plane at `server`.
struct Ctl {
    exe: PathBuf,
    server: String,
}

impl Ctl {
    /// `llmctl -o json ARGS`, which must succeed: its JSON output.
    async fn json(&self, args: &[&str]) -> Value {
        let out = tokio::process::Command::new(&self.exe)
            .env_remove("LLMCTL_ENDPOINT")
            .env_remove("LLMCTL_TOKEN")
            .env_remove("LLM_PROXY_ALLOW_PLAINTEXT")
            .env("LLMCTL_SERVER", &self.server)
            .args(["-o", "json"])
            .args(args)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(
            out.status.success(),
            "llmctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("llmctl {args:?}: {e}: {stdout}"))
    }

    async fn id(&self, args: &[&str]) -> String {
        let added = self.json(args).await;
        added["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{added}"))
            .to_owned()
    }

    /// `llmctl usage -o json`: totals (one row).
    async fn totals(&self) -> Value {
        self.json(&["usage"]).await
    }

    /// `llmctl usage -o json --group-by vkey --group-by model`, sorted by key and model name.
    async fn by_key_and_model(&self) -> Value {
        let mut rows = self
            .json(&["usage", "--group-by", "vkey", "--group-by", "model"])
            .await
            .as_array()
            .unwrap()
            .clone();
        rows.sort_by_key(|r| (r["vkey_name"].to_string(), r["model_name"].to_string()));
        Value::Array(rows)
    }
}

/// What the [`HoldingProxy`] does with the control plane's bytes.
#[derive(Debug, Clone, Copy, Default)]
struct ProxyState {
    /// Bytes from the control plane are kept from the data planes (never delivered).
    hold: bool,
    /// Bumped to cut every open connection.
    generation: u64,
}

/// A TCP proxy between the data planes and the control plane's gRPC port that can hold back
/// everything the control plane answers: a batch the control plane has written is then not
/// acknowledged, as when it dies between its commit and its answer.
struct HoldingProxy {
    addr: SocketAddr,
    state: Arc<tokio::sync::watch::Sender<ProxyState>>,
}

impl HoldingProxy {
    async fn start(target: SocketAddr) -> Self {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(tokio::sync::watch::Sender::new(ProxyState::default()));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut cut = shared.subscribe();
                let generation = cut.borrow().generation;
                let hold = shared.subscribe();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut from_cp, mut to_cp) = outbound.into_split();
                    let (mut from_dp, mut to_dp) = inbound.into_split();
                    let up = tokio::io::copy(&mut from_dp, &mut to_cp);
                    let down = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = from_cp.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            if hold.borrow().hold {
                                // Held: never delivered; the connection waits to be cut.
                                std::future::pending::<()>().await;
                            }
                            to_dp.write_all(&buf[..n]).await?;
                        }
                    };
                    tokio::select! {
                        _ = cut.wait_for(|s| s.generation != generation) => {}
                        _ = async { tokio::join!(up, down) } => {}
                    }
                });
            }
        });
        Self { addr, state }
    }

    fn hold(&self) {
        self.state.send_modify(|s| s.hold = true);
    }

    /// Cuts every open connection (what was held is lost) and lets new ones through.
    fn cut_and_release(&self) {
        self.state.send_modify(|s| {
            s.hold = false;
            s.generation += 1;
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The data planes

/// The value of the sample line `name VALUE` (labels included in `name`), 0 when absent.
async fn metric(http: &reqwest::Client, plane: &DataPlaneProcess, name: &str) -> u64 {
    let text = plane.metrics_text(http).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// `ReportUsage` calls of `plane` that ended with `result` (`sent`, `duplicate`, `failed`).
async fn batches(http: &reqwest::Client, plane: &DataPlaneProcess, result: &str) -> u64 {
    let name = format!(r#"llm_proxy_usage_batches_total{{result="{result}"}}"#);
    metric(http, plane, &name).await
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_is_exact_across_three_data_planes_a_killed_control_plane_and_a_shutdown() {
    let cp_exe = workspace_binary(
        "llm-proxy-control-plane",
        "llm-proxy-control-plane",
        &["proto", "catalog", "telemetry", "control-plane"],
    );
    let llmctl = workspace_binary(
        "llmctl",
        "llmctl",
        &[
            "proto",
            "catalog",
            "telemetry",
            "control-plane",
            "data-plane",
            "cli",
        ],
    );
    let mock = MockUpstream::start().await.unwrap();
    let db = fresh_postgres().await;
    let master_key = llm_proxy_control_plane::crypto::MasterKeys::generate_encoded();
    let master_key = master_key.expose_secret();
    let cp = ControlPlane::start(&cp_exe, "127.0.0.1:0".parse().unwrap(), &db, master_key).await;
    let cp_addr = cp.addr;
    let ctl = Ctl {
        exe: llmctl,
        server: format!("http://{cp_addr}"),
    };

    // Setup through llmctl, as an operator does it.
    let base = mock.base.as_str();
    let conn = |name: &'static str, provider: &'static str, key: &'static str| {
        let ctl = &ctl;
        async move {
            ctl.id(&[
                "connection",
                "add",
                "--name",
                name,
                "--provider",
                provider,
                "--endpoint",
                base,
                "--api-key",
                key,
            ])
            .await
        }
    };
    conn("OpenAI", "openai", OPENAI_KEY).await;
    conn("Anthropic", "anthropic", ANTHROPIC_KEY).await;
    let mut model_ids = BTreeMap::new();
    for (conn, name, remote, prices) in [
        ("OpenAI", GPT, "gpt-4o", GPT_PRICES),
        ("Anthropic", CLAUDE, "claude-sonnet-4-5", CLAUDE_PRICES),
    ] {
        let mut args: Vec<String> = [
            "model",
            "add",
            "--conn-id",
            conn,
            "--name",
            name,
            "--remote",
            remote,
        ]
        .map(str::to_owned)
        .to_vec();
        for (flag, price) in [
            ("--price-input", Some(prices.input)),
            ("--price-output", Some(prices.output)),
            ("--price-cache-read", prices.cache_read),
            ("--price-cache-write", prices.cache_write),
        ] {
            if let Some(price) = price {
                args.extend([flag.to_owned(), usd_arg(price)]);
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        model_ids.insert(name, ctl.id(&args).await);
    }
    let mut vkey_ids = BTreeMap::new();
    for (name, key) in KEYS {
        vkey_ids.insert(
            name,
            ctl.id(&["vkey", "add", "--name", name, "--key", key]).await,
        );
        for model in [GPT, CLAUDE] {
            ctl.id(&[
                "assign",
                "--vkey-id",
                name,
                "--model-id",
                model,
                "--alias",
                model,
            ])
            .await;
        }
    }

    // Three data planes on one Redis, which reach the control plane through the proxy. Two report
    // every second; the third only at shutdown. Their runtimes differ: single-threaded (what a
    // one-CPU pod gets), two workers, and one per CPU of this machine.
    let proxy = HoldingProxy::start(cp_addr).await;
    let redis = redis_url();
    let mut planes = Vec::new();
    for (n, (interval, threads)) in [("1", "1"), ("1", "2"), ("3600", "0")]
        .into_iter()
        .enumerate()
    {
        let args = [
            "--redis-url",
            &redis,
            "--usage-report-interval-s",
            interval,
            "--worker-threads",
            threads,
        ];
        planes.push(
            DataPlaneProcess::start(proxy.addr, &format!("dp-usage-cluster-{n}"), &args).await,
        );
    }
    let http = reqwest::Client::new();
    for plane in &planes {
        for (_, key) in KEYS {
            for model in [GPT, CLAUDE] {
                plane.wait_serving(&http, key, model).await;
            }
        }
    }
    let bases: Vec<String> = planes
        .iter()
        .map(|p| format!("http://{}", p.addr))
        .collect();

    let plan = plan();
    let mut expected: BTreeMap<(&str, &str), Sums> = BTreeMap::new();
    let mut total = Sums::default();
    for r in &plan {
        let sums = r.expected();
        expected
            .entry((KEYS[r.key].0, r.model()))
            .or_default()
            .add(&sums);
        total.add(&sums);
    }
    // These figures round both ways to micro-USD: rounding always down (or up) would not pass.
    let rests: Vec<u128> = expected
        .values()
        .chain([&total])
        .map(|s| s.cost_pico_usd % 1_000_000)
        .collect();
    assert!(
        rests.iter().any(|r| *r >= 500_000) && rests.iter().any(|r| *r < 500_000),
        "{rests:?}"
    );
    let phase = |n: usize| &plan[n * PER_PHASE..(n + 1) * PER_PHASE];
    let done = AtomicUsize::new(0);

    // Phase 1: the control plane is up and receives batches.
    traffic(&http, &bases, phase(0), &done, None).await;
    let deadline = Instant::now() + PATIENCE;
    while ctl.totals().await[0]["requests"] == 0 {
        assert!(
            Instant::now() < deadline,
            "no usage ever reached the control plane"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Phase 2: from now on the data planes get no answer from the control plane. Once requests of
    // this phase are answered and a batch has been written (but not acknowledged), the control
    // plane is SIGKILLed; the second half of the phase is served with it gone, and the planes
    // that report every second fail to.
    proxy.hold();
    let before = ctl.totals().await[0]["requests"].as_u64().unwrap();
    let gate = tokio::sync::watch::Sender::new(false);
    let kill = async {
        let deadline = Instant::now() + PATIENCE;
        while done.load(Ordering::Relaxed) < PER_PHASE + 10
            || ctl.totals().await[0]["requests"].as_u64().unwrap() == before
        {
            assert!(
                Instant::now() < deadline,
                "no batch written during phase 2 ({} requests answered)",
                done.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cp.kill().await;
        proxy.cut_and_release();
        gate.send_replace(true);
    };
    tokio::join!(
        traffic(&http, &bases, phase(1), &done, Some((PER_PHASE / 2, &gate))),
        kill
    );
    let deadline = Instant::now() + PATIENCE;
    for plane in &planes[..2] {
        while batches(&http, plane, "failed").await == 0 {
            assert!(
                Instant::now() < deadline,
                "data plane {} never failed to report to the killed control plane",
                plane.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Phase 3: the control plane starts again on the same address and database while requests
    // are answered; the queued batches go through.
    let (_, cp) = tokio::join!(
        traffic(&http, &bases, phase(2), &done, None),
        ControlPlane::start(&cp_exe, cp_addr, &db, master_key)
    );
    assert_eq!(done.load(Ordering::Relaxed), plan.len());

    // Right after the traffic, the third data plane is stopped: it ships everything at shutdown
    // (it has not sent a batch yet).
    let third = planes.pop().unwrap();
    for result in ["sent", "duplicate", "failed"] {
        assert_eq!(batches(&http, &third, result).await, 0, "{result}");
    }
    let (status, log) = third.terminate().await;
    assert!(status.success(), "{status}: {log:?}");
    assert!(
        !log.iter().any(|l| l.contains("usage not shipped")),
        "{log:?}"
    );

    // Once all of it arrived: exact, to the token and the micro-dollar.
    let mut want_totals = serde_json::Map::new();
    total.columns(&mut want_totals);
    let want_totals = Value::Array(vec![Value::Object(want_totals)]);
    let want_groups = Value::Array(
        expected
            .iter()
            .map(|((vkey, model), sums)| {
                let mut row = serde_json::Map::new();
                for (name, value) in [
                    ("vkey_id", &vkey_ids[vkey]),
                    ("vkey_name", &(*vkey).to_owned()),
                    ("model_id", &model_ids[model]),
                    ("model_name", &(*model).to_owned()),
                ] {
                    row.insert(name.to_owned(), json!(value));
                }
                sums.columns(&mut row);
                Value::Object(row)
            })
            .collect(),
    );
    let deadline = Instant::now() + PATIENCE;
    loop {
        let totals = ctl.totals().await;
        if totals[0]["requests"].as_u64().unwrap() >= total.requests {
            assert_eq!(totals, want_totals);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "usage never complete: {totals}, expected {want_totals}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ctl.by_key_and_model().await, want_groups);

    // The other two shut down (whatever they still hold is shipped): nothing more is added.
    // The batch written but not acknowledged in phase 2 was sent again and taken for what it is.
    let mut duplicates = 0;
    for plane in &planes {
        duplicates += batches(&http, plane, "duplicate").await;
    }
    assert!(duplicates >= 1, "no batch was resent after the kill");
    for plane in planes {
        assert_eq!(
            metric(&http, &plane, "llm_proxy_usage_dropped_total").await,
            0
        );
        let mut counts = Vec::new();
        for result in ["sent", "duplicate", "failed"] {
            counts.push(format!("{result} {}", batches(&http, &plane, result).await));
        }
        println!("data plane {}: batches {}", plane.addr, counts.join(", "));
        let (status, log) = plane.terminate().await;
        assert!(status.success(), "{status}: {log:?}");
    }
    assert_eq!(ctl.totals().await, want_totals);
    assert_eq!(ctl.by_key_and_model().await, want_groups);
    println!(
        "{} requests, {} input and {} output tokens, {} cache read, {} cache write, {} reasoning, {} pico-USD: exact",
        total.requests,
        total.input,
        total.output,
        total.cache_read,
        total.cache_write,
        total.reasoning,
        total.cost_pico_usd,
    );
    cp.kill().await;
}
