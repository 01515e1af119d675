//! What the control plane refuses at start (DESIGN §19), through the real binary: a blank token,
//! and plaintext gRPC on a non-loopback address without `--allow-plaintext`; and the one token
//! trimming rule on both sides of a call. Under `LLM_PROXY_LOG_FORMAT=json` every line it writes
//! on stderr is JSON, the listening line and the refusals included (DESIGN §16).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use llm_proxy_data_plane::gateway::{self, GatewaySettings};
use llm_proxy_data_plane::sync::SyncSettings;
use llm_proxy_proto::v1::ListConnectionsRequest;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::Value;
use std::time::Duration;

/// Runs the binary with `args` and exactly the `env` given (plus a master key and a SQLite URL);
/// returns its exit code, stdout and stderr.
async fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let key = common::new_master_key();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-proxy-control-plane"))
        .args(args)
        .env_clear()
        .env("LLM_PROXY_MASTER_KEY", key.expose_secret())
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", dir.path().join("cp.db").display()),
        )
        .envs(env.iter().copied())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("the binary did not exit")
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Asserts a refusal: exit code 1 and one `error: ` line on stderr containing every `part`.
fn assert_refused((code, _, stderr): (i32, String, String), parts: &[&str]) {
    assert_eq!(code, 1, "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for part in parts {
        assert!(lines[0].contains(part), "{part:?} missing: {stderr}");
    }
}

const TOKENS: [(&str, &str); 2] = [
    ("LLM_PROXY_ADMIN_TOKEN", "admin-token-0123456789"),
    ("LLM_PROXY_DATAPLANE_TOKEN", "dp-token-0123456789"),
];

#[tokio::test(flavor = "multi_thread")]
async fn blank_tokens_are_refused_naming_the_flag() {
    for blank in ["", " ", "\n", " \t\n"] {
        for (i, (name, _)) in TOKENS.iter().enumerate() {
            let flag = if i == 0 {
                "--admin-token (LLM_PROXY_ADMIN_TOKEN) is empty"
            } else {
                "--dataplane-token (LLM_PROXY_DATAPLANE_TOKEN) is empty"
            };
            let mut env = TOKENS.to_vec();
            env[i] = (name, blank);
            // Even on loopback, where no token is required: a blank one is a mistake.
            for command in ["check-config", "serve"] {
                let args = [
                    command,
                    "--listen",
                    "127.0.0.1:0",
                    "--metrics-listen",
                    "127.0.0.1:0",
                ];
                if blank.is_empty() {
                    // clap treats an empty env var as unset; the flag form is what can be empty.
                    let flag_name = if i == 0 {
                        "--admin-token"
                    } else {
                        "--dataplane-token"
                    };
                    let mut args = args.to_vec();
                    args.extend([flag_name, ""]);
                    assert_refused(run(&args, &[]).await, &[flag]);
                } else {
                    assert_refused(run(&args, &env).await, &[flag]);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_grpc_off_loopback_needs_allow_plaintext() {
    let remote = ["--listen", "0.0.0.0:0", "--metrics-listen", "127.0.0.1:0"];
    for command in ["check-config", "serve"] {
        let args: Vec<&str> = [command].into_iter().chain(remote).collect();
        assert_refused(
            run(&args, &TOKENS).await,
            &[
                "refusing plaintext gRPC on 0.0.0.0:0",
                "--tls-cert",
                "--allow-plaintext (LLM_PROXY_ALLOW_PLAINTEXT)",
            ],
        );
    }
    let check: Vec<&str> = ["check-config"].into_iter().chain(remote).collect();
    let mut allowed = TOKENS.to_vec();
    allowed.push(("LLM_PROXY_ALLOW_PLAINTEXT", "true"));
    let (code, stdout, stderr) = run(&check, &allowed).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("tls=off (--allow-plaintext)"), "{stdout}");
    let flag: Vec<&str> = check.iter().copied().chain(["--allow-plaintext"]).collect();
    assert_eq!(run(&flag, &TOKENS).await.0, 0);
    let loopback = ["check-config", "--listen", "127.0.0.1:0"];
    let (code, stdout, stderr) = run(&loopback, &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("tls=off"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn configured_and_presented_tokens_are_trimmed_alike() {
    let db = common::fresh_sqlite();
    let mut settings = common::settings(&db, &common::new_master_key());
    // As read from Kubernetes Secret files: with a trailing newline.
    settings.admin_token = Some(SecretString::from("admin-token-1\n"));
    settings.dataplane_token = Some(SecretString::from(" dp-token-1\n"));
    let cp = llm_proxy_control_plane::server::start(settings)
        .await
        .unwrap();
    let mut admin = common::admin(&cp, Some("admin-token-1")).await;
    admin
        .list_connections(ListConnectionsRequest {})
        .await
        .unwrap();
    let mut wrong = common::admin(&cp, Some("admin-token-")).await;
    let status = wrong
        .list_connections(ListConnectionsRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    // A data plane whose token file also ends with a newline gets its config.
    let dp = gateway::start(GatewaySettings::on_loopback(SyncSettings {
        token: Some(SecretString::from("dp-token-1\n")),
        ..SyncSettings::plaintext(format!("http://{}", cp.grpc_addr), "dp-trimmed")
    }))
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(30), dp.config.wait_for_version(1))
        .await
        .expect("the data plane got no snapshot");
    dp.shutdown(Duration::from_secs(1)).await;
    cp.shutdown().await;
}

const JSON_LOGS: (&str, &str) = ("LLM_PROXY_LOG_FORMAT", "json");

/// Each line of `stderr` as JSON (panics on a line that is not).
fn json_lines(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn under_json_logs_every_stderr_line_is_json_listening_line_included() {
    let db = common::fresh_sqlite();
    let key = common::new_master_key();
    // The harness finds the addresses in the JSON listening line's fields.
    let cp = common::spawn_cp_binary(&db.url, key.expose_secret(), &[JSON_LOGS]).await;
    common::wait_ready(cp.metrics_addr, Duration::from_secs(30)).await;
    let (addr, metrics_addr) = (cp.addr, cp.metrics_addr);
    let log = cp.stop().await;
    let lines = json_lines(&log);
    let listening: Vec<&Value> = lines
        .iter()
        .filter(|line| {
            line["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("llm-proxy control plane listening on "))
        })
        .collect();
    let [listening] = listening.as_slice() else {
        panic!("one listening line expected:\n{log}");
    };
    assert_eq!(
        listening["fields"]["message"],
        format!("llm-proxy control plane listening on {addr} (gRPC), metrics on {metrics_addr}")
    );
    assert_eq!(listening["fields"]["addr"], addr.to_string());
    assert_eq!(
        listening["fields"]["metrics_addr"],
        metrics_addr.to_string()
    );
    assert_eq!(listening["level"], "INFO");
    assert_eq!(listening["target"], "llm_proxy_control_plane");
    // The log lines (RUST_LOG=info,...=debug in the harness) are there too, not only the notice.
    assert!(lines.len() > 1, "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn under_json_logs_refusals_and_notices_are_json_lines() {
    let args = [
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let env: Vec<(&str, &str)> = TOKENS.iter().copied().chain([JSON_LOGS]).collect();
    let (code, _, stderr) = run(&args, &env).await;
    assert_eq!(code, 1, "{stderr}");
    let lines = json_lines(&stderr);
    let [refusal] = lines.as_slice() else {
        panic!("one line expected: {stderr}");
    };
    assert_eq!(refusal["level"], "ERROR");
    assert_eq!(refusal["target"], "llm_proxy_control_plane");
    let message = refusal["fields"]["message"].as_str().unwrap();
    assert!(
        message.contains("refusing plaintext gRPC on 0.0.0.0:0"),
        "{message}"
    );
    assert!(!message.starts_with("error: "), "{message}");

    // A one-off command's report too.
    let (code, _, stderr) = run(&["migrate"], &[JSON_LOGS]).await;
    assert_eq!(code, 0, "{stderr}");
    let lines = json_lines(&stderr);
    let applied = lines
        .iter()
        .find(|line| line["fields"]["applied"].is_string())
        .unwrap_or_else(|| panic!("no report: {stderr}"));
    let count = applied["fields"]["applied"].as_str().unwrap();
    assert!(count.parse::<u32>().unwrap() > 0, "{applied}");
    assert_eq!(
        applied["fields"]["message"],
        format!("migrations applied: {count}")
    );
}
