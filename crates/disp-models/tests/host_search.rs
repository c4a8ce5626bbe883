//! The host backward of the search (`disp_models::host_search`) against burn's autodiff on every
//! family's fixtures: the loss and the gradient of every gate of a masked forward pass.

mod common;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use common::*;
use disp_core::selection::BlockGates;
use disp_models::host_search::BackwardWeights;

const COVERED: [&str; 7] = ["llama_gqa_tied", "llama_mha_untied", "llama_bf16", "llama_sharded", "mistral", "qwen2", "opt_pre_ln"];
const NOT_COVERED: [&str; 3] = ["qwen3", "opt_post_ln_proj", "phi"];

/// Seeded gate values in (0.05, 0.95): soft gates, as the search samples them.
fn gate_values(widths: [usize; 5], layers: usize, seed: u64) -> Vec<[Vec<f32>; 5]> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        0.05 + 0.9 * (state % 10_000) as f32 / 10_000.0
    };
    (0..layers).map(|_| widths.map(|w| (0..w).map(|_| next()).collect())).collect()
}

#[test]
fn loss_and_gate_gradients_equal_autodiff() {
    for name in COVERED {
        let (model, device) = load(name);
        let dir = fixture(name);
        let (shape, ids) = reference(&dir, "input_ids");
        let (batch, seq) = (shape[0], shape[1]);
        let widths = model.model_shape().blocks[0].site_widths();
        let gates = gate_values(widths, model.num_layers(), 3);

        let tokens: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
        // From the transposed copies (twice: made, then reused) and from the weights as stored.
        let copies = BackwardWeights::transposed_copies();
        let results = [&copies, &copies, &BackwardWeights::as_stored()].map(|c| model.gate_gradients(&tokens, batch, &gates, c).expect("covered"));

        let autodiff = device.clone().autodiff();
        let tracked: Vec<[Tensor<1>; 5]> = gates
            .iter()
            .map(|g| g.clone().map(|v| Tensor::<1>::from_data(TensorData::new(v.clone(), [v.len()]), &autodiff).require_grad()))
            .collect();
        let block_gates: Vec<BlockGates> = tracked.iter().map(|t| BlockGates::new(t.clone())).collect();
        let logits = model.forward(token_tensor(&shape, &ids, &device), Some(&block_gates), None);
        let vocab = logits.dims()[2];
        let targets: Vec<i64> = (0..batch).flat_map(|b| ids[b * seq + 1..(b + 1) * seq].iter().map(|&t| t as i64)).collect();
        let targets = Tensor::<3, Int>::from_data(TensorData::new(targets, [batch, seq - 1, 1]), &autodiff);
        let log_probs = log_softmax(logits.narrow(1, 0, seq - 1), 2);
        assert_eq!(log_probs.dims(), [batch, seq - 1, vocab]);
        let loss = log_probs.gather(2, targets).sum().neg().div_scalar((batch * (seq - 1)) as f64);
        let loss_value = loss.clone().into_scalar::<f32>() as f64;
        let grads = loss.backward();

        // Every block linear of an f32 model got its copy; a bf16 one is converted per call instead.
        let linears = (0..model.num_layers())
            .map(|l| {
                let linears = model.block_linears(l);
                linears.attn_inputs.len() + linears.mlp_inputs.len() + 2
            })
            .sum::<usize>();
        let expected = if name == "llama_bf16" { 0 } else { linears };
        assert_eq!(copies.copies_made(), expected, "{name}: transposed copies");

        for (host, weights) in results.iter().zip(["copies made", "copies reused", "weights as stored"]) {
            let what = format!("{name} ({weights})");
            assert!((host.loss - loss_value).abs() <= 1e-5 * loss_value.abs().max(1.0), "{what}: loss {} vs autodiff {loss_value}", host.loss);
            let mut worst = 0f32;
            for (layer, (ours, theirs)) in host.layers.iter().zip(&tracked).enumerate() {
                for site in 0..5 {
                    let reference = to_vec(theirs[site].grad(&grads).expect("gate gradient"));
                    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
                    assert!(scale > 0.0, "{what}: layer {layer} site {site}: zero reference gradient");
                    let relative = max_abs_diff(&ours[site], &reference) / scale;
                    worst = worst.max(relative);
                    assert!(relative <= 1e-4, "{what}: layer {layer} site S{}: relative gradient difference {relative:.3e}", site + 1);
                }
            }
            println!("{what}: loss {:.6} (autodiff {loss_value:.6}), worst relative gate-gradient difference {worst:.3e}", host.loss);
        }
    }
}

#[test]
fn uncovered_variants_fall_back_to_autodiff() {
    for name in NOT_COVERED {
        let (model, _) = load(name);
        let widths = model.model_shape().blocks[0].site_widths();
        let gates = gate_values(widths, model.num_layers(), 3);
        assert!(model.gate_gradients(&[1, 2, 3, 4], 1, &gates, &BackwardWeights::transposed_copies()).is_none(), "{name}: expected no host backward");
    }
}
