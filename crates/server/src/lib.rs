//! keyplane's HTTP service: one router over the Aether and Hybridbox surfaces, the operations
//! endpoints and the OpenAPI document, all on one [`App`].
//!
//! Architecture invariant: only this crate and `keyplane-api-types` (the wire shapes it shares with
//! the client) serialize; a secret becomes JSON only through [`wire::one_time_secret`].

pub mod aether;
pub mod allocator;
mod app;
pub mod audit;
pub mod audit_positions;
pub mod auth;
pub mod canary;
pub mod client_addr;
mod clock_check;
mod coarse_clock;
pub mod config;
mod connection;
pub mod console;
mod docs;
pub mod error;
mod export_gaps;
mod export_heads;
mod extract;
mod failed_auth;
#[doc(hidden)]
pub mod fuzzing;
pub mod hybridbox;
mod idempotency;
mod introspection_misses;
mod jobs;
pub mod leaks;
mod metrics;
pub mod oidc;
mod openapi;
pub mod ops;
mod ratelimit;
pub mod registry;
mod request_id;
pub mod revocations;
mod router;
pub mod streamed_list;
mod system;
pub mod tls;
mod usage;
pub mod verify;
pub mod webhooks;
pub mod wire;

/// This keyplane's version, as `/readyz` and `keyplane_build_info` report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub use app::App;
pub use config::Config;
pub use router::{router, serve};
