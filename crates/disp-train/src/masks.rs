//! From the trained hypernetwork to index sets: deterministic scores, the raw threshold and the
//! one global threshold shift that lands the exact parameter count on the target ratio.

use disp_core::params::{BlockWidths, ModelShape, RatioOf};
use disp_core::plan::LayerIndices;
use disp_core::selection::Site;

/// Deterministic per-position scores (hypernetwork logit + offset, no noise), layer-major:
/// `scores[layer][site]` has the site's width. A position is kept when its score exceeds the
/// threshold (0 before calibration).
pub type GateScores = Vec<[Vec<f32>; 5]>;

/// The index sets that keep every position scoring strictly above `threshold`. A set that would
/// be empty keeps its top-scoring position instead (the first one on ties).
pub fn final_indices(scores: &GateScores, threshold: f32) -> Vec<LayerIndices> {
    scores.iter().map(|layer| LayerIndices::from_sites(|site| kept_positions(&layer[site.index()], threshold))).collect()
}

fn kept_positions(scores: &[f32], threshold: f32) -> Vec<u32> {
    let kept: Vec<u32> = (0..scores.len() as u32).filter(|&i| scores[i as usize] > threshold).collect();
    if !kept.is_empty() || scores.is_empty() {
        return kept;
    }
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    vec![best as u32]
}

/// Kept counts per block at `threshold` (what [`final_indices`] keeps, without building sets).
fn widths_at(scores: &GateScores, threshold: f32) -> Vec<BlockWidths> {
    scores
        .iter()
        .map(|layer| {
            let [s1, s2, s3, s4, s5] = Site::ALL.map(|site| {
                let n = layer[site.index()].iter().filter(|&&s| s > threshold).count();
                n.max(1)
            });
            BlockWidths { attn_in: s1, attn_out: s2, mlp_in: s3, mlp_inter: s4, mlp_out: s5 }
        })
        .collect()
}

/// The outcome of [`calibrate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// Keep positions scoring strictly above this (−∞ keeps everything).
    pub threshold: f32,
    pub layers: Vec<LayerIndices>,
    /// Removed fraction (of `ratio_of`) with the calibrated threshold.
    pub ratio: f64,
    /// Removed fraction at the raw threshold 0.
    pub raw_ratio: f64,
    /// Exact total parameters with the calibrated sets.
    pub total_params: u64,
}

/// Bisects over the distinct scores for the single global threshold whose exact parameter count
/// (`ModelShape::total_params`) removes the fraction closest to `target_ratio`. The removed
/// fraction grows monotonically with the threshold, so the bisection finds the first threshold
/// reaching the target and compares it with the one just below.
pub fn calibrate(scores: &GateScores, shape: &ModelShape, target_ratio: f64, ratio_of: RatioOf) -> Calibration {
    let ratio_at = |t: f32| shape.removed_ratio(&widths_at(scores, t), ratio_of);
    let mut distinct: Vec<f32> = scores.iter().flat_map(|l| l.iter().flatten().copied()).filter(|s| s.is_finite()).collect();
    distinct.sort_by(f32::total_cmp);
    distinct.dedup();
    // Candidate k keeps scores > threshold(k): k = 0 keeps everything, k = i + 1 cuts at distinct[i].
    let threshold = |k: usize| if k == 0 { f32::NEG_INFINITY } else { distinct[k - 1] };
    let (mut lo, mut hi) = (0usize, distinct.len());
    if ratio_at(threshold(hi)) < target_ratio {
        lo = hi; // even the tightest cut removes too little: take it
    } else {
        // Invariant: ratio(threshold(hi)) >= target; find the smallest such k.
        while lo < hi {
            let mid = (lo + hi) / 2;
            if ratio_at(threshold(mid)) >= target_ratio {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
    }
    let mut best = lo;
    if lo > 0 && (ratio_at(threshold(lo - 1)) - target_ratio).abs() <= (ratio_at(threshold(lo)) - target_ratio).abs() {
        best = lo - 1;
    }
    let t = threshold(best);
    let layers = final_indices(scores, t);
    let widths: Vec<BlockWidths> = layers.iter().map(BlockWidths::of).collect();
    Calibration {
        threshold: t,
        ratio: shape.removed_ratio(&widths, ratio_of),
        raw_ratio: ratio_at(0.0),
        total_params: shape.total_params(&widths),
        layers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disp_core::params::{BlockShape, MlpKind};

    fn shape(layers: usize) -> ModelShape {
        let block = BlockShape {
            hidden: 8,
            intermediate: 16,
            q_dim: 8,
            kv_dim: 4,
            mlp: MlpKind::Gated,
            qkv_bias: false,
            out_bias: false,
            mlp_in_bias: false,
            mlp_out_bias: false,
        };
        ModelShape { blocks: vec![block; layers], other_params: 100 }
    }

    fn scores(layers: usize, seed: u64) -> GateScores {
        let mut rng = crate::rng::SplitMix64::new(seed);
        (0..layers).map(|_| std::array::from_fn(|s| (0..if s == 3 { 16 } else { 8 }).map(|_| rng.symmetric(2.0) as f32).collect())).collect()
    }

    #[test]
    fn never_empty_and_keeps_the_top_position() {
        let mut s = scores(1, 1);
        s[0][1] = vec![-3.0, -1.0, -2.0, -1.0, -5.0, -4.0, -6.0, -7.0];
        let layers = final_indices(&s, 0.0);
        assert_eq!(layers[0].attn_out, vec![1]);
        let all = final_indices(&s, f32::INFINITY);
        for site in Site::ALL {
            assert_eq!(all[0].get(site).len(), 1, "{site:?}");
        }
    }

    #[test]
    fn calibration_is_the_closest_achievable_ratio() {
        let shape = shape(3);
        let s = scores(3, 2);
        for target in [0.05, 0.2, 0.35, 0.5] {
            let c = calibrate(&s, &shape, target, RatioOf::Total);
            // Brute force over every distinct threshold.
            let mut all: Vec<f32> = s.iter().flat_map(|l| l.iter().flatten().copied()).collect();
            all.push(f32::NEG_INFINITY);
            let best = all.iter().map(|&t| (shape.removed_ratio(&widths_at(&s, t), RatioOf::Total) - target).abs()).fold(f64::INFINITY, f64::min);
            assert!(((c.ratio - target).abs() - best).abs() < 1e-12, "target {target}: got {} best err {best}", c.ratio);
            let widths: Vec<BlockWidths> = c.layers.iter().map(BlockWidths::of).collect();
            assert_eq!(shape.total_params(&widths), c.total_params);
        }
    }
}
