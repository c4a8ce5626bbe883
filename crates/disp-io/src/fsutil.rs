//! Writing files so that a failure never leaves a partial output behind.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A sibling temporary name for `path` (same directory, so the final rename is atomic).
pub fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `bytes` to a temporary sibling, syncs it, then renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = temporary_sibling(path);
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        anyhow::bail!("{}: cannot write: {e}", path.display());
    }
    Ok(())
}

/// An output folder built under a temporary sibling name and renamed into place when complete,
/// so a failure never leaves a partial folder at the destination. Dropped unpublished, the
/// temporary folder is deleted.
pub struct StagedFolder {
    staging: tempfile::TempDir,
    destination: PathBuf,
}

impl StagedFolder {
    /// Starts a folder for `destination`, which must not exist or be an empty folder.
    pub fn new(destination: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        match std::fs::symlink_metadata(destination) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("cannot inspect output folder {}: {e}", destination.display()),
            Ok(meta) if !meta.is_dir() => anyhow::bail!("output path {} already exists and is not a folder", destination.display()),
            Ok(_) => {
                let mut entries = std::fs::read_dir(destination)
                    .with_context(|| format!("cannot read output folder {}", destination.display()))?;
                if entries.next().is_some() {
                    anyhow::bail!("output folder {} already exists and is not empty", destination.display());
                }
            }
        }
        let parent = match destination.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("cannot create the output parent folder {}", parent.display()))?;
        let name = destination
            .file_name()
            .ok_or_else(|| anyhow::anyhow!("output path {} has no folder name", destination.display()))?;
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{}.partial-", name.to_string_lossy()))
            .tempdir_in(&parent)
            .with_context(|| format!("cannot create a temporary folder in {}", parent.display()))?;
        Ok(Self { staging, destination: destination.to_path_buf() })
    }

    /// Where to write the folder's files until it is published.
    pub fn path(&self) -> &Path {
        self.staging.path()
    }

    /// Moves the finished folder to its destination.
    pub fn publish(self) -> anyhow::Result<()> {
        use anyhow::Context;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // tempdir creates 0700 and the safetensors crate writes 0600 files; a model folder
            // should be as readable as any other output.
            std::fs::set_permissions(self.staging.path(), std::fs::Permissions::from_mode(0o755))
                .context("cannot set permissions on the staging folder")?;
            for entry in std::fs::read_dir(self.staging.path())? {
                let path = entry?.path();
                if path.is_file() {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
                        .with_context(|| format!("cannot set permissions on {}", path.display()))?;
                }
            }
        }
        if self.destination.is_dir() {
            // Only reached for an empty folder (checked in `new`); rename cannot replace it on
            // every platform, so remove it first.
            std::fs::remove_dir(&self.destination)
                .with_context(|| format!("cannot replace the empty output folder {}", self.destination.display()))?;
        }
        std::fs::rename(self.staging.path(), &self.destination).with_context(|| {
            format!("cannot move {} to {}", self.staging.path().display(), self.destination.display())
        })?;
        // The folder now lives at the destination; stop the guard from deleting it.
        let _ = self.staging.keep();
        Ok(())
    }
}
