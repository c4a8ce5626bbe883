//! Exact parameter accounting as a function of the index sets, the paper's ratio conventions,
//! and the search regulariser λ·|log(P(S) / (p·P_blocks))|.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::plan::LayerIndices;

/// MLP layout of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    /// gate and up projections, then down (LLaMA's SwiGLU): 2·|S3|·|S4| + |S4|·|S5|.
    Gated,
    /// fc1 then fc2 (OPT, Phi): |S3|·|S4| + |S4|·|S5|.
    TwoMatrix,
}

/// The shape of one transformer block, enough to count its prunable parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockShape {
    pub hidden: usize,
    pub intermediate: usize,
    /// Output width of the query projection (heads × head size); never pruned.
    pub q_dim: usize,
    /// Output width of each of the key and value projections (KV heads × head size).
    pub kv_dim: usize,
    pub mlp: MlpKind,
    /// Biases on q, k and v (not cut: their width is the head layout).
    pub qkv_bias: bool,
    /// Bias on the attention output projection (cut to S2).
    pub out_bias: bool,
    /// Biases on the MLP input projections (cut to S4).
    pub mlp_in_bias: bool,
    /// Bias on the MLP output projection (cut to S5).
    pub mlp_out_bias: bool,
}

/// |S1|..|S5| of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockWidths {
    pub attn_in: usize,
    pub attn_out: usize,
    pub mlp_in: usize,
    pub mlp_inter: usize,
    pub mlp_out: usize,
}

impl BlockWidths {
    pub fn of(layer: &LayerIndices) -> Self {
        Self {
            attn_in: layer.attn_in.len(),
            attn_out: layer.attn_out.len(),
            mlp_in: layer.mlp_in.len(),
            mlp_inter: layer.mlp_inter.len(),
            mlp_out: layer.mlp_out.len(),
        }
    }

    pub fn as_array(&self) -> [usize; 5] {
        [self.attn_in, self.attn_out, self.mlp_in, self.mlp_inter, self.mlp_out]
    }
}

impl BlockShape {
    pub fn full_widths(&self) -> BlockWidths {
        BlockWidths { attn_in: self.hidden, attn_out: self.hidden, mlp_in: self.hidden, mlp_inter: self.intermediate, mlp_out: self.hidden }
    }

    /// Width of each site's gate vector.
    pub fn site_widths(&self) -> [usize; 5] {
        self.full_widths().as_array()
    }

    /// Parameters of the block's linear layers (weights and biases) at the given widths.
    pub fn linear_params(&self, w: &BlockWidths) -> u64 {
        let [s1, s2, s3, s4, s5] = w.as_array().map(|x| x as f64);
        self.linear_params_f64(s1, s2, s3, s4, s5) as u64
    }

    /// The same count over real widths; the regulariser evaluates it on gate sums.
    fn linear_params_f64(&self, s1: f64, s2: f64, s3: f64, s4: f64, s5: f64) -> f64 {
        let (q, kv) = (self.q_dim as f64, self.kv_dim as f64);
        let mut attn = s1 * (q + 2.0 * kv) + s2 * q;
        if self.qkv_bias {
            attn += q + 2.0 * kv;
        }
        if self.out_bias {
            attn += s2;
        }
        let in_mats = match self.mlp {
            MlpKind::Gated => 2.0,
            MlpKind::TwoMatrix => 1.0,
        };
        let mut mlp = in_mats * s3 * s4 + s4 * s5;
        if self.mlp_in_bias {
            mlp += in_mats * s4;
        }
        if self.mlp_out_bias {
            mlp += s5;
        }
        attn + mlp
    }

    /// [`Self::linear_params`] on tensors (each of shape `[1]`), differentiable in the widths.
    pub fn linear_params_tensor(&self, widths: [Tensor<1>; 5]) -> Tensor<1> {
        let [s1, s2, s3, s4, s5] = widths;
        let (q, kv) = (self.q_dim as f64, self.kv_dim as f64);
        let in_mats = match self.mlp {
            MlpKind::Gated => 2.0,
            MlpKind::TwoMatrix => 1.0,
        };
        let mut attn = s1.mul_scalar(q + 2.0 * kv) + s2.clone().mul_scalar(q);
        if self.qkv_bias {
            attn = attn.add_scalar(q + 2.0 * kv);
        }
        if self.out_bias {
            attn = attn + s2;
        }
        let mut mlp = s3.mul(s4.clone()).mul_scalar(in_mats) + s4.clone().mul(s5.clone());
        if self.mlp_in_bias {
            mlp = mlp + s4.mul_scalar(in_mats);
        }
        if self.mlp_out_bias {
            mlp = mlp + s5;
        }
        attn + mlp
    }
}

/// Which parameter count a pruning ratio refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RatioOf {
    /// Fraction of all parameters (embeddings and head included): the paper's convention.
    #[default]
    Total,
    /// Fraction of the prunable block linear parameters only.
    Blocks,
}

/// The prunable structure of a whole model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    pub blocks: Vec<BlockShape>,
    /// Everything outside the block linears: embeddings, positional embeddings, head, norms.
    pub other_params: u64,
}

impl RatioOf {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Total => "total",
            Self::Blocks => "blocks",
        }
    }
}

impl std::str::FromStr for RatioOf {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "total" => Ok(Self::Total),
            "blocks" => Ok(Self::Blocks),
            other => Err(format!("unknown ratio base '{other}' (expected total or blocks)")),
        }
    }
}

impl ModelShape {
    pub fn dense_block_params(&self) -> u64 {
        self.blocks.iter().map(|b| b.linear_params(&b.full_widths())).sum()
    }

    pub fn dense_total_params(&self) -> u64 {
        self.other_params + self.dense_block_params()
    }

    pub fn block_params(&self, widths: &[BlockWidths]) -> u64 {
        assert_eq!(widths.len(), self.blocks.len(), "one width set per block");
        self.blocks.iter().zip(widths).map(|(b, w)| b.linear_params(w)).sum()
    }

    pub fn total_params(&self, widths: &[BlockWidths]) -> u64 {
        self.other_params + self.block_params(widths)
    }

    /// Fraction of parameters removed (of total or of blocks) by these widths.
    pub fn removed_ratio(&self, widths: &[BlockWidths], of: RatioOf) -> f64 {
        let removed = (self.dense_block_params() - self.block_params(widths)) as f64;
        removed / self.denominator(of)
    }

    fn denominator(&self, of: RatioOf) -> f64 {
        match of {
            RatioOf::Total => self.dense_total_params() as f64,
            RatioOf::Blocks => self.dense_block_params() as f64,
        }
    }

    /// The kept fraction p of block parameters that removes `ratio` of `of`.
    pub fn kept_block_fraction(&self, ratio: f64, of: RatioOf) -> anyhow::Result<f64> {
        if !(ratio > 0.0 && ratio < 1.0) {
            anyhow::bail!("pruning ratio must be strictly between 0 and 1, got {ratio}");
        }
        let removed = ratio * self.denominator(of);
        let blocks = self.dense_block_params() as f64;
        let kept = (blocks - removed) / blocks;
        if kept <= 0.0 {
            anyhow::bail!(
                "pruning ratio {ratio} of {} parameters would remove more than all block weights \
                 ({:.1}% of the total is outside the blocks and is never pruned)",
                match of {
                    RatioOf::Total => "total",
                    RatioOf::Blocks => "block",
                },
                100.0 * self.other_params as f64 / self.dense_total_params() as f64
            );
        }
        Ok(kept)
    }

    /// Inverse of [`Self::kept_block_fraction`].
    pub fn ratio_for_kept_fraction(&self, kept: f64, of: RatioOf) -> f64 {
        (1.0 - kept) * self.dense_block_params() as f64 / self.denominator(of)
    }
}

/// λ·|log(P / target)|: zero when the (hard-mask) parameter count P hits the target, growing on
/// both sides, and scale-free.
pub fn parameter_regulariser(params: Tensor<1>, target_params: f64, lambda: f64) -> Tensor<1> {
    params.div_scalar(target_params).log().abs().mul_scalar(lambda)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_like() -> BlockShape {
        BlockShape {
            hidden: 8,
            intermediate: 16,
            q_dim: 8,
            kv_dim: 4,
            mlp: MlpKind::Gated,
            qkv_bias: false,
            out_bias: false,
            mlp_in_bias: false,
            mlp_out_bias: false,
        }
    }

    #[test]
    fn dense_count_matches_the_matrices() {
        let b = llama_like();
        // q, k, v, o and gate, up, down written out by hand.
        let expected = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 8 * 16 * 2 + 16 * 8;
        assert_eq!(b.linear_params(&b.full_widths()), expected);
        let opt = BlockShape { mlp: MlpKind::TwoMatrix, qkv_bias: true, out_bias: true, mlp_in_bias: true, mlp_out_bias: true, ..b };
        let expected = (8 * 8 + 8) + 2 * (8 * 4 + 4) + (8 * 8 + 8) + (8 * 16 + 16) + (16 * 8 + 8);
        assert_eq!(opt.linear_params(&opt.full_widths()), expected);
    }

    #[test]
    fn regulariser_is_zero_at_the_target_and_grows_on_both_sides() {
        let device = burn::tensor::Device::flex();
        let at = |p: f64| {
            let params = Tensor::<1>::from_floats([p as f32], &device);
            parameter_regulariser(params, 1000.0, 6.0).into_scalar::<f32>() as f64
        };
        assert!(at(1000.0).abs() < 1e-6);
        assert!(at(900.0) > at(950.0) && at(950.0) > at(990.0) && at(990.0) > 0.0);
        assert!(at(1100.0) > at(1050.0) && at(1050.0) > at(1010.0) && at(1010.0) > 0.0);
        // λ·|log(P/T)|: symmetric in the ratio, so halving and doubling cost the same.
        assert!((at(500.0) - at(2000.0)).abs() < 1e-4 && (at(2000.0) - 6.0 * 2f64.ln()).abs() < 1e-4);
    }

    #[test]
    fn differentiable_count_equals_the_integer_count() {
        let device = burn::tensor::Device::flex();
        let block = BlockShape { mlp: MlpKind::TwoMatrix, qkv_bias: true, out_bias: true, mlp_in_bias: true, mlp_out_bias: true, ..llama_like() };
        let widths = BlockWidths { attn_in: 5, attn_out: 3, mlp_in: 7, mlp_inter: 11, mlp_out: 2 };
        let as_tensors = widths.as_array().map(|w| Tensor::<1>::from_floats([w as f32], &device));
        let counted = block.linear_params_tensor(as_tensors).into_scalar::<f32>() as u64;
        assert_eq!(counted, block.linear_params(&widths));
    }

    #[test]
    fn ratio_conversion_round_trips_and_rejects_impossible_ratios() {
        let shape = ModelShape { blocks: vec![llama_like(); 3], other_params: 500 };
        for of in [RatioOf::Total, RatioOf::Blocks] {
            for ratio in [0.1, 0.3, 0.5] {
                let p = shape.kept_block_fraction(ratio, of).unwrap();
                assert!((shape.ratio_for_kept_fraction(p, of) - ratio).abs() < 1e-12);
            }
        }
        assert!(shape.kept_block_fraction(0.0, RatioOf::Total).is_err());
        assert!(shape.kept_block_fraction(1.0, RatioOf::Blocks).is_err());
        // 500 of 2600 parameters are outside the blocks: removing 90% of the total is impossible.
        let err = shape.kept_block_fraction(0.9, RatioOf::Total).unwrap_err().to_string();
        assert!(err.contains("more than all block weights"), "{err}");
    }
}
