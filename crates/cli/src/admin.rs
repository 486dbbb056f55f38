use crate::StoreArgs;
use clap::{Args, Subcommand};
use keyplane_core::{GrantKind, GrantResource, NewGrant, Scope, SubjectType, TenantId, UserId};
use keyplane_server::hybridbox::wire::AuthorizationView;
use keyplane_server::ops;

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Create an organization (tenant) and an API token with scope `*` for it.
    CreateOrg {
        /// The organization's name.
        #[arg(long)]
        name: String,
        /// Print `{"org_id": "...", "token": "aether_..."}` instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print the registry token signing certificate (PEM) for the registry's `rootcertbundle`,
    /// creating the signing key on first use. The private key stays in the store.
    RegistryCert {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Give a user a right in an organization, as the platform operator: typically its first
    /// `account_owner`, who then grants others through the API. Prints the authorization as JSON.
    /// A server sharing the store sees it at once on PostgreSQL, within 30 s on SQLite.
    Grant(GrantArgs),
}

#[derive(Args)]
pub struct GrantArgs {
    /// The organization (tenant) id.
    #[arg(long, value_name = "ORG_ID", value_parser = parse_tenant)]
    org: TenantId,
    #[command(flatten)]
    user: GrantUser,
    /// The issuer of --user-sub, exactly as its tokens spell `iss`.
    #[arg(
        long,
        value_name = "URL",
        requires = "user_sub",
        conflicts_with = "user_id"
    )]
    issuer: Option<String>,
    /// The issuer whose canonical UUID `sub`s are user ids as they are: the same value as `serve
    /// --oidc-uuid-subjects`, so both derive the same user id from --user-sub.
    #[arg(long, env = "KEYPLANE_OIDC_UUID_SUBJECTS", value_name = "ISSUER")]
    oidc_uuid_subjects: Option<String>,
    #[command(flatten)]
    right: GrantRight,
    #[command(flatten)]
    store: StoreArgs,
}

/// Who receives the grant: one of the two.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct GrantUser {
    /// The user's `sub` at --issuer; its user id is derived as keyplane derives it from tokens.
    #[arg(long, value_name = "SUB", requires = "issuer")]
    user_sub: Option<String>,
    /// The user id itself (what `created_by_user_id` shows).
    #[arg(long, value_name = "UUID", value_parser = parse_user)]
    user_id: Option<UserId>,
}

/// What the grant gives: one of the two.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct GrantRight {
    /// Everything in the organization.
    #[arg(long)]
    account_owner: bool,
    /// One capability key, e.g. `auth.manage` or `api_tokens:write`.
    #[arg(long, value_name = "KEY")]
    capability: Option<String>,
}

fn parse_tenant(text: &str) -> Result<TenantId, String> {
    TenantId::parse(text).ok_or_else(|| "not a UUID".to_string())
}

fn parse_user(text: &str) -> Result<UserId, String> {
    UserId::parse(text).ok_or_else(|| "not a UUID".to_string())
}

impl GrantArgs {
    fn user(&self) -> UserId {
        match (&self.user.user_id, &self.user.user_sub, &self.issuer) {
            (Some(user), _, _) => *user,
            (None, Some(sub), Some(issuer)) => {
                keyplane_server::oidc::user_id(issuer, sub, self.oidc_uuid_subjects.as_deref())
            }
            // clap requires one of the two forms.
            _ => unreachable!("--user-id or --user-sub with --issuer"),
        }
    }

    fn new_grant(&self) -> anyhow::Result<NewGrant> {
        let (kind, capability_key) = match &self.right.capability {
            Some(key) => (
                GrantKind::Capability,
                Some(Scope::parse(key).map_err(|e| anyhow::anyhow!("--capability: {e}"))?),
            ),
            None => (GrantKind::AccountOwner, None),
        };
        Ok(NewGrant {
            kind,
            subject_type: SubjectType::User,
            subject_id: self.user().as_uuid(),
            capability_key,
            resource: GrantResource {
                resource_type: None,
                resource_id: None,
            },
        })
    }
}

/// The bootstrap document: the only place outside an HTTP response where a token is written out.
pub fn org_json(created: &ops::OrgCreated) -> String {
    serde_json::json!({
        "org_id": created.tenant.id.to_string(),
        "token": created.token.secret.expose_secret(),
    })
    .to_string()
}

pub async fn run(command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::CreateOrg { name, json, store } => {
            let store = store.open().await?;
            let created = ops::create_org(store.as_ref(), &name)
                .await
                .map_err(|e| anyhow::anyhow!("cannot create the organization: {e}"))?;
            if json {
                println!("{}", org_json(&created));
            } else {
                println!("org_id: {}", created.tenant.id);
                println!("token:  {}", created.token.secret.expose_secret());
                println!("(the token is shown only now; it has scope `*` in this organization)");
            }
            Ok(())
        }
        AdminCommand::RegistryCert { store } => {
            let store = store.open().await?;
            let signer = keyplane_server::registry::load_or_create_signing_key(store.as_ref())
                .await
                .map_err(|e| anyhow::anyhow!("cannot load the registry signing key: {e}"))?;
            print!("{}", signer.certificate_pem());
            Ok(())
        }
        AdminCommand::Grant(args) => {
            let grant = args.new_grant()?;
            let store = args.store.open().await?;
            let grant = ops::grant_as_operator(store.as_ref(), args.org, grant)
                .await
                .map_err(|e| match e {
                    keyplane_server::error::AppError::Domain(keyplane_core::Error::NotFound) => {
                        anyhow::anyhow!("no organization with id {}", args.org)
                    }
                    e => anyhow::anyhow!("cannot grant: {e}"),
                })?;
            println!(
                "{}",
                serde_json::to_string(&AuthorizationView::from(grant))?
            );
            Ok(())
        }
    }
}
