//! Responses every operation of a kind can give, added to the OpenAPI document in one place so no
//! route can forget one: 429 and 503 on the management APIs, 400/413/415 wherever a body is read,
//! 400 and 503 on verification, each in its surface's error shape.

use serde::Serialize;
use utoipa::openapi::path::Operation;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::{Components, ContentBuilder, OpenApi as OpenApiDoc, Ref, RefOr};
use utoipa::{Modify, PartialSchema, ToSchema};

/// The verification endpoints' error body (RFC 6749 §5.2 / RFC 6750 §3).
#[derive(Serialize, ToSchema)]
#[schema(as = OAuthError)]
pub struct OAuthError {
    /// `invalid_request`, `invalid_token`, `insufficient_scope`, `temporarily_unavailable`, ….
    pub error: String,
    pub error_description: String,
}

/// The Distribution token service's error body.
#[derive(Serialize, ToSchema)]
#[schema(as = RegistryErrors)]
pub struct RegistryErrors {
    pub errors: Vec<RegistryErrorItem>,
}

#[derive(Serialize, ToSchema)]
pub struct RegistryErrorItem {
    /// `UNAUTHORIZED`, `UNSUPPORTED`, `TOOMANYREQUESTS` or `UNAVAILABLE`.
    pub code: String,
    pub message: String,
}

pub(crate) struct CommonResponses;

/// The error schema of the surface that owns `path`; `None` for the operations endpoints.
fn error_schema(path: &str) -> Option<&'static str> {
    if path.starts_with("/api/") {
        Some("Error")
    } else if path.starts_with("/v1/public/") {
        Some("ErrorMessage")
    } else if path.starts_with("/oauth2/") || path.starts_with("/v1/auth/") || path == "/v1/whoami"
    {
        Some("OAuthError")
    } else if path.starts_with("/registry/") {
        Some("RegistryErrors")
    } else {
        None
    }
}

fn add(operation: &mut Operation, status: &str, description: &str, schema: &str) {
    operation
        .responses
        .responses
        .entry(status.to_string())
        .or_insert_with(|| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name(schema)))
                            .build(),
                    )
                    .build(),
            )
        });
}

fn register<T: ToSchema>(components: &mut Components) {
    components
        .schemas
        .insert(T::name().into_owned(), <T as PartialSchema>::schema());
    let mut nested = Vec::new();
    T::schemas(&mut nested);
    components.schemas.extend(nested);
}

/// Applied to the finished document (a `#[openapi(modifiers)]` entry would run before the routes
/// are merged in).
impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut OpenApiDoc) {
        let components = openapi.components.get_or_insert_with(Default::default);
        register::<OAuthError>(components);
        register::<RegistryErrors>(components);
        register::<RegistryErrorItem>(components);
        for (path, item) in openapi.paths.paths.iter_mut() {
            let Some(schema) = error_schema(path) else {
                continue;
            };
            let management = path.starts_with("/api/") || path.starts_with("/v1/public/");
            let verification = schema == "OAuthError";
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                if operation.request_body.is_some() {
                    add(operation, "400", "Malformed body.", schema);
                    add(operation, "413", "Body over the size limit.", schema);
                    add(operation, "415", "Unsupported Content-Type.", schema);
                }
                if verification {
                    add(
                        operation,
                        "400",
                        "`invalid_request`: a required parameter is missing or an unknown one was sent.",
                        schema,
                    );
                }
                if management {
                    add(operation, "429", "Rate limited; see Retry-After.", schema);
                }
                add(
                    operation,
                    "503",
                    "The store is temporarily unavailable; retry later.",
                    schema,
                );
            }
        }
    }
}
