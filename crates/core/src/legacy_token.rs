//! Keys in another system's format, imported by their hash (`keyplane admin import-credentials`)
//! and accepted under a prefix the operator configured (`serve --legacy-token-prefix
//! acme_live_=api-token`): a key that starts with it skips keyplane's length, alphabet and
//! checksum rules (which it was never minted under) but keeps the [`MAX_TOKEN_LEN`] cap, and its
//! kind is the configured one.
//!
//! Consulted only once a key has failed [`crate::token::kind_of`] (or, for the kind check of a
//! cached key, when [`crate::token::kind_named`] found no native prefix): a native token's path
//! does no more work with prefixes configured than without.

use crate::credential::CredentialKind;
use crate::token::MAX_TOKEN_LEN;

/// keyplane's own prefixes: a legacy prefix may not overlap one, or a mistyped native token
/// would skip its checksum.
const NATIVE_PREFIXES: [&str; 3] = ["aether_", "hbx_sa_", "kprobot_"];
/// The longest prefix accepted: leaves room for a secret within [`MAX_TOKEN_LEN`].
pub const MAX_PREFIX_LEN: usize = 32;

/// The configured legacy prefixes, longest first (so that of `acme_` and `acme_live_` the longer
/// decides).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LegacyPrefixes {
    prefixes: Vec<(String, CredentialKind)>,
}

impl LegacyPrefixes {
    /// From `PREFIX=KIND` specs (`KIND`: `api-token`, `service-account`, `robot`), each checked:
    /// a prefix of 3 to [`MAX_PREFIX_LEN`] printable ASCII characters without spaces, overlapping
    /// no keyplane prefix, and given once.
    pub fn parse<'a>(specs: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut prefixes: Vec<(String, CredentialKind)> = Vec::new();
        for spec in specs {
            let (prefix, kind) = Self::parse_one(spec)?;
            if prefixes.iter().any(|(known, _)| known == &prefix) {
                return Err(format!("the prefix `{prefix}` is given twice"));
            }
            prefixes.push((prefix, kind));
        }
        prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Ok(Self { prefixes })
    }

    /// One `PREFIX=KIND`.
    pub fn parse_one(spec: &str) -> Result<(String, CredentialKind), String> {
        let Some((prefix, kind)) = spec.rsplit_once('=') else {
            return Err(format!(
                "`{spec}` is not PREFIX=KIND (e.g. acme_live_=api-token)"
            ));
        };
        let kind = match kind {
            "api-token" => CredentialKind::ApiToken,
            "service-account" => CredentialKind::ServiceAccount,
            "robot" => CredentialKind::RobotAccount,
            other => {
                return Err(format!(
                    "`{other}` is not a kind: api-token, service-account or robot"
                ))
            }
        };
        if prefix.len() < 3 || prefix.len() > MAX_PREFIX_LEN {
            return Err(format!(
                "the prefix `{prefix}` must have 3 to {MAX_PREFIX_LEN} characters"
            ));
        }
        if !prefix.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a prefix must be printable ASCII without spaces".into());
        }
        if let Some(native) = NATIVE_PREFIXES
            .iter()
            .find(|native| native.starts_with(prefix) || prefix.starts_with(**native))
        {
            return Err(format!(
                "the prefix `{prefix}` overlaps keyplane's own `{native}`: keyplane tokens must \
                 keep their checksum"
            ));
        }
        Ok((prefix.to_string(), kind))
    }

    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// The kind a legacy key's prefix names: at most [`MAX_TOKEN_LEN`] bytes, printable ASCII
    /// without spaces, with something after the prefix. `None` for anything else.
    pub fn kind_of(&self, token: &str) -> Option<CredentialKind> {
        if self.prefixes.is_empty() || token.len() > MAX_TOKEN_LEN {
            return None;
        }
        let kind = self.kind_named(token)?;
        token.bytes().all(|b| b.is_ascii_graphic()).then_some(kind)
    }

    /// The kind the prefix names, nothing else checked: for a key already known to be
    /// well-formed, as one a cache holds is.
    pub fn kind_named(&self, token: &str) -> Option<CredentialKind> {
        self.prefixes
            .iter()
            .find(|(prefix, _)| token.len() > prefix.len() && token.starts_with(prefix.as_str()))
            .map(|(_, kind)| *kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_prefix_names_its_kind_longest_first() {
        let legacy =
            LegacyPrefixes::parse(["acme_=robot", "acme_live_=api-token", "sa-=service-account"])
                .unwrap();
        assert_eq!(
            legacy.kind_of("acme_live_0123abc"),
            Some(CredentialKind::ApiToken)
        );
        assert_eq!(
            legacy.kind_of("acme_other"),
            Some(CredentialKind::RobotAccount)
        );
        assert_eq!(legacy.kind_of("sa-x"), Some(CredentialKind::ServiceAccount));
        assert_eq!(
            legacy.kind_of("acme_live_"),
            Some(CredentialKind::RobotAccount)
        );
        assert_eq!(legacy.kind_of("acme_"), None, "nothing after the prefix");
        assert_eq!(legacy.kind_of("other_123"), None);
        assert_eq!(legacy.kind_of("acme_live_ with space"), None);
        let long = format!("acme_live_{}", "0".repeat(MAX_TOKEN_LEN));
        assert_eq!(legacy.kind_of(&long), None, "the length cap stays");
    }

    #[test]
    fn bad_specs_are_refused() {
        for spec in [
            "acme_live_",
            "acme_live_=token",
            "ae=api-token",
            "aether_=api-token",
            "aether_x=api-token",
            "aeth=api-token",
            "hbx=service-account",
            "kprobot_legacy_=robot",
            "has space=api-token",
        ] {
            assert!(LegacyPrefixes::parse_one(spec).is_err(), "{spec}");
        }
        assert!(LegacyPrefixes::parse(["acme_=api-token", "acme_=robot"]).is_err());
        assert!(LegacyPrefixes::parse_one("sk_live_=api-token").is_ok());
    }
}
