//! Debian packages: `apt-get download` into `data/.cache/debs/`, `dpkg-deb -x` to unpack.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};

use crate::stamp::rel;
use crate::util::{find_one, fresh_dir, move_download_into_place, remove_any, run};
use crate::Ctx;

/// Errors of `apt-get download` that an `apt-get update` may cure.
fn lists_missing(err: &str) -> bool {
    ["Unable to locate package", "no installation candidate", "Failed to fetch", "404"].iter().any(|s| err.contains(s))
}

/// The `.deb` of `pkg` (the candidate version), downloaded once into `data/.cache/debs/`.
pub fn fetch_deb(ctx: &mut Ctx, tag: &str, pkg: &str) -> Result<PathBuf> {
    let dir = ctx.root.join("data/.cache/debs");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", rel(&ctx.root, &dir)))?;
    let prefix = format!("{pkg}_");
    if let Some(deb) = find_one(&dir, &prefix, ".deb")?.filter(|_| !ctx.force) {
        if run(Command::new("dpkg-deb").arg("--info").arg(&deb)).is_ok() {
            ctx.say(tag, &format!("using cached {}", rel(&ctx.root, &deb)));
            return Ok(deb);
        }
        ctx.say(tag, &format!("cached {} is damaged; downloading again", rel(&ctx.root, &deb)));
        remove_any(&deb)?;
    }
    let scratch = dir.join(format!(".partial-apt-{pkg}"));
    fresh_dir(&scratch)?;
    ctx.act(tag, &format!("downloading {pkg} with apt-get download ..."));
    let t = Instant::now();
    let download = || run(Command::new("apt-get").args(["download", "-q", pkg]).current_dir(&scratch));
    if let Err(e) = download() {
        let msg = format!("{e:#}");
        if !lists_missing(&msg) {
            return Err(e);
        }
        ctx.act(tag, &format!("apt-get download failed ({msg}); running apt-get update and retrying"));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        download()?;
    }
    let got = find_one(&scratch, &prefix, ".deb")?.ok_or_else(|| anyhow!("apt-get download {pkg} left no {prefix}*.deb"))?;
    let dest = dir.join(got.file_name().expect("file name"));
    move_download_into_place(ctx, tag, &got, &dest, &scratch, t)?;
    Ok(dest)
}

/// Unpacks the files of a `.deb` under `dest` (which must exist).
pub fn extract_deb(ctx: &Ctx, deb: &Path, dest: &Path) -> Result<()> {
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest)).with_context(|| format!("unpacking {}", rel(&ctx.root, deb)))?;
    Ok(())
}

/// The version field of a `.deb` file name (`name_version_arch.deb`), for messages and stamps.
pub fn deb_version(deb: &Path) -> String {
    let name = deb.file_name().unwrap_or_default().to_string_lossy();
    name.split('_').nth(1).unwrap_or("?").replace("%3a", ":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_from_file_name() {
        assert_eq!(deb_version(Path::new("x/r-cran-janeaustenr_1.0.0-1_all.deb")), "1.0.0-1");
        assert_eq!(deb_version(Path::new("bible-kjv_1%3a4.38_amd64.deb")), "1:4.38");
    }

    #[test]
    fn which_failures_warrant_an_update() {
        assert!(lists_missing("E: Unable to locate package r-cran-janeaustenr"));
        assert!(lists_missing("E: Can't select candidate version: has no installation candidate"));
        assert!(!lists_missing("E: Could not open lock file"));
    }
}
