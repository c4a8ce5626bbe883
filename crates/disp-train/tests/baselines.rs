//! Activation statistics and the Wanda baselines on the tiny random fixtures (2 layers, hidden
//! 64, intermediate 128, vocabulary 256).

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use disp_core::params::RatioOf;
use disp_core::selection::BlockGates;
use disp_models::CausalLm;
use disp_train::rng::SplitMix64;
use disp_train::uniform::top_k_sorted;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn load(name: &str) -> Box<dyn CausalLm> {
    disp_models::load_model(&fixture(name), &Device::flex()).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

fn windows(count: usize, seq: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = SplitMix64::new(seed);
    (0..count).map(|_| (0..seq).map(|_| rng.below(256) as u32).collect()).collect()
}

fn logits(model: &dyn CausalLm, window: &[u32], gates: Option<&[BlockGates]>) -> Vec<f32> {
    let ids: Vec<i64> = window.iter().map(|&t| t as i64).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, window.len()]), model.device());
    model.forward(tokens, gates, None).into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

const FAMILIES: [&str; 4] = ["llama_gqa_tied", "opt_pre_ln", "opt_post_ln_proj", "phi"];

#[test]
fn recording_gates_leave_the_logits_bit_identical_and_see_every_point() {
    for name in FAMILIES {
        let model = load(name);
        let block = model.model_shape().blocks[0];
        let data = windows(2, 20, 1);
        let gates: Vec<BlockGates> =
            (0..model.num_layers()).map(|_| BlockGates::recording(block.hidden, block.intermediate, model.device())).collect();
        for w in &data {
            // Recording gates run burn's ops, so they are compared with burn's dense path.
            let dense = disp_models::host_forward::with_generic_path(|| logits(model.as_ref(), w, None));
            assert_eq!(bits(&dense), bits(&logits(model.as_ref(), w, Some(&gates))), "{name}");
        }
        let norms: Vec<_> = gates.iter().map(|g| g.recorder().unwrap().norms()).collect();
        for (layer, n) in norms.iter().enumerate() {
            assert_eq!(n.tokens, 40, "{name}");
            for (what, v, width) in [
                ("S1 input", &n.attn_in, block.hidden),
                ("S3 input", &n.mlp_in, block.hidden),
                ("intermediate", &n.mlp_inter, block.intermediate),
                ("attention context", &n.attn_context, block.q_dim),
                ("attention output", &n.attn_out, block.hidden),
                ("MLP output", &n.mlp_out, block.hidden),
            ] {
                assert_eq!(v.len(), width, "{name} layer {layer} {what}");
                assert!(v.iter().all(|x| x.is_finite() && *x >= 0.0) && v.iter().any(|&x| x > 0.0), "{name} layer {layer} {what}");
            }
        }
    }
}

/// `collect` against transformers' forward hooks on the same two windows
/// (tests/fixtures/make_eval_reference.py, activation_norms.json): every block's six norms.
#[test]
fn collected_norms_match_transformers_hooks() {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("eval_reference/activation_norms.json")).unwrap()).unwrap();
    for name in FAMILIES {
        let expected = &reference["fixtures"][name];
        let data: Vec<Vec<u32>> = expected["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect())
            .collect();
        let model = load(name);
        let norms = disp_train::activation_stats::collect(model.as_ref(), &data).unwrap();
        assert_eq!(norms.len(), expected["layers"].as_array().unwrap().len(), "{name}");
        for (layer, (ours, theirs)) in norms.iter().zip(expected["layers"].as_array().unwrap()).enumerate() {
            assert_eq!(ours.tokens, 24, "{name}");
            for (point, values) in [
                ("attn_in", &ours.attn_in),
                ("mlp_in", &ours.mlp_in),
                ("mlp_inter", &ours.mlp_inter),
                ("attn_context", &ours.attn_context),
                ("attn_out", &ours.attn_out),
                ("mlp_out", &ours.mlp_out),
            ] {
                let want: Vec<f64> = theirs[point].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
                assert_eq!(values.len(), want.len(), "{name} layer {layer} {point}");
                for (j, (&got, &want)) in values.iter().zip(&want).enumerate() {
                    // f32 forward passes that agree to ~1e-6 in the logits.
                    assert!((got as f64 - want).abs() <= 1e-4 * (1.0 + want), "{name} layer {layer} {point}[{j}]: {got} vs transformers {want}");
                }
            }
        }
    }
}

#[test]
fn recorded_attention_input_norms_equal_the_rms_normed_embeddings() {
    let dir = fixture("llama_gqa_tied");
    let model = load("llama_gqa_tied");
    let data = windows(3, 16, 2);
    let norms = disp_train::activation_stats::collect(model.as_ref(), &data).unwrap();

    // Layer 0 reads RMSNorm(embedding) · γ: recompute it in f64 from the checkpoint.
    let ck = disp_models::Checkpoint::open(&dir).unwrap();
    let (vocab, d) = (256, 64);
    let embed = ck.read_f32("model.embed_tokens.weight", &[vocab, d]).unwrap();
    let gamma = ck.read_f32("model.layers.0.input_layernorm.weight", &[d]).unwrap();
    let eps = 1e-5; // rms_norm_eps of the fixture's config.json
    let mut squared = vec![0f64; d];
    for &t in data.iter().flatten() {
        let x = &embed[t as usize * d..(t as usize + 1) * d];
        let rms = (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64 + eps).sqrt();
        for ((sq, &xj), &g) in squared.iter_mut().zip(x).zip(&gamma) {
            *sq += (xj as f64 / rms * g as f64).powi(2);
        }
    }
    for (j, sum) in squared.iter().enumerate() {
        let expected = sum.sqrt();
        let got = norms[0].attn_in[j] as f64;
        assert!((got - expected).abs() <= 1e-4 * expected.max(1e-3), "channel {j}: recorded {got}, expected {expected}");
    }
    // LLaMA's MLP reads its own norm of a different residual: the two inputs must differ.
    assert_ne!(norms[0].attn_in, norms[0].mlp_in);
}

#[test]
fn activation_statistics_refuse_a_pruned_model_and_bad_windows() {
    let model = load("llama_gqa_tied");
    let plan = disp_train::uniform::uniform_magnitude_plan(model.as_ref(), 0.2, RatioOf::Blocks).unwrap();
    let pruned = model.prune(&plan).unwrap();
    let err = disp_train::activation_stats::collect(pruned.as_ref(), &windows(1, 8, 3)).unwrap_err().to_string();
    assert!(err.contains("dense model"), "{err}");
    let err = disp_train::activation_stats::collect(model.as_ref(), &[]).unwrap_err().to_string();
    assert!(err.contains("no calibration windows"), "{err}");
}

#[test]
fn wanda_sp_plan_is_uniform_width_at_the_target_and_ranks_by_activations() {
    let model = load("llama_gqa_tied");
    let data = windows(4, 32, 4);
    let plan = disp_train::wanda::wanda_sp_plan(model.as_ref(), &data, 0.2, RatioOf::Blocks).unwrap();
    assert_eq!(plan.method, "uniform-wanda");
    plan.validate(&model.identity(), &model.model_shape()).unwrap();
    let uniform = disp_train::uniform::uniform_magnitude_plan(model.as_ref(), 0.2, RatioOf::Blocks).unwrap();
    // Same selection rule, so the same widths and the same exact parameter count...
    assert_eq!(plan.widths(), uniform.widths());
    assert_eq!(plan.pruned_params, uniform.pruned_params);
    eprintln!("uniform-wanda removed {} of the blocks (target 0.2)", plan.achieved_ratio);
    assert!((plan.achieved_ratio - 0.2).abs() <= 0.005, "removed {}", plan.achieved_ratio);
    for l in &plan.layers {
        assert_eq!(l.attn_in, plan.layers[0].attn_in, "one embedding subset for all blocks");
        assert_eq!(l.attn_in, l.mlp_out);
    }
    // ...but other positions: the activation norms re-rank the weight magnitudes.
    assert_ne!(plan.layers, uniform.layers);

    // S4 of layer 0 is exactly the top channels of ‖h_j‖ · Σ_k |W_down,jk|.
    let norms = disp_train::activation_stats::collect(model.as_ref(), &data).unwrap();
    let down = disp_train::wanda::HostWeight::of(model.block_linears(0).mlp_output);
    let score: Vec<f32> = (0..down.inputs)
        .map(|j| norms[0].mlp_inter[j] * down.values[j * down.outputs..(j + 1) * down.outputs].iter().map(|w| w.abs()).sum::<f32>())
        .collect();
    assert_eq!(plan.layers[0].mlp_inter, top_k_sorted(&score, plan.layers[0].mlp_inter.len()));

    let pruned = model.prune(&plan).unwrap();
    assert!(logits(pruned.as_ref(), &data[0], None).iter().all(|x| x.is_finite()));
}

#[test]
fn wanda_2_4_zeroes_half_of_every_block_linear() {
    for name in ["llama_gqa_tied", "opt_pre_ln", "phi"] {
        let mut model = load(name);
        let data = windows(3, 24, 5);
        let dense = logits(model.as_ref(), &data[0], None);
        let biases_before: Vec<Vec<f32>> = all_linears(model.as_ref())
            .iter()
            .filter_map(|l| l.bias.as_ref().map(|b| b.clone().into_data().convert::<f32>().try_into_vec::<f32>().unwrap()))
            .collect();
        let report = disp_train::wanda::apply_wanda_2_4(model.as_mut(), &data).unwrap();
        assert_eq!(report.fraction, 0.5, "{name}: every input width is a multiple of 4");
        assert_eq!(report.zeroed * 2, report.total);
        assert_eq!(report.total, model.model_shape().blocks.iter().map(weights_only).sum::<u64>(), "{name}");
        assert_eq!(report.calibration_tokens, 72);
        for (i, l) in all_linears(model.as_ref()).iter().enumerate() {
            let w = disp_train::wanda::HostWeight::of(l);
            for col in 0..w.outputs {
                for group in 0..w.inputs / 4 {
                    let zeros = (0..4).filter(|r| w.values[(4 * group + r) * w.outputs + col] == 0.0).count();
                    assert_eq!(zeros, 2, "{name}: linear {i}, column {col}, group {group}");
                }
            }
        }
        let biases_after: Vec<Vec<f32>> = all_linears(model.as_ref())
            .iter()
            .filter_map(|l| l.bias.as_ref().map(|b| b.clone().into_data().convert::<f32>().try_into_vec::<f32>().unwrap()))
            .collect();
        assert_eq!(biases_before, biases_after, "{name}: biases are not part of 2:4");
        let sparse = logits(model.as_ref(), &data[0], None);
        assert!(sparse.iter().all(|x| x.is_finite()), "{name}");
        let moved = sparse.iter().zip(&dense).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(moved > 1e-3, "{name}: 2:4 sparsity left the logits unchanged ({moved})");
    }
}

fn all_linears(model: &dyn CausalLm) -> Vec<&disp_models::layers::Linear> {
    (0..model.num_layers())
        .flat_map(|layer| {
            let b = model.block_linears(layer);
            let mut v = b.attn_inputs.clone();
            v.push(b.attn_output);
            v.extend(b.mlp_inputs.iter().copied());
            v.push(b.mlp_output);
            v
        })
        .collect()
}

/// Weight entries (no biases) of a block's linears at full width.
fn weights_only(b: &disp_core::params::BlockShape) -> u64 {
    let (d, ff, q, kv) = (b.hidden as u64, b.intermediate as u64, b.q_dim as u64, b.kv_dim as u64);
    let mlp_in = match b.mlp {
        disp_core::params::MlpKind::Gated => 2,
        disp_core::params::MlpKind::TwoMatrix => 1,
    };
    d * (q + 2 * kv) + q * d + mlp_in * d * ff + ff * d
}

#[test]
fn wanda_sp_mlp_cuts_only_mlp_channels_at_the_target_count() {
    for name in FAMILIES {
        let model = load(name);
        let shape = model.model_shape();
        let data = windows(3, 16, 9);
        let plan = disp_train::wanda::wanda_sp_mlp_plan(model.as_ref(), &data, 0.2, RatioOf::Blocks).unwrap();
        assert_eq!(plan.method, "wanda-sp-mlp");
        let (hidden, inter) = (shape.blocks[0].hidden, shape.blocks[0].intermediate);
        let width = plan.layers[0].mlp_inter.len();
        assert!(width < inter, "{name}: no MLP channel removed");
        for layer in &plan.layers {
            for set in [&layer.attn_in, &layer.attn_out, &layer.mlp_in, &layer.mlp_out] {
                assert_eq!(set.len(), hidden, "{name}: only MLP channels are cut");
            }
            assert_eq!(layer.mlp_inter.len(), width, "{name}: the same count in every block");
        }
        // The closest width: one channel more or less is farther from the target.
        let target = (shape.kept_block_fraction(0.2, RatioOf::Blocks).unwrap() * shape.dense_block_params() as f64).round() as u64;
        let params = |m: usize| {
            let w = disp_core::params::BlockWidths { mlp_inter: m, ..shape.blocks[0].full_widths() };
            shape.block_params(&vec![w; shape.blocks.len()])
        };
        assert!(params(width).abs_diff(target) <= params(width - 1).abs_diff(target));
        assert!(params(width).abs_diff(target) <= params(width + 1).abs_diff(target));
        // Each block keeps its own best channels by ‖h‖·Σ|W_down|.
        let norms = disp_train::activation_stats::collect(model.as_ref(), &data).unwrap();
        let down = disp_train::wanda::HostWeight::of(model.block_linears(1).mlp_output);
        let scores: Vec<f32> = down
            .values
            .chunks_exact(down.outputs)
            .zip(&norms[1].mlp_inter)
            .map(|(row, n)| (row.iter().map(|w| w.abs() as f64).sum::<f64>() * *n as f64) as f32)
            .collect();
        assert_eq!(plan.layers[1].mlp_inter, top_k_sorted(&scores, width), "{name}");
        // Beyond what MLP channels can give: a clear error.
        let err = disp_train::wanda::wanda_sp_mlp_plan(model.as_ref(), &data, 0.95, RatioOf::Blocks).unwrap_err().to_string();
        assert!(err.contains("cannot be reached by removing MLP channels alone"), "{err}");
    }
}
