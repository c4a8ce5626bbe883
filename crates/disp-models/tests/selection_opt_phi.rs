//! The selection layer on OPT (pre- and post-LN) and Phi: all-ones gates are the dense model,
//! hard gates are the pruned model, the parameter accounting equals the tensors actually stored
//! and cut, and bad configs are refused with one line naming config.json.

mod common;

use std::path::Path;

use burn::tensor::Device;
use common::*;
use disp_core::selection::BlockGates;

const FIXTURES: [&str; 3] = ["opt_pre_ln", "opt_post_ln_proj", "phi"];

#[test]
fn all_ones_gates_give_exactly_the_dense_logits() {
    for name in FIXTURES {
        let (model, device) = load(name);
        let (d, ff) = hidden_and_intermediate(model.as_ref());
        let gates: Vec<_> = (0..model.num_layers()).map(|_| BlockGates::ones(d, ff, &device)).collect();
        // Masked runs burn's ops, so the dense reference is burn's too (× 1 is exact there; the
        // host path of the dense model is compared with it in tests/host_forward.rs).
        let dense = disp_models::host_forward::with_generic_path(|| logits(model.as_ref(), &fixture(name), None));
        let masked = logits(model.as_ref(), &fixture(name), Some(&gates));
        // Exact on the CPU; a GPU backend may fuse the gate multiplication into other kernels.
        let diff = max_abs_diff(&dense, &masked);
        assert!(diff <= tolerance(0.0, 1e-5), "{name}: all-ones gates changed the logits by {diff}");
    }
}

#[test]
fn hard_gates_equal_the_pruned_model() {
    for name in FIXTURES {
        for seed in [7, 1234] {
            let (model, device) = load(name);
            let (d, ff) = hidden_and_intermediate(model.as_ref());
            let plan = random_plan(model.as_ref(), seed);
            let gates: Vec<_> = plan.layers.iter().map(|l| BlockGates::from_indices(l, d, ff, &device)).collect();
            let dir = fixture(name);
            let masked = logits(model.as_ref(), &dir, Some(&gates));
            let pruned_model = model.prune(&plan).unwrap();
            assert!(pruned_model.is_pruned());
            let pruned = logits(pruned_model.as_ref(), &dir, None);
            let diff = max_abs_diff(&masked, &pruned);
            println!("{name} seed {seed}: max |masked - pruned| = {diff:.3e}");
            assert!(diff <= tolerance(1e-5, 1e-4), "{name} seed {seed}: masked vs pruned differ by {diff}");
            // A plan that left the function unchanged would make the comparison vacuous.
            let dense = logits(model.as_ref(), &dir, None);
            assert!(max_abs_diff(&dense, &pruned) > 1e-2, "{name}: the random plan left the logits unchanged");
        }
    }
}

#[test]
fn parameter_accounting_equals_the_stored_and_cut_tensors() {
    for name in FIXTURES {
        let (model, _) = load(name);
        let shape = model.model_shape();
        // Every tensor in the file counted once (a tied head is not stored, so not counted).
        let dir = fixture(name);
        let ck = disp_models::Checkpoint::open(&dir).unwrap();
        let in_file: u64 = ck.names().map(|n| ck.shape(n).unwrap().iter().product::<usize>() as u64).sum();
        assert_eq!(in_file, shape.dense_total_params(), "{name}: dense total");
        assert_eq!(model.stored_linear_params() as u64, shape.dense_block_params(), "{name}: dense blocks");
        let plan = random_plan(model.as_ref(), 11);
        let pruned = model.prune(&plan).unwrap();
        assert_eq!(pruned.stored_linear_params() as u64, shape.block_params(&plan.widths()), "{name}: pruned blocks");
        assert!(pruned.stored_linear_params() < model.stored_linear_params(), "{name}: nothing was cut");
        // The structure at full width does not change with pruning.
        assert_eq!(pruned.model_shape(), shape, "{name}: model_shape changed by pruning");
    }
}

#[test]
fn max_positions_is_the_configured_table_length() {
    for (name, expected) in [("opt_pre_ln", 64), ("opt_post_ln_proj", 64), ("phi", 128)] {
        let (model, _) = load(name);
        assert_eq!(model.max_positions(), expected, "{name}");
    }
}

/// Cached decoding (one token at a time after a prefill) reproduces the full forward pass: the
/// learned OPT positions and Phi's rotary offsets must follow the cache.
#[test]
fn cached_decoding_matches_the_full_forward() {
    for name in FIXTURES {
        check_cached_decoding(name);
    }
}

/// Copies a fixture with its config.json edited by `edit`.
fn fixture_with_config(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let src = fixture(name);
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    let err = disp_models::load_model(dir, &Device::flex()).err().expect("bad config accepted");
    format!("{err:#}")
}

fn assert_one_line_naming_config(err: &str, must_contain: &str) {
    println!("{err}");
    assert!(!err.contains('\n'), "not one line: {err}");
    assert!(err.contains("config.json"), "does not name config.json: {err}");
    assert!(err.contains(must_contain), "does not say '{must_contain}': {err}");
}

#[test]
fn bad_configs_are_refused_with_one_line_naming_config_json() {
    let dir = fixture_with_config("opt_pre_ln", |c| c["activation_function"] = "swiglu".into());
    assert_one_line_naming_config(&load_error(dir.path()), "unsupported activation_function 'swiglu'");

    let dir = fixture_with_config("phi", |c| c["hidden_act"] = "mystery".into());
    assert_one_line_naming_config(&load_error(dir.path()), "unsupported hidden_act 'mystery'");

    let dir = fixture_with_config("phi", |c| c["qk_layernorm"] = true.into());
    assert_one_line_naming_config(&load_error(dir.path()), "qk_layernorm is not supported");

    let dir = fixture_with_config("mistral", |c| c["sliding_window"] = 0.into());
    assert_one_line_naming_config(&load_error(dir.path()), "sliding_window must be a positive integer or null");

    let dir = fixture_with_config("qwen2", |c| c["use_sliding_window"] = true.into());
    assert_one_line_naming_config(&load_error(dir.path()), "sliding-window layers (use_sliding_window) are not supported");
}

#[test]
fn configs_in_the_transformers_5_layout_load_the_same_model() {
    // Phi: rope_theta and partial_rotary_factor nested in rope_parameters.
    let dir = fixture_with_config("phi", |c| {
        let obj = c.as_object_mut().unwrap();
        let theta = obj.remove("rope_theta").unwrap();
        let factor = obj.remove("partial_rotary_factor").unwrap();
        obj.remove("rope_scaling");
        obj.insert("rope_parameters".into(), serde_json::json!({"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": factor}));
    });
    let nested = disp_models::load_model(dir.path(), &device()).unwrap();
    let (legacy, _) = load("phi");
    let original = fixture("phi");
    assert_eq!(logits(nested.as_ref(), &original, None), logits(legacy.as_ref(), &original, None));
}

#[test]
fn hub_style_opt_tensor_names_without_the_model_prefix_load() {
    // facebook/opt-* checkpoints name their tensors `decoder.*`, not `model.decoder.*`.
    let src = fixture("opt_pre_ln");
    let dir = fixture_with_config("opt_pre_ln", |_| {});
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().map(|(name, view)| (name.strip_prefix("model.").unwrap_or(&name).to_string(), view)).collect();
    safetensors::serialize_to_file(renamed, None, &dir.path().join("model.safetensors")).unwrap();
    let hub = disp_models::load_model(dir.path(), &device()).unwrap();
    let (saved, _) = load("opt_pre_ln");
    assert_eq!(logits(hub.as_ref(), &src, None), logits(saved.as_ref(), &src, None));
}
