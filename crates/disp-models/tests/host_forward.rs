//! The host forward path (plain CPU device, `disp_models::host_forward`) against the generic
//! burn path on every family's fixtures: dense and pruned logits, and a prompt filling the KV
//! cache that the generic path then decodes from.

mod common;

use common::*;
use disp_core::selection::BlockGates;
use disp_models::host_forward::with_generic_path;

/// Every wiring, norm, activation, bias layout, rotary variant, q/k norm and sliding window the
/// fixtures cover.
const FIXTURES: [&str; 10] =
    ["llama_gqa_tied", "llama_mha_untied", "llama_bf16", "llama_sharded", "mistral", "qwen2", "qwen3", "opt_pre_ln", "opt_post_ln_proj", "phi"];

#[test]
fn dense_and_pruned_logits_equal_the_generic_path() {
    for name in FIXTURES {
        let (model, device) = load(name);
        let dir = fixture(name);
        let host = logits(model.as_ref(), &dir, None);
        let generic = with_generic_path(|| logits(model.as_ref(), &dir, None));
        let diff = max_abs_diff(&host, &generic);
        println!("{name}: dense max |host - generic| = {diff:.3e}");
        assert!(diff <= 1e-4, "{name}: dense host logits differ from the generic path by {diff}");

        let plan = random_plan(model.as_ref(), 11);
        let pruned = model.prune(&plan).unwrap();
        let host = logits(pruned.as_ref(), &dir, None);
        let generic = with_generic_path(|| logits(pruned.as_ref(), &dir, None));
        let diff = max_abs_diff(&host, &generic);
        println!("{name}: pruned max |host - generic| = {diff:.3e}");
        assert!(diff <= 1e-4, "{name}: pruned host logits differ from the generic path by {diff}");

        // Masked (generic, hard gates) = pruned (host).
        let (d, ff) = hidden_and_intermediate(model.as_ref());
        let gates: Vec<_> = plan.layers.iter().map(|l| BlockGates::from_indices(l, d, ff, &device)).collect();
        let masked = logits(model.as_ref(), &dir, Some(&gates));
        let diff = max_abs_diff(&host, &masked);
        println!("{name}: max |masked - host pruned| = {diff:.3e}");
        assert!(diff <= 1e-5, "{name}: masked vs host-pruned differ by {diff}");
        // The plan changes the function, so the comparisons above are not vacuous.
        assert!(max_abs_diff(&host, &logits(model.as_ref(), &dir, None)) > 1e-2, "{name}: the plan left the logits unchanged");
    }
}

#[test]
fn a_host_prefill_fills_the_cache_the_generic_decoder_reads() {
    for name in FIXTURES {
        check_cached_decoding(name);
    }
}
