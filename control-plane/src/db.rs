//! Database access: a deadpool pool of `AsyncPgConnection` (production) or of SQLite behind
//! diesel-async's `SyncConnectionWrapper` (embedded), embedded migrations for both, and the
//! Postgres LISTEN connection used for config-change notifications. Every Postgres session is
//! opened through [`PgTarget`], which honours the URL's `sslmode`/`sslrootcert`/`sslcert`/`sslkey`.

use crate::pg_tls::{PgTarget, PgTlsError};
use diesel::SqliteConnection;
use diesel_async::pooled_connection::deadpool::{Object, Pool};
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl};
use diesel_async::{SimpleAsyncConnection as _, pooled_connection::deadpool::PoolError};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness as _, embed_migrations};
use futures_util::FutureExt as _;
use secrecy::{ExposeSecret, SecretString};
use std::sync::Arc;

pub type SqliteConn = SyncConnectionWrapper<SqliteConnection>;

const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// Arbitrary constant shared by all replicas: the advisory lock serialising migrations.
const MIGRATION_LOCK_KEY: i64 = 0x6c6c_6d70_726f_7879; // "llmproxy"

/// The Postgres channel every writing transaction notifies.
pub const CONFIG_CHANNEL: &str = "llm_proxy_config";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "invalid database-url: must start with postgres://, postgresql:// or sqlite:// (sqlite://relative/path or sqlite:///absolute/path)"
    )]
    BadUrl,
    #[error(transparent)]
    Tls(#[from] PgTlsError),
    #[error("cannot connect to the database: {0}")]
    Connect(String),
    #[error("database pool: {0}")]
    Pool(String),
    #[error("migrations failed: {0}")]
    Migrate(String),
    #[error("database error: {0}")]
    Query(#[from] diesel::result::Error),
}

impl From<PoolError> for DbError {
    fn from(err: PoolError) -> Self {
        DbError::Pool(err.to_string())
    }
}

/// Which backend a `--database-url` selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// Parses the URL into a backend and the string diesel wants (a path for SQLite).
pub fn parse_url(url: &SecretString) -> Result<(Backend, SecretString), DbError> {
    let text = url.expose_secret().trim();
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        return Ok((Backend::Postgres, SecretString::from(text.to_owned())));
    }
    if let Some(path) = text.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(DbError::BadUrl);
        }
        return Ok((Backend::Sqlite, SecretString::from(path.to_owned())));
    }
    Err(DbError::BadUrl)
}

/// Checks a `--database-url` without connecting: its form and, for Postgres, its TLS parameters
/// (files read, roots loaded). Returns a short description without secrets.
pub async fn check_url(url: &SecretString) -> Result<String, DbError> {
    match parse_url(url)? {
        (Backend::Sqlite, _) => Ok("sqlite".to_owned()),
        (Backend::Postgres, target) => {
            let pg = PgTarget::new(&target).await?;
            Ok(format!("postgres sslmode={}", pg.tls_params().describe()))
        }
    }
}

/// A connection pool on either backend.
#[derive(Clone)]
pub enum Database {
    Postgres {
        pool: Pool<AsyncPgConnection>,
        /// How to open a session (TLS included); also used outside the pool for the migration
        /// lock and LISTEN.
        target: Arc<PgTarget>,
    },
    Sqlite {
        pool: Pool<SqliteConn>,
    },
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Database::Postgres { .. } => "Database::Postgres",
            Database::Sqlite { .. } => "Database::Sqlite",
        })
    }
}

/// A checked-out connection.
// Lives on the stack for one call; boxing the Postgres arm would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum DbConn {
    Postgres(Object<AsyncPgConnection>),
    Sqlite(Object<SqliteConn>),
}

async fn establish_sqlite(path: &str) -> diesel::ConnectionResult<SqliteConn> {
    let mut conn = <SqliteConn as AsyncConnection>::establish(path).await?;
    // Same referential behaviour as Postgres; wait instead of failing on a busy file.
    conn.batch_execute(
        "PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL;",
    )
    .await
    .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
    Ok(conn)
}

impl Database {
    /// Builds the pool and checks that one connection can be made.
    pub async fn connect(url: &SecretString, max_connections: usize) -> Result<Self, DbError> {
        let db = Self::open(url, max_connections).await?;
        db.get()
            .await
            .map_err(|e| DbError::Connect(e.to_string()))?;
        Ok(db)
    }

    /// Builds the pool without connecting: connections are made when first needed, so a
    /// control plane can start while its database is down (DESIGN §19).
    pub async fn open(url: &SecretString, max_connections: usize) -> Result<Self, DbError> {
        let (backend, target) = parse_url(url)?;
        let db = match backend {
            Backend::Postgres => {
                let pg = Arc::new(PgTarget::new(&target).await?);
                let mut config = ManagerConfig::<AsyncPgConnection>::default();
                let setup = pg.clone();
                config.custom_setup = Box::new(move |_| {
                    let pg = setup.clone();
                    async move { pg.connect().await }.boxed()
                });
                // The setup above ignores the manager's URL: it is left empty so that the
                // password is not kept in a plain String.
                let manager =
                    AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config("", config);
                let pool = Pool::builder(manager)
                    .max_size(max_connections.max(2))
                    .build()
                    .map_err(|e| DbError::Pool(e.to_string()))?;
                Database::Postgres { pool, target: pg }
            }
            Backend::Sqlite => {
                let mut config = ManagerConfig::<SqliteConn>::default();
                config.custom_setup = Box::new(|path| establish_sqlite(path).boxed());
                let manager = AsyncDieselConnectionManager::<SqliteConn>::new_with_config(
                    target.expose_secret(),
                    config,
                );
                // SQLite has one writer; one pooled connection serialises access cleanly.
                let pool = Pool::builder(manager)
                    .max_size(1)
                    .build()
                    .map_err(|e| DbError::Pool(e.to_string()))?;
                Database::Sqlite { pool }
            }
        };
        Ok(db)
    }

    pub fn backend(&self) -> Backend {
        match self {
            Database::Postgres { .. } => Backend::Postgres,
            Database::Sqlite { .. } => Backend::Sqlite,
        }
    }

    pub async fn get(&self) -> Result<DbConn, DbError> {
        Ok(match self {
            Database::Postgres { pool, .. } => DbConn::Postgres(pool.get().await?),
            Database::Sqlite { pool } => DbConn::Sqlite(pool.get().await?),
        })
    }

    /// Runs pending migrations. On Postgres this holds an advisory lock on a dedicated session so
    /// that replicas starting together migrate one after the other.
    pub async fn migrate(&self) -> Result<usize, DbError> {
        match self {
            Database::Postgres { target, .. } => {
                let mut conn = target
                    .connect()
                    .await
                    .map_err(|e| DbError::Connect(e.to_string()))?;
                diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
                    .execute(&mut conn)
                    .await?;
                let mut harness = AsyncMigrationHarness::new(conn);
                let result = harness
                    .run_pending_migrations(PG_MIGRATIONS)
                    .map(|applied| applied.len())
                    .map_err(|e| DbError::Migrate(e.to_string()));
                let mut conn = harness.into_inner();
                // The session ends when `conn` drops, which releases the lock anyway; unlock
                // explicitly so the next replica need not wait for the close.
                diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
                    .execute(&mut conn)
                    .await?;
                result
            }
            Database::Sqlite { pool } => {
                let conn = pool.get().await?;
                let mut harness = AsyncMigrationHarness::new(conn);
                let result = harness
                    .run_pending_migrations(SQLITE_MIGRATIONS)
                    .map(|applied| applied.len())
                    .map_err(|e| DbError::Migrate(e.to_string()));
                drop(harness.into_inner());
                result
            }
        }
    }

    /// A dedicated Postgres session listening on [`CONFIG_CHANNEL`]; `None` on SQLite.
    pub async fn listen_connection(&self) -> Result<Option<AsyncPgConnection>, DbError> {
        match self {
            Database::Postgres { target, .. } => {
                let mut conn = target
                    .connect()
                    .await
                    .map_err(|e| DbError::Connect(e.to_string()))?;
                diesel::sql_query(format!("LISTEN {CONFIG_CHANNEL}"))
                    .execute(&mut conn)
                    .await?;
                Ok(Some(conn))
            }
            Database::Sqlite { .. } => Ok(None),
        }
    }

    /// Pool occupancy for metrics: (in use, idle).
    pub fn pool_status(&self) -> (usize, usize) {
        let status = match self {
            Database::Postgres { pool, .. } => pool.status(),
            Database::Sqlite { pool } => pool.status(),
        };
        (
            status.size.saturating_sub(status.available),
            status.available,
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::rows::{ModelRow, VirtualKeyRow};
    use crate::schema::{provider_models, virtual_keys};
    use diesel::{QueryDsl as _, SelectableHelper as _};

    /// A model stored before prices existed has none after the upgrade (the new columns are
    /// NULL), and it still reads.
    #[tokio::test(flavor = "multi_thread")]
    async fn models_stored_before_prices_have_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let conn = establish_sqlite(path.to_str().unwrap()).await.unwrap();
        let mut harness = AsyncMigrationHarness::new(conn);
        // The first migration only: the schema as it was before prices.
        harness.run_next_migration(SQLITE_MIGRATIONS).unwrap();
        let mut conn = harness.into_inner();
        conn.batch_execute(
            "INSERT INTO connections (id, name, provider, endpoint, credential, options, created_at, updated_at) \
             VALUES ('conn-1', 'OpenAI', 'openai', 'https://api.openai.com', x'00', '{}', 1, 1); \
             INSERT INTO provider_models (id, connection_id, name, remote, created_at, updated_at) \
             VALUES ('model-1', 'conn-1', 'gpt-4o', 'gpt-4o', 1, 1);",
        )
        .await
        .unwrap();
        let mut harness = AsyncMigrationHarness::new(conn);
        harness.run_pending_migrations(SQLITE_MIGRATIONS).unwrap();
        let mut conn = harness.into_inner();
        let row: ModelRow = provider_models::table
            .select(ModelRow::as_select())
            .first(&mut conn)
            .await
            .unwrap();
        assert_eq!(row.name, "gpt-4o");
        assert_eq!(
            [
                row.price_input,
                row.price_output,
                row.price_cache_read,
                row.price_cache_write
            ],
            [None; 4]
        );
    }

    /// A virtual key stored before budgets existed has none after the upgrade (both new columns
    /// are NULL), and it still reads.
    #[tokio::test(flavor = "multi_thread")]
    async fn keys_stored_before_budgets_have_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let conn = establish_sqlite(path.to_str().unwrap()).await.unwrap();
        let mut harness = AsyncMigrationHarness::new(conn);
        // Every migration before budgets: the schema as it was.
        let pending = harness.pending_migrations(SQLITE_MIGRATIONS).unwrap();
        let before: Vec<_> = pending
            .iter()
            .take_while(|m| !m.name().to_string().ends_with("_vkey_budgets"))
            .collect();
        assert!(before.len() < pending.len(), "the budget migration exists");
        for migration in before {
            harness.run_migration(migration.as_ref()).unwrap();
        }
        let mut conn = harness.into_inner();
        conn.batch_execute(
            "INSERT INTO virtual_keys (id, name, key_sha256, key_hint, enabled, created_at, updated_at) \
             VALUES ('vkey-1', 'App', x'00', 'vk-ap…1234', 1, 1, 1);",
        )
        .await
        .unwrap();
        let mut harness = AsyncMigrationHarness::new(conn);
        harness.run_pending_migrations(SQLITE_MIGRATIONS).unwrap();
        let mut conn = harness.into_inner();
        let row: VirtualKeyRow = virtual_keys::table
            .select(VirtualKeyRow::as_select())
            .first(&mut conn)
            .await
            .unwrap();
        assert_eq!(row.name, "App");
        assert_eq!((row.budget_micro_usd, row.budget_period), (None, None));
    }
}
