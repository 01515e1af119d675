//! Generated gRPC types and services of llm-proxy (`llmproxy.v1`): the admin API served to
//! `llmctl` and the config stream served to data planes.

/// `llmproxy.v1`: messages, `admin_service_*` and `config_service_*` modules.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("llmproxy.v1");
}

pub use prost_types::Timestamp;
