//! Container-registry rules: robot names and permissions, the login name, project names, the
//! Distribution token scopes a client asks for, and what a robot is granted of them.

use crate::error::{codes, FieldError, FieldPath};
use crate::glob;
use crate::ids::TenantId;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

/// A tenant's registry project. keyplane does not enforce quotas; `quota_gb` -1 means unlimited,
/// as in Harbor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    pub id: uuid::Uuid,
    pub tenant_id: TenantId,
    pub project: String,
    pub quota_gb: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The name of the default robot `POST /registry` creates.
pub const DEFAULT_ROBOT_NAME: &str = "default";

/// Harbor's rule for robot and project names.
pub fn is_harbor_name(name: &str) -> bool {
    // ^[a-z0-9]+(?:[._-][a-z0-9]+)*$
    let mut previous_separator = true;
    for c in name.chars() {
        let separator = matches!(c, '.' | '_' | '-');
        if separator && previous_separator {
            return false;
        }
        if !(separator || c.is_ascii_lowercase() || c.is_ascii_digit()) {
            return false;
        }
        previous_separator = separator;
    }
    !name.is_empty() && !previous_separator
}

pub const MAX_ROBOT_NAME: usize = 120;

pub fn robot_name(path: FieldPath, raw: &str) -> Result<String, FieldError> {
    if raw.is_empty() || raw.len() > MAX_ROBOT_NAME {
        return Err(FieldError::new(
            path,
            if raw.is_empty() {
                codes::TOO_SHORT
            } else {
                codes::TOO_LONG
            },
            format!("must have 1 to {MAX_ROBOT_NAME} characters"),
        ));
    }
    if !is_harbor_name(raw) {
        return Err(FieldError::new(
            path,
            codes::INVALID_FORMAT,
            "must match ^[a-z0-9]+(?:[._-][a-z0-9]+)*$ (lowercase letters and digits, single . _ - between them)",
        ));
    }
    Ok(raw.to_string())
}

/// The project name for an organization: its name lowercased, runs of other characters turned
/// into single `-`, so it satisfies Harbor's rule. `None` if nothing usable is left.
pub fn project_slug(org_name: &str) -> Option<String> {
    let mut slug = String::new();
    for c in org_name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            slug.push(c);
        } else if !slug.is_empty() && !slug.ends_with('-') {
            slug.push('-');
        }
    }
    let slug = slug
        .trim_end_matches('-')
        .chars()
        .take(60)
        .collect::<String>();
    let slug = slug.trim_end_matches('-').to_string();
    (!slug.is_empty()).then_some(slug)
}

/// The registry login name: `robot$<project>+<name>`.
pub fn robot_username(project: &str, name: &str) -> String {
    format!("robot${project}+{name}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RegistryAction {
    Pull,
    Push,
    Delete,
}

impl RegistryAction {
    pub const ALL: [RegistryAction; 3] = [
        RegistryAction::Pull,
        RegistryAction::Push,
        RegistryAction::Delete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RegistryAction::Pull => "pull",
            RegistryAction::Push => "push",
            RegistryAction::Delete => "delete",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == text)
    }
}

/// Distribution's limit on a repository name, in bytes.
pub const MAX_REPOSITORY_NAME: usize = 255;
/// The most resource scopes one token request may ask for.
pub const MAX_REQUESTED_SCOPES: usize = 32;
/// The most permissions a robot may hold.
pub const MAX_PERMISSIONS: usize = 50;

/// One path component of a Distribution repository name:
/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`.
fn is_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let mut i = 0;
    loop {
        let run_start = i;
        while bytes
            .get(i)
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            i += 1;
        }
        if i == run_start {
            return false;
        }
        match bytes.get(i) {
            None => return true,
            Some(b'.') => i += 1,
            Some(b'_') if bytes.get(i + 1) == Some(&b'_') => i += 2,
            Some(b'_') => i += 1,
            Some(b'-') => {
                while bytes.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            Some(_) => return false,
        }
    }
}

/// A canonical repository name of the Distribution grammar: path components separated by `/`
/// (so no empty segment and no `..`), at most 255 bytes.
pub fn is_repository_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_REPOSITORY_NAME && name.split('/').all(is_path_component)
}

/// Why a permission was refused: one of [`codes`] and a message for the field error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionError {
    pub code: &'static str,
    pub message: String,
}

impl PermissionError {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// `pull`, `push` or `delete`, optionally narrowed to repositories of the project matching a glob
/// (`push:team-a/*`). In a glob, `*` matches within one path segment and `**` across segments.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RobotPermission {
    pub action: RegistryAction,
    pub repository: Option<String>,
}

impl RobotPermission {
    /// A permission as a client gives it. The glob is bounded (at most [`glob::MAX_GLOB_LEN`]
    /// bytes and [`glob::MAX_WILDCARDS`] wildcards) and its literal parts are those of a
    /// canonical repository name: read with each wildcard as one letter, it is one.
    pub fn parse(text: &str) -> Result<Self, PermissionError> {
        if text
            .split_once(':')
            .is_some_and(|(_, glob)| glob.len() > glob::MAX_GLOB_LEN)
        {
            return Err(PermissionError::new(
                codes::TOO_LONG,
                format!(
                    "the repository glob must have at most {} bytes",
                    glob::MAX_GLOB_LEN
                ),
            ));
        }
        let permission =
            Self::parse_stored(text).map_err(|m| PermissionError::new(codes::INVALID_FORMAT, m))?;
        if let Some(glob) = &permission.repository {
            if glob::wildcard_count(glob) > glob::MAX_WILDCARDS {
                return Err(PermissionError::new(
                    codes::TOO_MANY,
                    format!(
                        "the repository glob may hold at most {} wildcards (`*` or `**`)",
                        glob::MAX_WILDCARDS
                    ),
                ));
            }
            if glob.contains("***") || !is_repository_name(&glob::with_wildcards_as_letters(glob)) {
                return Err(PermissionError::new(
                    codes::INVALID_FORMAT,
                    "the repository glob must be a repository path relative to the project: \
                     components of lowercase letters and digits joined by one `.`, `_`, `__` or \
                     dashes, separated by single `/`, where `*` stands for part of one component \
                     and `**` for any path",
                ));
            }
        }
        Ok(permission)
    }

    /// A permission as stored. Looser than [`parse`](Self::parse), which tightened the glob
    /// later: robots created before keep loading, and the matcher is linear whatever the glob.
    pub fn parse_stored(text: &str) -> Result<Self, &'static str> {
        let (action, repository) = match text.split_once(':') {
            Some((action, glob)) => (action, Some(glob)),
            None => (text, None),
        };
        let action =
            RegistryAction::parse(action).ok_or("the action must be pull, push or delete")?;
        if let Some(glob) = repository {
            let valid = !glob.is_empty()
                && glob.len() <= 255
                && glob.split('/').all(|segment| {
                    !segment.is_empty()
                        && segment.chars().all(|c| {
                            c.is_ascii_lowercase() || c.is_ascii_digit() || "._-*".contains(c)
                        })
                });
            if !valid {
                return Err("the repository glob must be a path of lowercase letters, digits, `._-` and `*`, relative to the project");
            }
        }
        Ok(Self {
            action,
            repository: repository.map(str::to_string),
        })
    }

    /// At least one permission, as Harbor requires: a robot that may do nothing is a mistake. A
    /// list over [`MAX_PERMISSIONS`] is refused before its items are read; duplicates are found
    /// with a set, so the cost stays linear in the request.
    pub fn parse_list(path: &FieldPath, raw: &[String]) -> Result<Vec<Self>, Vec<FieldError>> {
        if raw.len() > MAX_PERMISSIONS {
            return Err(vec![FieldError::new(
                path.clone(),
                codes::TOO_MANY,
                format!("at most {MAX_PERMISSIONS} permissions"),
            )]);
        }
        let mut errors = Vec::new();
        if raw.is_empty() {
            errors.push(FieldError::new(
                path.clone(),
                codes::TOO_SHORT,
                "at least one permission is required",
            ));
        }
        let mut seen = std::collections::HashSet::with_capacity(raw.len());
        let mut permissions: Vec<Self> = Vec::with_capacity(raw.len());
        for (index, text) in raw.iter().enumerate() {
            match Self::parse(text) {
                Ok(p) if !seen.insert(p.clone()) => errors.push(FieldError::new(
                    path.index(index),
                    codes::DUPLICATE,
                    "this permission is listed twice",
                )),
                Ok(p) => permissions.push(p),
                Err(error) => errors.push(FieldError::new(
                    path.index(index),
                    error.code,
                    error.message,
                )),
            }
        }
        if errors.is_empty() {
            Ok(permissions)
        } else {
            Err(errors)
        }
    }

    pub fn to_wire(&self) -> String {
        match &self.repository {
            Some(glob) => format!("{}:{glob}", self.action.as_str()),
            None => self.action.as_str().to_string(),
        }
    }

    /// Whether this permission allows `action` on `repository` (a path relative to the project).
    pub fn allows(&self, action: RegistryAction, repository: &str) -> bool {
        self.action == action
            && self
                .repository
                .as_deref()
                .is_none_or(|glob| glob::matches(glob, repository))
    }
}

/// One `scope` of a Distribution token request: `repository:<name>:<actions>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceScope {
    pub resource_type: String,
    pub name: String,
    pub actions: Vec<String>,
}

/// Why a token request's scopes were refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeError {
    /// Scope number `position` (from 1) is not `type:name:action,...` of the Distribution grammar.
    Malformed { position: usize },
    /// Scope number `position` names no canonical repository.
    InvalidName { position: usize },
    /// More than [`MAX_REQUESTED_SCOPES`].
    TooMany,
}

impl std::fmt::Display for ScopeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScopeError::Malformed { position } => write!(
                f,
                "scope {position} is not `type:name:actions` (type of [a-z0-9], actions of [a-z*] separated by `,`)"
            ),
            ScopeError::InvalidName { position } => write!(
                f,
                "scope {position} does not name a canonical repository: lowercase components \
                 ([a-z0-9] joined by one `.`, `_`, `__` or dashes) separated by single `/`, at \
                 most {MAX_REPOSITORY_NAME} bytes"
            ),
            ScopeError::TooMany => {
                write!(f, "at most {MAX_REQUESTED_SCOPES} scopes may be requested at once")
            }
        }
    }
}

fn is_resource_type_value(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// `repository` or `repository(plugin)`; the class does not change the rules (Distribution
/// ignores it), so only the type is kept.
fn resource_type(text: &str) -> Option<&str> {
    let (value, class) = match text.split_once('(') {
        Some((value, rest)) => (value, Some(rest.strip_suffix(')')?)),
        None => (text, None),
    };
    (is_resource_type_value(value) && class.is_none_or(is_resource_type_value)).then_some(value)
}

/// Parses every `scope` parameter of a token request (each may hold several, space-separated) in
/// the Distribution grammar. Any scope that does not follow it refuses the request (RFC 6749
/// §5.2 `invalid_scope`); a well-formed scope the robot may not use is granted nothing, which is
/// not an error (Distribution's token spec).
pub fn parse_scopes<'a>(
    values: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<ResourceScope>, ScopeError> {
    let mut scopes = Vec::new();
    for scope in values
        .into_iter()
        .flat_map(|value| value.split(' '))
        .filter(|s| !s.is_empty())
    {
        if scopes.len() == MAX_REQUESTED_SCOPES {
            return Err(ScopeError::TooMany);
        }
        let position = scopes.len() + 1;
        let malformed = ScopeError::Malformed { position };
        let (resource_type, rest) = scope.split_once(':').ok_or(malformed.clone())?;
        let (name, actions) = rest.rsplit_once(':').ok_or(malformed.clone())?;
        let resource_type = self::resource_type(resource_type).ok_or(malformed.clone())?;
        let actions = actions.split(',');
        if !actions
            .clone()
            .all(|a| a.bytes().all(|c| c.is_ascii_lowercase() || c == b'*'))
        {
            return Err(malformed);
        }
        if !is_repository_name(name) {
            return Err(ScopeError::InvalidName { position });
        }
        scopes.push(ResourceScope {
            resource_type: resource_type.to_string(),
            name: name.to_string(),
            actions: actions
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect(),
        });
    }
    Ok(scopes)
}

/// About how much glob matching [`grant_access`] does for these scopes, in steps of the matcher
/// (one 64-bit word of a name's positions for one glob byte, plus one per name byte): a few
/// nanoseconds each. At most `MAX_REQUESTED_SCOPES × MAX_PERMISSIONS × (255 × 4 + 255)`, about
/// 2 × 10⁶ (some 13 ms on one core, BENCHMARKS.md), so an async caller moves a large one to a
/// blocking thread.
pub fn grant_cost(permissions: &[RobotPermission], requested: &[ResourceScope]) -> usize {
    let globs = || permissions.iter().filter_map(|p| p.repository.as_deref());
    let glob_bytes: usize = globs().map(str::len).sum();
    let glob_count = globs().count();
    requested
        .iter()
        .map(|scope| {
            let name = scope.name.len();
            glob_bytes * (name / 64 + 1) + glob_count * name
        })
        .sum()
}

/// One entry of the JWT `access` claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantedAccess {
    pub resource_type: String,
    pub name: String,
    pub actions: Vec<String>,
}

/// The intersection of what was asked and what the robot's permissions allow, never outside its
/// own project. Entries granted nothing are left out.
pub fn grant_access(
    permissions: &[RobotPermission],
    project: &str,
    requested: &[ResourceScope],
) -> Vec<GrantedAccess> {
    let mut granted: Vec<GrantedAccess> = Vec::new();
    for scope in requested {
        if scope.resource_type != "repository" {
            continue;
        }
        let Some(repository) = scope
            .name
            .strip_prefix(project)
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|rest| !rest.is_empty() && is_repository_name(&scope.name))
        else {
            continue;
        };
        // Each permission's glob runs at most once per scope, however often an action is asked.
        let mut decided: [Option<bool>; 3] = [None; 3];
        let mut allowed = |action: RegistryAction| {
            *decided[action as usize]
                .get_or_insert_with(|| permissions.iter().any(|p| p.allows(action, repository)))
        };
        let mut actions: Vec<String> = Vec::new();
        let mut add = |action: &str| {
            if !actions.iter().any(|a| a == action) {
                actions.push(action.to_string());
            }
        };
        for asked in &scope.actions {
            match asked.as_str() {
                // `*` is granted whole only to a robot holding every action; otherwise as the
                // actions it does hold (the registry checks each action on its own).
                "*" if RegistryAction::ALL.into_iter().all(&mut allowed) => add("*"),
                "*" => RegistryAction::ALL
                    .into_iter()
                    .filter(|a| allowed(*a))
                    .for_each(|a| add(a.as_str())),
                other => {
                    if RegistryAction::parse(other).is_some_and(&mut allowed) {
                        add(other)
                    }
                }
            }
        }
        if actions.is_empty() {
            continue;
        }
        match granted.iter_mut().find(|g| g.name == scope.name) {
            Some(existing) => {
                for action in actions {
                    if !existing.actions.contains(&action) {
                        existing.actions.push(action);
                    }
                }
            }
            None => granted.push(GrantedAccess {
                resource_type: scope.resource_type.clone(),
                name: scope.name.clone(),
                actions,
            }),
        }
    }
    granted
}

/// docker/libtrust's key id, which Distribution 2.x matches against its `rootcertbundle`: SHA-256
/// of the DER SubjectPublicKeyInfo, first 30 bytes, base32 without padding, 12 groups of 4 joined
/// by `:`.
pub fn libtrust_key_id(spki_der: &[u8]) -> String {
    let digest = Sha256::digest(spki_der);
    let encoded = data_encoding::BASE32_NOPAD.encode(&digest[..30]);
    encoded
        .as_bytes()
        .chunks(4)
        .map(|chunk| std::str::from_utf8(chunk).unwrap_or(""))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perms(list: &[&str]) -> Vec<RobotPermission> {
        list.iter()
            .map(|p| RobotPermission::parse(p).unwrap())
            .collect()
    }

    fn ask(scope: &str) -> Vec<ResourceScope> {
        parse_scopes([scope]).unwrap()
    }

    fn actions(granted: &[GrantedAccess]) -> Vec<(String, Vec<String>)> {
        granted
            .iter()
            .map(|g| (g.name.clone(), g.actions.clone()))
            .collect()
    }

    #[test]
    fn libtrust_kid_matches_the_recipe_vector() {
        let spki = data_encoding::BASE64
            .decode(b"MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEHSxydD5kV6dKAcyrceuShOfEyD/A15K0LXzG5RzJt8D1mbD5WwZs+4BM1BI3EooqyHbFBbjh6vgQUmuu0CneGA==")
            .unwrap();
        assert_eq!(
            libtrust_key_id(&spki),
            "PDRY:FLUS:F75S:LWAS:LCHR:FGRP:FSEB:VYRQ:MYAW:RLVE:JEUU:OKU6"
        );
    }

    #[test]
    fn harbor_names() {
        for ok in ["ci", "a", "ci-bot", "a.b_c-d", "x1"] {
            assert!(is_harbor_name(ok), "{ok}");
        }
        for bad in [
            "", "CI", "-ci", "ci-", "a--b", "a.-b", "a b", "robot$x", "é",
        ] {
            assert!(!is_harbor_name(bad), "{bad}");
        }
    }

    #[test]
    fn project_slugs() {
        assert_eq!(project_slug("default").as_deref(), Some("default"));
        assert_eq!(project_slug("Acme Corp!").as_deref(), Some("acme-corp"));
        assert_eq!(project_slug("  --Team__A--  ").as_deref(), Some("team-a"));
        assert_eq!(project_slug("日本"), None);
        assert!(is_harbor_name(&project_slug(&"Ab ".repeat(50)).unwrap()));
    }

    #[test]
    fn permission_grammar() {
        assert_eq!(
            RobotPermission::parse("push:team-a/*").unwrap().to_wire(),
            "push:team-a/*"
        );
        assert!(RobotPermission::parse("admin").is_err());
        assert!(RobotPermission::parse("pull:").is_err());
        assert!(RobotPermission::parse("pull:A/b").is_err());
        assert!(RobotPermission::parse("pull:a//b").is_err());
        let errors = RobotPermission::parse_list(
            &FieldPath::body("permissions"),
            &["pull".into(), "pull".into(), "x".into()],
        )
        .unwrap_err();
        assert_eq!(
            errors
                .iter()
                .map(|e| e.path.to_string())
                .collect::<Vec<_>>(),
            ["permissions[1]", "permissions[2]"]
        );
    }

    #[test]
    fn grants_the_intersection_inside_the_project_only() {
        let robot = perms(&["pull", "push:team-a/*"]);
        assert_eq!(
            actions(&grant_access(
                &robot,
                "acme",
                &ask("repository:acme/team-a/app:pull,push")
            )),
            [(
                "acme/team-a/app".to_string(),
                vec!["pull".to_string(), "push".to_string()]
            )]
        );
        assert_eq!(
            actions(&grant_access(
                &robot,
                "acme",
                &ask("repository:acme/team-b/app:pull,push")
            )),
            [("acme/team-b/app".to_string(), vec!["pull".to_string()])]
        );
        // `*` within one segment only.
        assert_eq!(
            actions(&grant_access(
                &robot,
                "acme",
                &ask("repository:acme/team-a/x/y:push")
            )),
            []
        );
        // Another project, a prefix trick, the bare project, catalog: nothing.
        for outside in [
            "repository:other/app:pull",
            "repository:acme-evil/app:pull",
            "repository:acmex/app:pull",
            "repository:acme:pull",
            "registry:catalog:*",
        ] {
            assert!(
                grant_access(&robot, "acme", &ask(outside)).is_empty(),
                "{outside}"
            );
        }
    }

    #[test]
    fn star_needs_every_action_and_delete_is_separate() {
        let all = perms(&["pull", "push", "delete"]);
        let pull_push = perms(&["pull", "push"]);
        let asked = ask("repository:acme/app:*");
        assert_eq!(
            actions(&grant_access(&all, "acme", &asked)),
            [("acme/app".to_string(), vec!["*".to_string()])]
        );
        assert_eq!(
            actions(&grant_access(&pull_push, "acme", &asked)),
            [(
                "acme/app".to_string(),
                vec!["pull".to_string(), "push".to_string()]
            )]
        );
        assert!(grant_access(&[], "acme", &asked).is_empty());
        assert!(grant_access(&pull_push, "acme", &ask("repository:acme/app:delete")).is_empty());
    }

    #[test]
    fn scopes_parse_like_the_registry_sends_them() {
        let parsed = ask("repository:acme/app:pull,push repository(plugin):acme/p:pull ");
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].name, "acme/app");
        assert_eq!(parsed[0].actions, ["pull", "push"]);
        assert_eq!(parsed[1].resource_type, "repository");
        // Several scopes for one repository merge.
        let merged = grant_access(
            &perms(&["pull", "push"]),
            "acme",
            &ask("repository:acme/a:pull repository:acme/a:push"),
        );
        assert_eq!(
            actions(&merged),
            [(
                "acme/a".to_string(),
                vec!["pull".to_string(), "push".to_string()]
            )]
        );
        // A `**` glob spans segments.
        assert!(RobotPermission::parse("pull:team/**")
            .unwrap()
            .allows(RegistryAction::Pull, "team/a/b/c"));
    }

    #[test]
    fn canonical_repository_names() {
        for ok in [
            "a",
            "acme/app",
            "a.b/c_d/e__f/g-h/i---j",
            "x1/2y",
            &format!("a/{}", "b".repeat(253)),
        ] {
            assert!(is_repository_name(ok), "{ok}");
        }
        for bad in [
            "",
            "/",
            "a/",
            "/a",
            "a//b",
            "a/../b",
            "..",
            "a/./b",
            "a..b",
            "a.-b",
            "a___b",
            "a._b",
            "-a",
            "a-",
            "_a",
            "A/b",
            "a b",
            "a:5000/b",
            "é",
            "a\0",
            &format!("a/{}", "b".repeat(254)),
        ] {
            assert!(!is_repository_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn globs_are_bounded_and_canonical() {
        for ok in [
            "pull:team-a/*",
            "pull:team/**",
            "pull:**/cache",
            "pull:app-*-prod/**",
            "pull:*",
            "pull:**",
            "pull:a_*_b",
            "pull:*.*",
            &format!("pull:{}", "a".repeat(255)),
            &format!("pull:{}", "*a".repeat(16)),
            &format!("pull:{}", "a/**".repeat(16)),
        ] {
            assert!(RobotPermission::parse(ok).is_ok(), "{ok}");
        }
        let code = |text: &str| RobotPermission::parse(text).unwrap_err().code;
        assert_eq!(code(&format!("pull:{}", "a".repeat(256))), codes::TOO_LONG);
        assert_eq!(code(&format!("pull:{}b", "*a".repeat(17))), codes::TOO_MANY);
        assert_eq!(
            code(&format!("pull:{}", "**/a".repeat(17))),
            codes::TOO_MANY
        );
        for bad in [
            "pull:a..b",
            "pull:../x",
            "pull:a/./b",
            "pull:.*",
            "pull:*-",
            "pull:a._*",
            "pull:a___*",
            "pull:***",
            "pull:a/***/b",
            "pull:a//b",
            "pull:a/",
            "pull:A*",
            "pull:a:b",
            "pull:a b",
        ] {
            assert_eq!(code(bad), codes::INVALID_FORMAT, "{bad}");
        }
        // Robots made under the looser grammar keep loading.
        let old = format!("pull:a..b/{}", "*a".repeat(40));
        assert!(RobotPermission::parse(&old).is_err());
        let stored = RobotPermission::parse_stored(&old).unwrap();
        assert_eq!(stored.to_wire(), old);
        assert!(!stored.allows(RegistryAction::Pull, &"a".repeat(300)));
    }

    #[test]
    fn bad_requested_scopes_are_refused() {
        let one = |scope: &str| parse_scopes([scope]);
        for malformed in [
            "repository",
            "repository:acme/app",
            "Repository:acme/app:pull",
            "repository(:acme/app:pull",
            "repository(plugin:acme/app:pull",
            "repository():acme/app:pull",
            "repo-sitory:acme/app:pull",
            ":acme/app:pull",
            "repository:acme/app:pull,PUSH",
            "repository:acme/app:pull;rm",
        ] {
            assert_eq!(
                one(malformed),
                Err(ScopeError::Malformed { position: 1 }),
                "{malformed}"
            );
        }
        for invalid in [
            "repository::pull",
            "repository:acme/../other/app:pull",
            "repository:acme//app:pull",
            "repository:acme/app/:pull",
            "repository:Acme/app:pull",
            "repository:localhost:5000/acme/app:pull",
            "repository:acme/a..b:pull",
            &format!("repository:acme/{}:pull", "a".repeat(251)),
        ] {
            assert_eq!(
                one(invalid),
                Err(ScopeError::InvalidName { position: 1 }),
                "{invalid}"
            );
        }
        assert_eq!(
            parse_scopes(["repository:acme/a:pull", "repository:acme/b:pull x"]),
            Err(ScopeError::Malformed { position: 3 })
        );
        let many = vec!["repository:acme/a:pull"; MAX_REQUESTED_SCOPES + 1];
        assert_eq!(parse_scopes(many.clone()), Err(ScopeError::TooMany));
        assert_eq!(
            parse_scopes(many[1..].iter().copied()).unwrap().len(),
            MAX_REQUESTED_SCOPES
        );
        // Well-formed, with empty and unknown actions: parsed, and then granted nothing.
        let parsed = one("registry:catalog:* repository:acme/app:,admin,").unwrap();
        assert_eq!(parsed[1].actions, ["admin"]);
        assert!(grant_access(&perms(&["pull"]), "acme", &parsed).is_empty());
        assert_eq!(one("").unwrap(), []);
    }

    #[test]
    fn non_canonical_scopes_built_by_hand_get_nothing() {
        let scope = |name: &str| ResourceScope {
            resource_type: "repository".into(),
            name: name.into(),
            actions: vec!["pull".into()],
        };
        let robot = perms(&["pull"]);
        for name in ["acme/../other", "acme//app", "acme/App", "acme/app/"] {
            assert!(
                grant_access(&robot, "acme", &[scope(name)]).is_empty(),
                "{name}"
            );
        }
    }

    #[test]
    fn the_pathological_glob_is_granted_at_once() {
        // Before the linear matcher, this never returned.
        let robot =
            vec![RobotPermission::parse_stored(&format!("pull:{}b", "*a".repeat(60))).unwrap()];
        let name = format!("acme/{}", "a".repeat(249));
        let asked = ask(&format!("repository:{name}:pull,*,pull"));
        assert!(grant_access(&robot, "acme", &asked).is_empty());
        assert!(grant_cost(&robot, &asked) > 0);
        let allowed = ask(&format!("repository:{name}b:pull"));
        assert_eq!(
            actions(&grant_access(&robot, "acme", &allowed)),
            [(format!("{name}b"), vec!["pull".to_string()])]
        );
    }
}
