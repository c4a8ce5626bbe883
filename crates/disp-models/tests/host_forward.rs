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

/// `--compute bf16` on every family's fixtures, dense and pruned: the logits move (the bf16
/// products are used) but stay within bf16 rounding of the f32 ones, and the summed NLL of
/// evaluation (its head in tiles) equals the one of those bf16 logits.
#[test]
fn bf16_products_stay_within_bf16_rounding_of_the_f32_forward() {
    for name in FIXTURES {
        let (dense, _) = load(name);
        let dir = fixture(name);
        let plan = random_plan(dense.as_ref(), 5);
        for mut model in [disp_models::load_model(&dir, dense.device()).unwrap(), dense.prune(&plan).unwrap()] {
            let f32_logits = logits(model.as_ref(), &dir, None);
            if let Err(e) = model.compute_in_bf16() {
                assert!(!disp_models::host_bf16::fast_kernel_available(), "{name}: {e:#}");
                assert!(e.to_string().contains("AVX512_BF16"), "{name}: {e:#}");
                return;
            }
            let bf16_logits = logits(model.as_ref(), &dir, None);
            let scale = f32_logits.iter().fold(0f32, |m, z| m.max(z.abs()));
            let diff = max_abs_diff(&bf16_logits, &f32_logits);
            println!("{name}: max |bf16 - f32| = {diff:.3e} of logits up to {scale:.3}");
            assert!(diff > 0.0, "{name}: the bf16 products were not used");
            assert!(diff <= 0.02 * scale.max(1.0), "{name}: bf16 logits differ from f32 by {diff} (logits up to {scale})");

            let (shape, ids) = reference(&dir, "input_ids");
            let tokens: Vec<u32> = ids.iter().map(|&t| t as u32).collect();
            let (batch, seq) = (shape[0], shape[1]);
            let summed = model.summed_nll(&tokens, batch).expect("the host path covers the fixture");
            let vocab = model.vocab_size();
            let from_logits: f64 = (0..batch * seq)
                .filter(|position| position % seq != seq - 1)
                .map(|position| {
                    let row = &bf16_logits[position * vocab..][..vocab];
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &z| m.max(z)) as f64;
                    let sum: f64 = row.iter().map(|&z| (z as f64 - max).exp()).sum();
                    max + sum.ln() - row[tokens[position + 1] as usize] as f64
                })
                .sum();
            assert!((summed - from_logits).abs() <= 1e-4 * from_logits.abs(), "{name}: summed NLL {summed} vs {from_logits} from the logits");
        }
    }
}
