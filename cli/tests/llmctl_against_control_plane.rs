//! The real `llmctl` binary (and its second name, `llm-proxy`) against a real control plane on
//! Postgres: the README's provider setup (DESIGN §4), list/get/update/delete, JSON output, the
//! control plane's address (`--server` and its old names, DESIGN §3) and the exact error lines.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
use llm_proxy_control_plane::crypto::MasterKeys;
use llm_proxy_control_plane::rows::UsageRow;
use llm_proxy_control_plane::server::{self, RunningControlPlane, ServerSettings};
use llm_proxy_control_plane::usage::UsageBatch;
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::Value;
use std::process::Output;

const LLMCTL: &str = env!("CARGO_BIN_EXE_llmctl");
const LLM_PROXY: &str = env!("CARGO_BIN_EXE_llm-proxy");

/// Nothing listens on the discard port: a control-plane address that must not be the one used.
const NOWHERE: &str = "http://127.0.0.1:9";

fn postgres_base_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A control plane on a fresh schema of the test Postgres.
async fn control_plane(admin_token: Option<&str>) -> RunningControlPlane {
    let base = postgres_base_url();
    let mut conn = AsyncPgConnection::establish(&base).await.unwrap();
    let schema = format!(
        "t_{}",
        llm_proxy_control_plane::ids::new_id("x").trim_start_matches("x-")
    );
    diesel::sql_query(format!("CREATE SCHEMA {schema}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    let mut settings = ServerSettings::new(
        "127.0.0.1:0".parse().unwrap(),
        SecretString::from(url),
        MasterKeys::generate_encoded(),
    );
    settings.admin_token = admin_token.map(|t| SecretString::from(t.to_owned()));
    server::start(settings).await.unwrap()
}

/// Runs `exe ARGS` with `env` and none of llmctl's variables from the test's own environment.
async fn run_exe(exe: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(exe);
    for var in [
        "LLMCTL_SERVER",
        "LLMCTL_ENDPOINT",
        "LLMCTL_TOKEN",
        "LLM_PROXY_ALLOW_PLAINTEXT",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied()).args(args);
    cmd.output().await.unwrap()
}

/// stdout of a run that must have succeeded.
fn stdout_of(out: Output, args: &[&str]) -> String {
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// The single stderr line of a run that must have failed with `code`.
fn error_line_of(out: Output, code: i32, args: &[&str]) -> String {
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got {stderr:?}");
    lines[0].to_owned()
}

struct Ctl {
    server: String,
    token: Option<String>,
}

impl Ctl {
    fn new(cp: &RunningControlPlane, token: Option<&str>) -> Self {
        Self {
            server: format!("http://{}", cp.grpc_addr),
            token: token.map(str::to_owned),
        }
    }

    async fn run(&self, args: &[&str]) -> Output {
        let mut env = vec![("LLMCTL_SERVER", self.server.as_str())];
        if let Some(token) = &self.token {
            env.push(("LLMCTL_TOKEN", token));
        }
        run_exe(LLMCTL, &env, args).await
    }

    /// Runs a command that must succeed; returns stdout.
    async fn ok(&self, args: &[&str]) -> String {
        stdout_of(self.run(args).await, args)
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut full = vec!["-o", "json"];
        full.extend_from_slice(args);
        let stdout = self.ok(&full).await;
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
    }

    /// Runs a command that the control plane (or llmctl itself) must refuse: exit code 1 and
    /// exactly one line on stderr, returned.
    async fn fails(&self, args: &[&str]) -> String {
        error_line_of(self.run(args).await, 1, args)
    }

    /// Runs a command that clap must refuse: exit code 2 and one line on stderr, returned.
    async fn usage_error(&self, args: &[&str]) -> String {
        error_line_of(self.run(args).await, 2, args)
    }
}

fn id_of(value: &Value) -> String {
    value["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_provider_setup_and_crud_through_llmctl() {
    let cp = control_plane(None).await;
    let ctl = Ctl::new(&cp, None);

    // Table output prints the new ID prominently.
    let out = ctl
        .ok(&[
            "connection",
            "add",
            "--name",
            "OpenAI-Main",
            "--provider",
            "openai",
            "--endpoint",
            "https://api.openai.com",
            "--api-key",
            "sk-proj-abc123",
        ])
        .await;
    let openai_id = out
        .split_whitespace()
        .find(|w| w.starts_with("conn-"))
        .unwrap_or_else(|| panic!("no ID in {out:?}"))
        .trim_end_matches(|c: char| !c.is_alphanumeric())
        .to_owned();
    assert_eq!(
        out.lines().next(),
        Some(format!("created connection {openai_id} (OpenAI-Main)").as_str())
    );
    assert!(!out.contains("sk-proj-abc123"));

    let azure = ctl
        .json(&[
            "connection",
            "add",
            "--name",
            "Azure-East",
            "--provider",
            "azure",
            "--endpoint",
            "https://my-resource.openai.azure.com",
            "--api-key",
            "0123456789abcdef0123456789abcdef",
            "--set",
            "api_version=2024-10-21",
        ])
        .await;
    assert!(id_of(&azure).starts_with("conn-"));
    assert_eq!(azure["provider"], "azure");
    assert_eq!(azure["options"]["api_version"], "2024-10-21");
    assert!(azure.get("credential").is_none() && azure.get("api_key").is_none());

    let gemini = ctl
        .json(&[
            "connection",
            "add",
            "--name",
            "Gemini",
            "--provider",
            "google",
            "--endpoint",
            "https://generativelanguage.googleapis.com",
            "--api-key",
            "AIzaSyExampleExampleExample",
        ])
        .await;
    let dir = tempfile::tempdir().unwrap();
    let sa = dir.path().join("sa.json");
    std::fs::write(
        &sa,
        r#"{"type":"service_account","project_id":"my-proj","private_key_id":"k1","private_key":"-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n","client_email":"gw@my-proj.iam.gserviceaccount.com","token_uri":"https://oauth2.googleapis.com/token"}"#,
    )
    .unwrap();
    let vertex = ctl
        .json(&[
            "connection",
            "add",
            "--name",
            "Vertex",
            "--provider",
            "google",
            "--endpoint",
            "https://us-central1-aiplatform.googleapis.com",
            "--api-key-file",
            sa.to_str().unwrap(),
            "--set",
            "project=my-proj",
            "--set",
            "location=us-central1",
        ])
        .await;
    assert_eq!(vertex["options"]["location"], "us-central1");
    // The file's content went to the control plane as the credential, its final newline trimmed.
    let stored = cp.store.get_connection("Vertex").await.unwrap();
    let credential = cp.store.decrypt_credential(&stored).unwrap();
    assert_eq!(
        credential.expose_secret(),
        std::fs::read_to_string(&sa).unwrap().trim_end_matches('\n')
    );

    let gpt = ctl
        .json(&[
            "model",
            "add",
            "--conn-id",
            &openai_id,
            "--name",
            "gpt-4-turbo",
            "--remote",
            "gpt-4-turbo-preview",
        ])
        .await;
    assert!(id_of(&gpt).starts_with("model-"));
    assert_eq!(gpt["connection_id"], openai_id.as_str());
    assert_eq!(gpt["deployment"], Value::Null);
    let az_model = ctl
        .json(&[
            "model",
            "add",
            "--conn-id",
            "Azure-East",
            "--name",
            "gpt-4o",
            "--remote",
            "gpt-4o",
            "--deployment",
            "gpt4o-prod",
        ])
        .await;
    assert_eq!(az_model["deployment"], "gpt4o-prod");
    ctl.json(&[
        "model",
        "add",
        "--conn-id",
        &id_of(&gemini),
        "--name",
        "gemini-2.0-flash",
        "--remote",
        "gemini-2.0-flash",
    ])
    .await;
    ctl.json(&[
        "model",
        "add",
        "--conn-id",
        "Vertex",
        "--name",
        "gemini-vertex",
        "--remote",
        "gemini-2.0-flash",
    ])
    .await;

    let front = ctl
        .json(&[
            "vkey",
            "add",
            "--name",
            "Frontend-App",
            "--key",
            "vk-front-1234",
        ])
        .await;
    assert!(id_of(&front).starts_with("vkey-"));
    assert_eq!(front["key_hint"], "vk-fr…1234");
    assert!(
        front.get("key").is_none_or(Value::is_null),
        "a chosen key is not printed back"
    );
    let generated = ctl.json(&["vkey", "add", "--name", "Backend"]).await;
    let key = generated["key"].as_str().unwrap();
    assert!(key.starts_with("vk-") && key.len() >= 35);
    let again = ctl.json(&["vkey", "get", "Backend"]).await;
    assert!(again.get("key").is_none(), "the key is shown once only");

    let asg = ctl
        .json(&[
            "assign",
            "--vkey-id",
            &id_of(&front),
            "--model-id",
            &id_of(&gpt),
            "--alias",
            "gpt-4",
            "--tps",
            "50",
        ])
        .await;
    assert!(id_of(&asg).starts_with("asg-"));
    assert_eq!(asg["alias"], "gpt-4");
    assert_eq!(asg["tps"], 50);
    assert_eq!(asg["tpm"], Value::Null);
    assert_eq!(asg["weight"], 1);
    // Names work wherever IDs do.
    let by_names = ctl
        .json(&[
            "assign",
            "--vkey-id",
            "Backend",
            "--model-id",
            "Azure-East/gpt-4o",
            "--tpm",
            "100000",
        ])
        .await;
    assert_eq!(by_names["alias"], "gpt-4o");
    assert_eq!(by_names["tpm"], 100_000);

    // list / get / update / delete.
    let conns = ctl.json(&["connection", "list"]).await;
    assert_eq!(conns.as_array().unwrap().len(), 4);
    let table = ctl.ok(&["connection", "list"]).await;
    assert!(
        table.lines().count() >= 5 && table.contains("OpenAI-Main") && table.contains("Vertex")
    );
    assert_eq!(
        ctl.json(&["connection", "get", "OpenAI-Main"]).await["id"],
        openai_id.as_str()
    );
    let updated = ctl
        .json(&[
            "connection",
            "update",
            "Azure-East",
            "--set",
            "timeout_s=30",
            "--unset",
            "api_version",
        ])
        .await;
    assert_eq!(updated["options"]["timeout_s"], "30");
    assert!(updated["options"].get("api_version").is_none());

    assert_eq!(
        ctl.json(&["model", "list"]).await.as_array().unwrap().len(),
        4
    );
    let renamed = ctl
        .json(&[
            "model",
            "update",
            "gpt-4-turbo",
            "--remote",
            "gpt-4-turbo-2024-04-09",
        ])
        .await;
    assert_eq!(renamed["remote"], "gpt-4-turbo-2024-04-09");

    let disabled = ctl
        .json(&["vkey", "update", "Frontend-App", "--disable"])
        .await;
    assert_eq!(disabled["enabled"], false);
    let expiring = ctl
        .json(&[
            "vkey",
            "update",
            "Frontend-App",
            "--enable",
            "--expires-at",
            "2030-01-01T00:00:00Z",
        ])
        .await;
    assert_eq!(expiring["enabled"], true);
    assert_eq!(expiring["expires_at"], "2030-01-01T00:00:00Z");
    assert_eq!(
        ctl.json(&["vkey", "list"]).await.as_array().unwrap().len(),
        2
    );

    let changed = ctl
        .json(&[
            "assignment",
            "update",
            &id_of(&asg),
            "--tps",
            "10",
            "--burst",
            "20",
            "--weight",
            "2",
        ])
        .await;
    assert_eq!(
        (
            changed["tps"].as_i64(),
            changed["burst"].as_i64(),
            changed["weight"].as_i64()
        ),
        (Some(10), Some(20), Some(2))
    );
    assert_eq!(
        ctl.json(&["assignment", "list", "--vkey-id", "Frontend-App"])
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        ctl.json(&["assignment", "get", &id_of(&asg)]).await["burst"],
        20
    );

    assert_eq!(
        ctl.json(&["unassign", &id_of(&asg)]).await,
        serde_json::json!({"id": id_of(&asg), "deleted": true})
    );
    assert_eq!(
        ctl.fails(&["assignment", "get", &id_of(&asg)]).await,
        format!("error: assignment {:?} not found", id_of(&asg))
    );

    // Referenced rows need --force.
    assert_eq!(
        ctl.fails(&["connection", "delete", "Azure-East"]).await,
        "error: connection \"Azure-East\" still has 1 model(s) (gpt-4o); delete them first or pass --force to delete them and their assignments"
    );
    ctl.ok(&["connection", "delete", "Azure-East", "--force"])
        .await;
    ctl.ok(&["model", "delete", "gemini-vertex"]).await;
    ctl.ok(&["vkey", "delete", "Backend"]).await;
    assert_eq!(
        ctl.json(&["connection", "list"])
            .await
            .as_array()
            .unwrap()
            .len(),
        3
    );

    let planes = ctl.json(&["dataplanes"]).await;
    assert_eq!(planes, Value::Array(vec![]));
    cp.shutdown().await;
}

/// `connection add --name NAME --provider openai --endpoint URL --api-key sk-x`.
fn openai_connection<'a>(name: &'a str, endpoint: &'a str) -> Vec<&'a str> {
    vec![
        "connection",
        "add",
        "--name",
        name,
        "--provider",
        "openai",
        "--endpoint",
        endpoint,
        "--api-key",
        "sk-x",
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn each_error_is_one_exact_line() {
    let cp = control_plane(Some("admin-secret-token")).await;
    let ctl = Ctl::new(&cp, Some("admin-secret-token"));
    ctl.ok(&openai_connection("OpenAI", "https://api.openai.com"))
        .await;
    ctl.ok(&[
        "model",
        "add",
        "--conn-id",
        "OpenAI",
        "--name",
        "gpt-4",
        "--remote",
        "gpt-4",
    ])
    .await;
    ctl.ok(&["vkey", "add", "--name", "App", "--key", "vk-app-123456"])
        .await;
    let assign = |extra: &'static [&'static str]| {
        let mut args = vec!["assign", "--vkey-id", "App", "--model-id", "gpt-4"];
        args.extend_from_slice(extra);
        args
    };

    // Refused by the control plane (exit code 1): its message is the whole line.
    // `--tps` is parsed by clap as any integer, so 0 and negative values reach the server,
    // which judges them.
    let refused: Vec<(Vec<&str>, &str)> = vec![
        (
            assign(&["--tps", "0"]),
            "error: tps must be a positive integer, got 0",
        ),
        (
            assign(&["--tps", "5", "--burst", "-1"]),
            "error: burst must be a positive integer, got -1",
        ),
        (
            assign(&["--tpm", "0"]),
            "error: tpm must be a positive integer, got 0",
        ),
        (
            assign(&["--burst", "10"]),
            "error: burst needs tps: it is the capacity of the requests-per-second bucket",
        ),
        (
            vec!["connection", "get", "nope"],
            "error: connection \"nope\" not found",
        ),
        (
            vec![
                "model",
                "add",
                "--conn-id",
                "missing-conn",
                "--name",
                "m",
                "--remote",
                "r",
            ],
            "error: connection \"missing-conn\" not found",
        ),
        (
            openai_connection("OpenAI", "https://x.com"),
            "error: a connection named \"OpenAI\" already exists",
        ),
        (
            vec!["vkey", "add", "--name", "App"],
            "error: a virtual key named \"App\" already exists",
        ),
        (
            openai_connection("X", "not-a-url"),
            "error: endpoint must be an absolute http(s) URL such as https://api.openai.com, got \"not-a-url\"",
        ),
        (
            [
                openai_connection("X", "https://x.com"),
                vec!["--set", "region=us-east-1"],
            ]
            .concat(),
            "error: option \"region\" is unknown for provider openai; known: timeout_s",
        ),
        // Checked by llmctl before any call: a stored credential never follows its connection
        // to another host.
        (
            vec![
                "connection",
                "update",
                "OpenAI",
                "--endpoint",
                "https://collector.example.net",
            ],
            "error: --endpoint needs the credential again: add --api-key or --api-key-file (a stored credential is never sent to a new endpoint)",
        ),
    ];
    for (args, line) in refused {
        assert_eq!(ctl.fails(&args).await, line, "{args:?}");
    }

    // Refused by clap (exit code 2), before anything is sent.
    let usage: Vec<(Vec<&str>, &str)> = vec![
        (
            assign(&["--tps", "fast"]),
            "error: invalid value 'fast' for '--tps <N>': invalid digit found in string",
        ),
        (
            vec![
                "connection",
                "add",
                "--name",
                "X",
                "--provider",
                "cohere",
                "--endpoint",
                "https://x.com",
            ],
            "error: invalid value 'cohere' for '--provider <PROVIDER>' [possible values: openai, azure, google, bedrock, anthropic]",
        ),
    ];
    for (args, line) in usage {
        assert_eq!(ctl.usage_error(&args).await, line, "{args:?}");
    }

    let moved = ctl
        .json(&[
            "connection",
            "update",
            "OpenAI",
            "--endpoint",
            "https://gateway.example.net",
            "--api-key",
            "sk-new",
        ])
        .await;
    assert_eq!(moved["endpoint"], "https://gateway.example.net");

    // The admin token: wrong, or missing. Neither line shows a token.
    let wrong = Ctl::new(&cp, Some("wrong-token"));
    assert_eq!(
        wrong.fails(&["connection", "list"]).await,
        "error: invalid token for AdminService"
    );
    let missing = Ctl::new(&cp, None);
    assert_eq!(
        missing.fails(&["vkey", "list"]).await,
        "error: AdminService requires an `authorization: Bearer <token>` header (no admin token given: use --token or LLMCTL_TOKEN)"
    );
    cp.shutdown().await;
}

/// Prices (DESIGN §18): typed in USD per million tokens, stored and shown in JSON as integer
/// micro-USD, shown in tables as USD; `none` removes one; bad values are one-line errors.
#[tokio::test(flavor = "multi_thread")]
async fn model_prices_in_usd_and_micro_usd() {
    let cp = control_plane(None).await;
    let ctl = Ctl::new(&cp, None);
    ctl.ok(&openai_connection("OpenAI", "https://api.openai.com"))
        .await;
    let gpt = ctl
        .json(&[
            "model",
            "add",
            "--conn-id",
            "OpenAI",
            "--name",
            "gpt-4o",
            "--remote",
            "gpt-4o",
            "--price-input",
            "2.50",
            "--price-output",
            "10",
            "--price-cache-read",
            "1.25",
        ])
        .await;
    assert_eq!(gpt["price_input"], 2_500_000);
    assert_eq!(gpt["price_output"], 10_000_000);
    assert_eq!(gpt["price_cache_read"], 1_250_000);
    assert_eq!(gpt["price_cache_write"], Value::Null);
    let plain = ctl
        .json(&[
            "model",
            "add",
            "--conn-id",
            "OpenAI",
            "--name",
            "plain",
            "--remote",
            "plain",
        ])
        .await;
    for price in [
        "price_input",
        "price_output",
        "price_cache_read",
        "price_cache_write",
    ] {
        assert_eq!(plain[price], Value::Null, "{price}");
    }

    let table = ctl.ok(&["model", "get", "gpt-4o"]).await;
    assert!(
        table.contains("price_input: 2.50 USD/1M tokens\nprice_output: 10.00 USD/1M tokens\nprice_cache_read: 1.25 USD/1M tokens\nprice_cache_write: -\n"),
        "{table}"
    );
    let list = ctl.ok(&["model", "list"]).await;
    let row = list.lines().find(|l| l.contains("gpt-4o")).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[5..9], ["2.50", "10.00", "1.25", "-"], "{list}");

    // Update: set one, remove one, leave the others.
    let updated = ctl
        .json(&[
            "model",
            "update",
            "gpt-4o",
            "--price-cache-read",
            "none",
            "--price-cache-write",
            "3.125",
            "--price-output",
            "0.000001",
        ])
        .await;
    assert_eq!(
        (
            updated["price_input"].as_i64(),
            updated["price_output"].as_i64(),
            updated["price_cache_read"].as_i64(),
            updated["price_cache_write"].as_i64()
        ),
        (Some(2_500_000), Some(1), None, Some(3_125_000))
    );
    let listed = ctl.json(&["model", "list"]).await;
    let got = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "gpt-4o")
        .unwrap();
    assert_eq!(got, &updated);
    let table = ctl.ok(&["model", "get", "gpt-4o"]).await;
    assert!(
        table.contains("price_output: 0.000001 USD/1M tokens\n"),
        "{table}"
    );

    // Refused by clap, with the flag and the value named (exit code 2)...
    assert_eq!(
        ctl.usage_error(&["model", "update", "gpt-4o", "--price-input", "1.0000001"])
            .await,
        "error: invalid value '1.0000001' for '--price-input <USD>': a price has at most 6 decimal places (it is kept in micro-USD per million tokens)"
    );
    assert_eq!(
        ctl.usage_error(&["model", "update", "gpt-4o", "--price-output", "-1"])
            .await,
        "error: invalid value '-1' for '--price-output <USD>': a price must not be negative"
    );
    let line = ctl
        .usage_error(&["model", "update", "gpt-4o", "--price-input", "abc"])
        .await;
    assert!(
        line.starts_with("error: invalid value 'abc' for '--price-input <USD>': expected a price"),
        "{line}"
    );
    // ...and by the control plane past its bound (exit code 1).
    assert_eq!(
        ctl.fails(&[
            "model",
            "update",
            "gpt-4o",
            "--price-input",
            "1000000.000001"
        ])
        .await,
        "error: price_input must be at most 1000000000000 micro-USD per million tokens ($1000000 per million tokens), got 1000000000001"
    );
    assert_eq!(
        ctl.json(&["model", "get", "gpt-4o"]).await,
        updated,
        "nothing changed"
    );
    cp.shutdown().await;
}

/// Budgets (DESIGN §18): typed in USD, shown in JSON as a 6-place decimal string with the period,
/// in tables as USD per period; `none` removes one; bad values are one-line errors.
#[tokio::test(flavor = "multi_thread")]
async fn vkey_budgets_in_usd_per_period() {
    let cp = control_plane(None).await;
    let ctl = Ctl::new(&cp, None);
    let team = ctl
        .json(&[
            "vkey",
            "add",
            "--name",
            "team-a",
            "--key",
            "vk-team-a-123456",
            "--budget-usd",
            "100",
        ])
        .await;
    assert_eq!(team["budget_usd"], "100.000000");
    assert_eq!(team["budget_period"], "month", "monthly by default");
    let daily = ctl
        .json(&[
            "vkey",
            "add",
            "--name",
            "ci",
            "--key",
            "vk-ci-1234567890",
            "--budget-usd",
            "2.5",
            "--budget-period",
            "day",
        ])
        .await;
    assert_eq!(daily["budget_usd"], "2.500000");
    assert_eq!(daily["budget_period"], "day");
    // `none` on add: no budget, as without the flag.
    let plain = ctl
        .json(&[
            "vkey",
            "add",
            "--name",
            "plain",
            "--key",
            "vk-plain-1234567",
            "--budget-usd",
            "none",
        ])
        .await;
    assert_eq!(plain["budget_usd"], Value::Null);
    assert_eq!(plain["budget_period"], Value::Null);

    let table = ctl.ok(&["vkey", "get", "team-a"]).await;
    assert!(table.contains("budget_usd: 100.00/month\n"), "{table}");
    let list = ctl.ok(&["vkey", "list"]).await;
    let header: Vec<&str> = list.lines().next().unwrap().split_whitespace().collect();
    let column = header.iter().position(|h| *h == "BUDGET_USD").unwrap();
    let cell = |name: &str| {
        let row = list.lines().find(|l| l.contains(name)).unwrap();
        row.split_whitespace().nth(column).unwrap().to_owned()
    };
    assert_eq!(cell("team-a"), "100.00/month", "{list}");
    assert_eq!(cell("ci"), "2.50/day", "{list}");
    assert_eq!(cell("plain"), "-", "{list}");

    // Update: a new amount keeps the period, a new period keeps the amount, `none` removes both.
    let raised = ctl
        .json(&["vkey", "update", "team-a", "--budget-usd", "250.75"])
        .await;
    assert_eq!(
        (&raised["budget_usd"], &raised["budget_period"]),
        (&Value::from("250.750000"), &Value::from("month"))
    );
    let weekly = ctl
        .json(&["vkey", "update", "team-a", "--budget-period", "week"])
        .await;
    assert_eq!(
        (&weekly["budget_usd"], &weekly["budget_period"]),
        (&Value::from("250.750000"), &Value::from("week"))
    );
    let removed = ctl
        .json(&["vkey", "update", "ci", "--budget-usd", "none"])
        .await;
    assert_eq!(removed["budget_usd"], Value::Null);
    assert_eq!(removed["budget_period"], Value::Null);
    let fresh = ctl
        .json(&[
            "vkey",
            "update",
            "plain",
            "--budget-usd",
            "0.000001",
            "--budget-period",
            "day",
        ])
        .await;
    assert_eq!(fresh["budget_usd"], "0.000001");
    assert_eq!(fresh["budget_period"], "day");
    let listed = ctl.json(&["vkey", "list"]).await;
    let got = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "team-a")
        .unwrap();
    assert_eq!(got, &weekly);

    // Refused by clap, with the flag and the value named (exit code 2)...
    assert_eq!(
        ctl.usage_error(&["vkey", "update", "team-a", "--budget-usd", "1.0000001"])
            .await,
        "error: invalid value '1.0000001' for '--budget-usd <USD|none>': a budget has at most 6 decimal places (it is kept in micro-USD)"
    );
    assert_eq!(
        ctl.usage_error(&["vkey", "update", "team-a", "--budget-usd", "-5"])
            .await,
        "error: invalid value '-5' for '--budget-usd <USD|none>': a budget must not be negative"
    );
    let line = ctl
        .usage_error(&["vkey", "update", "team-a", "--budget-period", "year"])
        .await;
    assert!(
        line.starts_with("error: invalid value 'year' for '--budget-period <PERIOD>'"),
        "{line}"
    );
    // ...and by the control plane (exit code 1).
    assert_eq!(
        ctl.fails(&[
            "vkey",
            "update",
            "team-a",
            "--budget-usd",
            "1000000000.000001"
        ])
        .await,
        "error: budget_micro_usd must be at most 1000000000000000 micro-USD ($1000000000), got 1000000000000001"
    );
    let line = ctl
        .fails(&["vkey", "update", "ci", "--budget-period", "day"])
        .await;
    assert!(
        line.starts_with("error: budget_period needs a budget"),
        "{line}"
    );
    let line = ctl
        .fails(&[
            "vkey",
            "add",
            "--name",
            "nobudget",
            "--budget-period",
            "week",
        ])
        .await;
    assert!(
        line.starts_with("error: budget_period needs a budget"),
        "{line}"
    );
    assert_eq!(
        ctl.json(&["vkey", "get", "team-a"]).await,
        weekly,
        "nothing changed"
    );
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn control_planes_out_of_reach_are_explained_in_one_line() {
    // Refused before any connection attempt.
    let remote = Ctl {
        server: "http://192.0.2.1:8131".into(),
        token: None,
    };
    assert_eq!(
        remote.fails(&["vkey", "list"]).await,
        "error: refusing plaintext http:// to the control plane at 192.0.2.1 (not loopback): use an https:// --server (with --tls-ca for a private CA), or pass --allow-plaintext (LLM_PROXY_ALLOW_PLAINTEXT) if this network is private"
    );
    let allowed = remote.fails(&["vkey", "list", "--allow-plaintext"]).await;
    assert!(
        allowed.starts_with("error: cannot reach the control plane at http://192.0.2.1:8131: "),
        "{allowed}"
    );

    let nowhere = Ctl {
        server: NOWHERE.into(),
        token: None,
    };
    let line = nowhere.fails(&["vkey", "list"]).await;
    // The rest is the operating system's words for the refusal.
    assert!(
        line.starts_with("error: cannot reach the control plane at http://127.0.0.1:9: "),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn generated_and_chosen_keys_in_json() {
    let cp = control_plane(None).await;
    let ctl = Ctl::new(&cp, None);
    let generated = ctl.json(&["vkey", "add", "--name", "Frontend-App"]).await;
    assert!(generated["key"].as_str().unwrap().starts_with("vk-"));
    assert_eq!(generated["expires_at"], Value::Null);

    let out = ctl
        .ok(&[
            "-o",
            "json",
            "vkey",
            "add",
            "--name",
            "Chosen",
            "--key",
            "vk-chosen-secret",
            "--expires-at",
            "2026-12-31T23:59:59Z",
        ])
        .await;
    assert!(!out.contains("vk-chosen-secret"));
    let chosen: Value = serde_json::from_str(&out).unwrap();
    assert!(chosen.get("key").is_none());
    assert_eq!(chosen["expires_at"], "2026-12-31T23:59:59Z");
    cp.shutdown().await;
}

/// Environment variables given to one run.
type Env<'a> = &'a [(&'a str, &'a str)];

/// The names of the virtual keys that `exe ARGS -o json vkey list` prints.
async fn vkey_names(exe: &str, env: Env<'_>, args: &[&str]) -> Vec<String> {
    let args = [args, &["-o", "json", "vkey", "list"]].concat();
    let stdout = stdout_of(run_exe(exe, env, &args).await, &args);
    let list: Value = serde_json::from_str(&stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|k| k["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn server_flag_and_its_old_names_select_the_control_plane() {
    let cp = control_plane(None).await;
    let ctl = Ctl::new(&cp, None);
    ctl.ok(&["vkey", "add", "--name", "Marker", "--key", "vk-marker-1234"])
        .await;
    let url = ctl.server.as_str();
    let marker = vec!["Marker".to_owned()];

    // Each way of naming the control plane reaches it; where two are given, the other one
    // points nowhere, so only the winner can have answered.
    let ways: [(Env, &[&str]); 7] = [
        (&[], &["--server", url]),
        (&[("LLMCTL_SERVER", url)], &[]),
        (&[], &["--endpoint", url]),
        (&[("LLMCTL_ENDPOINT", url)], &[]),
        (&[("LLMCTL_SERVER", NOWHERE)], &["--server", url]),
        (&[("LLMCTL_SERVER", NOWHERE)], &["--endpoint", url]),
        (&[("LLMCTL_SERVER", url), ("LLMCTL_ENDPOINT", NOWHERE)], &[]),
    ];
    for (env, args) in ways {
        assert_eq!(
            vkey_names(LLMCTL, env, args).await,
            marker,
            "{env:?} {args:?}"
        );
    }
    // After the subcommand too.
    let after = ["vkey", "list", "-o", "json", "--server", url];
    let list: Value = serde_json::from_str(&stdout_of(
        run_exe(LLMCTL, &[("LLMCTL_SERVER", NOWHERE)], &after).await,
        &after,
    ))
    .unwrap();
    assert_eq!(list[0]["name"], "Marker");

    // In `connection add`, `--endpoint` stays the provider's URL, whichever way the control
    // plane is named.
    let add = |name: &'static str| openai_connection(name, "https://api.openai.com");
    let cases: [(Env, Vec<&str>); 4] = [
        (&[("LLMCTL_SERVER", url)], add("ViaEnv")),
        (&[("LLMCTL_ENDPOINT", url)], add("ViaOldEnv")),
        (
            &[],
            [&["--server", url][..], &add("ViaServerFirst")].concat(),
        ),
        (
            &[],
            [&["--endpoint", url][..], &add("ViaEndpointFirst")].concat(),
        ),
    ];
    for (env, args) in &cases {
        let args = [&["-o", "json"][..], args].concat();
        let out = stdout_of(run_exe(LLMCTL, env, &args).await, &args);
        let created: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(created["endpoint"], "https://api.openai.com", "{args:?}");
    }
    let inside = [add("ViaServerInside"), vec!["--server", url, "-o", "json"]].concat();
    let out = stdout_of(run_exe(LLMCTL, &[], &inside).await, &inside);
    let created: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["endpoint"], "https://api.openai.com");
    assert_eq!(
        ctl.json(&["connection", "list"])
            .await
            .as_array()
            .unwrap()
            .len(),
        5
    );
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn llm_proxy_is_llmctl_under_the_seed_guide_name() {
    let cp = control_plane(None).await;
    let ctl = Ctl::new(&cp, None);
    let env = [("LLMCTL_SERVER", ctl.server.as_str())];

    let add = openai_connection("OpenAI-Main", "https://api.openai.com");
    let out = stdout_of(run_exe(LLM_PROXY, &env, &add).await, &add);
    assert!(
        out.starts_with("created connection conn-") && out.contains("(OpenAI-Main)"),
        "{out}"
    );
    let list = ["connection", "list"];
    let table = stdout_of(run_exe(LLM_PROXY, &env, &list).await, &list);
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|row| row.contains("OpenAI-Main")),
        "{table}"
    );
    // The same data through llmctl.
    assert_eq!(
        ctl.json(&["connection", "get", "OpenAI-Main"]).await["endpoint"],
        "https://api.openai.com"
    );
    let get = ["connection", "get", "nope"];
    assert_eq!(
        error_line_of(run_exe(LLM_PROXY, &env, &get).await, 1, &get),
        "error: connection \"nope\" not found"
    );

    // Help shows the name it was invoked as.
    let help = ["serve", "--help"];
    let text = stdout_of(run_exe(LLM_PROXY, &[], &help).await, &help);
    assert!(
        text.lines()
            .any(|l| l.starts_with("Usage: llm-proxy serve ")),
        "{text}"
    );
    cp.shutdown().await;
}

/// A stored usage row (seeded through the store, as a data plane's batch would be).
fn usage_row(vkey: &str, alias: &str, hour: i64, requests: i64, cost_pico_usd: i64) -> UsageRow {
    UsageRow {
        vkey_id: format!("vkey-{vkey}"),
        assignment_id: format!("asg-{vkey}-{alias}"),
        hour,
        vkey_name: vkey.to_owned(),
        model_id: "model-gpt".to_owned(),
        model_name: "gpt-4o".to_owned(),
        alias: alias.to_owned(),
        requests,
        input_tokens: 1000 * requests,
        output_tokens: 100 * requests,
        cache_read_tokens: 10 * requests,
        cache_write_tokens: 0,
        reasoning_tokens: requests,
        cost_pico_usd,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_sums_in_table_json_and_csv() {
    let cp = control_plane(None).await;
    let ctl = Ctl::new(&cp, None);
    // 2026-12-01T00:00:00Z and the hours after it.
    let day = 1_796_083_200;
    let rows = vec![
        usage_row("Frontend", "gpt", day, 2, 1_500_000),
        usage_row("Frontend", "gpt", day + 3600, 3, 2_000_000),
        usage_row("Backend", "mini", day + 86_400, 5, 499_999),
    ];
    let batch = UsageBatch {
        node_id: "dp-1".into(),
        boot_id: "boot".into(),
        sequence: 1,
        rows,
    };
    assert!(cp.store.report_usage(&batch).await.unwrap());

    // Totals: 3.999999 micro-USD rounds half up to 4.
    let totals = ctl.json(&["usage"]).await;
    assert_eq!(
        totals,
        serde_json::json!([{
            "requests": 10, "input_tokens": 10_000, "output_tokens": 1000,
            "cache_read_tokens": 100, "cache_write_tokens": 0, "reasoning_tokens": 10,
            "cost_micro_usd": 4, "cost_usd": "0.000004"
        }])
    );
    let by_key_day = ctl
        .json(&["usage", "--group-by", "vkey", "--group-by", "day"])
        .await;
    let got: Vec<(String, String, String, i64, i64)> = by_key_day
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["vkey_id"].as_str().unwrap().to_owned(),
                r["vkey_name"].as_str().unwrap().to_owned(),
                r["day"].as_str().unwrap().to_owned(),
                r["requests"].as_i64().unwrap(),
                r["cost_micro_usd"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "vkey-Backend".into(),
                "Backend".into(),
                "2026-12-02".into(),
                5,
                0
            ),
            (
                "vkey-Frontend".into(),
                "Frontend".into(),
                "2026-12-01".into(),
                5,
                4
            ),
        ]
    );
    // Filters and time bounds: a date, RFC 3339 (rounded down to its hour), a span from now.
    let hours = ctl
        .json(&[
            "usage",
            "--vkey",
            "Frontend",
            "--since",
            "2026-12-01T01:59:00Z",
            "--until",
            "2026-12-02",
            "--group-by",
            "hour,alias",
        ])
        .await;
    assert_eq!(hours.as_array().unwrap().len(), 1, "{hours}");
    assert_eq!(hours[0]["hour"], "2026-12-01T01:00:00Z");
    assert_eq!(hours[0]["alias"], "gpt");
    assert_eq!(hours[0]["requests"], 3);
    let recent = ctl.json(&["usage", "--since", "24h"]).await;
    assert_eq!(recent[0]["requests"], 0);

    let csv = ctl
        .ok(&[
            "-o",
            "csv",
            "usage",
            "--model",
            "gpt-4o",
            "--group-by",
            "alias",
        ])
        .await;
    assert_eq!(
        csv,
        "alias,requests,input_tokens,output_tokens,cache_read_tokens,cache_write_tokens,reasoning_tokens,cost_micro_usd,cost_usd\n\
         gpt,5,5000,500,50,0,5,4,0.000004\n\
         mini,5,5000,500,50,0,5,0,0.000000\n"
    );
    let table = ctl.ok(&["usage", "--group-by", "alias"]).await;
    assert!(table.starts_with("ALIAS"), "{table}");
    assert!(table.contains("0.000004"), "{table}");

    let err = ctl.usage_error(&["usage", "--since", "yesterday"]).await;
    assert!(
        err.contains("--since") && err.contains("yesterday"),
        "{err}"
    );
    let err = ctl.usage_error(&["usage", "--group-by", "week"]).await;
    assert!(err.contains("week"), "{err}");
    let err = ctl.fails(&["-o", "csv", "vkey", "list"]).await;
    assert!(err.contains("-o csv"), "{err}");
    cp.shutdown().await;
}
