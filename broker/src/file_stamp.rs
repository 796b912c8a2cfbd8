//! Telling that a watched file changed without reading it.

use std::path::Path;
use std::time::SystemTime;

/// Modification time and size of a file; `None` while it cannot be read.
pub type Stamp = Option<(SystemTime, u64)>;

/// `metadata()` follows symlinks, so Kubernetes' `..data` symlink swap of a
/// mounted Secret shows up as a change of the target's mtime and size, like
/// an in-place write or a rename does.
pub fn stamp(p: &Path) -> Stamp {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}
