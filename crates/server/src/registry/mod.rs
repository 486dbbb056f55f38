//! keyplane as the token server of the Distribution token-authentication protocol: robots log in
//! with `robot$<project>+<name>` and their secret, and get a signed JWT granting what their
//! permissions allow in their own project.

mod keys;
mod token;

pub(crate) use keys::refresh_signer;
pub use keys::{load_or_create_signing_key, mint_candidate, Signer};
pub use token::{
    costly_grant_turns, RegistryErrorCode, RegistryErrorItem, RegistryErrors,
    REGISTRY_EXP_LEEWAY_SECONDS,
};
pub(crate) use token::{error_response, routes, CostlyGrants, BASIC_CHALLENGE};
