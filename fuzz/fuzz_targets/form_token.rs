//! The introspection form reader: it finds the same `token` field as a full
//! application/x-www-form-urlencoded decoding, whatever the body.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    keyplane_server::fuzzing::read_form_token(bytes);
});
