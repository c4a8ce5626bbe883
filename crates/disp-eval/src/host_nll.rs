//! Next-token NLL computed on the host for evaluation (no gradients needed). burn's CPU
//! backend evaluates `exp` with scalar libm calls, which made the vocabulary-wide logsumexp a
//! fifth of an evaluation window on SmolLM2; a vectorisable exp and two threads make it small.

/// exp(x) for x in [-87, 0], written so the compiler vectorises it:
/// 2^(x·log2 e) split into an integer power of two (built in the exponent bits) and a degree-7
/// polynomial for 2^f, |f| ≤ 0.5.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to the nearest integer
    let t = x.max(-87.0) * std::f32::consts::LOG2_E;
    let n = (t + ROUND) - ROUND;
    let f = (t - n) * std::f32::consts::LN_2;
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

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
                scope.spawn(move || {
                    rows.chunks_exact(vocab)
                        .zip(targets)
                        .map(|(row, &t)| log_sum_exp(row) - row[t as usize] as f64)
                        .sum::<f64>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("NLL thread")).sum()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let (ours, exact) = (exp_nonpositive(x), (x as f64).exp());
            // Rounding x·log2(e) to f32 alone costs |x|·6e-8 relative; the polynomial adds ~1e-7.
            let tolerance = 2e-7 * (1.0 + x.abs() as f64);
            assert!(((ours as f64 - exact) / exact).abs() < tolerance, "exp({x}) = {ours}, expected {exact}");
        }
    }

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
