//! `llmctl`: the admin CLI of llm-proxy (a gRPC client of the control plane's `AdminService`),
//! and `llmctl serve`, the all-in-one gateway. The program lives here, in a library, so that its
//! two binaries, `llmctl` and `llm-proxy` (the name the seed's guide uses), are the same code.
//!
//! Errors end the process with exit code 1 and exactly one `error: ...` line on stderr (for
//! `llmctl serve` under `LLM_PROXY_LOG_FORMAT=json`, one JSON line instead); clap's
//! usage errors keep clap's format and exit code 2. Usage lines show the name the program was
//! invoked as (clap takes it from `argv[0]`); `--version` says `llmctl` under either name.

mod args;
mod client;
mod commands;
mod price;
mod render;
mod serve;
mod table;
mod usage;

use std::process::ExitCode;

use clap::Parser as _;

use crate::args::{Cli, Command};
use crate::client::{Admin, ClientTls};

/// The whole program: parses the command line, runs the command, reports its outcome.
#[tokio::main]
pub async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    let serving = matches!(cli.command, Command::Serve(_));
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        // `llmctl serve` is a server: its error is a JSON line under JSON logs, like the rest.
        Err(err) if serving => {
            llm_proxy_telemetry::fatal("llmctl", &one_line(&format!("{err:#}")));
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("error: {}", one_line(&format!("{err:#}")));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let server = cli.server();
    let Cli {
        server: _,
        token,
        tls_ca,
        tls_cert,
        tls_key,
        allow_plaintext,
        output,
        command,
    } = cli;
    if let Command::Serve(args) = command {
        return serve::run(args, allow_plaintext).await;
    }
    let tls = ClientTls::read(tls_ca.as_deref(), tls_cert.as_deref(), tls_key.as_deref()).await?;
    let mut admin = Admin::new(&server, token.as_deref(), tls, allow_plaintext)?;
    commands::run(&mut admin, output, command).await
}

/// Help and version print as clap renders them; usage errors print as one line, exit code 2.
fn usage_error(err: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            return ExitCode::from(2);
        }
        _ => {}
    }
    let rendered = err.render().to_string();
    let kept: Vec<&str> = rendered
        .lines()
        .filter(|line| {
            let line = line.trim_start();
            !line.starts_with("Usage:") && !line.starts_with("For more information")
        })
        .collect();
    eprintln!("{}", one_line(&kept.join("\n")));
    ExitCode::from(2)
}

/// Folds a multi-line message into one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn errors_fold_into_one_line() {
        assert_eq!(
            one_line("not found: no key\n  named `x`\r\n"),
            "not found: no key named `x`"
        );
    }
}
