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
        self.load_described().map(|(config, _)| config)
    }

    /// [`TlsFiles::load`], and what the leaf certificate says of itself, for the log and metrics.
    fn load_described(&self) -> Result<(Arc<rustls::ServerConfig>, Leaf), TlsError> {
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
        let Some(leaf) = chain.first().map(|der| Leaf::of(der)) else {
            return Err(TlsError::NoCertificate { path: cert_path });
        };
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
        Ok((Arc::new(config), leaf))
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

/// What a leaf certificate says of itself, read for the log (which certificate serves, until
/// when) and the `tls_certificate_not_after` metric. `None`s where the DER is not as expected:
/// rustls took the certificate, and it serves all the same.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Leaf {
    /// RFC 4514's form: `O=...,CN=...`, the most specific attribute last.
    subject: Option<String>,
    /// Upper-case hex, as `openssl x509 -noout -serial` prints it.
    serial: Option<String>,
    not_after: Option<chrono::DateTime<chrono::Utc>>,
}

impl Leaf {
    fn of(der: &[u8]) -> Self {
        leaf(der).unwrap_or_default()
    }

    fn subject(&self) -> &str {
        self.subject.as_deref().unwrap_or("(unreadable)")
    }

    fn serial(&self) -> &str {
        self.serial.as_deref().unwrap_or("(unreadable)")
    }

    fn not_after(&self) -> String {
        self.not_after.map_or_else(
            || "(unreadable)".to_owned(),
            |at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        )
    }
}

/// Reads the fields the log names from a leaf certificate's DER (RFC 5280, 4.1); `None` for one
/// x509-cert does not decode.
fn leaf(der: &[u8]) -> Option<Leaf> {
    use x509_cert::der::Decode;
    let tbs = x509_cert::Certificate::from_der(der).ok()?.tbs_certificate;
    // Without DER's sign byte, as openssl prints it.
    let serial = match tbs.serial_number.as_bytes() {
        [0, magnitude @ ..] if !magnitude.is_empty() => magnitude,
        bytes => bytes,
    };
    let not_after = tbs.validity.not_after.to_unix_duration();
    Some(Leaf {
        // RFC 4514's form, as `openssl x509 -nameopt RFC2253` prints it.
        subject: Some(tbs.subject.to_string()),
        serial: Some(serial.iter().map(|b| format!("{b:02X}")).collect()),
        not_after: i64::try_from(not_after.as_secs())
            .ok()
            .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0)),
    })
}

/// How often a pair that failed to load is tried again (and, while it still fails, logged again
/// at `error`): files that stay bad are not said only once, long before the served certificate
/// runs out.
const RETRY_FAILED_RELOAD: Duration = Duration::from_secs(30);

/// The configuration new connections are accepted with; replaced by [`watch_files`].
pub(crate) type CurrentTls = watch::Receiver<Arc<rustls::ServerConfig>>;

/// Loads `files` once (the caller has checked them at start) and keeps the result current:
/// polls the files' metadata ([`TlsFiles::stamp`]) every `poll` (if any) and reloads on `reload`
/// (SIGHUP). A pair that fails to load is logged (and counted in `metrics`), the previous one
/// keeps serving, and it is tried (and logged) again every [`RETRY_FAILED_RELOAD`] until it loads.
/// Every load logs the leaf's subject, serial and expiry. Ends when `stop` turns true.
pub(crate) fn watch_files(
    files: TlsFiles,
    reload: Arc<Notify>,
    poll: Option<Duration>,
    metrics: crate::metrics::Metrics,
    mut stop: watch::Receiver<bool>,
) -> Result<(CurrentTls, tokio::task::JoinHandle<()>), TlsError> {
    let mut seen = files.stamp();
    let (config, mut live) = files.load_described()?;
    loaded(&files, &live, &metrics, "TLS certificate and key loaded");
    let (current, receiver) = watch::channel(config);
    let task = tokio::spawn(async move {
        let mut tick = poll.map(tokio::time::interval);
        if let Some(tick) = &mut tick {
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        // When the last failed load was, while the files do not load.
        let mut failed_at: Option<tokio::time::Instant> = None;
        loop {
            let checked = async {
                match &mut tick {
                    Some(tick) => drop(tick.tick().await),
                    None => std::future::pending().await,
                }
            };
            let retry = async {
                match failed_at {
                    Some(at) => tokio::time::sleep_until(at + RETRY_FAILED_RELOAD).await,
                    None => std::future::pending().await,
                }
            };
            let forced = tokio::select! {
                () = checked => false,
                () = retry => true,
                () = reload.notified() => true,
                _ = stop.changed() => return,
            };
            let stamp = files.stamp();
            if !forced && (stamp == seen || stamp.is_none()) {
                continue;
            }
            seen = stamp;
            match files.load_described() {
                Ok((config, leaf)) => {
                    current.send_replace(config);
                    live = leaf;
                    failed_at = None;
                    loaded(&files, &live, &metrics, "TLS certificate and key reloaded");
                }
                Err(error) => {
                    metrics.tls_reload_failed();
                    failed_at = Some(tokio::time::Instant::now());
                    tracing::error!(
                        %error,
                        tls.cert = %files.cert.display(),
                        tls.subject = live.subject(),
                        tls.serial = live.serial(),
                        tls.not_after = %live.not_after(),
                        retry_in = ?RETRY_FAILED_RELOAD,
                        "TLS certificate and key not reloaded; still serving the previous ones"
                    );
                }
            }
        }
    });
    Ok((receiver, task))
}

/// Logs which certificate now serves, and sets its expiry's metric.
fn loaded(files: &TlsFiles, leaf: &Leaf, metrics: &crate::metrics::Metrics, message: &str) {
    // 0 when unreadable: the previous certificate's expiry would be a lie.
    metrics.tls_certificate_not_after(leaf.not_after.map_or(0, |at| at.timestamp()));
    tracing::info!(
        tls.cert = %files.cert.display(),
        tls.subject = leaf.subject(),
        tls.serial = leaf.serial(),
        tls.not_after = %leaf.not_after(),
        "{message}"
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_certificate_made_by_rcgen() {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "leaf.example");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example Ltd");
        params.serial_number = Some(rcgen::SerialNumber::from(vec![0x00, 0x8a, 0x01, 0xff]));
        params.not_after = rcgen::date_time_ymd(2051, 3, 4);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let leaf = super::leaf(cert.der()).expect("a certificate");
        assert_eq!(
            leaf.subject.as_deref(),
            Some("O=Example Ltd,CN=leaf.example")
        );
        assert_eq!(leaf.serial.as_deref(), Some("8A01FF"));
        assert_eq!(
            leaf.not_after.map(|at| at.to_rfc3339()),
            Some("2051-03-04T00:00:00+00:00".to_owned())
        );
        // A UTCTime year.
        params.not_after = rcgen::date_time_ymd(2040, 1, 2);
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            super::leaf(cert.der())
                .and_then(|leaf| leaf.not_after)
                .map(|at| at.timestamp()),
            Some(2_209_075_200)
        );
        assert_eq!(super::leaf(b"\x30\x03\x02\x01\x01"), None);
    }
}
