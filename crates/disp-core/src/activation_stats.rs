//! Per-channel activation statistics of a block, for the calibration-aware baselines (Wanda).
//!
//! A masked forward pass whose [`BlockGates`](crate::selection::BlockGates) carry an
//! [`ActivationRecorder`] (built by `BlockGates::recording`, all-ones gates) computes the dense
//! function and, at every [`Selector`](crate::selection::Selector) call of the block, adds the
//! per-channel sum over tokens of the squared activation to host `f64` accumulators. The
//! family code needs no knowledge of it beyond one `observe_attention_context` call before the
//! attention output projection. Nothing is recorded in dense or pruned mode.

use std::sync::Mutex;

use burn::tensor::Tensor;

/// Where in a block an activation is observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActivationPoint {
    /// What S1 reads: the (normalised) hidden state entering q/k/v, width d.
    AttnIn,
    /// What S3 reads: the hidden state entering the MLP input projections, width d.
    MlpIn,
    /// The MLP intermediate entering the output projection (what S4 gates), width d_ff.
    MlpInter,
    /// The attention context entering the attention output projection, width q_dim.
    AttnContext,
    /// What the attention adds to the residual (S2), width d.
    AttnOut,
    /// What the MLP adds to the residual (S5), width d.
    MlpOut,
}

impl ActivationPoint {
    pub const ALL: [ActivationPoint; 6] = [
        ActivationPoint::AttnIn,
        ActivationPoint::MlpIn,
        ActivationPoint::MlpInter,
        ActivationPoint::AttnContext,
        ActivationPoint::AttnOut,
        ActivationPoint::MlpOut,
    ];

    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Default)]
struct Sums {
    /// Σ over tokens of x², per point and channel (empty until the point is first seen).
    squared: [Vec<f64>; 6],
    /// Tokens seen per point.
    tokens: [u64; 6],
}

/// Host accumulators of Σ x² per channel for the six [`ActivationPoint`]s of one block.
/// Shared by reference through the gates, so it uses a mutex rather than `&mut`.
#[derive(Debug, Default)]
pub struct ActivationRecorder {
    sums: Mutex<Sums>,
}

impl ActivationRecorder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds Σ over batch and time of `x²` (`x` is `[B, T, C]`) to `point`'s accumulators.
    /// The reduction runs on the device; only the `[C]` sums travel to the host.
    pub fn record(&self, point: ActivationPoint, x: &Tensor<3>) {
        let [batch, seq, channels] = x.dims();
        let per_channel = (x.clone() * x.clone()).reshape([batch * seq, channels]).sum_dim(0).reshape([channels]);
        let values = per_channel.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 sums");
        let mut sums = self.sums.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let acc = &mut sums.squared[point.index()];
        if acc.is_empty() {
            acc.resize(channels, 0.0);
        }
        assert_eq!(acc.len(), channels, "{point:?} changed width between forward passes");
        for (a, v) in acc.iter_mut().zip(values) {
            *a += v as f64;
        }
        sums.tokens[point.index()] += (batch * seq) as u64;
    }

    /// Σ x² per channel recorded so far at `point` (empty if never seen).
    pub fn squared_sums(&self, point: ActivationPoint) -> Vec<f64> {
        self.sums.lock().unwrap_or_else(|p| p.into_inner()).squared[point.index()].clone()
    }

    /// Tokens recorded so far at `point`.
    pub fn tokens(&self, point: ActivationPoint) -> u64 {
        self.sums.lock().unwrap_or_else(|p| p.into_inner()).tokens[point.index()]
    }

    /// The L2 norm over all recorded tokens of every channel, ‖X_j‖ = √(Σ_t x_tj²).
    pub fn norms(&self) -> BlockActivationNorms {
        let sums = self.sums.lock().unwrap_or_else(|p| p.into_inner());
        let norm = |p: ActivationPoint| sums.squared[p.index()].iter().map(|&s| s.sqrt() as f32).collect::<Vec<f32>>();
        BlockActivationNorms {
            tokens: sums.tokens[ActivationPoint::AttnIn.index()],
            attn_in: norm(ActivationPoint::AttnIn),
            mlp_in: norm(ActivationPoint::MlpIn),
            mlp_inter: norm(ActivationPoint::MlpInter),
            attn_context: norm(ActivationPoint::AttnContext),
            attn_out: norm(ActivationPoint::AttnOut),
            mlp_out: norm(ActivationPoint::MlpOut),
        }
    }
}

/// Per-channel L2 norms over the calibration tokens of one block's activations.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockActivationNorms {
    /// Tokens the norms cover.
    pub tokens: u64,
    /// S1 input, width d.
    pub attn_in: Vec<f32>,
    /// S3 input, width d.
    pub mlp_in: Vec<f32>,
    /// S4 intermediate (input of down_proj / fc2), width d_ff.
    pub mlp_inter: Vec<f32>,
    /// Attention context (input of o_proj / out_proj / dense), width q_dim.
    pub attn_context: Vec<f32>,
    /// Attention block output written through S2, width d.
    pub attn_out: Vec<f32>,
    /// MLP block output written through S5, width d.
    pub mlp_out: Vec<f32>,
}

impl BlockActivationNorms {
    pub fn get(&self, point: ActivationPoint) -> &[f32] {
        match point {
            ActivationPoint::AttnIn => &self.attn_in,
            ActivationPoint::MlpIn => &self.mlp_in,
            ActivationPoint::MlpInter => &self.mlp_inter,
            ActivationPoint::AttnContext => &self.attn_context,
            ActivationPoint::AttnOut => &self.attn_out,
            ActivationPoint::MlpOut => &self.mlp_out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn accumulates_squared_sums_over_batch_time_and_calls() {
        let device = Device::flex();
        let recorder = ActivationRecorder::new();
        // [B=2, T=1, C=2]: channel 0 sees 1 and 3, channel 1 sees -2 and 0.
        let x = Tensor::<3>::from_data(TensorData::new(vec![1.0f32, -2.0, 3.0, 0.0], [2, 1, 2]), &device);
        recorder.record(ActivationPoint::MlpOut, &x);
        recorder.record(ActivationPoint::MlpOut, &x);
        assert_eq!(recorder.squared_sums(ActivationPoint::MlpOut), vec![20.0, 8.0]);
        assert_eq!(recorder.tokens(ActivationPoint::MlpOut), 4);
        assert!(recorder.squared_sums(ActivationPoint::AttnIn).is_empty());
        let norms = recorder.norms();
        assert_eq!(norms.mlp_out, vec![20f32.sqrt(), 8f32.sqrt()]);
        assert!(norms.attn_in.is_empty());
    }
}
