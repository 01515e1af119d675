//! Process plumbing shared by the data plane binary and `llmctl serve`: the shutdown signal and
//! the supervisor of background tasks.

use crate::metrics::FrontDoorMetrics;
use futures_util::FutureExt as _;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Runs a background task for the life of the process (DESIGN §19): when it ends — a panic, or a
/// return it should never make — that is logged, counted in `llm_proxy_task_restarts_total{task}`,
/// and the task is started again after a backoff (1 s doubling to 30 s; back to 1 s once a run
/// lasted a minute). Aborting the returned handle stops the task too: it runs inside it.
#[allow(
    clippy::disallowed_methods,
    reason = "the handle goes to the caller, who aborts it to stop the task"
)]
pub fn supervise<F, Fut>(
    task: &'static str,
    metrics: FrontDoorMetrics,
    start: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut backoff = Duration::from_secs(1);
        loop {
            let started = Instant::now();
            match AssertUnwindSafe(start()).catch_unwind().await {
                Ok(()) => tracing::error!(task, "background task ended; restarting it"),
                Err(_) => tracing::error!(task, "background task panicked; restarting it"),
            }
            metrics.task_restart(task);
            if started.elapsed() >= Duration::from_secs(60) {
                backoff = Duration::from_secs(1);
            }
            // A deliberate pause: a task failing at once must not spin.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_and_counted() {
        let metrics = FrontDoorMetrics::default();
        let runs = Arc::new(AtomicU32::new(0));
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
        let counted = runs.clone();
        let handle = supervise("test_task", metrics.clone(), move || {
            let runs = counted.clone();
            let done = done_tx.clone();
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("deliberate test panic");
                }
                let _ = done.send(()).await;
                std::future::pending::<()>().await;
            }
        });
        done_rx.recv().await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register_for_tests(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"llm_proxy_task_restarts_total{task="test_task"} 2"#),
            "{text}"
        );
        handle.abort();
    }
}
