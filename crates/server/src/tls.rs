//! Native TLS (`serve --tls-cert PEM --tls-key PEM`): rustls with the ring provider, TLS 1.2 and
//! 1.3, HTTP/2 or HTTP/1.1 by ALPN. The certificate and key are reloaded without a restart when
//! either file changes (checked every second by default) or on [`App::reload_tls`](crate::App::reload_tls)
//! (SIGHUP); a pair that does not load leaves the previous one serving. Each connection keeps the
//! configuration it was accepted with, so a reload never disturbs an open connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{watch, Notify};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The PEM files of the server's certificate chain (leaf first) and its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why a certificate and key do not make a TLS configuration. The message names the file and
/// the problem, never key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("{path} is not a PEM certificate chain: {reason}")]
    BadCertificate { path: String, reason: String },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: String },
    #[error("the private key in {key} does not belong to the certificate in {cert}")]
    Mismatch { cert: String, key: String },
    #[error("the certificate in {cert} and the key in {key} are not usable: {reason}")]
    Unusable {
        cert: String,
        key: String,
        reason: String,
    },
}

/// ALPN protocol ids, in the server's order of preference.
pub(crate) const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP11: &[u8] = b"http/1.1";

impl TlsFiles {
    /// Reads both files and builds the server configuration, checking that the key matches the
    /// certificate.
    pub fn load(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let (cert_path, key_path) = (
            self.cert.display().to_string(),
            self.key.display().to_string(),
        );
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        let cert_pem = read(&self.cert)?;
        let key_pem = read(&self.key)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::BadCertificate {
                path: cert_path.clone(),
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate { path: cert_path });
        }
        // The error of a malformed key file could quote it: say only that no key was found.
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey {
            path: key_path.clone(),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Unusable {
                cert: cert_path.clone(),
                key: key_path.clone(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
                    cert: cert_path.clone(),
                    key: key_path.clone(),
                },
                other => TlsError::Unusable {
                    cert: cert_path.clone(),
                    key: key_path.clone(),
                    reason: other.to_string(),
                },
            })?;
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
        Ok(Arc::new(config))
    }

    /// What tells each file's replacement or repair: its modification time and size and, on
    /// Unix, its inode and status-change time, because the tools that install certificates may
    /// keep the first two (`rsync -a`, `cp -p`: a new inode with the old time and, often, the old
    /// size) or fix only ownership and mode after a failed reload (`chown`, `chmod`).
    fn stamp(&self) -> Option<[FileStamp; 2]> {
        let of = |path: &Path| {
            let meta = std::fs::metadata(path).ok()?;
            #[cfg(unix)]
            let identity = {
                use std::os::unix::fs::MetadataExt;
                (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
            };
            #[cfg(not(unix))]
            let identity = ();
            Some(FileStamp {
                modified: meta.modified().ok()?,
                len: meta.len(),
                identity,
            })
        };
        Some([of(&self.cert)?, of(&self.key)?])
    }
}

#[derive(Debug, PartialEq, Eq)]
struct FileStamp {
    modified: SystemTime,
    len: u64,
    #[cfg(unix)]
    identity: (u64, u64, i64, i64),
    #[cfg(not(unix))]
    identity: (),
}

/// The configuration new connections are accepted with; replaced by [`watch_files`].
pub(crate) type CurrentTls = watch::Receiver<Arc<rustls::ServerConfig>>;

/// Loads `files` once (the caller has checked them at start) and keeps the result current:
/// polls the files' metadata ([`TlsFiles::stamp`]) every `poll` (if any) and reloads on `reload`
/// (SIGHUP). A pair
/// that fails to load is logged and the previous one keeps serving. Ends when `stop` turns true.
pub(crate) fn watch_files(
    files: TlsFiles,
    reload: Arc<Notify>,
    poll: Option<Duration>,
    mut stop: watch::Receiver<bool>,
) -> Result<(CurrentTls, tokio::task::JoinHandle<()>), TlsError> {
    let mut seen = files.stamp();
    let (current, receiver) = watch::channel(files.load()?);
    let task = tokio::spawn(async move {
        let mut tick = poll.map(tokio::time::interval);
        if let Some(tick) = &mut tick {
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            let checked = async {
                match &mut tick {
                    Some(tick) => drop(tick.tick().await),
                    None => std::future::pending().await,
                }
            };
            let forced = tokio::select! {
                () = checked => false,
                () = reload.notified() => true,
                _ = stop.changed() => return,
            };
            let stamp = files.stamp();
            if !forced && (stamp == seen || stamp.is_none()) {
                continue;
            }
            seen = stamp;
            match files.load() {
                Ok(config) => {
                    current.send_replace(config);
                    tracing::info!(tls.cert = %files.cert.display(), "TLS certificate and key reloaded");
                }
                Err(error) => tracing::error!(
                    %error,
                    "TLS certificate and key not reloaded; still serving the previous ones"
                ),
            }
        }
    });
    Ok((receiver, task))
}
