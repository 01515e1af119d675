//! The real data plane binary against an upstream sending oversized answers (DESIGN §19): a 200
//! MB body declared in `Content-Length`, the same undeclared, and a 50 MB SSE line. Each is
//! refused (a 502, or a final error event), the process's peak resident memory (`VmHWM`) stays
//! within its caps plus slack, far below what it was sent, and the next request is served.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::body::{Body, Bytes};
use axum::response::Response;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::time::Instant;

const KEY: &str = "vk-bounded-memory-1234";
const MIB: usize = 1024 * 1024;
/// The caps the data plane runs with (`--max-upstream-body-bytes`, `--max-stream-event-bytes`).
const CAP: usize = MIB;
/// Peak growth allowed over the resident size before the garbage: the caps (a cap-sized buffer
/// may double once while it grows) plus allocator and socket-buffer slack. Buffering the 50 MB
/// line or the 200 MB body would exceed it several times over.
const GROWTH_BOUND: usize = 4 * CAP + 12 * MIB;
/// Bound on each answer: they take milliseconds; seconds would mean a stall.
const WITHIN_SECONDS: Duration = Duration::from_secs(10);

/// An OpenAI-format upstream: garbage for the trigger words, a normal chat completion otherwise.
async fn mock_upstream() -> SocketAddr {
    async fn answer(body: Bytes) -> Response {
        let text = String::from_utf8_lossy(&body);
        let produced = Arc::new(AtomicUsize::new(0));
        let (content_type, body, declared) = if text.contains("DECLARE200MB") {
            let body = common::lazy_body(b"{\"id\":\"", b'a', 200 * MIB, produced);
            ("application/json", body, Some(200 * MIB))
        } else if text.contains("UNDECLARED200MB") {
            let body = common::lazy_body(b"{\"id\":\"", b'a', 200 * MIB, produced);
            ("application/json", body, None)
        } else if text.contains("LINE50MB") {
            let body = common::lazy_body(b"data: {\"id\":\"", b'a', 50 * MIB, produced);
            ("text/event-stream", body, None)
        } else {
            let answer = common::chat_completion("m").to_string();
            ("application/json", Body::from(answer), None)
        };
        let mut response = Response::new(body);
        let headers = response.headers_mut();
        headers.insert("content-type", content_type.parse().unwrap());
        if let Some(length) = declared {
            headers.insert("content-length", length.into());
        }
        response
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, axum::Router::new().fallback(answer))
            .await
            .unwrap()
    });
    addr
}

struct DataPlane {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl DataPlane {
    fn pid(&self) -> u32 {
        self.child.id().expect("the data plane is running")
    }

    /// A `kB` field of `/proc/<pid>/status`, in bytes.
    fn status_bytes(&self, field: &str) -> usize {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in /proc/<pid>/status"));
        let kb: usize = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }

    /// Resets the process's peak resident size (`VmHWM`) to its current one.
    fn reset_peak(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5").unwrap();
    }
}

async fn spawn_data_plane(cp: SocketAddr) -> DataPlane {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-proxy-data-plane"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--control-plane", &format!("http://{cp}")])
        .args(["--node-id", "dp-bounded-memory"])
        .args(["--max-upstream-body-bytes", &CAP.to_string()])
        .args(["--max-stream-event-bytes", &CAP.to_string()])
        .env_remove("REDIS_URL")
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(common::PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            // "llm-proxy data plane listening on ADDR (metrics on ADDR)"
            if let Some(rest) = line.strip_prefix("llm-proxy data plane listening on ") {
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        }
        panic!("data plane exited before listening");
    })
    .await
    .expect("data plane did not start");
    // Keep draining stderr so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    DataPlane { child, addr }
}

fn chat(content: &str, stream: bool) -> String {
    serde_json::json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": content}]})
        .to_string()
}

/// Posts a chat request and reads the whole answer within [`WITHIN_SECONDS`].
async fn ask(http: &reqwest::Client, dp: &DataPlane, content: &str, stream: bool) -> (u16, String) {
    tokio::time::timeout(WITHIN_SECONDS, async {
        let response = http
            .post(format!("http://{}/v1/chat/completions", dp.addr))
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(chat(content, stream))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    })
    .await
    .unwrap_or_else(|_| panic!("no whole answer to {content} within {WITHIN_SECONDS:?}"))
}

async fn assert_served(http: &reqwest::Client, dp: &DataPlane) {
    let (status, body) = ask(http, dp, "hello", false).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_upstream_answers_leave_the_data_planes_memory_bounded() {
    let upstream = mock_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let (cp, _) = common::start_control_plane(dir.path()).await;
    common::add_connections(
        &cp.store,
        "openai",
        &format!("http://{upstream}"),
        [("Mock", "sk-mock".to_owned(), common::options(&[]))],
    )
    .await;
    common::add_models_for_key(&cp.store, "Memory", KEY, &[("Mock", "m", "m")]).await;
    let dp = spawn_data_plane(cp.grpc_addr).await;
    let http = reqwest::Client::new();
    // Ready once the snapshot is applied: the alias is served.
    let deadline = Instant::now() + common::PATIENCE;
    loop {
        let models = http
            .get(format!("http://{}/v1/models", dp.addr))
            .bearer_auth(KEY)
            .send()
            .await;
        if let Ok(r) = models
            && r.status() == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the data plane never got its config"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Warm: pools, buffers and lazily built state exist before the baseline.
    for _ in 0..3 {
        assert_served(&http, &dp).await;
    }
    dp.reset_peak();
    let before = dp.status_bytes("VmRSS");

    for _ in 0..3 {
        let (status, body) = ask(&http, &dp, "DECLARE200MB", false).await;
        assert_eq!(status, 502, "{body}");
        assert!(body.contains("upstream_invalid_response"), "{body}");
        assert_served(&http, &dp).await;

        let (status, body) = ask(&http, &dp, "UNDECLARED200MB", false).await;
        assert_eq!(status, 502, "{body}");
        assert!(body.contains("--max-upstream-body-bytes"), "{body}");
        assert_served(&http, &dp).await;

        let (status, text) = ask(&http, &dp, "LINE50MB", true).await;
        assert_eq!(status, 200, "an OpenAI stream is relayed from its head");
        let last = common::sse_data(&text).pop().unwrap();
        assert!(last.contains("upstream_invalid_response"), "{text}");
        assert!(last.contains("--max-stream-event-bytes"), "{text}");
        assert_served(&http, &dp).await;
    }

    let peak = dp.status_bytes("VmHWM");
    let growth = peak.saturating_sub(before);
    assert!(
        growth < GROWTH_BOUND,
        "peak resident size grew by {} MiB (from {} MiB to {} MiB); bound {} MiB",
        growth / MIB,
        before / MIB,
        peak / MIB,
        GROWTH_BOUND / MIB
    );
}
