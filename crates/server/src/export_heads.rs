//! How far the `--audit-log` export wrote each organization's chain, kept beside the log
//! (`<log>.heads`) rather than in the store. The export's cursors live in the same database as the
//! chain, so a store restored from a backup, recovered to an earlier point or failed over to a
//! standby missing commits goes back with its cursors and agrees with itself; this file does not
//! go back with it, so the next start can tell that the log holds events the store no longer does
//! (and that new events are about to reuse their seqs).

use keyplane_core::TenantId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Each organization's last exported seq and the chain hash of the event there.
pub(crate) type Heads = BTreeMap<TenantId, (u64, [u8; 32])>;

/// The file's shape: `{"organizations": {"<org id>": {"seq": 12, "chain_hash": "<64 hex>"}}}`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadsFile {
    organizations: BTreeMap<String, HeadEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadEntry {
    seq: u64,
    chain_hash: String,
}

/// `<log>.heads`, beside the log.
pub(crate) fn path_for(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".heads");
    PathBuf::from(name)
}

/// The heads recorded at `path`; `None` when there is no such file (a log exported by a keyplane
/// from before the file, or a new one).
pub(crate) fn read(path: &Path) -> std::io::Result<Option<Heads>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let file: HeadsFile =
        serde_json::from_str(&text).map_err(|e| bad(format!("not a heads file: {e}")))?;
    let mut heads = Heads::new();
    for (org, entry) in file.organizations {
        let tenant =
            TenantId::parse(&org).ok_or_else(|| bad(format!("not an organization id: {org}")))?;
        let hash = data_encoding::HEXLOWER
            .decode(entry.chain_hash.as_bytes())
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .ok_or_else(|| {
                bad(format!(
                    "organization {org}: chain_hash is not 64 hex digits"
                ))
            })?;
        heads.insert(tenant, (entry.seq, hash));
    }
    Ok(Some(heads))
}

/// Replaces the file at `path` with `heads` whole: written to a temporary file beside it (0600:
/// it names organizations), synced, renamed over it, and the directory synced, so a crash leaves
/// the old file or the new one, never part of one.
pub(crate) fn write(path: &Path, heads: &Heads) -> std::io::Result<()> {
    let file = HeadsFile {
        organizations: heads
            .iter()
            .map(|(tenant, (seq, hash))| {
                (
                    tenant.to_string(),
                    HeadEntry {
                        seq: *seq,
                        chain_hash: keyplane_core::audit::hash_hex(hash),
                    },
                )
            })
            .collect(),
    };
    let mut bytes = serde_json::to_vec_pretty(&file).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = options.open(&temporary).and_then(|mut out| {
        out.write_all(&bytes)?;
        out.sync_all()
    });
    if let Err(error) = written.and_then(|()| std::fs::rename(&temporary, path)) {
        let _ = std::fs::remove_file(&temporary);
        return Err(error);
    }
    // The rename is durable once the directory is.
    let directory = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(directory)?.sync_all()
}

/// Why an empty store must not be bootstrapped under `log`: it already holds exported events, or
/// its heads file names organizations (the log was rotated away). `None` when neither.
pub(crate) fn exported_before(log: &Path) -> std::io::Result<Option<String>> {
    let length = match std::fs::metadata(log) {
        Ok(metadata) if metadata.is_file() => metadata.len(),
        Ok(_) => 0,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
        Err(error) => return Err(error),
    };
    if length > 0 {
        return Ok(Some(format!(
            "{} already holds exported audit events ({length} bytes)",
            log.display()
        )));
    }
    let heads_path = path_for(log);
    Ok(read(&heads_path)?
        .filter(|heads| !heads.is_empty())
        .map(|heads| {
            format!(
                "{} records events of {} organization(s) exported to {}",
                heads_path.display(),
                heads.len(),
                log.display()
            )
        }))
}

/// An organization whose chain the store holds less of than the audit log: found at start against
/// the heads file, or while running when the chain went back under the export (a failover).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Behind {
    pub(crate) tenant: TenantId,
    /// The last seq the audit log holds.
    pub(crate) exported_seq: u64,
    /// The store's head when it was found.
    pub(crate) store_seq: u64,
    pub(crate) noticed_at: chrono::DateTime<chrono::Utc>,
}

/// What the export found behind since the start, for `/readyz` and `/metrics`: kept until the
/// process ends (the heads file follows the store from then on, so the next start does not find
/// it again).
#[derive(Default)]
pub(crate) struct BehindExport(std::sync::Mutex<BTreeMap<TenantId, Behind>>);

impl BehindExport {
    /// Records `behind`; the number of organizations found behind so far.
    pub(crate) fn record(&self, behind: Behind) -> usize {
        let mut found = self.0.lock().unwrap_or_else(|p| p.into_inner());
        found.insert(behind.tenant, behind);
        found.len()
    }

    pub(crate) fn list(&self) -> Vec<Behind> {
        let found = self.0.lock().unwrap_or_else(|p| p.into_inner());
        found.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_written_whole_owner_only_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        let path = path_for(&log);
        assert_eq!(path, dir.path().join("audit.log.heads"));
        assert_eq!(read(&path).unwrap(), None);
        let heads: Heads = [
            (TenantId::from_uuid(uuid::Uuid::new_v4()), (7, [0xab; 32])),
            (TenantId::from_uuid(uuid::Uuid::new_v4()), (1, [0x01; 32])),
        ]
        .into();
        write(&path, &heads).unwrap();
        assert_eq!(read(&path).unwrap(), Some(heads.clone()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Nothing is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["audit.log.heads"]);
        assert!(exported_before(&log)
            .unwrap()
            .unwrap()
            .contains("2 organization(s)"));
    }

    #[test]
    fn a_damaged_heads_file_is_an_error_not_an_empty_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log.heads");
        std::fs::write(&path, "{\"organizations\": {\"x\": {\"seq\": 1").unwrap();
        assert!(read(&path).is_err());
        std::fs::write(
            &path,
            format!(
                "{{\"organizations\": {{\"{}\": {{\"seq\": 1, \"chain_hash\": \"00\"}}}}}}",
                uuid::Uuid::new_v4()
            ),
        )
        .unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("64 hex"));
    }

    #[test]
    fn an_empty_log_without_heads_was_never_exported_to() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        assert_eq!(exported_before(&log).unwrap(), None);
        std::fs::write(&log, "").unwrap();
        assert_eq!(exported_before(&log).unwrap(), None);
        std::fs::write(&log, "{}\n").unwrap();
        assert!(exported_before(&log)
            .unwrap()
            .unwrap()
            .contains("already holds exported audit events (3 bytes)"));
    }
}
