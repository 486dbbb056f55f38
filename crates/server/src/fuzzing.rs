//! Entry points for the cargo-fuzz targets in fuzz/ (not a public API).

use crate::aether::wire::{
    CreateApiTokenRequest, CreateRobotAccountRequest, UpdateRobotAccountRequest,
};
use crate::error::AppError;
use crate::extract::{read_json_body, FromJsonBody};
use crate::hybridbox::wire::{CreateAuthorizationRequest, CreateServiceAccountRequest};
use chrono::{DateTime, Utc};
use keyplane_api_types::webhooks::WebhookRequest;
use keyplane_core::Error as DomainError;

/// Reads `bytes` as every create/update body the handlers accept, the way they do (the JSON field
/// reader, then the authorization's shape check), and checks that a rejection names its fields.
/// Panics only on a bug.
pub fn read_create_bodies(bytes: &[u8]) {
    let now = crate::ops::now();
    read::<CreateApiTokenRequest>(bytes, now);
    read::<CreateRobotAccountRequest>(bytes, now);
    read::<UpdateRobotAccountRequest>(bytes, now);
    read::<CreateServiceAccountRequest>(bytes, now);
    read::<WebhookRequest>(bytes, now);
    if let Some(request) = read::<CreateAuthorizationRequest>(bytes, now) {
        let _ = request.into_domain();
    }
}

/// Reads `bytes` as an introspection form body the way the handler does (in place when it can)
/// and checks that it finds the same `token` as a full `application/x-www-form-urlencoded` decoding.
pub fn read_form_token(bytes: &[u8]) {
    let found = crate::verify::form_field(bytes, "token").map(std::borrow::Cow::into_owned);
    let decoded = form_urlencoded::parse(bytes)
        .find(|(key, _)| key == "token")
        .map(|(_, value)| value.into_owned());
    assert_eq!(found, decoded, "{:?}", String::from_utf8_lossy(bytes));
}

fn read<T: FromJsonBody>(bytes: &[u8], now: DateTime<Utc>) -> Option<T> {
    match read_json_body::<T>(bytes, now) {
        Ok(value) => Some(value),
        Err(AppError::Domain(DomainError::Validation(errors))) => {
            // A 422 must tell the client what to fix.
            assert!(!errors.is_empty(), "a validation error without a field");
            None
        }
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readers_accept_real_bodies_and_name_the_bad_fields() {
        let now = crate::ops::now();
        let token = br#"{"name": "ci-deploy", "scopes": ["api_tokens:read"]}"#;
        assert!(read::<CreateApiTokenRequest>(token, now).is_some());
        let robot = br#"{"name": "ci", "permissions": ["pull", "push:team-a/*"]}"#;
        assert!(read::<CreateRobotAccountRequest>(robot, now).is_some());
        let bad_robot = br#"{"name": "CI bot", "permissions": [3], "extra": 1}"#;
        match read_json_body::<CreateRobotAccountRequest>(bad_robot, now) {
            Err(AppError::Domain(DomainError::Validation(errors))) => assert_eq!(errors.len(), 3),
            _ => panic!("a bad robot body is a validation error"),
        }
        let webhook = br#"{"url": "https://hooks.example.invalid/k?a=1", "events": ["api_token.*", "*"], "enabled": false}"#;
        assert!(read::<WebhookRequest>(webhook, now).is_some());
        let bad_webhook = br#"{"url": "ftp://x", "events": ["a*"], "description": 1}"#;
        match read_json_body::<WebhookRequest>(bad_webhook, now) {
            Err(AppError::Domain(DomainError::Validation(errors))) => assert_eq!(errors.len(), 3),
            _ => panic!("a bad webhook body is a validation error"),
        }
        read_create_bodies(b"{\"name\": \"x\"");
        read_create_bodies(b"[1, 2, 3]");
    }

    #[test]
    fn the_form_reader_agrees_with_a_full_decoding() {
        for body in [&b"a=1&token=kp_x"[..], b"%74oken=z", b"token=\xff&x", b"&="] {
            read_form_token(body);
        }
    }
}
