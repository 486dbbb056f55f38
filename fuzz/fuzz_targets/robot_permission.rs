//! Robot permissions: never panic; an accepted one reads back as itself, is also accepted as
//! stored, and its glob is within the bounds.
#![no_main]

use keyplane_core::glob;
use keyplane_core::{FieldPath, RobotPermission};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(permission) = RobotPermission::parse(text) {
        assert_eq!(permission.to_wire(), text);
        assert_eq!(
            RobotPermission::parse_stored(text).as_ref(),
            Ok(&permission)
        );
        if let Some(pattern) = &permission.repository {
            assert!(pattern.len() <= glob::MAX_GLOB_LEN);
            assert!(glob::wildcard_count(pattern) <= glob::MAX_WILDCARDS);
        }
    }
    if let Ok(stored) = RobotPermission::parse_stored(text) {
        assert_eq!(stored.to_wire(), text);
    }
    let list: Vec<String> = text.split('\n').map(str::to_string).collect();
    let _ = RobotPermission::parse_list(&FieldPath::body("permissions"), &list);
});
