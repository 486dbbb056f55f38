//! The glob matcher on any glob and name (split at the first newline): never panics, and agrees
//! with the obvious backtracking matcher wherever that one is cheap enough to run.
#![no_main]

use keyplane_core::glob;
use libfuzzer_sys::fuzz_target;

fn reference(glob: &[u8], name: &[u8]) -> bool {
    match glob {
        [] => name.is_empty(),
        [b'*', b'*', rest @ ..] => (0..=name.len()).any(|i| reference(rest, &name[i..])),
        [b'*', rest @ ..] => {
            let segment_end = name.iter().position(|&c| c == b'/').unwrap_or(name.len());
            (0..=segment_end).any(|i| reference(rest, &name[i..]))
        }
        [c, rest @ ..] => name.first() == Some(c) && reference(rest, &name[1..]),
    }
}

fuzz_target!(|text: &str| {
    let (pattern, name) = text.split_once('\n').unwrap_or((text, ""));
    let matched = glob::matches(pattern, name);
    if glob::wildcard_count(pattern) <= 4 && name.len() <= 24 {
        assert_eq!(
            matched,
            reference(pattern.as_bytes(), name.as_bytes()),
            "{pattern:?} ~ {name:?}"
        );
    }
});
