//! keyplane's domain: identifiers, secrets, the token format, scopes and capabilities, and the
//! validation rules every surface shares.
//!
//! Architecture invariant: this crate does no I/O. Time (`now`) and randomness (`rng`) come in as
//! arguments, so every rule here is a pure, repeatable function.

pub mod audit;
pub mod audit_position;
pub mod authz;
pub mod created_by;
pub mod credential;
pub mod error;
pub mod glob;
pub mod grant;
pub mod ids;
pub mod legacy_token;
pub mod policy;
pub mod registry;
pub mod scope;
pub mod secret;
pub mod token;
pub mod validate;
pub mod webhook;

pub use audit::{AuditActor, AuditEvent, ChainedEvent, RequestContext};
pub use authz::Principal;
pub use created_by::{Channel, CreatedBy, Operator};
pub use credential::{
    Credential, CredentialIdentity, CredentialKind, NewCredential, PreviousSecret, Rotation,
    RotationOptions, SecretGate, SecretSlot, Tenant, TokenDisplay, Unusable,
};
pub use error::{Error, FieldError, FieldLocation, FieldPath, PathSegment};
pub use grant::{Grant, GrantKind, GrantResource, NewGrant, SubjectType};
pub use ids::{CredentialId, GrantId, TenantId, UserId};
pub use policy::{CredentialPolicy, LeakAction, LifetimeRule};
pub use registry::{Registry, RobotPermission};
pub use scope::{Capability, Scope, ScopeSet};
pub use secret::{CacheKey, CacheKeyer, Plaintext, PrivateKeyPem, TokenHash};
pub use webhook::{ActionPattern, DeliveryStatus, Webhook, WebhookSecret};
