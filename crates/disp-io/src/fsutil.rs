//! Writing files so that a failure never leaves a partial output behind.

use std::io::Write;
use std::path::{Path, PathBuf};

/// `message` on one line: control characters (a newline in a tensor name or metadata key read
/// from a file, say) are escaped, so an error about a file stays the one line it promises.
pub fn one_line(message: &str) -> String {
    message.chars().flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] }).collect()
}

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

/// Fails unless `destination` is free for an output folder: absent, or an empty folder. Cheap;
/// commands call it before long work whose result goes there.
pub fn check_output_folder(destination: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    match std::fs::symlink_metadata(destination) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => anyhow::bail!("cannot inspect output folder {}: {e}", destination.display()),
        Ok(meta) if !meta.is_dir() => anyhow::bail!("output path {} already exists and is not a folder", destination.display()),
        Ok(_) => {
            let mut entries = std::fs::read_dir(destination).with_context(|| format!("cannot read output folder {}", destination.display()))?;
            if entries.next().is_some() {
                anyhow::bail!("output folder {} already exists and is not empty", destination.display());
            }
            Ok(())
        }
    }
}

/// Removes the staging folders `PREFIX<pid>-XXXX` in `parent` whose process is gone (a run killed
/// before it could publish or clean up). Where it cannot tell whether the process lives, the
/// folder is kept and named in a warning.
fn remove_stale_staging(parent: &Path, prefix: &str) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(parent) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix) else { continue };
        let pid = rest.split_once('-').and_then(|(pid, _)| pid.parse::<u32>().ok());
        let path = entry.path();
        match pid.map(process_is_alive) {
            Some(Some(false)) => {
                std::fs::remove_dir_all(&path).map_err(|e| anyhow::anyhow!("cannot remove the stale partial output {}: {e}", path.display()))?;
                tracing::info!(path = %path.display(), "removed a partial output left by a killed run");
            }
            Some(Some(true)) => tracing::warn!(path = %path.display(), "another run is writing the same output"),
            _ => tracing::warn!(path = %path.display(), "a partial output of an earlier run is left; delete it if no run is writing it"),
        }
    }
    Ok(())
}

/// Whether process `pid` exists, where the platform says (`/proc` on Linux).
fn process_is_alive(pid: u32) -> Option<bool> {
    if !Path::new("/proc/self").exists() {
        return None;
    }
    Some(Path::new(&format!("/proc/{pid}")).exists())
}

/// Test hook: when this variable is set, a finished folder is not published; the process says
/// where it is staged and waits to be killed, so tests can interrupt a run at its last moment
/// without depending on timing.
pub const HOLD_BEFORE_PUBLISH: &str = "DISP_TEST_HOLD_BEFORE_PUBLISH";

/// An output folder built under a temporary sibling name and renamed into place when complete,
/// so a failure never leaves a partial folder at the destination. Dropped unpublished, the
/// temporary folder is deleted.
pub struct StagedFolder {
    staging: tempfile::TempDir,
    destination: PathBuf,
}

impl StagedFolder {
    /// Starts a folder for `destination`, which must not exist or be an empty folder. Staging
    /// folders of the same destination left by runs that were killed are removed first.
    pub fn new(destination: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        check_output_folder(destination)?;
        let parent = match destination.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).with_context(|| format!("cannot create the output parent folder {}", parent.display()))?;
        let name = destination.file_name().ok_or_else(|| anyhow::anyhow!("output path {} has no folder name", destination.display()))?;
        let prefix = format!(".{}.partial-", name.to_string_lossy());
        remove_stale_staging(&parent, &prefix)?;
        // The process id in the name tells a later run whether the folder's writer still lives.
        let staging = tempfile::Builder::new()
            .prefix(&format!("{prefix}{}-", std::process::id()))
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
        if std::env::var_os(HOLD_BEFORE_PUBLISH).is_some() {
            eprintln!("holding {} before publishing", self.staging.path().display());
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
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
        std::fs::rename(self.staging.path(), &self.destination)
            .with_context(|| format!("cannot move {} to {}", self.staging.path().display(), self.destination.display()))?;
        // The folder now lives at the destination; stop the guard from deleting it.
        let _ = self.staging.keep();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_line_escapes_control_characters_only() {
        assert_eq!(super::one_line("tensor 'a\nb\t' — café"), "tensor 'a\\nb\\t' — café");
    }
}
