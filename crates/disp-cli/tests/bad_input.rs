//! Every input that used to panic, abort, exhaust memory or be accepted silently (issue 12's
//! table), each giving a one-line error that names the file (and tensor, field or flag), a
//! non-zero exit and no output; and runs interrupted with `kill -9`, which leave nothing at the
//! output path and are cleaned up or resumed exactly by the next run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use disp_models::gguf::GgmlType;

mod common;

use common::{assert_one_line_error, disp, fixture, model_copy, s, Outcome};

/// About 3 KB of text (2950 bytes, as these tests have always used).
fn text_file(dir: &Path) -> PathBuf {
    common::text_file(dir, 2950)
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(path, json.to_string()).unwrap();
}

/// Overwrites the first value of F32 tensor `tensor` in `dir/model.safetensors`.
fn set_first_value(dir: &Path, tensor: &str, value: f32) {
    let path = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    assert_eq!(header[tensor]["dtype"], "F32");
    let start = 8 + header_len + header[tensor]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[start..start + 4].copy_from_slice(&value.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
}

fn eval_ppl(model: &Path, text: &Path, extra: &[&str]) -> Outcome {
    disp(&[&["eval", "ppl", "--model", s(model), "--text", s(text), "--seq-len", "16"], extra].concat())
}

/// A uniform-magnitude plan of `model` at `path`.
fn uniform_plan(model: &Path, path: &Path) {
    let out = disp(&["prune", "--model", s(model), "--ratio", "0.2", "--method", "uniform-magnitude", "--out", s(path)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
}

// ---- GGUF headers -------------------------------------------------------------------------

fn convert(writer: &disp_models::gguf::writer::GgufWriter, dir: &Path) -> (Outcome, PathBuf) {
    let input = dir.join("in.gguf");
    writer.write(&input).unwrap();
    let out = dir.join("converted");
    (disp(&["convert-gguf", s(&input), s(&out)]), out)
}

#[test]
fn gguf_block_count_beyond_its_tensors_is_refused_before_anything_is_allocated() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = disp_fuzz::targets::tiny_llama_gguf(GgmlType::F32, false).unwrap();
    let (out, converted) = convert(&w, tmp.path());
    assert_eq!(out.code, 0, "the unchanged file converts: {}", out.stderr);
    std::fs::remove_dir_all(&converted).unwrap();

    w.metadata("llama.block_count", 1u32 << 31);
    let (out, converted) = convert(&w, tmp.path());
    assert_one_line_error(&out, &["in.gguf", "llama.block_count = 2147483648", "the file has 11 tensors"]);
    assert!(!converted.exists());
}

#[test]
fn gguf_context_length_zero_and_a_merge_outside_the_vocabulary_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = disp_fuzz::targets::tiny_llama_gguf(GgmlType::Q8_0, true).unwrap();
    w.metadata("llama.context_length", 0u32);
    let (out, converted) = convert(&w, tmp.path());
    assert_one_line_error(&out, &["in.gguf", "llama.context_length is 0"]);
    assert!(!converted.exists());

    let mut w = disp_fuzz::targets::tiny_llama_gguf(GgmlType::F32, false).unwrap();
    w.metadata("tokenizer.ggml.merges", vec!["Ġ x".to_string()]);
    let (out, converted) = convert(&w, tmp.path());
    assert_one_line_error(&out, &["in.gguf", "tokenizer.ggml.merges", "\"Ġx\", which is not in the vocabulary"]);
    assert!(!converted.exists());
}

// ---- config.json ---------------------------------------------------------------------------

#[test]
fn zero_attention_or_key_value_heads_are_refused() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path());
    for key in ["num_key_value_heads", "num_attention_heads"] {
        std::fs::copy(fixture("llama_gqa_tied/config.json"), model.join("config.json")).unwrap();
        edit_json(&model.join("config.json"), |c| c[key] = 0.into());
        assert_one_line_error(&eval_ppl(&model, &text, &[]), &["config.json", &format!("'{key}' is 0; it must be at least 1")]);
    }
}

#[test]
fn a_layer_count_the_weights_cannot_hold_is_refused_for_every_family() {
    for family in ["llama_gqa_tied", "opt_pre_ln", "phi"] {
        let (tmp, model) = model_copy(family);
        let text = text_file(tmp.path());
        edit_json(&model.join("config.json"), |c| c["num_hidden_layers"] = 10_000_000.into());
        let out = eval_ppl(&model, &text, &[]);
        assert_one_line_error(&out, &["config.json", "num_hidden_layers = 10000000 but the weight files hold only"]);
    }
}

#[test]
fn zero_layers_and_a_zero_rope_base_are_refused() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path());
    edit_json(&model.join("config.json"), |c| c["num_hidden_layers"] = 0.into());
    assert_one_line_error(&eval_ppl(&model, &text, &[]), &["config.json", "'num_hidden_layers' is 0"]);

    // Nested (transformers 5) and top-level spellings of the RoPE base.
    std::fs::copy(fixture("llama_gqa_tied/config.json"), model.join("config.json")).unwrap();
    edit_json(&model.join("config.json"), |c| c["rope_parameters"]["rope_theta"] = 0.into());
    assert_one_line_error(&eval_ppl(&model, &text, &[]), &["config.json", "'rope_theta' must be a positive number, got 0"]);
    let (_tmp, phi) = model_copy("phi");
    edit_json(&phi.join("config.json"), |c| c["rope_theta"] = 0.0.into());
    assert_one_line_error(&eval_ppl(&phi, &text, &[]), &["config.json", "'rope_theta' must be a positive number"]);
}

// ---- flags ---------------------------------------------------------------------------------

#[test]
fn window_lengths_below_two_are_refused() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path());
    for len in ["0", "1"] {
        let out = disp(&["eval", "ppl", "--model", s(&model), "--text", s(&text), "--seq-len", len]);
        assert_one_line_error(&out, &[&format!("--seq-len must be at least 2 (a window predicts each token from the ones before it), got {len}")]);
    }
    let plan = tmp.path().join("plan.json");
    let out = disp(&["prune", "--model", s(&model), "--ratio", "0.2", "--data", s(&text), "--seq-len", "0", "--out", s(&plan)]);
    assert_one_line_error(&out, &["--seq-len must be at least 2"]);
    assert!(!plan.exists());
}

#[test]
fn a_batch_size_beyond_memory_is_refused_before_the_search() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path());
    let plan = tmp.path().join("plan.json");
    let out = disp(&[
        "prune",
        "--model",
        s(&model),
        "--ratio",
        "0.2",
        "--data",
        s(&text),
        "--seq-len",
        "16",
        "--steps",
        "2",
        "--batch-size",
        "10000000",
        "--out",
        s(&plan),
    ]);
    assert_one_line_error(
        &out,
        &["--batch-size 10000000 --seq-len 16", "a search step of 160000000 tokens", "needs", "beyond the loaded weights", "of memory are available"],
    );
    assert!(!plan.exists());
}

#[test]
fn a_negative_ratio_gets_the_ratio_message() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let plan = tmp.path().join("plan.json");
    let out = disp(&["prune", "--model", s(&model), "--ratio", "-0.1", "--method", "uniform-magnitude", "--out", s(&plan)]);
    assert_one_line_error(&out, &["--ratio must be strictly between 0 and 1, got -0.1"]);
    assert!(!plan.exists());
}

#[test]
fn generation_flags_are_checked_before_anything_is_emitted() {
    let (_tmp, model) = model_copy("llama_gqa_tied");
    let generate = |extra: &[&str]| disp(&[&["generate", "--model", s(&model), "--prompt", "It is"], extra].concat());
    let out = generate(&["--max-tokens", "0"]);
    assert_one_line_error(&out, &["--max-tokens must be at least 1"]);
    assert!(out.stdout.is_empty(), "nothing generated: {:?}", out.stdout);
    assert_one_line_error(&generate(&["--temperature", "NaN"]), &["--temperature must be a finite number", "got NaN"]);
    assert_one_line_error(&generate(&["--temperature", "-1"]), &["--temperature must be a finite number", "got -1"]);
    for top_p in ["0", "1.5", "NaN"] {
        assert_one_line_error(&generate(&["--temperature", "0.8", "--top-p", top_p]), &["--top-p must be in (0, 1]"]);
    }
    let out = generate(&["--temperature", "0.8", "--top-p", "1", "--max-tokens", "2"]);
    assert_eq!(out.code, 0, "the edges of the ranges are accepted: {}", out.stderr);
}

#[test]
fn prune_export_into_a_used_folder_fails_before_the_search() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path());
    let plan = tmp.path().join("plan.json");
    let occupied = tmp.path().join("occupied");
    std::fs::create_dir(&occupied).unwrap();
    std::fs::write(occupied.join("keep.txt"), "mine").unwrap();
    // 100000 steps would take hours: only a check before the search can return at once.
    let out = disp(&[
        "prune",
        "--model",
        s(&model),
        "--ratio",
        "0.2",
        "--data",
        s(&text),
        "--seq-len",
        "16",
        "--steps",
        "100000",
        "--out",
        s(&plan),
        "--export",
        s(&occupied),
    ]);
    assert_one_line_error(&out, &["--export", "occupied", "not empty"]);
    assert!(!plan.exists());
    assert_eq!(std::fs::read_dir(&occupied).unwrap().count(), 1, "left alone");
}

// ---- tokenizer.json ------------------------------------------------------------------------

#[test]
fn a_tokenizer_merge_outside_the_vocabulary_is_an_error_naming_the_file() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path());
    // "Ġ" and "t" are byte symbols; "Ġt" is not in the byte vocabulary (the tokenizers crate
    // panicked building this merge).
    edit_json(&model.join("tokenizer.json"), |t| t["model"]["merges"] = serde_json::json!(["Ġ t"]));
    let out = eval_ppl(&model, &text, &[]);
    assert_one_line_error(&out, &["tokenizer.json: invalid tokenizer", "\"Ġt\", which is not in the vocabulary"]);
    edit_json(&model.join("tokenizer.json"), |t| t["model"]["merges"] = serde_json::json!([["Ġ", "zz"]]));
    let out = disp(&["generate", "--model", s(&model), "--prompt", "It is"]);
    assert_one_line_error(&out, &["tokenizer.json: invalid tokenizer", "\"zz\" is not in the vocabulary"]);
}

// ---- NaN / Inf weights ---------------------------------------------------------------------

#[test]
fn a_non_finite_weight_is_named_by_every_command() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path());
    let plan = tmp.path().join("plan.json");
    uniform_plan(&model, &plan);
    let tensor = "model.layers.1.mlp.down_proj.weight";
    set_first_value(&model, tensor, f32::NAN);
    let needles = ["model.safetensors: tensor 'model.layers.1.mlp.down_proj.weight' holds NaN at flat index 0; weights must be finite"];
    let exported = tmp.path().join("exported");
    let new_plan = tmp.path().join("new-plan.json");
    let commands: Vec<Vec<&str>> = vec![
        vec!["eval", "ppl", "--model", s(&model), "--text", s(&text), "--seq-len", "16"],
        vec!["generate", "--model", s(&model), "--prompt", "It is"],
        vec!["inspect", s(&model)],
        vec!["export", "--model", s(&model), "--plan", s(&plan), "--out", s(&exported)],
        vec!["prune", "--model", s(&model), "--ratio", "0.2", "--method", "uniform-magnitude", "--out", s(&new_plan)],
        vec![
            "prune",
            "--model",
            s(&model),
            "--ratio",
            "0.2",
            "--method",
            "uniform-wanda",
            "--data",
            s(&text),
            "--seq-len",
            "16",
            "--out",
            s(&new_plan),
        ],
    ];
    for args in commands {
        let out = disp(&args);
        assert_one_line_error(&out, &needles);
    }
    assert!(!exported.exists() && !new_plan.exists());
    set_first_value(&model, tensor, f32::INFINITY);
    assert_one_line_error(&eval_ppl(&model, &text, &[]), &["holds inf at flat index 0"]);
}

// ---- plans given to export -----------------------------------------------------------------

#[test]
fn export_checks_the_plan_header_and_names_the_plan() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let plan = tmp.path().join("plan.json");
    let out_dir = tmp.path().join("exported");
    uniform_plan(&model, &plan);
    let good = std::fs::read_to_string(&plan).unwrap();
    let export = || disp(&["export", "--model", s(&model), "--plan", s(&plan), "--out", s(&out_dir)]);

    edit_json(&plan, |p| p["format_version"] = 99.into());
    assert_one_line_error(&export(), &["plan.json: unknown plan format version 99"]);
    std::fs::write(&plan, &good).unwrap();
    edit_json(&plan, |p| p["model"]["hidden_size"] = 32.into());
    assert_one_line_error(&export(), &["plan.json: ", "the plan is for hidden_size = 32", "config.json has 64"]);
    std::fs::write(&plan, &good).unwrap();
    edit_json(&plan, |p| p["model"]["num_layers"] = 3.into());
    assert_one_line_error(&export(), &["plan.json: ", "the plan's header says 3 layers but it lists index sets for 2"]);
    assert!(!out_dir.exists());
    std::fs::write(&plan, &good).unwrap();
    assert_eq!(export().code, 0);
}

// ---- search checkpoints --------------------------------------------------------------------

fn prune_with_checkpoint(model: &Path, text: &Path, checkpoint: &Path, plan: &Path, extra: &[&str]) -> Outcome {
    disp(
        &[
            &[
                "prune",
                "--model",
                s(model),
                "--ratio",
                "0.2",
                "--data",
                s(text),
                "--seq-len",
                "16",
                "--steps",
                "2",
                "--checkpoint-every",
                "1",
                "--checkpoint",
                s(checkpoint),
                "--out",
                s(plan),
            ],
            extra,
        ]
        .concat(),
    )
}

#[test]
fn resume_without_the_checkpoint_it_names_is_an_error() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path());
    let plan = tmp.path().join("plan.json");
    let checkpoint = tmp.path().join("missing.ck");
    let out = prune_with_checkpoint(&model, &text, &checkpoint, &plan, &["--resume"]);
    assert_one_line_error(&out, &["missing.ck: --resume: no such checkpoint"]);
    assert!(!plan.exists());
}

#[test]
fn a_damaged_checkpoint_or_one_of_another_model_with_the_same_sizes_is_refused() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path());
    let plan = tmp.path().join("plan.json");
    let checkpoint = tmp.path().join("search.ck");
    let out = prune_with_checkpoint(&model, &text, &checkpoint, &plan, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    std::fs::remove_file(&plan).unwrap();
    let good = std::fs::read(&checkpoint).unwrap();

    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    std::fs::write(&checkpoint, &flipped).unwrap();
    let out = prune_with_checkpoint(&model, &text, &checkpoint, &plan, &["--resume"]);
    assert_one_line_error(&out, &["search.ck: checkpoint is damaged (its SHA-256 checksum does not match its contents)"]);

    // Same sizes, other weights: a fine-tune of the same base, say.
    std::fs::write(&checkpoint, &good).unwrap();
    let (_tmp, other) = model_copy("llama_gqa_tied");
    set_first_value(&other, "model.layers.0.self_attn.o_proj.weight", 0.25);
    let out = prune_with_checkpoint(&other, &text, &checkpoint, &plan, &["--resume"]);
    assert_one_line_error(&out, &["search.ck: checkpoint is for another model of the same sizes (its weights differ)"]);
    assert!(!plan.exists());

    let out = prune_with_checkpoint(&model, &text, &checkpoint, &plan, &["--resume"]);
    assert_eq!(out.code, 0, "the intact checkpoint resumes on its own model: {}", out.stderr);
}

// ---- interruption --------------------------------------------------------------------------

/// Starts `disp args` with the publish hold on, waits until it reports its staged folder, kills
/// it with SIGKILL, and returns the staged folder.
fn kill_before_publish(args: &[&str]) -> PathBuf {
    let mut child = Command::new(env!("CARGO_BIN_EXE_disp"))
        .args(args)
        .env(disp_core::fsutil::HOLD_BEFORE_PUBLISH, "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let line = stderr.lines().next().expect("the run reached its publish step").unwrap();
    let staged = line.strip_prefix("holding ").map(|rest| PathBuf::from(rest.trim_end_matches(" before publishing")));
    child.kill().unwrap();
    child.wait().unwrap();
    staged.unwrap_or_else(|| panic!("unexpected output before the hold: {line}"))
}

fn partial_folders(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.contains(".partial-")).collect()
}

#[test]
fn export_killed_before_publishing_leaves_nothing_and_the_next_run_cleans_up() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let plan = tmp.path().join("plan.json");
    uniform_plan(&model, &plan);
    let out_dir = tmp.path().join("exported");
    let args = ["export", "--model", s(&model), "--plan", s(&plan), "--out", s(&out_dir)];
    let staged = kill_before_publish(&args);
    assert!(staged.join("model.safetensors").is_file(), "killed with the folder written: {}", staged.display());
    assert!(!out_dir.exists(), "nothing at the output path");
    assert_eq!(partial_folders(tmp.path()).len(), 1);

    let out = disp(&args);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out_dir.join("model.safetensors").is_file());
    assert_eq!(partial_folders(tmp.path()), Vec::<String>::new(), "the killed run's folder is gone");
}

#[test]
fn convert_gguf_killed_before_publishing_leaves_nothing_and_the_next_run_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.gguf");
    disp_fuzz::targets::tiny_llama_gguf(GgmlType::Q8_0, false).unwrap().write(&input).unwrap();
    let out_dir = tmp.path().join("converted");
    let args = ["convert-gguf", s(&input), s(&out_dir)];
    let staged = kill_before_publish(&args);
    assert!(staged.join("config.json").is_file());
    assert!(!out_dir.exists());
    assert_eq!(partial_folders(tmp.path()).len(), 1);

    let out = disp(&args);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out_dir.join("model.safetensors").is_file());
    assert_eq!(partial_folders(tmp.path()), Vec::<String>::new());
}

#[test]
fn prune_killed_mid_search_resumes_to_the_same_plan() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path());
    let checkpoint = tmp.path().join("search.ck");
    let resumed = tmp.path().join("resumed.json");
    let search = |plan: &Path| -> Vec<String> {
        [
            "prune",
            "--model",
            s(&model),
            "--ratio",
            "0.2",
            "--data",
            s(&text),
            "--seq-len",
            "16",
            "--steps",
            "300",
            "--checkpoint-every",
            "1",
            "--learning-rate",
            "1e-2",
            "--out",
            s(plan),
        ]
        .map(String::from)
        .to_vec()
    };
    let mut args = search(&resumed);
    args.extend(["--checkpoint".into(), s(&checkpoint).into()]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_disp")).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    // Killed as soon as the first checkpoint exists: mid-search whatever the machine's speed.
    while !checkpoint.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the search ended ({status}) before writing a checkpoint");
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!resumed.exists(), "the search finished before it was killed; give it more steps");

    args.push("--resume".into());
    let out = Command::new(env!("CARGO_BIN_EXE_disp")).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let uninterrupted = tmp.path().join("uninterrupted.json");
    let out = Command::new(env!("CARGO_BIN_EXE_disp")).args(search(&uninterrupted)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&resumed).unwrap(), std::fs::read(&uninterrupted).unwrap(), "byte-identical plans");
}

// ---- recovery fine-tuning and prompt files -------------------------------------------------

#[test]
fn finetune_and_prompt_file_errors_are_one_line_and_write_nothing() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path());
    let plan = tmp.path().join("plan.json");
    uniform_plan(&model, &plan);
    let pruned = tmp.path().join("pruned");
    assert_eq!(disp(&["export", "--model", s(&model), "--plan", s(&plan), "--out", s(&pruned)]).code, 0);
    let out = tmp.path().join("out");
    let finetune = |extra: &[&str]| {
        let mut args = vec!["finetune", "--model", s(&pruned), "--data", s(&text), "--steps", "2", "--seq-len", "16", "--out", s(&out)];
        args.extend_from_slice(extra);
        disp(&args)
    };
    assert_one_line_error(&finetune(&["--rank", "0"]), &["--rank must be at least 1"]);
    assert_one_line_error(&finetune(&["--rank", "100000"]), &["--rank 100000 is larger than the q linear of block 0"]);
    assert_one_line_error(&finetune(&["--eval", s(&text)]), &["is also an evaluation file of this run"]);
    assert_one_line_error(&finetune(&["--loss", "kd"]), &["--loss kd needs --teacher DENSE_DIR"]);
    assert_one_line_error(&finetune(&["--teacher", s(&pruned), "--loss", "kd"]), &["the teacher must be the dense model"]);
    let dense = disp(&["finetune", "--model", s(&model), "--data", s(&text), "--steps", "2", "--seq-len", "16", "--out", s(&out)]);
    assert_one_line_error(&dense, &["not a pruned folder"]);
    let zero = disp(&["finetune", "--model", s(&pruned), "--data", s(&text), "--steps", "0", "--seq-len", "16", "--out", s(&out)]);
    assert_one_line_error(&zero, &["--steps must be at least 1"]);
    assert!(!out.exists(), "no partial output");

    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"Hi\"}\n{\"text\": \"no prompt\"}\n").unwrap();
    let calib = tmp.path().join("calib.txt");
    let generated = disp(&["generate", "--model", s(&model), "--prompts", s(&prompts), "--out", s(&calib), "--max-tokens", "4"]);
    assert_one_line_error(&generated, &["prompts.jsonl:2: no \"prompt\" string"]);
    assert!(!calib.exists());
    let chat = disp(&["eval", "chat", "--model", s(&model), "--reference", s(&model), "--prompts", s(&prompts), "--raw"]);
    assert_one_line_error(&chat, &["prompts.jsonl:2"]);
}
