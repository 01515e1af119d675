//! Heap allocations per request in the data plane, for benchmarks (`scripts/bench.sh`; issue 19).
//!
//! One process runs the benchmark's mock upstream (`llm_proxy_mock_upstream::bench`, no delays),
//! a control plane (SQLite in a temporary directory) and a data plane (in-process limiter) set up
//! as the benchmark's are: an `openai` connection to the mock, a priced `gpt-4o-mini` model, one
//! virtual key assigned it with a limit that never rejects. The global allocator counts every
//! allocation (`stats_alloc`: `std::alloc::System` wrapped with atomic counters; this workspace
//! forbids `unsafe` code, which a `GlobalAlloc` of its own would need).
//!
//! The client (reqwest) and the mock run in the same process and allocate too, so each mode
//! (non-streamed, streamed) is counted twice, over `--requests` sequential requests on a
//! keep-alive connection after a warm-up: **through** the data plane (client + data plane +
//! mock) and **direct** to the mock (client + mock). The data plane's share is the difference.
//! Only the allocations made while the requests run are counted (background tasks of both planes
//! during that window included: a few per second, against thousands of requests); each count is
//! the lowest of `--rounds` rounds.
//!
//! Prints one JSON object: `{"requests":N,"json":{"allocs_per_request":..,"reallocs_per_request":..,
//! "bytes_per_request":..,"body_bytes":B,"through":{..},"direct":{..}},"sse":{..}}`,
//! where the top-level figures of each mode are the data plane's (through − direct).
//!
//! Usage: `allocs_per_request [--requests 2000] [--warmup 200] [--rounds 3] [--pad BYTES]`

use anyhow::{Context as _, ensure};
use axum::serve::ListenerExt as _;
use clap::Parser;
use llm_proxy_control_plane::server::{self as cp_server, ServerSettings};
use llm_proxy_control_plane::store::{NewAssignment, NewConnection, NewModel, NewVirtualKey};
use llm_proxy_data_plane::gateway::{self, GatewaySettings};
use llm_proxy_data_plane::sync::SyncSettings;
use llm_proxy_data_plane::usage_report::UsageSettings;
use llm_proxy_mock_upstream::bench::{self, Timing};
use secrecy::SecretString;
use serde_json::{Value, json};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use std::alloc::System;
use std::collections::BTreeMap;
use std::time::Duration;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const KEY: &str = "vk-bench-allocs-0123456789";

#[derive(Debug, Parser)]
#[command(
    about = "Heap allocations per request in the data plane (through it − direct to the mock)"
)]
struct Args {
    /// Measured requests per mode and round.
    #[arg(long, default_value_t = 2000)]
    requests: u64,
    /// Unmeasured requests sent first, on each path and in each mode.
    #[arg(long, default_value_t = 200)]
    warmup: u64,
    /// Rounds; each count is the lowest of them.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Characters added to the user message (0: the benchmark's ~100-byte body).
    #[arg(long, default_value_t = 0)]
    pad: usize,
}

/// Allocation calls (alloc + alloc_zeroed), reallocations and bytes requested by both.
#[derive(Debug, Clone, Copy)]
struct Count {
    allocs: u64,
    reallocs: u64,
    bytes: u64,
}

impl Count {
    fn per_request(self, n: u64) -> Value {
        let n = n as f64;
        json!({
            "allocs_per_request": self.allocs as f64 / n,
            "reallocs_per_request": self.reallocs as f64 / n,
            "bytes_per_request": self.bytes as f64 / n,
        })
    }
}

fn body(stream: bool, pad: usize) -> String {
    let content = format!(
        "Say hello{}{}",
        if pad > 0 { " " } else { "" },
        "x".repeat(pad)
    );
    if stream {
        format!(
            r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{content}"}}],"stream":true,"stream_options":{{"include_usage":true}}}}"#
        )
    } else {
        format!(r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"{content}"}}]}}"#)
    }
}

async fn send(http: &reqwest::Client, url: &str, body: &str) -> anyhow::Result<()> {
    let answer = http
        .post(url)
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await?;
    ensure!(answer.status() == 200, "{url} answered {}", answer.status());
    answer.bytes().await?;
    Ok(())
}

/// The allocations of `n` sequential requests (the body is built before counting starts).
async fn count(http: &reqwest::Client, url: &str, body: &str, n: u64) -> anyhow::Result<Count> {
    let region = Region::new(GLOBAL);
    for _ in 0..n {
        send(http, url, body).await?;
    }
    let change = region.change();
    Ok(Count {
        allocs: change.allocations as u64,
        reallocs: change.reallocations as u64,
        bytes: change.bytes_allocated as u64,
    })
}

fn lowest(a: Option<Count>, b: Count) -> Count {
    match a {
        Some(a) if a.allocs <= b.allocs => a,
        _ => b,
    }
}

async fn run(args: Args) -> anyhow::Result<Value> {
    let mut tasks = tokio::task::JoinSet::new();
    // The benchmark's mock upstream, without delays.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mock = format!("http://{}", listener.local_addr()?);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let timing = Timing {
        delay: Duration::ZERO,
        chunk_delay: Duration::ZERO,
    };
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, body: axum::body::Bytes| async move {
            bench::answer(timing, uri.path(), body).await
        },
    );
    tasks.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let dir = tempfile::tempdir()?;
    let master_key = llm_proxy_control_plane::crypto::MasterKeys::generate_encoded();
    let cp = cp_server::start(ServerSettings::new(
        "127.0.0.1:0".parse()?,
        SecretString::from(format!("sqlite://{}", dir.path().join("cp.db").display())),
        master_key,
    ))
    .await
    .context("starting the control plane")?;
    let store = &cp.store;
    store
        .create_connection(NewConnection {
            name: "Mock".into(),
            provider: "openai".into(),
            endpoint: mock.clone(),
            credential: SecretString::from("sk-bench"),
            options: BTreeMap::new(),
        })
        .await?;
    store
        .create_model(NewModel {
            connection: "Mock".into(),
            name: "gpt-4o-mini".into(),
            remote: "gpt-4o-mini".into(),
            price_input: Some(150_000),
            price_output: Some(600_000),
            price_cache_read: Some(75_000),
            ..Default::default()
        })
        .await?;
    store
        .create_vkey(NewVirtualKey {
            name: "Bench".into(),
            key: Some(SecretString::from(KEY)),
            ..Default::default()
        })
        .await?;
    store
        .create_assignment(NewAssignment {
            vkey: "Bench".into(),
            model: "gpt-4o-mini".into(),
            alias: Some("gpt-4o-mini".into()),
            tps: Some(1_000_000),
            ..Default::default()
        })
        .await?;
    let dp = gateway::start(GatewaySettings {
        // No shipping during the counts (the benchmark's data plane ships every few seconds).
        usage: UsageSettings {
            interval: Duration::from_secs(3600),
            queue_max_batches: 100,
        },
        ..GatewaySettings::on_loopback(SyncSettings::plaintext(
            format!("http://{}", cp.grpc_addr),
            "dp-allocs",
        ))
    })
    .await
    .context("starting the data plane")?;
    let version = store.current_version().await?.1;
    tokio::time::timeout(Duration::from_secs(30), dp.config.wait_for_version(version))
        .await
        .context("the data plane did not apply the config")?;

    let http = reqwest::Client::new();
    let through = format!("http://{}/v1/chat/completions", dp.addr);
    let direct = format!("{mock}/v1/chat/completions");
    let mut out = serde_json::Map::new();
    out.insert("requests".into(), json!(args.requests));
    for (mode, stream) in [("json", false), ("sse", true)] {
        let body = body(stream, args.pad);
        let (mut t, mut d) = (None, None);
        for _ in 0..args.rounds.max(1) {
            count(&http, &direct, &body, args.warmup).await?;
            d = Some(lowest(
                d,
                count(&http, &direct, &body, args.requests).await?,
            ));
            count(&http, &through, &body, args.warmup).await?;
            t = Some(lowest(
                t,
                count(&http, &through, &body, args.requests).await?,
            ));
        }
        let (t, d) = (t.context("no round")?, d.context("no round")?);
        let dp_share = Count {
            allocs: t.allocs.saturating_sub(d.allocs),
            reallocs: t.reallocs.saturating_sub(d.reallocs),
            bytes: t.bytes.saturating_sub(d.bytes),
        };
        let mut figures = dp_share.per_request(args.requests);
        if let Value::Object(map) = &mut figures {
            map.insert("body_bytes".into(), json!(body.len()));
            map.insert("through".into(), t.per_request(args.requests));
            map.insert("direct".into(), d.per_request(args.requests));
        }
        out.insert(mode.into(), figures);
    }
    dp.shutdown(Duration::from_secs(1)).await;
    cp.shutdown().await;
    tasks.abort_all();
    Ok(Value::Object(out))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let out = runtime.block_on(run(args))?;
    println!("{out}");
    Ok(())
}
