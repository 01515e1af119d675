//! The front door of the real `llm-proxy-data-plane` binary (DESIGN §19): the key is checked before
//! the body is read, slow clients are cut at their deadlines, load past `--max-in-flight` and
//! `--max-connections` is answered 503 `overloaded`, and HTTP/2 clients get the stream limit.
//! Config comes from an in-process control plane; the upstream is a mock that can hold requests.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::disallowed_methods,
    reason = "test tasks end with the test's runtime"
)]

mod common;

use common::{DataPlaneProcess, PATIENCE};
use llm_proxy_mock_upstream::MockUpstream;
use llm_proxy_mock_upstream::openai::OPENAI_KEY;
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const KEY: &str = "vk-front-door-0123456789";
const ALIAS: &str = "gpt-test";
const CHAT: &str = r#"{"model":"gpt-test","messages":[{"role":"user","content":"hi"}]}"#;

struct Setup {
    _dir: tempfile::TempDir,
    cp: llm_proxy_control_plane::server::RunningControlPlane,
    /// The mock upstream: it holds requests while its gate has no permit
    /// (`upstream.state.gate`); the requests that arrived are `upstream.requests()`.
    upstream: MockUpstream,
    http: reqwest::Client,
}

/// A control plane with one key assigned `gpt-test` on the mock upstream. Requests pass through at
/// once unless the test takes the upstream's permits away.
async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (cp, _) = common::start_control_plane(dir.path()).await;
    let upstream = MockUpstream::start().await.unwrap();
    common::add_connections(
        &cp.store,
        "openai",
        &upstream.base,
        [("Mock", OPENAI_KEY.to_owned(), common::options(&[]))],
    )
    .await;
    common::add_models_for_key(&cp.store, "App", KEY, &[("Mock", ALIAS, "gpt-test-remote")]).await;
    Setup {
        _dir: dir,
        cp,
        upstream,
        http: reqwest::Client::new(),
    }
}

async fn start_plane(setup: &Setup, args: &[&str]) -> DataPlaneProcess {
    let plane = DataPlaneProcess::start(setup.cp.grpc_addr, "dp-front-door", args).await;
    plane.wait_serving(&setup.http, KEY, ALIAS).await;
    plane
}

/// The first line and the rest of a raw HTTP/1.1 answer read until the server closes or `limit`.
async fn read_answer(stream: &mut TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if answer_complete(&out) {
                        break;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(limit, read_all).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A whole answer with a `content-length` body has arrived.
fn answer_complete(raw: &[u8]) -> bool {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
        })
        .is_some_and(|n| body.len() >= n)
}

/// Reads until the server closes the connection; the time that took.
async fn time_until_closed(stream: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the server never closed the connection");
    started.elapsed()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_uploads_get_401_at_once_and_their_bodies_are_not_buffered() {
    let setup = setup().await;
    // Default limits: a 32 MiB body is within --max-body-bytes.
    let plane = start_plane(&setup, &[]).await;
    let before_kib = plane.memory_kib("VmRSS");
    let declared: usize = 32 * 1024 * 1024;
    let mut uploads = Vec::new();
    for i in 0..20 {
        let addr = plane.addr;
        uploads.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut reader, mut writer) = stream.into_split();
            // Half send a wrong key, half none.
            let key = if i % 2 == 0 {
                "authorization: Bearer vk-not-a-key\r\n"
            } else {
                ""
            };
            let head = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: dp\r\ncontent-type: application/json\r\n{key}content-length: {declared}\r\n\r\n"
            );
            writer.write_all(head.as_bytes()).await.unwrap();
            // Upload the whole body while waiting for the answer, as clients do; the gateway
            // stops reading it, so the writes end in an error.
            let upload = tokio::spawn(async move {
                let chunk = vec![b' '; 1024 * 1024];
                for _ in 0..32 {
                    if writer.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(PATIENCE, reader.read_to_end(&mut answer)).await;
            upload.abort();
            String::from_utf8_lossy(&answer).into_owned()
        }));
    }
    for upload in uploads {
        let answer = upload.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer:?}");
        assert!(answer.contains("invalid_api_key"), "{answer}");
    }
    let grown_kib = plane.memory_kib("VmHWM").saturating_sub(before_kib);
    // Buffering the bodies would take 640 MiB; reading one socket buffer each is a few MiB.
    assert!(
        grown_kib < 32 * 1024,
        "data plane memory grew by {grown_kib} KiB for 20 refused uploads"
    );
    // The plane still serves.
    let ok = common::post_json(
        &setup.http,
        format!("http://{}/v1/chat/completions", plane.addr),
        KEY,
        CHAT,
    )
    .await;
    assert_eq!(ok.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_head_a_trickled_body_and_an_idle_connection_are_closed_at_their_deadlines() {
    let setup = setup().await;
    let plane = start_plane(
        &setup,
        &[
            "--header-read-timeout-s",
            "1",
            "--body-read-timeout-s",
            "1",
            "--idle-timeout-s",
            "3",
        ],
    )
    .await;
    let addr = plane.addr;

    // A head trickled a byte at a time never completes: cut at the head deadline.
    let stalled = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stalled.into_split();
    writer
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: dp\r\nx-slow: ")
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        while writer.write_all(b"x").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, reader.read_to_end(&mut answer))
        .await
        .expect("a trickled head was never cut")
        .ok();
    let cut_after = started.elapsed();
    trickle.abort();
    assert!(answer.is_empty(), "{:?}", String::from_utf8_lossy(&answer));
    assert!(
        cut_after >= Duration::from_millis(900),
        "head cut before its deadline: {cut_after:?}"
    );

    // A body trickled a byte at a time: 408 at the body deadline.
    let mut trickled = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: dp\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{"
    );
    trickled.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (mut reader, mut writer) = trickled.into_split();
    let body_trickle = tokio::spawn(async move {
        while writer.write_all(b" ").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, reader.read_to_end(&mut answer)).await;
    body_trickle.abort();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A kept-alive connection: open past the head deadline while idle, closed at the idle one.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    let request =
        format!("GET /v1/models HTTP/1.1\r\nhost: dp\r\nauthorization: Bearer {KEY}\r\n\r\n");
    idle.write_all(request.as_bytes()).await.unwrap();
    let answer = read_answer(&mut idle, PATIENCE).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let idle_for = time_until_closed(&mut idle).await;
    assert!(
        idle_for >= Duration::from_millis(2900),
        "idle connection closed before --idle-timeout-s: {idle_for:?}"
    );

    let text = plane.metrics_text(&setup.http).await;
    for phase in ["header", "body", "idle"] {
        let series = format!("llm_proxy_client_timeouts_total{{phase=\"{phase}\"}}");
        assert!(metric(&text, &series) >= 1.0, "{series} missing:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_in_flight_requests_get_503_overloaded_while_in_flight_ones_complete() {
    let setup = setup().await;
    let plane = start_plane(&setup, &["--max-in-flight", "3"]).await;
    let url = format!("http://{}/v1/chat/completions", plane.addr);
    // Hold every request at the upstream.
    setup.upstream.state.gate.forget_permits(usize::MAX);
    let held: Vec<_> = (0..3)
        .map(|_| {
            let (http, url) = (setup.http.clone(), url.clone());
            tokio::spawn(async move { common::post_json(&http, url, KEY, CHAT).await })
        })
        .collect();
    let deadline = Instant::now() + PATIENCE;
    while setup.upstream.requests().len() < 3 {
        assert!(Instant::now() < deadline, "held requests never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..2 {
        let shed = common::post_json(&setup.http, url.clone(), KEY, CHAT).await;
        assert_eq!(shed.status(), 503);
        assert_eq!(shed.headers()["retry-after"], "1");
        assert!(shed.headers().contains_key("x-request-id"));
        let body: Value = shed.json().await.unwrap();
        assert_eq!(body["error"]["code"], "overloaded", "{body}");
    }
    // On the Messages route, as Anthropic answers overload: 529 `overloaded_error`.
    let shed = setup
        .http
        .post(format!("http://{}/v1/messages?beta=true", plane.addr))
        .header("x-api-key", KEY)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(shed.status().as_u16(), 529);
    assert_eq!(shed.headers()["retry-after"], "1");
    let body: Value = shed.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "overloaded_error", "{body}");
    let text = plane.metrics_text(&setup.http).await;
    assert_eq!(metric(&text, "llm_proxy_in_flight_requests"), 3.0, "{text}");
    assert_eq!(
        metric(&text, "llm_proxy_load_shed_total{reason=\"in_flight\"}"),
        3.0
    );
    // The held ones complete, and their slots are free again.
    setup.upstream.state.gate.add_permits(1_000);
    for request in held {
        let response = request.await.unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["choices"][0]["message"]["content"], "Hello!");
    }
    let after = common::post_json(&setup.http, url, KEY, CHAT).await;
    assert_eq!(after.status(), 200);
    assert_eq!(setup.upstream.requests().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_max_connections_is_answered_503_and_closed() {
    let setup = setup().await;
    let plane = start_plane(&setup, &["--max-connections", "2"]).await;
    let text = plane.metrics_text(&setup.http).await;
    // `wait_serving`'s client may still hold kept-alive connections: start from none.
    drop(setup.http);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while metric(
        &plane.metrics_text(&http).await,
        "llm_proxy_open_connections",
    ) > 0.0
    {
        assert!(
            Instant::now() < deadline,
            "connections never closed:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Two connections in the middle of their heads fill the limit.
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(plane.addr).await.unwrap();
        stream
            .write_all(b"GET /v1/models HTTP/1.1\r\n")
            .await
            .unwrap();
        open.push(stream);
    }
    while metric(
        &plane.metrics_text(&http).await,
        "llm_proxy_open_connections",
    ) < 2.0
    {
        assert!(Instant::now() < deadline, "connections never counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut third = TcpStream::connect(plane.addr).await.unwrap();
    let answer = read_answer(&mut third, PATIENCE).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    assert!(answer.contains("\"overloaded\""), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"));
    // One leaves; a new client is served.
    drop(open.pop());
    while metric(
        &plane.metrics_text(&http).await,
        "llm_proxy_open_connections",
    ) > 1.0
    {
        assert!(Instant::now() < deadline, "closed connection still counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let served = common::post_json(
        &http,
        format!("http://{}/v1/chat/completions", plane.addr),
        KEY,
        CHAT,
    )
    .await;
    assert_eq!(served.status(), 200);
    let text = plane.metrics_text(&http).await;
    assert_eq!(
        metric(&text, "llm_proxy_load_shed_total{reason=\"connections\"}"),
        1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_told_the_stream_limit() {
    let setup = setup().await;
    let plane = start_plane(&setup, &["--http2-max-streams", "7"]).await;
    let tcp = TcpStream::connect(plane.addr).await.unwrap();
    let (mut client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let request = http::Request::get(format!("http://{}/v1/models", plane.addr))
        .header("authorization", format!("Bearer {KEY}"))
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let response = tokio::select! {
        response = response => response.unwrap(),
        _ = &mut connection => panic!("the connection ended before the answer"),
    };
    assert_eq!(response.status(), 200);
    assert_eq!(connection.max_concurrent_send_streams(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_with_80k_top_level_keys_is_refused_fast_while_other_requests_are_served() {
    let setup = setup().await;
    let plane = start_plane(&setup, &[]).await;
    let mut body = String::from(r#"{"model":"gpt-test""#);
    for i in 0..80_000 {
        body.push_str(&format!(r#","k{i}":0"#));
    }
    body.push('}');
    let url = format!("http://{}/v1/chat/completions", plane.addr);
    let started = Instant::now();
    let heavy: Vec<_> = (0..4)
        .map(|_| {
            let (http, url, body) = (setup.http.clone(), url.clone(), body.clone());
            tokio::spawn(async move { common::post_json(&http, url, KEY, &body).await })
        })
        .collect();
    // Meanwhile the process answers its health check and ordinary requests.
    let health = setup
        .http
        .get(format!("http://{}/healthz", plane.metrics))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ordinary = common::post_json(&setup.http, url.clone(), KEY, CHAT).await;
    assert_eq!(ordinary.status(), 200);
    for request in heavy {
        let refused = request.await.unwrap();
        assert_eq!(refused.status(), 400);
        let error: Value = refused.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains("--max-top-level-keys"), "{message}");
    }
    // A guard against the quadratic parse this replaced (~10 s of CPU per such body), not a
    // speed measurement: four bodies and two other requests within a few seconds.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
