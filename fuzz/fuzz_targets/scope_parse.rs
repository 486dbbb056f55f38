//! API-token scopes: one scope, and a list of them (one a line), never panic; an accepted scope
//! reads back as itself.
#![no_main]

use keyplane_core::{FieldPath, Scope, ScopeSet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(scope) = Scope::parse(text) {
        assert_eq!(scope.as_str(), text);
    }
    let list: Vec<String> = text.split('\n').map(str::to_string).collect();
    if let Ok(set) = ScopeSet::parse_list(&FieldPath::body("scopes"), &list) {
        for scope in set.iter() {
            assert!(set.covers(scope));
        }
    }
});
