//! `/docs`: a self-contained HTML API reference rendered from the OpenAPI document on the server,
//! so it works offline and needs no JavaScript from a CDN (keyplane is often self-hosted air-gapped).

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn schema_name(schema: &Value) -> String {
    if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
        let name = reference.rsplit('/').next().unwrap_or(reference);
        return format!("<a href=\"#schema-{0}\">{0}</a>", escape(name));
    }
    if let Some(items) = schema.get("items") {
        return format!("array of {}", schema_name(items));
    }
    if let Some(variants) = schema
        .get("oneOf")
        .or_else(|| schema.get("allOf"))
        .and_then(Value::as_array)
    {
        return variants
            .iter()
            .map(schema_name)
            .collect::<Vec<_>>()
            .join(" | ");
    }
    let kind = match schema.get("type") {
        Some(Value::Array(types)) => types
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" | "),
        Some(Value::String(kind)) => kind.clone(),
        _ => "any".into(),
    };
    match schema.get("format").and_then(Value::as_str) {
        Some(format) => escape(&format!("{kind} ({format})")),
        None => escape(&kind),
    }
}

fn text(value: &Value, key: &str) -> String {
    escape(value.get(key).and_then(Value::as_str).unwrap_or(""))
}

/// Renders the reference page for an OpenAPI document given as JSON text.
pub fn render(openapi_json: &str) -> String {
    let doc: Value = serde_json::from_str(openapi_json).unwrap_or(Value::Null);
    let mut by_tag: BTreeMap<String, String> = BTreeMap::new();
    if let Some(paths) = doc.get("paths").and_then(Value::as_object) {
        for (path, item) in paths {
            for method in METHODS {
                let Some(op) = item.get(method) else { continue };
                let tag = op
                    .get("tags")
                    .and_then(|t| t.get(0))
                    .and_then(Value::as_str)
                    .unwrap_or("Other")
                    .to_string();
                let html = by_tag.entry(tag).or_default();
                let _ = write!(
                    html,
                    "<section class=op><h3><span class=\"m {method}\">{}</span> <code>{}</code></h3><p><b>{}</b></p><p>{}</p>",
                    method.to_uppercase(),
                    escape(path),
                    text(op, "summary"),
                    text(op, "description").replace("\n\n", "</p><p>"),
                );
                if let Some(params) = op.get("parameters").and_then(Value::as_array) {
                    html.push_str("<table><tr><th>parameter</th><th>in</th><th>type</th><th>description</th></tr>");
                    for p in params {
                        let required = if p.get("required").and_then(Value::as_bool) == Some(true) {
                            " (required)"
                        } else {
                            ""
                        };
                        let _ = write!(
                            html,
                            "<tr><td><code>{}</code>{required}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                            text(p, "name"),
                            text(p, "in"),
                            p.get("schema").map(schema_name).unwrap_or_default(),
                            text(p, "description"),
                        );
                    }
                    html.push_str("</table>");
                }
                if let Some(body) = op.pointer("/requestBody/content/application~1json/schema") {
                    let _ = write!(
                        html,
                        "<p>Request body (application/json): {}</p>",
                        schema_name(body)
                    );
                }
                if let Some(responses) = op.get("responses").and_then(Value::as_object) {
                    html.push_str(
                        "<table><tr><th>status</th><th>description</th><th>body</th></tr>",
                    );
                    for (status, response) in responses {
                        let body = response
                            .get("content")
                            .and_then(Value::as_object)
                            .and_then(|c| c.values().next())
                            .and_then(|m| m.get("schema"))
                            .map(schema_name)
                            .unwrap_or_default();
                        let _ = write!(
                            html,
                            "<tr><td>{}</td><td>{}</td><td>{body}</td></tr>",
                            escape(status),
                            text(response, "description")
                        );
                    }
                    html.push_str("</table>");
                }
                html.push_str("</section>");
            }
        }
    }
    let mut schemas = String::new();
    if let Some(all) = doc
        .pointer("/components/schemas")
        .and_then(Value::as_object)
    {
        for (name, schema) in all {
            let _ = write!(
                schemas,
                "<section class=schema id=\"schema-{0}\"><h3>{0}</h3>",
                escape(name)
            );
            let required: Vec<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let properties = schema.get("properties").and_then(Value::as_object);
            if let Some(properties) = properties {
                schemas.push_str("<table><tr><th>field</th><th>type</th><th>description</th></tr>");
                for (field, property) in properties {
                    let mark = if required.contains(&field.as_str()) {
                        " (required)"
                    } else {
                        ""
                    };
                    let _ = write!(
                        schemas,
                        "<tr><td><code>{}</code>{mark}</td><td>{}</td><td>{}</td></tr>",
                        escape(field),
                        schema_name(property),
                        text(property, "description")
                    );
                }
                schemas.push_str("</table>");
            } else {
                let _ = write!(schemas, "<p>{}</p>", schema_name(schema));
            }
            schemas.push_str("</section>");
        }
    }
    let mut page = String::from(
        "<!doctype html><html><head><meta charset=utf-8><title>keyplane API reference</title><style>\
         body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}\
         .op,.schema{border:1px solid #ddd;border-radius:6px;padding:.5rem 1rem;margin:1rem 0}\
         table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;vertical-align:top}\
         .m{font-family:monospace;padding:.1rem .4rem;border-radius:4px;color:#fff;background:#555}\
         .get{background:#2a7}.post{background:#27c}.delete{background:#c33}.put,.patch{background:#c80}\
         </style></head><body>",
    );
    let _ = write!(
        page,
        "<h1>{} API reference</h1><p>{}</p><p>Machine-readable: <a href=\"/openapi.json\">/openapi.json</a> (OpenAPI {}).</p>",
        doc.pointer("/info/title").and_then(Value::as_str).map(escape).unwrap_or_default(),
        doc.pointer("/info/description").and_then(Value::as_str).map(escape).unwrap_or_default(),
        doc.get("openapi").and_then(Value::as_str).map(escape).unwrap_or_default(),
    );
    for (tag, html) in &by_tag {
        let _ = write!(page, "<h2>{}</h2>{html}", escape(tag));
    }
    let _ = write!(page, "<h2>Schemas</h2>{schemas}</body></html>");
    page
}
