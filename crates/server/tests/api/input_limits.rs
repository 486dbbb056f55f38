//! Hostile input on both surfaces and both stores: every field has a grammar and a bound, lists
//! have a maximum, an error response stays small, and nothing is a 500.

use crate::helpers::{assert_error, both_backends, fields, Org, TestApp};
use keyplane_store::testing::Backend;
use reqwest::Response;
use serde_json::{json, Value};

/// Status and FastAPI `detail` items of a Hybridbox answer, as `(loc, type)`.
async fn hybridbox_errors(res: Response, status: u16) -> Vec<(Value, String)> {
    assert_eq!(res.status(), status);
    let body: Value = res.json().await.unwrap();
    body["detail"]
        .as_array()
        .unwrap_or_else(|| panic!("detail list in {body}"))
        .iter()
        .map(|d| (d["loc"].clone(), d["type"].as_str().unwrap().to_string()))
        .collect()
}

async fn grant(app: &TestApp, org: &Org, resource_type: Value, resource_id: Value) -> Response {
    app.post(
        &org.account_path("/authorizations"),
        &org.token,
        json!({
            "grant_kind": "capability",
            "subject_type": "group",
            "subject_id": uuid::Uuid::new_v4(),
            "capability_key": "registry:write",
            "resource_type": resource_type,
            "resource_id": resource_id,
        }),
    )
    .await
}

async fn grant_resources_have_a_grammar_and_a_length(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let long = "r".repeat(3000);
    let cases = [
        (
            json!("project"),
            json!("p1\u{0}x"),
            "resource_id",
            "invalid_characters",
        ),
        (
            json!("project"),
            json!(long),
            "resource_id",
            "string_too_long",
        ),
        (
            json!("project"),
            json!(""),
            "resource_id",
            "string_too_short",
        ),
        (
            json!("project"),
            json!("caf\u{e9}"),
            "resource_id",
            "invalid_characters",
        ),
        (
            json!("pro\u{0}ject"),
            json!("p1"),
            "resource_type",
            "invalid_format",
        ),
        (
            json!("Project X"),
            json!("p1"),
            "resource_type",
            "invalid_format",
        ),
        (
            json!("t".repeat(65)),
            json!("p1"),
            "resource_type",
            "string_too_long",
        ),
    ];
    for (resource_type, resource_id, field, error_type) in cases {
        let res = grant(&app, &org, resource_type.clone(), resource_id).await;
        assert_eq!(
            hybridbox_errors(res, 422).await,
            [(json!(["body", field]), error_type.to_string())],
            "{resource_type}"
        );
    }
    let res = grant(
        &app,
        &org,
        json!("registry.repository"),
        json!("team-a/app@v1"),
    )
    .await;
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    assert_eq!(created["resource_type"], "registry.repository");
    assert_eq!(created["resource_id"], "team-a/app@v1");
    let res = grant(&app, &org, json!(null), json!(null)).await;
    assert_eq!(res.status(), 201);
}

async fn names_refuse_bidi_and_format_characters(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    // "ci" U+202E "exe.sh" shows as "cihs.exe"; the others hide inside a name or break a line.
    for hidden in [
        "\u{202E}", "\u{2067}", "\u{200F}", "\u{061C}", "\u{200B}", "\u{FEFF}", "\u{2028}",
    ] {
        let name = format!("ci{hidden}exe.sh");
        let res = app
            .post(
                &org.path("/api-tokens"),
                &org.token,
                json!({ "name": name }),
            )
            .await;
        let details = assert_error(res, 422, "validation_failed").await;
        assert_eq!(
            fields(&details),
            [("name".to_string(), "invalid_characters".to_string())],
            "{hidden:?}"
        );
        let res = app
            .post(
                &org.account_path("/service-accounts"),
                &org.token,
                json!({ "name": name }),
            )
            .await;
        assert_eq!(
            hybridbox_errors(res, 422).await,
            [(json!(["body", "name"]), "invalid_characters".to_string())]
        );
    }
    let res = app
        .post(
            &org.path("/api-tokens"),
            &org.token,
            json!({ "name": "déploiement 日本" }),
        )
        .await;
    assert_eq!(res.status(), 201);
}

async fn expiry_beyond_year_9999_is_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    // 9999-12-31T23:00:00-05:00 is in year 10000 UTC.
    for expires_at in ["9999-12-31T23:00:00-05:00", "9999-12-31T23:59:59-00:01"] {
        let res = app
            .post(
                &org.path("/api-tokens"),
                &org.token,
                json!({ "name": format!("far {expires_at}"), "expires_at": expires_at }),
            )
            .await;
        let details = assert_error(res, 422, "validation_failed").await;
        assert_eq!(
            fields(&details),
            [("expires_at".to_string(), "out_of_range".to_string())]
        );
        let res = app
            .post(
                &org.account_path("/service-accounts"),
                &org.token,
                json!({ "name": format!("far {expires_at}"), "expires_at": expires_at }),
            )
            .await;
        assert_eq!(
            hybridbox_errors(res, 422).await,
            [(json!(["body", "expires_at"]), "out_of_range".to_string())]
        );
    }
    // The last instant both stores keep is accepted and read back exactly.
    let created = app
        .post(
            &org.path("/api-tokens"),
            &org.token,
            json!({ "name": "last", "expires_at": "9999-12-31T23:59:59.999999Z" }),
        )
        .await;
    assert_eq!(created.status(), 201);
    let created: Value = created.json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    let read: Value = app
        .get(&org.path(&format!("/api-tokens/{id}")), &org.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(read["expires_at"], created["expires_at"]);
    assert!(
        read["expires_at"]
            .as_str()
            .unwrap()
            .starts_with("9999-12-31T23:59:59.999999"),
        "{read}"
    );
    let token = created["token"].as_str().unwrap();
    assert_eq!(app.get("/v1/whoami", token).await.status(), 200);
}

async fn long_lists_are_refused_with_one_error(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    // ~57 KiB of scopes, all invalid: one error for the list, not one per item.
    let scopes: Vec<String> = (0..6000).map(|i| format!("x {i}")).collect();
    let res = app
        .post(
            &org.path("/api-tokens"),
            &org.token,
            json!({ "name": "many", "scopes": scopes }),
        )
        .await;
    let details = assert_error(res, 422, "validation_failed").await;
    assert_eq!(
        fields(&details),
        [("scopes".to_string(), "too_many".to_string())]
    );
    // 64 is the documented maximum.
    let scopes: Vec<String> = (0..64).map(|i| format!("s{i}")).collect();
    let res = app
        .post(
            &org.path("/api-tokens"),
            &org.token,
            json!({ "name": "max", "scopes": scopes }),
        )
        .await;
    assert_eq!(res.status(), 201);

    app.post_empty(&org.path("/registry"), &org.token).await;
    let permissions = vec!["pull"; 2000];
    for res in [
        app.post(
            &org.path("/registry/robot-accounts"),
            &org.token,
            json!({ "name": "ci", "permissions": permissions }),
        )
        .await,
        app.request(
            reqwest::Method::PUT,
            &org.path(&format!(
                "/registry/robot-accounts/{}",
                uuid::Uuid::new_v4()
            )),
            Some(&org.token),
        )
        .json(&json!({ "permissions": permissions }))
        .send()
        .await
        .unwrap(),
    ] {
        let details = assert_error(res, 422, "validation_failed").await;
        assert_eq!(
            fields(&details),
            [("permissions".to_string(), "too_many".to_string())]
        );
    }
    let permissions: Vec<String> = (0..50).map(|i| format!("pull:team-{i}/*")).collect();
    let res = app
        .post(
            &org.path("/registry/robot-accounts"),
            &org.token,
            json!({ "name": "ci", "permissions": permissions }),
        )
        .await;
    assert_eq!(res.status(), 201);
}

async fn error_lists_are_capped_and_say_how_many_were_left_out(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    let mut body = serde_json::Map::new();
    for i in 0..100 {
        body.insert(format!("typo_{i:03}"), json!(true));
    }
    let body = Value::Object(body);
    let request_size = body.to_string().len();

    let res = app
        .post(&org.path("/api-tokens"), &org.token, body.clone())
        .await;
    assert_eq!(res.status(), 422);
    let text = res.text().await.unwrap();
    assert!(text.len() < 2 * request_size, "{} bytes", text.len());
    let details = serde_json::from_str::<Value>(&text).unwrap()["error"]["details"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(details.len(), 20);
    assert_eq!(details[0]["field"], "name");
    assert_eq!(details[19]["code"], "more_errors_omitted");
    assert!(
        details[19]["message"]
            .as_str()
            .unwrap()
            .starts_with("82 more"),
        "{}",
        details[19]
    );

    let res = app
        .post(&org.account_path("/service-accounts"), &org.token, body)
        .await;
    let errors = hybridbox_errors(res, 422).await;
    assert_eq!(errors.len(), 20);
    assert_eq!(
        errors[19],
        (json!(["body"]), "more_errors_omitted".to_string())
    );
}

async fn an_empty_cursor_is_not_a_uuid(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let org = app.create_org("acme").await;
    for list in ["/api-tokens?cursor=", "/audit-events?cursor="] {
        let res = app.get(&org.path(list), &org.token).await;
        let details = assert_error(res, 422, "validation_failed").await;
        assert_eq!(
            fields(&details),
            [("cursor".to_string(), "invalid_uuid".to_string())],
            "{list}"
        );
    }
}

/// The contract points schemathesis found, read from the served document.
async fn the_openapi_document_states_the_limits_and_shapes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let doc: Value = app.openapi().await;
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["CreateApiTokenRequest"]["properties"]["scopes"]["maxItems"],
        64
    );
    assert_eq!(
        schemas["CreateRobotAccountRequest"]["properties"]["permissions"]["maxItems"],
        50
    );
    let loc_items = &schemas["ValidationError"]["properties"]["loc"]["items"];
    assert_eq!(
        schemas["LocItem"]["oneOf"]
            .as_array()
            .map(|o| o.iter().map(|s| s["type"].clone()).collect::<Vec<_>>()),
        Some(vec![json!("string"), json!("integer")]),
        "{loc_items}"
    );
    let paths = &doc["paths"];
    let metrics = &paths["/metrics"]["get"]["responses"]["200"]["content"];
    assert!(
        metrics
            .get("application/openmetrics-text; version=1.0.0; charset=utf-8")
            .is_some(),
        "{metrics}"
    );
    let registry = &paths["/api/v1/organizations/{orgID}/registry"]["get"]["responses"]["200"];
    assert_eq!(
        registry["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/RegistryState"
    );
    assert_eq!(
        schemas["RegistryState"]["oneOf"].as_array().unwrap().len(),
        2
    );
    let introspect = &paths["/oauth2/introspect"]["post"]["responses"];
    for status in ["400", "415", "503"] {
        assert!(introspect.get(status).is_some(), "introspect {status}");
    }
    let create =
        &paths["/v1/public/accounts/{account_id}/auth/authorizations"]["post"]["responses"];
    for status in ["413", "415", "422", "429", "503"] {
        assert!(create.get(status).is_some(), "authorizations {status}");
    }
    // A malformed body is FastAPI's 422 `json_invalid` there, never a 400.
    assert!(create.get("400").is_none(), "authorizations 400");
}

both_backends!(
    grant_resources_have_a_grammar_and_a_length,
    names_refuse_bidi_and_format_characters,
    expiry_beyond_year_9999_is_refused,
    long_lists_are_refused_with_one_error,
    error_lists_are_capped_and_say_how_many_were_left_out,
    an_empty_cursor_is_not_a_uuid,
    the_openapi_document_states_the_limits_and_shapes,
);
