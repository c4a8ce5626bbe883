//! What produces the gate logits the search trains: the DISP-LLM hypernetwork, or — the paper's
//! ablation, `disp-direct` — one learnable logit per prunable position with no network at all.
//! The [`Searcher`](crate::Searcher) sees only [`GateGenerator`], so both sources share the
//! loss, the optimizer, checkpoints, resume, NaN handling and the final calibration.

use anyhow::{anyhow, Result};
use burn::module::{Module, Param};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Device, Gradients, Tensor};
use serde::{Deserialize, Serialize};

use crate::hypernet::{fixed_inputs, HyperNet, HyperNetShape};

/// Which gate generator a search trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateSource {
    /// DISP-LLM: fixed inputs → bidirectional GRU → per-gate linear maps.
    #[default]
    HyperNetwork,
    /// The ablation: the logits themselves are the parameters.
    Direct,
}

impl GateSource {
    /// The `method` a plan from this source records.
    pub fn method(self) -> &'static str {
        match self {
            GateSource::HyperNetwork => "disp",
            GateSource::Direct => "disp-direct",
        }
    }
}

/// Learnable gate logits, one vector per site and layer, stacked per site: `logits[s]` is
/// `[layers, width_s]`. AdamW and its weight decay act element-wise, so stacking changes nothing
/// against 5·L separate vectors.
#[derive(Module, Debug)]
pub struct DirectLogits {
    pub logits: Vec<Param<Tensor<2>>>,
}

impl DirectLogits {
    /// All-zero logits: with the search's +offset every gate starts at "keep", as the
    /// hypernetwork's near-zero outputs do.
    pub fn zeros(shape: HyperNetShape, device: &Device) -> Self {
        Self { logits: shape.widths.iter().map(|&w| Param::from_tensor(Tensor::zeros([shape.layers, w], device))).collect() }
    }

    pub fn forward(&self) -> [Tensor<2>; 5] {
        std::array::from_fn(|s| self.logits[s].val())
    }
}

/// The trainable producer of the gate logits of one search.
// One per search, never moved in a hot path: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum GateGenerator {
    HyperNetwork {
        net: HyperNet,
        /// The fixed, untrained inputs `[1, 5·layers, INPUT_WIDTH]`.
        inputs: Tensor<3>,
    },
    Direct(DirectLogits),
}

impl GateGenerator {
    /// A fresh generator on `device` (an autodiff device); the hypernetwork is drawn from `seed`.
    pub fn new(source: GateSource, shape: HyperNetShape, seed: u64, device: &Device) -> Self {
        match source {
            GateSource::HyperNetwork => {
                GateGenerator::HyperNetwork { net: HyperNet::new(shape, seed, device), inputs: fixed_inputs(shape, seed, device) }
            }
            GateSource::Direct => GateGenerator::Direct(DirectLogits::zeros(shape, device)),
        }
    }

    pub fn source(&self) -> GateSource {
        match self {
            GateGenerator::HyperNetwork { .. } => GateSource::HyperNetwork,
            GateGenerator::Direct(_) => GateSource::Direct,
        }
    }

    /// Logits per site, `[layers, width_s]`, before the offset.
    pub fn logits(&self) -> [Tensor<2>; 5] {
        match self {
            GateGenerator::HyperNetwork { net, inputs } => net.forward(inputs.clone()),
            GateGenerator::Direct(direct) => direct.forward(),
        }
    }

    /// One optimizer update from the gradients of a backward pass.
    pub fn update(&mut self, optim: &mut ModuleOptimizer, learning_rate: f64, grads: Gradients) {
        match self {
            GateGenerator::HyperNetwork { net, .. } => {
                let grads = GradientsParams::from_grads(grads, net);
                *net = optim.step(learning_rate, net.clone(), grads);
            }
            GateGenerator::Direct(direct) => {
                let grads = GradientsParams::from_grads(grads, direct);
                *direct = optim.step(learning_rate, direct.clone(), grads);
            }
        }
    }

    /// The trained parameters as a burnpack record (the parameter ids the optimizer state is
    /// keyed by included).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let bytes = match self {
            GateGenerator::HyperNetwork { net, .. } => net.clone().into_record().into_bytes(),
            GateGenerator::Direct(direct) => direct.clone().into_record().into_bytes(),
        };
        bytes.map(|b| b.to_vec()).map_err(|e| anyhow!("cannot serialise the gate generator: {e:?}"))
    }

    /// Replaces the parameters with those of a record written by [`Self::to_bytes`] for the
    /// same source and shape.
    pub fn load_bytes(&mut self, bytes: Vec<u8>) -> Result<()> {
        let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes)).map_err(|e| anyhow!("bad gate generator record: {e:?}"))?;
        match self {
            GateGenerator::HyperNetwork { net, .. } => {
                *net = net.clone().try_load_record(record).map_err(|e| anyhow!("hypernetwork does not fit: {e:?}"))?;
            }
            GateGenerator::Direct(direct) => {
                *direct = direct.clone().try_load_record(record).map_err(|e| anyhow!("direct gate logits do not fit: {e:?}"))?;
            }
        }
        Ok(())
    }
}
