//! Changing the standalone auth bundle file for the admin API: decide
//! whether this broker's bundle may be written here at all, then read the
//! file, apply one pure edit (`starling_model::bundle_edit`), write the
//! result atomically and put it in force the way a reload does.
//!
//! The file is re-read under the lock on every edit rather than edited from
//! the bundle in force: a hand edit made since the last reload is then kept
//! instead of being overwritten with an older copy, and the lock makes
//! concurrent API edits apply one after the other. (A hand edit landing in
//! the few milliseconds between the read and the rename can still be lost;
//! people who edit by hand while scripts write should pick one.)

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use starling_model::acl::AuthState;
use starling_model::bundle::{AuthBundle, BundleError};
use starling_model::bundle_edit::EditError;
use starling_model::config::AuthConfig;

use crate::server::Shared;

/// Where the bundle in force comes from, as far as writing it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source<'a> {
    /// `--auth-bundle FILE` / `[auth] bundle` without a Secret: ours to write.
    File(&'a Path),
    /// `[auth] bundle_secret`: the operator writes the bundle from Token
    /// and ACL resources, and the file is its read-only mount.
    Operator { secret: &'a str },
    /// No bundle at all.
    None,
}

/// The operator's Secret wins over the file: in Kubernetes both are set,
/// and the file is the Secret's mount.
pub fn source(cfg: &AuthConfig) -> Source<'_> {
    match (&cfg.bundle_secret, &cfg.bundle) {
        (Some(secret), _) => Source::Operator { secret },
        (None, Some(path)) => Source::File(path),
        (None, None) => Source::None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "tokens and ACLs of this broker are managed by the operator (Secret {secret:?}); change its Token and ACL resources (tokens.starling.dev, acls.starling.dev) instead."
    )]
    Managed { secret: String },
    #[error(
        "this broker runs without an auth bundle file, so tokens and ACLs cannot be changed; start it with --auth-bundle FILE."
    )]
    NoBundle,
    #[error("{0}.")]
    Edit(#[from] EditError),
    #[error("the auth bundle file {path} cannot be read: {source}.")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the auth bundle file {path} is not valid ({source}); fix it by hand before changing it over the API."
    )]
    InvalidFile { path: PathBuf, source: BundleError },
    #[error("the auth bundle edit did not finish ({0}); nothing was applied.")]
    Aborted(String),
    #[error("the auth bundle file {path} cannot be written: {source}.")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Applies `edit` to the bundle file and puts the result in force; returns
/// the new bundle. Nothing is written or applied when anything fails.
///
/// The work runs in its own task: if the caller goes away (the HTTP client
/// hangs up) the edit still either completes, applied, or never starts,
/// and the lock is held until it is done, so no second edit can read the
/// file while a first is half-way through writing it.
pub async fn edit<F>(shared: &Arc<Shared>, edit: F) -> Result<AuthBundle, StoreError>
where
    F: FnOnce(&AuthBundle) -> Result<AuthBundle, EditError> + Send + 'static,
{
    let path = match source(&shared.config.auth) {
        Source::File(p) => p.to_path_buf(),
        Source::Operator { secret } => {
            return Err(StoreError::Managed {
                secret: secret.to_owned(),
            });
        }
        Source::None => return Err(StoreError::NoBundle),
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        let _serial = shared.auth.edits.lock().await;
        // File I/O and fsync block; keep them off the async workers.
        let (bundle, bytes, state) = tokio::task::spawn_blocking(move || edit_file(&path, edit))
            .await
            .map_err(|e| StoreError::Aborted(e.to_string()))??;
        // Still under the lock, so states go into force in the order their
        // files were written.
        super::watch::put_in_force(&shared, state, &bytes, "admin API");
        Ok(bundle)
    })
    .await
    .map_err(|e| StoreError::Aborted(e.to_string()))?
}

/// Read, edit, check with the loader's own code, write. Returns the new
/// bundle, its bytes and their compiled state.
pub fn edit_file<F>(path: &Path, edit: F) -> Result<(AuthBundle, Vec<u8>, AuthState), StoreError>
where
    F: FnOnce(&AuthBundle) -> Result<AuthBundle, EditError>,
{
    let bytes = fs::read(path).map_err(|source| StoreError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let current = AuthBundle::parse(&bytes).map_err(|source| StoreError::InvalidFile {
        path: path.to_path_buf(),
        source,
    })?;
    let new = edit(&current)?;
    let mut text = new.to_json_pretty();
    text.push('\n');
    let bytes = text.into_bytes();
    // The bytes as the loader will read them on the next start, not just
    // the struct: what is written is what was checked.
    let state = AuthState::load(&bytes).map_err(EditError::Invalid)?;
    write_atomic(path, &bytes)?;
    Ok((new, bytes, state))
}

/// Temp file beside the target, fsync, rename, fsync the directory: a
/// crash leaves the old bundle or the new one, never half of one, and a
/// watching broker never reads a partial file. A symlinked bundle is
/// written at its target so the link stays.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let werr = |source| StoreError::Write {
        path: path.to_path_buf(),
        source,
    };
    let real = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let dir = real
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = real.file_name().map_or_else(
        || "auth-bundle".into(),
        |n| n.to_string_lossy().into_owned(),
    );
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        // The bundle holds hashes and the hash key: keep whatever
        // permissions its owner gave it.
        if let Ok(m) = fs::metadata(&real) {
            f.set_permissions(m.permissions())?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, &real)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(werr(e));
    }
    // The rename is done; failing to make it durable does not undo it.
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot fsync the auth bundle's directory");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use starling_model::bundle_edit::{self, NewToken};

    #[test]
    fn who_may_write() {
        let mut cfg = AuthConfig::default();
        assert_eq!(source(&cfg), Source::None);
        cfg.bundle = Some("/etc/b.json".into());
        assert_eq!(source(&cfg), Source::File(Path::new("/etc/b.json")));
        cfg.bundle_secret = Some("demo-auth".into());
        assert_eq!(
            source(&cfg),
            Source::Operator {
                secret: "demo-auth"
            }
        );
        cfg.bundle = None;
        assert_eq!(
            source(&cfg),
            Source::Operator {
                secret: "demo-auth"
            }
        );
    }

    #[test]
    fn refusals_are_one_sentence_naming_what_to_do() {
        let m = StoreError::Managed {
            secret: "demo-auth".into(),
        }
        .to_string();
        assert!(m.contains("Token and ACL resources"), "{m}");
        let n = StoreError::NoBundle.to_string();
        assert!(n.contains("--auth-bundle FILE"), "{n}");
        for s in [m, n] {
            assert_eq!(s.matches(". ").count(), 0, "one sentence: {s}");
            assert!(s.ends_with('.'));
        }
    }

    fn new(name: &str) -> NewToken {
        NewToken {
            name: name.into(),
            ..NewToken::default()
        }
    }

    #[test]
    fn edits_are_written_and_refusals_leave_the_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.json");
        fs::write(&path, AuthBundle::new("b").to_json_pretty()).unwrap();
        let (b, bytes, state) = edit_file(&path, |b| {
            bundle_edit::add_token(b, new("t1"), "secret-of-t1-0123456")
        })
        .unwrap();
        assert_eq!(state.token_count(), 1);
        assert_eq!(fs::read(&path).unwrap(), bytes);
        assert_eq!(AuthBundle::parse(&bytes).unwrap(), b);

        let before = fs::read(&path).unwrap();
        let e = edit_file(&path, |b| {
            bundle_edit::add_token(b, new("t1"), "another-secret-01234")
        })
        .unwrap_err();
        assert!(matches!(e, StoreError::Edit(EditError::TokenExists(_))));
        assert_eq!(fs::read(&path).unwrap(), before, "nothing written");
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
    }

    #[test]
    fn an_invalid_file_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.json");
        fs::write(&path, b"{\"version\": 1, \"broker\": \"\"}").unwrap();
        let e = edit_file(&path, |b| Ok(b.clone())).unwrap_err();
        assert!(e.to_string().contains("fix it by hand"), "{e}");
        assert_eq!(
            fs::read(&path).unwrap(),
            b"{\"version\": 1, \"broker\": \"\"}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn permissions_and_symlinks_are_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.json");
        fs::write(&real, AuthBundle::new("b").to_json_pretty()).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("bundle.json");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        edit_file(&link, |b| {
            bundle_edit::add_token(b, new("t"), "secret-of-t-01234567")
        })
        .unwrap();
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        let m = fs::metadata(&real).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            AuthBundle::parse(&fs::read(&real).unwrap())
                .unwrap()
                .tokens
                .len(),
            1
        );
    }
}
