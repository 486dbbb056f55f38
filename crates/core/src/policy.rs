//! A tenant's credential policy: how long its credentials may live, whether they must expire, the
//! lifetime a create without `expires_at` gets, and what a reported leak does. Also the expiry
//! warning stages the sweep announces.

use crate::credential::CredentialKind;
use crate::error::{codes, FieldError, FieldPath};
use chrono::{DateTime, TimeDelta, Utc};

/// The longest lifetime a policy can name, in days (100 years).
pub const MAX_POLICY_DAYS: u32 = 36_500;

/// Lifetime rules for one kind of credential, or for all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LifetimeRule {
    /// No credential may expire later than this many days after it is issued or rotated.
    pub max_lifetime_days: Option<u32>,
    /// Every credential must have an `expires_at`.
    pub require_expiry: bool,
    /// The lifetime given to a credential created without `expires_at`.
    pub default_lifetime_days: Option<u32>,
}

impl LifetimeRule {
    /// Whether the rule asks anything at all.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// A rule is coherent when its default fits its maximum.
    pub fn check(&self, path: &FieldPath) -> Vec<FieldError> {
        let mut errors = Vec::new();
        for (key, days) in [
            ("max_lifetime_days", self.max_lifetime_days),
            ("default_lifetime_days", self.default_lifetime_days),
        ] {
            if days.is_some_and(|d| d == 0 || d > MAX_POLICY_DAYS) {
                errors.push(FieldError::new(
                    path.key(key),
                    codes::OUT_OF_RANGE,
                    format!("must be from 1 to {MAX_POLICY_DAYS} days, or null"),
                ));
            }
        }
        if let (Some(default), Some(max)) = (self.default_lifetime_days, self.max_lifetime_days) {
            if default > max {
                errors.push(FieldError::new(
                    path.key("default_lifetime_days"),
                    codes::OUT_OF_RANGE,
                    "must not exceed max_lifetime_days",
                ));
            }
        }
        errors
    }

    /// The latest expiry this rule allows for a credential issued or rotated at `now`.
    pub fn latest_expiry(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.max_lifetime_days
            .map(|days| now + TimeDelta::days(i64::from(days)))
    }

    /// Whether a live credential with this expiry breaks the rule, measured from `now`.
    pub fn exceeded_by(&self, expires_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
        match (expires_at, self.latest_expiry(now)) {
            (None, _) => self.require_expiry || self.max_lifetime_days.is_some(),
            (Some(at), Some(latest)) => at > latest,
            (Some(_), None) => false,
        }
    }
}

/// What a reported leak does to the leaked credential.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LeakAction {
    #[default]
    Revoke,
    Suspend,
}

impl LeakAction {
    pub fn as_str(self) -> &'static str {
        match self {
            LeakAction::Revoke => "revoke",
            LeakAction::Suspend => "suspend",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [LeakAction::Revoke, LeakAction::Suspend]
            .into_iter()
            .find(|a| a.as_str() == text)
    }
}

/// A tenant's policy. A kind's own rule, when set, replaces `all` for that kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CredentialPolicy {
    pub all: LifetimeRule,
    pub api_tokens: Option<LifetimeRule>,
    pub service_accounts: Option<LifetimeRule>,
    pub robot_accounts: Option<LifetimeRule>,
    pub on_leak: LeakAction,
}

impl CredentialPolicy {
    /// The rule that applies to `kind`, and the name it goes by in errors.
    pub fn rule_for(&self, kind: CredentialKind) -> (&LifetimeRule, &'static str) {
        let (own, name) = match kind {
            CredentialKind::ApiToken => (&self.api_tokens, "api_tokens"),
            CredentialKind::ServiceAccount => (&self.service_accounts, "service_accounts"),
            CredentialKind::RobotAccount => (&self.robot_accounts, "robot_accounts"),
        };
        match own {
            Some(rule) => (rule, name),
            None => (&self.all, "all"),
        }
    }

    /// The expiry a credential of `kind` gets when issued or rotated at `now` with `requested`
    /// (the caller's `expires_at`, or the one it keeps): the default lifetime fills a missing one,
    /// an expiry up to [`CALLER_CLOCK_TOLERANCE`] past the latest the rule allows is accepted,
    /// and a result that breaks the policy is a field error on `path` that names the rule.
    pub fn expiry_for(
        &self,
        kind: CredentialKind,
        requested: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        path: FieldPath,
    ) -> Result<Option<DateTime<Utc>>, FieldError> {
        let (rule, name) = self.rule_for(kind);
        let expires_at = requested.or_else(|| {
            rule.default_lifetime_days
                .map(|days| now + TimeDelta::days(i64::from(days)))
        });
        match (expires_at, rule.latest_expiry(now)) {
            (None, latest) if rule.require_expiry || latest.is_some() => Err(FieldError::new(
                path,
                codes::POLICY_VIOLATION,
                format!(
                    "the organization's credential policy ({name}) requires an expiry{}",
                    rule.max_lifetime_days
                        .map(|d| format!(" at most {d} days ahead"))
                        .unwrap_or_default()
                ),
            )),
            (Some(at), Some(latest)) if at > latest + CALLER_CLOCK_TOLERANCE => {
                Err(FieldError::new(
                    path,
                    codes::POLICY_VIOLATION,
                    format!(
                    "the organization's credential policy ({name}: max_lifetime_days {}) allows \
                     an expiry at most that many days ahead",
                    rule.max_lifetime_days.unwrap_or_default()
                ),
                ))
            }
            _ => Ok(expires_at),
        }
    }

    /// Whether the rule for `kind` requires credentials to expire (explicitly, or by bounding
    /// their lifetime).
    pub fn requires_expiry(&self, kind: CredentialKind) -> bool {
        let (rule, _) = self.rule_for(kind);
        rule.require_expiry || rule.max_lifetime_days.is_some()
    }

    /// The expiry a credential of `kind` issued at `now` with no caller to choose one (a
    /// registry's default robot) gets: the default lifetime, else the latest the rule allows,
    /// else, when the rule requires an expiry without bounding it, the longest lifetime a policy
    /// can name. `None` when the rule asks for none. [`Self::expiry_for`] accepts it, so such a
    /// credential can always be issued.
    pub fn unrequested_expiry(
        &self,
        kind: CredentialKind,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let (rule, _) = self.rule_for(kind);
        let days = rule
            .default_lifetime_days
            .or(rule.max_lifetime_days)
            .or(rule.require_expiry.then_some(MAX_POLICY_DAYS))?;
        Some(now + TimeDelta::days(i64::from(days)))
    }
}

/// Days before `expires_at` at which a `credential.expiring` warning goes out, furthest first.
pub const EXPIRY_WARNING_DAYS: [u32; 3] = [30, 7, 1];

/// The warning stage a credential expiring at `expires_at` has reached at `now`: the nearest
/// warning (30, 7 or 1 days before), or 0 once it has expired; `None` before the first warning.
pub fn expiry_stage(expires_at: DateTime<Utc>, now: DateTime<Utc>) -> Option<u32> {
    if expires_at <= now {
        return Some(0);
    }
    EXPIRY_WARNING_DAYS
        .into_iter()
        .rev()
        .find(|days| expires_at - now <= TimeDelta::days(i64::from(*days)))
}

/// How far past the latest expiry a policy allows a requested one may lie: a client that asks for
/// the longest lifetime (`--expires-in 90d`) computes it from its own clock, which may run ahead.
pub const CALLER_CLOCK_TOLERANCE: TimeDelta = TimeDelta::seconds(60);

#[cfg(test)]
mod tests {
    use super::*;

    fn at(days: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap() + TimeDelta::days(days)
    }

    #[test]
    fn stages_are_the_nearest_warning_reached() {
        let now = at(0);
        assert_eq!(expiry_stage(at(31), now), None);
        assert_eq!(expiry_stage(at(30), now), Some(30));
        assert_eq!(expiry_stage(at(8), now), Some(30));
        assert_eq!(expiry_stage(at(7), now), Some(7));
        assert_eq!(expiry_stage(at(1), now), Some(1));
        assert_eq!(expiry_stage(now + TimeDelta::seconds(1), now), Some(1));
        assert_eq!(expiry_stage(now, now), Some(0));
        assert_eq!(expiry_stage(at(-3), now), Some(0));
    }

    #[test]
    fn a_kind_rule_replaces_the_general_one() {
        let policy = CredentialPolicy {
            all: LifetimeRule {
                max_lifetime_days: Some(90),
                ..Default::default()
            },
            robot_accounts: Some(LifetimeRule::default()),
            ..Default::default()
        };
        let now = at(0);
        let path = FieldPath::body("expires_at");
        assert!(policy
            .expiry_for(CredentialKind::ApiToken, Some(at(91)), now, path.clone())
            .is_err());
        assert!(policy
            .expiry_for(CredentialKind::ApiToken, None, now, path.clone())
            .is_err());
        assert_eq!(
            policy.expiry_for(CredentialKind::ApiToken, Some(at(90)), now, path.clone()),
            Ok(Some(at(90)))
        );
        // The longest lifetime by a client whose clock is ahead, kept as asked.
        let ahead = at(90) + TimeDelta::seconds(59);
        assert_eq!(
            policy.expiry_for(CredentialKind::ApiToken, Some(ahead), now, path.clone()),
            Ok(Some(ahead))
        );
        assert!(policy
            .expiry_for(
                CredentialKind::ApiToken,
                Some(at(90) + TimeDelta::seconds(61)),
                now,
                path.clone()
            )
            .is_err());
        assert_eq!(
            policy.expiry_for(CredentialKind::RobotAccount, None, now, path),
            Ok(None)
        );
    }

    #[test]
    fn the_default_lifetime_fills_a_missing_expiry() {
        let policy = CredentialPolicy {
            all: LifetimeRule {
                max_lifetime_days: Some(90),
                require_expiry: true,
                default_lifetime_days: Some(30),
            },
            ..Default::default()
        };
        let now = at(0);
        let got = policy
            .expiry_for(
                CredentialKind::ServiceAccount,
                None,
                now,
                FieldPath::body("expires_at"),
            )
            .unwrap();
        assert_eq!(got, Some(at(30)));
        let error = policy
            .expiry_for(
                CredentialKind::ServiceAccount,
                Some(at(100)),
                now,
                FieldPath::body("expires_at"),
            )
            .unwrap_err();
        assert!(
            error.message.contains("credential policy (all"),
            "{error:?}"
        );
    }

    #[test]
    fn an_unrequested_expiry_is_the_latest_the_rule_accepts() {
        let now = at(0);
        let path = FieldPath::body("expires_at");
        for (rule, expected) in [
            (LifetimeRule::default(), None),
            (
                LifetimeRule {
                    max_lifetime_days: Some(90),
                    default_lifetime_days: Some(30),
                    ..Default::default()
                },
                Some(at(30)),
            ),
            (
                LifetimeRule {
                    max_lifetime_days: Some(90),
                    ..Default::default()
                },
                Some(at(90)),
            ),
            (
                LifetimeRule {
                    require_expiry: true,
                    ..Default::default()
                },
                Some(at(i64::from(MAX_POLICY_DAYS))),
            ),
        ] {
            let policy = CredentialPolicy {
                robot_accounts: Some(rule),
                ..Default::default()
            };
            let got = policy.unrequested_expiry(CredentialKind::RobotAccount, now);
            assert_eq!(got, expected, "{rule:?}");
            assert_eq!(
                policy.expiry_for(CredentialKind::RobotAccount, got, now, path.clone()),
                Ok(expected),
                "{rule:?}"
            );
        }
    }

    #[test]
    fn exceeding_is_measured_from_now() {
        let rule = LifetimeRule {
            max_lifetime_days: Some(10),
            ..Default::default()
        };
        assert!(rule.exceeded_by(None, at(0)));
        assert!(rule.exceeded_by(Some(at(11)), at(0)));
        assert!(!rule.exceeded_by(Some(at(10)), at(0)));
        let require = LifetimeRule {
            require_expiry: true,
            ..Default::default()
        };
        assert!(require.exceeded_by(None, at(0)));
        assert!(!require.exceeded_by(Some(at(1000)), at(0)));
        assert!(!LifetimeRule::default().exceeded_by(None, at(0)));
    }
}
