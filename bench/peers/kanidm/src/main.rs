//! `kanidm-valid-peer`: kanidm's `GET /v1/auth/valid` for a service account's API token, over
//! TLS, for `bench/run.sh`'s `kanidm` part.
//!
//! The issue's kanidm peer is the kanidm server built from its source repository, which this
//! machine cannot reach; kanidm's library crate, `kanidmd_lib`, is on crates.io. So this binary
//! is kanidmd 1.7.4's validation of a bearer token, the library calls its `auth_valid` handler
//! makes, behind the HTTP and TLS front of `bench/src/bin/tls-hello.rs`:
//!
//! - start-up as kanidmd's: the schema, an SQLite backend in a file, the query server initialised
//!   to the target domain level, the IDM server; then a service account and a read-only API token
//!   (signed by the domain's key object, as kanidm signs them), written to `TOKEN_OUT`;
//! - each request as kanidmd's: the bearer token parsed as a compact JWS into a `ClientAuthInfo`,
//!   pre-validated in one read transaction (kanidmd's `VerifiedClientInformation` extractor), then
//!   validated to an identity in another (`QueryServerReadV1::handle_auth_valid`): the signature
//!   (ES256, checked in both, as kanidmd 1.7 does), the token's expiry, the account's entry and its
//!   API-token session. 200 with the JSON `null` that kanidmd answers, 401 otherwise;
//! - TLS and HTTP as `tls-hello`: rustls with ring, TLS 1.3 and 1.2, ALPN h2 and http/1.1, hyper's
//!   builders with the same limits.
//!
//! What it leaves out of kanidmd's request path: its middleware (operation id, security and
//! cache headers, the trace layer and its log lines, the session layer). Each costs kanidmd time,
//! so this peer is at least as fast as kanidmd 1.7.4 would be, and a ratio of keyplane to it
//! understates keyplane's lead. kanidmd terminates TLS with OpenSSL; rustls here, as for the
//! hello world, since TLS is a small share of a request that is mostly signature checks.
//! It is kanidm 1.7.4, the last release of the library on crates.io, not the kanidm 1.10.5 of
//! the peers recipe (BENCHMARKS.md, "Ninth sitting").
//!
//!   BIND=127.0.0.1:8445 CERT=cert.pem KEY=key.pem DB_DIR=dir TOKEN_OUT=token.txt kanidm-valid-peer

use anyhow::{anyhow, Context};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use kanidm_proto::internal::{FsType, UatPurpose, UserAuthToken};
use kanidmd_lib::be::{Backend, BackendConfig};
use kanidmd_lib::entry_init;
use kanidmd_lib::idm::ldap::LdapSession;
use kanidmd_lib::idm::server::IdmServerTransaction;
use kanidmd_lib::idm::serviceaccount::GenerateApiTokenEvent;
use kanidmd_lib::prelude::*;
use kanidmd_lib::schema::Schema;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use tokio::net::TcpListener;

// `tls-hello`'s front, the same file (this crate cannot link keyplane's).
#[path = "../../../src/tls_front.rs"]
mod tls_front;

fn env_path(name: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("set {name}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:8445".into());
    let tls = tls_config(&env_path("CERT")?, &env_path("KEY")?)?;
    let db_dir = env_path("DB_DIR")?;
    let token_out = env_path("TOKEN_OUT")?;

    let idms = Arc::new(start_idm(&db_dir).await?);
    let token = issue_api_token(&idms).await?;
    write_private(&token_out, &token)?;

    let app = Router::new()
        .route("/v1/auth/valid", get(auth_valid))
        .with_state(idms);
    let listener = TcpListener::bind(&bind)
        .await
        .with_context(|| format!("cannot listen on {bind}"))?;
    eprintln!("kanidm-valid-peer listening on https://{bind}");
    // As kanidmd's middleware: the client's address on every request.
    tls_front::serve(listener, tls, |client| {
        app.clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(client)))
    })
    .await
}

/// kanidmd's start-up, as far as token validation needs it.
async fn start_idm(db_dir: &std::path::Path) -> anyhow::Result<IdmServer> {
    std::fs::create_dir_all(db_dir)?;
    let db = db_dir.join("kanidm.db");
    let schema = Schema::new().map_err(|e| anyhow!("schema: {e:?}"))?;
    let idxmeta = schema.write().reload_idxmeta();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let config = BackendConfig::new(Some(&db), threads, FsType::Generic, None);
    let backend = Backend::new(config, idxmeta, false).map_err(|e| anyhow!("backend: {e:?}"))?;
    let now = duration_from_epoch_now();
    let query_server = QueryServer::new(backend, schema, "localhost".into(), now)
        .map_err(|e| anyhow!("query server: {e:?}"))?;
    query_server
        .initialise_helper(now, DOMAIN_TGT_LEVEL)
        .await
        .map_err(|e| anyhow!("initialise: {e:?}"))?;
    let origin = Url::parse("https://localhost:8445")?;
    let (idms, delayed, mut audit) = IdmServer::new(query_server, &origin, false, now)
        .await
        .map_err(|e| anyhow!("idm server: {e:?}"))?;
    // kanidmd keeps both queues' receivers for its lifetime (a closed queue fails its senders);
    // the audit queue is drained, as kanidmd's audit task drains it.
    std::mem::forget(delayed);
    tokio::spawn(async move { while audit.audit_rx().recv().await.is_some() {} });
    Ok(idms)
}

/// A service account with a read-only API token, as `kanidm service-account api-token generate`.
async fn issue_api_token(idms: &IdmServer) -> anyhow::Result<String> {
    let now = duration_from_epoch_now();
    let mut write = idms
        .proxy_write(now)
        .await
        .map_err(|e| anyhow!("write transaction: {e:?}"))?;
    let account = Uuid::new_v4();
    let entry = entry_init!(
        (Attribute::Class, EntryClass::Object.to_value()),
        (Attribute::Class, EntryClass::Account.to_value()),
        (Attribute::Class, EntryClass::ServiceAccount.to_value()),
        (Attribute::Name, Value::new_iname("bench_subject")),
        (Attribute::Uuid, Value::Uuid(account)),
        (Attribute::DisplayName, Value::new_utf8s("bench subject")),
        // As `kanidm service-account create NAME DISPLAY idm_admin`: its manager may issue tokens.
        (Attribute::EntryManagedBy, Value::Refer(UUID_IDM_ADMIN))
    );
    write
        .qs_write
        .internal_create(vec![entry])
        .map_err(|e| anyhow!("service account: {e:?}"))?;
    // Issued by idm_admin, through kanidm's access controls, as `kanidm service-account api-token
    // generate` issues it: idm_admin's identity from a read-write session token of its own, just
    // issued (kanidm accepts one within its grace window before the session record replicates).
    let issued = time::OffsetDateTime::UNIX_EPOCH + now;
    let session = UserAuthToken {
        session_id: Uuid::new_v4(),
        issued_at: issued,
        expiry: None,
        purpose: UatPurpose::ReadWrite {
            expiry: Some(issued + Duration::from_secs(60)),
        },
        uuid: UUID_IDM_ADMIN,
        displayname: "IDM Administrator".into(),
        spn: "idm_admin@localhost".into(),
        mail_primary: None,
        ui_hints: Default::default(),
        limit_search_max_results: None,
        limit_search_max_filter_test: None,
    };
    let idm_admin = write
        .validate_ldap_session(&LdapSession::UserAuthToken(session), Source::Internal, now)
        .map_err(|e| anyhow!("idm_admin: {e:?}"))?;
    let event = GenerateApiTokenEvent {
        ident: idm_admin,
        target: account,
        label: "bench".into(),
        expiry: None,
        read_write: false,
    };
    let token = write
        .service_account_generate_api_token(&event, now)
        .map_err(|e| anyhow!("api token: {e:?}"))?;
    write.commit().map_err(|e| anyhow!("commit: {e:?}"))?;
    Ok(token.to_string())
}

/// kanidmd's `auth_valid`: its extractor's pre-validation, then its handler's validation.
async fn auth_valid(
    axum::extract::State(idms): axum::extract::State<Arc<IdmServer>>,
    axum::extract::ConnectInfo(client): axum::extract::ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .and_then(|token| compact_jwt::JwsCompact::from_str(token).ok());
    let Some(bearer) = bearer else {
        return StatusCode::UNAUTHORIZED.into_response();
    };
    let mut auth = ClientAuthInfo::new(Source::Https(client.ip()), None, Some(bearer), None);
    // kanidmd's extractor ignores the pre-validation's outcome (an API token is not a user's
    // session token, so it ends in "not authenticated" after its signature is checked); the
    // handler's validation decides.
    let now = duration_from_epoch_now();
    if let Ok(mut read) = idms.proxy_read().await {
        let _ = read.pre_validate_client_auth_info(&mut auth, now);
    }
    let now = duration_from_epoch_now();
    match idms.proxy_read().await {
        Ok(mut read) => match read.validate_client_auth_info_to_ident(auth, now) {
            Ok(_) => axum::Json(()).into_response(),
            Err(_) => StatusCode::UNAUTHORIZED.into_response(),
        },
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

/// `tls-hello`'s rustls configuration (keyplane's `TlsFiles::load`).
fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|_| anyhow!("no key in {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `text` to `path`, readable by its owner only: a bearer token.
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .with_context(|| format!("cannot write {}", path.display()))
}
