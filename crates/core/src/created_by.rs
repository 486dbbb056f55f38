//! Who created a credential or grant, kept on its row: an access review still answers "who made
//! this live token" after audit retention pruned its `*.created` event. Built from the same actor
//! as that event, so the two never disagree; rows from before it was recorded have none.

use crate::audit::{ActorType, AuditActor};

/// The way in a change came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// The management APIs (Aether, Hybridbox), and the client commands that call them.
    Api,
    /// The web console.
    Console,
    /// A `keyplane admin` command, on the store directly.
    Admin,
    /// `keyplane serve`'s first start on an empty store.
    Bootstrap,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Api => "api",
            Channel::Console => "console",
            Channel::Admin => "admin",
            Channel::Bootstrap => "bootstrap",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Some(match raw {
            "api" => Channel::Api,
            "console" => Channel::Console,
            "admin" => Channel::Admin,
            "bootstrap" => Channel::Bootstrap,
            _ => return None,
        })
    }
}

/// Who ran a `keyplane admin` command. Its events keep actor `system` (filters on the actor type
/// keep working) and name the operator in their details: `os_user` always, `operator` when given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operator {
    /// The OS account that ran the command (its real uid's name).
    pub os_user: String,
    /// The name the operator gave (`--operator`, `KEYPLANE_OPERATOR`); not verified.
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedBy {
    pub actor_type: ActorType,
    /// The credential or user id; `None` for `system`.
    pub actor_id: Option<uuid::Uuid>,
    pub via: Channel,
    /// Admin commands only.
    pub operator: Option<Operator>,
}

impl CreatedBy {
    /// The creator an event's `actor` names, come `via` a channel.
    pub fn new(actor: &AuditActor, via: Channel) -> Self {
        Self {
            actor_type: actor.actor_type,
            actor_id: actor.id,
            via,
            operator: None,
        }
    }

    /// keyplane itself (actor `system`), come `via` a channel.
    pub fn system(via: Channel) -> Self {
        Self::new(&AuditActor::system(), via)
    }

    /// A `keyplane admin` command run by `operator` (actor `system`).
    pub fn operator(operator: &Operator) -> Self {
        Self {
            operator: Some(operator.clone()),
            ..Self::system(Channel::Admin)
        }
    }

    /// The user who created it, if one did (what `created_by_user_id` has always said).
    pub fn user_id(&self) -> Option<crate::UserId> {
        match (self.actor_type, self.actor_id) {
            (ActorType::User, Some(id)) => Some(crate::UserId::from_uuid(id)),
            _ => None,
        }
    }
}
