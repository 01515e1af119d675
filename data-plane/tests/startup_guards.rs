//! What the data plane binary refuses at start (DESIGN §19): a blank data-plane token, and a
//! plaintext `http://` control plane that is not on loopback unless `--allow-plaintext` is given.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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
