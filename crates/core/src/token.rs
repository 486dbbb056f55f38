//! The token format: every secret keyplane mints is `<prefix><public part><random><crc32>`, all
//! lowercase hex after the prefix. The prefix lets secret scanners recognize a keyplane credential;
//! the CRC32 lets the server reject garbage and typos before any lookup. This format is a public
//! contract: never change an existing prefix or checksum rule.
//!
//! | kind            | shape                                         | length |
//! |-----------------|-----------------------------------------------|--------|
//! | API token       | `aether_` + 48 hex random + 8 hex crc         | 63     |
//! | service account | `hbx_sa_` + 16 hex public id + `_` + 48 + 8   | 80     |
//! | robot secret    | `kprobot_` + 48 hex random + 8 hex crc        | 64     |
//!
//! The CRC32 (IEEE) covers every character before it, prefix included, and is written as 8
//! lowercase hex digits, big-endian.

use crate::credential::{CredentialKind, TokenDisplay};
use crate::secret::{Plaintext, TokenHash};
use rand::{CryptoRng, RngCore};

/// 24 bytes = 192 bits from the OS CSPRNG: DESIGN.md's floor.
const RANDOM_BYTES: usize = 24;
const RANDOM_HEX: usize = RANDOM_BYTES * 2;
const CHECKSUM_HEX: usize = 8;
const PUBLIC_ID_BYTES: usize = 8;
const PUBLIC_ID_HEX: usize = PUBLIC_ID_BYTES * 2;
/// Longer input is rejected before any other work.
pub const MAX_TOKEN_LEN: usize = 128;

struct Format {
    kind: CredentialKind,
    prefix: &'static str,
    /// Whether a non-secret public id (plus `_`) follows the prefix.
    has_public_id: bool,
}

const FORMATS: [Format; 3] = [
    Format {
        kind: CredentialKind::ApiToken,
        prefix: "aether_",
        has_public_id: false,
    },
    Format {
        kind: CredentialKind::ServiceAccount,
        prefix: "hbx_sa_",
        has_public_id: true,
    },
    Format {
        kind: CredentialKind::RobotAccount,
        prefix: "kprobot_",
        has_public_id: false,
    },
];

/// Hybridbox's documented `token_prefix` for service-account tokens.
pub const SERVICE_ACCOUNT_TOKEN_PREFIX: &str = "hbx_sa";
/// Characters of random hex shown after `aether_` in an API token's display `prefix`.
const API_DISPLAY_HEX: usize = 8;

impl Format {
    fn of(kind: CredentialKind) -> &'static Format {
        FORMATS
            .iter()
            .find(|f| f.kind == kind)
            .expect("every credential kind has a token format")
    }

    /// The format whose prefix `token` starts with, nothing else checked.
    fn named_by(token: &str) -> Option<&'static Format> {
        FORMATS.iter().find(|f| token.starts_with(f.prefix))
    }

    fn public_len(&self) -> usize {
        if self.has_public_id {
            PUBLIC_ID_HEX + 1
        } else {
            0
        }
    }

    fn len(&self) -> usize {
        self.prefix.len() + self.public_len() + RANDOM_HEX + CHECKSUM_HEX
    }
}

/// A freshly minted secret: the plaintext (shown once), its hash (stored) and what may be displayed.
#[derive(Debug)]
pub struct Minted {
    pub plaintext: Plaintext,
    pub hash: TokenHash,
    pub display: TokenDisplay,
}

/// What a well-formed token says about itself before any lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedToken {
    pub kind: CredentialKind,
    pub hash: TokenHash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a keyplane token")]
    UnknownPrefix,
    #[error("token has the wrong length")]
    Length,
    #[error("token has characters outside its alphabet")]
    Alphabet,
    #[error("token checksum does not match")]
    Checksum,
}

pub fn mint(kind: CredentialKind, rng: &mut (impl RngCore + CryptoRng)) -> Minted {
    let format = Format::of(kind);
    let mut text = String::with_capacity(format.len());
    text.push_str(format.prefix);
    if format.has_public_id {
        text.push_str(&random_hex(rng, PUBLIC_ID_BYTES));
        text.push('_');
    }
    text.push_str(&random_hex(rng, RANDOM_BYTES));
    let checksum = crc32fast::hash(text.as_bytes());
    text.push_str(&format!("{checksum:08x}"));
    debug_assert_eq!(text.len(), format.len());

    let display = display_of(format, &text);
    let plaintext = Plaintext::new(text);
    Minted {
        hash: plaintext.hash(),
        plaintext,
        display,
    }
}

/// Checks prefix, length, alphabet and checksum, then hashes. Does no I/O and never panics.
pub fn parse(token: &str) -> Result<ParsedToken, FormatError> {
    Ok(ParsedToken {
        kind: kind_of(token)?,
        hash: TokenHash::of(token),
    })
}

/// The kind a token's format names, once its prefix, length, alphabet and checksum are checked:
/// [`parse`] without the hash, for a caller that may not need it. No I/O, never panics.
pub fn kind_of(token: &str) -> Result<CredentialKind, FormatError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(FormatError::Length);
    }
    let format = Format::named_by(token).ok_or(FormatError::UnknownPrefix)?;
    if token.len() != format.len() {
        return Err(FormatError::Length);
    }
    let bytes = token.as_bytes();
    let body = &bytes[format.prefix.len()..];
    let (public, secret) = body.split_at(format.public_len());
    if let Some((separator, public_id)) = public.split_last() {
        if *separator != b'_' || !is_lower_hex(public_id) {
            return Err(FormatError::Alphabet);
        }
    }
    if !is_lower_hex(secret) {
        return Err(FormatError::Alphabet);
    }
    let (covered, checksum) = bytes.split_at(bytes.len() - CHECKSUM_HEX);
    // Lowercase hex by now, so this cannot fail; decoded as bytes, without a `str` to check.
    let mut expected = [0u8; CHECKSUM_HEX / 2];
    hex::decode_to_slice(checksum, &mut expected).map_err(|_| FormatError::Alphabet)?;
    if crc32fast::hash(covered) != u32::from_be_bytes(expected) {
        return Err(FormatError::Checksum);
    }
    Ok(format.kind)
}

/// The kind a token's prefix names, nothing else checked: for a token already known to be
/// well-formed, as one whose key a cache holds is ([`crate::CacheKeyer::key_of_presented`]).
pub fn kind_named(token: &str) -> Option<CredentialKind> {
    Format::named_by(token).map(|format| format.kind)
}

fn display_of(format: &Format, text: &str) -> TokenDisplay {
    let last4 = text[text.len() - 4..].to_string();
    match format.kind {
        CredentialKind::ApiToken => TokenDisplay {
            prefix: text[..format.prefix.len() + API_DISPLAY_HEX].to_string(),
            public_id: None,
            last4,
        },
        CredentialKind::ServiceAccount => {
            let start = format.prefix.len();
            TokenDisplay {
                prefix: SERVICE_ACCOUNT_TOKEN_PREFIX.to_string(),
                public_id: Some(text[start..start + PUBLIC_ID_HEX].to_string()),
                last4,
            }
        }
        CredentialKind::RobotAccount => TokenDisplay {
            prefix: format.prefix.to_string(),
            public_id: None,
            last4,
        },
    }
}

fn random_hex(rng: &mut (impl RngCore + CryptoRng), n_bytes: usize) -> String {
    let mut buf = vec![0u8; n_bytes];
    rng.fill_bytes(&mut buf);
    hex::encode(buf)
}

fn is_lower_hex(bytes: &[u8]) -> bool {
    // Every byte is looked at, with no early exit, so that the loop vectorizes: it runs on each
    // verification, over a token that is almost always well-formed.
    bytes.iter().fold(true, |all, b| {
        all & (b.is_ascii_digit() | (b'a'..=b'f').contains(b))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::OsRng;

    const KINDS: [CredentialKind; 3] = [
        CredentialKind::ApiToken,
        CredentialKind::ServiceAccount,
        CredentialKind::RobotAccount,
    ];

    #[test]
    fn minted_tokens_parse_back_to_their_kind_and_hash() {
        for kind in KINDS {
            let minted = mint(kind, &mut OsRng);
            let parsed = parse(minted.plaintext.expose_secret()).unwrap();
            assert_eq!(parsed.kind, kind);
            assert!(parsed.hash.matches(&minted.hash));
        }
    }

    #[test]
    fn api_token_shape_and_display_prefix() {
        let minted = mint(CredentialKind::ApiToken, &mut OsRng);
        let text = minted.plaintext.expose_secret();
        assert_eq!(text.len(), 63);
        assert!(text.starts_with("aether_"));
        assert!(text["aether_".len()..]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(minted.display.prefix, &text[..15]);
        assert_eq!(minted.display.last4, &text[59..]);
    }

    #[test]
    fn service_account_token_display_parts() {
        let minted = mint(CredentialKind::ServiceAccount, &mut OsRng);
        let text = minted.plaintext.expose_secret();
        assert_eq!(minted.display.prefix, "hbx_sa");
        let public_id = minted.display.public_id.clone().unwrap();
        assert_eq!(public_id.len(), 16);
        assert!(text.starts_with(&format!("hbx_sa_{public_id}_")));
        assert!(text.ends_with(&minted.display.last4));
    }

    #[test]
    fn two_mints_differ() {
        let a = mint(CredentialKind::ApiToken, &mut OsRng);
        let b = mint(CredentialKind::ApiToken, &mut OsRng);
        assert_ne!(a.plaintext.expose_secret(), b.plaintext.expose_secret());
    }

    #[test]
    fn a_single_changed_character_fails_the_checksum() {
        let minted = mint(CredentialKind::ApiToken, &mut OsRng);
        let text = minted.plaintext.expose_secret();
        let mut bytes = text.as_bytes().to_vec();
        bytes[20] = if bytes[20] == b'a' { b'b' } else { b'a' };
        let tampered = String::from_utf8(bytes).unwrap();
        assert_eq!(parse(&tampered), Err(FormatError::Checksum));
    }

    #[test]
    fn rejects_wrong_prefix_length_and_alphabet() {
        let minted = mint(CredentialKind::ApiToken, &mut OsRng);
        let text = minted.plaintext.expose_secret();
        assert_eq!(parse("ghp_abc"), Err(FormatError::UnknownPrefix));
        assert_eq!(parse(""), Err(FormatError::UnknownPrefix));
        assert_eq!(parse(&text[..62]), Err(FormatError::Length));
        assert_eq!(
            parse(&text.to_uppercase().replacen("AETHER_", "aether_", 1)),
            Err(FormatError::Alphabet)
        );
        assert_eq!(parse(&"a".repeat(10_000)), Err(FormatError::Length));
    }

    proptest! {
        #[test]
        fn parse_never_panics(input in ".{0,200}") {
            let _ = parse(&input);
        }

        #[test]
        fn parse_never_panics_near_valid_shapes(
            prefix in prop::sample::select(vec!["aether_", "hbx_sa_", "kprobot_"]),
            rest in "[0-9a-f_\\u{00e9}\\u{1F600}]{0,90}",
        ) {
            let _ = parse(&format!("{prefix}{rest}"));
        }

        #[test]
        fn random_hex_bodies_almost_never_pass_the_checksum(rest in "[0-9a-f]{56}") {
            let candidate = format!("aether_{rest}");
            let checksum_ok = crc32fast::hash(&candidate.as_bytes()[..55]) == u32::from_str_radix(&candidate[55..], 16).unwrap();
            prop_assert_eq!(parse(&candidate).is_ok(), checksum_ok);
        }
    }
}
