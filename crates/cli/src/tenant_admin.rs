//! `keyplane admin create-org`, `list-orgs` and `issue-token`: the platform operator's
//! administration of organizations (tenants) on the store directly, without a token. The use cases
//! are `keyplane_server::ops`'s; this is their command line: flags, messages, output.

use crate::admin::open_to_write;
use crate::StoreArgs;
use clap::Args;
use keyplane_api_types::aether::ApiTokenCreated;
use keyplane_core::{Error as DomainError, FieldPath, Operator, ScopeSet, TenantId};
use keyplane_server::error::AppError;
use keyplane_server::ops;

#[derive(Args)]
pub struct CreateOrgArgs {
    /// The organization's name. Refused when an organization already has it (the message names
    /// that one's id), unless --allow-duplicate-name.
    #[arg(long)]
    name: String,
    /// Keep this organization id (a UUID) instead of a new random one: an organization migrated
    /// from another system keeps the id its clients' URLs (`/api/v1/organizations/{id}/...`) name.
    /// Refused when an organization has it.
    #[arg(long, value_name = "UUID", value_parser = parse_new_org_id)]
    id: Option<TenantId>,
    /// Create the organization without a token; prints only its id. Issue its tokens with
    /// `keyplane admin issue-token`.
    #[arg(long)]
    no_token: bool,
    /// Create it although an organization already has this name.
    #[arg(long)]
    allow_duplicate_name: bool,
    /// Print `{"org_id": "...", "token": "aether_..."}` (no `token` with --no-token) instead of
    /// text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
pub struct ListOrgsArgs {
    /// Only the organizations with exactly this name (surrounding whitespace trimmed, as names
    /// are when stored).
    #[arg(long)]
    name: Option<String>,
    /// One JSON object a line (`id`, `name`, `created_at`, `registry_project`) instead of a
    /// table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
pub struct IssueTokenArgs {
    /// The organization (tenant) id.
    #[arg(long, value_name = "ORG_ID", value_parser = crate::admin::parse_tenant)]
    org: TenantId,
    /// The token's name: 1-120 characters, unique among the organization's live tokens.
    #[arg(long)]
    name: String,
    /// A scope of the token (repeatable), as the API takes them (`api_tokens:read`, `deploy:prod`,
    /// `*`). Default: `*`, everything in the organization.
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    #[command(flatten)]
    expiry: crate::remote::Expiry,
    /// Print the API's answer to creating a token (the token's fields and its `token`) as JSON
    /// instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    store: StoreArgs,
}

/// `--id`: any UUID but the nil one, which no client would take for an organization's.
fn parse_new_org_id(text: &str) -> Result<TenantId, String> {
    let id = crate::admin::parse_tenant(text)?;
    if id.as_uuid().is_nil() {
        return Err("the nil UUID cannot be an organization's id".into());
    }
    Ok(id)
}

/// A use case's error in the command's words: field errors name the flags they came from
/// (`fields`: the field's path as the use case names it, and the flag).
fn refused(error: AppError, fields: &[(&str, &str)]) -> anyhow::Error {
    match error {
        AppError::Domain(DomainError::Validation(errors)) => anyhow::anyhow!(
            "{}",
            errors
                .iter()
                .map(|e| {
                    let path = e.path.to_string();
                    let flag = fields
                        .iter()
                        .find(|(field, _)| *field == path)
                        .map_or(path.as_str(), |(_, flag)| flag);
                    format!("{flag}: {}", e.message)
                })
                .collect::<Vec<_>>()
                .join("; ")
        ),
        other => anyhow::anyhow!("{other}"),
    }
}

/// `admin create-org`.
pub async fn create_org(args: CreateOrgArgs, operator: &Operator) -> anyhow::Result<()> {
    let spec = ops::OrgSpec {
        name: &args.name,
        id: args.id,
        with_token: !args.no_token,
        allow_duplicate_name: args.allow_duplicate_name,
    };
    // The name's own error before the store is opened (and migrated).
    keyplane_core::validate::name(FieldPath::body("name"), spec.name)
        .map_err(|e| anyhow::anyhow!("--name: {}", e.message))?;
    let store = open_to_write(&args.store).await?;
    let made = ops::create_organization(store.as_ref(), &spec, operator)
        .await
        .map_err(|e| match e {
            ops::OrgRefused::NameTaken(id, name) => anyhow::anyhow!(
                "organization {id} is already named {name:?}: pass --allow-duplicate-name to \
                 create another one with this name (`keyplane admin list-orgs --name NAME` lists \
                 them)"
            ),
            ops::OrgRefused::IdTaken(id, name) => {
                anyhow::anyhow!("organization {name:?} already has the id {id}: nothing created")
            }
            ops::OrgRefused::Failed(e) => {
                let e = refused(e, &[("name", "--name")]);
                anyhow::anyhow!("cannot create the organization: {e}")
            }
        })?;
    let org = made.tenant.id;
    match (&made.token, args.json) {
        (Some(token), true) => println!(
            "{}",
            serde_json::json!({
                "org_id": org.to_string(),
                "token": token.secret.expose_secret(),
            })
        ),
        (None, true) => println!("{}", serde_json::json!({ "org_id": org.to_string() })),
        (Some(token), false) => {
            println!("org_id: {org}");
            println!("token:  {}", token.secret.expose_secret());
            println!("(the token is shown only now; it has scope `*` in this organization)");
        }
        (None, false) => {
            println!("org_id: {org}");
            eprintln!(
                "no token was created: issue one with `keyplane admin issue-token --org {org} \
                 --name NAME`"
            );
        }
    }
    Ok(())
}

/// Organizations read per store query by `list-orgs`.
const LIST_PAGE: u32 = 500;

/// `admin list-orgs`: every organization (or those named --name) in creation order, a page at a
/// time.
pub async fn list_orgs(args: ListOrgsArgs) -> anyhow::Result<()> {
    use std::io::Write;
    if let Some(name) = &args.name {
        keyplane_core::validate::name(FieldPath::body("name"), name)
            .map_err(|e| anyhow::anyhow!("--name: {}", e.message))?;
    }
    let store = args.store.open_read_only().await?;
    let mut out = std::io::stdout().lock();
    let time =
        |at: chrono::DateTime<chrono::Utc>| at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    if !args.json {
        writeln!(
            out,
            "{:<36}  {:<27}  {:<24}  NAME",
            "ID", "CREATED", "REGISTRY"
        )?;
    }
    let mut after = None;
    loop {
        let page = ops::list_organizations(
            store.as_ref(),
            args.name.as_deref(),
            after.as_ref(),
            LIST_PAGE,
        )
        .await
        .map_err(|e| refused(e, &[("name", "--name")]))?;
        for listed in &page {
            let tenant = &listed.tenant;
            if args.json {
                let line = serde_json::json!({
                    "id": tenant.id.to_string(),
                    "name": tenant.name,
                    "created_at": time(tenant.created_at),
                    "registry_project": listed.registry_project,
                });
                writeln!(out, "{line}")?;
            } else {
                writeln!(
                    out,
                    "{:<36}  {:<27}  {:<24}  {}",
                    tenant.id.to_string(),
                    time(tenant.created_at),
                    listed.registry_project.as_deref().unwrap_or("-"),
                    tenant.name
                )?;
            }
        }
        match page.last() {
            Some(last) if page.len() == LIST_PAGE as usize => after = Some(last.tenant.clone()),
            _ => break,
        }
    }
    out.flush()?;
    Ok(())
}

/// `admin issue-token`.
pub async fn issue_token(args: IssueTokenArgs, operator: &Operator) -> anyhow::Result<()> {
    let raw_scopes = if args.scopes.is_empty() {
        vec!["*".to_owned()]
    } else {
        args.scopes
    };
    let scopes =
        ScopeSet::parse_list(&FieldPath::body("scopes"), &raw_scopes).map_err(|errors| {
            anyhow::anyhow!(
                "{}",
                errors
                    .iter()
                    .map(|e| format!("--scope ({}): {}", e.path, e.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })?;
    let expires_at = args
        .expiry
        .at(chrono::Utc::now())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = open_to_write(&args.store).await?;
    let org = args.org;
    let issued = ops::issue_token_as_operator(
        store.as_ref(),
        org,
        &args.name,
        scopes,
        expires_at,
        operator,
    )
    .await
    .map_err(|e| match e {
        AppError::Domain(DomainError::NotFound) => {
            anyhow::anyhow!("no organization with id {org}")
        }
        e => {
            let e = refused(
                e,
                &[
                    ("name", "--name"),
                    ("expires_at", "--expires-in/--expires-at"),
                ],
            );
            anyhow::anyhow!("cannot issue the token: {e}")
        }
    })?;
    if args.json {
        println!("{}", serde_json::to_string(&ApiTokenCreated::from(issued))?);
        return Ok(());
    }
    let token = &issued.credential;
    println!("org_id:   {org}");
    println!("token_id: {}", token.id);
    println!("token:    {}", issued.secret.expose_secret());
    let expiry = token.expires_at.map_or("never expires".to_owned(), |at| {
        format!(
            "expires {}",
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )
    });
    println!(
        "(the token is shown only now; it has scope {} in this organization and {expiry})",
        token
            .scopes
            .to_strings()
            .iter()
            .map(|s| format!("`{s}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
