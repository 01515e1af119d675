//! The control plane's error type and its one mapping to gRPC status codes.

use crate::crypto::CryptoError;
use crate::db::DbError;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Bad input; `field` is the request field (and CLI flag) at fault, and `reason` completes
    /// the sentence that starts with it ("tps" + "must be a positive integer, got 0"): the
    /// message is printed as is by llmctl, so it reads as one plain sentence.
    #[error("{field} {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{kind} {reference:?} not found")]
    NotFound {
        kind: &'static str,
        reference: String,
    },
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("database error: {0}")]
    Database(String),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl StoreError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        StoreError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    pub fn not_found(kind: &'static str, reference: impl Into<String>) -> Self {
        StoreError::NotFound {
            kind,
            reference: reference.into(),
        }
    }
}

impl From<DieselError> for StoreError {
    fn from(err: DieselError) -> Self {
        match err {
            // Raced with a concurrent writer past our explicit checks.
            DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
                StoreError::AlreadyExists(format!("unique constraint violated: {}", info.message()))
            }
            DieselError::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, info) => {
                StoreError::FailedPrecondition(format!(
                    "referenced row missing or still referenced: {}",
                    info.message()
                ))
            }
            DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, info) => {
                StoreError::Unavailable(info.message().to_owned())
            }
            DieselError::NotFound => StoreError::Database("row not found".into()),
            other => StoreError::Database(other.to_string()),
        }
    }
}

impl From<DbError> for StoreError {
    fn from(err: DbError) -> Self {
        match err {
            DbError::Query(e) => e.into(),
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Self {
        let code = match &err {
            StoreError::Invalid { .. } => Code::InvalidArgument,
            StoreError::NotFound { .. } => Code::NotFound,
            StoreError::AlreadyExists(_) => Code::AlreadyExists,
            StoreError::FailedPrecondition(_) => Code::FailedPrecondition,
            StoreError::Unavailable(_) => Code::Unavailable,
            StoreError::Database(_) | StoreError::Crypto(_) => Code::Internal,
        };
        Status::new(code, err.to_string())
    }
}
