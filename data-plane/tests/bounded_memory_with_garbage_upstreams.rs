//! The real data plane binary against an upstream sending oversized answers (DESIGN §19): a 200
//! MB body declared in `Content-Length`, the same undeclared, and a 50 MB SSE line. Each is
//! refused (a 502, or a final error event), the process's peak resident memory (`VmHWM`) stays
//! within its caps plus slack, far below what it was sent, and the next request is served.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::DataPlaneProcess;
use llm_proxy_mock_upstream::MockUpstream;
use llm_proxy_mock_upstream::openai::OPENAI_KEY;
use std::net::SocketAddr;
use std::time::Duration;

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

/// The OpenAI-format mock upstream: the garbage of DESIGN §19 for its trigger words
/// (`DECLARE200MB`, `UNDECLARED200MB`, `LINE50MB`), a normal chat completion otherwise.
/// The mock's base URL (`http://127.0.0.1:<port>`).
async fn mock_upstream() -> String {
    MockUpstream::start().await.unwrap().base
}

async fn spawn_data_plane(cp: SocketAddr) -> DataPlaneProcess {
    let cap = CAP.to_string();
    let caps = [
        "--max-upstream-body-bytes",
        &cap,
        "--max-stream-event-bytes",
        &cap,
    ];
    DataPlaneProcess::start(cp, "dp-bounded-memory", &caps).await
}

fn chat(content: &str, stream: bool) -> String {
    serde_json::json!({"model": "m", "stream": stream, "messages": [{"role": "user", "content": content}]})
        .to_string()
}

/// Posts a chat request and reads the whole answer within [`WITHIN_SECONDS`].
async fn ask(
    http: &reqwest::Client,
    dp: &DataPlaneProcess,
    content: &str,
    stream: bool,
) -> (u16, String) {
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

async fn assert_served(http: &reqwest::Client, dp: &DataPlaneProcess) {
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
        &upstream,
        [("Mock", OPENAI_KEY.to_owned(), common::options(&[]))],
    )
    .await;
    common::add_models_for_key(&cp.store, "Memory", KEY, &[("Mock", "m", "m")]).await;
    let dp = spawn_data_plane(cp.grpc_addr).await;
    let http = reqwest::Client::new();
    dp.wait_serving(&http, KEY, "m").await;
    // Warm: pools, buffers and lazily built state exist before the baseline.
    for _ in 0..3 {
        assert_served(&http, &dp).await;
    }
    dp.reset_peak();
    let before = usize::try_from(dp.memory_kib("VmRSS") * 1024).unwrap();

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

    let peak = usize::try_from(dp.memory_kib("VmHWM") * 1024).unwrap();
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
