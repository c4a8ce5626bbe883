//! Perplexity with the protocol of the WikiText-2 tables in the pruning literature: tokenise the
//! whole file once, cut it into non-overlapping windows of `seq_len` tokens (the remainder is
//! dropped), predict every token of a window from the ones before it, and report exp of the mean
//! negative log-likelihood over all predicted tokens.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::tensor::{Int, Tensor, TensorData};
use disp_models::CausalLm;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct PerplexityReport {
    pub perplexity: f64,
    pub mean_nll: f64,
    pub windows: usize,
    pub seq_len: usize,
    /// Tokens whose likelihood was scored (seq_len - 1 per window).
    pub predicted_tokens: usize,
    /// Tokens in the whole file.
    pub file_tokens: usize,
    pub seconds: f64,
    /// Window tokens processed per second.
    pub tokens_per_second: f64,
}

/// A text file's contents; an unreadable, non-UTF-8 or blank file is a one-line error naming it.
pub fn read_text(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read text", path.display()))?;
    if text.trim().is_empty() {
        bail!("{}: empty text file", path.display());
    }
    Ok(text)
}

/// Cuts `tokens` into at most `max_windows` non-overlapping windows of `seq_len`.
pub fn token_windows(tokens: &[u32], seq_len: usize, max_windows: Option<usize>, source: &Path) -> Result<Vec<Vec<u32>>> {
    if seq_len < 2 {
        bail!("a window needs at least 2 tokens (one predicted from another), got a window length of {seq_len}");
    }
    if tokens.is_empty() {
        bail!("{}: empty text file", source.display());
    }
    if tokens.len() < seq_len {
        bail!("{}: only {} tokens, shorter than one window of {seq_len}", source.display(), tokens.len());
    }
    let count = (tokens.len() / seq_len).min(max_windows.unwrap_or(usize::MAX));
    Ok(tokens.chunks_exact(seq_len).take(count).map(<[u32]>::to_vec).collect())
}

/// Sum of the negative log-likelihoods of tokens 1.. of each row, given all of them.
pub fn window_nll(model: &dyn CausalLm, batch: &[Vec<u32>]) -> f64 {
    let device = model.device();
    let (rows, seq) = (batch.len(), batch[0].len());
    if let Some(nll) = model.summed_nll(&batch.concat(), rows) {
        return nll;
    }
    let flat: Vec<i64> = batch.iter().flatten().map(|&t| t as i64).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(flat, [rows, seq]), device);
    let logits = model.forward(tokens, None, None);
    let vocab = logits.dims()[2];
    // The whole buffer, moved out without a copy (a narrowed view would be copied); each row's
    // last position predicts nothing inside the window and is skipped here.
    let values = logits.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 logits");
    batch
        .iter()
        .enumerate()
        .map(|(r, row)| crate::host_nll::summed_nll(&values[r * seq * vocab..(r * seq + seq - 1) * vocab], vocab, &row[1..]))
        .sum()
}

/// Summed next-token NLL of `tokens` `[B, T]` under `logits` `[B, T, V]` (a `[1]` tensor, so it
/// can be differentiated during the search).
pub fn sequence_nll(logits: Tensor<3>, tokens: Tensor<2, Int>) -> Tensor<1> {
    let [rows, seq, vocab] = logits.dims();
    let predictions = logits.narrow(1, 0, seq - 1).reshape([rows * (seq - 1), vocab]);
    let targets = tokens.narrow(1, 1, seq - 1).reshape([rows * (seq - 1), 1]);
    // NLL = logsumexp(row) - row[target]: two passes over the vocab instead of materialising
    // the whole log-softmax.
    let max = predictions.clone().max_dim(1).detach();
    let log_sum_exp = (predictions.clone() - max.clone()).exp().sum_dim(1).log() + max;
    (log_sum_exp - predictions.gather(1, targets)).sum()
}

/// Evaluates `windows` one at a time; `progress` is told after each window.
pub fn perplexity(model: &dyn CausalLm, windows: &[Vec<u32>], file_tokens: usize, mut progress: impl FnMut(usize)) -> Result<PerplexityReport> {
    let Some(first) = windows.first() else { bail!("no windows to evaluate") };
    let seq_len = first.len();
    if seq_len > model.max_positions() {
        bail!("seq-len {seq_len} exceeds the model's {} positions", model.max_positions());
    }
    let start = Instant::now();
    let mut total_nll = 0.0;
    for (i, window) in windows.iter().enumerate() {
        total_nll += window_nll(model, std::slice::from_ref(window));
        progress(i + 1);
    }
    let seconds = start.elapsed().as_secs_f64();
    let predicted = windows.len() * (seq_len - 1);
    let mean_nll = total_nll / predicted as f64;
    if !mean_nll.is_finite() {
        bail!("the model produced a non-finite loss ({mean_nll})");
    }
    Ok(PerplexityReport {
        perplexity: mean_nll.exp(),
        mean_nll,
        windows: windows.len(),
        seq_len,
        predicted_tokens: predicted,
        file_tokens,
        seconds,
        tokens_per_second: (windows.len() * seq_len) as f64 / seconds,
    })
}
