//! `llmctl serve`: the all-in-one gateway, control plane + data plane in one process on the
//! embedded defaults (DESIGN §11, flags in §16).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use llm_proxy_control_plane::master_key;
use llm_proxy_control_plane::server::{self, ServerSettings};
use secrecy::SecretString;

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
        default_value = "0.0.0.0:8132"
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
}

/// Runs the all-in-one gateway until interrupted.
///
/// Today this starts the control plane on the embedded defaults (SQLite in `--data-dir`, a master
/// key generated on first start); the data plane joins it with the data-plane work.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_logging();
    tokio::fs::create_dir_all(&args.data_dir)
        .await
        .with_context(|| format!("cannot create --data-dir {}", args.data_dir.display()))?;
    let key_path = args.data_dir.join("master.key");
    let (master_key, created) = master_key::load_or_create(&key_path).await?;
    if created {
        eprintln!(
            "generated a new master key at {} (mode 0600): back it up, the stored provider keys cannot be read without it",
            key_path.display()
        );
    }
    let database_url = match args.database_url {
        Some(url) => SecretString::from(url),
        None => SecretString::from(format!(
            "sqlite://{}",
            args.data_dir.join("llm-proxy.db").display()
        )),
    };
    if args.redis_url.is_some() {
        eprintln!(
            "note: --redis-url is used by the data plane, which is not part of this build yet"
        );
    }
    let mut settings = ServerSettings::new(args.grpc_listen, database_url, master_key);
    settings.metrics_listen = Some(args.metrics_listen);
    let cp = server::start(settings).await?;
    println!("llm-proxy is running");
    println!("  admin API (gRPC): {}", cp.grpc_addr);
    if let Some(metrics) = cp.metrics_addr {
        println!("  metrics, /healthz, /readyz: http://{metrics}");
    }
    println!("  data: {}", args.data_dir.display());
    println!("  OpenAI-compatible API: not built yet (arrives with the data plane)");
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
    shutdown_signal().await;
    eprintln!("shutting down");
    cp.shutdown().await;
    Ok(())
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("LLM_PROXY_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
