//! Responses every operation of a kind can give, added to the OpenAPI document in one place so no
//! route can forget one: 429 and 503 on the management APIs, 400/413/415 wherever a body is read,
//! 400 and 503 on verification, each in its surface's error shape; and links from each create to
//! the operations on what it created.

use serde::Serialize;
use utoipa::openapi::link::{Link, LinkBuilder};
use utoipa::openapi::path::{Operation, PathItem};
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

/// The document as served. utoipa 5 serializes a link's `operationId` as `operation_id`; the
/// links this module adds are respelled as OpenAPI has it.
pub(crate) fn to_json(document: &OpenApiDoc) -> String {
    let mut value = serde_json::to_value(document).expect("the OpenAPI document serializes");
    let responses = value["paths"]
        .as_object_mut()
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(serde_json::Value::as_object_mut)
        .flat_map(|item| item.values_mut())
        .filter_map(|operation| operation.get_mut("responses")?.as_object_mut())
        .flat_map(|responses| responses.values_mut());
    for response in responses {
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
    }
    serde_json::to_string_pretty(&value).expect("the OpenAPI document serializes")
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
