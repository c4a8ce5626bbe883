//! The `disp` binary end to end on tiny fixtures: it runs, and bad input gets a one-line error
//! that names the file, a non-zero exit, and no partial output.

use std::path::{Path, PathBuf};

mod common;

use common::{assert_one_line_error, disp, fixture, model_copy, s, text_file};

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn eval_ppl_reports_transformers_perplexity_as_json() {
    // transformers' perplexity of the same fixture, text and windows (make_eval_reference.py).
    let reference = read_json(&fixture("eval_reference/cli_ppl.json"));
    let (tmp, model) = model_copy(reference["fixture"].as_str().unwrap());
    let text = text_file(tmp.path(), reference["text_bytes"].as_u64().unwrap() as usize);
    let out = disp(&["eval", "ppl", "--model", s(&model), "--text", s(&text), "--seq-len", "64", "--max-windows", "3", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let json: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("one JSON object");
    assert_eq!(json["windows"], reference["windows"]);
    assert_eq!(json["predicted_tokens"], reference["predicted_tokens"]);
    let (ppl, expected) = (json["perplexity"].as_f64().unwrap(), reference["perplexity"].as_f64().unwrap());
    // disp's logits match transformers' to 1e-4 on the fixtures; the mean NLL then to ~1e-5.
    assert!((ppl - expected).abs() <= 1e-4 * expected, "perplexity {ppl}, transformers {expected}");
}

/// What `disp generate` prints for `ids` with the byte tokenizer: the bytes, invalid UTF-8
/// replaced as the byte-level decoder does.
fn byte_text(ids: &[u64]) -> String {
    String::from_utf8_lossy(&ids.iter().map(|&b| b as u8).collect::<Vec<u8>>()).into_owned() + "\n"
}

#[test]
fn greedy_generation_prints_transformers_argmax_continuation() {
    let reference = read_json(&fixture("eval_reference/greedy.json"));
    let (_tmp, model) = model_copy(reference["fixture"].as_str().unwrap());
    let prompt = reference["prompt"].as_str().unwrap();
    let expected: Vec<u64> = reference["greedy_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    let eos = reference["eos_token_id"].as_u64().unwrap();
    assert!(!expected.contains(&eos), "the reference continuation does not stop early");
    let out = disp(&["generate", "--model", s(&model), "--prompt", prompt, "--max-tokens", "12"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, byte_text(&expected));
    let short = disp(&["generate", "--model", s(&model), "--prompt", prompt, "--max-tokens", "5"]);
    assert_eq!(short.stdout, byte_text(&expected[..5]));
}

#[test]
fn sampling_flags_reach_the_sampler() {
    let reference = read_json(&fixture("eval_reference/greedy.json"));
    let (_tmp, model) = model_copy(reference["fixture"].as_str().unwrap());
    let prompt = reference["prompt"].as_str().unwrap();
    let greedy: Vec<u64> = reference["greedy_ids"].as_array().unwrap().iter().take(6).map(|v| v.as_u64().unwrap()).collect();
    let run = |extra: &[&str]| {
        let out = disp(&[&["generate", "--model", s(&model), "--prompt", prompt, "--max-tokens", "6"][..], extra].concat());
        assert_eq!(out.code, 0, "{}", out.stderr);
        out.stdout
    };
    // A nucleus of one token is the argmax, whatever the temperature and seed.
    for seed in ["0", "7"] {
        assert_eq!(run(&["--temperature", "1.5", "--top-p", "1e-9", "--seed", seed]), byte_text(&greedy));
    }
    // A temperature of 1e-4 over the whole vocabulary: the top-2 margins (≥ 0.027) become ≥ 270
    // nats, so the argmax again; at temperature 1 the same seeds give other texts.
    for seed in ["0", "7"] {
        assert_eq!(run(&["--temperature", "1e-4", "--top-p", "1", "--seed", seed]), byte_text(&greedy));
    }
    // The full distribution: the seed decides, the same seed the same text.
    let sampled: Vec<String> = (0..4).map(|seed| run(&["--temperature", "1", "--top-p", "1", "--seed", &seed.to_string()])).collect();
    assert_eq!(sampled[2], run(&["--temperature", "1", "--top-p", "1", "--seed", "2"]));
    assert!(sampled.iter().any(|t| *t != sampled[0]), "four seeds, one text: {sampled:?}");
    assert!(sampled.iter().all(|t| *t != byte_text(&greedy)), "sampling at temperature 1 repeated the greedy text: {sampled:?}");
}

#[test]
fn chat_renders_the_model_template_then_generates() {
    // SmolLM2's template as transformers read it from the GGUF, and its rendering of one user turn.
    let chat = read_json(&fixture("smollm2/chat.json"));
    let conversation = &chat["conversations"][0];
    let question = conversation["messages"][0]["content"].as_str().unwrap();
    let rendered = conversation["rendered"].as_str().unwrap();
    let (_tmp, model) = model_copy("llama_mha_untied");
    let no_template = disp(&["generate", "--model", s(&model), "--prompt", question, "--chat"]);
    assert_one_line_error(&no_template, &["has no chat template"]);
    std::fs::write(model.join("tokenizer_config.json"), serde_json::json!({"chat_template": chat["chat_template"]}).to_string()).unwrap();
    // The rendered prompt is 150 bytes, past the fixture's 128 positions; default RoPE computes
    // the same function at any length, so only the limit is raised.
    let config = model.join("config.json");
    let mut json = read_json(&config);
    json["max_position_embeddings"] = 512.into();
    std::fs::write(&config, json.to_string()).unwrap();
    let run = |args: &[&str]| {
        let out = disp(&[&["generate", "--model", s(&model), "--max-tokens", "6"][..], args].concat());
        assert_eq!(out.code, 0, "{}", out.stderr);
        out.stdout
    };
    let with_chat = run(&["--prompt", question, "--chat"]);
    assert_eq!(with_chat, run(&["--prompt", rendered]), "--chat generates from transformers' rendering");
    assert_ne!(with_chat, run(&["--prompt", question]));
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
fn each_device_runs_when_compiled_in_and_is_a_one_line_error_otherwise() {
    let (_tmp, model) = model_copy("llama_mha_untied");
    let run = |device: &str| disp(&["--device", device, "generate", "--model", s(&model), "--prompt", "Emma Woodhouse", "--max-tokens", "4"]);
    let cpu = run("cpu");
    assert_eq!(cpu.code, 0, "{}", cpu.stderr);
    for (device, compiled_in) in [("cuda", cfg!(feature = "cuda")), ("wgpu", cfg!(feature = "wgpu"))] {
        let out = run(device);
        if compiled_in {
            // The top-2 logit margins of these 4 steps are at least 0.039 (greedy.json): GPU rounding
            // cannot change the text.
            assert_eq!(out.code, 0, "{device}: {}", out.stderr);
            assert_eq!(out.stdout, cpu.stdout, "{device} and cpu generate the same text");
        } else {
            assert_one_line_error(&out, &[&format!("device '{device}' is not compiled into this build"), &format!("--features {device}")]);
            assert!(out.stdout.is_empty());
        }
    }
}

#[test]
fn prune_then_evaluate_the_plan() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path(), 3000);
    let plan = tmp.path().join("plan.json");
    let out = disp(&[
        "prune",
        "--model",
        s(&model),
        "--ratio",
        "0.2",
        "--ratio-of",
        "blocks",
        "--data",
        s(&text),
        "--steps",
        "3",
        "--seq-len",
        "32",
        "--out",
        s(&plan),
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
    assert!((achieved - 0.2).abs() <= 0.005, "uniform plan removed {achieved} of the total, target 0.2");
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
            "prune",
            "--model",
            s(&model),
            "--ratio",
            "0.2",
            "--ratio-of",
            "blocks",
            "--data",
            s(&text),
            "--steps",
            "3",
            "--seq-len",
            "32",
            "--out",
            s(&plan),
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

/// A JSONL multiple-choice task of `count` examples, the gold answer cycling through the choices.
fn mc_task_file(dir: &Path, name: &str, count: usize) -> PathBuf {
    let lines: Vec<String> = (0..count)
        .map(|i| {
            serde_json::json!({
                "context": format!("Question {i}: Anne walked to the"),
                "choices": [" village", " sea", " great house of Uppercross"],
                "gold": i % 3,
            })
            .to_string()
        })
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

#[test]
fn eval_mc_reports_each_task() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let first = mc_task_file(tmp.path(), "walks.jsonl", 5);
    let second = mc_task_file(tmp.path(), "more-walks.jsonl", 4);
    let out = disp(&["eval", "mc", "--model", s(&model), "--tasks", s(&first), s(&second), "--limit", "3", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let reports: Vec<serde_json::Value> = out.stdout.lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    assert_eq!(reports.len(), 2, "{}", out.stdout);
    assert_eq!(reports[0]["task"], "walks");
    assert_eq!(reports[1]["task"], "more-walks");
    for report in &reports {
        assert_eq!(report["examples"], 3, "--limit applies to each task");
        for metric in ["acc", "acc_norm"] {
            let value = report[metric].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&value), "{metric} {value}");
            assert!(report[format!("{metric}_stderr")].as_f64().unwrap() >= 0.0);
        }
    }

    let out = disp(&["eval", "mc", "--model", s(&model), "--tasks", s(&first)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", out.stdout);
    assert!(lines[0].starts_with("walks  acc ") && lines[0].contains(" acc_norm ") && lines[0].contains("(5 examples"), "{}", lines[0]);
}

#[test]
fn eval_mc_bad_task_file_is_reported() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let good = mc_task_file(tmp.path(), "good.jsonl", 3);
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"gold\": 0}\n{\"context\": \"a\", \"choices\": [\" b\", \" c\"], \"gold\": 5}\n",
    )
    .unwrap();
    // The good task comes first: nothing is evaluated or printed before every file is checked.
    let out = disp(&["eval", "mc", "--model", s(&model), "--tasks", s(&good), s(&bad)]);
    assert_one_line_error(&out, &["bad.jsonl:2", "gold 5 out of range for 2 choices"]);
    assert!(out.stdout.is_empty(), "{}", out.stdout);

    std::fs::write(&bad, "").unwrap();
    let out = disp(&["eval", "mc", "--model", s(&model), "--tasks", s(&bad)]);
    assert_one_line_error(&out, &["bad.jsonl", "no examples"]);
}

/// Runs `disp prune` with `args` on a copy of the LLaMA fixture and returns the plan it wrote.
fn prune_plan(method: &str, extra: &[&str]) -> serde_json::Value {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path(), 4000);
    let plan = tmp.path().join("plan.json");
    let base = ["prune", "--model", s(&model), "--method", method, "--data", s(&text), "--seq-len", "32", "--out", s(&plan)];
    let out = disp(&[&base[..], extra].concat());
    assert_eq!(out.code, 0, "{method}: {}", out.stderr);
    // A search first prints its memory estimate, then the summary.
    assert!(out.stdout.lines().any(|l| l.starts_with(method)), "{method}: {}", out.stdout);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    let check = disp(&["eval", "ppl", "--model", s(&model), "--plan", s(&plan), "--text", s(&text), "--seq-len", "32", "--json"]);
    assert_eq!(check.code, 0, "{method}: {}", check.stderr);
    json
}

#[test]
fn prune_disp_direct_lands_on_the_ratio() {
    let json = prune_plan("disp-direct", &["--ratio", "0.2", "--ratio-of", "blocks", "--steps", "5"]);
    assert_eq!(json["method"], "disp-direct");
    assert_eq!(json["search"]["gate_source"], "direct");
    let achieved = json["achieved_ratio"].as_f64().unwrap();
    assert!((achieved - 0.2).abs() <= 0.005, "disp-direct removed {achieved} of the blocks, target 0.2");
}

#[test]
fn prune_wanda_sp_lands_on_the_ratio_with_a_window_sample() {
    let json = prune_plan("uniform-wanda", &["--ratio", "0.2", "--ratio-of", "blocks", "--calibration-windows", "3"]);
    assert_eq!(json["method"], "uniform-wanda");
    // 4000 bytes are 125 windows of 32 tokens: 3 are sampled.
    assert_eq!(json["search"]["windows"], 3);
    assert_eq!(json["search"]["windows_available"], 125);
    assert_eq!(json["search"]["tokens"], 3 * 32);
    let achieved = json["achieved_ratio"].as_f64().unwrap();
    assert!((achieved - 0.2).abs() <= 0.005, "uniform-wanda removed {achieved} of the blocks, target 0.2");
    let first = &json["layers"][0]["attn_in"];
    assert!(json["layers"].as_array().unwrap().iter().all(|l| &l["attn_in"] == first), "one embedding subset");
}

#[test]
fn wanda_2_4_without_export_is_a_one_line_error() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path(), 2000);
    let plan = tmp.path().join("plan.json");
    let out = disp(&["prune", "--model", s(&model), "--method", "wanda-2:4", "--data", s(&text)]);
    assert_one_line_error(&out, &["wanda-2:4 produces zeroed weights, not index sets: use --export DIR"]);
    let exported = tmp.path().join("sparse");
    let out = disp(&[
        "prune",
        "--model",
        s(&model),
        "--method",
        "wanda-2:4",
        "--ratio",
        "0.5",
        "--data",
        s(&text),
        "--out",
        s(&plan),
        "--export",
        s(&exported),
    ]);
    assert_one_line_error(&out, &["drop --ratio and --out"]);
    assert!(!plan.exists() && !exported.exists());
    let out = disp(&["prune", "--model", s(&model), "--method", "uniform-magnitude", "--out", s(&plan)]);
    assert_one_line_error(&out, &["--ratio is required"]);
    let out = disp(&["prune", "--model", s(&model), "--method", "uniform-wanda", "--ratio", "0.2", "--out", s(&plan)]);
    assert_one_line_error(&out, &["--data", "needs at least one calibration text file"]);
}

#[test]
fn prune_export_reload_gives_the_same_perplexity_and_runs_everywhere() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path(), 3000);
    let plan = tmp.path().join("plan.json");
    let exported = tmp.path().join("exported");
    let out = disp(&[
        "prune",
        "--model",
        s(&model),
        "--ratio",
        "0.3",
        "--data",
        s(&text),
        "--steps",
        "3",
        "--seq-len",
        "32",
        "--out",
        s(&plan),
        "--export",
        s(&exported),
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(exported.join("tokenizer.json").is_file(), "the tokenizer travels with the export");
    let ppl = |args: &[&str]| -> f64 {
        let mut all = vec!["eval", "ppl", "--text", s(&text), "--seq-len", "32", "--json"];
        all.extend_from_slice(args);
        let out = disp(&all);
        assert_eq!(out.code, 0, "{}", out.stderr);
        serde_json::from_str::<serde_json::Value>(out.stdout.trim()).unwrap()["perplexity"].as_f64().unwrap()
    };
    let in_memory = ppl(&["--model", s(&model), "--plan", s(&plan)]);
    let reloaded = ppl(&["--model", s(&exported)]);
    assert_eq!(in_memory, reloaded, "the export is the same function");
    assert_ne!(in_memory, ppl(&["--model", s(&model)]), "and not the dense one");

    // A pruned folder cannot take another plan.
    let out = disp(&["eval", "ppl", "--model", s(&exported), "--plan", s(&plan), "--text", s(&text), "--seq-len", "32"]);
    assert_one_line_error(&out, &["already pruned"]);

    let out = disp(&["generate", "--model", s(&exported), "--prompt", "It is", "--max-tokens", "4"]);
    assert_eq!(out.code, 0, "{}", out.stderr);

    // The exported weight file holds fewer values than the source's.
    let size = |dir: &Path| std::fs::metadata(dir.join("model.safetensors")).unwrap().len();
    assert!(size(&exported) < size(&model), "{} vs {}", size(&exported), size(&model));

    let dense_equivalent = tmp.path().join("dense-equivalent");
    let out = disp(&["export", "--model", s(&model), "--plan", s(&plan), "--out", s(&dense_equivalent), "--format", "dense-equivalent"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let via_zeros = ppl(&["--model", s(&dense_equivalent)]);
    assert!((via_zeros - in_memory).abs() <= 1e-4 * in_memory, "{via_zeros} vs {in_memory}");
}

#[test]
fn export_refuses_a_used_output_folder_and_a_bad_plan() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let plan = tmp.path().join("plan.json");
    let out = disp(&["prune", "--model", s(&model), "--ratio", "0.2", "--method", "uniform-magnitude", "--out", s(&plan)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let occupied = tmp.path().join("occupied");
    std::fs::create_dir(&occupied).unwrap();
    std::fs::write(occupied.join("keep.txt"), "mine").unwrap();
    let out = disp(&["export", "--model", s(&model), "--plan", s(&plan), "--out", s(&occupied)]);
    assert_one_line_error(&out, &["occupied", "not empty"]);
    assert_eq!(std::fs::read_dir(&occupied).unwrap().count(), 1, "left alone");

    let not_a_plan = tmp.path().join("not-a-plan.json");
    std::fs::write(&not_a_plan, "{\"hello\": 1}").unwrap();
    let out = disp(&["export", "--model", s(&model), "--plan", s(&not_a_plan), "--out", s(&tmp.path().join("x"))]);
    assert_one_line_error(&out, &["not-a-plan.json", "not a pruning plan"]);
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn bench_reports_dense_and_pruned_speed() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let plan = tmp.path().join("plan.json");
    let out = disp(&["prune", "--model", s(&model), "--ratio", "0.3", "--method", "uniform-magnitude", "--out", s(&plan)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out =
        disp(&["bench", "--model", s(&model), "--plan", s(&plan), "--prompt-tokens", "16", "--decode-tokens", "4", "--repetitions", "3", "--json"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let json: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let models = json["models"].as_array().unwrap();
    assert_eq!(models.iter().map(|m| m["label"].as_str().unwrap()).collect::<Vec<_>>(), ["dense", "pruned"]);
    for m in models {
        assert_eq!(m["prefill_seconds"].as_array().unwrap().len(), 3);
        assert!(m["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
    }
    let params: Vec<u64> = json["block_linear_params"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(params[1] < params[0], "{params:?}");

    let out = disp(&["bench", "--model", s(&model), "--plan", s(&plan), "--prompt-tokens", "5000"]);
    assert_one_line_error(&out, &["positions"]);
}

#[test]
fn wanda_2_4_exports_a_stock_model_with_half_the_block_weights_zero() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path(), 4000);
    let sparse = tmp.path().join("sparse");
    let out = disp(&["prune", "--model", s(&model), "--method", "wanda-2:4", "--data", s(&text), "--seq-len", "32", "--export", s(&sparse)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let bytes = std::fs::read(sparse.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let source_bytes = std::fs::read(model.join("model.safetensors")).unwrap();
    let source = safetensors::SafeTensors::deserialize(&source_bytes).unwrap();
    let floats = |v: &safetensors::tensor::TensorView<'_>| -> Vec<f32> {
        v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    for (name, view) in st.tensors() {
        let original = floats(&source.tensor(&name).unwrap());
        let written = floats(&view);
        let is_block_weight = name.contains(".layers.") && name.ends_with("_proj.weight");
        if is_block_weight {
            // HF rows are output units; every group of 4 inputs keeps exactly 2, unchanged.
            let inputs = view.shape()[1];
            for (row_new, row_old) in written.chunks(inputs).zip(original.chunks(inputs)) {
                for (group_new, group_old) in row_new.chunks(4).zip(row_old.chunks(4)) {
                    assert_eq!(group_new.iter().filter(|v| **v == 0.0).count(), 2, "{name}");
                    assert!(group_new.iter().zip(group_old).all(|(n, o)| *n == 0.0 || n == o), "{name}: kept weights unchanged");
                }
            }
        } else {
            assert_eq!(written, original, "{name}: not a block linear weight, copied as is");
        }
    }
    let ppl = |dir: &Path| -> f64 {
        let out = disp(&["eval", "ppl", "--model", s(dir), "--text", s(&text), "--seq-len", "32", "--json"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        serde_json::from_str::<serde_json::Value>(out.stdout.trim()).unwrap()["perplexity"].as_f64().unwrap()
    };
    assert_ne!(ppl(&sparse), ppl(&model));
}

const SITE_KEYS: [&str; 5] = ["attn_in", "attn_out", "mlp_in", "mlp_inter", "mlp_out"];

/// |S1|..|S5| of every layer of a plan (or of `disp inspect --json`'s `widths`).
fn plan_widths(plan: &serde_json::Value) -> Vec<[usize; 5]> {
    plan["layers"].as_array().unwrap().iter().map(|l| SITE_KEYS.map(|k| l[k].as_array().unwrap().len())).collect()
}

fn inspect_json(args: &[&str]) -> serde_json::Value {
    let out = disp(&[&["inspect", "--json"][..], args].concat());
    assert_eq!(out.code, 0, "{}", out.stderr);
    serde_json::from_str(out.stdout.trim()).expect("one JSON object")
}

fn json_widths(inspection: &serde_json::Value) -> Vec<[usize; 5]> {
    inspection["layers"].as_array().unwrap().iter().map(|l| SITE_KEYS.map(|k| l["widths"][k].as_u64().unwrap() as usize)).collect()
}

/// The layer rows of `disp inspect`'s table: (layer, kept percentages, widths).
fn inspect_rows(stdout: &str) -> Vec<(usize, Vec<String>, [usize; 5])> {
    stdout
        .lines()
        .filter_map(|line| {
            let tokens: Vec<&str> = line.split_whitespace().collect();
            let layer = tokens.first()?.parse().ok()?;
            assert_eq!(tokens.len(), 11, "layer, then kept % and width for S1..S5: {line:?}");
            let percents = tokens[1..].iter().step_by(2).map(|t| t.to_string()).collect();
            let widths = [2, 4, 6, 8, 10].map(|i| tokens[i].parse().unwrap());
            Some((layer, percents, widths))
        })
        .collect()
}

/// The committed random plan for the LLaMA fixture: 2 layers, d 64, d_ff 128.
fn random_fixture_plan() -> (PathBuf, serde_json::Value) {
    let path = fixture("dense_equivalent/llama_gqa_tied.plan.json");
    let json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    (path, json)
}

#[test]
fn inspect_plan_file_shows_one_row_per_layer_with_the_plan_widths() {
    let (path, plan) = random_fixture_plan();
    let out = disp(&["inspect", s(&path)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rows = inspect_rows(&out.stdout);
    let expected = plan_widths(&plan);
    assert_eq!(rows.len(), expected.len(), "{}", out.stdout);
    for (i, ((layer, percents, widths), plan_widths)) in rows.iter().zip(&expected).enumerate() {
        assert_eq!(*layer, i);
        assert_eq!(widths, plan_widths, "layer {i}");
        let full = [64.0, 64.0, 64.0, 128.0, 64.0];
        for ((percent, width), full) in percents.iter().zip(widths).zip(full) {
            assert_eq!(percent, &format!("{:.1}%", 100.0 * *width as f64 / full), "layer {i}");
        }
    }
    assert!(out.stdout.contains("method            random"), "{}", out.stdout);
    assert!(out.stdout.contains("total parameters  91,456 -> 61,300"), "{}", out.stdout);
    assert!(out.stdout.contains("block parameters  unknown (pass --model DIR"), "{}", out.stdout);
    assert!(out.stdout.contains("embedding positions (d = 64, 2 blocks)"), "{}", out.stdout);
}

#[test]
fn inspect_json_matches_the_plan_and_counts_positions() {
    let (path, plan) = random_fixture_plan();
    let json = inspect_json(&[s(&path)]);
    assert_eq!(json["kind"], "plan_file");
    assert_eq!(json["method"], "random");
    assert_eq!(json_widths(&json), plan_widths(&plan));
    assert_eq!(json["total_params"]["before"], plan["dense_params"]);
    assert_eq!(json["total_params"]["after"], plan["pruned_params"]);
    assert!(json["block_params"].is_null(), "a plan file alone has no block counts");
    let kept = json["layers"][1]["kept_fraction"]["mlp_inter"].as_f64().unwrap();
    assert!((kept - plan_widths(&plan)[1][3] as f64 / 128.0).abs() < 1e-12);

    // The per-position counts, recomputed here: how many blocks read a position (S1 ∪ S3).
    let reads: Vec<u64> = (0..64u64)
        .map(|p| {
            let has = |layer: &serde_json::Value, key: &str| layer[key].as_array().unwrap().iter().any(|v| v.as_u64() == Some(p));
            plan["layers"].as_array().unwrap().iter().filter(|l| has(l, "attn_in") || has(l, "mlp_in")).count() as u64
        })
        .collect();
    let positions = &json["positions"];
    let reported: Vec<u64> = positions["reads_per_position"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(reported, reads);
    let by = |n: u64| reads.iter().filter(|&&r| r == n).count();
    assert_eq!(positions["read_by_every_block"], by(2));
    assert_eq!(positions["read_by_some_blocks"], by(1));
    assert_eq!(positions["read_by_no_block"], by(0));
    assert!(by(1) > 0, "a random plan is dimension-independent");
}

#[test]
fn inspect_with_the_model_counts_block_parameters_and_a_shared_subset_shows_no_independence() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let plan = tmp.path().join("uniform.json");
    let out = disp(&["prune", "--model", s(&model), "--ratio", "0.2", "--method", "uniform-magnitude", "--out", s(&plan)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    let json = inspect_json(&[s(&plan), "--model", s(&model)]);
    assert_eq!(json_widths(&json), plan_widths(&written));
    let blocks = &json["block_params"];
    let (before, after) = (blocks["before"].as_u64().unwrap(), blocks["after"].as_u64().unwrap());
    let total = &json["total_params"];
    // Only block weights are pruned: the totals drop by exactly what the blocks lose.
    assert_eq!(total["before"].as_u64().unwrap() - total["after"].as_u64().unwrap(), before - after);
    assert!(after < before);
    // One embedding subset for every block: each position is used by all blocks or by none.
    assert_eq!(json["positions"]["read_by_some_blocks"], 0);
    assert_eq!(json["positions"]["written_by_some_blocks"], 0);

    // --model checks the plan against the model.
    let mut json = written;
    json["model"]["model_type"] = "opt".into();
    std::fs::write(&plan, json.to_string()).unwrap();
    let out = disp(&["inspect", s(&plan), "--model", s(&model)]);
    assert_one_line_error(&out, &["uniform.json", "plan is for a opt model"]);
}

#[test]
fn inspect_dense_folder_keeps_everything() {
    let (_tmp, model) = model_copy("llama_gqa_tied");
    let out = disp(&["inspect", s(&model)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let rows = inspect_rows(&out.stdout);
    assert_eq!(rows.len(), 2, "{}", out.stdout);
    for (_, percents, widths) in &rows {
        assert!(percents.iter().all(|p| p == "100.0%"), "{percents:?}");
        assert_eq!(*widths, [64, 64, 64, 128, 64]);
    }
    assert!(out.stdout.contains("(dense model folder)") && out.stdout.contains("removed           0.00%"), "{}", out.stdout);
    let json = inspect_json(&[s(&model)]);
    assert_eq!(json["method"], "dense");
    assert_eq!(json["block_params"]["before"], json["block_params"]["after"]);
    assert_eq!(json["positions"]["read_by_every_block"], 64);
    assert_eq!(json["positions"]["written_by_every_block"], 64);
}

#[test]
fn inspect_pruned_folder_shows_the_plan_it_was_exported_with() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let (plan_path, plan) = random_fixture_plan();
    let exported = tmp.path().join("exported");
    let out = disp(&["export", "--model", s(&model), "--plan", s(&plan_path), "--out", s(&exported)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let json = inspect_json(&[s(&exported)]);
    assert_eq!(json["kind"], "pruned_folder");
    assert_eq!(json["method"], "random");
    assert_eq!(json_widths(&json), plan_widths(&plan));
    assert_eq!(json["total_params"]["after"], plan["pruned_params"]);
    assert!(json["block_params"]["after"].as_u64().unwrap() < json["block_params"]["before"].as_u64().unwrap());
}

#[test]
fn inspect_plot_writes_a_png_and_leaves_no_temporary_file() {
    let (path, _) = random_fixture_plan();
    let tmp = tempfile::tempdir().unwrap();
    let figure = tmp.path().join("figure.png");
    let out = disp(&["inspect", s(&path), "--plot", s(&figure)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.ends_with(&format!("wrote {}\n", figure.display())), "{}", out.stdout);
    let bytes = std::fs::read(&figure).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let mut reader = png::Decoder::new(std::io::Cursor::new(&bytes)).read_info().expect("a decodable PNG");
    let (width, height) = (reader.info().width, reader.info().height);
    assert_eq!((width, height), (1600, 1000));
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    reader.next_frame(&mut pixels).unwrap();
    let colours: std::collections::HashSet<&[u8]> = pixels.chunks_exact(3).collect();
    assert!(colours.len() > 20, "a drawn figure, not a blank page: {} colours", colours.len());
    let names: Vec<String> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["figure.png"], "only the figure is left");

    let json = inspect_json(&[s(&path), "--plot", s(&figure)]);
    assert_eq!(json["plot"], s(&figure));

    let unwritable = tmp.path().join("no-such-folder").join("figure.png");
    let out = disp(&["inspect", s(&path), "--plot", s(&unwritable)]);
    assert_one_line_error(&out, &["no-such-folder/figure.png", "cannot write"]);
    assert!(out.stdout.is_empty(), "no report after a failed figure: {}", out.stdout);
}

#[test]
fn inspect_errors_are_one_line_and_name_the_path() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.json");
    assert_one_line_error(&disp(&["inspect", s(&missing)]), &["missing.json", "No such file"]);

    let not_a_plan = tmp.path().join("not-a-plan.json");
    std::fs::write(&not_a_plan, "{\"hello\": 1}").unwrap();
    assert_one_line_error(&disp(&["inspect", s(&not_a_plan)]), &["not-a-plan.json", "not a pruning plan"]);

    let empty_folder = tmp.path().join("empty-folder");
    std::fs::create_dir(&empty_folder).unwrap();
    assert_one_line_error(&disp(&["inspect", s(&empty_folder)]), &["empty-folder/config.json", "cannot read"]);

    // A plan whose index sets do not fit its own model record.
    let (_, mut plan) = random_fixture_plan();
    plan["layers"][1]["mlp_out"].as_array_mut().unwrap().push(64.into());
    let broken = tmp.path().join("broken.json");
    std::fs::write(&broken, plan.to_string()).unwrap();
    assert_one_line_error(&disp(&["inspect", s(&broken)]), &["broken.json", "layer 1 S5", "out of range for width 64"]);
    plan["layers"].as_array_mut().unwrap().pop();
    std::fs::write(&broken, plan.to_string()).unwrap();
    assert_one_line_error(&disp(&["inspect", s(&broken)]), &["broken.json", "1 layers for a model of 2"]);

    let (_model_tmp, model) = model_copy("llama_gqa_tied");
    assert_one_line_error(&disp(&["inspect", s(&model), "--model", s(&model)]), &["--model", "only for a plan file"]);
}
