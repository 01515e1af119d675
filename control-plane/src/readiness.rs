//! The control plane's database, from start to ready (DESIGN §19).
//!
//! The gRPC and metrics listeners are bound before the database is reached. [`bring_up`] then
//! migrates (which connects) and checks the stored credentials, retrying with capped exponential
//! backoff while the database is down or refuses. Until it succeeds, admin calls and status reports
//! answer `Unavailable` with the reason, `/readyz` answers 503, and subscribing data planes wait
//! for the first snapshot. Nothing needs a restart when the database comes up.

use crate::store::Store;
use std::time::Duration;
use tokio::sync::watch;
use tonic::Status;

/// First retry delay; doubled after each failed attempt up to [`RETRY_CAP`].
pub const RETRY_START: Duration = Duration::from_millis(500);
pub const RETRY_CAP: Duration = Duration::from_secs(10);

/// Where the control plane stands with its database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseState {
    /// Not connected and migrated yet; `last_error` is the latest failed attempt's reason.
    Connecting {
        attempts: u32,
        last_error: Option<String>,
    },
    /// Connected, migrated and the stored credentials checked.
    Ready,
    /// Given up for good: retrying cannot help (e.g. the master key opens no stored credential).
    Failed(String),
}

/// The sending side, owned by the bring-up task.
pub type ReadinessSender = watch::Sender<DatabaseState>;

/// A read-only view of the [`DatabaseState`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct Readiness(watch::Receiver<DatabaseState>);

impl Readiness {
    /// A new state (`Connecting`, no attempt yet) and its view.
    pub fn channel() -> (ReadinessSender, Self) {
        let (tx, rx) = watch::channel(DatabaseState::Connecting {
            attempts: 0,
            last_error: None,
        });
        (tx, Self(rx))
    }

    pub fn state(&self) -> DatabaseState {
        self.0.borrow().clone()
    }

    pub fn is_ready(&self) -> bool {
        *self.0.borrow() == DatabaseState::Ready
    }

    /// Why the control plane is not ready, `None` once it is.
    pub fn not_ready_reason(&self) -> Option<String> {
        match &*self.0.borrow() {
            DatabaseState::Ready => None,
            DatabaseState::Connecting {
                last_error: None, ..
            } => Some("connecting to the database".to_owned()),
            DatabaseState::Connecting {
                attempts,
                last_error: Some(error),
            } => Some(format!(
                "database not connected yet ({attempts} attempt(s), retrying): {error}"
            )),
            DatabaseState::Failed(reason) => Some(format!("stopped: {reason}")),
        }
    }

    /// `Unavailable` (with the reason) for a call that needs the database, until it is ready.
    pub fn check(&self) -> Result<(), Status> {
        match self.not_ready_reason() {
            None => Ok(()),
            Some(reason) => Err(Status::unavailable(format!(
                "the control plane is not ready: {reason}"
            ))),
        }
    }

    /// Resolves once the database is ready (`Ok`) or the bring-up gave up (`Err` with why).
    pub async fn wait(&self) -> Result<(), String> {
        let mut rx = self.0.clone();
        let settled = rx
            .wait_for(|s| !matches!(s, DatabaseState::Connecting { .. }))
            .await
            .map(|s| s.clone());
        match settled {
            Ok(DatabaseState::Ready) => Ok(()),
            Ok(DatabaseState::Failed(reason)) => Err(reason),
            // The bring-up task is gone without settling: the control plane was shut down.
            Ok(DatabaseState::Connecting { .. }) | Err(_) => {
                Err("the control plane shut down before its database was ready".to_owned())
            }
        }
    }
}

/// What one bring-up attempt found wrong.
enum AttemptError {
    /// The database is unreachable or failed: try again later.
    Retry(String),
    /// Trying again cannot help.
    Fatal(String),
}

/// Connects, migrates and checks the credentials, retrying with backoff until it works or
/// something retrying cannot fix happens. Publishes every step in `state`; returns the fatal
/// reason, if any (also published as [`DatabaseState::Failed`]).
pub async fn bring_up(store: &Store, state: &ReadinessSender) -> Result<(), String> {
    let mut delay = RETRY_START;
    let mut attempts: u32 = 0;
    loop {
        attempts = attempts.saturating_add(1);
        match attempt(store).await {
            Ok(()) => {
                state.send_replace(DatabaseState::Ready);
                tracing::info!(
                    attempts,
                    "database connected and migrated; control plane ready"
                );
                return Ok(());
            }
            Err(AttemptError::Fatal(reason)) => {
                tracing::error!(error = %reason, "control plane cannot start");
                state.send_replace(DatabaseState::Failed(reason.clone()));
                return Err(reason);
            }
            Err(AttemptError::Retry(error)) => {
                tracing::warn!(
                    attempt = attempts,
                    %error,
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "database not ready; retrying"
                );
                state.send_replace(DatabaseState::Connecting {
                    attempts,
                    last_error: Some(error),
                });
                tokio::time::sleep(delay).await;
                delay = delay.saturating_mul(2).min(RETRY_CAP);
            }
        }
    }
}

async fn attempt(store: &Store) -> Result<(), AttemptError> {
    let applied = store
        .database()
        .migrate()
        .await
        .map_err(|e| AttemptError::Retry(e.to_string()))?;
    if applied > 0 {
        tracing::info!(applied, "database migrations applied");
    }
    let report = store
        .verify_credentials()
        .await
        .map_err(|e| AttemptError::Retry(e.to_string()))?;
    let keys = store.master_keys();
    if let Some((_, first)) = report.undecryptable.first()
        && report.undecryptable.len() == report.total
    {
        // Not one stored credential opens: this is the wrong master key, not a rotation in
        // progress. Serving would hand every data plane a config without connections.
        return Err(AttemptError::Fatal(format!(
            "master key check failed: the configured master key(s) open none of the {} stored credential(s); the first: {first}",
            report.total
        )));
    }
    if !report.undecryptable.is_empty() {
        // Each one is logged by id when a snapshot is built without it.
        tracing::warn!(
            undecryptable = report.undecryptable.len(),
            connections = report.total,
            "stored credentials that this replica's master keys do not open: their connections are left out of the snapshots (llm_proxy_cp_undecryptable_credentials)"
        );
    }
    tracing::info!(
        connections = report.total,
        undecryptable = report.undecryptable.len(),
        active_key_id = %keys.active_key_id(),
        "stored credentials checked against the master keys"
    );
    Ok(())
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "test tasks end with the test's runtime"
)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn states_answer_calls_and_wait() {
        let (tx, readiness) = Readiness::channel();
        let status = readiness.check().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("connecting to the database"));
        tx.send_replace(DatabaseState::Connecting {
            attempts: 3,
            last_error: Some("connection refused".into()),
        });
        let reason = readiness.not_ready_reason().unwrap();
        assert!(reason.contains("3 attempt(s)") && reason.contains("connection refused"));
        let waiter = tokio::spawn({
            let readiness = readiness.clone();
            async move { readiness.wait().await }
        });
        tx.send_replace(DatabaseState::Ready);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert!(readiness.check().is_ok() && readiness.is_ready());

        let (tx, readiness) = Readiness::channel();
        tx.send_replace(DatabaseState::Failed("wrong master key".into()));
        assert_eq!(readiness.wait().await, Err("wrong master key".to_owned()));
        assert_eq!(
            readiness.check().unwrap_err().code(),
            tonic::Code::Unavailable
        );
        drop(tx);
        let (tx, readiness) = Readiness::channel();
        drop(tx);
        assert!(readiness.wait().await.is_err());
    }
}
