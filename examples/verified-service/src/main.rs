//! `verified-service`: the example service on `LISTEN` (default 127.0.0.1:3000), verifying
//! through keyplane at `KEYPLANE_URL` with the `tokens:verify` credential in
//! `KEYPLANE_VERIFY_TOKEN`. `MAX_STALENESS_SECONDS` (default 30) and `STALE_POLICY`
//! (`fail-closed`, the default, or `recheck`) set the staleness contract.

use keyplane_verifier::{StalePolicy, Verifier, VerifierConfig};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
    let mut config = VerifierConfig::new(env("KEYPLANE_URL")?, env("KEYPLANE_VERIFY_TOKEN")?);
    if let Ok(seconds) = std::env::var("MAX_STALENESS_SECONDS") {
        config.max_staleness = Duration::from_secs(seconds.parse()?);
    }
    config.stale_policy = match std::env::var("STALE_POLICY").as_deref() {
        Ok("recheck") => StalePolicy::Recheck,
        Ok("fail-closed") | Err(_) => StalePolicy::FailClosed,
        Ok(other) => return Err(format!("STALE_POLICY: unknown policy {other}").into()),
    };
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    eprintln!("verified-service listening on {}", listener.local_addr()?);
    axum::serve(
        listener,
        keyplane_example_verified_service::app(Verifier::new(config)?),
    )
    .await?;
    Ok(())
}
