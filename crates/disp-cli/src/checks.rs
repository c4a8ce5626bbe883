//! Flag checks that run before a command starts its expensive part (loading, tokenising,
//! searching), so a bad value costs nothing and gets a one-line error naming the flag. Each is a
//! small function of the values it checks, to move with the command it serves.

use std::path::Path;

use anyhow::{bail, Result};

/// `--seq-len`: a window predicts each token from the ones before it, so it needs two.
pub fn seq_len(seq_len: usize) -> Result<()> {
    if seq_len < 2 {
        bail!("--seq-len must be at least 2 (a window predicts each token from the ones before it), got {seq_len}");
    }
    Ok(())
}

/// `generate`'s sampling flags.
pub fn generation(max_tokens: usize, temperature: f64, top_p: f64) -> Result<()> {
    if max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if !(temperature >= 0.0 && temperature.is_finite()) {
        bail!("--temperature must be a finite number of at least 0 (0 is greedy), got {temperature}");
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {top_p}");
    }
    Ok(())
}

/// `--resume` continues a checkpoint, which must then exist (a missing one would silently start
/// the search from step 0).
pub fn resume(resume: bool, checkpoint: Option<&Path>) -> Result<()> {
    match (resume, checkpoint) {
        (false, _) => Ok(()),
        (true, None) => bail!("--resume needs --checkpoint FILE"),
        (true, Some(path)) if !path.is_file() => {
            bail!("{}: --resume: no such checkpoint (drop --resume to start a new search)", path.display())
        }
        (true, Some(_)) => Ok(()),
    }
}

/// `--export DIR` must be free before a search whose result goes there.
pub fn export_folder(folder: Option<&Path>) -> Result<()> {
    match folder {
        Some(folder) => disp_core::fsutil::check_output_folder(folder).map_err(|e| anyhow::anyhow!("--export: {e:#}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_check_names_its_flag() {
        assert!(seq_len(1).unwrap_err().to_string().starts_with("--seq-len must be at least 2"));
        seq_len(2).unwrap();
        assert!(generation(0, 0.0, 0.9).unwrap_err().to_string().starts_with("--max-tokens"));
        assert!(generation(1, f64::NAN, 0.9).unwrap_err().to_string().starts_with("--temperature"));
        for top_p in [0.0, 1.5, f64::NAN] {
            assert!(generation(1, 1.0, top_p).unwrap_err().to_string().starts_with("--top-p"), "{top_p}");
        }
        generation(1, 0.7, 1.0).unwrap();
        assert!(resume(true, Some(Path::new("/nonexistent/ck.bin"))).unwrap_err().to_string().contains("no such checkpoint"));
        resume(false, Some(Path::new("/nonexistent/ck.bin"))).unwrap();
    }
}
