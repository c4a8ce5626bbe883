//! The five index sets of a block and the three ways a block can use them.
//!
//! * dense: every position, nothing to do;
//! * masked (search): a gate vector multiplies the positions of the full-width tensor, so the
//!   same weights serve every candidate set and gradients reach the gates;
//! * pruned (inference): `index_select` of the kept positions, weights already cut to them, and
//!   `index_add` back into the residual.
//!
//! With 0/1 gates the masked and the pruned block compute the same function.

use std::sync::Arc;

use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::activation_stats::{ActivationPoint, ActivationRecorder};

/// One of the five selections of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Site {
    /// S1: which positions of the normalised hidden state the attention reads.
    AttnIn,
    /// S2: which residual positions the attention output is added to.
    AttnOut,
    /// S3: which positions of the normalised hidden state the MLP reads.
    MlpIn,
    /// S4: which MLP intermediate channels are kept.
    MlpInter,
    /// S5: which residual positions the MLP output is added to.
    MlpOut,
}

impl Site {
    pub const ALL: [Site; 5] = [Site::AttnIn, Site::AttnOut, Site::MlpIn, Site::MlpInter, Site::MlpOut];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The paper's name, S1..S5.
    /// The name in files: plan JSON fields, pruned-folder index tensors (`attn_in` ...).
    pub fn key(self) -> &'static str {
        ["attn_in", "attn_out", "mlp_in", "mlp_inter", "mlp_out"][self.index()]
    }

    pub fn label(self) -> &'static str {
        ["S1", "S2", "S3", "S4", "S5"][self.index()]
    }

    pub fn description(self) -> &'static str {
        ["attention input", "attention output", "MLP input", "MLP intermediate", "MLP output"][self.index()]
    }
}

/// Gate vectors of one block (masked mode), one per [`Site`]: widths d, d, d, d_ff, d.
/// Optionally also an [`ActivationRecorder`] that the masked selector feeds.
#[derive(Debug, Clone)]
pub struct BlockGates {
    gates: [Tensor<1>; 5],
    recorder: Option<Arc<ActivationRecorder>>,
}

impl BlockGates {
    pub fn new(gates: [Tensor<1>; 5]) -> Self {
        Self { gates, recorder: None }
    }

    /// All-ones gates that record activation statistics: the block computes the dense function
    /// (× 1 is exact) and every selector call adds Σ x² per channel to the recorder.
    pub fn recording(hidden: usize, intermediate: usize, device: &Device) -> Self {
        Self { recorder: Some(Arc::new(ActivationRecorder::new())), ..Self::ones(hidden, intermediate, device) }
    }

    /// The recorder of gates built by [`Self::recording`].
    pub fn recorder(&self) -> Option<&ActivationRecorder> {
        self.recorder.as_deref()
    }

    fn observe(&self, point: ActivationPoint, x: &Tensor<3>) {
        if let Some(recorder) = &self.recorder {
            recorder.record(point, x);
        }
    }

    /// All-ones gates: the masked block then equals the dense one.
    pub fn ones(hidden: usize, intermediate: usize, device: &Device) -> Self {
        Self::new(Site::ALL.map(|site| {
            let width = if site == Site::MlpInter { intermediate } else { hidden };
            Tensor::ones([width], device)
        }))
    }

    /// 0/1 gates from index sets.
    pub fn from_indices(indices: &LayerIndices, hidden: usize, intermediate: usize, device: &Device) -> Self {
        Self::new(Site::ALL.map(|site| {
            let width = if site == Site::MlpInter { intermediate } else { hidden };
            let mut gate = vec![0f32; width];
            for &i in indices.get(site) {
                gate[i as usize] = 1.0;
            }
            Tensor::from_data(TensorData::new(gate, [width]), device)
        }))
    }

    pub fn get(&self, site: Site) -> &Tensor<1> {
        &self.gates[site.index()]
    }
}

/// Kept positions of one block (pruned mode), on the compute device.
#[derive(Debug, Clone)]
pub struct IndexTensors {
    indices: [Tensor<1, Int>; 5],
}

impl IndexTensors {
    pub fn new(layer: &LayerIndices, device: &Device) -> Self {
        Self {
            indices: Site::ALL.map(|site| {
                let kept: Vec<i64> = layer.get(site).iter().map(|&i| i as i64).collect();
                let len = kept.len();
                Tensor::from_data(TensorData::new(kept, [len]), device)
            }),
        }
    }

    pub fn get(&self, site: Site) -> &Tensor<1, Int> {
        &self.indices[site.index()]
    }
}

pub use crate::plan::LayerIndices;

/// How a block applies its selections in one forward pass.
#[derive(Debug, Clone, Copy)]
pub enum Selector<'a> {
    Dense,
    Masked(&'a BlockGates),
    Pruned(&'a IndexTensors),
}

impl Selector<'_> {
    /// Reads a block input (S1 or S3) from the full-width normalised hidden state `[B, T, d]`.
    /// Pruned: `[B, T, |S|]`; masked: `[B, T, d]` with the gate applied.
    pub fn read(&self, site: Site, normed: Tensor<3>) -> Tensor<3> {
        match self {
            Selector::Dense => normed,
            Selector::Masked(gates) => {
                gates.observe(if site == Site::AttnIn { ActivationPoint::AttnIn } else { ActivationPoint::MlpIn }, &normed);
                normed * gates.get(site).clone().unsqueeze::<3>()
            }
            Selector::Pruned(indices) => {
                // As a 2-D `[B·T, d]` select: burn-flex copies whole rows' gathers there, while its
                // N-D path computes every element's coordinates (7x slower at SmolLM2's size).
                let [batch, seq, width] = normed.dims();
                let kept = indices.get(site).clone();
                let count = kept.dims()[0];
                normed.reshape([batch * seq, width]).select(1, kept).reshape([batch, seq, count])
            }
        }
    }

    /// Gates the MLP intermediate (S4) in masked mode. Pruned weights already have only the kept
    /// channels, so there is nothing to do then.
    pub fn scale_intermediate(&self, hidden: Tensor<3>) -> Tensor<3> {
        match self {
            Selector::Masked(gates) => {
                gates.observe(ActivationPoint::MlpInter, &hidden);
                hidden * gates.get(Site::MlpInter).clone().unsqueeze::<3>()
            }
            Selector::Dense | Selector::Pruned(_) => hidden,
        }
    }

    /// Shows the attention context `[B, T, q_dim]` (the input of the attention output
    /// projection) to a recorder; does nothing unless the gates record.
    pub fn observe_attention_context(&self, context: &Tensor<3>) {
        if let Selector::Masked(gates) = self {
            gates.observe(ActivationPoint::AttnContext, context);
        }
    }

    /// Adds a block output (S2 or S5) into the full-width residual `[B, T, d]`.
    pub fn write(&self, site: Site, residual: Tensor<3>, output: Tensor<3>) -> Tensor<3> {
        match self {
            Selector::Dense => residual + output,
            Selector::Masked(gates) => {
                gates.observe(if site == Site::AttnOut { ActivationPoint::AttnOut } else { ActivationPoint::MlpOut }, &output);
                residual + output * gates.get(site).clone().unsqueeze::<3>()
            }
            Selector::Pruned(indices) => {
                // 2-D for the same reason as in `read`.
                let [batch, seq, width] = residual.dims();
                let count = output.dims()[2];
                residual
                    .reshape([batch * seq, width])
                    .select_assign(1, indices.get(site).clone(), output.reshape([batch * seq, count]), IndexingUpdateOp::Add)
                    .reshape([batch, seq, width])
            }
        }
    }
}
