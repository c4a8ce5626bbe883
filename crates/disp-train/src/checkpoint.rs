//! Search checkpoints: one file holding a JSON header (step, seed, the settings that must match
//! on resume), the hypernetwork weights and the AdamW state (both burn burnpack records, which
//! keep the parameter ids the optimizer state is keyed by). Written atomically.
//!
//! No generator state is stored: every random draw of the search is a function of the seed and
//! the step (see [`crate::rng`]), so the step is enough to continue exactly.
//!
//! Layout: `DISPHNC1`, then three sections, each a little-endian u64 length and its bytes:
//! header JSON, hypernetwork record, optimizer record.

use std::path::Path;

use anyhow::{bail, Context, Result};
use disp_core::plan::ModelIdentity;
use serde::{Deserialize, Serialize};

use crate::StepReport;

const MAGIC: &[u8; 8] = b"DISPHNC1";
pub const CHECKPOINT_FORMAT_VERSION: u32 = 1;

/// What a checkpoint records besides the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointHeader {
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

pub struct CheckpointData {
    pub header: CheckpointHeader,
    pub hypernet: Vec<u8>,
    pub optimizer: Vec<u8>,
}

pub fn write(path: &Path, header: &CheckpointHeader, hypernet: &[u8], optimizer: &[u8]) -> Result<()> {
    let json = serde_json::to_vec_pretty(header).expect("headers serialise");
    let mut bytes = Vec::with_capacity(8 + 24 + json.len() + hypernet.len() + optimizer.len());
    bytes.extend_from_slice(MAGIC);
    for section in [&json[..], hypernet, optimizer] {
        bytes.extend_from_slice(&(section.len() as u64).to_le_bytes());
        bytes.extend_from_slice(section);
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create directory", dir.display()))?;
    }
    disp_core::fsutil::write_atomic(path, &bytes)
}

pub fn read(path: &Path) -> Result<CheckpointData> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read checkpoint", path.display()))?;
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        bail!("{}: not a disp search checkpoint", path.display());
    }
    let mut rest = &bytes[MAGIC.len()..];
    let mut sections = Vec::with_capacity(3);
    for name in ["header", "hypernetwork", "optimizer"] {
        if rest.len() < 8 {
            bail!("{}: truncated checkpoint (no {name} section)", path.display());
        }
        let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
        rest = &rest[8..];
        if rest.len() < len {
            bail!("{}: truncated checkpoint ({name} section)", path.display());
        }
        sections.push(rest[..len].to_vec());
        rest = &rest[len..];
    }
    let optimizer = sections.pop().unwrap();
    let hypernet = sections.pop().unwrap();
    let header: CheckpointHeader = serde_json::from_slice(&sections[0])
        .with_context(|| format!("{}: unreadable checkpoint header", path.display()))?;
    if header.format_version != CHECKPOINT_FORMAT_VERSION {
        bail!(
            "{}: checkpoint format {} (this build reads {CHECKPOINT_FORMAT_VERSION})",
            path.display(),
            header.format_version
        );
    }
    Ok(CheckpointData { header, hypernet, optimizer })
}
