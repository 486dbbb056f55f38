//! The JSON field reader over every create/update body (Aether API token, robot create and
//! update, Hybridbox service account and authorization): never panic, and a rejected body always
//! names at least one field.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    keyplane_server::fuzzing::read_create_bodies(bytes);
});
