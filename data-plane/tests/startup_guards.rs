//! What the data plane binary refuses at start (DESIGN §19): a blank data-plane token, and a
//! plaintext `http://` control plane that is not on loopback unless `--allow-plaintext` is given;
//! which OTLP protocols it takes; and, under `LLM_PROXY_LOG_FORMAT=json`, JSON on every line it
//! writes on stderr, the listening line and the refusals included (DESIGN §16).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use serde_json::Value;
use std::time::Duration;

/// `llm-proxy-data-plane --check-config ARGS` with only `env` set: exit code, stdout, stderr.
async fn check_config(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-proxy-data-plane"))
        .arg("--check-config")
        .args(args)
        .env_clear()
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

fn assert_refused((code, _, stderr): (i32, String, String), parts: &[&str]) {
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    for part in parts {
        assert!(stderr.contains(part), "{part:?} missing: {stderr}");
    }
}

#[tokio::test]
async fn plaintext_to_a_remote_control_plane_needs_allow_plaintext() {
    for remote in ["http://control-plane:8131", "http://10.0.0.7:8131"] {
        let args = ["--control-plane", remote];
        assert_refused(
            check_config(&args, &[]).await,
            &[
                "error: refusing plaintext http:// to the control plane",
                "https://",
                "--allow-plaintext (LLM_PROXY_ALLOW_PLAINTEXT)",
            ],
        );
        let (code, _, stderr) = check_config(&args, &[("LLM_PROXY_ALLOW_PLAINTEXT", "true")]).await;
        assert_eq!(code, 0, "{stderr}");
        let flagged: Vec<&str> = args.iter().copied().chain(["--allow-plaintext"]).collect();
        assert_eq!(check_config(&flagged, &[]).await.0, 0);
    }
    for fine in [
        "http://127.0.0.1:8131",
        "http://localhost:8131",
        "http://[::1]:8131",
        "https://control-plane:8131",
    ] {
        let (code, _, stderr) = check_config(&["--control-plane", fine], &[]).await;
        assert_eq!(code, 0, "{fine}: {stderr}");
    }
}

#[tokio::test]
async fn a_blank_dataplane_token_is_refused() {
    let expected = ["error: --dataplane-token (LLM_PROXY_DATAPLANE_TOKEN) is empty"];
    assert_refused(
        check_config(&[], &[("LLM_PROXY_DATAPLANE_TOKEN", " \n")]).await,
        &expected,
    );
    assert_refused(
        check_config(&["--dataplane-token", ""], &[]).await,
        &expected,
    );
    let (code, stdout, stderr) =
        check_config(&[], &[("LLM_PROXY_DATAPLANE_TOKEN", "dp-token-1\n")]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("dataplane_token=set"), "{stdout}");
}

const JSON_LOGS: (&str, &str) = ("LLM_PROXY_LOG_FORMAT", "json");
const OTLP_ENDPOINT: (&str, &str) = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9");

/// Each line of `stderr` as JSON (panics on a line that is not).
fn json_lines<S: AsRef<str>>(lines: impl IntoIterator<Item = S>) -> Vec<Value> {
    lines
        .into_iter()
        .map(|line| {
            let line = line.as_ref();
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
        })
        .collect()
}

/// The one line of a refusal under JSON logs: level ERROR, the message without `error: `.
fn assert_refused_json((code, _, stderr): (i32, String, String), message: &str) {
    assert_eq!(code, 1, "{stderr}");
    let lines = json_lines(stderr.lines());
    let [line] = lines.as_slice() else {
        panic!("one line expected: {stderr}");
    };
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(line["target"], "llm_proxy_data_plane", "{line}");
    let text = line["fields"]["message"].as_str().unwrap();
    assert!(text.contains(message), "{message:?} expected: {line}");
    assert!(!text.starts_with("error: "), "{line}");
}

#[tokio::test]
async fn otlp_over_grpc_and_http_protobuf_is_accepted_http_json_refused() {
    for protocol in ["grpc", "http/protobuf"] {
        for var in [
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        ] {
            let (code, _, stderr) = check_config(&[], &[OTLP_ENDPOINT, (var, protocol)]).await;
            assert_eq!(code, 0, "{var}={protocol}: {stderr}");
        }
    }
    let refused = [OTLP_ENDPOINT, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")];
    let message = "unsupported OTLP protocol \"http/json\" in OTEL_EXPORTER_OTLP_PROTOCOL: use grpc (the default) or http/protobuf";
    assert_refused(
        check_config(&[], &refused).await,
        &[&format!("error: {message}")],
    );
    // Refused before any log subscriber exists, and still a JSON line.
    let env: Vec<(&str, &str)> = refused.into_iter().chain([JSON_LOGS]).collect();
    assert_refused_json(check_config(&[], &env).await, message);
}

#[tokio::test]
async fn under_json_logs_a_refusal_is_one_json_line() {
    assert_refused_json(
        check_config(&["--control-plane", "http://10.0.0.7:8131"], &[JSON_LOGS]).await,
        "refusing plaintext http:// to the control plane",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn under_json_logs_every_stderr_line_is_json_listening_line_included() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, _) = common::start_control_plane(dir.path()).await;
    // RUST_LOG=info: the log lines around the listening line are there too.
    let dp = common::DataPlaneProcess::start_with_env(
        cp.grpc_addr,
        "dp-json-logs",
        &[],
        &[JSON_LOGS, ("RUST_LOG", "info")],
    )
    .await;
    let (addr, metrics_addr) = (dp.addr, dp.metrics);
    // The harness stopped reading at the listening line: everything up to it is JSON.
    let until_listening = json_lines(dp.log.lock().unwrap().iter());
    let listening = until_listening.last().unwrap();
    assert_eq!(
        listening["fields"]["message"],
        format!("llm-proxy data plane listening on {addr} (metrics on {metrics_addr})")
    );
    assert_eq!(listening["fields"]["addr"], addr.to_string());
    assert_eq!(
        listening["fields"]["metrics_addr"],
        metrics_addr.to_string()
    );
    assert_eq!(listening["level"], "INFO");
    assert_eq!(listening["target"], "llm_proxy_data_plane");
    assert!(until_listening.len() > 1, "only the listening line");

    // The addresses are the real ones: the data plane gets its snapshot and says it is ready.
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    loop {
        let ready = http
            .get(format!("http://{metrics_addr}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ready {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // And the rest of its life, shutdown included.
    let (status, log) = dp.terminate().await;
    assert!(status.success(), "{status}: {log:?}");
    let lines = json_lines(&log);
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "shutting down: draining in-flight requests"),
        "{log:?}"
    );
    cp.shutdown().await;
}
