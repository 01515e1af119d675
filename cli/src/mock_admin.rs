//! Test-only: an in-process `AdminService` that checks the bearer token and answers a few calls,
//! to drive `llmctl` end to end (flags → interceptor → gRPC → error line or rendered output).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};

use llm_proxy_proto::Timestamp;
use llm_proxy_proto::v1::admin_service_server::{AdminService, AdminServiceServer};
use llm_proxy_proto::v1::*;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::args::Cli;
use crate::client::Admin;
use crate::commands;

const TOKEN: &str = "s3cret";
const CREATED: Timestamp = Timestamp {
    seconds: 1_795_687_200,
    nanos: 0,
};

#[derive(Clone, Default)]
struct Mock {
    last_connection: Arc<Mutex<Option<CreateConnectionRequest>>>,
}

fn authorize<T>(request: &Request<T>) -> Result<(), Status> {
    let header = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if header == Some(&format!("Bearer {TOKEN}")) {
        Ok(())
    } else {
        Err(Status::unauthenticated("missing or wrong admin token"))
    }
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in the mock"))
}

#[tonic::async_trait]
impl AdminService for Mock {
    async fn create_connection(
        &self,
        request: Request<CreateConnectionRequest>,
    ) -> Result<Response<Connection>, Status> {
        authorize(&request)?;
        let request = request.into_inner();
        let reply = Connection {
            id: "conn-1".to_owned(),
            name: request.name.clone(),
            provider: request.provider.clone(),
            endpoint: request.endpoint.clone(),
            options: request.options.clone(),
            created_at: Some(CREATED),
            updated_at: Some(CREATED),
        };
        *self.last_connection.lock().unwrap() = Some(request);
        Ok(Response::new(reply))
    }
    async fn get_connection(
        &self,
        request: Request<GetRequest>,
    ) -> Result<Response<Connection>, Status> {
        authorize(&request)?;
        Err(Status::not_found(format!(
            "no connection with ID or name `{}`",
            request.get_ref().id
        )))
    }
    async fn list_connections(
        &self,
        request: Request<ListConnectionsRequest>,
    ) -> Result<Response<ListConnectionsResponse>, Status> {
        authorize(&request)?;
        Ok(Response::new(ListConnectionsResponse::default()))
    }
    async fn update_connection(
        &self,
        _: Request<UpdateConnectionRequest>,
    ) -> Result<Response<Connection>, Status> {
        unimplemented()
    }
    async fn delete_connection(
        &self,
        _: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        unimplemented()
    }
    async fn create_provider_model(
        &self,
        _: Request<CreateProviderModelRequest>,
    ) -> Result<Response<ProviderModel>, Status> {
        unimplemented()
    }
    async fn get_provider_model(
        &self,
        _: Request<GetRequest>,
    ) -> Result<Response<ProviderModel>, Status> {
        unimplemented()
    }
    async fn list_provider_models(
        &self,
        _: Request<ListProviderModelsRequest>,
    ) -> Result<Response<ListProviderModelsResponse>, Status> {
        unimplemented()
    }
    async fn update_provider_model(
        &self,
        _: Request<UpdateProviderModelRequest>,
    ) -> Result<Response<ProviderModel>, Status> {
        unimplemented()
    }
    async fn delete_provider_model(
        &self,
        _: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        unimplemented()
    }
    async fn create_virtual_key(
        &self,
        request: Request<CreateVirtualKeyRequest>,
    ) -> Result<Response<CreateVirtualKeyResponse>, Status> {
        authorize(&request)?;
        let request = request.into_inner();
        Ok(Response::new(CreateVirtualKeyResponse {
            virtual_key: Some(VirtualKey {
                id: "vkey-1".to_owned(),
                name: request.name,
                key_hint: "vk-ge…1234".to_owned(),
                enabled: true,
                expires_at: request.expires_at,
                created_at: Some(CREATED),
                updated_at: Some(CREATED),
            }),
            generated_key: request
                .key
                .is_none()
                .then(|| "vk-generated-1234".to_owned()),
        }))
    }
    async fn get_virtual_key(
        &self,
        _: Request<GetRequest>,
    ) -> Result<Response<VirtualKey>, Status> {
        unimplemented()
    }
    async fn list_virtual_keys(
        &self,
        request: Request<ListVirtualKeysRequest>,
    ) -> Result<Response<ListVirtualKeysResponse>, Status> {
        authorize(&request)?;
        Ok(Response::new(ListVirtualKeysResponse::default()))
    }
    async fn update_virtual_key(
        &self,
        _: Request<UpdateVirtualKeyRequest>,
    ) -> Result<Response<VirtualKey>, Status> {
        unimplemented()
    }
    async fn delete_virtual_key(
        &self,
        _: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        unimplemented()
    }
    async fn create_assignment(
        &self,
        request: Request<CreateAssignmentRequest>,
    ) -> Result<Response<Assignment>, Status> {
        authorize(&request)?;
        let request = request.into_inner();
        if let Some(tps) = request.tps.filter(|tps| *tps <= 0) {
            return Err(Status::invalid_argument(format!(
                "tps must be a positive integer, got {tps}"
            )));
        }
        unimplemented()
    }
    async fn get_assignment(&self, _: Request<GetRequest>) -> Result<Response<Assignment>, Status> {
        unimplemented()
    }
    async fn list_assignments(
        &self,
        _: Request<ListAssignmentsRequest>,
    ) -> Result<Response<ListAssignmentsResponse>, Status> {
        unimplemented()
    }
    async fn update_assignment(
        &self,
        _: Request<UpdateAssignmentRequest>,
    ) -> Result<Response<Assignment>, Status> {
        unimplemented()
    }
    async fn delete_assignment(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        authorize(&request)?;
        Ok(Response::new(DeleteResponse {
            id: "asg-1".to_owned(),
            version: 7,
        }))
    }
    async fn list_data_planes(
        &self,
        request: Request<ListDataPlanesRequest>,
    ) -> Result<Response<ListDataPlanesResponse>, Status> {
        authorize(&request)?;
        Ok(Response::new(ListDataPlanesResponse {
            data_planes: vec![DataPlane {
                node_id: "dp-1".to_owned(),
                applied_version: 7,
                last_seen: Some(CREATED),
                connected: true,
                build: "0.1.0".to_owned(),
                error: String::new(),
            }],
        }))
    }
}

/// Starts the mock on a free loopback port; returns its endpoint.
async fn start() -> (String, Mock) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let mock = Mock::default();
    let service = AdminServiceServer::new(mock.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (endpoint, mock)
}

/// Runs `llmctl ARGS...` against `endpoint`: Ok(stdout) or Err(the `error:` line's text).
async fn llmctl(endpoint: &str, args: &[&str]) -> Result<String, String> {
    let argv = ["llmctl", "--endpoint", endpoint]
        .into_iter()
        .chain(args.iter().copied());
    let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
    let result = async {
        let mut admin = Admin::new(
            &cli.endpoint,
            cli.token.as_deref(),
            Default::default(),
            cli.allow_plaintext,
        )?;
        commands::execute(&mut admin, cli.output, cli.command).await
    }
    .await;
    result.map_err(|err| format!("{err:#}"))
}

use clap::Parser as _;

#[tokio::test]
async fn token_is_sent_and_missing_token_is_explained() {
    let (endpoint, _) = start().await;
    let out = llmctl(&endpoint, &["vkey", "list", "--token", TOKEN])
        .await
        .unwrap();
    assert_eq!(
        out.lines().next(),
        Some("ID  NAME  KEY_HINT  ENABLED  EXPIRES_AT  CREATED_AT")
    );

    let err = llmctl(&endpoint, &["vkey", "list", "--token", "wrong"])
        .await
        .unwrap_err();
    assert_eq!(err, "unauthenticated: missing or wrong admin token");

    let err = llmctl(&endpoint, &["vkey", "list"]).await.unwrap_err();
    assert!(
        err.starts_with("unauthenticated: missing or wrong admin token (no admin token given"),
        "{err}"
    );
}

#[tokio::test]
async fn server_errors_become_one_readable_line() {
    let (endpoint, _) = start().await;
    let err = llmctl(
        &endpoint,
        &[
            "--token",
            TOKEN,
            "assign",
            "--vkey-id",
            "v",
            "--model-id",
            "m",
            "--tps",
            "0",
        ],
    )
    .await
    .unwrap_err();
    assert_eq!(
        err,
        "invalid argument: tps must be a positive integer, got 0"
    );

    let err = llmctl(&endpoint, &["connection", "get", "nope", "--token", TOKEN])
        .await
        .unwrap_err();
    assert_eq!(err, "not found: no connection with ID or name `nope`");
}

#[tokio::test]
async fn connection_add_sends_the_file_credential_and_never_prints_it() {
    let (endpoint, mock) = start().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key.txt");
    std::fs::write(&key_file, "sk-from-file\n").unwrap();
    let out = llmctl(
        &endpoint,
        &[
            "connection",
            "add",
            "--name",
            "OpenAI-Main",
            "--provider",
            "openai",
            "--endpoint",
            "https://api.openai.com",
            "--api-key-file",
            key_file.to_str().unwrap(),
            "--set",
            "timeout_s=30",
            "--token",
            TOKEN,
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        out.lines().next(),
        Some("created connection conn-1 (OpenAI-Main)")
    );
    assert!(!out.contains("sk-from-file"));
    let sent = mock.last_connection.lock().unwrap().take().unwrap();
    assert_eq!(sent.credential, "sk-from-file");
    assert_eq!(sent.endpoint, "https://api.openai.com");
    assert_eq!(sent.provider, "openai");
    assert_eq!(
        sent.options.get("timeout_s").map(String::as_str),
        Some("30")
    );
}

#[tokio::test]
async fn json_output_of_add_list_and_delete() {
    let (endpoint, _) = start().await;
    let out = llmctl(
        &endpoint,
        &[
            "vkey",
            "add",
            "--name",
            "Frontend-App",
            "-o",
            "json",
            "--token",
            TOKEN,
        ],
    )
    .await
    .unwrap();
    let value: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(value["id"], "vkey-1");
    assert_eq!(value["key"], "vk-generated-1234");
    assert!(value["expires_at"].is_null());

    let out = llmctl(
        &endpoint,
        &[
            "-o",
            "json",
            "--token",
            TOKEN,
            "vkey",
            "add",
            "--name",
            "Chosen",
            "--key",
            "vk-chosen-secret",
            "--expires-at",
            "2026-12-31T23:59:59Z",
        ],
    )
    .await
    .unwrap();
    assert!(!out.contains("vk-chosen-secret"));
    let value: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(value.get("key").is_none());
    assert_eq!(value["expires_at"], "2026-12-31T23:59:59Z");

    let out = llmctl(&endpoint, &["dataplanes", "-o", "json", "--token", TOKEN])
        .await
        .unwrap();
    let value: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(value[0]["node_id"], "dp-1");
    assert_eq!(value[0]["applied_version"], 7);

    let out = llmctl(
        &endpoint,
        &["unassign", "gpt-4", "-o", "json", "--token", TOKEN],
    )
    .await
    .unwrap();
    let value: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(value, serde_json::json!({"id": "asg-1", "deleted": true}));
}

#[tokio::test]
async fn unreachable_control_plane_is_explained() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let err = llmctl(&endpoint, &["vkey", "list"]).await.unwrap_err();
    assert!(
        err.starts_with(&format!("cannot reach the control plane at {endpoint}: ")),
        "{err}"
    );
}

#[tokio::test]
async fn connection_update_of_the_endpoint_needs_the_credential_again() {
    let (endpoint, _) = start().await;
    let update = ["connection", "update", "OpenAI", "--token", TOKEN];
    let new_endpoint = ["--endpoint", "https://collector.example.net"];
    let args: Vec<&str> = update.iter().chain(&new_endpoint).copied().collect();
    let err = llmctl(&endpoint, &args).await.unwrap_err();
    assert!(
        err.starts_with("--endpoint needs the credential again") && err.contains("--api-key"),
        "{err}"
    );
    // With the credential the call goes out (this mock does not implement updates).
    let with_key: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--api-key", "sk-new"])
        .collect();
    let err = llmctl(&endpoint, &with_key).await.unwrap_err();
    assert_eq!(err, "unimplemented: not in the mock");
    // Other fields need no credential.
    let rename: Vec<&str> = update
        .iter()
        .copied()
        .chain(["--name", "Renamed"])
        .collect();
    let err = llmctl(&endpoint, &rename).await.unwrap_err();
    assert_eq!(err, "unimplemented: not in the mock");
}

#[tokio::test]
async fn plaintext_to_a_remote_control_plane_is_refused_unless_allowed() {
    // Nothing listens there: the refusal must come before any connection attempt.
    let remote = "http://192.0.2.1:8131";
    let err = llmctl(remote, &["vkey", "list"]).await.unwrap_err();
    assert!(
        err.starts_with("refusing plaintext http:// to the control plane at 192.0.2.1")
            && err.contains("--allow-plaintext"),
        "{err}"
    );
    let err = llmctl(remote, &["vkey", "list", "--allow-plaintext"])
        .await
        .unwrap_err();
    assert!(err.starts_with("cannot reach the control plane"), "{err}");
}
