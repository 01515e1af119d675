//! SIGTERM handling (`--shutdown-delay-s`): while draining, the data plane keeps answering but
//! `/readyz` says 503 (load balancers move away) and every response carries `Connection: close`
//! (kept-alive client connections end after their current request instead of being cut).
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(
    clippy::disallowed_methods,
    reason = "test tasks end with the test's runtime"
)]

use llm_proxy_data_plane::gateway::{self, GatewaySettings};
use llm_proxy_data_plane::sync::SyncSettings;
use std::time::Duration;

#[tokio::test]
async fn draining_turns_readiness_off_and_closes_kept_alive_connections() {
    let dp = gateway::start(GatewaySettings {
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        // No control plane: draining does not depend on the config.
        ..GatewaySettings::on_loopback(SyncSettings::plaintext("http://127.0.0.1:1", "dp-drain"))
    })
    .await
    .unwrap();
    let api = format!("http://{}/v1/models", dp.addr);
    let readyz = format!("http://{}/readyz", dp.metrics_addr.unwrap());
    let http = reqwest::Client::new();

    let before = http.get(&api).bearer_auth("vk-x").send().await.unwrap();
    assert!(before.headers().get("connection").is_none());

    // A delay far longer than the test: the drain phase is observed, then the task is dropped.
    let draining = tokio::spawn(dp.drain_then_shutdown(Duration::from_secs(3600), Duration::ZERO));
    // Without a config /readyz is 503 anyway: wait for the draining answer itself.
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let answer = http.get(&readyz).send().await.unwrap();
            let status = answer.status();
            if answer.text().await.unwrap() == "draining" {
                assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE);
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("/readyz never reported the drain");

    // Still serving, but asking clients to close the connection.
    let during = http.get(&api).bearer_auth("vk-x").send().await.unwrap();
    assert_eq!(
        during
            .headers()
            .get("connection")
            .map(|v| v.to_str().unwrap()),
        Some("close")
    );
    draining.abort();
}
