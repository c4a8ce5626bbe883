//! Next-token NLL computed on the host for evaluation (no gradients needed). burn's CPU
//! backend evaluates `exp` with scalar libm calls, which made the vocabulary-wide logsumexp a
//! fifth of an evaluation window on SmolLM2; a vectorisable exp and two threads make it small.

use disp_core::fastmath::exp_nonpositive;

/// log Σ exp(row).
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0f64;
    for chunk in row.chunks(64) {
        // A short f32 sum per chunk vectorises; the running total stays in f64.
        let partial: f32 = chunk.iter().map(|&v| exp_nonpositive(v - max)).sum();
        total += partial as f64;
    }
    max as f64 + total.ln()
}

/// Σ over rows of logsumexp(row) − row[target], rows of `vocab` logits; split over threads.
pub fn summed_nll(logits: &[f32], vocab: usize, targets: &[u32]) -> f64 {
    assert_eq!(logits.len(), vocab * targets.len(), "one target per row");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(targets.len().max(1));
    let rows_per_thread = targets.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = logits
            .chunks(rows_per_thread * vocab)
            .zip(targets.chunks(rows_per_thread))
            .map(|(rows, targets)| {
                scope.spawn(move || rows.chunks_exact(vocab).zip(targets).map(|(row, &t)| log_sum_exp(row) - row[t as usize] as f64).sum::<f64>())
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("NLL thread")).sum()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_matches_the_direct_formula() {
        let vocab = 1000;
        let logits: Vec<f32> = (0..3 * vocab).map(|i| ((i * 7919) % 1013) as f32 / 50.0 - 10.0).collect();
        let targets = [3u32, 999, 0];
        let direct: f64 = logits
            .chunks(vocab)
            .zip(&targets)
            .map(|(row, &t)| row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln() - row[t as usize] as f64)
            .sum();
        assert!((summed_nll(&logits, vocab, &targets) - direct).abs() < 1e-6 * direct.abs());
    }
}
