//! `llmctl serve`: the all-in-one gateway, control plane + data plane in one process on the
//! embedded defaults (DESIGN §11, flags in §16).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use llm_proxy_control_plane::db::{self, Backend};
use llm_proxy_control_plane::master_key;
use llm_proxy_control_plane::server::{self, RunningControlPlane, ServerSettings};
use llm_proxy_data_plane::gateway::{self, GatewaySettings, RunningGateway};
use llm_proxy_data_plane::limits::LimitFlags;
use llm_proxy_data_plane::process;
use llm_proxy_data_plane::sync::SyncSettings;
use llm_proxy_telemetry::LogFormat;
use secrecy::SecretString;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// The `target` of the lines `llmctl serve` prints (its log lines' crate).
const TARGET: &str = "llmctl";

/// Flags of `llmctl serve` (DESIGN §16).
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Directory of the SQLite database (`llm-proxy.db`) and the generated master key.
    #[arg(long, value_name = "DIR", default_value = "./.llm-proxy")]
    pub data_dir: PathBuf,

    /// Data-plane HTTP listen address (the OpenAI-compatible API).
    #[arg(
        long,
        value_name = "ADDR",
        env = "LLM_PROXY_DP_LISTEN",
        default_value = gateway::DEFAULT_LISTEN
    )]
    pub listen: SocketAddr,

    /// Control-plane gRPC listen address (admin API for llmctl).
    #[arg(
        long,
        value_name = "ADDR",
        env = "LLM_PROXY_CP_LISTEN",
        default_value = "127.0.0.1:8131"
    )]
    pub grpc_listen: SocketAddr,

    /// Metrics, /healthz and /readyz of both planes.
    #[arg(
        long,
        value_name = "ADDR",
        env = "LLM_PROXY_DP_METRICS_LISTEN",
        default_value = "127.0.0.1:9132"
    )]
    pub metrics_listen: SocketAddr,

    /// Use this database instead of the SQLite file in --data-dir (`postgres://...`, `sqlite://...`).
    #[arg(long, value_name = "URL", env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Share rate-limit buckets through Redis instead of keeping them in process.
    #[arg(long, value_name = "URL", env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// PEM CA bundle for a rediss:// --redis-url (default: Mozilla's roots, compiled in).
    #[arg(long, value_name = "FILE", env = "LLM_PROXY_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// The data plane's limits (DESIGN §19).
    #[command(flatten)]
    pub limits: LimitFlags,
}

/// Runs the all-in-one gateway until interrupted: the control plane on `--grpc-listen` (loopback:
/// no tokens), the data plane on `--listen` subscribed to it, and one metrics/health listener for
/// both.
pub async fn run(args: ServeArgs, allow_plaintext: bool) -> anyhow::Result<()> {
    let telemetry = llm_proxy_telemetry::init_from_env("llm-proxy", "warn")?;
    tokio::fs::create_dir_all(&args.data_dir)
        .await
        .with_context(|| format!("cannot create --data-dir {}", args.data_dir.display()))?;
    let key_path = args.data_dir.join("master.key");
    let (master_key, created) = master_key::load_or_create(&key_path).await?;
    if created {
        let path = key_path.display().to_string();
        llm_proxy_telemetry::notice(
            TARGET,
            &format!(
                "generated a new master key at {path} (mode 0600): back it up, the stored provider keys cannot be read without it"
            ),
            &[("path", &path)],
        );
    }
    let database_url = match args.database_url {
        Some(url) => SecretString::from(url),
        None => SecretString::from(format!(
            "sqlite://{}",
            args.data_dir.join("llm-proxy.db").display()
        )),
    };
    let sqlite = matches!(db::parse_url(&database_url), Ok((Backend::Sqlite, _)));
    let mut settings = ServerSettings::new(args.grpc_listen, database_url, master_key);
    settings.allow_plaintext = allow_plaintext;
    // Listens at once; a database server that is down is retried in the background (`/readyz`
    // answers 503 until it is up). A SQLite file is there at once: wait for it, so that a wrong
    // master key is reported before the banner.
    let cp = server::launch(settings).await?;
    if sqlite {
        cp.database_ready().await?;
    }
    let cp = Arc::new(cp);
    let sync = SyncSettings::plaintext(
        format!("http://{}", loopback_of(cp.grpc_addr)),
        "llmctl-serve",
    );
    let dp = gateway::start(GatewaySettings {
        limits: args.limits.limits()?,
        redis_url: args.redis_url.clone().map(SecretString::from),
        redis_ca_file: args.redis_ca_file.clone(),
        ..GatewaySettings::new(args.listen, sync)
    })
    .await?;
    let dp = Arc::new(dp);
    let metrics = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_listen))?;
    let metrics_addr = metrics.local_addr()?;
    let app = health_router(&cp, &dp);
    #[allow(
        clippy::disallowed_methods,
        reason = "the handle is aborted when the gateway stops"
    )]
    let metrics_task = tokio::spawn(async move {
        let _ = axum::serve(metrics, app).await;
    });

    if LogFormat::from_env() == LogFormat::Json {
        // Every line JSON (DESIGN §16): the addresses as one log line on stderr, no guide.
        let (api, admin, metrics, data) = (
            format!("http://{}", shown(dp.addr)),
            cp.grpc_addr.to_string(),
            format!("http://{metrics_addr}"),
            args.data_dir.display().to_string(),
        );
        llm_proxy_telemetry::notice(
            TARGET,
            &format!(
                "llm-proxy is running: OpenAI-compatible API on {api}, admin API (gRPC) on {admin}, metrics on {metrics}"
            ),
            &[
                ("addr", &dp.addr.to_string()),
                ("grpc_addr", &admin),
                ("metrics_addr", &metrics_addr.to_string()),
                ("data_dir", &data),
            ],
        );
    } else {
        print_banner(&args.data_dir, &dp, &cp, metrics_addr);
    }
    let failed = async {
        match cp.database_ready().await {
            // Ready: from now on only a signal ends the process.
            Ok(()) => std::future::pending().await,
            Err(err) => err,
        }
    };
    let failure = tokio::select! {
        () = process::shutdown_signal() => None,
        err = failed => Some(err),
    };
    llm_proxy_telemetry::notice(TARGET, "shutting down", &[]);
    metrics_task.abort();
    match Arc::try_unwrap(dp) {
        Ok(dp) => dp.shutdown(Duration::from_secs(10)).await,
        // A health check still holds it for a moment: at least stop accepting.
        Err(dp) => dp.begin_shutdown(),
    }
    if let Ok(cp) = Arc::try_unwrap(cp) {
        cp.shutdown().await;
    }
    // Flushing spans blocks until the collector answers (bounded by the exporter's timeout).
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    match failure {
        Some(err) => Err(err.into()),
        None => Ok(()),
    }
}

/// The human start-up banner on stdout: where everything listens, and what to type next.
fn print_banner(
    data_dir: &std::path::Path,
    dp: &RunningGateway,
    cp: &RunningControlPlane,
    metrics_addr: SocketAddr,
) {
    println!("llm-proxy is running");
    println!("  OpenAI-compatible API: http://{}", shown(dp.addr));
    println!("  admin API (gRPC, for llmctl): {}", cp.grpc_addr);
    println!("  metrics, /healthz, /readyz: http://{metrics_addr}");
    println!("  data: {}", data_dir.display());
    println!();
    println!("next, in another terminal:");
    println!(
        "  llmctl connection add --name OpenAI-Main --provider openai --endpoint https://api.openai.com --api-key sk-..."
    );
    println!(
        "  llmctl model add --conn-id OpenAI-Main --name gpt-4-turbo --remote gpt-4-turbo-preview"
    );
    println!("  llmctl vkey add --name Frontend-App --key vk-front-1234");
    println!(
        "  llmctl assign --vkey-id Frontend-App --model-id gpt-4-turbo --alias gpt-4 --tps 50"
    );
    println!(
        "then point the OpenAI SDK at base_url=\"http://localhost:{}\" with api_key=\"vk-front-1234\"",
        dp.addr.port()
    );
}

/// How to reach a listener from this machine (`0.0.0.0:8132` → `localhost:8132`).
fn shown(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("localhost:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// The control plane may listen on 0.0.0.0; the in-process data plane dials loopback.
fn loopback_of(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

/// `/readyz` (database reachable and a snapshot applied) and `/metrics` of both planes. Holds
/// only weak references: open scrape connections must not keep the planes from shutting down.
struct BothPlanes {
    cp: Weak<RunningControlPlane>,
    dp: Weak<RunningGateway>,
}

impl llm_proxy_telemetry::HealthSource for BothPlanes {
    async fn readiness(&self) -> Result<String, String> {
        let (Some(cp), Some(dp)) = (self.cp.upgrade(), self.dp.upgrade()) else {
            return Err("shutting down".to_owned());
        };
        cp.readiness_check().await?;
        if dp.ready() {
            Ok("ready".to_owned())
        } else {
            Err("no config snapshot applied yet".to_owned())
        }
    }

    fn metrics(&self) -> String {
        let (Some(cp), Some(dp)) = (self.cp.upgrade(), self.dp.upgrade()) else {
            return String::new();
        };
        // One exposition: only the last `# EOF` may stay.
        let cp_text = cp.render_metrics();
        let cp_text = cp_text.strip_suffix("# EOF\n").unwrap_or(&cp_text);
        format!("{cp_text}{}", dp.render_metrics())
    }
}

fn health_router(cp: &Arc<RunningControlPlane>, dp: &Arc<RunningGateway>) -> axum::Router {
    llm_proxy_telemetry::health_router(Arc::new(BothPlanes {
        cp: Arc::downgrade(cp),
        dp: Arc::downgrade(dp),
    }))
}
