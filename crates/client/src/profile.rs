//! Saved logins: `keyplane login` keeps a URL and a token per profile name in one JSON file
//! (`$XDG_CONFIG_HOME/keyplane/profiles.json`; the CLI finds the path), readable by its owner
//! only. The file is replaced whole through a temporary file, so a crash never leaves half of it.

use crate::Error;
use keyplane_core::Plaintext;
use serde_json::{json, Map, Value};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A saved login.
pub struct Profile {
    pub url: String,
    pub token: Plaintext,
}

impl Profile {
    /// Whether `url` names the server this profile was saved for, the only one its token is sent
    /// to. Compared as parsed URLs (host case, a default port and a trailing `/` do not matter).
    pub fn serves(&self, url: &str) -> bool {
        let normal = |url: &str| {
            reqwest::Url::parse(url)
                .ok()
                .map(|url| url.as_str().trim_end_matches('/').to_string())
        };
        normal(&self.url).is_some_and(|saved| normal(url) == Some(saved))
    }
}

/// The profiles file.
pub struct Profiles {
    path: PathBuf,
}

impl Profiles {
    pub fn at(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read_all(&self) -> Result<Map<String, Value>, Error> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Map::new()),
            Err(e) => return Err(local(&self.path, "read", e)),
        };
        let value: Value = serde_json::from_str(&text).map_err(|e| {
            Error::Local(format!(
                "{} is not a keyplane profiles file ({e})",
                self.path.display()
            ))
        })?;
        Ok(value
            .get("profiles")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default())
    }

    pub fn load(&self, name: &str) -> Result<Option<Profile>, Error> {
        let all = self.read_all()?;
        let Some(entry) = all.get(name) else {
            return Ok(None);
        };
        match (entry["url"].as_str(), entry["token"].as_str()) {
            (Some(url), Some(token)) => Ok(Some(Profile {
                url: url.to_string(),
                token: Plaintext::received(token.to_string()),
            })),
            _ => Err(Error::Local(format!(
                "profile `{name}` in {} has no url or token: run `keyplane login --profile {name}` again",
                self.path.display()
            ))),
        }
    }

    pub fn save(&self, name: &str, profile: &Profile) -> Result<(), Error> {
        let mut all = self.read_all()?;
        all.insert(
            name.to_string(),
            json!({ "url": profile.url, "token": profile.token.expose_secret() }),
        );
        self.write_all(all)
    }

    /// Forgets a profile; `false` if there was none.
    pub fn remove(&self, name: &str) -> Result<bool, Error> {
        let mut all = self.read_all()?;
        let removed = all.remove(name).is_some();
        if removed {
            self.write_all(all)?;
        }
        Ok(removed)
    }

    fn write_all(&self, all: Map<String, Value>) -> Result<(), Error> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        create_private_dir(dir)?;
        let text = serde_json::to_string_pretty(&json!({ "profiles": all }))
            .expect("a map of strings is JSON");
        let temporary = dir.join(format!(".profiles.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&temporary);
        let written = private_file(&temporary)
            .and_then(|mut file| {
                file.write_all(text.as_bytes())?;
                file.write_all(b"\n")?;
                file.sync_all()
            })
            .and_then(|()| fs::rename(&temporary, &self.path));
        if let Err(e) = written {
            let _ = fs::remove_file(&temporary);
            return Err(local(&self.path, "write", e));
        }
        Ok(())
    }
}

fn local(path: &Path, what: &str, error: std::io::Error) -> Error {
    Error::Local(format!("cannot {what} {}: {error}", path.display()))
}

/// A new file that only its owner may read or write (0600), whatever the umask; fails if the
/// path exists, so nothing is ever overwritten through it.
pub fn private_file(path: &Path) -> std::io::Result<fs::File> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        let file = options.open(path)?;
        // The umask can only remove bits, but say so explicitly.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        Ok(file)
    }
    #[cfg(not(unix))]
    options.open(path)
}

pub(crate) fn create_private_dir(dir: &Path) -> Result<(), Error> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| local(dir, "create", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_serves_its_own_url_only() {
        let profile = Profile {
            url: "https://keyplane.example.com".into(),
            token: Plaintext::received("t".into()),
        };
        for same in [
            "https://keyplane.example.com",
            "https://KEYPLANE.example.com:443/",
        ] {
            assert!(profile.serves(same), "{same}");
        }
        for other in [
            "http://keyplane.example.com",
            "https://keyplane.example.com:8443",
            "https://keyplane.example.com.evil",
            "https://keyplane.example.com/other",
            "http://localhost:9999",
            "not a url",
        ] {
            assert!(!profile.serves(other), "{other}");
        }
    }
}
