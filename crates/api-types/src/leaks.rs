//! Public revocation of leaked credentials: `POST /v1/credentials/revoke` (no authentication; its
//! errors are in the verification endpoints' OAuth style).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Tokens per request at most.
pub const MAX_CREDENTIALS: usize = 100;

/// `POST /v1/credentials/revoke` body.
#[derive(Serialize, ToSchema)]
// Unknown fields are refused (400): say so, so that a client or a tester does not send them.
#[serde(deny_unknown_fields)]
#[schema(example = json!({"credentials": ["aether_0123456789abcdef0123456789abcdef0123456789abcdef3a5c01d2"]}))]
pub struct RevokeCredentialsRequest {
    /// The tokens found: 1–100 strings. Strings that are not keyplane tokens (wrong prefix,
    /// length, alphabet or checksum) are ignored.
    #[schema(min_items = 1, max_items = 100)]
    pub credentials: Vec<String>,
}

/// The answer: what was received, never what was found.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct RevokeAccepted {
    /// How many strings the request listed.
    pub received: usize,
    /// How many of them have a keyplane token's shape and checksum (computed offline); each of
    /// those that is a credential is revoked within moments.
    pub well_formed: usize,
}
