//! The `scope` parameters of `/registry/token` (one parameter a line): never panic; what is
//! accepted names canonical repositories, and nothing outside the project is ever granted.
#![no_main]

use keyplane_core::registry::{
    grant_access, is_repository_name, parse_scopes, RobotPermission, MAX_REQUESTED_SCOPES,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let Ok(scopes) = parse_scopes(text.split('\n')) else {
        return;
    };
    assert!(scopes.len() <= MAX_REQUESTED_SCOPES);
    for scope in &scopes {
        assert!(is_repository_name(&scope.name), "{}", scope.name);
    }
    let permissions = [
        RobotPermission::parse("pull").unwrap(),
        RobotPermission::parse("push:team-*/**").unwrap(),
        RobotPermission::parse("delete:*a*a*b").unwrap(),
    ];
    for granted in grant_access(&permissions, "acme", &scopes) {
        assert!(granted.name.starts_with("acme/"), "{}", granted.name);
        assert_eq!(granted.resource_type, "repository");
        assert!(!granted.actions.is_empty());
    }
});
