//! Multiple-choice scoring on the tiny fixture models, checked against an independent
//! computation: the burn-side `sequence_nll` of the whole sequence minus that of the context.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use disp_eval::multiple_choice::{encode_pair, load_tasks, score_continuations, score_continuations_with, score_example};
use disp_eval::perplexity::sequence_nll;
use disp_eval::{evaluate_multiple_choice, McExample};
use disp_models::{CausalLm, TextTokenizer};

fn load(name: &str) -> Box<dyn CausalLm> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name);
    disp_models::load_model(&dir, &Device::flex()).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

/// A fresh folder under cargo's per-crate scratch directory, unique to this process and test.
fn scratch(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("mc-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A character-level BPE tokenizer small enough for the fixtures' 256-entry vocabularies: ASCII
/// characters are their own codes, and three merges build " the" (ids 200–202), so the
/// tokenisation of a choice depends on what precedes it, as with real tokenizers.
fn write_tokenizer(dir: &Path) -> TextTokenizer {
    let mut vocab: serde_json::Map<String, serde_json::Value> = (0u8..128).map(|b| ((b as char).to_string(), b.into())).collect();
    for (token, id) in [("th", 200), ("the", 201), (" the", 202)] {
        vocab.insert(token.into(), id.into());
    }
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": [["t", "h"], ["th", "e"], [" ", "the"]]}
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    TextTokenizer::load(dir).unwrap()
}

/// Log-likelihood of `continuation` after `context`, from two separate forward passes.
fn independent_score(model: &dyn CausalLm, context: &[u32], continuation: &[u32]) -> f64 {
    let nll = |tokens: &[u32]| -> f64 {
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, tokens.len()]), model.device());
        let logits = model.forward(input.clone(), None, None);
        sequence_nll(logits, input).into_data().convert::<f32>().try_to_vec::<f32>().unwrap()[0] as f64
    };
    let whole: Vec<u32> = context.iter().chain(continuation).copied().collect();
    // Causal: the context's own NLL is the same inside the whole sequence, so the difference is
    // the continuation's alone.
    let context_nll = if context.len() > 1 { nll(context) } else { 0.0 };
    context_nll - nll(&whole)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-3 * (1.0 + b.abs())
}

fn tokens(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

#[test]
fn choice_score_matches_the_independent_computation_on_every_family() {
    let pairs = vec![
        (tokens("Anne Elliot walked"), tokens(" to the village")),
        (tokens("x"), tokens(" y")),
        (tokens("She said nothing, and"), tokens(" looked away")),
    ];
    for name in ["llama_gqa_tied", "llama_mha_untied", "opt_pre_ln", "phi"] {
        let model = load(name);
        let scores = score_continuations(model.as_ref(), &pairs).unwrap();
        for ((context, continuation), score) in pairs.iter().zip(&scores) {
            let expected = independent_score(model.as_ref(), context, continuation);
            assert!(close(*score, expected), "{name}: {score} vs {expected}");
            assert!(*score < 0.0, "{name}: a log-likelihood is negative, got {score}");
        }
    }
}

#[test]
fn a_context_computed_once_gives_the_scores_of_whole_rows_on_every_family() {
    // Short enough for OPT's 64 positions, so that no row is cut.
    let context = tokens("He had been lucky, but");
    let shared_with = |choice: &str| (context.clone(), tokens(choice));
    let question = vec![
        shared_with(" he spent freely"),
        // One token: the row's input is the context alone.
        shared_with("!"),
        shared_with(" he was sure to be rich"),
        shared_with(" nothing"),
    ];
    // Rows that agree only on their first tokens share just those.
    let diverging = vec![(tokens("Captain Wentworth smiled"), tokens(" warmly")), (tokens("Captain Harville"), tokens(" limped"))];
    // Near the position limit the rows lose different numbers of tokens on the left and share
    // no prefix at all.
    let max_context: Vec<u32> = (0..200).map(|i| 32 + (i * 11 % 90) as u32).collect();
    let truncated = vec![(max_context.clone(), tokens(" a")), (max_context, tokens(" a much longer ending"))];
    for name in ["llama_gqa_tied", "llama_mha_untied", "opt_pre_ln", "phi"] {
        let model = load(name);
        for pairs in [&question, &diverging, &truncated] {
            let shared = score_continuations_with(model.as_ref(), pairs, true).unwrap();
            let whole = score_continuations_with(model.as_ref(), pairs, false).unwrap();
            for (shared, whole) in shared.iter().zip(&whole) {
                assert!((shared - whole).abs() < 1e-4 * (1.0 + whole.abs()), "{name}: shared prefix {shared}, whole rows {whole}");
            }
        }
        for ((context, continuation), score) in question.iter().zip(score_continuations(model.as_ref(), &question).unwrap()) {
            let expected = independent_score(model.as_ref(), context, continuation);
            assert!(close(score, expected), "{name}: {score} vs {expected}");
        }
    }
}

#[test]
fn padding_in_a_batch_does_not_change_scores() {
    let model = load("llama_gqa_tied");
    // Different context and choice lengths, so every row but the longest is padded.
    let pairs = vec![
        (tokens("A long context that needs no padding at all"), tokens(" and a longer choice too")),
        (tokens("Short"), tokens(" one")),
        (tokens("Medium length context"), tokens(" a")),
    ];
    let batched = score_continuations(model.as_ref(), &pairs).unwrap();
    for (pair, batched) in pairs.iter().zip(&batched) {
        let alone = score_continuations(model.as_ref(), std::slice::from_ref(pair)).unwrap()[0];
        assert!((alone - batched).abs() < 1e-4 * (1.0 + alone.abs()), "alone {alone}, batched {batched}");
    }
}

#[test]
fn long_pairs_lose_context_from_the_left() {
    let model = load("llama_gqa_tied");
    let max = model.max_positions();
    let context: Vec<u32> = (0..max + 40).map(|i| 32 + (i * 7 % 90) as u32).collect();
    let continuation = tokens(" the end");
    let score = score_continuations(model.as_ref(), &[(context.clone(), continuation.clone())]).unwrap()[0];
    // The model sees the last max + 1 tokens (the final one only as a target).
    let kept = &context[context.len() + continuation.len() - (max + 1)..];
    let expected = independent_score(model.as_ref(), kept, &continuation);
    assert!(close(score, expected), "{score} vs {expected}");

    let too_long: Vec<u32> = vec![65; max + 1];
    let err = score_continuations(model.as_ref(), &[(tokens("a"), too_long)]).unwrap_err();
    assert!(err.to_string().contains("exceeds the model's"), "{err}");
}

#[test]
fn pairs_are_split_on_the_whole_encoding() {
    let dir = scratch("split");
    let tokenizer = write_tokenizer(&dir);
    let encode = |text: &str| tokenizer.encode(text);
    // " the" is one token when the space comes with it, whether it was written on the context
    // or on the choice.
    let (context, continuation) = encode_pair(encode, "Then", " the end").unwrap();
    assert_eq!(context, vec![u32::from(b'T'), 104, 101, 110]);
    assert_eq!(continuation, vec![202, 32, 101, 110, 100]);
    assert_eq!(encode_pair(encode, "Then ", "the end").unwrap(), (context, continuation));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn evaluation_judges_the_scores_it_computes() {
    let dir = scratch("evaluate");
    let tokenizer = write_tokenizer(&dir);
    let model = load("llama_gqa_tied");
    // Varied contexts, choice counts and lengths, so a mistake in the wiring (which choice is
    // gold, which length normalises which score) would change some answer.
    let words = [" fine", " the worst in years", " cold", " warm and still", " wet", " the same as the day before"];
    let examples: Vec<McExample> = (0..16)
        .map(|i| {
            let count = 2 + i % 4;
            McExample {
                context: format!("Day {i}: {} the weather was", "so ".repeat(i % 5)),
                choices: (0..count).map(|j| words[(i + j) % words.len()].to_string()).collect(),
                gold: (i * 7) % count,
            }
        })
        .collect();
    let mut progress = Vec::new();
    let report = evaluate_multiple_choice(model.as_ref(), &tokenizer, "weather", &examples, |done| progress.push(done)).unwrap();
    assert_eq!(progress, (1..=16).collect::<Vec<_>>());
    assert_eq!((report.task.as_str(), report.examples), ("weather", 16));

    // Each example's scores match the independent computation, and the report's accuracies are
    // what those independent scores give: argmax of the log-likelihood (acc) and of the
    // log-likelihood per byte of the choice (acc_norm), first choice on ties; standard error of
    // a mean of 0/1 outcomes with the n − 1 sample deviation, sqrt(p (1 − p) / (n − 1)).
    let (mut hits, mut norm_hits) = (0usize, 0usize);
    for example in &examples {
        let scored = score_example(model.as_ref(), &tokenizer, example).unwrap();
        assert_eq!(scored.gold, example.gold);
        assert_eq!(scored.choice_bytes, example.choices.iter().map(String::len).collect::<Vec<_>>());
        let mut independent = Vec::new();
        for (choice, score) in example.choices.iter().zip(&scored.log_likelihoods) {
            let (context, continuation) = encode_pair(|t| tokenizer.encode(t), &example.context, choice).unwrap();
            let expected = independent_score(model.as_ref(), &context, &continuation);
            assert!(close(*score, expected), "{:?} + {choice:?}: {score} vs {expected}", example.context);
            independent.push((expected, expected / choice.len() as f64));
        }
        let best =
            |key: fn(&(f64, f64)) -> f64| (0..independent.len()).fold(0, |b, i| if key(&independent[i]) > key(&independent[b]) { i } else { b });
        hits += usize::from(best(|s| s.0) == example.gold);
        norm_hits += usize::from(best(|s| s.1) == example.gold);
    }
    let n = examples.len() as f64;
    let stderr = |p: f64| (p * (1.0 - p) / (n - 1.0)).sqrt();
    let (acc, acc_norm) = (hits as f64 / n, norm_hits as f64 / n);
    assert_eq!((report.acc, report.acc_norm), (acc, acc_norm));
    assert!((report.acc_stderr - stderr(acc)).abs() < 1e-12, "{} vs {}", report.acc_stderr, stderr(acc));
    assert!((report.acc_norm_stderr - stderr(acc_norm)).abs() < 1e-12);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn task_files_load_and_skip_blank_lines() {
    let dir = scratch("load");
    let path = dir.join("tiny.jsonl");
    std::fs::write(
        &path,
        "{\"context\": \"a b\", \"choices\": [\" c\", \" d\"], \"gold\": 1}\n\n   \n{\"context\": \"e\", \"choices\": [\" f\", \" g\", \" h\"], \"gold\": 0, \"id\": \"extra fields are ignored\"}\n",
    )
    .unwrap();
    let examples = load_tasks(&path).unwrap();
    assert_eq!(examples.len(), 2);
    assert_eq!(examples[1], McExample { context: "e".into(), choices: vec![" f".into(), " g".into(), " h".into()], gold: 0 });
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn task_file_errors_name_the_file_and_line() {
    let dir = scratch("errors");
    let good = r#"{"context": "a", "choices": [" b", " c"], "gold": 0}"#;
    let cases = [
        (format!("{good}\n\n{}\n", r#"{"context": "a", "choices": [" b", " c", " d", " e"], "gold": 4}"#), ":3: gold 4 out of range for 4 choices"),
        (format!("{good}\n{{\"context\": \"a\", \"choices\": [\" b\"\n"), ":2: "),
        (format!("{}\n", r#"{"context": "a", "choices": [" b", " c"]}"#), ":1: missing field `gold`"),
        (format!("{}\n", r#"{"context": "a", "choices": [" b"], "gold": 0}"#), ":1: needs at least 2 choices, got 1"),
        (format!("{good}\n{good}\n{}\n", r#"{"context": "  ", "choices": [" b", " c"], "gold": 0}"#), ":3: empty context"),
        (format!("{}\n", r#"{"context": "a", "choices": [" b", ""], "gold": 0}"#), ":1: choice 1 is empty"),
        ("\n  \n".to_string(), ": no examples"),
        (String::new(), ": no examples"),
    ];
    for (i, (content, needle)) in cases.iter().enumerate() {
        let path = dir.join(format!("case{i}.jsonl"));
        std::fs::write(&path, content).unwrap();
        let message = format!("{:#}", load_tasks(&path).unwrap_err());
        assert!(message.starts_with(&format!("{}{needle}", path.display())), "case {i}: {message:?} should start with the file and {needle:?}");
        assert_eq!(message.lines().count(), 1, "case {i}: {message:?}");
    }
    let missing = dir.join("missing.jsonl");
    let message = format!("{:#}", load_tasks(&missing).unwrap_err());
    assert!(message.contains("missing.jsonl: cannot read task file"), "{message}");
    let _ = std::fs::remove_dir_all(dir);
}
