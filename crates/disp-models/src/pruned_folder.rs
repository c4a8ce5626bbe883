//! The on-disk format of a pruned model folder, shared by the exporter (`disp-export`) and the
//! loader here.
//!
//! A pruned folder is an ordinary HF folder whose block linears hold only the kept rows and
//! columns (and bias entries), plus:
//! * `config.json` = the source config with a `disp` object ([`ExportManifest`]);
//! * one I64 tensor per block and selection in `model.safetensors`, named by
//!   [`index_tensor_name`], holding the kept positions.
//!
//! Which axis of which tensor a selection cuts ([`cut_axes`]) follows from the family's block
//! description ([`crate::decoder::BlockKeys`], [`LinearSlot::cut_sites`]), the same one the
//! loader and `prune` use; the exporter slices (or zero-fills) with it and the loader uses it to
//! expect the smaller shapes, so the two cannot disagree.
// Reads untrusted input: no panicking shortcuts (issue 12).
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use disp_core::params::{BlockWidths, RatioOf};
use disp_core::plan::{LayerIndices, ModelIdentity, PruningPlan, PLAN_FORMAT_VERSION};
use disp_core::selection::Site;
use serde::{Deserialize, Serialize};

use crate::config::{Family, RawConfig};
pub use crate::decoder::LinearSlot;
use crate::weights::Checkpoint;

/// The `disp` section format this build writes and reads.
pub const EXPORT_FORMAT_VERSION: u32 = 1;

/// The key of the section in `config.json`.
pub const CONFIG_KEY: &str = "disp";

/// The `disp` section of a pruned folder's `config.json`: the plan without its index sets (those
/// are tensors) plus what a reader needs to check them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportManifest {
    pub export_format_version: u32,
    /// The model the plan was made for; `fingerprint` is the SHA-256 of the source folder's
    /// config and weight files.
    pub source: ModelIdentity,
    pub method: String,
    pub ratio_of: RatioOf,
    pub target_ratio: f64,
    pub achieved_ratio: f64,
    pub dense_params: u64,
    pub pruned_params: u64,
    /// Kept widths per block: |S1|, |S2|, |S3|, |S4|, |S5|.
    pub layer_widths: Vec<[usize; 5]>,
    /// Where the index sets are: a name pattern of the I64 tensors in the weight file.
    pub index_tensors: String,
    #[serde(default)]
    pub search: serde_json::Value,
}

impl ExportManifest {
    pub fn of_plan(plan: &PruningPlan) -> Self {
        Self {
            export_format_version: EXPORT_FORMAT_VERSION,
            source: plan.model.clone(),
            method: plan.method.clone(),
            ratio_of: plan.ratio_of,
            target_ratio: plan.target_ratio,
            achieved_ratio: plan.achieved_ratio,
            dense_params: plan.dense_params,
            pruned_params: plan.pruned_params,
            layer_widths: plan.widths().iter().map(BlockWidths::as_array).collect(),
            index_tensors: index_tensor_name_pattern(),
            search: plan.search.clone(),
        }
    }

    /// The plan again, with the index sets read from the tensors.
    pub fn into_plan(self, layers: Vec<LayerIndices>) -> PruningPlan {
        PruningPlan {
            format_version: PLAN_FORMAT_VERSION,
            model: self.source,
            method: self.method,
            ratio_of: self.ratio_of,
            target_ratio: self.target_ratio,
            achieved_ratio: self.achieved_ratio,
            dense_params: self.dense_params,
            pruned_params: self.pruned_params,
            layers,
            search: self.search,
        }
    }

    /// The manifest of a config, if it has a `disp` section. Errors name the config file.
    pub fn from_config(raw: &RawConfig) -> Result<Option<Self>> {
        let Some(section) = raw.json.get(CONFIG_KEY) else { return Ok(None) };
        let version = section.get("export_format_version").and_then(serde_json::Value::as_u64);
        match version {
            Some(v) if v == EXPORT_FORMAT_VERSION as u64 => {}
            Some(v) => {
                bail!("{}: 'disp' section has export_format_version {v}; this build reads version {EXPORT_FORMAT_VERSION}", raw.path.display())
            }
            None => bail!("{}: 'disp' section has no export_format_version", raw.path.display()),
        }
        serde_json::from_value(section.clone()).map(Some).map_err(|e| anyhow!("{}: malformed 'disp' section: {e}", raw.path.display()))
    }
}

fn index_tensor_name_pattern() -> String {
    let keys: Vec<&str> = Site::ALL.iter().map(|s| s.key()).collect();
    format!("disp.layers.{{layer}}.{{{}}}", keys.join("|"))
}

/// The tensor holding the kept positions of `site` in block `layer`.
pub fn index_tensor_name(layer: usize, site: Site) -> String {
    format!("disp.layers.{layer}.{}", site.key())
}

/// Which selections cut a block tensor: `rows` the HF first axis (outputs, and bias entries),
/// `cols` the second (inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutAxes {
    pub layer: usize,
    pub rows: Option<Site>,
    pub cols: Option<Site>,
}

/// One block tensor: where it sits and which selections cut it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockTensor {
    pub axes: CutAxes,
    pub slot: LinearSlot,
    pub is_bias: bool,
}

/// The block linear tensor `name` of a `family` checkpoint, or `None` for anything else
/// (embeddings, norms, head, ...).
pub fn block_tensor(family: Family, name: &str) -> Option<BlockTensor> {
    // `…layers.{i}.{suffix}`; OPT prefixes it with `model.decoder.` or `decoder.`.
    let (_, rest) = name.split_once("layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (linear, part) = suffix.rsplit_once('.')?;
    let is_bias = match part {
        "weight" => false,
        "bias" => true,
        _ => return None,
    };
    let (slot, _) = family.block_keys().linears().find(|(_, key)| *key == linear)?;
    // The `.bias` of a linear is cut by its rows site only.
    let (rows, cols) = slot.cut_sites();
    let cols = if is_bias { None } else { cols };
    Some(BlockTensor { axes: CutAxes { layer, rows, cols }, slot, is_bias })
}

/// How the selections cut the tensor `name` of a `family` checkpoint (`None`: left whole).
pub fn cut_axes(family: Family, name: &str) -> Option<CutAxes> {
    let tensor = block_tensor(family, name)?;
    // q/k/v biases live on the (never pruned) head dimension.
    (tensor.axes.rows.is_some() || tensor.axes.cols.is_some()).then_some(tensor.axes)
}

/// The index sets of a pruned folder, as the loader needs them to expect cut tensors.
#[derive(Debug, Clone)]
pub struct PrunedLayout {
    pub family: Family,
    pub layers: Vec<LayerIndices>,
}

impl PrunedLayout {
    /// The stored shape of `name` given its full `shape`.
    pub fn stored_shape(&self, name: &str, shape: &[usize]) -> Vec<usize> {
        let mut stored = shape.to_vec();
        if let Some(cut) = cut_axes(self.family, name) {
            if let Some(layer) = self.layers.get(cut.layer) {
                if let (Some(site), Some(dim)) = (cut.rows, stored.get_mut(0)) {
                    *dim = layer.get(site).len();
                }
                if let (Some(site), Some(dim)) = (cut.cols, stored.get_mut(1)) {
                    *dim = layer.get(site).len();
                }
            }
        }
        stored
    }
}

/// Reads the index-set tensors of a pruned folder, checking them against the manifest's widths.
pub fn read_index_sets(ck: &Checkpoint, manifest: &ExportManifest) -> Result<Vec<LayerIndices>> {
    manifest
        .layer_widths
        .iter()
        .enumerate()
        .map(|(layer, widths)| {
            let mut result = Ok(());
            let indices = LayerIndices::from_sites(|site| {
                let name = index_tensor_name(layer, site);
                match ck.read_i64(&name, &[widths.get(site.index()).copied().unwrap_or(0)]) {
                    Ok(values) => values
                        .into_iter()
                        .map(|v| {
                            u32::try_from(v).unwrap_or_else(|_| {
                                result = Err(anyhow!("{}: tensor '{name}' holds {v}, not a position", ck.describe()));
                                0
                            })
                        })
                        .collect(),
                    Err(e) => {
                        result = Err(e);
                        Vec::new()
                    }
                }
            });
            result.map(|()| indices)
        })
        .collect()
}

/// The plan stored in a pruned folder, or `None` for an ordinary (dense) folder. The index sets
/// are read but not checked against the model; [`crate::load_model`] does that.
pub fn read_plan(dir: &Path) -> Result<Option<PruningPlan>> {
    let raw = RawConfig::read(dir)?;
    let Some(manifest) = ExportManifest::from_config(&raw)? else { return Ok(None) };
    let ck = Checkpoint::open(dir)?;
    let layers = read_index_sets(&ck, &manifest)?;
    Ok(Some(manifest.into_plan(layers)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn every_family_cuts_its_block_linears_and_nothing_else() {
        let llama = |s: &str| cut_axes(Family::Llama, &format!("model.layers.3.{s}"));
        assert_eq!(llama("self_attn.k_proj.weight"), Some(CutAxes { layer: 3, rows: None, cols: Some(Site::AttnIn) }));
        assert_eq!(llama("self_attn.k_proj.bias"), None, "q/k/v outputs are never cut");
        let k_bias = block_tensor(Family::Llama, "model.layers.3.self_attn.k_proj.bias").unwrap();
        assert_eq!((k_bias.slot, k_bias.is_bias), (LinearSlot::AttnInput(1), true));
        assert_eq!(block_tensor(Family::Opt, "decoder.layers.0.fc2.weight").unwrap().slot, LinearSlot::MlpOutput);
        assert_eq!(block_tensor(Family::Phi, "model.layers.0.mlp.fc1.bias").unwrap().slot, LinearSlot::MlpInput(0));
        assert_eq!(llama("mlp.down_proj.weight").unwrap().rows, Some(Site::MlpOut));
        assert_eq!(llama("mlp.down_proj.weight").unwrap().cols, Some(Site::MlpInter));
        assert_eq!(llama("input_layernorm.weight"), None, "norms run at full width");
        let opt = cut_axes(Family::Opt, "decoder.layers.12.fc1.bias").unwrap();
        assert_eq!((opt.layer, opt.rows, opt.cols), (12, Some(Site::MlpInter), None));
        assert_eq!(cut_axes(Family::Opt, "model.decoder.layers.0.self_attn.out_proj.bias").unwrap().rows, Some(Site::AttnOut));
        assert_eq!(cut_axes(Family::Phi, "model.layers.1.self_attn.dense.weight").unwrap().rows, Some(Site::AttnOut));
        assert_eq!(cut_axes(Family::Phi, "model.layers.1.mlp.fc1.weight").unwrap().cols, Some(Site::MlpIn));
        assert_eq!(cut_axes(Family::Phi, "model.embed_tokens.weight"), None);
        // A LLaMA name is not an OPT tensor.
        assert_eq!(cut_axes(Family::Opt, "model.layers.0.mlp.down_proj.weight"), None);
        // The LLaMA-like families share LLaMA's linears; Qwen3's per-head norms stay whole.
        for family in [Family::Qwen2, Family::Qwen3, Family::Mistral] {
            let name = "model.layers.1.mlp.gate_proj.weight";
            assert_eq!(cut_axes(family, name), cut_axes(Family::Llama, name), "{family:?}");
        }
        assert_eq!(cut_axes(Family::Qwen3, "model.layers.0.self_attn.q_norm.weight"), None);
        assert_eq!(cut_axes(Family::Qwen2, "model.layers.0.self_attn.v_proj.bias"), None);
    }

    #[test]
    fn stored_shapes_follow_the_index_sets() {
        let mut layer = LayerIndices::full(8, 16);
        layer.attn_in = vec![0, 2, 4];
        layer.mlp_inter = vec![1, 5];
        layer.mlp_out = vec![7];
        let layout = PrunedLayout { family: Family::Llama, layers: vec![layer] };
        assert_eq!(layout.stored_shape("model.layers.0.self_attn.q_proj.weight", &[8, 8]), vec![8, 3]);
        assert_eq!(layout.stored_shape("model.layers.0.mlp.down_proj.weight", &[8, 16]), vec![1, 2]);
        assert_eq!(layout.stored_shape("model.layers.0.mlp.up_proj.weight", &[16, 8]), vec![2, 8]);
        assert_eq!(layout.stored_shape("model.norm.weight", &[8]), vec![8]);
    }
}
