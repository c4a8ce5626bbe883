//! How much memory a run may reserve: the limit every size a file or flag implies is checked
//! against before anything is allocated for it.

/// Test hook: when set (to a number of bytes), [`available_bytes`] answers it instead of the
/// system's figure, so refusals can be tested without exhausting memory.
pub const AVAILABLE_OVERRIDE: &str = "DISP_TEST_AVAILABLE_MEMORY";

/// Bytes the system can still hand out (Linux `MemAvailable`), or `None` where it is unknown
/// (then no limit is applied beyond what the caller checks against file sizes).
pub fn available_bytes() -> Option<u64> {
    if let Some(bytes) = std::env::var(AVAILABLE_OVERRIDE).ok().and_then(|v| v.parse().ok()) {
        return Some(bytes);
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Fails with "`what` needs N GB but only M GB of memory are available" when `bytes` exceeds the
/// available memory.
pub fn check_fits(what: &str, bytes: u128) -> anyhow::Result<()> {
    if let Some(available) = available_bytes() {
        if bytes > u128::from(available) {
            anyhow::bail!("{what} needs {} but only {} of memory are available", human_bytes(bytes), human_bytes(available.into()));
        }
    }
    Ok(())
}

pub use disp_io::fmt::human_bytes;

#[cfg(test)]
mod tests {
    #[test]
    fn an_impossible_size_does_not_fit_and_a_small_one_does() {
        if super::available_bytes().is_some() {
            let err = super::check_fits("the test", u128::from(u64::MAX)).unwrap_err().to_string();
            assert!(err.starts_with("the test needs 18446744073.7 GB but only "), "{err}");
        }
        super::check_fits("the test", 1).unwrap();
        assert_eq!(super::human_bytes(2_500_000), "2.5 MB");
    }
}
