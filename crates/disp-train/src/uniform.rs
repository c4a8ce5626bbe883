//! The `uniform-magnitude` baseline: regular structural pruning at the same parameter count,
//! the comparison the paper makes. Every block reads and writes the SAME subset of embedding
//! dimensions (S1 = S2 = S3 = S5 = E for all layers, as SliceGPT-style slicing does) and keeps
//! the same MLP width, ranked by weight magnitude. No calibration data and no training. The
//! uniform-width rule is shared with `uniform-wanda`, which ranks by activation-weighted scores.

use anyhow::Result;
use burn::tensor::{DType, Tensor};
use disp_core::params::{BlockWidths, ModelShape, RatioOf};
use disp_core::plan::{LayerIndices, PruningPlan};
use disp_core::selection::Site;
use disp_models::layers::Linear;
use disp_models::CausalLm;

pub fn uniform_magnitude_plan(model: &dyn CausalLm, target_ratio: f64, ratio_of: RatioOf) -> Result<PruningPlan> {
    let shape = model.model_shape();
    let kept = shape.kept_block_fraction(target_ratio, ratio_of)?;
    let target_params = (kept * shape.dense_block_params() as f64).round() as u64;
    let scores = weight_magnitudes(model);
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

/// Per layer and site, the L2 norm of all weights attached to each position: the "magnitude"
/// importance used by the uniform-width baseline.
pub fn weight_magnitudes(model: &dyn CausalLm) -> Vec<[Vec<f32>; 5]> {
    fn rows(l: &Linear) -> Tensor<1> {
        // Weights may be stored below f32; square and sum in f32.
        l.weight_as(DType::F32).powi_scalar(2).sum_dim(1).squeeze_dim::<1>(1)
    }
    fn cols(l: &Linear) -> Tensor<1> {
        l.weight_as(DType::F32).powi_scalar(2).sum_dim(0).squeeze_dim::<1>(0)
    }
    fn total(parts: Vec<Tensor<1>>) -> Vec<f32> {
        let sum = parts.into_iter().reduce(|a, b| a + b).expect("at least one layer");
        sum.sqrt().into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data")
    }
    (0..model.num_layers())
        .map(|layer| {
            let b = model.block_linears(layer);
            [
                total(b.attn_inputs.iter().map(|l| rows(l)).collect()),
                total(vec![cols(b.attn_output)]),
                total(b.mlp_inputs.iter().map(|l| rows(l)).collect()),
                total(b.mlp_inputs.iter().map(|l| cols(l)).chain([rows(b.mlp_output)]).collect()),
                total(vec![cols(b.mlp_output)]),
            ]
        })
        .collect()
}

/// The `count` highest-scoring positions, returned sorted by position. Ties keep the lower index.
pub fn top_k_sorted(scores: &[f32], count: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    order.sort_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]).then(a.cmp(&b)));
    let mut kept = order[..count.clamp(1, scores.len())].to_vec();
    kept.sort_unstable();
    kept
}

/// Index sets of uniform width whose block parameter count is the closest to `target_params`.
///
/// `scores[layer][site]` rates each position of that site (e.g. weight magnitudes). The shared
/// embedding subset is ranked by the sum of the layer's S1, S2, S3 and S5 scores over all
/// layers; S4 is ranked per layer. Embedding and MLP widths shrink by one common fraction.
pub fn uniform_width_layers(shape: &ModelShape, scores: &[[Vec<f32>; 5]], target_params: u64) -> Vec<LayerIndices> {
    let first = shape.blocks[0];
    assert!(shape.blocks.iter().all(|b| *b == first), "uniform pruning needs identical blocks");
    let widths_at = |fraction: f64| {
        let e = ((fraction * first.hidden as f64).round() as usize).clamp(1, first.hidden);
        let m = ((fraction * first.intermediate as f64).round() as usize).clamp(1, first.intermediate);
        vec![BlockWidths { attn_in: e, attn_out: e, mlp_in: e, mlp_inter: m, mlp_out: e }; shape.blocks.len()]
    };
    // block_params is monotone in the fraction: bisect, then keep the closer neighbour.
    let (mut low, mut high) = (0.0f64, 1.0f64);
    for _ in 0..60 {
        let mid = 0.5 * (low + high);
        if shape.block_params(&widths_at(mid)) < target_params {
            low = mid;
        } else {
            high = mid;
        }
    }
    let distance = |f: f64| shape.block_params(&widths_at(f)).abs_diff(target_params);
    let widths = if distance(low) <= distance(high) { widths_at(low) } else { widths_at(high) }[0];

    let mut embedding_score = vec![0f32; first.hidden];
    for layer in scores {
        for site in [Site::AttnIn, Site::AttnOut, Site::MlpIn, Site::MlpOut] {
            for (total, s) in embedding_score.iter_mut().zip(&layer[site.index()]) {
                *total += s;
            }
        }
    }
    let embedding = top_k_sorted(&embedding_score, widths.attn_in);
    scores
        .iter()
        .map(|layer| {
            let inter = top_k_sorted(&layer[Site::MlpInter.index()], widths.mlp_inter);
            LayerIndices::from_sites(|site| if site == Site::MlpInter { inter.clone() } else { embedding.clone() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use disp_core::params::{BlockShape, MlpKind};

    #[test]
    fn top_k_keeps_the_largest_in_position_order() {
        assert_eq!(top_k_sorted(&[0.5, 3.0, -1.0, 2.0, 3.0], 3), vec![1, 3, 4]);
        assert_eq!(top_k_sorted(&[1.0, 1.0], 0), vec![0], "never empty");
    }

    #[test]
    fn uniform_layers_share_one_embedding_set_and_hit_the_target() {
        let block = BlockShape {
            hidden: 32,
            intermediate: 64,
            q_dim: 32,
            kv_dim: 16,
            mlp: MlpKind::Gated,
            qkv_bias: false,
            out_bias: false,
            mlp_in_bias: false,
            mlp_out_bias: false,
        };
        let shape = ModelShape { blocks: vec![block; 3], other_params: 0 };
        let scores: Vec<[Vec<f32>; 5]> = (0..3)
            .map(|l| {
                let s = |w: usize| (0..w).map(|i| ((i * 7 + l * 3) % 11) as f32).collect::<Vec<f32>>();
                [s(32), s(32), s(32), s(64), s(32)]
            })
            .collect();
        let target = shape.dense_block_params() / 2;
        let layers = uniform_width_layers(&shape, &scores, target);
        let widths: Vec<_> = layers.iter().map(BlockWidths::of).collect();
        let achieved = shape.block_params(&widths);
        // One step of the embedding width changes the count by ~2.5 %: land within that.
        assert!((achieved as f64 / target as f64 - 1.0).abs() < 0.03, "{achieved} vs {target}");
        for l in &layers {
            assert_eq!(l.attn_in, layers[0].attn_in);
            assert_eq!(l.attn_in, l.mlp_out);
            assert_eq!(l.mlp_inter.len(), layers[0].mlp_inter.len());
        }
    }
}
