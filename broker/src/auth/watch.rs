//! Keeps the auth bundle in force current: reloads the file when it changes
//! and re-checks every connection after a reload and at each token expiry.
//!
//! The file is polled (a `stat` every 250 ms, a read only when size or
//! mtime changed) rather than watched with inotify: polling sees
//! Kubernetes' symlink swap of a mounted Secret the same way as an
//! in-place write or a rename, needs no extra dependency, and 250 ms keeps
//! revocation well inside the 2 s promise.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use starling_model::acl::AuthState;

use crate::file_stamp::{Stamp, stamp};
use crate::metrics;
use crate::server::Shared;

pub const POLL: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read auth bundle {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("auth bundle {path} rejected: {source}")]
    Invalid {
        path: PathBuf,
        source: starling_model::bundle::BundleError,
    },
}

/// The bundle file's bytes and their compiled state. The bytes are kept
/// (`AuthHub::remember`) so the admin API can list what is in force.
pub fn load(path: &Path) -> Result<(Vec<u8>, AuthState), LoadError> {
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let state = AuthState::load(&bytes).map_err(|source| LoadError::Invalid {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((bytes, state))
}

/// Tells every connected client's task to re-check its token and
/// subscriptions against the bundle now in force.
pub fn recheck_all(shared: &Shared) {
    for s in shared.registry.online() {
        if let Some(link) = &s.lock().link {
            link.request_recheck();
        }
    }
    for link in shared.registry.web_links() {
        link.request_recheck();
    }
}

/// Polls `path`; a valid new bundle replaces the old one, an invalid one is
/// logged and counted while the old one stays in force.
/// `loaded` is the stamp taken just before the bundle in force was read, so
/// a write between that read and this task's start is not missed.
pub async fn watch_file(shared: Arc<Shared>, path: PathBuf, loaded: Stamp) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut last = loaded;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        if shared.auth.api_live() {
            // The Secret watch is current; the mounted copy lags behind it
            // (the kubelet's sync) and must not put an older bundle back.
            continue;
        }
        match std::fs::read(&path) {
            Ok(bytes) => apply_bytes(&shared, &bytes, &path.display().to_string()),
            Err(source) => {
                metrics::inc(&shared.metrics.bundle_errors);
                let e = LoadError::Read {
                    path: path.clone(),
                    source,
                };
                tracing::error!(error = %e, "keeping the auth bundle already in force");
            }
        }
    }
}

/// Puts bundle bytes read from `origin` (a file, or a Secret through the API
/// server) in force and re-checks every connection; invalid bytes are
/// logged and counted and the old bundle stays. The same bytes twice (the
/// Secret watch and then the mounted file) are applied once.
pub fn apply_bytes(shared: &Shared, bytes: &[u8], origin: &str) {
    if !shared.auth.is_new(bytes) {
        return;
    }
    match AuthState::load(bytes) {
        Ok(state) => put_in_force(shared, state, bytes, origin),
        Err(e) => {
            metrics::inc(&shared.metrics.bundle_errors);
            tracing::error!(origin, error = %e, "auth bundle rejected; keeping the one already in force");
        }
    }
}

/// Replaces the bundle in force with `state` (compiled from `bytes`) and
/// re-checks every connection, so revoked tokens are cut off and changed
/// ACLs bite. The admin API's bundle edits come through here too, so they
/// act exactly like a reload of the file.
pub fn put_in_force(shared: &Shared, state: AuthState, bytes: &[u8], origin: &str) {
    let old = shared.auth.replace(state);
    shared.auth.remember(bytes);
    let new = shared.auth.current();
    let revoked = new.revoked_since(&old, SystemTime::now());
    metrics::inc(&shared.metrics.bundle_reloads);
    tracing::info!(
        origin,
        tokens = new.token_count(),
        acls = new.acl_count(),
        revoked = ?revoked,
        "auth bundle reloaded"
    );
    recheck_all(shared);
}

/// Sleeps until the next token expiry and then re-checks connections, so
/// an expiring token is cut off on time without any file change.
pub async fn expiry_timer(shared: Arc<Shared>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let next = shared.auth.current().next_expiry(SystemTime::now());
        let wait = next
            .and_then(|t| t.duration_since(SystemTime::now()).ok())
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = shared.auth.changed.notified() => continue,
            _ = tokio::time::sleep(wait + Duration::from_millis(5)) => {
                if next.is_some() {
                    recheck_all(&shared);
                }
            }
        }
    }
}
