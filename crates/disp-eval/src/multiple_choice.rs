//! Zero-shot multiple-choice accuracy in the manner of EleutherAI's lm-evaluation-harness: every
//! choice is scored by the summed log-likelihood of its tokens after the context; the model's
//! answer is the best-scoring choice (`acc`), or the best score per byte of the choice
//! (`acc_norm`, which stops long choices from losing merely for having more tokens).
//!
//! Tasks are JSONL files, one `{"context": ..., "choices": [...], "gold": i}` object per line.

use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::{Int, Tensor, TensorData};
use disp_models::{CausalLm, TextTokenizer};
use serde::{Deserialize, Serialize};

/// One question: the context, the candidate continuations, and the index of the right one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McExample {
    pub context: String,
    pub choices: Vec<String>,
    pub gold: usize,
}

impl McExample {
    /// What the scorer needs: text to condition on, and at least two non-empty choices.
    fn check(&self) -> Result<()> {
        if self.context.trim().is_empty() {
            bail!("empty context");
        }
        if self.choices.len() < 2 {
            bail!("needs at least 2 choices, got {}", self.choices.len());
        }
        if let Some(i) = self.choices.iter().position(String::is_empty) {
            bail!("choice {i} is empty");
        }
        if self.gold >= self.choices.len() {
            bail!("gold {} out of range for {} choices", self.gold, self.choices.len());
        }
        Ok(())
    }
}

/// Reads a JSONL task file. Blank lines are skipped; any bad line is an error naming `file:line`.
pub fn load_tasks(path: &Path) -> Result<Vec<McExample>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read task file", path.display()))?;
    let mut examples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("{}:{}", path.display(), index + 1);
        let example: McExample = serde_json::from_str(line).map_err(|e| {
            // serde_json appends "at line 1 column N"; within one line only the column helps.
            let message = e.to_string();
            let message = message.rsplit_once(" at line ").map_or(message.as_str(), |(m, _)| m);
            anyhow!("{at}: {message} (column {})", e.column())
        })?;
        example.check().map_err(|e| anyhow!("{at}: {e}"))?;
        examples.push(example);
    }
    if examples.is_empty() {
        bail!("{}: no examples (the task file is empty)", path.display());
    }
    Ok(examples)
}

/// Context and continuation tokens exactly as lm-evaluation-harness splits them: the context's
/// trailing whitespace moves onto the continuation (tokenizers attach a space to the word after
/// it), the whole string is tokenised once, and the continuation is whatever follows the first
/// `len(encode(context))` tokens — so the continuation is tokenised as it is in running text.
pub fn encode_pair(encode: impl Fn(&str) -> Result<Vec<u32>>, context: &str, continuation: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let trimmed = context.trim_end();
    let continuation = format!("{}{continuation}", &context[trimmed.len()..]);
    let whole = encode(&format!("{trimmed}{continuation}"))?;
    let context_tokens = encode(trimmed)?;
    let continuation_tokens = whole.get(context_tokens.len()..).unwrap_or_default().to_vec();
    Ok((context_tokens, continuation_tokens))
}

/// Log-likelihood of each `(context, continuation)` token pair's continuation given its context,
/// all pairs in one forward pass.
///
/// Rows are padded on the right to equal length; the model is causal, so a padding position is
/// never seen by the real positions before it, and its logits are never read. A pair longer than
/// the model's positions loses context tokens from the left, as in lm-eval.
///
/// The choices of a question share their context: the leading tokens common to every row, up to
/// the first position whose logits are read, run once with batch 1 into a KV cache, and only the
/// rest runs batched (`share_prefix = false` runs every row whole, the reference this is tested
/// against).
pub fn score_continuations(model: &dyn CausalLm, pairs: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<f64>> {
    score_continuations_with(model, pairs, true)
}

/// [`score_continuations`], choosing whether the shared prefix is computed once.
pub fn score_continuations_with(model: &dyn CausalLm, pairs: &[(Vec<u32>, Vec<u32>)], share_prefix: bool) -> Result<Vec<f64>> {
    if pairs.is_empty() {
        return Ok(Vec::new());
    }
    let max_positions = model.max_positions();
    // Per row: the model's input, the continuation tokens, and the first input position whose
    // logits predict a continuation token.
    let mut rows = Vec::with_capacity(pairs.len());
    for (context, continuation) in pairs {
        if continuation.is_empty() {
            bail!("a choice has no tokens after the context");
        }
        if context.is_empty() {
            bail!("the context has no tokens");
        }
        if continuation.len() > max_positions {
            bail!("a choice of {} tokens exceeds the model's {max_positions} positions", continuation.len());
        }
        let whole: Vec<u32> = context.iter().chain(continuation).copied().collect();
        // The last token is only predicted, never an input, so max_positions + 1 tokens fit.
        let kept = &whole[whole.len().saturating_sub(max_positions + 1)..];
        let input = kept[..kept.len() - 1].to_vec();
        // Token j is predicted at position j - 1; the continuation is the last tokens of `kept`.
        let first_prediction = input.len() - continuation.len();
        rows.push((input, continuation.as_slice(), first_prediction));
    }
    let batch = rows.len();
    let first = rows.iter().map(|(_, _, p)| *p).min().expect("at least one row");
    // Positions before `shared` hold the same token in every row and none of their logits is read.
    let shared = if share_prefix && batch > 1 {
        let (head, rest) = rows.split_first().expect("at least one row");
        let common = rest.iter().map(|(input, _, _)| head.0.iter().zip(input).take_while(|(a, b)| a == b).count()).min().unwrap_or(0);
        common.min(first)
    } else {
        0
    };
    let mut cache = None;
    if shared > 0 {
        let mut prefix_cache = model.new_cache();
        let prefix: Vec<i64> = rows[0].0[..shared].iter().map(|&t| t as i64).collect();
        let prefix = Tensor::<2, Int>::from_data(TensorData::new(prefix, [1, shared]), model.device());
        // Only the keys and values are wanted; the hidden states are dropped unprojected.
        drop(model.hidden_states(prefix, None, Some(&mut prefix_cache)));
        prefix_cache.repeat_batch(batch);
        cache = Some(prefix_cache);
    }
    // From here on, positions count from `shared`.
    let seq = rows.iter().map(|(input, _, _)| input.len()).max().expect("at least one row") - shared;
    let flat: Vec<i64> = rows
        .iter()
        .flat_map(|(input, _, _)| input[shared..].iter().map(|&t| t as i64).chain(std::iter::repeat_n(0, seq + shared - input.len())))
        .collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(flat, [batch, seq]), model.device());
    let logits = model.forward(tokens, None, cache.as_mut());
    let vocab = logits.dims()[2];
    // Only the positions from the earliest prediction on come to the host.
    let first = first - shared;
    let span = seq - first;
    let values = logits.narrow(1, first, span).into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 logits");
    let scores: Vec<f64> = rows
        .iter()
        .enumerate()
        .map(|(row, (_, continuation, start))| {
            // A row's predictions are consecutive positions, hence one contiguous slice.
            let offset = row * span + (start - shared - first);
            let logits = &values[offset * vocab..(offset + continuation.len()) * vocab];
            -crate::host_nll::summed_nll(logits, vocab, continuation)
        })
        .collect();
    if let Some(bad) = scores.iter().find(|s| !s.is_finite()) {
        bail!("the model produced a non-finite log-likelihood ({bad})");
    }
    Ok(scores)
}

/// One example's scores, ready to be judged.
#[derive(Debug, Clone)]
pub struct ScoredExample {
    /// Summed log-likelihood of each choice.
    pub log_likelihoods: Vec<f64>,
    /// Length of each choice string in bytes (the acc_norm denominator).
    pub choice_bytes: Vec<usize>,
    pub gold: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Accuracy {
    pub acc: f64,
    pub acc_stderr: f64,
    pub acc_norm: f64,
    pub acc_norm_stderr: f64,
}

/// Index of the largest value; the first one on ties (numpy's argmax, which lm-eval uses).
pub fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// Mean of `samples` and its standard error with the sample (n − 1) standard deviation, as
/// lm-eval reports it; the error is NaN for fewer than two samples.
pub fn mean_and_stderr(samples: &[f64]) -> (f64, f64) {
    let n = samples.len() as f64;
    let mean = samples.iter().sum::<f64>() / n;
    if samples.len() < 2 {
        return (mean, f64::NAN);
    }
    let variance = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (variance / n).sqrt())
}

/// acc and acc_norm over examples, each with its standard error.
pub fn accuracy(scored: &[ScoredExample]) -> Accuracy {
    let hit = |pick: usize, gold: usize| f64::from(u8::from(pick == gold));
    let plain: Vec<f64> = scored.iter().map(|s| hit(argmax(&s.log_likelihoods), s.gold)).collect();
    let normalised: Vec<f64> = scored
        .iter()
        .map(|s| {
            let per_byte: Vec<f64> = s.log_likelihoods.iter().zip(&s.choice_bytes).map(|(ll, &bytes)| ll / bytes as f64).collect();
            hit(argmax(&per_byte), s.gold)
        })
        .collect();
    let (acc, acc_stderr) = mean_and_stderr(&plain);
    let (acc_norm, acc_norm_stderr) = mean_and_stderr(&normalised);
    Accuracy { acc, acc_stderr, acc_norm, acc_norm_stderr }
}

#[derive(Debug, Clone, Serialize)]
pub struct McReport {
    pub task: String,
    pub examples: usize,
    pub acc: f64,
    pub acc_stderr: f64,
    pub acc_norm: f64,
    pub acc_norm_stderr: f64,
    pub seconds: f64,
}

/// The log-likelihood of each choice of `example`, all choices in one forward pass.
pub fn score_example(model: &dyn CausalLm, tokenizer: &TextTokenizer, example: &McExample) -> Result<ScoredExample> {
    example.check()?;
    let pairs =
        example.choices.iter().map(|choice| encode_pair(|text| tokenizer.encode(text), &example.context, choice)).collect::<Result<Vec<_>>>()?;
    Ok(ScoredExample {
        log_likelihoods: score_continuations(model, &pairs)?,
        choice_bytes: example.choices.iter().map(String::len).collect(),
        gold: example.gold,
    })
}

/// Scores every example with [`score_example`] and judges them with [`accuracy`];
/// `on_progress` is told how many examples are done after each one.
pub fn evaluate_multiple_choice(
    model: &dyn CausalLm,
    tokenizer: &TextTokenizer,
    task: &str,
    examples: &[McExample],
    mut on_progress: impl FnMut(usize),
) -> Result<McReport> {
    if examples.is_empty() {
        bail!("{task}: no examples to evaluate");
    }
    let start = Instant::now();
    let mut scored = Vec::with_capacity(examples.len());
    for (i, example) in examples.iter().enumerate() {
        scored.push(score_example(model, tokenizer, example).with_context(|| format!("{task}: example {}", i + 1))?);
        on_progress(i + 1);
    }
    let Accuracy { acc, acc_stderr, acc_norm, acc_norm_stderr } = accuracy(&scored);
    Ok(McReport {
        task: task.to_string(),
        examples: examples.len(),
        acc,
        acc_stderr,
        acc_norm,
        acc_norm_stderr,
        seconds: start.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(log_likelihoods: &[f64], choice_bytes: &[usize], gold: usize) -> ScoredExample {
        ScoredExample { log_likelihoods: log_likelihoods.to_vec(), choice_bytes: choice_bytes.to_vec(), gold }
    }

    #[test]
    fn accuracy_picks_by_total_and_by_per_byte_score() {
        let examples = [
            // Total picks 0; per byte -10/10 = -1 vs -12/40 = -0.3 picks 1.
            scored(&[-10.0, -12.0], &[10, 40], 1),
            // Both pick 2.
            scored(&[-9.0, -8.0, -1.0], &[5, 5, 5], 2),
            // Both pick 0, gold is 1.
            scored(&[-1.0, -5.0], &[4, 4], 1),
            // Total picks 1 (gold); per byte -4/2 = -2 vs -3/1 = -3 picks 0.
            scored(&[-4.0, -3.0], &[2, 1], 1),
        ];
        let got = accuracy(&examples);
        // acc hits: 0, 1, 0, 1; acc_norm hits: 1, 1, 0, 0.
        assert_eq!(got.acc, 0.5);
        assert_eq!(got.acc_norm, 0.5);
        // Sample std of {0,1,0,1} is sqrt(1/3); stderr = sqrt(1/3)/2.
        let expected = (1.0f64 / 3.0).sqrt() / 2.0;
        assert!((got.acc_stderr - expected).abs() < 1e-12, "{}", got.acc_stderr);
        assert!((got.acc_norm_stderr - expected).abs() < 1e-12, "{}", got.acc_norm_stderr);
    }

    #[test]
    fn stderr_uses_the_sample_deviation() {
        let (mean, stderr) = mean_and_stderr(&[1.0, 1.0, 1.0, 0.0, 0.0]);
        assert!((mean - 0.6).abs() < 1e-12);
        // Σ(x − 0.6)² = 3·0.16 + 2·0.36 = 1.2; /(n−1) = 0.3; /n = 0.06.
        assert!((stderr - 0.06f64.sqrt()).abs() < 1e-12, "{stderr}");
        assert_eq!(mean_and_stderr(&[1.0, 1.0]).1, 0.0);
        assert!(mean_and_stderr(&[1.0]).1.is_nan());
    }

    #[test]
    fn argmax_takes_the_first_of_equal_maxima() {
        assert_eq!(argmax(&[-3.0, -1.0, -1.0, -2.0]), 1);
        assert_eq!(argmax(&[-0.5]), 0);
    }

    /// A tokenizer with one merge that needs both sides of a boundary: "ab" is one token (9),
    /// a lone letter is its position in the alphabet, a space is 0.
    fn merging_encode(text: &str) -> Result<Vec<u32>> {
        let bytes = text.as_bytes();
        let mut tokens = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i..].starts_with(b"ab") {
                tokens.push(9);
                i += 2;
            } else {
                tokens.push(if bytes[i] == b' ' { 0 } else { u32::from(bytes[i] - b'a' + 1) });
                i += 1;
            }
        }
        Ok(tokens)
    }

    #[test]
    fn pair_split_follows_lm_eval() {
        // Trailing context whitespace moves onto the continuation.
        let (context, continuation) = encode_pair(merging_encode, "c d ", "e").unwrap();
        assert_eq!(context, vec![3, 0, 4]);
        assert_eq!(continuation, vec![0, 5]);
        // The continuation is cut from the whole encoding: "ca" + "b" encodes as c, ab, so the
        // first len(encode("ca")) = 2 tokens are dropped and the merged token is not repeated.
        let (context, continuation) = encode_pair(merging_encode, "ca", "bd").unwrap();
        assert_eq!(context, vec![3, 1]);
        assert_eq!(continuation, vec![4]);
    }
}
