//! What can go wrong, in the words of whichever dialect the server answered in, and the exit
//! status each failure means.

use keyplane_api_types::aether::ErrorEnvelope;
use keyplane_api_types::audit::{
    AuditChainDivergedEnvelope, AuditChainDivergedError, AUDIT_CHAIN_DIVERGED,
};
use keyplane_api_types::hybridbox::{ErrorMessage, LocItem, ValidationErrorBody};
use keyplane_api_types::verify::VerificationError;
use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;

/// The documented exit statuses (`keyplane --help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Ok = 0,
    /// The API answered with an error (4xx other than 401, 5xx), or a local file could not be
    /// written.
    Refused = 1,
    /// The command line is wrong (also reported by clap with this status).
    Usage = 2,
    /// No credential, or the server did not accept it (401).
    Unauthenticated = 3,
    /// The server could not be reached (connection refused, DNS, timeout, TLS).
    Unreachable = 4,
    /// `introspect`: the server answered, and the token is not active (unknown, revoked,
    /// suspended or expired), so a script can test it like `grep`.
    Inactive = 5,
}

/// An error answer from the API.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: u16,
    /// The dialect's machine-readable code (`validation_failed`, `invalid_token`, ...) when it
    /// has one; Hybridbox's `{"detail": "..."}` has none.
    pub code: Option<String>,
    pub message: String,
    /// One line per bad field: `scopes[1]: ... (invalid_scope)`.
    pub details: Vec<String>,
    pub request_id: Option<String>,
    /// A 409 `audit_chain_diverged`'s: where an audit reader goes on from.
    pub audit_chain_diverged: Option<Box<AuditChainDiverged>>,
}

/// The organization's audit trail no longer holds the event a reader named (`after`): what the
/// 409 `audit_chain_diverged` says besides its message.
#[derive(Debug, Clone)]
pub struct AuditChainDiverged {
    /// The seq of the event named: the trail holds another there, or none.
    pub diverged_seq: u64,
    /// The trail's newest seq.
    pub head_seq: u64,
    /// Go on after this seq, named as `after` takes it in `resume_after`.
    pub resume_after_seq: u64,
    pub resume_after: String,
}

#[derive(Debug)]
pub enum Error {
    /// A bad argument found before anything was sent.
    Usage(String),
    /// No credential was given, or it could not be read.
    NoCredential(String),
    /// The server answered 401.
    Unauthenticated(ApiFailure),
    /// The server answered another error.
    Refused(ApiFailure),
    /// No answer: the server could not be reached or did not answer in time.
    Unreachable(String),
    /// An answer that is not what the route promises (a proxy's page, another program).
    Protocol(String),
    /// A local file (profile, `--secret-file`, `--token-file`) could not be read or written.
    Local(String),
    /// `introspect` asked about a token the server holds not active.
    Inactive,
    /// A create or rotate sent with `idempotency_key` whose outcome is unknown (its answer was
    /// lost, or the server still worked on it when retries ran out): it may have been done, and
    /// only a request with the same key (and body) gets its answer, secret included.
    MaybeDone {
        cause: Box<Error>,
        idempotency_key: String,
        /// The new file (0600) the key was saved in, or why it could not be (then the key itself
        /// is shown): the key derives the one sealing the stored answer, so it is kept out of the
        /// command line the user repeats (`ps`, shell history).
        key_file: Result<PathBuf, String>,
        /// What the repeated command needs besides `--idempotency-key` (` --expires-at ...` where
        /// `--expires-in` would compute another time, and so another request).
        retry_flags: String,
    },
}

impl Error {
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            Error::Usage(_) => ExitStatus::Usage,
            Error::NoCredential(_) | Error::Unauthenticated(_) => ExitStatus::Unauthenticated,
            Error::Unreachable(_) => ExitStatus::Unreachable,
            Error::Refused(_) | Error::Protocol(_) | Error::Local(_) => ExitStatus::Refused,
            Error::MaybeDone { cause, .. } => cause.exit_status(),
            Error::Inactive => ExitStatus::Inactive,
        }
    }

    /// Whether asking again later may succeed: no answer, a limit, or the server (or a gateway)
    /// failing for now; not a refusal of the request or the credential.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unreachable(_) => true,
            Error::Refused(failure) => matches!(failure.status, 408 | 429 | 500..=599),
            Error::MaybeDone { cause, .. } => cause.is_transient(),
            // A redirect or a stranger's answer stays what it is.
            Error::Protocol(_) => false,
            Error::Usage(_) | Error::NoCredential(_) | Error::Unauthenticated(_) => false,
            Error::Local(_) | Error::Inactive => false,
        }
    }

    /// Adds `flags` to what a [`Error::MaybeDone`] tells the user to repeat the command with;
    /// other errors are returned as they are.
    pub fn retry_also(mut self, flags: &str) -> Self {
        if let Error::MaybeDone { retry_flags, .. } = &mut self {
            retry_flags.push_str(flags);
        }
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(message)
            | Error::NoCredential(message)
            | Error::Unreachable(message)
            | Error::Protocol(message)
            | Error::Local(message) => f.write_str(&printable(message)),
            Error::Inactive => {
                f.write_str("the token is not active (unknown, revoked, suspended or expired)")
            }
            Error::Unauthenticated(failure) | Error::Refused(failure) => {
                write!(f, "{}", printable(&failure.message))?;
                match &failure.code {
                    Some(code) => write!(f, " ({}, HTTP {})", printable(code), failure.status)?,
                    None => write!(f, " (HTTP {})", failure.status)?,
                }
                for detail in &failure.details {
                    write!(f, "\n  {}", printable(detail))?;
                }
                if let Some(id) = &failure.request_id {
                    write!(f, "\n  request id: {}", printable(id))?;
                }
                Ok(())
            }
            Error::MaybeDone {
                cause,
                idempotency_key,
                key_file,
                retry_flags,
            } => {
                write!(
                    f,
                    "{cause}\n  It may have been done all the same (a credential or secret \
                     created or rotated). "
                )?;
                let file = match key_file {
                    Ok(path) => path.display().to_string(),
                    Err(reason) => {
                        write!(
                            f,
                            "Its Idempotency-Key could not be saved ({}): put {} alone in a new \
                             file only you can read, as FILE. ",
                            printable(reason),
                            printable(idempotency_key)
                        )?;
                        "FILE".into()
                    }
                };
                write!(
                    f,
                    "Run the same command again within 24 hours with --idempotency-key-file {}{} \
                     to get its answer, any secret included, instead of doing it twice; then \
                     delete the file.",
                    printable(&file),
                    printable(retry_flags)
                )
            }
        }
    }
}

/// A server's text with control characters escaped, so that no name or message it echoes can
/// move the cursor or forge a line on the user's terminal.
pub fn printable(text: &str) -> String {
    text.chars()
        .flat_map(
            |c| match c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                true => c.escape_default().collect::<Vec<_>>(),
                false => vec![c],
            },
        )
        .collect()
}

/// The three error dialects keyplane answers in.
#[derive(Deserialize)]
#[serde(untagged)]
enum ErrorBody {
    Aether(ErrorEnvelope),
    Verification(VerificationError),
    HybridboxValidation(ValidationErrorBody),
    Hybridbox(ErrorMessage),
}

impl ApiFailure {
    /// Reads an error answer in any of keyplane's dialects; a body in none of them is reported
    /// by its status alone (it may be a proxy's page: it is not echoed).
    pub fn read(status: u16, body: &[u8], request_id: Option<String>) -> Self {
        let mut failure = ApiFailure {
            status,
            code: None,
            message: format!("the server answered HTTP {status}"),
            details: Vec::new(),
            request_id,
            audit_chain_diverged: None,
        };
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(ErrorBody::Aether(envelope)) => {
                let error = envelope.error;
                if error.code == AUDIT_CHAIN_DIVERGED {
                    failure.audit_chain_diverged =
                        serde_json::from_slice::<AuditChainDivergedEnvelope>(body)
                            .ok()
                            .map(|diverged| {
                                let AuditChainDivergedError {
                                    diverged_seq,
                                    head_seq,
                                    resume_after_seq,
                                    resume_after,
                                    ..
                                } = diverged.error;
                                Box::new(AuditChainDiverged {
                                    diverged_seq,
                                    head_seq,
                                    resume_after_seq,
                                    resume_after,
                                })
                            });
                }
                failure.code = Some(error.code);
                failure.message = error.message;
                failure.details = error
                    .details
                    .unwrap_or_default()
                    .into_iter()
                    .map(|d| format!("{}: {} ({})", d.field, d.message, d.code))
                    .collect();
            }
            Ok(ErrorBody::Verification(error)) => {
                failure.code = Some(error.error);
                failure.message = error.error_description;
            }
            Ok(ErrorBody::HybridboxValidation(body)) => {
                failure.code = Some("validation_failed".into());
                failure.message = "the request was not valid".into();
                failure.details = body
                    .detail
                    .into_iter()
                    .map(|item| {
                        let location: Vec<String> = item
                            .loc
                            .iter()
                            .map(
                                |step| match serde_json::from_value::<LocItem>(step.clone()) {
                                    Ok(LocItem::Name(name)) => name,
                                    Ok(LocItem::Index(index)) => index.to_string(),
                                    Err(_) => step.to_string(),
                                },
                            )
                            .collect();
                        format!("{}: {} ({})", location.join("."), item.msg, item.error_type)
                    })
                    .collect();
            }
            Ok(ErrorBody::Hybridbox(body)) => failure.message = body.detail,
            Err(_) => {}
        }
        failure
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dialect_is_read() {
        let aether = br#"{"error":{"code":"validation_failed","message":"bad","details":[{"field":"scopes[0]","code":"invalid_scope","message":"no"}]}}"#;
        let failure = ApiFailure::read(422, aether, None);
        assert_eq!(failure.code.as_deref(), Some("validation_failed"));
        assert_eq!(failure.details, ["scopes[0]: no (invalid_scope)"]);

        let verification = br#"{"error":"invalid_token","error_description":"unknown"}"#;
        let failure = ApiFailure::read(401, verification, None);
        assert_eq!(failure.code.as_deref(), Some("invalid_token"));
        assert_eq!(failure.message, "unknown");

        let hybridbox =
            br#"{"detail":[{"loc":["body","name"],"msg":"is required","type":"missing"}]}"#;
        let failure = ApiFailure::read(422, hybridbox, None);
        assert_eq!(failure.details, ["body.name: is required (missing)"]);

        let failure = ApiFailure::read(404, br#"{"detail":"Not found"}"#, None);
        assert_eq!(
            (failure.code, failure.message.as_str()),
            (None, "Not found")
        );

        let failure = ApiFailure::read(502, b"<html>Bad gateway</html>", None);
        assert_eq!(failure.message, "the server answered HTTP 502");
    }

    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert_eq!(printable("a\u{1b}[31m\nb"), "a\\u{1b}[31m\\nb");
    }
}
