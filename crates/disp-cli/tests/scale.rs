//! Scale (issue 13): `disp make-model` folders, and the search's memory estimate and refusal.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{assert_one_line_error, disp, disp_with_env, fixture, model_copy, s, text_file};

/// (dtype, shape) of every tensor in the shards of `dir`, by name.
fn stored_tensors(dir: &Path) -> BTreeMap<String, (String, Vec<usize>)> {
    let mut out = BTreeMap::new();
    for path in disp_io::hf_folder::weight_files(dir).unwrap() {
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            out.insert(name, (format!("{:?}", view.dtype()), view.shape().to_vec()));
        }
    }
    out
}

#[test]
fn make_model_writes_a_loadable_sharded_folder_of_the_asked_shape_and_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    let tokenizer = fixture("byte_tokenizer.json");
    for (dtype, stored) in [("bf16", "BF16"), ("f32", "F32")] {
        let out = tmp.path().join(format!("tiny-{dtype}"));
        let run = disp(&[
            "make-model",
            "--shape",
            "tiny",
            "--dtype",
            dtype,
            "--seed",
            "3",
            "--tokenizer",
            s(&tokenizer),
            "--shard-mb",
            "0.1",
            "--out",
            s(&out),
        ]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["vocab_size"], 256, "the tokenizer's vocabulary");
        assert_eq!((config["hidden_size"].as_u64(), config["num_key_value_heads"].as_u64()), (Some(64), Some(2)));
        let tensors = stored_tensors(&out);
        assert!(disp_io::hf_folder::weight_files(&out).unwrap().len() > 1, "0.1 MB shards split the model");
        assert_eq!(tensors.len(), 2 + 2 * 9 + 1, "embedding, 2 blocks of 9 tensors, final norm, head");
        assert!(tensors.values().all(|(d, _)| d == stored), "{dtype}: {tensors:?}");
        assert_eq!(tensors["model.embed_tokens.weight"].1, vec![256, 64]);
        assert_eq!(tensors["model.layers.1.self_attn.k_proj.weight"].1, vec![32, 64], "2 KV heads of 16");
        assert_eq!(tensors["model.layers.0.mlp.down_proj.weight"].1, vec![64, 160]);
        assert_eq!(tensors["lm_head.weight"].1, vec![256, 64]);
        // It loads and evaluates: random weights give a perplexity near the vocabulary size.
        let text = text_file(tmp.path(), 300);
        let eval = disp(&["eval", "ppl", "--model", s(&out), "--text", s(&text), "--seq-len", "32", "--json"]);
        assert_eq!(eval.code, 0, "{}", eval.stderr);
        let ppl = serde_json::from_str::<serde_json::Value>(&eval.stdout).unwrap()["perplexity"].as_f64().unwrap();
        assert!((128.0..512.0).contains(&ppl), "perplexity {ppl} of a random model with 256 tokens");
    }
    // The seed alone decides the weights.
    let again = tmp.path().join("again");
    let other = tmp.path().join("other");
    for (dir, seed) in [(&again, "3"), (&other, "4")] {
        let run = disp(&["make-model", "--shape", "tiny", "--seed", seed, "--tokenizer", s(&tokenizer), "--shard-mb", "0.1", "--out", s(dir)]);
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
    let first_shard = |dir: &Path| std::fs::read(&disp_io::hf_folder::weight_files(dir).unwrap()[0]).unwrap();
    assert_eq!(first_shard(&tmp.path().join("tiny-bf16")), first_shard(&again));
    assert_ne!(first_shard(&again), first_shard(&other));
}

#[test]
fn make_model_refuses_bad_flags_and_a_full_disk_leaving_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("model");
    let tokenizer = fixture("byte_tokenizer.json");
    let run = |extra: &[&str]| {
        let mut args = vec!["make-model", "--out", s(&out)];
        args.extend_from_slice(extra);
        disp(&args)
    };
    let tok = s(&tokenizer);
    assert_one_line_error(&run(&["--shape", "llama-7b", "--tokenizer", tok]), &["unknown model shape 'llama-7b'", "llama2-7b"]);
    assert_one_line_error(&run(&["--shape", "tiny", "--dtype", "int8", "--tokenizer", tok]), &["unknown dtype 'int8'", "bf16, f16, f32"]);
    assert_one_line_error(&run(&["--shape", "tiny", "--tokenizer", "/nonexistent/tok.json"]), &["/nonexistent/tok.json", "no such tokenizer"]);
    assert_one_line_error(&run(&["--shape", "tiny", "--tokenizer", tok, "--shard-mb", "0"]), &["--shard-mb", "positive"]);
    let full = disp_with_env(&["make-model", "--shape", "tiny", "--tokenizer", tok, "--out", s(&out)], &[("DISP_TEST_FREE_DISK_BYTES", "1000")]);
    assert_one_line_error(&full, &["needs 240590 bytes of disk", "only 1000 bytes are free"]);
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "no staging folder left");
}

#[test]
fn prune_prints_its_memory_estimate_and_refuses_a_search_that_cannot_fit() {
    let (tmp, model) = model_copy("llama_gqa_tied");
    let text = text_file(tmp.path(), 2000);
    let plan = tmp.path().join("plan.json");
    let args = ["prune", "--model", s(&model), "--ratio", "0.3", "--data", s(&text), "--steps", "1", "--seq-len", "64", "--out", s(&plan)];
    let ok = disp(&args);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(ok.stdout.contains("search: peak memory estimate") && ok.stdout.contains("full-graph backward"), "{}", ok.stdout);
    std::fs::remove_file(&plan).unwrap();

    // Enough memory for the model (its files are a few hundred KB), not for the hypernetwork.
    let refused = disp_with_env(&args, &[(disp_core::memory::AVAILABLE_OVERRIDE, "1000000")]);
    assert_one_line_error(
        &refused,
        &["--batch-size 1 --seq-len 64", "per-block backward", "beyond the loaded weights", "but only 1.0 MB of memory are available"],
    );
    assert!(!plan.exists());
}
