//! Where a reader of an organization's audit trail stands: the last event it had, as `<seq>-<tag>`.
//!
//! A `seq` alone cannot tell the event a reader saw from another at that seq: after a restore
//! from a backup (or a failover that lost the last commits) the chain goes back and new events
//! take the seqs of the lost ones. The tag, a short hash of the event's chain hash, can; and since
//! each chain hash covers every event before it, an event found with its tag means the whole
//! trail up to it is the one the reader saw. The revocation stream's `ids=seq_hash` event ids and
//! the audit list's `after` cursor are both written so.

use sha2::{Digest, Sha256};

/// Hex digits of a tag.
const TAG_LENGTH: usize = 16;

/// The tag of the event whose chain hash is `chain_hash`: the first 8 bytes of the SHA-256 of
/// that hash, in lowercase hex. It tells one history's event from another's at the same seq, and
/// nothing more about the event.
pub fn event_tag(chain_hash: &[u8; 32]) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(chain_hash)[..TAG_LENGTH / 2])
}

/// One event of a tenant's chain as a reader names it: its seq and tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventPosition {
    pub seq: u64,
    tag: String,
}

impl EventPosition {
    /// The event at `seq` whose chain hash is `chain_hash`.
    pub fn of(seq: u64, chain_hash: &[u8; 32]) -> Self {
        Self {
            seq,
            tag: event_tag(chain_hash),
        }
    }

    /// The same, from the chain hash as events show it (lowercase or uppercase hex).
    pub fn of_hex(seq: u64, chain_hash: &str) -> Option<Self> {
        let bytes = data_encoding::HEXLOWER_PERMISSIVE
            .decode(chain_hash.as_bytes())
            .ok()?;
        Some(Self::of(seq, &bytes.try_into().ok()?))
    }

    /// `<seq>-<tag>`: a decimal seq, `-`, 16 lowercase hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        let (seq, tag) = text.split_once('-')?;
        let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
        let well_formed = !seq.is_empty()
            && seq.bytes().all(|b| b.is_ascii_digit())
            && tag.len() == TAG_LENGTH
            && tag.bytes().all(hex);
        if !well_formed {
            return None;
        }
        Some(Self {
            seq: seq.parse().ok()?,
            tag: tag.to_string(),
        })
    }

    /// Whether the event with chain hash `chain_hash` at this seq is this one.
    pub fn names(&self, chain_hash: &[u8; 32]) -> bool {
        self.tag == event_tag(chain_hash)
    }

    /// The tag alone (an event id's part after the `-`).
    pub fn tag(&self) -> &str {
        &self.tag
    }
}

impl std::fmt::Display for EventPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.seq, self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_reads_back_and_names_only_its_event() {
        let hash = [7u8; 32];
        let position = EventPosition::of(42, &hash);
        let written = position.to_string();
        assert_eq!(EventPosition::parse(&written), Some(position.clone()));
        assert!(position.names(&hash));
        assert!(!position.names(&[8u8; 32]));
        let hex = crate::audit::hash_hex(&hash);
        assert_eq!(EventPosition::of_hex(42, &hex), Some(position.clone()));
        assert_eq!(
            EventPosition::of_hex(42, &hex.to_uppercase()),
            Some(position)
        );
        for bad in [
            "42",
            "-0123456789abcdef",
            "42-0123456789ABCDEF",
            "42-0123456789abcde",
            "4 2-0123456789abcdef",
            "99999999999999999999999-0123456789abcdef",
        ] {
            assert_eq!(EventPosition::parse(bad), None, "{bad}");
        }
        assert_eq!(EventPosition::of_hex(1, "abc"), None);
    }
}
