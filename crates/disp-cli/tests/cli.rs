//! The `disp` binary end to end on tiny fixtures: it runs, and bad input gets a one-line error
//! that names the file, a non-zero exit, and no partial output.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// GPT-2's reversible byte → printable character table.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut chars = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars[b as usize] = char::from_u32(256 + extra).unwrap();
            extra += 1;
        } else {
            chars[b as usize] = char::from_u32(b).unwrap();
        }
    }
    chars
}

/// A byte-level tokenizer whose 256 ids are the 256 bytes: fits the fixtures' vocab of 256.
fn byte_tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> =
        byte_chars().into_iter().enumerate().map(|(i, c)| (c.to_string(), i.into())).collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
    })
    .to_string()
}

/// A copy of a fixture model with a byte tokenizer, in a fresh temporary folder.
fn model_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    std::fs::write(dir.join("tokenizer.json"), byte_tokenizer_json()).unwrap();
    (tmp, dir)
}

fn text_file(dir: &Path, bytes: usize) -> PathBuf {
    let sentence = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. ";
    let text: String = sentence.chars().cycle().take(bytes).collect();
    let path = dir.join("text.txt");
    std::fs::write(&path, text).unwrap();
    path
}

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

fn disp(args: &[&str]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_disp")).args(args).output().expect("runs");
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Fails unless the command failed with exactly one error line containing every `needle`.
fn assert_one_line_error(out: &Outcome, needles: &[&str]) {
    assert_ne!(out.code, 0, "expected failure, got success: {}", out.stdout);
    let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {:?}", out.stderr);
    for needle in needles {
        assert!(lines[0].contains(needle), "error {:?} does not mention {needle:?}", lines[0]);
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn eval_ppl_runs_and_reports_json() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path(), 2000);
    let out = disp(&["eval", "ppl", "--model", s(&model), "--text", s(&text), "--seq-len", "64", "--max-windows", "3", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let json: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    assert_eq!(json["windows"], 3);
    assert_eq!(json["predicted_tokens"], 3 * 63);
    let ppl = json["perplexity"].as_f64().unwrap();
    // A random model over 256 bytes is roughly uniform: perplexity near the vocab size, far
    // from 1 and finite.
    assert!(ppl > 20.0 && ppl < 5000.0, "perplexity {ppl}");
}

#[test]
fn generate_is_deterministic_when_greedy() {
    let (_tmp, model) = model_copy("llama_mha_untied");
    let args = ["generate", "--model", s(&model), "--prompt", "Emma Woodhouse", "--max-tokens", "8"];
    let first = disp(&args);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(first.stdout, disp(&args).stdout);
}

#[test]
fn missing_config_is_reported() {
    let (_tmp, model) = model_copy("llama_gqa_tied");
    std::fs::remove_file(model.join("config.json")).unwrap();
    let out = disp(&["generate", "--model", s(&model), "--prompt", "x"]);
    assert_one_line_error(&out, &["config.json", "cannot read"]);
}

#[test]
fn malformed_config_is_reported() {
    let (_tmp, model) = model_copy("llama_gqa_tied");
    std::fs::write(model.join("config.json"), "{\"model_type\": \"llama\",").unwrap();
    let out = disp(&["generate", "--model", s(&model), "--prompt", "x"]);
    assert_one_line_error(&out, &["config.json", "malformed JSON"]);
    std::fs::write(model.join("config.json"), "{\"model_type\": \"llama\"}").unwrap();
    let out = disp(&["generate", "--model", s(&model), "--prompt", "x"]);
    assert_one_line_error(&out, &["config.json", "invalid LLaMA config", "hidden_size"]);
}

#[test]
fn unsupported_architecture_is_reported() {
    let (_tmp, model) = model_copy("llama_gqa_tied");
    std::fs::write(model.join("config.json"), r#"{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}"#).unwrap();
    let out = disp(&["generate", "--model", s(&model), "--prompt", "x"]);
    assert_one_line_error(&out, &["config.json", "unsupported architecture 'gpt2'"]);
}

#[test]
fn truncated_safetensors_is_reported() {
    let (_tmp, model) = model_copy("llama_gqa_tied");
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let out = disp(&["generate", "--model", s(&model), "--prompt", "x"]);
    assert_one_line_error(&out, &["model.safetensors", "corrupt or truncated"]);
}

#[test]
fn wrong_shape_and_missing_tensor_are_reported() {
    let (_tmp, model) = model_copy("llama_gqa_tied");
    let config = model.join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["intermediate_size"] = 96.into();
    std::fs::write(&config, json.to_string()).unwrap();
    let out = disp(&["generate", "--model", s(&model), "--prompt", "x"]);
    assert_one_line_error(&out, &["model.safetensors", "mlp.gate_proj.weight", "has shape [128, 64], expected [96, 64]"]);
    json["intermediate_size"] = 128.into();
    json["num_hidden_layers"] = 3.into();
    std::fs::write(&config, json.to_string()).unwrap();
    let out = disp(&["generate", "--model", s(&model), "--prompt", "x"]);
    assert_one_line_error(&out, &["model.safetensors", "missing tensor 'model.layers.2.input_layernorm.weight'"]);
}

#[test]
fn empty_or_short_text_is_reported() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let out = disp(&["eval", "ppl", "--model", s(&model), "--text", s(&empty)]);
    assert_one_line_error(&out, &["empty.txt", "empty text file"]);
    let short = text_file(tmp.path(), 100);
    let out = disp(&["eval", "ppl", "--model", s(&model), "--text", s(&short), "--seq-len", "512"]);
    assert_one_line_error(&out, &["text.txt", "shorter than one window of 512"]);
}

#[test]
fn device_without_its_feature_is_an_error() {
    let (_tmp, model) = model_copy("llama_gqa_tied");
    let out = disp(&["--device", "cuda", "generate", "--model", s(&model), "--prompt", "x"]);
    if cfg!(not(feature = "cuda")) {
        assert_one_line_error(&out, &["device 'cuda' is not compiled into this build"]);
    }
}

#[test]
fn prune_then_evaluate_the_plan() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path(), 3000);
    let plan = tmp.path().join("plan.json");
    let out = disp(&[
        "prune", "--model", s(&model), "--ratio", "0.2", "--ratio-of", "blocks", "--data", s(&text), "--steps", "3",
        "--seq-len", "32", "--out", s(&plan),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    assert_eq!(json["method"], "disp");
    assert_eq!(json["layers"].as_array().unwrap().len(), 2);
    let out = disp(&["eval", "ppl", "--model", s(&model), "--plan", s(&plan), "--text", s(&text), "--seq-len", "32", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);

    let uniform = tmp.path().join("uniform.json");
    let out = disp(&["prune", "--model", s(&model), "--ratio", "0.2", "--method", "uniform-magnitude", "--out", s(&uniform)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&uniform).unwrap()).unwrap();
    let achieved = json["achieved_ratio"].as_f64().unwrap();
    assert!((achieved - 0.2).abs() < 0.05, "uniform plan removed {achieved}");
}

#[test]
fn prune_rejects_bad_arguments_without_writing_a_plan() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path(), 3000);
    let plan = tmp.path().join("plan.json");
    let base = ["prune", "--model", s(&model), "--data", s(&text), "--seq-len", "32", "--out", s(&plan)];
    let with = |extra: &[&str]| disp(&[&base[..], extra].concat());
    assert_one_line_error(&with(&["--ratio", "0", "--steps", "2"]), &["--ratio must be strictly between 0 and 1"]);
    assert_one_line_error(&with(&["--ratio", "1.5", "--steps", "2"]), &["--ratio must be strictly between 0 and 1"]);
    // The tiny model's embeddings and head are most of its parameters.
    assert_one_line_error(&with(&["--ratio", "0.9", "--steps", "2"]), &["more than all block weights"]);
    assert_one_line_error(&with(&["--ratio", "0.2", "--steps", "0"]), &["--steps must be at least 1"]);
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, " \n").unwrap();
    let out = disp(&["prune", "--model", s(&model), "--ratio", "0.2", "--ratio-of", "blocks", "--data", s(&empty), "--out", s(&plan)]);
    assert_one_line_error(&out, &["empty.txt", "empty text file"]);
    assert!(!plan.exists(), "a failed prune left a plan behind");
}

#[test]
fn a_plan_for_another_model_is_refused() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let (_tmp2, other) = model_copy("llama_mha_untied");
    let plan = tmp.path().join("uniform.json");
    let out = disp(&["prune", "--model", s(&other), "--ratio", "0.1", "--method", "uniform-magnitude", "--out", s(&plan)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    json["model"]["intermediate_size"] = 96.into();
    std::fs::write(&plan, json.to_string()).unwrap();
    let text = text_file(tmp.path(), 500);
    let out = disp(&["eval", "ppl", "--model", s(&model), "--plan", s(&plan), "--text", s(&text), "--seq-len", "32"]);
    assert_one_line_error(&out, &["uniform.json", "plan is for a llama model"]);
}

#[test]
fn opt_and_phi_prune_and_evaluate_through_the_same_commands() {
    for family in ["opt_pre_ln", "opt_post_ln_proj", "phi"] {
        let (tmp, model) = model_copy(family);
        let text = text_file(tmp.path(), 3000);
        let plan = tmp.path().join("plan.json");
        let out = disp(&[
            "prune", "--model", s(&model), "--ratio", "0.2", "--ratio-of", "blocks", "--data", s(&text), "--steps", "3",
            "--seq-len", "32", "--out", s(&plan),
        ]);
        assert_eq!(out.code, 0, "{family}: {}", out.stderr);
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
        assert_eq!(json["model"]["model_type"], if family == "phi" { "phi" } else { "opt" });
        let achieved = json["achieved_ratio"].as_f64().unwrap();
        assert!((achieved - 0.2).abs() <= 0.005, "{family}: removed {achieved} of the blocks, target 0.2");
        let out = disp(&["eval", "ppl", "--model", s(&model), "--plan", s(&plan), "--text", s(&text), "--seq-len", "32", "--json"]);
        assert_eq!(out.code, 0, "{family}: {}", out.stderr);
        let out = disp(&["generate", "--model", s(&model), "--plan", s(&plan), "--prompt", "Anne Elliot", "--max-tokens", "4"]);
        assert_eq!(out.code, 0, "{family}: {}", out.stderr);
    }
}
