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

/// Lanes of the split reductions below: one AVX-512 register of f32. A plain `fold` or `sum` over
/// floats is one serial chain (the compiler may not reorder it), so it runs one value at a time;
/// lane-wise partial results let each step of the loop work on a whole vector.
const LANES: usize = 16;

/// Values per f32 partial sum in [`exp_in_place_sum`] (64 per lane); the blocks add up in f64.
const SUM_BLOCK: usize = 64 * LANES;

/// Whether this machine runs the AVX-512 builds of [`with_wide_vectors`] (the workspace compiles
/// for baseline x86-64, whose 4-lane SSE2 would do a quarter of a step's lanes per instruction).
#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
}

/// Runs `f` as an AVX-512 build where the machine has it: `f`'s loops, inlined into a function
/// compiled with AVX-512F, vectorise 16 lanes wide instead of baseline SSE2's 4. Element-wise
/// loops give the same bits either way (only the vector width changes, not the operations).
/// Loops inside rayon tasks that `f` spawns are not covered: wrap each task's body instead.
/// Pass the closure as `#[inline(always)] || …`: without it LLVM often keeps the closure a
/// separate baseline function that the AVX-512 trampoline merely calls (`objdump` of the
/// release binary found half of the wrapped loops so, each a 14-instruction trampoline).
pub fn with_wide_vectors<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the machine has AVX-512F (checked above).
        return unsafe { call_avx512(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn call_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// The largest of `values` (−∞ when empty; NaNs are passed over), by lane-wise maxima.
pub fn max(values: &[f32]) -> f32 {
    with_wide_vectors(
        #[inline(always)]
        || max_lanes(values),
    )
}

#[inline(always)]
fn max_lanes(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = if v > *lane { v } else { *lane };
        }
    }
    lanes.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Σ f(v) over `values` in 16 lanes of partial sums (a plain float `sum` is one serial chain):
/// for the short rows of a norm (a few thousand values), inlined into the caller's loop, so it
/// is as wide as the build it lands in (see [`with_wide_vectors`]).
#[inline(always)]
pub fn sum_by(values: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += f(v);
        }
    }
    lanes.iter().sum::<f32>() + rest.iter().map(|&v| f(v)).sum::<f32>()
}

/// Replaces each value v by exp(v·scale − shift) and returns their sum; `shift` ≥ every v·scale
/// (the row's scaled maximum), so each exponent is ≤ 0. Lane-wise f32 partial sums per block of
/// `SUM_BLOCK` values, added in f64.
pub fn exp_in_place_sum(values: &mut [f32], scale: f32, shift: f32) -> f64 {
    with_wide_vectors(
        #[inline(always)]
        || exp_in_place_sum_lanes(values, scale, shift),
    )
}

#[inline(always)]
fn exp_in_place_sum_lanes(values: &mut [f32], scale: f32, shift: f32) -> f64 {
    let mut total = 0f64;
    for block in values.chunks_mut(SUM_BLOCK) {
        let mut lanes = [0f32; LANES];
        let mut chunks = block.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (lane, v) in lanes.iter_mut().zip(chunk.iter_mut()) {
                *v = exp_nonpositive(*v * scale - shift);
                *lane += *v;
            }
        }
        let mut rest = 0f32;
        for v in chunks.into_remainder() {
            *v = exp_nonpositive(*v * scale - shift);
            rest += *v;
        }
        total += (lanes.iter().sum::<f32>() + rest) as f64;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both reductions equal their plain definitions on lengths around the lane and block sizes
    /// (the max exactly; the sum within f32 rounding of the f64 sum of libm's exp).
    #[test]
    fn split_reductions_equal_the_plain_ones() {
        for len in [0, 1, 15, 16, 17, 100, SUM_BLOCK - 1, SUM_BLOCK, SUM_BLOCK + 33, 49_152] {
            let values: Vec<f32> = (0..len).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0).collect();
            let plain = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&values), plain, "length {len}");
            let scale = 0.125;
            let shift = plain * scale;
            let expected: f64 = values.iter().map(|&v| ((v * scale - shift) as f64).exp()).sum();
            let mut replaced = values.clone();
            let sum = exp_in_place_sum(&mut replaced, scale, shift);
            assert!((sum - expected).abs() <= 1e-6 * expected.max(1e-30), "length {len}: {sum} vs {expected}");
            for (r, v) in replaced.iter().zip(&values) {
                assert!((*r as f64 - ((v * scale - shift) as f64).exp()).abs() <= 1e-6, "length {len}");
            }
        }
        assert_eq!(max(&[f32::NAN, 1.0, -2.0]), 1.0);
    }

    /// The lane-wise sum equals the f64 sum within f32 rounding, around the lane size.
    #[test]
    fn the_lane_sum_equals_the_plain_sum() {
        for len in [0, 1, 15, 16, 17, 576, 1000] {
            let values: Vec<f32> = (0..len).map(|i| ((i * 7919 % 1000) as f32 - 400.0) / 37.0).collect();
            let expected: f64 = values.iter().map(|&v| (v as f64) * (v as f64)).sum();
            let ours = sum_by(&values, |v| v * v) as f64;
            assert!((ours - expected).abs() <= 1e-6 * expected.max(1.0), "length {len}: {ours} vs {expected}");
            let plain: f64 = values.iter().map(|&v| v as f64).sum();
            assert!((sum_by(&values, |v| v) as f64 - plain).abs() <= 1e-5 * expected.sqrt().max(1.0), "length {len}");
        }
    }

    /// An element-wise loop (the shape of the host paths': products, a polynomial exp, a select)
    /// gives the same bits inside `with_wide_vectors` as outside it.
    #[test]
    fn a_wide_build_of_an_element_loop_gives_the_same_bits() {
        let x: Vec<f32> = (0..4_099).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 61.0).collect();
        let silu_times = |out: &mut [f32]| {
            for (o, &v) in out.iter_mut().zip(&x) {
                let e = exp_nonpositive(-v.abs());
                let s = if v >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
                *o += v * s * 0.75;
            }
        };
        let (mut narrow, mut wide) = (vec![0.5f32; x.len()], vec![0.5f32; x.len()]);
        silu_times(&mut narrow);
        with_wide_vectors(
            #[inline(always)]
            || silu_times(&mut wide),
        );
        assert!(narrow.iter().zip(&wide).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(narrow.iter().any(|&v| v != 0.5), "the loop ran");
    }

    /// The build the machine runs (AVX-512 on this project's machines) gives the same bits as the
    /// baseline build of the same loops.
    #[test]
    fn the_dispatched_build_equals_the_baseline_build() {
        let values: Vec<f32> = (0..5_000).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0).collect();
        assert_eq!(max(&values).to_bits(), max_lanes(&values).to_bits());
        let (mut a, mut b) = (values.clone(), values.clone());
        let shift = max_lanes(&values) * 0.3;
        assert_eq!(exp_in_place_sum(&mut a, 0.3, shift).to_bits(), exp_in_place_sum_lanes(&mut b, 0.3, shift).to_bits());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

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
