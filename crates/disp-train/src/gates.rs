//! Gumbel-sigmoid gates, their straight-through hard version and the differentiable parameter
//! count the regulariser sees.

use burn::tensor::activation::sigmoid;
use burn::tensor::{Tensor, TensorData};
use disp_core::params::BlockShape;
use disp_core::selection::BlockGates;

use crate::rng::SplitMix64;

/// The gates of one step, per site `[layers, width_s]`.
pub struct SampledGates {
    /// sigmoid((logit + offset + noise) / τ): multiplies the model's positions.
    pub soft: [Tensor<2>; 5],
    /// Straight-through hard gates: 0/1 forward, the soft gates' gradient backward.
    pub straight_through: [Tensor<2>; 5],
    /// The hard 0/1 gates without a graph (for counting).
    pub hard: [Tensor<2>; 5],
    /// Whether every gate logit was finite. Checked on the host: GPU kernels may clamp a NaN
    /// away (WGSL's min/max return the other operand), so a poisoned generator need not show in
    /// the loss there.
    pub logits_finite: bool,
}

/// Logistic noise log(u) − log(1 − u) with the shape of every site, drawn from `rng`.
pub fn logistic_noise(rng: &mut SplitMix64, layers: usize, widths: [usize; 5]) -> [Vec<f32>; 5] {
    widths.map(|w| (0..layers * w).map(|_| rng.logistic() as f32).collect())
}

/// Samples the gates of one step from the hypernetwork `logits`.
pub fn sample(logits: [Tensor<2>; 5], noise: [Vec<f32>; 5], offset: f64, temperature: f64) -> SampledGates {
    let mut soft = Vec::with_capacity(5);
    let mut st = Vec::with_capacity(5);
    let mut hard = Vec::with_capacity(5);
    let mut logits_finite = true;
    for (logit, noise) in logits.into_iter().zip(noise) {
        let values = logit.clone().inner().into_data().convert::<f32>();
        logits_finite &= values.iter::<f32>().all(f32::is_finite);
        let shape = logit.shape();
        let noise = Tensor::<2>::from_data(TensorData::new(noise, shape), &logit.device());
        let s = sigmoid((logit + noise).add_scalar(offset).div_scalar(temperature));
        let h = s.clone().detach().greater_elem(0.5).float();
        st.push(h.clone() - s.clone().detach() + s.clone());
        hard.push(h);
        soft.push(s);
    }
    let arr = |v: Vec<Tensor<2>>| -> [Tensor<2>; 5] { v.try_into().unwrap_or_else(|_| unreachable!()) };
    SampledGates { soft: arr(soft), straight_through: arr(st), hard: arr(hard), logits_finite }
}

/// The model's per-block gates from per-site `[layers, width]` tensors.
pub fn block_gates(per_site: &[Tensor<2>; 5]) -> Vec<BlockGates> {
    let layers = per_site[0].dims()[0];
    (0..layers)
        .map(|l| {
            BlockGates::new(std::array::from_fn(|s| {
                let width = per_site[s].dims()[1];
                per_site[s].clone().narrow(0, l, 1).reshape([width])
            }))
        })
        .collect()
}

/// Σ over layers of the block's linear parameter count at the gate sums, `[1]`. All blocks have
/// `block`'s shape, so the count is evaluated on the `[layers]` vectors of sums at once.
pub fn parameter_count(block: &BlockShape, gates: &[Tensor<2>; 5]) -> Tensor<1> {
    let layers = gates[0].dims()[0];
    let widths = std::array::from_fn(|s| gates[s].clone().sum_dim(1).reshape([layers]));
    block.linear_params_tensor(widths).sum()
}
