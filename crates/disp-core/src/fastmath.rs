//! Host-side float kernels that burn's CPU backend lacks: its element-wise `exp` is a scalar libm
//! call per value, which made the vocabulary logsumexp and the attention softmax dominant costs.

/// exp(x) for x ≤ 0 (values below -87 give ~0), written so the compiler vectorises it:
/// 2^(x·log2 e) split into an integer power of two (built in the exponent bits) and a degree-7
/// polynomial for 2^f, |f| ≤ 0.5. Relative error ≤ 2e-7·(1 + |x|).
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to the nearest integer
    let t = x.max(-87.0) * std::f32::consts::LOG2_E;
    let n = (t + ROUND) - ROUND;
    let f = (t - n) * std::f32::consts::LN_2;
    let p = 1.0 + f * (1.0 + f * (0.5 + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
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
        assert!(exp_nonpositive(-1e4) < 1e-37 && exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
    }
}
