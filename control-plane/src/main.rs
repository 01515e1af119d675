//! `llm-proxy-control-plane [serve|migrate|rotate-master-key|check-config]`: see DESIGN §3.

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use llm_proxy_control_plane::master_key;
use llm_proxy_control_plane::server::{self, ServerSettings, TlsFiles};
use secrecy::SecretString;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "llm-proxy-control-plane",
    version,
    about = "llm-proxy control plane: admin API and config stream (serve is the default)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run pending migrations, then serve gRPC and metrics (the default).
    Serve(ServeArgs),
    /// Run pending migrations and exit.
    Migrate(DatabaseArgs),
    /// Check the serve flags and environment (tokens, master key, database URL form, TLS files)
    /// without connecting or binding; prints a summary and exits 0, or the error and exits 1.
    CheckConfig(ServeArgs),
    /// Re-encrypt every stored credential under the first key of --master-key (a comma-separated
    /// list: new key first, old keys after it).
    RotateMasterKey(RotateArgs),
}

#[derive(Debug, Args)]
struct DatabaseArgs {
    /// postgres://... or sqlite://path (sqlite:///absolute/path).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<SecretString>,
}

#[derive(Debug, Args)]
struct MasterKeyArgs {
    /// Base64 of 64 random bytes; a comma-separated list during rotation (first one active).
    #[arg(long, env = "LLM_PROXY_MASTER_KEY", hide_env_values = true)]
    master_key: Option<SecretString>,
    /// File holding the master key text.
    #[arg(long, env = "LLM_PROXY_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RotateArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    master_key: MasterKeyArgs,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// gRPC listen address (admin API, config stream, grpc.health.v1).
    #[arg(long, env = "LLM_PROXY_CP_LISTEN", default_value = "0.0.0.0:8131")]
    listen: SocketAddr,
    /// HTTP listen address for /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "LLM_PROXY_CP_METRICS_LISTEN",
        default_value = "0.0.0.0:9131"
    )]
    metrics_listen: SocketAddr,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    master_key: MasterKeyArgs,
    /// Bearer token for AdminService (required unless listening on loopback only).
    #[arg(long, env = "LLM_PROXY_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<SecretString>,
    /// Bearer token for ConfigService (required unless listening on loopback only).
    #[arg(long, env = "LLM_PROXY_DATAPLANE_TOKEN", hide_env_values = true)]
    dataplane_token: Option<SecretString>,
    /// PEM certificate for gRPC TLS.
    #[arg(long, env = "LLM_PROXY_CP_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for gRPC TLS.
    #[arg(long, env = "LLM_PROXY_CP_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM CA bundle: turns on mTLS (clients must present a certificate it signed).
    #[arg(long, env = "LLM_PROXY_CP_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// Serve gRPC without TLS on a non-loopback --listen address (only on a private network:
    /// the config stream carries decrypted provider credentials).
    #[arg(
        long,
        env = "LLM_PROXY_ALLOW_PLAINTEXT",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    allow_plaintext: bool,
}

fn database_url(args: DatabaseArgs) -> anyhow::Result<SecretString> {
    args.database_url
        .context("--database-url (DATABASE_URL) is required: postgres://... or sqlite://path")
}

async fn master_keys(args: MasterKeyArgs) -> anyhow::Result<SecretString> {
    Ok(master_key::load(args.master_key, args.master_key_file.as_deref()).await?)
}

async fn settings(args: ServeArgs) -> anyhow::Result<ServerSettings> {
    let mut settings = ServerSettings::new(
        args.listen,
        database_url(args.database)?,
        master_keys(args.master_key).await?,
    );
    settings.metrics_listen = Some(args.metrics_listen);
    settings.admin_token = args.admin_token;
    settings.dataplane_token = args.dataplane_token;
    settings.tls = TlsFiles {
        cert: args.tls_cert,
        key: args.tls_key,
        client_ca: args.tls_client_ca,
    };
    settings.allow_plaintext = args.allow_plaintext;
    Ok(settings)
}

async fn check_config(args: ServeArgs) -> anyhow::Result<()> {
    let summary = server::check(&settings(args).await?).await?;
    println!("configuration ok: {summary}");
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Listens at once; the database is brought up in the background (`/readyz` says when).
    let running = server::launch(settings(args).await?).await?;
    let addr = running.grpc_addr.to_string();
    let metrics_addr = running
        .metrics_addr
        .map_or_else(|| "-".to_owned(), |a| a.to_string());
    // Test harnesses wait for this line (plain text, or JSON with the addresses as fields):
    // printed whatever RUST_LOG says.
    llm_proxy_telemetry::notice(
        module_path!(),
        &format!("llm-proxy control plane listening on {addr} (gRPC), metrics on {metrics_addr}"),
        &[("addr", &addr), ("metrics_addr", &metrics_addr)],
    );
    let failed = async {
        match running.database_ready().await {
            // Ready: from now on only a signal ends the process.
            Ok(()) => std::future::pending().await,
            Err(err) => err,
        }
    };
    let result = tokio::select! {
        () = shutdown_signal() => Ok(()),
        err = failed => Err(err),
    };
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(result?)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => serve(cli.serve).await,
        Some(Command::Serve(args)) => serve(args).await,
        Some(Command::CheckConfig(args)) => check_config(args).await,
        Some(Command::Migrate(args)) => {
            let (_, applied) = server::migrate(&database_url(args)?).await?;
            let applied = applied.to_string();
            llm_proxy_telemetry::notice(
                module_path!(),
                &format!("migrations applied: {applied}"),
                &[("applied", &applied)],
            );
            Ok(())
        }
        Some(Command::RotateMasterKey(args)) => {
            let url = database_url(args.database)?;
            let keys = master_keys(args.master_key).await?;
            let (count, key_id) = server::rotate_master_key(&url, &keys).await?;
            let count = count.to_string();
            llm_proxy_telemetry::notice(
                module_path!(),
                &format!(
                    "re-encrypted {count} connection credential(s) under master key id {key_id}; keys after the first can now be removed"
                ),
                &[("count", &count), ("key_id", &key_id)],
            );
            Ok(())
        }
    }
}

fn main() {
    let cli = Cli::parse();
    // Errors go through `fatal`: one `error: ...` line, or a JSON line under JSON logs.
    let telemetry = match llm_proxy_telemetry::init_from_env("llm-proxy-control-plane", "info") {
        Ok(telemetry) => telemetry,
        Err(err) => {
            llm_proxy_telemetry::fatal(module_path!(), &err.to_string());
            std::process::exit(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
