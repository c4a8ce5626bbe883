//! Wanda-style baselines: weight magnitude times input activation norm (Sun et al., "A Simple
//! and Effective Pruning Approach for Large Language Models"), scored on calibration windows.
//!
//! * `uniform-wanda` (structured): per-position scores of every block's five sets, then the same
//!   uniform-width rule as `uniform-magnitude` (one embedding subset shared by all blocks, one
//!   MLP width), so it is directly comparable at the same parameter count. This is the
//!   DISP-LLM paper's "regular structural pruning" with Wanda scores, not the Wanda-sp of FLAP
//!   and the papers citing it, which removes heads and MLP channels.
//!   - S1 position j: ‖X1_j‖ · Σ over q, k, v of Σ_o |W_jo| (X1: the attention input);
//!   - S3 position j: ‖X3_j‖ · Σ over gate, up (or fc1) of Σ_o |W_jo| (X3: the MLP input);
//!   - S4 channel j: ‖h_j‖ · Σ_k |W_down,jk| (h: the intermediate entering down_proj / fc2);
//!   - S2 / S5 position j: ‖y_j‖, the norm of what the attention / MLP adds to residual
//!     position j.
//! * `wanda-sp-mlp` (structured, as in FLAP's Wanda-sp, restricted to MLP channels since disp
//!   keeps heads): per-block S4 scores as above, the same channel count in every block, every
//!   other set whole.
//! * `wanda-2:4` (semi-structured): in every block linear, each output unit keeps the 2 of every
//!   4 consecutive input weights with the largest |W_ij|·‖X_j‖; half of the block linear weights
//!   become zero and no shape changes, so it is not a [`PruningPlan`].

use crate::uniform::uniform_width_layers;
use anyhow::{bail, Result};
use burn::tensor::{Tensor, TensorData};
use disp_core::activation_stats::BlockActivationNorms;
use disp_core::params::{BlockWidths, ModelShape, RatioOf};
use disp_core::plan::{LayerIndices, PruningPlan};
use disp_models::layers::Linear;
use disp_models::CausalLm;
use serde::Serialize;

/// A linear layer's weight on the host, `[in, out]` row-major as [`Linear`] stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostWeight {
    pub values: Vec<f32>,
    pub inputs: usize,
    pub outputs: usize,
}

impl HostWeight {
    pub fn of(linear: &Linear) -> Self {
        let [inputs, outputs] = linear.weight.dims();
        let values = linear.weight.clone().into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 weights");
        Self { values, inputs, outputs }
    }

    /// Σ_o |W_io| for every input row i.
    fn row_abs_sums(&self) -> Vec<f64> {
        self.values.chunks_exact(self.outputs).map(|row| row.iter().map(|w| w.abs() as f64).sum()).collect()
    }
}

/// Σ over `weights` of each input row's absolute sum, times the input norm of that row.
fn activation_weighted_rows(weights: &[HostWeight], input_norms: &[f32]) -> Vec<f32> {
    let mut total = vec![0f64; input_norms.len()];
    for w in weights {
        assert_eq!(w.inputs, input_norms.len(), "weight rows must match the activation width");
        for (t, s) in total.iter_mut().zip(w.row_abs_sums()) {
            *t += s;
        }
    }
    total.iter().zip(input_norms).map(|(&t, &n)| (t * n as f64) as f32).collect()
}

/// The `uniform-wanda` scores of one block, per site S1..S5 (see the module documentation).
/// `attn_inputs` are q, k, v; `mlp_inputs` gate and up (or fc1); `mlp_output` down (or fc2).
pub fn wanda_sp_scores(
    attn_inputs: &[HostWeight],
    mlp_inputs: &[HostWeight],
    mlp_output: &HostWeight,
    norms: &BlockActivationNorms,
) -> [Vec<f32>; 5] {
    [
        activation_weighted_rows(attn_inputs, &norms.attn_in),
        norms.attn_out.clone(),
        activation_weighted_rows(mlp_inputs, &norms.mlp_in),
        activation_weighted_rows(std::slice::from_ref(mlp_output), &norms.mlp_inter),
        norms.mlp_out.clone(),
    ]
}

/// The `uniform-wanda` plan: activation-aware scores on `windows`, then the uniform-width selection
/// of `uniform-magnitude` at the exact parameter count of `target_ratio`.
pub fn wanda_sp_plan(model: &dyn CausalLm, windows: &[Vec<u32>], target_ratio: f64, ratio_of: RatioOf) -> Result<PruningPlan> {
    let shape = model.model_shape();
    let kept = shape.kept_block_fraction(target_ratio, ratio_of)?;
    let target_params = (kept * shape.dense_block_params() as f64).round() as u64;
    let norms = crate::activation_stats::collect(model, windows)?;
    let scores: Vec<[Vec<f32>; 5]> = norms
        .iter()
        .enumerate()
        .map(|(layer, block_norms)| {
            let b = model.block_linears(layer);
            let host = |ls: &[&Linear]| ls.iter().map(|l| HostWeight::of(l)).collect::<Vec<_>>();
            wanda_sp_scores(&host(&b.attn_inputs), &host(&b.mlp_inputs), &HostWeight::of(b.mlp_output), block_norms)
        })
        .collect();
    let layers = uniform_width_layers(&shape, &scores, target_params);
    Ok(PruningPlan::from_layers(
        model.identity(),
        &shape,
        "uniform-wanda",
        ratio_of,
        target_ratio,
        layers,
        serde_json::json!({
            "score": "S1/S3: input activation norm x summed |W| of the reading rows; S4: intermediate norm x summed |W| of the down row; S2/S5: norm of the block output",
            "selection": "uniform width: one embedding subset shared by all blocks, one MLP width",
            "windows": windows.len(),
            "seq_len": windows[0].len(),
            "tokens": norms[0].tokens,
        }),
    ))
}

/// The MLP width (same in every block) whose exact block parameter count, with every other set
/// at full width, is closest to `target_params`; `None` when even one channel per block keeps
/// more than that (the ratio cannot be reached by MLP channels alone).
pub fn mlp_only_width(shape: &ModelShape, target_params: u64) -> Option<usize> {
    let first = shape.blocks[0];
    let widths_at = |m: usize| vec![BlockWidths { mlp_inter: m, ..first.full_widths() }; shape.blocks.len()];
    if shape.block_params(&widths_at(1)) > target_params {
        return None;
    }
    // Parameters grow with m: the largest m at or under the target, or the next one if closer.
    let (mut low, mut high) = (1usize, first.intermediate);
    while low < high {
        let mid = (low + high).div_ceil(2);
        if shape.block_params(&widths_at(mid)) <= target_params {
            low = mid;
        } else {
            high = mid - 1;
        }
    }
    let distance = |m: usize| shape.block_params(&widths_at(m)).abs_diff(target_params);
    Some(if low < first.intermediate && distance(low + 1) < distance(low) { low + 1 } else { low })
}

/// `wanda-sp-mlp`: the literature's structured Wanda (Wanda-sp as FLAP, An et al. 2024, runs
/// it) restricted to what disp prunes of it: MLP channels, the same count in every block
/// (uniform sparsity), each block keeping its own channels with the largest
/// ‖h_j‖·Σ_k |W_down,jk|; attention heads and the residual width stay whole. At the exact
/// parameter count of `target_ratio`.
pub fn wanda_sp_mlp_plan(model: &dyn CausalLm, windows: &[Vec<u32>], target_ratio: f64, ratio_of: RatioOf) -> Result<PruningPlan> {
    let shape = model.model_shape();
    if shape.blocks.iter().any(|b| *b != shape.blocks[0]) {
        bail!("wanda-sp-mlp needs identical blocks");
    }
    let kept = shape.kept_block_fraction(target_ratio, ratio_of)?;
    let target_params = (kept * shape.dense_block_params() as f64).round() as u64;
    let Some(width) = mlp_only_width(&shape, target_params) else {
        bail!("ratio {target_ratio} cannot be reached by removing MLP channels alone (attention and one channel per block already keep more)");
    };
    let norms = crate::activation_stats::collect(model, windows)?;
    let first = shape.blocks[0];
    let layers = norms
        .iter()
        .enumerate()
        .map(|(layer, block_norms)| {
            let down = HostWeight::of(model.block_linears(layer).mlp_output);
            let scores = activation_weighted_rows(std::slice::from_ref(&down), &block_norms.mlp_inter);
            let mut indices = LayerIndices::full(first.hidden, first.intermediate);
            indices.mlp_inter = crate::uniform::top_k_sorted(&scores, width);
            indices
        })
        .collect();
    Ok(PruningPlan::from_layers(
        model.identity(),
        &shape,
        "wanda-sp-mlp",
        ratio_of,
        target_ratio,
        layers,
        serde_json::json!({
            "score": "S4: intermediate activation norm x summed |W| of the down row (structured Wanda, per block)",
            "selection": "MLP channels only, the same count in every block; attention, S1, S2, S3, S5 whole",
            "mlp_width": width,
            "windows": windows.len(),
            "seq_len": windows[0].len(),
            "tokens": norms[0].tokens,
        }),
    ))
}

/// The 2:4 keep mask of a weight `[rows_in, cols_out]` (row-major, as [`Linear`] stores it):
/// for each output column and each group of 4 consecutive input rows, the 2 entries with the
/// largest |W_ij|·‖X_i‖ are kept (`true`); ties go to the lower row index.
///
/// When `rows_in` is not a multiple of 4, the last group has r < 4 rows and keeps its
/// min(r, 2) best: the rule a 2:4 kernel applies after zero-padding the group to 4, whose
/// padding entries count as the zeros. Such a group keeps more than half.
pub fn two_of_four_mask(weight: &[f32], rows_in: usize, cols_out: usize, input_norms: &[f32]) -> Vec<bool> {
    assert_eq!(weight.len(), rows_in * cols_out, "weight is not [rows_in, cols_out]");
    assert_eq!(input_norms.len(), rows_in, "one input norm per row");
    let mut keep = vec![false; weight.len()];
    for group_start in (0..rows_in).step_by(4) {
        let rows = group_start..(group_start + 4).min(rows_in);
        let kept_per_group = rows.len().min(2);
        for col in 0..cols_out {
            let score = |row: usize| weight[row * cols_out + col].abs() * input_norms[row];
            let mut order: Vec<usize> = rows.clone().collect();
            // Highest score first; equal scores keep their (ascending) row order.
            order.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
            for &row in &order[..kept_per_group] {
                keep[row * cols_out + col] = true;
            }
        }
    }
    keep
}

/// What [`apply_wanda_2_4`] did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SparsityReport {
    /// Block linear weights set to zero (biases are never touched).
    pub zeroed: u64,
    /// All block linear weights.
    pub total: u64,
    /// `zeroed / total`: 0.5 when every input width is a multiple of 4.
    pub fraction: f64,
    /// Tokens the activation norms were computed on.
    pub calibration_tokens: u64,
}

/// Zeroes the weights [`two_of_four_mask`] drops; returns how many it zeroed.
fn sparsify(linear: &mut Linear, input_norms: &[f32]) -> u64 {
    let host = HostWeight::of(linear);
    let keep = two_of_four_mask(&host.values, host.inputs, host.outputs, input_norms);
    let mut zeroed = 0;
    let values: Vec<f32> = host
        .values
        .iter()
        .zip(&keep)
        .map(|(&w, &k)| {
            if k {
                w
            } else {
                zeroed += 1;
                0.0
            }
        })
        .collect();
    let (device, dtype) = (linear.weight.device(), linear.weight.dtype());
    // Back at the precision the weight was held in (the zeros are exact in any).
    linear.weight = Tensor::<2>::from_data(TensorData::new(values, [host.inputs, host.outputs]), &device).cast(dtype);
    zeroed
}

/// `wanda-2:4`: semi-structured 2:4 sparsity of every block linear of the dense `model`, in
/// place. Each linear is scored with the norms of its own input: the attention input for q, k,
/// v; the attention context for the attention output projection; the MLP input for gate/up
/// (fc1); the intermediate for down (fc2).
pub fn apply_wanda_2_4(model: &mut dyn CausalLm, windows: &[Vec<u32>]) -> Result<SparsityReport> {
    if model.is_pruned() {
        bail!("wanda-2:4 needs the dense model, not a pruned one");
    }
    let norms = crate::activation_stats::collect(model, windows)?;
    let (mut zeroed, mut total) = (0u64, 0u64);
    for (layer, n) in norms.iter().enumerate() {
        let b = model.block_linears_mut(layer);
        let mut targets: Vec<(&mut Linear, &[f32])> = Vec::new();
        targets.extend(b.attn_inputs.into_iter().map(|l| (l, n.attn_in.as_slice())));
        targets.push((b.attn_output, &n.attn_context));
        targets.extend(b.mlp_inputs.into_iter().map(|l| (l, n.mlp_in.as_slice())));
        targets.push((b.mlp_output, &n.mlp_inter));
        for (linear, input_norms) in targets {
            total += (linear.inputs() * linear.outputs()) as u64;
            zeroed += sparsify(linear, input_norms);
        }
    }
    let report = SparsityReport { zeroed, total, fraction: zeroed as f64 / total as f64, calibration_tokens: norms[0].tokens };
    tracing::info!(zeroed, total, fraction = report.fraction, "wanda-2:4 applied");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norms(attn_in: Vec<f32>, mlp_in: Vec<f32>, mlp_inter: Vec<f32>) -> BlockActivationNorms {
        BlockActivationNorms { tokens: 10, attn_in, mlp_in, mlp_inter, attn_context: vec![], attn_out: vec![7.0, 8.0], mlp_out: vec![9.0, 0.5] }
    }

    #[test]
    fn wanda_sp_scores_weight_rows_by_input_norms() {
        // Hidden 2, intermediate 3. Weights are [in, out] row-major.
        let q = HostWeight { values: vec![1.0, -2.0, 0.5, 0.0], inputs: 2, outputs: 2 }; // rows: 3, 0.5
        let k = HostWeight { values: vec![-1.0, 3.0], inputs: 2, outputs: 1 }; // rows: 1, 3
        let up = HostWeight { values: vec![1.0, 1.0, -1.0, 0.0, 2.0, 0.0], inputs: 2, outputs: 3 }; // rows: 3, 2
        let down = HostWeight { values: vec![1.0, -1.0, 0.0, 4.0, -2.0, 0.5], inputs: 3, outputs: 2 }; // rows: 2, 4, 2.5
        let n = norms(vec![2.0, 10.0], vec![1.0, 3.0], vec![1.0, 0.5, 4.0]);
        let [s1, s2, s3, s4, s5] = wanda_sp_scores(&[q, k], &[up], &down, &n);
        assert_eq!(s1, vec![(3.0 + 1.0) * 2.0, (0.5 + 3.0) * 10.0]);
        assert_eq!(s2, vec![7.0, 8.0]);
        assert_eq!(s3, vec![3.0 * 1.0, 2.0 * 3.0]);
        assert_eq!(s4, vec![2.0 * 1.0, 4.0 * 0.5, 2.5 * 4.0]);
        assert_eq!(s5, vec![9.0, 0.5]);
        // The activation norm can overturn the weight ranking: row 1 of q/k has the smaller
        // weights but the larger input.
        assert!(s1[1] > s1[0]);
    }

    #[test]
    fn two_of_four_keeps_the_two_largest_scores_of_every_group() {
        // 8 input rows, 2 output columns; column 1 is column 0 reversed within each group.
        let col0 = [0.1f32, -5.0, 2.0, 3.0, 1.0, 1.0, 1.0, 1.0];
        let col1 = [3.0f32, 2.0, -5.0, 0.1, 0.0, 0.0, 0.0, 0.0];
        let weight: Vec<f32> = (0..8).flat_map(|i| [col0[i], col1[i]]).collect();
        let ones = vec![1.0f32; 8];
        let keep = two_of_four_mask(&weight, 8, 2, &ones);
        let column = |c: usize| (0..8).map(|i| keep[i * 2 + c]).collect::<Vec<bool>>();
        assert_eq!(column(0), vec![false, true, false, true, true, true, false, false], "|-5|, 3; ties keep rows 4, 5");
        assert_eq!(column(1), vec![true, false, true, false, true, true, false, false]);
        for c in 0..2 {
            for g in 0..2 {
                assert_eq!(column(c)[4 * g..4 * g + 4].iter().filter(|&&k| k).count(), 2);
            }
        }
        // Input norms weigh in: a large activation on row 0 lets its small weight win.
        let mut norms = ones.clone();
        norms[0] = 100.0;
        let keep = two_of_four_mask(&weight, 8, 2, &norms);
        // Column 0, group 0 now scores 10, 5, 2, 3: rows 0 and 1 (entry i·2 is row i).
        assert!(keep[0] && keep[2] && !keep[4] && !keep[6], "{keep:?}");
    }

    #[test]
    fn a_partial_last_group_keeps_at_most_two() {
        // 7 rows: one full group and a group of 3, one column.
        let weight = [1.0f32, 2.0, 3.0, 4.0, 9.0, 8.0, 7.0];
        let keep = two_of_four_mask(&weight, 7, 1, &[1.0; 7]);
        assert_eq!(keep, vec![false, false, true, true, true, true, false]);
        // 5 rows: the last group has 1 row and keeps it; 6 rows: 2 rows, both kept.
        assert!(two_of_four_mask(&weight[..5], 5, 1, &[1.0; 5])[4]);
        assert!(two_of_four_mask(&weight[..6], 6, 1, &[1.0; 6])[4..].iter().all(|&k| k));
    }
}
