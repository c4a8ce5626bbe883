//! Small helpers: hashing, atomic writes, running programs, printing.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

/// Size and lowercase hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<(u64, String)> {
    let mut f = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, hex(&h.finalize())))
}

#[cfg(test)]
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `path` with `.partial` appended to its file name: where downloads and writes go until they
/// are complete and verified.
pub fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// [`disp_io::fsutil::write_atomic`] after creating the parent folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    disp_io::fsutil::write_atomic(path, bytes)
}

/// Writes `bytes` unless the file already holds exactly them; returns whether it wrote.
pub fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<bool> {
    if fs::read(path).map(|old| old == bytes).unwrap_or(false) {
        return Ok(false);
    }
    write_atomic(path, bytes)?;
    Ok(true)
}

/// Removes a file or folder if it exists.
pub fn remove_any(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => return Ok(()),
    }
    .with_context(|| format!("removing {}", path.display()))
}

/// A fresh, empty folder (whatever was there is removed).
pub fn fresh_dir(path: &Path) -> Result<()> {
    remove_any(path)?;
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

/// The last non-empty line of a program's output, for one-line error messages.
pub fn last_line(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    s.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("").to_string()
}

/// What a program printed, when it ran.
#[derive(Debug)]
pub struct Ran {
    pub stdout: Vec<u8>,
}

/// Runs a program to completion with captured output; a failure (cannot start, or non-zero
/// exit) is a one-line error naming the command and quoting its last line of stderr.
pub fn run(cmd: &mut Command) -> Result<Ran> {
    let shown = show_command(cmd);
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| anyhow!("cannot run `{shown}`: {e}"))?;
    if !out.status.success() {
        let mut why = last_line(&out.stderr);
        if why.is_empty() {
            why = last_line(&out.stdout);
        }
        bail!("`{shown}` failed ({}): {why}", out.status);
    }
    Ok(Ran { stdout: out.stdout })
}

pub fn show_command(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push_str(&format!(" \"{a}\""));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// Seconds since `t`, for messages.
pub fn secs(t: Instant) -> String {
    format!("{:.1} s", t.elapsed().as_secs_f64())
}

/// 1234567 -> "1,234,567".
pub use disp_io::fmt::thousands;

/// Size in MB (10^6), for messages.
pub fn mb(n: u64) -> String {
    format!("{:.1} MB", n as f64 / 1e6)
}

/// The paths in `dir` with extension `extension`, sorted.
pub fn sorted_files_with_extension(dir: &Path, extension: &str) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> =
        fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == extension)).collect();
    files.sort();
    Ok(files)
}

/// The only file in `dir` whose name starts with `prefix` and ends with `suffix`.
pub fn find_one(dir: &Path, prefix: &str, suffix: &str) -> Result<Option<PathBuf>> {
    let mut found = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(_) => return Ok(None),
    };
    for e in rd {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) && name.ends_with(suffix) && e.path().is_file() {
            found.push(e.path());
        }
    }
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => bail!(
            "{} holds several {prefix}*{suffix} files; keep one: {:?}",
            dir.display(),
            found.iter().map(|p| p.file_name().unwrap_or_default()).collect::<Vec<_>>()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_and_partial() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(466_854), "466,854");
        assert_eq!(thousands(98_362_432), "98,362,432");
        assert_eq!(partial_path(Path::new("a/b.txt")), Path::new("a/b.txt.partial"));
    }

    #[test]
    fn atomic_write_and_hash() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/x.txt");
        write_atomic(&p, b"abc").unwrap();
        assert!(!partial_path(&p).exists());
        let (n, h) = sha256_file(&p).unwrap();
        assert_eq!(n, 3);
        assert_eq!(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(sha256_bytes(b"abc"), h);
        assert!(!write_if_changed(&p, b"abc").unwrap());
        assert!(write_if_changed(&p, b"abcd").unwrap());
    }

    #[test]
    fn failing_command_is_one_line() {
        let e = run(Command::new("sh").args(["-c", "echo first >&2; echo 'the reason' >&2; exit 3"])).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("the reason") && e.contains("sh -c"), "{e}");
        let e = run(&mut Command::new("/nonexistent/program")).unwrap_err().to_string();
        assert!(e.contains("cannot run"), "{e}");
    }
}

/// Moves a finished download out of its scratch folder to `dest`, removes the scratch folder and
/// reports the size and time taken since `started`.
pub fn move_download_into_place(ctx: &crate::Ctx, tag: &str, got: &Path, dest: &Path, scratch: &Path, started: Instant) -> Result<()> {
    let root = &ctx.root;
    fs::rename(got, dest).with_context(|| format!("moving {} to {}", got.display(), crate::stamp::rel(root, dest)))?;
    remove_any(scratch)?;
    let bytes = fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
    ctx.say(tag, &format!("downloaded {} ({}) in {}", crate::stamp::rel(root, dest), mb(bytes), secs(started)));
    Ok(())
}

/// The current time as `YYYY-MM-DD HH:MM UTC`.
pub fn utc_now() -> String {
    let seconds = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    utc_from_unix(seconds)
}

fn utc_from_unix(seconds: u64) -> String {
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    // Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's civil_from_days).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", of_day / 3600, of_day % 3600 / 60)
}

/// The CPU model, its logical cores and the memory, e.g.
/// `Intel(R) Xeon(R) … (2 logical cores, 23 GiB)`, from /proc (Linux); what is unknown is left out.
pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| info.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory_gib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|info| {
        let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib as f64 / (1024.0 * 1024.0))
    });
    match memory_gib {
        Some(gib) => format!("{cpu} ({cores} logical cores, {gib:.0} GiB)"),
        None => format!("{cpu} ({cores} logical cores)"),
    }
}

#[cfg(test)]
mod date_tests {
    use super::utc_from_unix;

    #[test]
    fn unix_seconds_become_gregorian_dates() {
        assert_eq!(utc_from_unix(0), "1970-01-01 00:00 UTC");
        // 2000-02-29 (a leap day of a century leap year) 12:34.
        assert_eq!(utc_from_unix(951_827_640), "2000-02-29 12:34 UTC");
        // 2026-11-29 14:18.
        assert_eq!(utc_from_unix(1_795_961_880), "2026-11-29 14:18 UTC");
    }
}
