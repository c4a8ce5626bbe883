//! Low-rank adapters (LoRA, Hu et al. 2021) on a model's block linears, for recovery
//! fine-tuning of a pruned model.
//!
//! Each adapted linear computes `x·(W + s·A·B)` with the frozen `W` `[in, out]`, `A` `[in, r]`
//! drawn from the seed, `B` `[r, out]` starting at zero (so an untrained adapter changes nothing)
//! and `s = α/r`. The adapters live on the autodiff device; the frozen weights stay on the plain
//! device. A step installs `W + s·A·B` (an autodiff tensor) as the linear's weight, so the
//! family code runs unchanged and its generic (burn) path carries the gradient to `A` and `B`;
//! merging writes the same sum as a plain tensor. A host fast path that reads tensor values
//! directly would cut that gradient, so fast paths must only run on tensors that are not
//! autodiff tensors (`layers::causal_attention` checks `device.is_autodiff()`): installed
//! adapters make every activation after the first adapted linear an autodiff tensor, which
//! keeps the generic path; after [`LoraAdapters::merge`] the model is plain again and fast.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};
use disp_models::layers::Linear;
use disp_models::CausalLm;
use serde::{Deserialize, Serialize};

use crate::rng::{stream, Purpose};

/// The block linears an adapter can sit on, by their LLaMA names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraTarget {
    Q,
    K,
    V,
    /// The attention output projection.
    O,
    /// The gated MLP's gate projection (absent from two-matrix MLPs).
    Gate,
    /// The gated MLP's up projection, or a two-matrix MLP's first linear (fc1).
    Up,
    /// The MLP output projection (down_proj, fc2).
    Down,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [LoraTarget::Q, LoraTarget::K, LoraTarget::V, LoraTarget::O, LoraTarget::Gate, LoraTarget::Up, LoraTarget::Down];

    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q",
            LoraTarget::K => "k",
            LoraTarget::V => "v",
            LoraTarget::O => "o",
            LoraTarget::Gate => "gate",
            LoraTarget::Up => "up",
            LoraTarget::Down => "down",
        }
    }

    /// The linear of block `layer` this target names, if the family has it.
    fn linear(self, model: &mut dyn CausalLm, layer: usize) -> Option<&mut Linear> {
        let b = model.block_linears_mut(layer);
        let gated = b.mlp_inputs.len() == 2;
        let mut attn = b.attn_inputs.into_iter();
        let mut mlp = b.mlp_inputs.into_iter();
        match self {
            LoraTarget::Q => attn.next(),
            LoraTarget::K => attn.nth(1),
            LoraTarget::V => attn.nth(2),
            LoraTarget::O => Some(b.attn_output),
            LoraTarget::Gate => gated.then(|| mlp.next()).flatten(),
            LoraTarget::Up => mlp.nth(usize::from(gated)),
            LoraTarget::Down => Some(b.mlp_output),
        }
    }
}

impl FromStr for LoraTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        LoraTarget::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown LoRA target '{s}' (expected q, k, v, o, gate, up or down)"))
    }
}

impl fmt::Display for LoraTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which linear an adapter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AdapterSite {
    pub layer: usize,
    pub target: LoraTarget,
}

/// The trainable factors, one `A` and one `B` per adapted linear (in [`LoraAdapters::sites`]
/// order).
#[derive(Module, Debug)]
pub struct LoraFactors {
    pub a: Vec<Param<Tensor<2>>>,
    pub b: Vec<Param<Tensor<2>>>,
}

/// Adapters on a model's block linears with the frozen weights they adapt.
#[derive(Debug, Clone)]
pub struct LoraAdapters {
    pub factors: LoraFactors,
    pub sites: Vec<AdapterSite>,
    /// The frozen weights `W` (plain device), in `sites` order.
    base: Vec<Tensor<2>>,
    pub rank: usize,
    pub alpha: f64,
}

impl LoraAdapters {
    /// Adapters of rank `rank` on every `targets` linear of every block of `model` (targets the
    /// family lacks, such as `gate` in a two-matrix MLP, are skipped), on `device` (an autodiff
    /// device). `A` ~ U(−1/√in, 1/√in) drawn from `seed`, `B` = 0.
    pub fn new(model: &mut dyn CausalLm, targets: &[LoraTarget], rank: usize, alpha: f64, seed: u64, device: &Device) -> Result<Self> {
        if rank == 0 {
            bail!("--rank must be at least 1");
        }
        if !(alpha > 0.0 && alpha.is_finite()) {
            bail!("--alpha must be positive, got {alpha}");
        }
        let mut targets = targets.to_vec();
        targets.sort();
        targets.dedup();
        let (mut sites, mut base, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for layer in 0..model.num_layers() {
            for &target in &targets {
                let Some(linear) = target.linear(model, layer) else { continue };
                let [inputs, outputs] = linear.weight.dims();
                if rank > inputs.min(outputs) {
                    bail!("--rank {rank} is larger than the {target} linear of block {layer} ({inputs} x {outputs})");
                }
                let index = sites.len() as u64;
                let mut rng = stream(seed, Purpose::LoraInit, index);
                let bound = 1.0 / (inputs as f64).sqrt();
                let values: Vec<f32> = (0..inputs * rank).map(|_| rng.symmetric(bound) as f32).collect();
                a.push(Param::from_tensor(Tensor::from_data(TensorData::new(values, [inputs, rank]), device)));
                b.push(Param::from_tensor(Tensor::zeros([rank, outputs], device)));
                base.push(linear.weight.clone());
                sites.push(AdapterSite { layer, target });
            }
        }
        if sites.is_empty() {
            bail!("--targets: none of {targets:?} is a linear of this model");
        }
        Ok(Self { factors: LoraFactors { a, b }, sites, base, rank, alpha })
    }

    /// s = α/r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// `W + s·A·B` of adapter `i`: an autodiff tensor while the factors are.
    pub fn adapted_weight(&self, i: usize) -> Tensor<2> {
        let delta = self.factors.a[i].val().matmul(self.factors.b[i].val()).mul_scalar(self.scale());
        self.base[i].clone() + delta
    }

    /// Installs `W + s·A·B` into every adapted linear of `model`, so that a forward pass is
    /// differentiable in the factors.
    pub fn install(&self, model: &mut dyn CausalLm) {
        for (i, site) in self.sites.iter().enumerate() {
            let linear = site.target.linear(model, site.layer).expect("adapted linears exist");
            linear.weight = self.adapted_weight(i);
        }
    }

    /// Writes `W + s·A·B` into every adapted linear as a plain tensor: the model no longer
    /// depends on the factors and runs as fast as before.
    pub fn merge(&self, model: &mut dyn CausalLm) {
        for (i, site) in self.sites.iter().enumerate() {
            let linear = site.target.linear(model, site.layer).expect("adapted linears exist");
            linear.weight = self.adapted_weight(i).inner();
        }
    }

    /// Puts the frozen weights back.
    pub fn restore(&self, model: &mut dyn CausalLm) {
        for (i, site) in self.sites.iter().enumerate() {
            site.target.linear(model, site.layer).expect("adapted linears exist").weight = self.base[i].clone();
        }
    }

    /// Trainable values: Σ r·(in + out).
    pub fn num_params(&self) -> usize {
        self.factors
            .a
            .iter()
            .zip(&self.factors.b)
            .map(|(a, b)| a.val().dims().iter().product::<usize>() + b.val().dims().iter().product::<usize>())
            .sum()
    }
}
