//! Container-registry rules: robot names and permissions, the login name, project names, the
//! Distribution token scopes a client asks for, and what a robot is granted of them.

use crate::error::{codes, FieldError, FieldPath};
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

/// The most permissions one robot holds.
pub const MAX_PERMISSIONS: usize = 50;

/// `pull`, `push` or `delete`, optionally narrowed to repositories of the project matching a glob
/// (`push:team-a/*`). In a glob, `*` matches within one path segment and `**` across segments.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RobotPermission {
    pub action: RegistryAction,
    pub repository: Option<String>,
}

impl RobotPermission {
    pub fn parse(text: &str) -> Result<Self, &'static str> {
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
                Err(message) => errors.push(FieldError::new(
                    path.index(index),
                    codes::INVALID_FORMAT,
                    message,
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
                .is_none_or(|glob| glob_matches(glob.as_bytes(), repository.as_bytes()))
    }
}

fn glob_matches(glob: &[u8], text: &[u8]) -> bool {
    match glob {
        [] => text.is_empty(),
        [b'*', b'*', rest @ ..] => (0..=text.len()).any(|i| glob_matches(rest, &text[i..])),
        [b'*', rest @ ..] => {
            let segment_end = text.iter().position(|&c| c == b'/').unwrap_or(text.len());
            (0..=segment_end).any(|i| glob_matches(rest, &text[i..]))
        }
        [c, rest @ ..] => text.first() == Some(c) && glob_matches(rest, &text[1..]),
    }
}

/// One `scope` of a Distribution token request: `repository:<name>:<actions>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceScope {
    pub resource_type: String,
    pub name: String,
    pub actions: Vec<String>,
}

/// Parses every scope in a `scope` parameter (several may be space-separated). Malformed ones
/// are skipped: they are granted nothing.
pub fn parse_scopes(value: &str) -> Vec<ResourceScope> {
    value
        .split(' ')
        .filter(|s| !s.is_empty())
        .filter_map(|scope| {
            let (resource_type, rest) = scope.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            // `repository(plugin):name:pull`: the class does not change the rules.
            let resource_type = resource_type.split('(').next().unwrap_or(resource_type);
            (!name.is_empty()).then(|| ResourceScope {
                resource_type: resource_type.to_string(),
                name: name.to_string(),
                actions: actions
                    .split(',')
                    .filter(|a| !a.is_empty())
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
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
            .filter(|rest| !rest.is_empty())
        else {
            continue;
        };
        let allowed =
            |action: RegistryAction| permissions.iter().any(|p| p.allows(action, repository));
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
                "*" if RegistryAction::ALL.into_iter().all(allowed) => add("*"),
                "*" => RegistryAction::ALL
                    .into_iter()
                    .filter(|a| allowed(*a))
                    .for_each(|a| add(a.as_str())),
                other => {
                    if RegistryAction::parse(other).is_some_and(allowed) {
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
        parse_scopes(scope)
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
        let parsed = ask("repository:acme/app:pull,push repository(plugin):acme/p:pull bogus");
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
}
