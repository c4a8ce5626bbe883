//! Logits of tiny random checkpoints made by HF transformers (tests/fixtures/make_fixtures.py)
//! must be reproduced to 1e-4 (1e-3 on a GPU backend: `DISP_TEST_DEVICE=wgpu`).

mod common;

use burn::tensor::Device;
use common::*;

fn check_fixture(name: &str) -> f32 {
    check_fixture_on(name, &device())
}

fn check_fixture_on(name: &str, device: &Device) -> f32 {
    let dir = fixture(name);
    let device = device.clone();
    let model = disp_models::load_model(&dir, &device).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let (id_shape, ids) = reference(&dir, "input_ids");
    let (logit_shape, expected) = reference(&dir, "logits");
    let logits = model.forward(token_tensor(&id_shape, &ids, &device), None, None);
    assert_eq!(logits.dims().to_vec(), logit_shape, "{name}: logits shape");
    // The generation path computes the head for the last position only.
    let [rows, seq, vocab] = logits.dims();
    let last = to_vec(model.forward_last(token_tensor(&id_shape, &ids, &device), None));
    let expected_last = to_vec(logits.clone().narrow(1, seq - 1, 1).reshape([rows, vocab]));
    let last_diff = max_abs_diff(&last, &expected_last);
    assert!(last_diff <= tolerance(1e-5, 1e-4), "{name}: forward_last differs from forward's last position by {last_diff}");
    let diff = max_abs_diff(&to_vec(logits), &expected);
    println!("{name} on {device:?}: max |logit difference| = {diff:.3e}");
    let limit = tolerance(1e-4, 1e-3);
    assert!(diff <= limit, "{name}: max logit difference {diff} > {limit}");
    diff
}

#[test]
fn llama_mha_untied_matches_transformers() {
    check_fixture("llama_mha_untied");
}

#[test]
fn llama_gqa_tied_with_biases_matches_transformers() {
    check_fixture("llama_gqa_tied");
}

#[test]
fn llama_bf16_with_llama3_rope_scaling_matches_transformers() {
    check_fixture("llama_bf16");
}

#[test]
fn llama_sharded_checkpoint_matches_transformers() {
    check_fixture("llama_sharded");
}

#[test]
fn opt_pre_ln_tied_matches_transformers() {
    check_fixture("opt_pre_ln");
}

#[test]
fn opt_post_ln_with_embedding_projection_matches_transformers() {
    check_fixture("opt_post_ln_proj");
}

#[test]
fn phi_parallel_block_with_partial_rotary_matches_transformers() {
    check_fixture("phi");
}

#[test]
fn qwen2_with_qkv_biases_and_tied_embeddings_matches_transformers() {
    check_fixture("qwen2");
}

#[test]
fn qwen3_with_qk_norms_and_its_own_head_dim_matches_transformers() {
    check_fixture("qwen3");
}

#[test]
fn mistral_with_a_sliding_window_shorter_than_the_sequence_matches_transformers() {
    check_fixture("mistral");
}

/// On an autodiff device attention runs burn's op with an explicit window mask instead of the
/// host kernel: both must apply the window as transformers does.
#[test]
fn mistral_sliding_window_on_the_autodiff_path_matches_transformers() {
    check_fixture_on("mistral", &device().autodiff());
}
