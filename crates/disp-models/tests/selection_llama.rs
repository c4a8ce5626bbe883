//! The selection layer on LLaMA and the LLaMA-like families (Qwen2, Qwen3, Mistral): all-ones
//! gates are the dense model, hard gates are the pruned model, the parameter accounting equals
//! the tensors actually cut, and cached decoding reproduces the full forward.

mod common;

use common::*;
use disp_core::selection::BlockGates;

const LLAMA_FIXTURES: [&str; 6] = ["llama_mha_untied", "llama_gqa_tied", "llama_bf16", "qwen2", "qwen3", "mistral"];

#[test]
fn all_ones_gates_give_the_dense_logits() {
    for name in LLAMA_FIXTURES {
        let dir = fixture(name);
        let device = device();
        let model = disp_models::load_model(&dir, &device).unwrap();
        let (d, ff) = hidden_and_intermediate(model.as_ref());
        let gates: Vec<_> = (0..model.num_layers()).map(|_| BlockGates::ones(d, ff, &device)).collect();
        // Masked runs burn's ops, so the dense reference is burn's too (× 1 is exact there; the
        // host path of the dense model is compared with it in tests/host_forward.rs).
        let dense = disp_models::host_forward::with_generic_path(|| logits(model.as_ref(), &dir, None));
        let masked = logits(model.as_ref(), &dir, Some(&gates));
        // Exact on the CPU; a GPU backend may fuse the gate multiplication into other kernels.
        let diff = max_abs_diff(&dense, &masked);
        assert!(diff <= tolerance(0.0, 1e-5), "{name}: all-ones gates changed the logits by {diff}");
    }
}

#[test]
fn hard_gates_equal_the_pruned_model() {
    for name in LLAMA_FIXTURES {
        let dir = fixture(name);
        let device = device();
        let model = disp_models::load_model(&dir, &device).unwrap();
        let (d, ff) = hidden_and_intermediate(model.as_ref());
        let plan = random_plan(model.as_ref(), 7);
        let gates: Vec<_> = plan.layers.iter().map(|l| BlockGates::from_indices(l, d, ff, &device)).collect();
        let masked = logits(model.as_ref(), &dir, Some(&gates));
        let pruned_model = model.prune(&plan).unwrap();
        let pruned = logits(pruned_model.as_ref(), &dir, None);
        let dense = logits(model.as_ref(), &dir, None);
        let diff = max_abs_diff(&masked, &pruned);
        assert!(diff <= tolerance(1e-5, 1e-4), "{name}: masked vs pruned differ by {diff}");
        // The plan must actually change the function, or the comparison proves nothing.
        assert!(max_abs_diff(&dense, &pruned) > 1e-2, "{name}: the random plan left the logits unchanged");
    }
}

#[test]
fn parameter_accounting_equals_the_cut_tensors() {
    for name in LLAMA_FIXTURES {
        let dir = fixture(name);
        let device = device();
        let model = disp_models::load_model(&dir, &device).unwrap();
        let shape = model.model_shape();
        // Dense: every tensor in the file (the tied head is not stored) is counted exactly once.
        let ck = disp_models::Checkpoint::open(&dir).unwrap();
        let in_file: u64 = ck.names().map(|n| ck.read_f32(n, &ck.shape(n).unwrap()).unwrap().len() as u64).sum();
        assert_eq!(in_file, shape.dense_total_params(), "{name}: dense total");
        assert_eq!(model.stored_linear_params() as u64, shape.dense_block_params(), "{name}: dense blocks");
        let plan = random_plan(model.as_ref(), 11);
        let pruned = model.prune(&plan).unwrap();
        assert_eq!(pruned.stored_linear_params() as u64, shape.block_params(&plan.widths()), "{name}: pruned blocks");
    }
}

/// Rotary offsets, q/k norms and the sliding window (which cuts keys out of the cache once it
/// holds more than 5 positions) must follow the cache.
#[test]
fn cached_decoding_matches_the_full_forward() {
    for name in LLAMA_FIXTURES {
        check_cached_decoding(name);
    }
}

#[test]
fn a_plan_for_another_model_is_rejected() {
    let device = device();
    let small = disp_models::load_model(&fixture("llama_gqa_tied"), &device).unwrap();
    let mut plan = random_plan(small.as_ref(), 3);
    plan.model.hidden_size += 1;
    let err = small.prune(&plan).err().expect("mismatched plan accepted").to_string();
    assert!(err.contains("plan is for a llama model"), "{err}");
    let mut plan = random_plan(small.as_ref(), 3);
    plan.layers[1].mlp_inter.push(10_000);
    let err = small.prune(&plan).err().expect("out-of-range plan accepted").to_string();
    assert!(err.contains("layer 1 S4") && err.contains("out of range"), "{err}");
}
