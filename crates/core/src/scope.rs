//! Scopes and capabilities. A scope is a string a credential holds; a capability is one of the
//! scope keys that confer a management right. Any other well-formed scope is carried through to
//! verification for downstream services and confers nothing here.

use crate::error::{codes, FieldError, FieldPath};
use std::collections::HashSet;

/// The management rights keyplane itself checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    /// Service accounts and grants.
    AuthManage,
    ApiTokensRead,
    ApiTokensWrite,
    /// The registry and its robot accounts.
    RegistryRead,
    RegistryWrite,
    AuditRead,
    /// Calling introspection and forward-auth.
    TokensVerify,
    /// The tenant's webhooks and their deliveries.
    WebhooksManage,
}

impl Capability {
    pub const ALL: [Capability; 8] = [
        Capability::AuthManage,
        Capability::ApiTokensRead,
        Capability::ApiTokensWrite,
        Capability::RegistryRead,
        Capability::RegistryWrite,
        Capability::AuditRead,
        Capability::TokensVerify,
        Capability::WebhooksManage,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Capability::AuthManage => "auth.manage",
            Capability::ApiTokensRead => "api_tokens:read",
            Capability::ApiTokensWrite => "api_tokens:write",
            Capability::RegistryRead => "registry:read",
            Capability::RegistryWrite => "registry:write",
            Capability::AuditRead => "audit:read",
            Capability::TokensVerify => "tokens:verify",
            Capability::WebhooksManage => "webhooks:manage",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.key() == key)
    }
}

/// The scope that holds every right in its tenant.
pub const WILDCARD: &str = "*";
pub const MAX_SCOPE_LEN: usize = 128;
pub const MAX_SCOPES: usize = 64;

/// One well-formed scope string: `*`, or 1–128 characters of `[A-Za-z0-9_.:/-]` starting with a
/// letter or digit (`api_tokens:read`, `auth.manage`, `billing/invoices:read`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(String);

impl Scope {
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        if text == WILDCARD {
            return Ok(Self(text.to_string()));
        }
        if text.is_empty() {
            return Err("a scope cannot be empty");
        }
        if text.len() > MAX_SCOPE_LEN {
            return Err("a scope is at most 128 characters");
        }
        let mut chars = text.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || "_.:/-".contains(c));
        if first_ok && rest_ok {
            Ok(Self(text.to_string()))
        } else {
            Err("a scope is `*` or starts with a letter or digit followed by letters, digits and `_.:/-`")
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_wildcard(&self) -> bool {
        self.0 == WILDCARD
    }
}

/// The scopes a credential holds, in the order they were given.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ScopeSet(Vec<Scope>);

impl ScopeSet {
    pub fn empty() -> Self {
        Self(Vec::new())
    }

    pub fn wildcard() -> Self {
        Self(vec![Scope(WILDCARD.to_string())])
    }

    /// Validates a request's scope list; each error names its index (`scopes[2]`). A list over
    /// [`MAX_SCOPES`] is refused whole, before its items are read, and duplicates are found with a
    /// set: the cost stays linear in the request.
    pub fn parse_list(path: &FieldPath, raw: &[String]) -> Result<Self, Vec<FieldError>> {
        if raw.len() > MAX_SCOPES {
            return Err(vec![FieldError::new(
                path.clone(),
                codes::TOO_MANY,
                format!("at most {MAX_SCOPES} scopes"),
            )]);
        }
        let mut errors = Vec::new();
        let mut seen: HashSet<&str> = HashSet::with_capacity(raw.len());
        let mut scopes: Vec<Scope> = Vec::with_capacity(raw.len());
        for (index, text) in raw.iter().enumerate() {
            match Scope::parse(text) {
                Ok(_) if !seen.insert(text) => errors.push(FieldError::new(
                    path.index(index),
                    codes::DUPLICATE,
                    "this scope is listed twice",
                )),
                Ok(scope) => scopes.push(scope),
                Err(message) => errors.push(FieldError::new(
                    path.index(index),
                    codes::INVALID_SCOPE,
                    message,
                )),
            }
        }
        if errors.is_empty() {
            Ok(Self(scopes))
        } else {
            Err(errors)
        }
    }

    /// For values the store wrote itself after validating them once.
    pub fn from_trusted(scopes: Vec<String>) -> Self {
        Self(scopes.into_iter().map(Scope).collect())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|s| s.0.clone()).collect()
    }

    fn has_wildcard(&self) -> bool {
        self.0.iter().any(Scope::is_wildcard)
    }

    /// Whether this holds `*`: every right in the tenant.
    pub fn holds_everything(&self) -> bool {
        self.has_wildcard()
    }

    pub fn grants(&self, capability: Capability) -> bool {
        self.has_wildcard() || self.0.iter().any(|s| s.0 == capability.key())
    }

    /// Whether holding `self` includes holding `scope`.
    pub fn covers(&self, scope: &Scope) -> bool {
        self.has_wildcard() || self.0.contains(scope)
    }

    /// The scopes in `requested` that `self` does not hold: what a holder of `self` may not hand out.
    pub fn not_covered<'a>(&self, requested: &'a ScopeSet) -> Vec<&'a Scope> {
        requested.iter().filter(|s| !self.covers(s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(scopes: &[&str]) -> ScopeSet {
        ScopeSet::parse_list(
            &FieldPath::body("scopes"),
            &scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn wildcard_grants_every_capability() {
        let all = set(&["*"]);
        for capability in Capability::ALL {
            assert!(all.grants(capability));
        }
    }

    #[test]
    fn a_capability_is_granted_only_by_its_own_key() {
        let read = set(&["api_tokens:read", "billing:write"]);
        assert!(read.grants(Capability::ApiTokensRead));
        assert!(!read.grants(Capability::ApiTokensWrite));
        assert!(!read.grants(Capability::AuthManage));
    }

    #[test]
    fn custom_scopes_confer_no_capability() {
        let custom = set(&["deploy", "api_tokens:admin", "api_tokens"]);
        for capability in Capability::ALL {
            assert!(!custom.grants(capability));
        }
    }

    #[test]
    fn delegation_is_limited_to_what_is_held() {
        let holder = set(&["api_tokens:write", "billing:read"]);
        let ok = set(&["billing:read"]);
        let too_much = set(&["billing:read", "billing:write", "*"]);
        assert!(holder.not_covered(&ok).is_empty());
        let missing: Vec<_> = holder
            .not_covered(&too_much)
            .into_iter()
            .map(Scope::as_str)
            .collect();
        assert_eq!(missing, ["billing:write", "*"]);
        assert!(set(&["*"]).not_covered(&too_much).is_empty());
    }

    #[test]
    fn grammar_rejects_bad_scopes_with_their_index() {
        let raw: Vec<String> = ["ok", "", "has space", "ok", "é", "*x"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let errors = ScopeSet::parse_list(&FieldPath::body("scopes"), &raw).unwrap_err();
        let rendered: Vec<_> = errors
            .iter()
            .map(|e| (e.path.to_string(), e.code))
            .collect();
        assert_eq!(
            rendered,
            [
                ("scopes[1]".to_string(), codes::INVALID_SCOPE),
                ("scopes[2]".to_string(), codes::INVALID_SCOPE),
                ("scopes[3]".to_string(), codes::DUPLICATE),
                ("scopes[4]".to_string(), codes::INVALID_SCOPE),
                ("scopes[5]".to_string(), codes::INVALID_SCOPE),
            ]
        );
    }

    #[test]
    fn too_long_and_too_many() {
        assert!(Scope::parse(&"a".repeat(128)).is_ok());
        assert!(Scope::parse(&"a".repeat(129)).is_err());
        let many: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
        let errors = ScopeSet::parse_list(&FieldPath::body("scopes"), &many).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].code, codes::TOO_MANY);
        let exactly: Vec<String> = (0..MAX_SCOPES).map(|i| format!("s{i}")).collect();
        assert!(ScopeSet::parse_list(&FieldPath::body("scopes"), &exactly).is_ok());
    }

    proptest! {
        #[test]
        fn parsed_scopes_are_always_covered_by_themselves_and_by_wildcard(
            raw in prop::collection::vec("[a-z0-9][a-z0-9_.:/-]{0,20}", 0..10)
        ) {
            let mut unique = raw.clone();
            unique.sort();
            unique.dedup();
            let parsed = ScopeSet::parse_list(&FieldPath::body("scopes"), &unique).unwrap();
            prop_assert!(parsed.not_covered(&parsed).is_empty());
            prop_assert!(ScopeSet::wildcard().not_covered(&parsed).is_empty());
            let has_capability = Capability::ALL.iter().any(|c| parsed.grants(*c));
            prop_assert_eq!(has_capability, unique.iter().any(|s| Capability::from_key(s).is_some()));
        }

        #[test]
        fn scope_parse_never_panics(input in ".{0,200}") {
            let _ = Scope::parse(&input);
        }
    }
}
