//! The gradient of the search's LM loss with respect to the soft gates, computed one block at a
//! time so that activations kept for the backward stay bounded (per-block recompute).
//!
//! The full graph keeps every block's activations, and with weights stored below f32 also the f32
//! cast of every weight (the graph holds each matmul's operand for its backward): at 7B that is
//! the whole model in f32 again. Here instead:
//! 1. forward block by block on the plain device, keeping only each block's input residual;
//! 2. the head (final norm, LM head, loss) on the autodiff device from the detached last
//!    residual gives dL/d(residual) there;
//! 3. backward block by block: recompute block `l` on the autodiff device from its detached
//!    input with its gates as leaves, back-propagate the upstream gradient `G` through that block
//!    only (surrogate Σ output·G), and collect dL/d(gates of l) and dL/d(input of l);
//! 4. the caller back-propagates Σ gates·dL/dgates (+ the regulariser) through the gate
//!    generator: the same gradient as the full graph's, in one small graph.
//!
//! At most one block's graph (and its f32 weight casts) exists at a time.

use burn::tensor::{Int, Tensor};
use disp_core::selection::BlockGates;
use disp_models::CausalLm;

use crate::loss::lm_loss;

/// How the search back-propagates through the frozen model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackwardMode {
    /// The full graph when its memory estimate fits, else per-block recompute.
    #[default]
    Auto,
    /// One graph through the whole model (fastest: no recomputed forward).
    FullGraph,
    /// Block by block with a recomputed forward ([`lm_gate_gradients_per_block`]).
    PerBlock,
}

impl BackwardMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::FullGraph => "full-graph",
            Self::PerBlock => "per-block",
        }
    }
}

/// The LM loss of one batch and its gradient with respect to each site's soft gates.
pub struct GateGradients {
    /// Mean next-token NLL.
    pub lm_loss: f64,
    /// dL/d(soft gates) per site, `[layers, width]`, on the plain device.
    pub per_site: [Tensor<2>; 5],
}

impl GateGradients {
    /// Σ_s Σ soft_s · dL/dsoft_s, `[1]`: its gradient through the gate generator equals that of
    /// the LM loss (the gradients are constants).
    pub fn surrogate(&self, soft: &[Tensor<2>; 5]) -> Tensor<1> {
        let terms: Vec<Tensor<1>> = soft.iter().zip(&self.per_site).map(|(s, g)| (s.clone() * g.clone()).sum()).collect();
        terms.into_iter().reduce(|a, b| a + b).expect("five sites")
    }
}

/// The gates of block `layer` from per-site `[layers, width]` tensors.
fn layer_gates(per_site: &[Tensor<2>; 5], layer: usize) -> [Tensor<1>; 5] {
    std::array::from_fn(|s| {
        let width = per_site[s].dims()[1];
        per_site[s].clone().narrow(0, layer, 1).reshape([width])
    })
}

/// dL/d(soft gates) block by block (see the module doc). `soft` may live on either device; its
/// values are used, not its graph. `tokens` `[B, T]` are on the model's device.
pub fn lm_gate_gradients_per_block(model: &dyn CausalLm, tokens: &Tensor<2, Int>, soft: &[Tensor<2>; 5]) -> GateGradients {
    let plain: [Tensor<2>; 5] = std::array::from_fn(|s| soft[s].clone().inner());
    let layers = model.num_layers();

    // 1. Forward on the plain device, keeping each block's input.
    let mut inputs = Vec::with_capacity(layers);
    let mut x = model.embed(tokens.clone());
    for layer in 0..layers {
        inputs.push(x.clone());
        x = model.block_forward(layer, x, Some(&BlockGates::new(layer_gates(&plain, layer))));
    }

    // 2. The head on the autodiff device from the detached last residual.
    let last = x.autodiff().require_grad();
    let lm = lm_loss(model.logits(model.finish(last.clone())), tokens);
    let grads = lm.surrogate.backward();
    let mut upstream = last.grad(&grads).expect("the loss depends on the last residual");
    drop(grads);

    // 3. Backward block by block.
    let mut per_layer: Vec<[Tensor<1>; 5]> = Vec::with_capacity(layers);
    for layer in (0..layers).rev() {
        let input = inputs.pop().expect("one input per block");
        // Block 0's input is the embedding, whose gradient nobody needs.
        let input = if layer > 0 { input.autodiff().require_grad() } else { input.autodiff() };
        let leaves: [Tensor<1>; 5] = layer_gates(&plain, layer).map(|g| g.autodiff().require_grad());
        let out = model.block_forward(layer, input.clone(), Some(&BlockGates::new(leaves.clone())));
        let grads = (out * upstream.autodiff()).sum().backward();
        per_layer.push(leaves.map(|g| g.grad(&grads).unwrap_or_else(|| g.inner().zeros_like())));
        upstream = if layer > 0 { input.grad(&grads).expect("the block depends on its input") } else { input.inner().zeros_like() };
    }
    per_layer.reverse();
    let per_site = std::array::from_fn(|s| Tensor::stack::<2>(per_layer.iter().map(|g| g[s].clone()).collect(), 0));
    GateGradients { lm_loss: lm.value, per_site }
}

/// The same gradients through one graph of the whole model: the reference the per-block mode is
/// tested against.
pub fn lm_gate_gradients_full_graph(model: &dyn CausalLm, tokens: &Tensor<2, Int>, soft: &[Tensor<2>; 5]) -> GateGradients {
    let leaves: [Tensor<2>; 5] = std::array::from_fn(|s| soft[s].clone().inner().autodiff().require_grad());
    let logits = model.forward(tokens.clone(), Some(&crate::gates::block_gates(&leaves)), None);
    let lm = lm_loss(logits, tokens);
    let grads = lm.surrogate.backward();
    let per_site = leaves.map(|g| g.grad(&grads).unwrap_or_else(|| g.inner().zeros_like()));
    GateGradients { lm_loss: lm.value, per_site }
}
