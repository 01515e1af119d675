//! llm-proxy control plane: the admin gRPC API (`AdminService`), the config stream to data planes
//! (`ConfigService`), and the storage behind them on Postgres or embedded SQLite.
//!
//! The control plane is the only reader and writer of the database. Every write bumps a config
//! version; [`hub`] turns versions into snapshots and pushes them to subscribed data planes.

pub mod admin;
pub mod auth;
pub mod config_service;
pub mod crypto;
pub mod db;
pub mod error;
pub mod hub;
pub mod ids;
pub mod master_key;
pub mod pg_tls;
pub mod readiness;
pub mod rows;
pub mod rpc_observer;
pub mod schema;
pub mod server;
pub mod store;
pub mod usage;
pub mod validate;
