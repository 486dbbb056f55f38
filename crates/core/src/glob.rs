//! Repository globs of robot permissions (`push:team-a/*`): `*` matches within one path segment,
//! `**` across segments, every other byte itself.
//!
//! Matching never backtracks. It walks the glob once, keeping the set of name positions where
//! the part of the glob read so far can end, so its cost is at most
//! `(name length + 1) × glob length` byte steps whatever the wildcards (a backtracking matcher is
//! exponential in the number of `*`: `*a*a*a…*b` against 300 bytes never finishes). With the
//! bounds checked at creation ([`MAX_GLOB_LEN`], [`MAX_WILDCARDS`]) and the 255-byte repository
//! names the token service accepts, one match is a few microseconds at worst (BENCHMARKS.md,
//! "Registry glob worst case").

/// The longest glob a permission may hold, in bytes: as long as the longest repository name.
pub const MAX_GLOB_LEN: usize = 255;
/// The most wildcards (`*` or `**`, each counting once) a glob may hold.
pub const MAX_WILDCARDS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    Literal(&'a [u8]),
    /// `*`: any bytes but `/`.
    Star,
    /// `**`: any bytes.
    DoubleStar,
}

/// The glob as literals and wildcards; `***` reads as `**` then `*`.
fn tokens(glob: &[u8]) -> impl Iterator<Item = Token<'_>> {
    let mut rest = glob;
    std::iter::from_fn(move || {
        let token = match rest {
            [] => return None,
            [b'*', b'*', ..] => (Token::DoubleStar, 2),
            [b'*', ..] => (Token::Star, 1),
            _ => {
                let end = rest.iter().position(|&c| c == b'*').unwrap_or(rest.len());
                (Token::Literal(&rest[..end]), end)
            }
        };
        rest = &rest[token.1..];
        Some(token.0)
    })
}

/// The number of wildcards in `glob`, as [`MAX_WILDCARDS`] counts them.
pub fn wildcard_count(glob: &str) -> usize {
    tokens(glob.as_bytes())
        .filter(|t| !matches!(t, Token::Literal(_)))
        .count()
}

/// `glob` with every wildcard replaced by `a`: the shortest name it matches whose every wildcard
/// stands for something, which is canonical exactly when the glob's literal parts can be.
pub fn with_wildcards_as_letters(glob: &str) -> String {
    tokens(glob.as_bytes())
        .map(|t| match t {
            Token::Literal(bytes) => String::from_utf8_lossy(bytes).into_owned(),
            Token::Star | Token::DoubleStar => "a".to_string(),
        })
        .collect()
}

/// Whether `glob` matches all of `name`.
pub fn matches(glob: &str, name: &str) -> bool {
    let (glob, name) = (glob.as_bytes(), name.as_bytes());
    // Sets of positions 0..=name.len() as bit vectors, one bit per position.
    let words = name.len() / 64 + 1;
    // The index of each byte of the glob's literals among them (at most 255: `*` is not one).
    const NONE: u8 = u8::MAX;
    let mut slot = [NONE; 256];
    let mut distinct: u8 = 0;
    for &c in glob.iter().filter(|&&c| c != b'*') {
        if slot[usize::from(c)] == NONE {
            slot[usize::from(c)] = distinct;
            distinct += 1;
        }
    }
    let distinct = usize::from(distinct);
    // One allocation: the positions reachable so far, those before a byte other than `/`, and
    // for each byte of the glob those before that byte.
    let mut sets = vec![0u64; (2 + distinct) * words];
    let (reachable, rest) = sets.split_at_mut(words);
    let (not_slash, before) = rest.split_at_mut(words);
    for (i, &c) in name.iter().enumerate() {
        let bit = 1u64 << (i % 64);
        if c != b'/' {
            not_slash[i / 64] |= bit;
        }
        let s = slot[usize::from(c)];
        if s != NONE {
            before[usize::from(s) * words + i / 64] |= bit;
        }
    }
    reachable[0] = 1;
    for token in tokens(glob) {
        match token {
            Token::Literal(literal) => {
                for &c in literal {
                    // Keep the positions before a `c` and step over it.
                    let before_c = &before[usize::from(slot[usize::from(c)]) * words..][..words];
                    let mut carry = 0;
                    for (word, mask) in reachable.iter_mut().zip(before_c) {
                        let stepping = *word & mask;
                        *word = (stepping << 1) | carry;
                        carry = stepping >> 63;
                    }
                }
            }
            Token::Star => {
                // From each reachable position, every position up to the end of its run of
                // non-`/` bytes: adding the reachable bits of a run to the run's bits carries
                // through the rest of the run, and the changed bits are the ones now reachable.
                let mut carry = false;
                for (word, &run) in reachable.iter_mut().zip(not_slash.iter()) {
                    let (sum, overflow) = run.overflowing_add(*word & run);
                    let (sum, overflow_carry) = sum.overflowing_add(u64::from(carry));
                    carry = overflow || overflow_carry;
                    *word |= sum ^ run;
                }
            }
            Token::DoubleStar => {
                if let Some(first) = reachable.iter().position(|&w| w != 0) {
                    reachable[first] |= !0u64 << reachable[first].trailing_zeros();
                    reachable[first + 1..].fill(!0);
                    let top_bits = name.len() % 64 + 1;
                    if top_bits < 64 {
                        reachable[words - 1] &= (1u64 << top_bits) - 1;
                    }
                }
            }
        }
        if reachable.iter().all(|&w| w == 0) {
            return false;
        }
    }
    reachable[name.len() / 64] >> (name.len() % 64) & 1 == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The obvious recursive matcher the module replaces (exponential), memoized on
    /// `(glob left, name left)` so long inputs stay quick.
    fn reference(glob: &[u8], name: &[u8]) -> bool {
        fn go(
            glob: &[u8],
            name: &[u8],
            memo: &mut std::collections::HashMap<(usize, usize), bool>,
        ) -> bool {
            let key = (glob.len(), name.len());
            if let Some(&known) = memo.get(&key) {
                return known;
            }
            let result = match glob {
                [] => name.is_empty(),
                [b'*', b'*', rest @ ..] => (0..=name.len()).any(|i| go(rest, &name[i..], memo)),
                [b'*', rest @ ..] => {
                    let segment_end = name.iter().position(|&c| c == b'/').unwrap_or(name.len());
                    (0..=segment_end).any(|i| go(rest, &name[i..], memo))
                }
                [c, rest @ ..] => name.first() == Some(c) && go(rest, &name[1..], memo),
            };
            memo.insert(key, result);
            result
        }
        go(glob, name, &mut std::collections::HashMap::new())
    }

    #[test]
    fn wildcards_within_and_across_segments() {
        let cases = [
            ("team-a/*", "team-a/app", true),
            ("team-a/*", "team-a/x/y", false),
            ("team-a/*", "team-a/", true),
            ("team/**", "team/a/b/c", true),
            ("team/**", "team", false),
            ("**/cache", "a/b/cache", true),
            ("**/cache", "cache", false),
            ("app-*-prod", "app-web-prod", true),
            ("app-*-prod", "app-web/x-prod", false),
            ("a**b", "a/x/b", true),
            ("***", "a/b", true),
            ("*", "", true),
            ("", "", true),
            ("", "a", false),
            ("a", "a", true),
            ("a", "ab", false),
            ("**x*y", "x/xy", true),
            ("*x**", "/x", false),
        ];
        for (glob, name, expected) in cases {
            assert_eq!(matches(glob, name), expected, "{glob} ~ {name}");
            assert_eq!(reference(glob.as_bytes(), name.as_bytes()), expected);
        }
    }

    #[test]
    fn the_pathological_glob_answers_at_once() {
        // Exponential for the reference: 16 `*a` against 300 `a`s and no final `b`.
        let glob = format!("{}b", "*a".repeat(16));
        assert!(!matches(&glob, &"a".repeat(300)));
        assert!(matches(&glob, &format!("{}b", "a".repeat(300))));
        let glob = format!("{}b", "**a".repeat(16));
        assert!(!matches(&glob, &"a/".repeat(150)));
    }

    #[test]
    fn counts_and_letters() {
        assert_eq!(wildcard_count("a/**/b*c***"), 4);
        assert_eq!(with_wildcards_as_letters("team-*/**"), "team-a/a");
        assert_eq!(with_wildcards_as_letters("***"), "aa");
    }

    fn small_glob() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![Just("*"), Just("**"), Just("a"), Just("b"), Just("/")],
            0..10,
        )
        .prop_map(|parts| parts.concat())
    }

    fn small_name() -> impl Strategy<Value = String> {
        "[ab/]{0,12}"
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn agrees_with_the_reference(glob in small_glob(), name in small_name()) {
            prop_assert_eq!(matches(&glob, &name), reference(glob.as_bytes(), name.as_bytes()));
        }

        /// Any bytes, `*` runs of every length included.
        #[test]
        fn agrees_with_the_reference_on_any_text(glob in "[a*/.é]{0,10}", name in "[a/.é]{0,10}") {
            prop_assert_eq!(matches(&glob, &name), reference(glob.as_bytes(), name.as_bytes()));
        }

        /// A name built from the glob by filling each wildcard matches it.
        #[test]
        fn a_filled_in_glob_matches(glob in small_glob(), fill in "[ab]{0,3}", deep in "[ab/]{0,3}") {
            let name: String = tokens(glob.as_bytes())
                .map(|t| match t {
                    Token::Literal(bytes) => String::from_utf8(bytes.to_vec()).unwrap(),
                    Token::Star => fill.clone(),
                    Token::DoubleStar => deep.clone(),
                })
                .collect();
            prop_assert!(matches(&glob, &name), "{} ~ {}", glob, name);
            prop_assert!(reference(glob.as_bytes(), name.as_bytes()));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Names over several 64-bit words.
        #[test]
        fn agrees_with_the_reference_on_long_names(
            glob in proptest::collection::vec(prop_oneof![Just("*"), Just("**"), Just("a"), Just("b"), Just("/"), Just("ab")], 0..24)
                .prop_map(|parts| parts.concat()),
            name in "[ab/]{0,300}",
        ) {
            prop_assert_eq!(matches(&glob, &name), reference(glob.as_bytes(), name.as_bytes()));
        }

        /// Filled-in globs over several 64-bit words.
        #[test]
        fn a_long_filled_in_glob_matches(glob in small_glob(), fill in "[ab]{0,70}", deep in "[ab/]{0,70}") {
            let name: String = tokens(glob.as_bytes())
                .map(|t| match t {
                    Token::Literal(bytes) => String::from_utf8(bytes.to_vec()).unwrap(),
                    Token::Star => fill.clone(),
                    Token::DoubleStar => deep.clone(),
                })
                .collect();
            prop_assert!(matches(&glob, &name), "{} ~ {}", glob, name);
        }
    }
}
