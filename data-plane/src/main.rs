//! `llm-proxy-data-plane`: the OpenAI-compatible gateway (DESIGN §3).

use clap::Parser;
use llm_proxy_data_plane::gateway::{self, GatewaySettings};
use llm_proxy_data_plane::limits::LimitFlags;
use llm_proxy_data_plane::process;
use llm_proxy_data_plane::ratelimit::redis::FailMode;
use llm_proxy_data_plane::sync::{self, ClientTlsFiles, SyncSettings};
use llm_proxy_data_plane::usage_report::{self, UsageSettings};
use secrecy::SecretString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "llm-proxy-data-plane",
    version,
    about = "llm-proxy data plane: the OpenAI-compatible gateway"
)]
struct Cli {
    /// HTTP listen address of the OpenAI-compatible API.
    #[arg(long, env = "LLM_PROXY_DP_LISTEN", default_value = gateway::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// HTTP listen address for /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "LLM_PROXY_DP_METRICS_LISTEN",
        default_value = gateway::DEFAULT_METRICS_LISTEN
    )]
    metrics_listen: SocketAddr,
    /// Control plane gRPC URL (https:// with the TLS flags).
    #[arg(
        long,
        env = "LLM_PROXY_CONTROL_PLANE",
        default_value = gateway::DEFAULT_CONTROL_PLANE
    )]
    control_plane: String,
    /// Bearer token for the control plane's config stream.
    #[arg(long, env = "LLM_PROXY_DATAPLANE_TOKEN", hide_env_values = true)]
    dataplane_token: Option<SecretString>,
    /// Redis for rate-limit buckets shared by every data plane (unset: in-process buckets).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: Option<SecretString>,
    /// PEM CA bundle for a rediss:// --redis-url (default: Mozilla's roots, compiled in).
    #[arg(long, env = "LLM_PROXY_REDIS_CA_FILE")]
    redis_ca_file: Option<PathBuf>,
    /// What to do when Redis is unavailable.
    #[arg(
        long,
        env = "LLM_PROXY_RATELIMIT_FAIL_MODE",
        value_enum,
        default_value = "local"
    )]
    ratelimit_fail_mode: FailMode,
    /// Milliseconds one Redis limiter call may take before the fail mode answers.
    #[arg(
        long,
        env = "LLM_PROXY_RATELIMIT_REDIS_BUDGET_MS",
        default_value_t = llm_proxy_data_plane::ratelimit::redis::DEFAULT_BUDGET_MS
    )]
    ratelimit_redis_budget_ms: u64,
    #[command(flatten)]
    limits: LimitFlags,
    /// Seconds to keep serving after SIGTERM with /readyz answering 503 and `Connection: close` on
    /// every response, before new connections are refused (lets load balancers move away).
    #[arg(long, env = "LLM_PROXY_DP_SHUTDOWN_DELAY_S", default_value_t = 0)]
    shutdown_delay_s: u64,
    /// Seconds in-flight requests and streams get to finish after SIGTERM.
    #[arg(long, env = "LLM_PROXY_DP_SHUTDOWN_GRACE_S", default_value_t = 30)]
    shutdown_grace_s: u64,
    /// Node id reported to the control plane, with its status and usage (default: the hostname;
    /// usage batches also carry a boot id, so a restart under the same id is not a duplicate).
    #[arg(long, env = "LLM_PROXY_DP_NODE_ID")]
    node_id: Option<String>,
    /// Seconds between usage reports to the control plane (usage is also sent at shutdown).
    #[arg(
        long,
        env = "LLM_PROXY_DP_USAGE_REPORT_INTERVAL_S",
        default_value_t = usage_report::DEFAULT_REPORT_INTERVAL_S,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    usage_report_interval_s: u64,
    /// Usage batches kept while the control plane does not acknowledge them; past it the oldest
    /// are dropped (counted in llm_proxy_usage_dropped_total).
    #[arg(
        long,
        env = "LLM_PROXY_DP_USAGE_QUEUE_MAX_BATCHES",
        default_value_t = usage_report::DEFAULT_QUEUE_MAX_BATCHES,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    usage_queue_max_batches: usize,
    /// CA bundle to verify the control plane's certificate.
    #[arg(long, env = "LLM_PROXY_DP_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate for mTLS to the control plane.
    #[arg(long, env = "LLM_PROXY_DP_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// Client key for mTLS to the control plane.
    #[arg(long, env = "LLM_PROXY_DP_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Reach a non-loopback control plane over plain http:// (only on a private network: the
    /// config stream carries decrypted provider credentials).
    #[arg(
        long,
        env = "LLM_PROXY_ALLOW_PLAINTEXT",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    allow_plaintext: bool,
    /// Threads that serve requests (0: one per CPU the process may use, cgroup quota included).
    /// With one, the data plane runs on a single-threaded runtime: no work-stealing scheduler to
    /// pay for on every wake-up (about 5% fewer instructions per request).
    #[arg(
        long,
        env = "LLM_PROXY_DP_WORKER_THREADS",
        default_value_t = 0,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=1024)
    )]
    worker_threads: usize,
    /// Check the flags and environment (URLs, TLS files) without connecting or binding; print a
    /// summary and exit 0, or the error and exit 1.
    #[arg(long)]
    check_config: bool,
}

/// The hostname and the process id. Not the bare hostname DESIGN §18 suggests: several data
/// planes on one host without `--node-id` would share one id, and the control plane counts live
/// data planes by node id (the Redis limiter's `local` fail mode divides limits by that count).
/// Usage stays exact either way: batches are told apart by (node, boot, sequence), and a restart
/// has a new boot id. Deployments that want a stable id set it (the chart: the pod name).
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "dp".to_owned());
    format!("{host}-{}", std::process::id())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = GatewaySettings {
        listen: cli.listen,
        metrics_listen: Some(cli.metrics_listen),
        sync: SyncSettings {
            control_plane: cli.control_plane.clone(),
            token: cli.dataplane_token.clone(),
            node_id: cli.node_id.clone().unwrap_or_else(default_node_id),
            build: env!("CARGO_PKG_VERSION").to_owned(),
            tls: ClientTlsFiles {
                ca: cli.tls_ca.clone(),
                cert: cli.tls_cert.clone(),
                key: cli.tls_key.clone(),
            }
            .load()
            .await?,
        },
        limits: cli.limits.limits()?,
        redis_url: cli.redis_url.clone(),
        redis_ca_file: cli.redis_ca_file.clone(),
        ratelimit_fail_mode: cli.ratelimit_fail_mode,
        ratelimit_redis_budget: Duration::from_millis(cli.ratelimit_redis_budget_ms),
        usage: UsageSettings {
            interval: Duration::from_secs(cli.usage_report_interval_s),
            queue_max_batches: cli.usage_queue_max_batches,
        },
    };
    // Reject a malformed or plaintext-off-loopback --control-plane URL, or a bad token, now, not
    // in the background task.
    sync::check_plaintext(&settings.sync.control_plane, cli.allow_plaintext)?;
    settings.sync.check()?;
    if cli.check_config {
        println!("configuration ok: {}", gateway::check(&settings).await?);
        return Ok(());
    }
    let running = gateway::start(settings).await?;
    let addr = running.addr.to_string();
    let metrics_addr = running
        .metrics_addr
        .map_or_else(|| "-".to_owned(), |a| a.to_string());
    // Test harnesses and scripts wait for this line (plain text, or JSON with the addresses as
    // fields): printed whatever RUST_LOG says.
    llm_proxy_telemetry::notice(
        module_path!(),
        &format!("llm-proxy data plane listening on {addr} (metrics on {metrics_addr})"),
        &[("addr", &addr), ("metrics_addr", &metrics_addr)],
    );
    process::shutdown_signal().await;
    tracing::info!("shutting down: draining in-flight requests");
    running
        .drain_then_shutdown(
            Duration::from_secs(cli.shutdown_delay_s),
            Duration::from_secs(cli.shutdown_grace_s),
        )
        .await;
    Ok(())
}

/// A current-thread runtime for one serving thread, else the multi-thread one with `threads`
/// workers (0: one per available CPU). Blocking work (snapshot builds) runs on tokio's blocking
/// pool either way.
fn runtime_builder(threads: usize) -> tokio::runtime::Builder {
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        n => n,
    };
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    }
}

fn main() {
    let cli = Cli::parse();
    // Errors go through `fatal`: one `error: ...` line, or a JSON line under JSON logs.
    let telemetry = match llm_proxy_telemetry::init_from_env("llm-proxy-data-plane", "info") {
        Ok(telemetry) => telemetry,
        Err(err) => {
            llm_proxy_telemetry::fatal(module_path!(), &err.to_string());
            std::process::exit(1);
        }
    };
    let runtime = match runtime_builder(cli.worker_threads).enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            llm_proxy_telemetry::fatal(
                module_path!(),
                &format!("cannot start the async runtime: {err}"),
            );
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(run(cli));
    telemetry.shutdown();
    if let Err(err) = result {
        llm_proxy_telemetry::fatal(module_path!(), &format!("{err:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory as _;

    // clap checks a definition (clashing names, defaults its parser refuses...) only when asked.
    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
