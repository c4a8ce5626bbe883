//! Accuracy (max |error| against an f64 product) and speed (median of 5, GFLOP/s counted as f32
//! FLOPs, 2 threads) of the AMX split-bf16 product against the `gemm` crate's AVX-512 f32 one,
//! on SmolLM2-135M's shapes at 512 tokens (q/o, gate/up, down, k/v, one head tile) and 2048³.
//! `cargo run --release` here; `SINGLE_TERM=1` for the one-term (plain bf16) rate.
#[cfg(not(target_arch = "x86_64"))]
compile_error!("amx-split-bf16 measures Intel's AMX unit: x86_64 only");

mod amx;
use std::io::Write;
use std::time::Instant;

fn uniform(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn reference(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for kk in 0..k {
            let x = a[i * k + kk] as f64;
            for j in 0..n {
                c[i * n + j] += x * b[kk * n + j] as f64;
            }
        }
    }
    c
}

fn crate_gemm(m: usize, n: usize, k: usize, dst: &mut [f32], a: &[f32], b: &[f32], threads: usize) {
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: a is [m, k], b [k, n], dst [m, n], all row-major and of those sizes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

fn median_seconds(repeats: usize, f: &mut dyn FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            (0..repeats).for_each(|_| f());
            start.elapsed().as_secs_f64() / repeats as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[2]
}

fn main() {
    if !amx::available() {
        eprintln!("amx-split-bf16: this CPU or kernel offers no AMX tiles");
        std::process::exit(1);
    }
    // A closed pipe (`| head`) ends the run quietly; any other write error is reported.
    if let Err(error) = measure(&mut std::io::stdout().lock()) {
        if error.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("amx-split-bf16: writing the tables: {error}");
            std::process::exit(1);
        }
    }
}

fn measure(out: &mut impl Write) -> std::io::Result<()> {
    let threads = 2;
    let mut seed = 7u64;
    writeln!(out, "| shape m×n×k | max error, AMX split | max error, gemm f32 |\n| --- | --- | --- |")?;
    for &(m, n, k) in &[(37usize, 45usize, 70usize), (64, 64, 576), (512, 96, 1536)] {
        let a: Vec<f32> = (0..m * k).map(|_| uniform(&mut seed)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| uniform(&mut seed)).collect();
        let exact = reference(m, n, k, &a, &b);
        let mut split = vec![0f32; m * n];
        amx::gemm(m, n, k, &mut split, n, false, amx::Strided { values: &a, row: k, col: 1 }, amx::Strided { values: &b, row: n, col: 1 }, threads);
        let mut plain = vec![0f32; m * n];
        crate_gemm(m, n, k, &mut plain, &a, &b, threads);
        let error = |c: &[f32]| c.iter().zip(&exact).map(|(x, r)| (*x as f64 - r).abs()).fold(0.0, f64::max);
        writeln!(out, "| {m}×{n}×{k} | {:.2e} | {:.2e} |", error(&split), error(&plain))?;
    }
    writeln!(out, "\n| shape m×n×k | AMX, rhs packed per call | AMX, rhs packed once | gemm f32 (AVX-512) |\n| --- | --- | --- | --- |")?;
    for &(m, n, k) in &[(512usize, 576usize, 576usize), (512, 1536, 576), (512, 576, 1536), (512, 192, 576), (256, 512, 576), (2048, 2048, 2048)] {
        let a: Vec<f32> = (0..m * k).map(|_| uniform(&mut seed)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| uniform(&mut seed)).collect();
        let mut c = vec![0f32; m * n];
        let flop = 2.0 * (m * n * k) as f64;
        let repeats = (2e10 / flop).max(3.0) as usize;
        let (lhs, rhs) = (amx::Strided { values: &a, row: k, col: 1 }, amx::Strided { values: &b, row: n, col: 1 });
        let packed = amx::PackedRhs::new(k, n, rhs, true);
        let per_call = median_seconds(repeats, &mut || amx::gemm(m, n, k, &mut c, n, false, lhs, rhs, threads));
        let once = median_seconds(repeats, &mut || amx::gemm_packed(m, &mut c, n, false, lhs, &packed, threads));
        let plain = median_seconds(repeats, &mut || crate_gemm(m, n, k, &mut c, &a, &b, threads));
        writeln!(out, "| {m}×{n}×{k} | {:.0} | {:.0} | {:.0} |", flop / per_call / 1e9, flop / once / 1e9, flop / plain / 1e9)?;
    }
    Ok(())
}
