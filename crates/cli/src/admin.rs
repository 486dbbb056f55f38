use crate::StoreArgs;
use clap::Subcommand;
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
    }
}
