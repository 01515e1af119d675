//! llm-proxy data plane: serves OpenAI-compatible traffic from an in-memory config snapshot.
//!
//! The request path never touches a database: [`sync`] keeps an [`index::ConfigIndex`] current
//! from the control plane's config stream; [`server`] authenticates, routes, rate-limits and hands
//! the call to the provider adapter in [`providers`].

pub mod body;
pub mod budget;
pub mod clock;
pub mod conversation;
pub mod cost;
pub mod errors;
pub mod front_door;
pub mod gateway;
pub mod inbound;
pub mod index;
pub mod limits;
pub mod metrics;
pub mod process;
pub mod providers;
pub mod ratelimit;
pub mod server;
pub mod sse;
pub mod sync;
pub mod trace;
pub mod upstream_http;
pub mod upstream_pool;
pub mod usage;
pub mod usage_report;
