//! Webhooks: which events an endpoint subscribes to, its signing secret, and the Standard Webhooks
//! signature (`v1,<base64 HMAC-SHA256>` over `{id}.{timestamp}.{body}`). Pure: the server sends,
//! the store queues.

use crate::error::{codes, FieldError, FieldPath};
use crate::ids::TenantId;
use chrono::{DateTime, Utc};
use data_encoding::BASE64;
use hmac::{Hmac, Mac};
use rand::{CryptoRng, RngCore};
use sha2::Sha256;
use std::collections::HashSet;
use std::fmt;

/// Longest action pattern accepted, and how many one webhook may list.
pub const MAX_PATTERN_CHARS: usize = 100;
pub const MAX_PATTERNS: usize = 50;
/// The prefix Standard Webhooks gives a base64 signing secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Random bytes in a signing secret (the spec asks for 24 to 64).
const SECRET_BYTES: usize = 32;

/// Which audit actions a webhook receives: one action (`api_token.created`), every action under a
/// prefix (`api_token.*`, stored as the prefix `api_token.`), or every action (`*`, the empty
/// prefix).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ActionPattern {
    Exact(String),
    Prefix(String),
}

impl ActionPattern {
    /// `*`, `name.*` or an exact action: lowercase letters, `_` and `.`, at most 100 characters.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        const RULE: &str =
            "must be an action such as `api_token.created`, a prefix such as `api_token.*`, or `*`";
        if raw == "*" {
            return Ok(Self::Prefix(String::new()));
        }
        let valid = !raw.is_empty()
            && raw.len() <= MAX_PATTERN_CHARS
            && raw
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.' || b == b'*');
        let wildcard = raw.find('*');
        if !valid || wildcard.is_some_and(|at| at != raw.len() - 1 || !raw.ends_with(".*")) {
            return Err(RULE);
        }
        Ok(match raw.strip_suffix('*') {
            Some(prefix) => Self::Prefix(prefix.to_string()),
            None => Self::Exact(raw.to_string()),
        })
    }

    /// Validates a request's list: 1–50 patterns, each valid and listed once.
    pub fn parse_list(path: &FieldPath, raw: &[String]) -> Result<Vec<Self>, Vec<FieldError>> {
        if raw.is_empty() {
            return Err(vec![FieldError::new(
                path.clone(),
                codes::TOO_SHORT,
                "list at least one action pattern (`*` for every event)",
            )]);
        }
        if raw.len() > MAX_PATTERNS {
            return Err(vec![FieldError::new(
                path.clone(),
                codes::TOO_MANY,
                format!("at most {MAX_PATTERNS} patterns"),
            )]);
        }
        let mut errors = Vec::new();
        let mut seen = HashSet::with_capacity(raw.len());
        let mut patterns = Vec::with_capacity(raw.len());
        for (index, text) in raw.iter().enumerate() {
            match Self::parse(text) {
                Ok(_) if !seen.insert(text.as_str()) => errors.push(FieldError::new(
                    path.index(index),
                    codes::DUPLICATE,
                    "this pattern is listed twice",
                )),
                Ok(pattern) => patterns.push(pattern),
                Err(message) => errors.push(FieldError::new(
                    path.index(index),
                    codes::INVALID_FORMAT,
                    message,
                )),
            }
        }
        if errors.is_empty() {
            Ok(patterns)
        } else {
            Err(errors)
        }
    }

    pub fn matches(&self, action: &str) -> bool {
        match self {
            Self::Exact(exact) => exact == action,
            Self::Prefix(prefix) => action.starts_with(prefix.as_str()),
        }
    }

    /// The form a caller wrote: `api_token.*`, `*`, `api_token.created`.
    pub fn to_wire(&self) -> String {
        match self {
            Self::Exact(exact) => exact.clone(),
            Self::Prefix(prefix) => format!("{prefix}*"),
        }
    }

    /// What the store matches on: the exact action or the prefix, and whether it is a prefix.
    pub fn stored(&self) -> (&str, bool) {
        match self {
            Self::Exact(exact) => (exact, false),
            Self::Prefix(prefix) => (prefix, true),
        }
    }
}

/// A webhook's signing secret, `whsec_<base64 of 32 random bytes>`. Every replica needs it to sign,
/// so the store keeps it as it is (see ARCHITECTURE.md, "Webhooks"); everywhere else it is a
/// secret: redacting `Debug`, no `Display` or `Serialize`, shown once at creation and rotation.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut bytes = [0u8; SECRET_BYTES];
        rng.fill_bytes(&mut bytes);
        Self(format!("{SECRET_PREFIX}{}", BASE64.encode(&bytes)))
    }

    /// A secret the store wrote; `None` if it is not `whsec_<base64>`.
    pub fn from_stored(text: String) -> Option<Self> {
        let key = text.strip_prefix(SECRET_PREFIX)?;
        BASE64.decode(key.as_bytes()).ok()?;
        Some(Self(text))
    }

    /// The one door out: to store it and to show it once.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    fn key(&self) -> Vec<u8> {
        // Checked when made or loaded.
        BASE64
            .decode(&self.0.as_bytes()[SECRET_PREFIX.len()..])
            .unwrap_or_default()
    }

    /// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, as Standard Webhooks defines.
    pub fn sign(&self, message_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key())
            .expect("HMAC-SHA256 takes a key of any length");
        mac.update(message_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", BASE64.encode(&mac.finalize().into_bytes()))
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

/// An endpoint that receives a tenant's audit events.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// UUIDv7.
    pub id: uuid::Uuid,
    pub tenant_id: TenantId,
    pub url: String,
    pub events: Vec<ActionPattern>,
    pub description: String,
    pub enabled: bool,
    pub secret: WebhookSecret,
    /// After a rotation, the secret it replaced and until when deliveries are signed with it too.
    pub previous_secret: Option<(WebhookSecret, DateTime<Utc>)>,
    /// Since when every attempt has failed; `None` after a success.
    pub failing_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Webhook {
    /// `webhook-signature`: one `v1,` signature per secret in force at `now`, space-separated.
    pub fn signatures(
        &self,
        message_id: &str,
        timestamp: i64,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> String {
        let mut header = self.secret.sign(message_id, timestamp, body);
        if let Some((previous, until)) = &self.previous_secret {
            if *until > now {
                header.push(' ');
                header.push_str(&previous.sign(message_id, timestamp, body));
            }
        }
        header
    }
}

/// Where one delivery (an event to a webhook) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Queued or waiting for its next attempt.
    Pending,
    Succeeded,
    /// Every attempt of the retry schedule failed.
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "pending" => Self::Pending,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse_and_match() {
        let all = ActionPattern::parse("*").unwrap();
        assert!(all.matches("api_token.created") && all.matches("webhook.disabled"));
        let tokens = ActionPattern::parse("api_token.*").unwrap();
        assert!(tokens.matches("api_token.revoked"));
        assert!(!tokens.matches("api_tokens.revoked"));
        assert_eq!(tokens.to_wire(), "api_token.*");
        let exact = ActionPattern::parse("api_token.created").unwrap();
        assert!(exact.matches("api_token.created") && !exact.matches("api_token.created2"));
        for bad in ["", "api_token*", "a.*.b", "API.x", "a b", "**", ".*x"] {
            assert!(ActionPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn signature_matches_the_standard_webhooks_test_vector() {
        // The example of the Standard Webhooks specification and its reference libraries.
        let secret =
            WebhookSecret::from_stored("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()).unwrap();
        let signature = secret.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let secret = WebhookSecret::generate(&mut rand::rngs::OsRng);
        assert!(secret.expose_secret().starts_with(SECRET_PREFIX));
        assert!(!format!("{secret:?}").contains(&secret.expose_secret()[6..]));
    }
}
