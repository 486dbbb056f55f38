//! One definition of each wire shape, for both ends: the server (`keyplane-server`) serializes
//! responses and reads requests field by field with its own reader; the client (`keyplane-client`)
//! serializes the same request types and deserializes the same responses. A field renamed here
//! changes both at once.
//!
//! Architecture invariant: no axum, sqlx or tokio. A secret becomes JSON only through
//! [`wire::one_time_secret`] (a webhook signing secret: [`wire::one_time_webhook_secret`]), and is
//! read back only through [`wire::received_secret`] ([`wire::received_webhook_secret`]).

pub mod aether;
pub mod audit;
pub mod hybridbox;
pub mod leaks;
pub mod verify;
pub mod webhooks;
pub mod wire;
