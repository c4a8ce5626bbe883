//! Chat retention on the tiny fixture: a model agrees with itself completely, the greedy
//! teacher-forced agreement counts exactly the tokens the model would have generated, and a
//! differently pruned model agrees less.

#[path = "../../disp-models/tests/common/mod.rs"]
mod common;

use burn::tensor::Device;
use common::{fixture, random_plan};
use disp_eval::chat_retention::{chat_retention, self_generated_calibration, teacher_forced_agreement};
use disp_eval::{generate, GenerateOptions};
use disp_models::TextTokenizer;

#[test]
fn a_model_agrees_with_itself_and_a_pruned_one_less() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture("llama_gqa_tied")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    std::fs::copy(common::fixtures_dir().join("byte_tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let model = disp_models::load_model(&dir, &Device::flex()).unwrap();
    let tokenizer = TextTokenizer::load(&dir).unwrap();
    let prompts: Vec<String> = ["What is the capital?", "Name a colour.", "abc"].iter().map(|s| s.to_string()).collect();
    let opts = GenerateOptions { max_new_tokens: 10, temperature: 0.0, top_p: 1.0, seed: 0, stop_tokens: vec![] };

    let same = chat_retention(model.as_ref(), model.as_ref(), &tokenizer, None, &prompts, &opts, |_| {}).unwrap();
    assert_eq!(same.first_sentence_agreement, 1.0);
    assert_eq!(same.token_agreement, 1.0);
    assert!(same.prompts.iter().all(|p| p.reference_tokens == 10 && p.agreeing_tokens == 10));

    // Greedy decoding with the KV cache and one teacher-forced forward agree on every token.
    let ids = tokenizer.encode(&prompts[0]).unwrap();
    let greedy = generate(model.as_ref(), &ids, &opts).unwrap().tokens;
    assert_eq!(teacher_forced_agreement(model.as_ref(), &ids, &greedy), greedy.len());
    let mut altered = greedy.clone();
    altered[0] = (altered[0] + 1) % 256;
    assert!(teacher_forced_agreement(model.as_ref(), &ids, &altered) < greedy.len());

    let pruned = model.prune(&random_plan(model.as_ref(), 3)).unwrap();
    let other = chat_retention(pruned.as_ref(), model.as_ref(), &tokenizer, None, &prompts, &opts, |_| {}).unwrap();
    assert!(other.token_agreement < 1.0, "a randomly pruned model should disagree somewhere");

    // Self-generated calibration: each exchange is the prompt followed by the model's answer.
    let text = self_generated_calibration(model.as_ref(), &tokenizer, None, &prompts[..1], &opts, |_| {}).unwrap();
    let answer = tokenizer.decode(&greedy).unwrap();
    assert_eq!(text, format!("{}{}\n\n", prompts[0], answer).trim_end().to_string() + "\n\n");
}
