//! The client half of the `keyplane` CLI: one method per HTTP route of a running keyplane
//! ([`Client`]), what can go wrong and the exit status it means ([`Error`]), saved logins
//! ([`profile`]) and output ([`output`]).
//!
//! Architecture invariant: no axum, sqlx or keyplane-server. Requests and answers are the
//! server's own wire types (`keyplane-api-types`), so a renamed field breaks both at once.
//! The bearer token and every secret received are [`Plaintext`]: they redact in `Debug`, appear
//! in no error and no `--verbose` line.

mod client;
pub mod duration;
mod error;
pub mod output;
pub mod profile;

pub use client::{AuditFilter, Client, GrantFilter, Page, Transition};
pub use error::{printable, ApiFailure, AuditChainDiverged, Error, ExitStatus};
pub use keyplane_core::Plaintext;

/// Where a client talks to when nothing else says.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";
