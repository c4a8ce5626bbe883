//! Per-channel activation norms over calibration windows, for the calibration-aware baselines
//! (`uniform-wanda`, `wanda-2:4`). The model runs in masked mode with recording all-ones gates
//! (`BlockGates::recording`), which computes exactly the dense function; see
//! `disp_core::activations` for what is recorded where.

use anyhow::{bail, Result};
use burn::tensor::{Int, Tensor, TensorData};
use disp_core::activation_stats::BlockActivationNorms;
use disp_core::selection::BlockGates;
use disp_models::CausalLm;

/// ‖X_j‖ over every token of `windows` for each block's six observed activations (see
/// [`BlockActivationNorms`]). The windows are run one at a time and must share one length.
pub fn collect(model: &dyn CausalLm, windows: &[Vec<u32>]) -> Result<Vec<BlockActivationNorms>> {
    collect_with_progress(model, windows, |_| {})
}

/// [`collect`], calling `on_window(done)` after each window.
pub fn collect_with_progress(model: &dyn CausalLm, windows: &[Vec<u32>], mut on_window: impl FnMut(usize)) -> Result<Vec<BlockActivationNorms>> {
    if model.is_pruned() {
        bail!("activation statistics need the dense model, not a pruned one");
    }
    crate::search::check_windows(windows, model)?;
    let device = model.device();
    let gates: Vec<BlockGates> =
        model.model_shape().blocks.iter().map(|block| BlockGates::recording(block.hidden, block.intermediate, device)).collect();
    for (done, window) in windows.iter().enumerate() {
        let ids: Vec<i64> = window.iter().map(|&t| t as i64).collect();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, window.len()]), device);
        // Only the recorders' side effect is wanted; the logits are dropped.
        drop(model.forward(tokens, Some(&gates), None));
        on_window(done + 1);
    }
    Ok(gates.iter().map(|g| g.recorder().expect("recording gates").norms()).collect())
}
