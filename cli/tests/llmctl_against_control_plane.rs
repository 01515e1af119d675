//! The real `llmctl` binary against a real control plane on Postgres: the README's provider setup
//! (DESIGN §4), list/get/update/delete, JSON output and one-line errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
use llm_proxy_control_plane::crypto::MasterKeys;
use llm_proxy_control_plane::server::{self, RunningControlPlane, ServerSettings};
use secrecy::SecretString;
use serde_json::Value;
use std::process::Output;

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

struct Ctl {
    endpoint: String,
    token: Option<String>,
}

impl Ctl {
    async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_llmctl"));
        cmd.env("LLMCTL_ENDPOINT", &self.endpoint)
            .env_remove("LLMCTL_TOKEN")
            .args(args);
        if let Some(token) = &self.token {
            cmd.env("LLMCTL_TOKEN", token);
        }
        cmd.output().await.unwrap()
    }

    /// Runs a command that must succeed; returns stdout.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        let stdout = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(out.status.success(), "llmctl {args:?} failed: {stderr}");
        stdout
    }

    async fn json(&self, args: &[&str]) -> Value {
        let mut full = vec!["-o", "json"];
        full.extend_from_slice(args);
        let stdout = self.ok(&full).await;
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
    }

    /// Runs a command that must fail; returns its single stderr line.
    async fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(!out.status.success(), "llmctl {args:?} should fail");
        let stderr = String::from_utf8(out.stderr).unwrap();
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line on stderr, got {stderr:?}");
        assert!(lines[0].starts_with("error"), "{stderr}");
        assert!(!stderr.contains("Status {"), "no debug dump: {stderr}");
        lines[0].to_owned()
    }
}

fn id_of(value: &Value) -> String {
    value["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_provider_setup_and_crud_through_llmctl() {
    let cp = control_plane(None).await;
    let ctl = Ctl {
        endpoint: format!("http://{}", cp.grpc_addr),
        token: None,
    };

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

    ctl.ok(&["unassign", &id_of(&asg)]).await;
    let gone = ctl.fails(&["assignment", "get", &id_of(&asg)]).await;
    assert!(gone.contains("not found"), "{gone}");

    // Referenced rows need --force.
    let refused = ctl.fails(&["connection", "delete", "Azure-East"]).await;
    assert!(refused.contains("--force"), "{refused}");
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

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_prints_one_line_and_exits_non_zero() {
    let cp = control_plane(Some("admin-secret-token")).await;
    let ctl = Ctl {
        endpoint: format!("http://{}", cp.grpc_addr),
        token: Some("admin-secret-token".into()),
    };
    ctl.ok(&[
        "connection",
        "add",
        "--name",
        "OpenAI",
        "--provider",
        "openai",
        "--endpoint",
        "https://api.openai.com",
        "--api-key",
        "sk-x",
    ])
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

    let cases: [(&[&str], &str); 7] = [
        (
            &[
                "connection",
                "add",
                "--name",
                "X",
                "--provider",
                "anthropic",
                "--endpoint",
                "https://x.com",
                "--api-key",
                "k",
            ],
            "provider",
        ),
        (
            &[
                "connection",
                "add",
                "--name",
                "X",
                "--provider",
                "openai",
                "--endpoint",
                "not-a-url",
                "--api-key",
                "k",
            ],
            "endpoint",
        ),
        (
            &[
                "connection",
                "add",
                "--name",
                "OpenAI",
                "--provider",
                "openai",
                "--endpoint",
                "https://x.com",
                "--api-key",
                "k",
            ],
            "OpenAI",
        ),
        (
            &[
                "model",
                "add",
                "--conn-id",
                "missing-conn",
                "--name",
                "m",
                "--remote",
                "r",
            ],
            "missing-conn",
        ),
        (
            &[
                "assign",
                "--vkey-id",
                "App",
                "--model-id",
                "gpt-4",
                "--tps",
                "0",
            ],
            "tps",
        ),
        (
            &[
                "assign",
                "--vkey-id",
                "App",
                "--model-id",
                "gpt-4",
                "--tps",
                "5",
                "--burst",
                "-1",
            ],
            "burst",
        ),
        (
            &[
                "assign",
                "--vkey-id",
                "App",
                "--model-id",
                "gpt-4",
                "--tpm",
                "0",
            ],
            "tpm",
        ),
    ];
    for (args, field) in cases {
        let line = ctl.fails(args).await;
        assert!(line.contains(field), "{args:?}: {line}");
    }

    // A stored credential never follows its connection to another host.
    let new_host = ["connection", "update", "OpenAI", "--endpoint"];
    let line = ctl
        .fails(&[&new_host[..], &["https://collector.example.net"]].concat())
        .await;
    assert!(
        line.contains("--endpoint") && line.contains("--api-key"),
        "{line}"
    );
    let moved = ctl
        .json(
            &[
                &new_host[..],
                &["https://gateway.example.net", "--api-key", "sk-new"],
            ]
            .concat(),
        )
        .await;
    assert_eq!(moved["endpoint"], "https://gateway.example.net");

    // Plaintext to a control plane that is not on loopback needs --allow-plaintext.
    let remote = Ctl {
        endpoint: "http://192.0.2.1:8131".into(),
        token: None,
    };
    let line = remote.fails(&["vkey", "list"]).await;
    assert!(
        line.contains("refusing plaintext") && line.contains("--allow-plaintext"),
        "{line}"
    );

    let unauthenticated = Ctl {
        endpoint: ctl.endpoint.clone(),
        token: Some("wrong-token".into()),
    };
    let line = unauthenticated.fails(&["connection", "list"]).await;
    assert!(line.contains("unauthenticated"), "{line}");
    assert!(!line.contains("wrong-token") && !line.contains("admin-secret-token"));

    let unreachable = Ctl {
        endpoint: "http://127.0.0.1:9".into(),
        token: None,
    };
    let line = unreachable.fails(&["vkey", "list"]).await;
    assert!(line.contains("127.0.0.1:9"), "{line}");
    cp.shutdown().await;
}
