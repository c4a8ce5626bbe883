//! Prompt files and how much of a dense model's chat behaviour a pruned model keeps.
//!
//! A prompt file is JSONL, one object per line with a `"prompt"` string (blank lines skipped).
//! [`self_generated_calibration`] writes a model's own answers to such prompts as calibration
//! text (self-data distillation); [`chat_retention`] compares a model's greedy answers with a
//! reference model's on held-out prompts: the share whose first sentence is the same, and the
//! token-level agreement, i.e. the share of the reference's answer tokens that the model, fed
//! the prompt and the reference answer so far, also ranks first (one forward per prompt).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::{Int, Tensor, TensorData};
use disp_models::chat::{ChatMessage, ChatTemplate};
use disp_models::{CausalLm, TextTokenizer};
use serde::Serialize;

use crate::generate::{generate, GenerateOptions};

/// The prompts of a JSONL prompt file.
pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read prompt file", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| anyhow!("{}:{}: not JSON: {e}", path.display(), i + 1))?;
        let prompt = value.get("prompt").and_then(|p| p.as_str()).ok_or_else(|| anyhow!("{}:{}: no \"prompt\" string", path.display(), i + 1))?;
        if prompt.trim().is_empty() {
            bail!("{}:{}: empty prompt", path.display(), i + 1);
        }
        prompts.push(prompt.to_string());
    }
    if prompts.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(prompts)
}

/// The first sentence of `text`, trimmed: up to the first `.`, `!` or `?` followed by white
/// space or the end, or the first line break, whichever comes first. The full stop of a list
/// marker at the start ("1. Drink water.") does not end it: otherwise every numbered answer
/// would agree with every other on the sentence "1.".
pub fn first_sentence(text: &str) -> &str {
    let text = text.trim_start();
    let mut end = text.len();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    for (k, &(i, c)) in chars.iter().enumerate() {
        if c == '\n' {
            end = i;
            break;
        }
        let list_marker = c == '.' && !text[..i].is_empty() && text[..i].bytes().all(|b| b.is_ascii_digit());
        if matches!(c, '.' | '!' | '?') && !list_marker && chars.get(k + 1).is_none_or(|&(_, next)| next.is_whitespace()) {
            end = i + c.len_utf8();
            break;
        }
    }
    text[..end].trim()
}

/// A prompt as the model sees it: through the chat template (one user message, generation
/// prompt added) or as is.
pub fn render_prompt(template: Option<&ChatTemplate>, prompt: &str) -> Result<String> {
    match template {
        Some(t) => t.render(&[ChatMessage::new("user", prompt)], true),
        None => Ok(prompt.to_string()),
    }
}

/// The answer tokens without a trailing stop token.
fn answer(model: &dyn CausalLm, prompt: &[u32], opts: &GenerateOptions) -> Result<Vec<u32>> {
    let mut tokens = generate(model, prompt, opts)?.tokens;
    if tokens.last().is_some_and(|t| opts.stop_tokens.contains(t)) {
        tokens.pop();
    }
    Ok(tokens)
}

/// The model's answers to `prompts`, each written as the whole exchange (the rendered prompt
/// followed by the answer and, with a template, the end-of-turn text), separated by blank
/// lines: calibration text in the form the model is used in.
pub fn self_generated_calibration(
    model: &dyn CausalLm,
    tokenizer: &TextTokenizer,
    template: Option<&ChatTemplate>,
    prompts: &[String],
    opts: &GenerateOptions,
    mut on_prompt: impl FnMut(usize),
) -> Result<String> {
    let mut out = String::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let rendered = render_prompt(template, prompt)?;
        let tokens = answer(model, &tokenizer.encode(&rendered)?, opts)?;
        let reply = tokenizer.decode(&tokens)?;
        let exchange = match template {
            Some(t) => t.render(&[ChatMessage::new("user", prompt), ChatMessage::new("assistant", reply.trim())], false)?,
            None => format!("{rendered}{reply}"),
        };
        out.push_str(exchange.trim_end());
        out.push_str("\n\n");
        on_prompt(i + 1);
    }
    Ok(out)
}

/// One prompt's comparison.
#[derive(Debug, Clone, Serialize)]
pub struct ChatComparison {
    pub prompt: String,
    pub answer: String,
    pub reference: String,
    pub first_sentence_matches: bool,
    /// Reference answer tokens the model also ranks first, given the same prefix.
    pub agreeing_tokens: usize,
    pub reference_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatRetention {
    /// Share of prompts whose answers have the same first sentence.
    pub first_sentence_agreement: f64,
    /// Agreeing tokens over all reference answer tokens.
    pub token_agreement: f64,
    pub prompts: Vec<ChatComparison>,
}

/// Compares `model`'s greedy answers with `reference`'s (see the module documentation).
pub fn chat_retention(
    model: &dyn CausalLm,
    reference: &dyn CausalLm,
    tokenizer: &TextTokenizer,
    template: Option<&ChatTemplate>,
    prompts: &[String],
    opts: &GenerateOptions,
    mut on_prompt: impl FnMut(usize),
) -> Result<ChatRetention> {
    let greedy = GenerateOptions { temperature: 0.0, ..opts.clone() };
    let mut rows = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let ids = tokenizer.encode(&render_prompt(template, prompt)?)?;
        let ours = answer(model, &ids, &greedy)?;
        let theirs = answer(reference, &ids, &greedy)?;
        let agreeing_tokens = teacher_forced_agreement(model, &ids, &theirs);
        let (answer, reference_text) = (tokenizer.decode(&ours)?, tokenizer.decode(&theirs)?);
        rows.push(ChatComparison {
            prompt: prompt.clone(),
            first_sentence_matches: first_sentence(&answer) == first_sentence(&reference_text),
            answer,
            reference: reference_text,
            agreeing_tokens,
            reference_tokens: theirs.len(),
        });
        on_prompt(i + 1);
    }
    let matched = rows.iter().filter(|r| r.first_sentence_matches).count();
    let (agree, total) = rows.iter().fold((0, 0), |(a, t), r| (a + r.agreeing_tokens, t + r.reference_tokens));
    Ok(ChatRetention {
        first_sentence_agreement: matched as f64 / rows.len().max(1) as f64,
        token_agreement: if total == 0 { 1.0 } else { agree as f64 / total as f64 },
        prompts: rows,
    })
}

/// How many of `continuation`'s tokens `model` predicts with its top logit, fed `prompt` and the
/// continuation before each one.
pub fn teacher_forced_agreement(model: &dyn CausalLm, prompt: &[u32], continuation: &[u32]) -> usize {
    if continuation.is_empty() {
        return 0;
    }
    let all: Vec<i64> = prompt.iter().chain(continuation).map(|&t| t as i64).collect();
    let len = all.len();
    let input = Tensor::<2, Int>::from_data(TensorData::new(all, [1, len]), model.device());
    // Positions prompt.len()-1 .. len-2 predict the continuation.
    let logits = model.forward(input, None, None).narrow(1, prompt.len() - 1, continuation.len());
    let predicted = logits.argmax(2).into_data().convert::<i64>().try_to_vec::<i64>().unwrap_or_default();
    predicted.iter().zip(continuation).filter(|(p, &c)| **p == c as i64).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sentences_end_at_sentence_marks_or_lines() {
        assert_eq!(first_sentence("The capital of France is Paris. It is big."), "The capital of France is Paris.");
        assert_eq!(first_sentence("  Version 2.5 is out! Yes"), "Version 2.5 is out!");
        assert_eq!(first_sentence("What\n\nelse"), "What");
        assert_eq!(first_sentence("no end"), "no end");
        assert_eq!(first_sentence("1. Drink water before bed. 2. Carry a bottle."), "1. Drink water before bed.");
        assert_eq!(first_sentence("1. 1. 1. 2. 3."), "1. 1.");
        assert_eq!(first_sentence("12. Twelve. More"), "12. Twelve.");
        assert_eq!(first_sentence("It costs 12. Then"), "It costs 12.");
        assert_eq!(first_sentence("Why? Because."), "Why?");
    }

    #[test]
    fn prompt_files_name_the_bad_line() {
        let dir = std::env::temp_dir().join(format!("disp-prompts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.jsonl");
        std::fs::write(&good, "{\"prompt\": \"Hi?\"}\n\n{\"prompt\": \"Why\", \"x\": 1}\n").unwrap();
        assert_eq!(read_prompts(&good).unwrap(), vec!["Hi?", "Why"]);
        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, "{\"prompt\": \"Hi?\"}\n{\"question\": 1}\n").unwrap();
        assert!(read_prompts(&bad).unwrap_err().to_string().ends_with("bad.jsonl:2: no \"prompt\" string"));
        std::fs::write(&bad, "").unwrap();
        assert!(read_prompts(&bad).unwrap_err().to_string().contains("no prompts"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
