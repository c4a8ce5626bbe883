//! Search checkpoints: one file holding a JSON header (step, seed, the settings that must match
//! on resume), the hypernetwork weights and the AdamW state (both burn burnpack records, which
//! keep the parameter ids the optimizer state is keyed by). Written atomically.
//!
//! No generator state is stored: every random draw of the search is a function of the seed and
//! the step (see [`crate::rng`]), so the step is enough to continue exactly.
//!
//! Layout: `DISPHNC2`, then three sections, each a little-endian u64 length and its bytes:
//! header JSON, hypernetwork record, optimizer record; then the SHA-256 of everything before it,
//! so that a damaged file is refused instead of resuming from altered weights.
// Reads untrusted input: no panicking shortcuts (issue 12).
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::Path;

use anyhow::{bail, Context, Result};
use disp_core::plan::ModelIdentity;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::StepReport;

const MAGIC: &[u8; 8] = b"DISPHNC2";
/// The magic of the first format, which had no checksum.
const MAGIC_WITHOUT_CHECKSUM: &[u8; 8] = b"DISPHNC1";
const CHECKSUM_BYTES: usize = 32;
pub const SEARCH_STATE_FORMAT_VERSION: u32 = 1;

/// What a checkpoint records besides the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchStateHeader {
    pub format_version: u32,
    /// Steps completed.
    pub step: usize,
    pub model: ModelIdentity,
    /// The settings a resumed run must share with the run that wrote the checkpoint.
    pub settings: serde_json::Value,
    /// The report of the last completed step.
    pub last: Option<StepReport>,
    /// The regulariser of step 1 (for the summary in the plan).
    pub first_regulariser: Option<f64>,
}

pub struct SearchState {
    pub header: SearchStateHeader,
    pub hypernet: Vec<u8>,
    pub optimizer: Vec<u8>,
}

pub fn write(path: &Path, header: &SearchStateHeader, hypernet: &[u8], optimizer: &[u8]) -> Result<()> {
    let json = serde_json::to_vec_pretty(header).context("cannot serialise the checkpoint header")?;
    let mut bytes = Vec::with_capacity(8 + 24 + json.len() + hypernet.len() + optimizer.len() + CHECKSUM_BYTES);
    bytes.extend_from_slice(MAGIC);
    for section in [&json[..], hypernet, optimizer] {
        bytes.extend_from_slice(&(section.len() as u64).to_le_bytes());
        bytes.extend_from_slice(section);
    }
    let checksum = Sha256::digest(&bytes);
    bytes.extend_from_slice(&checksum);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create directory", dir.display()))?;
    }
    disp_core::fsutil::write_atomic(path, &bytes)
}

pub fn read(path: &Path) -> Result<SearchState> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read checkpoint", path.display()))?;
    let (magic, rest) = bytes.split_at_checked(MAGIC.len()).unwrap_or((&[], &[]));
    if magic == MAGIC_WITHOUT_CHECKSUM {
        bail!("{}: checkpoint written by an older disp (format without checksum); delete it and start again", path.display());
    }
    if magic != MAGIC {
        bail!("{}: not a disp search checkpoint", path.display());
    }
    let Some((body, checksum)) = rest.split_at_checked(rest.len().saturating_sub(CHECKSUM_BYTES)).filter(|(_, c)| c.len() == CHECKSUM_BYTES) else {
        bail!("{}: truncated checkpoint (no checksum)", path.display());
    };
    let mut hasher = Sha256::new();
    hasher.update(magic);
    hasher.update(body);
    if hasher.finalize().as_slice() != checksum {
        bail!("{}: checkpoint is damaged (its SHA-256 checksum does not match its contents)", path.display());
    }
    let mut rest = body;
    let mut sections = Vec::with_capacity(3);
    for name in ["header", "hypernetwork", "optimizer"] {
        let Some((len, after)) = rest.split_first_chunk::<8>() else {
            bail!("{}: truncated checkpoint (no {name} section)", path.display());
        };
        let len = usize::try_from(u64::from_le_bytes(*len)).unwrap_or(usize::MAX);
        let Some((section, after)) = after.split_at_checked(len) else {
            bail!("{}: truncated checkpoint ({name} section)", path.display());
        };
        sections.push(section);
        rest = after;
    }
    let [header, hypernet, optimizer] = sections[..] else {
        bail!("{}: checkpoint has {} sections, expected 3", path.display(), sections.len());
    };
    let header: SearchStateHeader = serde_json::from_slice(header).with_context(|| format!("{}: unreadable checkpoint header", path.display()))?;
    if header.format_version != SEARCH_STATE_FORMAT_VERSION {
        bail!("{}: checkpoint format {} (this build reads {SEARCH_STATE_FORMAT_VERSION})", path.display(), header.format_version);
    }
    Ok(SearchState { header, hypernet: hypernet.to_vec(), optimizer: optimizer.to_vec() })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn header() -> SearchStateHeader {
        SearchStateHeader {
            format_version: SEARCH_STATE_FORMAT_VERSION,
            step: 7,
            model: ModelIdentity { model_type: "llama".into(), num_layers: 2, hidden_size: 4, intermediate_size: 6, fingerprint: None },
            settings: serde_json::json!({"seed": 1}),
            last: None,
            first_regulariser: None,
        }
    }

    #[test]
    fn a_checkpoint_reads_back_and_any_flipped_byte_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ck.bin");
        write(&path, &header(), b"hypernet", b"optimizer").unwrap();
        let back = read(&path).unwrap();
        assert_eq!((back.header, back.hypernet.as_slice(), back.optimizer.as_slice()), (header(), &b"hypernet"[..], &b"optimizer"[..]));
        let good = std::fs::read(&path).unwrap();
        for at in [MAGIC.len() + 3, good.len() / 2, good.len() - 20, good.len() - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            let err = format!("{:#}", read(&path).err().unwrap());
            assert!(err.contains("ck.bin: checkpoint is damaged (its SHA-256 checksum does not match"), "byte {at}: {err}");
        }
        for len in [0, 5, MAGIC.len() + 10] {
            std::fs::write(&path, &good[..len]).unwrap();
            let err = format!("{:#}", read(&path).err().unwrap());
            assert!(err.contains("ck.bin: ") && !err.contains('\n'), "{len} bytes: {err}");
        }
    }
}
