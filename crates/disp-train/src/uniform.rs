//! The `uniform-magnitude` baseline: regular structural pruning at the same parameter count,
//! with one embedding subset shared by every block and a uniform MLP width, ranked by weight
//! magnitude. No calibration data and no training.

use anyhow::Result;
use disp_core::baseline::uniform_width_layers;
use disp_core::params::RatioOf;
use disp_core::plan::PruningPlan;
use disp_models::CausalLm;

pub fn uniform_magnitude_plan(model: &dyn CausalLm, target_ratio: f64, ratio_of: RatioOf) -> Result<PruningPlan> {
    let shape = model.model_shape();
    let kept = shape.kept_block_fraction(target_ratio, ratio_of)?;
    let target_params = (kept * shape.dense_block_params() as f64).round() as u64;
    let scores = disp_models::weight_magnitudes(model);
    let layers = uniform_width_layers(&shape, &scores, target_params);
    Ok(PruningPlan::from_layers(
        model.identity(),
        &shape,
        "uniform-magnitude",
        ratio_of,
        target_ratio,
        layers,
        serde_json::json!({ "score": "L2 norm of the weights attached to each position" }),
    ))
}
