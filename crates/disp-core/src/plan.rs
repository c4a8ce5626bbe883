//! The pruning plan: per-layer index sets plus enough identity and bookkeeping to check that
//! it belongs to a model and to report what it achieved. Serialised as JSON.
// Reads untrusted input: no panicking shortcuts (issue 12).
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::params::{BlockWidths, ModelShape, RatioOf};
use crate::selection::Site;

pub const PLAN_FORMAT_VERSION: u32 = 1;

/// Kept positions of one block, sorted and unique.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerIndices {
    pub attn_in: Vec<u32>,
    pub attn_out: Vec<u32>,
    pub mlp_in: Vec<u32>,
    pub mlp_inter: Vec<u32>,
    pub mlp_out: Vec<u32>,
}

impl LayerIndices {
    pub fn get(&self, site: Site) -> &[u32] {
        match site {
            Site::AttnIn => &self.attn_in,
            Site::AttnOut => &self.attn_out,
            Site::MlpIn => &self.mlp_in,
            Site::MlpInter => &self.mlp_inter,
            Site::MlpOut => &self.mlp_out,
        }
    }

    pub fn from_sites(mut f: impl FnMut(Site) -> Vec<u32>) -> Self {
        Self { attn_in: f(Site::AttnIn), attn_out: f(Site::AttnOut), mlp_in: f(Site::MlpIn), mlp_inter: f(Site::MlpInter), mlp_out: f(Site::MlpOut) }
    }

    /// Every position kept.
    pub fn full(hidden: usize, intermediate: usize) -> Self {
        Self::from_sites(|site| {
            let width = if site == Site::MlpInter { intermediate } else { hidden };
            (0..width as u32).collect()
        })
    }
}

/// Which model a plan was made for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// `model_type` of the config (llama, opt, phi).
    pub model_type: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// SHA-256 of the config and weight files, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruningPlan {
    pub format_version: u32,
    pub model: ModelIdentity,
    /// How the sets were found (disp, uniform-magnitude, ...).
    pub method: String,
    pub ratio_of: RatioOf,
    pub target_ratio: f64,
    pub achieved_ratio: f64,
    pub dense_params: u64,
    pub pruned_params: u64,
    pub layers: Vec<LayerIndices>,
    /// Free-form record of the search (steps, λ, seed, data, final losses).
    #[serde(default)]
    pub search: serde_json::Value,
}

impl PruningPlan {
    /// A plan for `layers`, with its parameter counts and achieved ratio worked out.
    pub fn from_layers(
        model: ModelIdentity,
        shape: &ModelShape,
        method: &str,
        ratio_of: RatioOf,
        target_ratio: f64,
        layers: Vec<LayerIndices>,
        search: serde_json::Value,
    ) -> Self {
        let widths: Vec<BlockWidths> = layers.iter().map(BlockWidths::of).collect();
        Self {
            format_version: PLAN_FORMAT_VERSION,
            model,
            method: method.to_string(),
            ratio_of,
            target_ratio,
            achieved_ratio: shape.removed_ratio(&widths, ratio_of),
            dense_params: shape.dense_total_params(),
            pruned_params: shape.total_params(&widths),
            layers,
            search,
        }
    }

    pub fn widths(&self) -> Vec<BlockWidths> {
        self.layers.iter().map(BlockWidths::of).collect()
    }

    /// Checks that the plan fits a model: same identity, index sets sorted, unique, in range and
    /// non-empty.
    pub fn validate(&self, identity: &ModelIdentity, shape: &ModelShape) -> anyhow::Result<()> {
        if self.format_version != PLAN_FORMAT_VERSION {
            anyhow::bail!("unknown plan format version {} (this build reads {PLAN_FORMAT_VERSION})", self.format_version);
        }
        let (m, p) = (identity, &self.model);
        if m.model_type != p.model_type
            || m.num_layers != p.num_layers
            || m.hidden_size != p.hidden_size
            || m.intermediate_size != p.intermediate_size
        {
            anyhow::bail!(
                "plan is for a {} model with {} layers, hidden {}, intermediate {}, but the model is {} with {} layers, hidden {}, intermediate {}",
                p.model_type,
                p.num_layers,
                p.hidden_size,
                p.intermediate_size,
                m.model_type,
                m.num_layers,
                m.hidden_size,
                m.intermediate_size
            );
        }
        if let (Some(a), Some(b)) = (&m.fingerprint, &p.fingerprint) {
            if a != b {
                anyhow::bail!("plan was made for different weights (fingerprint {b}, model has {a})");
            }
        }
        if self.layers.len() != shape.blocks.len() {
            anyhow::bail!("plan has {} layers, the model {}", self.layers.len(), shape.blocks.len());
        }
        for (layer, (indices, block)) in self.layers.iter().zip(&shape.blocks).enumerate() {
            for (site, width) in Site::ALL.into_iter().zip(block.site_widths()) {
                check_index_set(indices.get(site), width)
                    .map_err(|e| anyhow::anyhow!("layer {layer} {} ({}): {e}", site.label(), site.description()))?;
            }
        }
        Ok(())
    }

    // A plan has no map with non-string keys, the one thing serde_json cannot write.
    #[allow(clippy::expect_used)]
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plans always serialise")
    }

    /// Writes the plan atomically.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        crate::fsutil::write_atomic(path, self.to_json().as_bytes())
    }

    /// Reads a plan, refusing a format this build does not know (before any model is loaded).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// A plan from its JSON text (errors do not name a file).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let plan: Self = serde_json::from_str(text).map_err(|e| anyhow::anyhow!("not a pruning plan: {e}"))?;
        if plan.format_version != PLAN_FORMAT_VERSION {
            anyhow::bail!("unknown plan format version {} (this build reads {PLAN_FORMAT_VERSION})", plan.format_version);
        }
        Ok(plan)
    }
}

/// An index set must be non-empty, strictly increasing and below `width`.
pub fn check_index_set(indices: &[u32], width: usize) -> Result<(), String> {
    for pair in indices.windows(2) {
        if let [a, b] = *pair {
            if b <= a {
                return Err(format!("indices not strictly increasing ({a} then {b})"));
            }
        }
    }
    let Some(&last) = indices.last() else { return Err("empty index set".into()) };
    if last as usize >= width {
        return Err(format!("index {last} out of range for width {width}"));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn plan_fields_are_the_site_keys() {
        let layer = LayerIndices::from_sites(|site| vec![site.index() as u32]);
        let json = serde_json::to_value(&layer).unwrap();
        let mut fields: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        let mut keys: Vec<&str> = Site::ALL.iter().map(|s| s.key()).collect();
        fields.sort_unstable();
        keys.sort_unstable();
        assert_eq!(fields, keys);
        for site in Site::ALL {
            assert_eq!(json[site.key()], serde_json::json!([site.index()]));
        }
    }
    use crate::params::{BlockShape, MlpKind};

    fn shape() -> (ModelIdentity, ModelShape) {
        let block = BlockShape {
            hidden: 4,
            intermediate: 6,
            q_dim: 4,
            kv_dim: 4,
            mlp: MlpKind::Gated,
            qkv_bias: false,
            out_bias: false,
            mlp_in_bias: false,
            mlp_out_bias: false,
        };
        let id = ModelIdentity { model_type: "llama".into(), num_layers: 1, hidden_size: 4, intermediate_size: 6, fingerprint: None };
        (id, ModelShape { blocks: vec![block], other_params: 10 })
    }

    fn plan(layer: LayerIndices) -> PruningPlan {
        let (id, _) = shape();
        PruningPlan {
            format_version: PLAN_FORMAT_VERSION,
            model: id,
            method: "test".into(),
            ratio_of: RatioOf::Total,
            target_ratio: 0.1,
            achieved_ratio: 0.1,
            dense_params: 0,
            pruned_params: 0,
            layers: vec![layer],
            search: serde_json::Value::Null,
        }
    }

    #[test]
    fn rejects_bad_index_sets_with_the_layer_and_site() {
        let (id, shape) = shape();
        assert!(plan(LayerIndices::full(4, 6)).validate(&id, &shape).is_ok());
        let mut bad = LayerIndices::full(4, 6);
        bad.mlp_inter = vec![0, 6];
        let err = plan(bad).validate(&id, &shape).unwrap_err().to_string();
        assert!(err.contains("layer 0 S4") && err.contains("out of range"), "{err}");
        let mut bad = LayerIndices::full(4, 6);
        bad.attn_out = vec![2, 1];
        let err = plan(bad).validate(&id, &shape).unwrap_err().to_string();
        assert!(err.contains("S2") && err.contains("strictly increasing"), "{err}");
        let mut bad = LayerIndices::full(4, 6);
        bad.mlp_in = vec![];
        assert!(plan(bad).validate(&id, &shape).unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn rejects_a_plan_for_another_model() {
        let (mut id, shape) = shape();
        id.hidden_size = 8;
        let err = plan(LayerIndices::full(4, 6)).validate(&id, &shape).unwrap_err().to_string();
        assert!(err.contains("plan is for a llama model"), "{err}");
    }

    #[test]
    fn json_round_trip() {
        let p = plan(LayerIndices::full(4, 6));
        let back: PruningPlan = serde_json::from_str(&p.to_json()).unwrap();
        assert_eq!(p, back);
    }
}
