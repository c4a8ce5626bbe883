//! The exported folders compute the same function as the in-memory pruned model, are smaller by
//! exactly the removed parameters, and bad folders are rejected with one-line errors.

#[path = "../../disp-models/tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::path::Path;

use common::{fixture, load, logits, max_abs_diff, random_plan};
use disp_core::selection::BlockGates;
use disp_core::selection::Site;
use disp_export::{export, ExportFormat};
use disp_models::pruned_folder::{index_tensor_name, read_plan};
use safetensors::SafeTensors;

const FAMILY_FIXTURES: &[&str] =
    &["llama_gqa_tied", "llama_mha_untied", "llama_bf16", "llama_sharded", "opt_pre_ln", "opt_post_ln_proj", "phi", "qwen2", "qwen3", "mistral"];

fn load_dir(dir: &Path) -> Box<dyn disp_models::CausalLm> {
    disp_models::load_model(dir, &burn::tensor::Device::flex()).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
}

fn load_error(dir: &Path) -> String {
    match disp_models::load_model(dir, &burn::tensor::Device::flex()) {
        Ok(_) => panic!("{} loaded, expected an error", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn pruned_export_reloads_to_the_same_function_and_is_smaller_by_the_removed_parameters() {
    for name in FAMILY_FIXTURES {
        let (model, device) = load(name);
        let plan = random_plan(model.as_ref(), 11);
        let in_memory = model.prune(&plan).unwrap();
        let expected = logits(in_memory.as_ref(), &fixture(name), None);

        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("pruned");
        let summary = export(&fixture(name), &plan, ExportFormat::Pruned, &out).unwrap();
        let reloaded = load_dir(&out);
        assert!(reloaded.is_pruned(), "{name}");
        assert_eq!(reloaded.stored_linear_params(), in_memory.stored_linear_params(), "{name}");
        // Same stored values, same operations: bit-identical.
        assert_eq!(logits(reloaded.as_ref(), &fixture(name), None), expected, "{name}");

        // The masked dense model agrees too (the method's central equivalence).
        let (hidden, inter) = common::hidden_and_intermediate(model.as_ref());
        let gates: Vec<BlockGates> = plan.layers.iter().map(|l| BlockGates::from_indices(l, hidden, inter, &device)).collect();
        let masked = logits(model.as_ref(), &fixture(name), Some(&gates));
        assert!(max_abs_diff(&masked, &expected) <= 1e-5, "{name}");

        // The file holds exactly the parameters the plan's accounting says were removed.
        assert_eq!(summary.source_params - summary.stored_params, plan.dense_params - plan.pruned_params, "{name}");
        let back = read_plan(&out).unwrap().expect("a pruned folder has a plan");
        assert_eq!(back.layers, plan.layers, "{name}");
        assert_eq!(back.model.fingerprint.as_deref(), Some(summary.source_fingerprint.as_str()));
        let companion = |dir: &Path| std::fs::read(dir.join("generation_config.json")).unwrap();
        assert_eq!(companion(&out), companion(&fixture(name)), "{name}: generation_config.json copied as is");
    }
}

#[test]
fn both_formats_copy_the_tokenizer_files_byte_for_byte() {
    // The fixtures have no tokenizer: give a copy of one the byte tokenizer and a chat template.
    let tmp = tempfile::tempdir().unwrap();
    let source = tmp.path().join("source");
    std::fs::create_dir(&source).unwrap();
    for entry in std::fs::read_dir(fixture("llama_gqa_tied")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), source.join(entry.file_name())).unwrap();
    }
    std::fs::copy(fixture("byte_tokenizer.json"), source.join("tokenizer.json")).unwrap();
    std::fs::write(source.join("chat_template.jinja"), "{% for m in messages %}{{ m['content'] }}{% endfor %}").unwrap();
    let (model, _) = load("llama_gqa_tied");
    let plan = random_plan(model.as_ref(), 3);
    for (format, folder) in [(ExportFormat::Pruned, "pruned"), (ExportFormat::DenseEquivalent, "dense")] {
        let out = tmp.path().join(folder);
        export(&source, &plan, format, &out).unwrap();
        for file in ["tokenizer.json", "chat_template.jinja", "generation_config.json"] {
            assert_eq!(std::fs::read(out.join(file)).unwrap(), std::fs::read(source.join(file)).unwrap(), "{folder}: {file}");
        }
    }
}

#[test]
fn dense_equivalent_export_is_a_stock_checkpoint_with_the_pruned_function() {
    for name in FAMILY_FIXTURES {
        let (model, _) = load(name);
        let plan = random_plan(model.as_ref(), 5);
        let expected = logits(model.prune(&plan).unwrap().as_ref(), &fixture(name), None);
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("dense");
        let summary = export(&fixture(name), &plan, ExportFormat::DenseEquivalent, &out).unwrap();
        assert_eq!(summary.stored_params, summary.source_params, "{name}: same shapes as the source");
        assert!(read_plan(&out).unwrap().is_none(), "{name}: no disp section, so it loads as a dense model");
        let dense = load_dir(&out);
        assert!(!dense.is_pruned());
        let got = logits(dense.as_ref(), &fixture(name), None);
        assert!(max_abs_diff(&got, &expected) <= 1e-5, "{name}: {}", max_abs_diff(&got, &expected));
    }
}

#[test]
fn keeps_the_source_dtype() {
    let (model, _) = load("llama_bf16");
    let plan = random_plan(model.as_ref(), 3);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16");
    let summary = export(&fixture("llama_bf16"), &plan, ExportFormat::Pruned, &out).unwrap();
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let q = st.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.dtype(), safetensors::Dtype::BF16);
    assert_eq!(q.shape()[1], plan.layers[0].attn_in.len());
    // bf16 halves the bytes per stored value (index sets and header are small).
    assert!(summary.weight_bytes < summary.stored_params * 2 + 64 * 1024, "{summary:?}");
}

/// Copies an export, replacing tensors (name → I64 values) and editing the config.
fn tamper(source: &Path, replace: &HashMap<String, Vec<i64>>, edit_config: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        match replace.get(&name) {
            Some(values) => {
                let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                owned.push((name, safetensors::Dtype::I64, vec![values.len()], data));
            }
            None => owned.push((name, view.dtype(), view.shape().to_vec(), view.data().to_vec())),
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        owned.iter().map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).unwrap()).unwrap();
    edit_config(&mut config);
    std::fs::write(out.join("config.json"), config.to_string()).unwrap();
    tmp
}

#[test]
fn rejects_corrupt_or_inconsistent_exports_with_one_line_errors() {
    let (model, _) = load("llama_gqa_tied");
    let plan = random_plan(model.as_ref(), 7);
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    export(&fixture("llama_gqa_tied"), &plan, ExportFormat::Pruned, &good).unwrap();
    let attn_in = index_tensor_name(0, Site::AttnIn);
    let kept: Vec<i64> = plan.layers[0].attn_in.iter().map(|&i| i as i64).collect();
    let hidden = plan.model.hidden_size as i64;

    let check = |dir: tempfile::TempDir, expected: &[&str]| {
        let err = load_error(dir.path());
        assert!(!err.contains('\n'), "one line: {err}");
        for part in expected {
            assert!(err.contains(part), "'{part}' not in: {err}");
        }
    };

    // Truncated weight file.
    let truncated = tamper(&good, &HashMap::new(), |_| {});
    let weights = truncated.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    check(truncated, &["model.safetensors", "corrupt or truncated"]);

    // An index out of range (same count, so the shapes still agree).
    let mut out_of_range = kept.clone();
    *out_of_range.last_mut().unwrap() = hidden;
    check(tamper(&good, &HashMap::from([(attn_in.clone(), out_of_range)]), |_| {}), &["layer 0 S1", "out of range"]);

    // Unsorted / duplicated.
    let mut duplicated = kept.clone();
    duplicated[1] = duplicated[0];
    check(tamper(&good, &HashMap::from([(attn_in.clone(), duplicated)]), |_| {}), &["layer 0 S1", "strictly increasing"]);

    // A negative position.
    let mut negative = kept.clone();
    negative[0] = -1;
    check(tamper(&good, &HashMap::from([(attn_in.clone(), negative)]), |_| {}), &[&attn_in, "not a position"]);

    // Unknown format version.
    check(tamper(&good, &HashMap::new(), |c| c["disp"]["export_format_version"] = 99.into()), &["config.json", "export_format_version 99"]);

    // Index sets that disagree with the stored tensors: one more kept position than q_proj has columns.
    let missing = (0..hidden).find(|i| !kept.contains(i)).expect("the random plan drops some position");
    let mut longer = kept.clone();
    longer.push(missing);
    longer.sort_unstable();
    let width = longer.len();
    let bigger = tamper(&good, &HashMap::from([(attn_in.clone(), longer)]), |c| c["disp"]["layer_widths"][0][0] = width.into());
    check(bigger, &["model.layers.0.self_attn.q_proj.weight", "cut to the index sets"]);

    // Widths in the config that disagree with the index tensors.
    check(tamper(&good, &HashMap::new(), |c| c["disp"]["layer_widths"][0][0] = 1.into()), &[&attn_in, "shape"]);
}

#[test]
fn refuses_bad_exports_without_leaving_output() {
    let (model, _) = load("llama_gqa_tied");
    let plan = random_plan(model.as_ref(), 2);
    let root = tempfile::tempdir().unwrap();

    // A plan for another family.
    let out = root.path().join("opt");
    let err = format!("{:#}", export(&fixture("opt_pre_ln"), &plan, ExportFormat::Pruned, &out).unwrap_err());
    assert!(err.contains("the plan is for a llama model, this checkpoint is opt"), "{err}");
    assert!(!out.exists());

    // An index set out of range for the checkpoint.
    let mut bad = plan.clone();
    bad.layers[1].mlp_inter.push(1_000_000);
    let out = root.path().join("bad");
    let err = format!("{:#}", export(&fixture("llama_gqa_tied"), &bad, ExportFormat::Pruned, &out).unwrap_err());
    assert!(err.contains("plan layer 1 S4") && err.contains("out of range"), "{err}");
    assert!(!out.exists());

    // Exporting an export.
    let first = root.path().join("first");
    export(&fixture("llama_gqa_tied"), &plan, ExportFormat::Pruned, &first).unwrap();
    let err = format!("{:#}", export(&first, &plan, ExportFormat::Pruned, &root.path().join("second")).unwrap_err());
    assert!(err.contains("already a pruned folder"), "{err}");

    // A non-empty destination is left alone.
    let err = format!("{:#}", export(&fixture("llama_gqa_tied"), &plan, ExportFormat::Pruned, &first).unwrap_err());
    assert!(err.contains("not empty"), "{err}");
    let leftovers: Vec<_> = std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "no staging folders left behind: {leftovers:?}");
}

/// `tests/fixtures/dense_equivalent/` holds seeded random plans and the logits HF transformers
/// computed on their dense-equivalent exports with its stock classes
/// (`make_dense_equivalent_reference.py`). Those must equal disp's pruned model, and the parameter
/// counts the script took from the tensors must equal disp's accounting.
#[test]
fn dense_equivalent_matches_hf_transformers() {
    let reference_dir = common::fixtures_dir().join("dense_equivalent");
    for name in ["llama_gqa_tied", "llama_bf16", "opt_pre_ln", "opt_post_ln_proj", "phi", "qwen2", "qwen3", "mistral"] {
        let plan = disp_core::plan::PruningPlan::load(&reference_dir.join(format!("{name}.plan.json"))).unwrap();
        let (model, device) = load(name);
        let shape = model.model_shape();
        assert_eq!(plan.dense_params, shape.dense_total_params(), "{name}: dense parameter count");
        assert_eq!(plan.pruned_params, shape.total_params(&plan.widths()), "{name}: pruned parameter count");

        let bytes = std::fs::read(reference_dir.join(format!("{name}.logits.safetensors"))).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let ids = st.tensor("input_ids").unwrap();
        let ids_f32: Vec<f32> = ids.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32).collect();
        let hf: Vec<f32> = st.tensor("logits").unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let tokens = common::token_tensor(ids.shape(), &ids_f32, &device);

        let pruned = model.prune(&plan).unwrap();
        let ours = common::to_vec(pruned.forward(tokens.clone(), None, None));
        let diff = max_abs_diff(&ours, &hf);
        eprintln!("{name}: max |logit diff| disp pruned vs HF dense-equivalent {diff:.2e}");
        assert!(diff <= 1e-4, "{name}: pruned model vs HF on the dense-equivalent export: {diff}");

        let out = tempfile::tempdir().unwrap();
        let folder = out.path().join("dense");
        export(&fixture(name), &plan, ExportFormat::DenseEquivalent, &folder).unwrap();
        let reloaded = common::to_vec(load_dir(&folder).forward(tokens, None, None));
        assert!(max_abs_diff(&reloaded, &hf) <= 1e-4, "{name}: disp on the export vs HF");
    }
}
