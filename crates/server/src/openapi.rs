//! Responses every operation of a kind can give, added to the OpenAPI document in one place so no
//! route can forget one, each in its surface's error shape: 429 and 503 on the management APIs,
//! 400/413/415 wherever a body is read (Hybridbox: 413/415, its malformed body is a 422 as in
//! FastAPI), 400 and 503 on verification, 429 wherever a 401 can be
//! answered (the failed-authentication limit), 500 everywhere but the operations endpoints; an
//! error response a route declares without a body gets its surface's error shape. Then the
//! headers: `X-Request-Id` on every response, `WWW-Authenticate` on each 401, `Retry-After` on
//! each 429 and 503 (and, sent only while the key is in progress, on the 409 of a route that
//! takes an `Idempotency-Key`), and
//! `Idempotent-Replayed` on such a route's success. And links from each create to the operations
//! on what it created.

use serde::Serialize;
use utoipa::openapi::header::{Header, HeaderBuilder};
use utoipa::openapi::link::{Link, LinkBuilder};
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
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

pub(crate) struct CommonResponses;

/// The document as served. utoipa 5 serializes a link's `operationId` as `operation_id`; the
/// links this module adds are respelled as OpenAPI has it. utoipa's header object has no
/// `required`: it is set here on the headers [`always_sent`] names.
pub(crate) fn to_json(document: &OpenApiDoc) -> String {
    let mut value = serde_json::to_value(document).expect("the OpenAPI document serializes");
    let responses = value["paths"]
        .as_object_mut()
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(serde_json::Value::as_object_mut)
        .flat_map(|item| item.values_mut())
        .filter_map(|operation| operation.get_mut("responses")?.as_object_mut())
        .flat_map(|responses| responses.iter_mut());
    for (status, response) in responses {
        let links = response
            .get_mut("links")
            .and_then(serde_json::Value::as_object_mut)
            .into_iter()
            .flat_map(|links| links.values_mut())
            .filter_map(serde_json::Value::as_object_mut);
        for link in links {
            if let Some(id) = link.remove("operation_id") {
                link.insert("operationId".into(), id);
            }
        }
        let headers = response
            .get_mut("headers")
            .and_then(serde_json::Value::as_object_mut)
            .into_iter()
            .flat_map(|headers| headers.iter_mut());
        for (name, header) in headers {
            if let (true, Some(header)) = (always_sent(status, name), header.as_object_mut()) {
                header.insert("required".into(), true.into());
            }
        }
    }
    serde_json::to_string_pretty(&value).expect("the OpenAPI document serializes")
}

/// Whether the server sends header `name` on every response of `status` that declares it. The
/// others are sent on some only: `Idempotent-Replayed` on a replay, `Retry-After` on an
/// `Idempotency-Key`'s 409 (not on a conflict), `X-Keyplane-Stale` on a stale answer.
fn always_sent(status: &str, name: &str) -> bool {
    match name {
        "X-Request-Id" => true,
        "WWW-Authenticate" => status == "401",
        "Retry-After" => status == "429" || status == "503",
        // Forward-auth's identity headers.
        "X-Keyplane-Org-Id"
        | "X-Keyplane-Subject"
        | "X-Keyplane-Credential-Kind"
        | "X-Keyplane-Scopes"
        | "X-Keyplane-Secret" => status == "200",
        _ => false,
    }
}

/// The error schema of the surface that owns `path`; `None` for the operations endpoints.
fn error_schema(path: &str) -> Option<&'static str> {
    if path.starts_with("/api/") {
        Some("Error")
    } else if path.starts_with("/v1/public/") {
        Some("ErrorMessage")
    } else if path.starts_with("/oauth2/")
        || path.starts_with("/v1/auth/")
        || path == "/v1/whoami"
        || crate::leaks::owns_path(path)
        || crate::revocations::owns_path(path)
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
                    .content("application/json", json_content(schema))
                    .build(),
            )
        });
}

fn json_content(schema: &str) -> utoipa::openapi::Content {
    ContentBuilder::new()
        .schema(Some(Ref::from_schema_name(schema)))
        .build()
}

/// Whether `operation` takes an `Idempotency-Key` (creates and rotates).
fn takes_idempotency_key(operation: &Operation) -> bool {
    operation
        .parameters
        .iter()
        .flatten()
        .any(|parameter| parameter.name == "Idempotency-Key")
}

/// The error responses of an operation of a surface whose error shape is `schema`.
fn add_errors(path: &str, operation: &mut Operation, schema: &str) {
    let management = path.starts_with("/api/") || path.starts_with("/v1/public/");
    let verification = schema == "OAuthError";
    let reads_body = operation.request_body.is_some();
    if reads_body {
        // Hybridbox answers a malformed body as FastAPI does: 422 `json_invalid` (declared with
        // each operation's validation errors).
        if schema != "ErrorMessage" {
            add(operation, "400", "Malformed body.", schema);
        }
        add(operation, "413", "Body over the size limit.", schema);
        add(operation, "415", "Unsupported Content-Type.", schema);
    }
    // Only what an operation reads can be malformed: whoami reads nothing but its credential.
    let reads_parameters = operation.parameters.as_ref().is_some_and(|p| !p.is_empty());
    if verification && (reads_body || reads_parameters) {
        add(
            operation,
            "400",
            "`invalid_request`: a required parameter is missing or an unknown one was sent.",
            schema,
        );
    }
    if management {
        add(
            operation,
            "429",
            "Rate limited (the credential's or the organization's budget), or too many failed \
             authentications from this address; see Retry-After.",
            schema,
        );
    }
    // `failed_auth`: past an address's budget, its 401s answer 429.
    if operation.responses.responses.contains_key("401") {
        add(
            operation,
            "429",
            "Too many failed authentications from this address; see Retry-After.",
            schema,
        );
    }
    if takes_idempotency_key(operation) {
        add(
            operation,
            "409",
            "A request with this Idempotency-Key is still in progress; see Retry-After.",
            schema,
        );
    }
    add(
        operation,
        "500",
        "Internal error (its cause is in the server's log, never in the answer).",
        schema,
    );
    // Users' access tokens authenticate only on the management APIs (Aether's under `/api/`,
    // Hybridbox's under `/v1/public/`).
    let takes_users = path.starts_with("/api/") || path.starts_with("/v1/public/");
    add(
        operation,
        "503",
        if takes_users {
            "The store is temporarily unavailable, or (for a user's access token) the identity \
             provider's keys cannot be fetched and those held do not include the token's; retry \
             later."
        } else {
            "The store is temporarily unavailable; retry later."
        },
        schema,
    );
    // A route's own error responses are in its surface's shape unless it says otherwise.
    let undeclared = operation
        .responses
        .responses
        .iter_mut()
        .filter(|(status, _)| status.starts_with('4') || status.starts_with('5'))
        .filter_map(|(_, response)| match response {
            RefOr::T(response) if response.content.is_empty() => Some(response),
            _ => None,
        });
    for response in undeclared {
        response
            .content
            .insert("application/json".into(), json_content(schema));
    }
}

fn header(description: &str, schema: impl Into<RefOr<utoipa::openapi::Schema>>) -> Header {
    HeaderBuilder::new()
        .description(Some(description))
        .schema(schema)
        .build()
}

/// The `WWW-Authenticate` challenge of an operation's 401: the token service's Basic realm; none
/// for an operation that takes no credential (GitHub signs its reports); Bearer otherwise.
fn challenge(schema: Option<&str>, operation: &Operation) -> Option<&'static str> {
    let no_credential = operation.security.as_deref()
        == Some(&[utoipa::openapi::security::SecurityRequirement::default()][..]);
    match schema {
        Some("RegistryErrors") => Some(crate::registry::BASIC_CHALLENGE),
        _ if no_credential => None,
        _ => Some("Bearer"),
    }
}

/// The response headers of an operation of a surface whose error shape is `schema` (`None`: the
/// operations endpoints).
fn add_headers(operation: &mut Operation, schema: Option<&str>) {
    let idempotent = takes_idempotency_key(operation);
    let challenge = challenge(schema, operation);
    let request_id = header(
        "The request's id in the server's log: the request's own when plain, else a new UUID.",
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[A-Za-z0-9._:-]{1,128}$")),
    );
    let retry_after = |description: &str| {
        header(
            description,
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0)),
        )
    };
    for (status, response) in operation.responses.responses.iter_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        let mut declare = |name: &str, header: Header| {
            response.headers.entry(name.into()).or_insert(header);
        };
        declare("X-Request-Id", request_id.clone());
        match status.as_str() {
            "401" => {
                if let Some(challenge) = challenge {
                    declare(
                        "WWW-Authenticate",
                        header(
                            "The authentication challenge.",
                            ObjectBuilder::new()
                                .schema_type(Type::String)
                                .enum_values(Some([challenge])),
                        ),
                    );
                }
            }
            "429" | "503" if schema.is_some() => declare(
                "Retry-After",
                retry_after("Seconds to wait before retrying."),
            ),
            "409" if idempotent => declare(
                "Retry-After",
                retry_after(
                    "Seconds to wait before retrying, sent only while the request's \
                     Idempotency-Key is still in progress. No other 409 carries it: waiting does \
                     not lift a conflict, nor the live-credential limit (a revocation does).",
                ),
            ),
            success if idempotent && success.starts_with('2') => declare(
                "Idempotent-Replayed",
                header(
                    "`true` on an answer replayed for a repeated Idempotency-Key (the first \
                     request's status and body); absent on the first answer.",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some(["true"])),
                ),
            ),
            _ => {}
        }
    }
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
fn operations(item: &PathItem) -> impl Iterator<Item = &Operation> {
    [&item.get, &item.put, &item.post, &item.delete, &item.patch]
        .into_iter()
        .flatten()
}

/// The path parameters of a template: `{orgID}`, `{id}`.
fn path_parameters(template: &str) -> impl Iterator<Item = &str> {
    template
        .split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
}

/// OpenAPI links from each create (`POST P` answering 201 with an `id`) to the operations on what
/// it created (`P/{x}`, `P/{x}/rotate`), so a stateful tester can follow a resource's life.
fn add_links(openapi: &mut OpenApiDoc) {
    // (create path, target operation id, link)
    let mut links: Vec<(String, String, Link)> = Vec::new();
    for (parent, item) in &openapi.paths.paths {
        if item.post.is_none() {
            continue;
        }
        let prefix = format!("{parent}/{{");
        for (child, child_item) in &openapi.paths.paths {
            let Some(created) = child
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split('}').next())
            else {
                continue;
            };
            // Every other parameter must come from the create's own path: what lies deeper
            // (`.../deliveries/{delivery_id}`) is not known from the created resource.
            let known: Vec<&str> = path_parameters(parent).collect();
            if !path_parameters(child).all(|name| name == created || known.contains(&name)) {
                continue;
            }
            for operation in operations(child_item) {
                let Some(id) = &operation.operation_id else {
                    continue;
                };
                let link = path_parameters(child)
                    .fold(LinkBuilder::new().operation_id(id), |link, name| {
                        let source = if name == created {
                            "$response.body#/id".to_string()
                        } else {
                            format!("$request.path.{name}")
                        };
                        link.parameter(name, source)
                    })
                    .build();
                links.push((parent.clone(), id.clone(), link));
            }
        }
    }
    for (parent, name, link) in links {
        let created = openapi
            .paths
            .paths
            .get_mut(&parent)
            .and_then(|item| item.post.as_mut())
            .and_then(|post| post.responses.responses.get_mut("201"));
        if let Some(RefOr::T(created)) = created {
            created.links.insert(name, RefOr::T(link));
        }
    }
}

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut OpenApiDoc) {
        add_links(openapi);
        let components = openapi.components.get_or_insert_with(Default::default);
        register::<OAuthError>(components);
        register::<crate::registry::RegistryErrors>(components);
        // The revocation stream's event data: `text/event-stream` has no JSON schema of its own.
        register::<crate::revocations::RevocationEvent>(components);
        register::<crate::revocations::StreamPosition>(components);
        for (path, item) in openapi.paths.paths.iter_mut() {
            let schema = error_schema(path);
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
                if let Some(schema) = schema {
                    add_errors(path, operation, schema);
                }
                add_headers(operation, schema);
            }
        }
    }
}
