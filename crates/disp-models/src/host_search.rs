//! The search's masked forward and its backward to the gates, computed on host memory.
//!
//! The model is frozen, so a search step needs only the input gradients of its linears (one gemm
//! against the stored weight each, never a weight gradient) and, per site, the gate gradient
//! Σ_rows(upstream · gated value). burn's autodiff records every element-wise op with a fresh
//! buffer and computes the same products one op at a time; here each block's forward keeps the
//! few activations its backward reads, the vocabulary projection and the loss run in blocks of
//! rows (the `[T, vocab]` logits are never stored), and attention recomputes its softmax in
//! blocks of query rows in the backward (flash-attention style) with the same gemm calls as the
//! forward. The caller turns the gate gradients into the hypernetwork's gradient through the
//! surrogate Σ gates · ∂L/∂gates (exact: the gates are the only path from the hypernetwork to the
//! loss).
//!
//! Covered: pre-norm blocks (LLaMA, SmolLM2, Qwen2, Mistral, OPT pre-LN), RMSNorm and
//! LayerNorm, biases, gated and two-matrix MLPs with SiLU / ReLU / tanh-GELU, full and partial
//! rotary, sliding windows, tied or untied heads with or without a bias. Everything else (OPT
//! post-norm, Phi's parallel block, Qwen3's q/k norms, a projection after the final norm, exact
//! GELU, any device but the plain CPU one) returns `None` and the search uses burn's autodiff.

use burn::backend::flex::FlexTensor;
use burn::backend::Flex;
use burn::tensor::{Device, Tensor};
use disp_core::fastmath::{self, exp_nonpositive};
use rayon::prelude::*;

use crate::decoder::{Block, BlockNorms, DecoderLm, Norm};
use crate::host_attention::{causal_attention_rows, AttentionShape};
use crate::host_bf16::{Bf16Rows, PackedBf16};
use crate::host_forward::Pass;
use crate::layers::{Activation, Linear};

/// The LM loss of one masked forward pass and its gradient with respect to every gate.
#[derive(Debug, Clone)]
pub struct GateGradients {
    /// Mean next-token NLL over the B·(T−1) predicted positions.
    pub loss: f64,
    /// ∂loss/∂gate per layer and site (S1..S5), each as wide as its gate.
    pub layers: Vec<[Vec<f32>; 5]>,
}

/// A 2-D float tensor on the host: row `r`, column `c` at `offset + r·row + c·col` of `values()`.
pub(crate) struct Matrix {
    storage: Storage,
    offset: usize,
    row: usize,
    col: usize,
}

enum Storage {
    /// burn-flex's own f32 buffer (any strides: a tied head is the transposed embedding).
    Borrowed(FlexTensor),
    /// Converted from another dtype, one matrix at a time.
    Owned(Vec<f32>),
}

impl Matrix {
    fn of(tensor: &Tensor<2>) -> Self {
        if let Some(borrowed) = Self::borrowed(tensor) {
            return borrowed;
        }
        let [_, cols] = tensor.dims();
        let values = tensor.clone().into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 values");
        Self { storage: Storage::Owned(values), offset: 0, row: cols, col: 1 }
    }

    /// The tensor's own f32 buffer, when it has one (no copy).
    fn borrowed(tensor: &Tensor<2>) -> Option<Self> {
        let flex = tensor.clone().try_into_primitive::<Flex>().ok()?;
        let strides = flex.layout().strides().to_vec();
        if flex.dtype() != burn::tensor::DType::F32 || strides.iter().any(|&s| s < 0) {
            return None;
        }
        let offset = flex.layout().start_offset();
        Some(Self { offset, row: strides[0] as usize, col: strides[1] as usize, storage: Storage::Borrowed(flex) })
    }

    fn values(&self) -> &[f32] {
        match &self.storage {
            Storage::Borrowed(flex) => &flex.storage::<f32>()[self.offset..],
            Storage::Owned(values) => values,
        }
    }

    /// (values, row stride, column stride).
    pub(crate) fn strided(&self) -> (&[f32], usize, usize) {
        (self.values(), self.row, self.col)
    }
}

/// `tensor`'s values on the host (its own buffer when it is f32, else converted).
pub(crate) fn host_matrix(tensor: &Tensor<2>) -> Matrix {
    Matrix::of(tensor)
}

fn vector(tensor: &Tensor<1>) -> Vec<f32> {
    tensor.clone().into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 values")
}

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]`, each operand given as (values, row stride, column
/// stride); `dst` is row-major with row stride `dst_row`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_row: usize,
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) {
    gemm_on_threads(m, n, k, dst, dst_row, accumulate, lhs, rhs, rayon::current_num_threads());
}

/// [`gemm`] on at most `threads` threads (1: on the calling thread, for a task that is one of
/// many parallel tasks already).
#[allow(clippy::too_many_arguments)]
fn gemm_on_threads(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_row: usize,
    accumulate: bool,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= (m - 1) * dst_row + n);
    if k > 0 {
        assert!(lhs.0.len() > (m - 1) * lhs.1 + (k - 1) * lhs.2 && rhs.0.len() > (k - 1) * rhs.1 + (n - 1) * rhs.2);
    }
    // SAFETY: the asserts above bound every element each operand's strides reach; a column share
    // of `rhs` starts inside it and reaches no further than the whole.
    let call = |m: usize, n: usize, dst: &mut [f32], rhs_values: &[f32], parallelism| unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.2 as isize,
            lhs.1 as isize,
            rhs_values.as_ptr(),
            rhs.2 as isize,
            rhs.1 as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    };
    let large = m * n * k > THREADS_MIN_PRODUCTS;
    if let Some(chunk) = one_row_share(m, n, k, threads) {
        dst[..n].par_chunks_mut(chunk).enumerate().for_each(|(i, part)| {
            call(1, part.len(), part, &rhs.0[i * chunk * rhs.2..], gemm::Parallelism::None);
        });
        return;
    }
    call(m, n, dst, rhs.0, if large && threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None });
}

/// Multiply-adds below which a product stays on one thread: less does not amortise the hand-off.
const THREADS_MIN_PRODUCTS: usize = 1 << 18;

/// Columns of one thread's share of a single-row product, at least (a multiple of the AVX-512
/// width, and enough to amortise the task).
const GEMV_MIN_COLUMNS: usize = 64;

/// The columns of each thread's share when an `[m, k] · [k, n]` product is a single row worth
/// splitting across `threads`, else `None`. gemm runs a single row (a decode step, the head of
/// the last position) as a one-thread gemv, which is bound by reading the weights: split by
/// columns, every thread streams its share of each weight row.
fn one_row_share(m: usize, n: usize, k: usize, threads: usize) -> Option<usize> {
    (m == 1 && n * k > THREADS_MIN_PRODUCTS && threads > 1 && n >= 2 * GEMV_MIN_COLUMNS)
        .then(|| n.div_ceil(threads).next_multiple_of(GEMV_MIN_COLUMNS))
}

/// `x·W + b` of each of `layers`, which all read the same `x` `[rows, in]` (q/k/v, gate/up). A
/// single row (a decoding step) has the layers' columns dealt out to the threads as if they were
/// one matrix, so that no thread idles while another streams a matrix too small to split alone.
pub(crate) fn linears_of_one_input<const N: usize>(layers: [&Linear; N], x: &[f32], rows: usize) -> [Vec<f32>; N] {
    let inputs = layers[0].inputs();
    assert!(layers.iter().all(|layer| layer.inputs() == inputs) && x.len() == rows * inputs);
    if let Some(packed) = packed_copies(layers) {
        let x = Bf16Rows::of(x, rows, inputs);
        let mut outs = packed.map(|p| p.product(&x));
        for (out, layer) in outs.iter_mut().zip(layers) {
            add_bias(layer, out);
        }
        return outs;
    }
    let widths = layers.map(Linear::outputs);
    let total: usize = widths.iter().sum();
    let Some(share) = one_row_share(rows, total, inputs, rayon::current_num_threads()) else {
        return layers.map(|layer| linear(layer, x, rows));
    };
    // Thread t takes the columns [t·share, (t+1)·share) of the layers side by side; a share may
    // span two layers, so it is a list of (layer, first column, output slice).
    let weights: [Matrix; N] = layers.map(|layer| Matrix::of(&layer.weight));
    let mut outs = widths.map(|n| vec![0f32; n]);
    let mut tasks: Vec<Vec<(usize, usize, &mut [f32])>> = (0..total.div_ceil(share)).map(|_| Vec::new()).collect();
    let mut global = 0;
    for (layer, out) in outs.iter_mut().enumerate() {
        let mut rest: &mut [f32] = out;
        let mut column = 0;
        while !rest.is_empty() {
            let len = rest.len().min(share - global % share);
            let (piece, tail) = rest.split_at_mut(len);
            tasks[global / share].push((layer, column, piece));
            (rest, column, global) = (tail, column + len, global + len);
        }
    }
    tasks.into_par_iter().for_each(|pieces| {
        for (layer, column, dst) in pieces {
            let w = &weights[layer];
            let n = dst.len();
            gemm_on_threads(1, n, inputs, dst, n, false, (x, inputs, 1), (&w.values()[column * w.col..], w.row, w.col), 1);
        }
    });
    for (out, layer) in outs.iter_mut().zip(layers) {
        add_bias(layer, out);
    }
    outs
}

/// `x·W + b`, `x` `[rows, in]`: one gemm straight on the stored weight (borrowed from burn's
/// buffer when it is f32, converted per matrix otherwise).
pub(crate) fn linear(layer: &Linear, x: &[f32], rows: usize) -> Vec<f32> {
    let (inputs, outputs) = (layer.inputs(), layer.outputs());
    if let Some([packed]) = packed_copies([layer]) {
        let mut out = packed.product(&Bf16Rows::of(x, rows, inputs));
        add_bias(layer, &mut out);
        return out;
    }
    let w = Matrix::of(&layer.weight);
    let mut out = vec![0f32; rows * outputs];
    gemm(rows, outputs, inputs, &mut out, outputs, false, (x, inputs, 1), (w.values(), w.row, w.col));
    add_bias(layer, &mut out);
    out
}

/// The packed bf16 copies of `layers` when every one has a current copy (`--compute bf16`):
/// layers that read one input are multiplied at one precision.
fn packed_copies<const N: usize>(layers: [&Linear; N]) -> Option<[&PackedBf16; N]> {
    let packed = layers.map(Linear::packed_bf16);
    packed.iter().all(Option::is_some).then(|| packed.map(|p| p.expect("checked")))
}

/// Adds `layer`'s bias, if it has one, to every row of its output `out` `[rows, outputs]`.
pub(crate) fn add_bias(layer: &Linear, out: &mut [f32]) {
    if let Some(bias) = &layer.bias {
        let b = vector(bias);
        out.par_chunks_mut(layer.outputs()).for_each(|row| {
            fastmath::with_wide_vectors(
                #[inline(always)]
                || row.iter_mut().zip(&b).for_each(|(y, b)| *y += b),
            )
        });
    }
}

/// `dst (+)= dy·Wᵀ`: the input gradient of a linear, `dy` `[rows, out]`; from the row-major copy
/// of `Wᵀ` in `copies` where it keeps one.
fn linear_input_grad(layer: &Linear, dy: &[f32], rows: usize, dst: &mut [f32], accumulate: bool, copies: &BackwardWeights) {
    let (inputs, outputs) = (layer.inputs(), layer.outputs());
    if let Some(transposed) = copies.transposed(&layer.weight, inputs, outputs) {
        return gemm(rows, inputs, outputs, dst, inputs, accumulate, (dy, outputs, 1), (&transposed, inputs, 1));
    }
    let w = Matrix::of(&layer.weight);
    gemm(rows, inputs, outputs, dst, inputs, accumulate, (dy, outputs, 1), (w.values(), w.col, w.row));
}

/// Row-major f32 copies of the block linears' transposed weights (`[out, in]`), which the
/// search backward's input gradients `dy·Wᵀ` read instead of the `[in, out]` weights themselves.
/// The gemm crate packs its operands for its kernel on every call, and `Wᵀ` read from the
/// `[in, out]` layout is packed across rows: those products ran at about three quarters of the
/// forward's rate at the same sizes (SmolLM2, seq 512: the gate/up input gradients 353–367 ms
/// a step against 263–268 ms from copies; docs/performance.md). Each copy is made on the linear's
/// first backward and kept for the search (4 bytes per weight; the search keeps them only when
/// they fit, see `disp_train`); `as_stored` keeps none. One per model: a copy is used only for
/// the buffer it was made from, which it holds.
pub struct BackwardWeights {
    keep: bool,
    copies: std::sync::Mutex<Vec<TransposedCopy>>,
}

/// A weight's `[in, out]` buffer (held, so that it stays the same values) and its transpose.
struct TransposedCopy {
    source: Matrix,
    outputs: usize,
    transposed: std::sync::Arc<[f32]>,
}

impl BackwardWeights {
    /// Copies made on first use and kept.
    pub fn transposed_copies() -> Self {
        Self { keep: true, copies: std::sync::Mutex::new(Vec::new()) }
    }

    /// No copies: the backward reads the weights as stored.
    pub fn as_stored() -> Self {
        Self { keep: false, copies: std::sync::Mutex::new(Vec::new()) }
    }

    /// Bytes the copies take once every block linear has one, at most (the shape's parameter
    /// count includes the biases, which are not copied).
    pub fn bytes_for(shape: &disp_core::params::ModelShape) -> u64 {
        4 * shape.dense_block_params()
    }

    /// How many weights have a copy so far.
    pub fn copies_made(&self) -> usize {
        self.copies.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// The row-major `Wᵀ` `[outputs, inputs]` of `weight` `[inputs, outputs]` (made now if this
    /// is its first use), or `None` when no copy is kept (`as_stored`, or a weight stored below
    /// f32: converted per call anyway, so it is never held twice).
    fn transposed(&self, weight: &Tensor<2>, inputs: usize, outputs: usize) -> Option<std::sync::Arc<[f32]>> {
        let w = Matrix::borrowed(weight).filter(|_| self.keep)?;
        let same = |c: &TransposedCopy| {
            std::ptr::eq(c.source.values().as_ptr(), w.values().as_ptr()) && (c.source.row, c.source.col, c.outputs) == (w.row, w.col, outputs)
        };
        let mut copies = self.copies.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(copy) = copies.iter().find(|c| same(c)) {
            return Some(copy.transposed.clone());
        }
        let transposed: std::sync::Arc<[f32]> = transpose(&w, inputs, outputs).into();
        copies.push(TransposedCopy { source: w, outputs, transposed: transposed.clone() });
        Some(transposed)
    }
}

/// `[outputs, inputs]` row-major from `w` `[inputs, outputs]` (any strides), in tiles.
fn transpose(w: &Matrix, inputs: usize, outputs: usize) -> Vec<f32> {
    const TILE: usize = 32;
    let values = w.values();
    let mut out = vec![0f32; inputs * outputs];
    out.par_chunks_mut(TILE * inputs).enumerate().for_each(|(block, rows)| {
        let first = block * TILE;
        for i0 in (0..inputs).step_by(TILE) {
            for (o, row) in rows.chunks_exact_mut(inputs).enumerate() {
                for (i, value) in row.iter_mut().enumerate().skip(i0).take(TILE) {
                    *value = values[i * w.row + (first + o) * w.col];
                }
            }
        }
    });
    out
}

/// A norm's parameters on the host.
pub(crate) enum HostNorm {
    Rms { weight: Vec<f32>, eps: f32 },
    Layer { weight: Vec<f32>, bias: Vec<f32>, eps: f32 },
}

impl HostNorm {
    pub(crate) fn of(norm: &Norm) -> Self {
        match norm {
            Norm::Rms(n) => Self::Rms { weight: vector(&n.weight), eps: n.eps as f32 },
            Norm::Layer { norm: n, .. } => Self::Layer { weight: vector(&n.weight), bias: vector(&n.bias), eps: n.eps as f32 },
        }
    }

    /// Rows of `x` `[rows, width]` normalised into `out`.
    fn forward(&self, x: &[f32], width: usize) -> Vec<f32> {
        let mut out = x.to_vec();
        self.normalize_rows(&mut out, width);
        out
    }

    /// Normalises every `width`-long row of `x` in place (rows in parallel, each a wide-vector
    /// build with lane-wise sums).
    pub(crate) fn normalize_rows(&self, x: &mut [f32], width: usize) {
        let n = width as f32;
        x.par_chunks_mut(width).for_each(|row| {
            fastmath::with_wide_vectors(
                #[inline(always)]
                || match self {
                    Self::Rms { weight, eps } => {
                        let inverse = 1.0 / (fastmath::sum_by(row, |v| v * v) / n + eps).sqrt();
                        row.iter_mut().zip(weight).for_each(|(v, w)| *v = *v * inverse * w);
                    }
                    Self::Layer { weight, bias, eps } => {
                        let mean = fastmath::sum_by(row, |v| v) / n;
                        row.iter_mut().for_each(|v| *v -= mean);
                        let inverse = 1.0 / (fastmath::sum_by(row, |v| v * v) / n + eps).sqrt();
                        row.iter_mut().zip(weight.iter().zip(bias)).for_each(|(v, (w, b))| *v = *v * inverse * w + b);
                    }
                },
            )
        });
    }

    /// Adds ∂L/∂x to `dx` for the norm's input `x` and output gradient `dy`, row by row.
    fn backward(&self, x: &[f32], dy: &[f32], dx: &mut [f32], width: usize) {
        let n = width as f32;
        dx.par_chunks_mut(width).zip(x.par_chunks(width).zip(dy.par_chunks(width))).for_each(|(dx, (x, dy))| {
            fastmath::with_wide_vectors(
                #[inline(always)]
                || match self {
                    Self::Rms { weight, eps } => {
                        let r = (fastmath::sum_by(x, |v| v * v) / n + eps).sqrt();
                        let dot: f32 = x.iter().zip(dy.iter().zip(weight)).map(|(x, (dy, w))| x * dy * w).sum();
                        let (k, inverse) = (dot / (n * r * r * r), 1.0 / r);
                        for (((dx, dy), w), x) in dx.iter_mut().zip(dy).zip(weight).zip(x) {
                            *dx += dy * w * inverse - x * k;
                        }
                    }
                    Self::Layer { weight, eps, .. } => {
                        let mean = fastmath::sum_by(x, |v| v) / n;
                        let std = (fastmath::sum_by(x, |v| (v - mean) * (v - mean)) / n + eps).sqrt();
                        let inverse = 1.0 / std;
                        let (mut mean_g, mut mean_gx) = (0f32, 0f32);
                        for ((dy, w), x) in dy.iter().zip(weight).zip(x) {
                            let g = dy * w;
                            mean_g += g;
                            mean_gx += g * (x - mean) * inverse;
                        }
                        let (mean_g, mean_gx) = (mean_g / n, mean_gx / n);
                        for (((dx, dy), w), x) in dx.iter_mut().zip(dy).zip(weight).zip(x) {
                            let xhat = (x - mean) * inverse;
                            *dx += (dy * w - mean_g - xhat * mean_gx) * inverse;
                        }
                    }
                },
            )
        });
    }
}

/// The activation and its derivative at `x`.
#[inline(always)]
pub(crate) fn activation(kind: Activation, x: f32) -> (f32, f32) {
    match kind {
        Activation::Silu => {
            let e = exp_nonpositive(-x.abs());
            let s = if x >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
            (x * s, s * (1.0 + x * (1.0 - s)))
        }
        Activation::Relu => (x.max(0.0), if x > 0.0 { 1.0 } else { 0.0 }),
        Activation::GeluTanh => {
            let c = (2.0 / std::f32::consts::PI).sqrt();
            let t = ((x + 0.044715 * x * x * x) * c).tanh();
            (0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x))
        }
        Activation::Gelu => unreachable!("the exact GELU is not covered (see `covers`)"),
    }
}

/// `x ⊙ gate` per column, `x` `[rows, width]`.
fn gated(x: &[f32], gate: &[f32]) -> Vec<f32> {
    let mut out = x.to_vec();
    out.par_chunks_mut(gate.len()).for_each(|row| {
        fastmath::with_wide_vectors(
            #[inline(always)]
            || row.iter_mut().zip(gate).for_each(|(v, g)| *v *= g),
        )
    });
    out
}

/// Σ over rows of `a ⊙ b`, `[width]`.
fn column_dot(a: &[f32], b: &[f32], width: usize) -> Vec<f32> {
    let partial = a
        .par_chunks(width * 64)
        .zip(b.par_chunks(width * 64))
        .map(|(a, b)| {
            fastmath::with_wide_vectors(
                #[inline(always)]
                || {
                    let mut sum = vec![0f32; width];
                    for (a, b) in a.chunks_exact(width).zip(b.chunks_exact(width)) {
                        sum.iter_mut().zip(a.iter().zip(b)).for_each(|(s, (a, b))| *s += a * b);
                    }
                    sum
                },
            )
        })
        .collect::<Vec<_>>();
    sum_in_order(partial, width)
}

/// The element-wise sum of per-task partial sums `[width]`, added in task order on one thread:
/// the same bits on every run, whatever thread ran which task.
fn sum_in_order(partial: Vec<Vec<f32>>, width: usize) -> Vec<f32> {
    partial.into_iter().fold(vec![0f32; width], |mut x, y| {
        x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
        x
    })
}

/// What a block's backward reads from its forward.
struct Saved {
    x0: Vec<f32>,
    h1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    context: Vec<f32>,
    attn_out: Vec<f32>,
    x1: Vec<f32>,
    h2: Vec<f32>,
    /// Pre-activation of the gate (gated MLP) or of fc1.
    pre: Vec<f32>,
    up: Option<Vec<f32>>,
    mlp_out: Vec<f32>,
}

/// Whether [`gate_gradients`] covers this model (see the module documentation).
pub(crate) fn covers(model: &DecoderLm) -> bool {
    crate::host_forward::enabled()
        && model.device == Device::flex()
        && model.spec.activation != Activation::Gelu
        && model.ends.project_out.is_none()
        && model.blocks.iter().all(|b| matches!(b.norms, BlockNorms::Pre { .. }) && b.qk_norms.is_none() && b.kept.is_none())
}

/// Forward of block `b` with gates `g` (S1..S5) on `x` `[rows, d]`, in place; returns what the
/// backward needs.
fn block_forward(b: &Block, g: &[Vec<f32>; 5], x: &mut [f32], pass: &Pass) -> Saved {
    let BlockNorms::Pre { attn: attn_norm, mlp: mlp_norm } = &b.norms else { unreachable!("checked by `covers`") };
    let spec = &pass.model.spec;
    let (d, rows) = (spec.shape.hidden, pass.rows());
    let x0 = x.to_vec();
    let h1 = HostNorm::of(attn_norm).forward(&x0, d);
    let input = gated(&h1, &g[0]);
    let [wq, wk, wv] = &b.attn_inputs;
    let [mut q, mut k, v] = linears_of_one_input([wq, wk, wv], &input, rows);
    if let (Some(rope), Some(tables)) = (&spec.rope, &pass.rope_tables) {
        let seq = pass.seq;
        rope.rotate_rows(&mut q, spec.heads, tables, |r| r % seq);
        rope.rotate_rows(&mut k, spec.kv_heads, tables, |r| r % seq);
    }
    let shape = pass.self_attention(b);
    let (q_len, kv_len) = (pass.seq * spec.heads * spec.head_dim, pass.seq * spec.kv_heads * spec.head_dim);
    let mut context = Vec::with_capacity(rows * spec.heads * spec.head_dim);
    for bt in 0..pass.batch {
        let ks = bt * kv_len..(bt + 1) * kv_len;
        context.extend(causal_attention_rows(&q[bt * q_len..(bt + 1) * q_len], &k[ks.clone()], &v[ks], shape));
    }
    let attn_out = linear(&b.attn_output, &context, rows);
    add_gated(x, &attn_out, &g[1]);
    let x1 = x.to_vec();
    let h2 = HostNorm::of(mlp_norm).forward(&x1, d);
    let input = gated(&h2, &g[2]);
    let (pre, up) = match b.mlp_inputs.as_slice() {
        [gate, up] => {
            let [gate, up] = linears_of_one_input([gate, up], &input, rows);
            (gate, Some(up))
        }
        [fc1] => (linear(fc1, &input, rows), None),
        _ => unreachable!("blocks are loaded with one or two MLP inputs"),
    };
    let inter = intermediate(spec.activation, &pre, up.as_deref(), &g[3]);
    let mlp_out = linear(&b.mlp_output, &inter, rows);
    add_gated(x, &mlp_out, &g[4]);
    Saved { x0, h1, q, k, v, context, attn_out, x1, h2, pre, up, mlp_out }
}

/// `x += out ⊙ gate` per column.
fn add_gated(x: &mut [f32], out: &[f32], gate: &[f32]) {
    x.par_chunks_mut(gate.len()).zip(out.par_chunks(gate.len())).for_each(|(x, o)| {
        fastmath::with_wide_vectors(
            #[inline(always)]
            || x.iter_mut().zip(o.iter().zip(gate)).for_each(|(x, (o, g))| *x += o * g),
        );
    });
}

/// Runs `$body` with `$act` bound to the activation `$kind` and its derivative as a plain closure,
/// so that each element loop is compiled (and vectorised) for one activation, with no match inside.
macro_rules! with_activation {
    ($kind:expr, $act:ident => $body:expr) => {
        match $kind {
            $crate::layers::Activation::Silu => {
                let $act = |x: f32| $crate::host_search::activation($crate::layers::Activation::Silu, x);
                $body
            }
            $crate::layers::Activation::Relu => {
                let $act = |x: f32| $crate::host_search::activation($crate::layers::Activation::Relu, x);
                $body
            }
            $crate::layers::Activation::GeluTanh => {
                let $act = |x: f32| $crate::host_search::activation($crate::layers::Activation::GeluTanh, x);
                $body
            }
            $crate::layers::Activation::Gelu => unreachable!("the exact GELU is not covered (see `covers`)"),
        }
    };
}
pub(crate) use with_activation;

/// act(pre) (⊙ up) ⊙ gate S4.
fn intermediate(kind: Activation, pre: &[f32], up: Option<&[f32]>, gate: &[f32]) -> Vec<f32> {
    let mut out = pre.to_vec();
    let width = gate.len();
    with_activation!(kind, act => match up {
        Some(up) => out.par_chunks_mut(width).zip(up.par_chunks(width)).for_each(|(row, up)| {
            fastmath::with_wide_vectors(#[inline(always)] || row.iter_mut().zip(up.iter().zip(gate)).for_each(|(v, (u, g))| *v = act(*v).0 * u * g));
        }),
        None => out
            .par_chunks_mut(width)
            .for_each(|row| fastmath::with_wide_vectors(#[inline(always)] || row.iter_mut().zip(gate).for_each(|(v, g)| *v = act(*v).0 * g))),
    });
    out
}

/// One pass over the MLP intermediate's rows for the backward of act(pre) (⊙ up) ⊙ g4: fills
/// ∂L/∂pre (and ∂L/∂up) and returns the S4 gradient Σ_rows ∂L/∂inter ⊙ act(pre) (⊙ up).
fn intermediate_backward(
    kind: Activation,
    pre: &[f32],
    up: Option<&[f32]>,
    d_inter: &[f32],
    g4: &[f32],
    d_pre: &mut [f32],
    d_up: Option<&mut [f32]>,
) -> Vec<f32> {
    const ROWS: usize = 16;
    let ff = g4.len();
    let chunk = ff * ROWS;
    let partial: Vec<Vec<f32>> = with_activation!(kind, act => match (up, d_up) {
        (Some(up), Some(d_up)) => d_pre
            .par_chunks_mut(chunk)
            .zip(d_up.par_chunks_mut(chunk))
            .zip(pre.par_chunks(chunk).zip(up.par_chunks(chunk)).zip(d_inter.par_chunks(chunk)))
            .map(|((d_pre, d_up), ((pre, up), d_inter))| fastmath::with_wide_vectors(#[inline(always)] || {
                let mut sum = vec![0f32; ff];
                for ((((d_pre, d_up), pre), up), d_inter) in
                    d_pre.chunks_exact_mut(ff).zip(d_up.chunks_exact_mut(ff)).zip(pre.chunks_exact(ff)).zip(up.chunks_exact(ff)).zip(d_inter.chunks_exact(ff))
                {
                    for ((((((s, dp), du), p), u), di), g) in sum.iter_mut().zip(d_pre).zip(d_up).zip(pre).zip(up).zip(d_inter).zip(g4) {
                        let (a, da) = act(*p);
                        *s += di * a * u;
                        *dp = di * g * u * da;
                        *du = di * g * a;
                    }
                }
                sum
            }))
            .collect(),
        (None, None) => d_pre
            .par_chunks_mut(chunk)
            .zip(pre.par_chunks(chunk).zip(d_inter.par_chunks(chunk)))
            .map(|(d_pre, (pre, d_inter))| fastmath::with_wide_vectors(#[inline(always)] || {
                let mut sum = vec![0f32; ff];
                for ((d_pre, pre), d_inter) in d_pre.chunks_exact_mut(ff).zip(pre.chunks_exact(ff)).zip(d_inter.chunks_exact(ff)) {
                    for ((((s, dp), p), di), g) in sum.iter_mut().zip(d_pre).zip(pre).zip(d_inter).zip(g4) {
                        let (a, da) = act(*p);
                        *s += di * a;
                        *dp = di * g * da;
                    }
                }
                sum
            }))
            .collect(),
        _ => unreachable!("an up projection has an up gradient"),
    });
    sum_in_order(partial, ff)
}

/// Backward of block `b`: `dx` holds ∂L/∂(block output) and becomes ∂L/∂(block input);
/// returns the five gate gradients.
fn block_backward(b: &Block, g: &[Vec<f32>; 5], s: &Saved, dx: &mut [f32], pass: &Pass, copies: &BackwardWeights) -> [Vec<f32>; 5] {
    let BlockNorms::Pre { attn: attn_norm, mlp: mlp_norm } = &b.norms else { unreachable!("checked by `covers`") };
    let spec = &pass.model.spec;
    let (d, rows, ff) = (spec.shape.hidden, pass.rows(), g[3].len());
    // x2 = x1 + mlp_out ⊙ g5
    let grad_g5 = column_dot(dx, &s.mlp_out, d);
    let d_mlp_out = gated(dx, &g[4]);
    let mut d_inter = vec![0f32; rows * ff];
    linear_input_grad(&b.mlp_output, &d_mlp_out, rows, &mut d_inter, false, copies);
    // inter = act(pre) (⊙ up) ⊙ g4: one pass gives the S4 gradient and those of pre and up.
    let kind = spec.activation;
    let mut d_pre = vec![0f32; rows * ff];
    let mut d_up = s.up.as_ref().map(|_| vec![0f32; rows * ff]);
    let grad_g4 = intermediate_backward(kind, &s.pre, s.up.as_deref(), &d_inter, &g[3], &mut d_pre, d_up.as_deref_mut());
    let mut d_input = vec![0f32; rows * d];
    match (b.mlp_inputs.as_slice(), d_up) {
        ([gate, up], Some(d_up)) => {
            linear_input_grad(gate, &d_pre, rows, &mut d_input, false, copies);
            linear_input_grad(up, &d_up, rows, &mut d_input, true, copies);
        }
        ([fc1], None) => linear_input_grad(fc1, &d_pre, rows, &mut d_input, false, copies),
        _ => unreachable!("blocks are loaded with one or two MLP inputs"),
    }
    // input = h2 ⊙ g3, h2 = norm(x1)
    let grad_g3 = column_dot(&d_input, &s.h2, d);
    let d_h2 = gated(&d_input, &g[2]);
    HostNorm::of(mlp_norm).backward(&s.x1, &d_h2, dx, d);
    // x1 = x0 + attn_out ⊙ g2
    let grad_g2 = column_dot(dx, &s.attn_out, d);
    let d_attn_out = gated(dx, &g[1]);
    let (heads, kv_heads, hd) = (spec.heads, spec.kv_heads, spec.head_dim);
    let mut d_context = vec![0f32; rows * heads * hd];
    linear_input_grad(&b.attn_output, &d_attn_out, rows, &mut d_context, false, copies);
    let (mut dq, mut dk, dv) = attention_backward(s, &d_context, pass.self_attention(b), pass);
    if let (Some(rope), Some(tables)) = (&spec.rope, &pass.rope_tables) {
        let seq = pass.seq;
        rope.unrotate_rows(&mut dq, heads, tables, |r| r % seq);
        rope.unrotate_rows(&mut dk, kv_heads, tables, |r| r % seq);
    }
    let [wq, wk, wv] = &b.attn_inputs;
    linear_input_grad(wq, &dq, rows, &mut d_input, false, copies);
    linear_input_grad(wk, &dk, rows, &mut d_input, true, copies);
    linear_input_grad(wv, &dv, rows, &mut d_input, true, copies);
    // input = h1 ⊙ g1, h1 = norm(x0)
    let grad_g1 = column_dot(&d_input, &s.h1, d);
    let d_h1 = gated(&d_input, &g[0]);
    HostNorm::of(attn_norm).backward(&s.x0, &d_h1, dx, d);
    [grad_g1, grad_g2, grad_g3, grad_g4, grad_g5]
}

/// ∂L/∂q, ∂L/∂k, ∂L/∂v (row-major like q, k, v) from ∂L/∂context, recomputing each block of
/// query rows' softmax.
fn attention_backward(s: &Saved, d_context: &[f32], shape: AttentionShape, pass: &Pass) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttentionShape { heads, kv_heads, queries: seq, head_dim: hd, window, .. } = shape;
    let (q_row, kv_row, group) = (heads * hd, kv_heads * hd, heads / kv_heads);
    let scale = 1.0 / (hd as f32).sqrt();
    let rows = pass.rows();
    let mut dq = vec![0f32; rows * q_row];
    let mut dk = vec![0f32; rows * kv_row];
    let mut dv = vec![0f32; rows * kv_row];
    for bt in 0..pass.batch {
        let (qo, ko) = (bt * seq * q_row, bt * seq * kv_row);
        // Per query head: its dQ `[seq, hd]` and its share of its KV head's dK, dV.
        let per_head: Vec<[Vec<f32>; 3]> = (0..heads)
            .into_par_iter()
            .map(|h| {
                let kv = h / group;
                let q = &s.q[qo + h * hd..];
                let o = &s.context[qo + h * hd..];
                let d_o = &d_context[qo + h * hd..];
                let k = &s.k[ko + kv * hd..];
                let v = &s.v[ko + kv * hd..];
                head_backward(q, k, v, o, d_o, (q_row, kv_row), seq, hd, window, scale)
            })
            .collect();
        // Back to rows of all heads, rows in parallel; a KV head sums its query heads' shares in
        // head order (the same bits on any number of threads).
        let dq_rows = dq[qo..qo + seq * q_row].par_chunks_mut(q_row);
        let dkv_rows = dk[ko..ko + seq * kv_row].par_chunks_mut(kv_row).zip(dv[ko..ko + seq * kv_row].par_chunks_mut(kv_row));
        dq_rows.zip(dkv_rows).enumerate().for_each(|(t, (dq, (dk, dv)))| {
            for (h, [dqh, dkh, dvh]) in per_head.iter().enumerate() {
                let kv = h / group;
                dq[h * hd..][..hd].copy_from_slice(&dqh[t * hd..(t + 1) * hd]);
                dk[kv * hd..][..hd].iter_mut().zip(&dkh[t * hd..(t + 1) * hd]).for_each(|(a, b)| *a += b);
                dv[kv * hd..][..hd].iter_mut().zip(&dvh[t * hd..(t + 1) * hd]).for_each(|(a, b)| *a += b);
            }
        });
    }
    (dq, dk, dv)
}

const ROWS_PER_BLOCK: usize = 64;

/// One query head's backward; returns dQ, dK, dV as `[seq, hd]`.
#[allow(clippy::too_many_arguments)]
fn head_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    d_o: &[f32],
    (q_row, kv_row): (usize, usize),
    seq: usize,
    hd: usize,
    window: Option<usize>,
    scale: f32,
) -> [Vec<f32>; 3] {
    let first_key = |p: usize| window.map_or(0, |w| (p + 1).saturating_sub(w));
    let (mut dq, mut dk, mut dv) = (vec![0f32; seq * hd], vec![0f32; seq * hd], vec![0f32; seq * hd]);
    let mut p = vec![0f32; ROWS_PER_BLOCK * seq];
    let mut dp = vec![0f32; ROWS_PER_BLOCK * seq];
    for first in (0..seq).step_by(ROWS_PER_BLOCK) {
        let rows = ROWS_PER_BLOCK.min(seq - first);
        let lowest = first_key(first);
        let end = first + rows;
        let visible = end - lowest;
        let (p, dp) = (&mut p[..rows * visible], &mut dp[..rows * visible]);
        let (kb, vb) = (&k[lowest * kv_row..], &v[lowest * kv_row..]);
        // P = softmax(scale · Q Kᵀ) over each row's visible keys, as the forward.
        gemm(rows, visible, hd, p, visible, false, (&q[first * q_row..], q_row, 1), (kb, 1, kv_row));
        for (r, row) in p.chunks_exact_mut(visible).enumerate() {
            let position = first + r;
            let (from, to) = (first_key(position) - lowest, position + 1 - lowest);
            // max(s·scale) = max(s)·scale: rounding is monotonic and scale > 0.
            let max = fastmath::max(&row[from..to]) * scale;
            let inverse = (1.0 / fastmath::exp_in_place_sum(&mut row[from..to], scale, max)) as f32;
            row[from..to].iter_mut().for_each(|s| *s *= inverse);
            row[..from].fill(0.0);
            row[to..].fill(0.0);
        }
        // dP = dO Vᵀ; dS = P ⊙ (dP − rowsum(dO ⊙ O)) · scale
        gemm(rows, visible, hd, dp, visible, false, (&d_o[first * q_row..], q_row, 1), (vb, 1, kv_row));
        for (r, (dp, p)) in dp.chunks_exact_mut(visible).zip(p.chunks_exact(visible)).enumerate() {
            let t = first + r;
            let delta: f32 = o[t * q_row..][..hd].iter().zip(&d_o[t * q_row..][..hd]).map(|(a, b)| a * b).sum();
            dp.iter_mut().zip(p).for_each(|(ds, p)| *ds = p * (*ds - delta) * scale);
        }
        // dQ = dS K; dK += dSᵀ Q; dV += Pᵀ dO
        gemm(rows, hd, visible, &mut dq[first * hd..], hd, false, (dp, visible, 1), (kb, kv_row, 1));
        gemm(visible, hd, rows, &mut dk[lowest * hd..], hd, true, (dp, 1, visible), (&q[first * q_row..], q_row, 1));
        gemm(visible, hd, rows, &mut dv[lowest * hd..], hd, true, (p, 1, visible), (&d_o[first * q_row..], q_row, 1));
    }
    [dq, dk, dv]
}

/// Mean next-token NLL of `tokens` (`batch` rows of `seq`) under the model with `gates` (per
/// layer, S1..S5) and its gradient with respect to every gate; `None` where the model is not
/// covered (see the module documentation).
pub(crate) fn gate_gradients(
    model: &DecoderLm,
    tokens: &[u32],
    batch: usize,
    gates: &[[Vec<f32>; 5]],
    copies: &BackwardWeights,
) -> Option<GateGradients> {
    if !covers(model) || batch == 0 || !tokens.len().is_multiple_of(batch) {
        return None;
    }
    let seq = tokens.len() / batch;
    if seq < 2 {
        return None;
    }
    Some(crate::host_forward::on_pool(|| gate_gradients_on_pool(model, tokens, batch, seq, gates, copies)))
}

/// [`gate_gradients`] once its checks passed, on a rayon worker ([`crate::host_forward::on_pool`]).
fn gate_gradients_on_pool(
    model: &DecoderLm,
    tokens: &[u32],
    batch: usize,
    seq: usize,
    gates: &[[Vec<f32>; 5]],
    copies: &BackwardWeights,
) -> GateGradients {
    let d = model.spec.shape.hidden;
    // The copies before the step's activations: made in the backward, between blocks the
    // step frees, they would leave the heap in pieces that the next step faults in anew.
    for b in &model.blocks {
        let linears = b.attn_inputs.iter().chain([&b.attn_output]).chain(&b.mlp_inputs).chain([&b.mlp_output]);
        linears.for_each(|l| drop(copies.transposed(&l.weight, l.inputs(), l.outputs())));
    }
    let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    let ids = Tensor::<2, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(ids, [batch, seq]), &model.device);
    let embedded = model.ends.embed(ids, 0);
    let mut x = embedded.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 activations");
    let pass = Pass { model, batch, seq, rope_tables: model.spec.rope.as_ref().map(|r| r.half_tables(0, seq)) };
    let saved: Vec<Saved> = model.blocks.iter().zip(gates).map(|(b, g)| block_forward(b, g, &mut x, &pass)).collect();
    let final_norm = model.ends.final_norm.as_ref().map(HostNorm::of);
    let hidden = final_norm.as_ref().map_or_else(|| x.clone(), |n| n.forward(&x, d));
    let (loss, d_hidden) = head_loss(&model.ends.head, &hidden, tokens, seq);
    let mut dx = match &final_norm {
        Some(n) => {
            let mut dx = vec![0f32; x.len()];
            n.backward(&x, &d_hidden, &mut dx, d);
            dx
        }
        None => d_hidden,
    };
    drop(hidden);
    let mut layers = Vec::with_capacity(model.blocks.len());
    for ((b, g), s) in model.blocks.iter().zip(gates).zip(saved).rev() {
        layers.push(block_backward(b, g, &s, &mut dx, &pass, copies));
    }
    layers.reverse();
    GateGradients { loss, layers }
}

/// The mean NLL of the head's logits over `hidden` `[rows, width]` and its gradient with respect
/// to `hidden`, in blocks of rows: logits, softmax and (softmax − one-hot)/N·Wᵀ per block, so
/// the `[rows, vocab]` logits are never stored.
pub(crate) fn head_loss(head: &Linear, hidden: &[f32], tokens: &[u32], seq: usize) -> (f64, Vec<f32>) {
    // Each block reads the whole head weight (113 MB for SmolLM2's tied embedding): 256 rows read
    // it half as often as 128 (measured when eval still ran this path, 4 windows: 773–995 →
    // 633–744 ms in the head's products) for a 50 MB block of logits instead of 25.
    const BLOCK: usize = 256;
    let (width, vocab) = (head.inputs(), head.outputs());
    let rows = tokens.len();
    let predicted = (rows / seq * (seq - 1)) as f32;
    let whole = Matrix::borrowed(&head.weight);
    let bias = head.bias.as_ref().map(vector);
    let mut d_hidden = vec![0f32; rows * width];
    let mut logits = vec![0f32; BLOCK.min(rows) * vocab];
    let mut loss = 0f64;
    for first in (0..rows).step_by(BLOCK) {
        let n = BLOCK.min(rows - first);
        let block = &mut logits[..n * vocab];
        for_head_columns(&head.weight, whole.as_ref(), |start, columns, w| {
            gemm(n, columns, width, &mut block[start..], vocab, false, (&hidden[first * width..], width, 1), (w.values(), w.row, w.col));
        });
        loss += block
            .par_chunks_mut(vocab)
            .enumerate()
            .map(|(r, row)| {
                let position = first + r;
                if let Some(b) = &bias {
                    row.iter_mut().zip(b).for_each(|(z, b)| *z += b);
                }
                if position % seq == seq - 1 {
                    row.fill(0.0);
                    return 0.0;
                }
                let target = tokens[position + 1] as usize;
                let max = fastmath::max(row);
                let picked = row[target];
                let sum = fastmath::exp_in_place_sum(row, 1.0, max);
                let scale = (1.0 / sum) as f32 / predicted;
                row.iter_mut().for_each(|z| *z *= scale);
                row[target] -= 1.0 / predicted;
                max as f64 + sum.ln() - picked as f64
            })
            .collect::<Vec<f64>>()
            .into_iter()
            .sum::<f64>();
        let d_block = &mut d_hidden[first * width..];
        for_head_columns(&head.weight, whole.as_ref(), |start, columns, w| {
            gemm(n, width, columns, d_block, width, start > 0, (&block[start..], vocab, 1), (w.values(), w.col, w.row));
        });
    }
    (loss / predicted as f64, d_hidden)
}

/// Σ next-token NLL of the head's logits over `hidden` `[rows, width]` (`tokens`: sequences of
/// `seq`; a sequence's last position predicts nothing), for evaluation: no gradient, so the
/// logits are never more than one tile. Tasks over tiles of `TILE_ROWS` rows × `TILE_COLUMNS`
/// vocabulary columns each compute their tile with one gemm on their own thread while it is in
/// cache and reduce it to each row's (max, Σ exp(z − max)) and the target's logit where it falls
/// inside; each row then combines its tiles' partial sums in column order (the same result on
/// any number of threads).
pub(crate) fn summed_head_nll(head: &Linear, hidden: &[f32], tokens: &[u32], seq: usize) -> f64 {
    const TILE_ROWS: usize = 256;
    const TILE_COLUMNS: usize = 512;
    let (width, vocab) = (head.inputs(), head.outputs());
    let rows = tokens.len();
    assert_eq!(hidden.len(), rows * width);
    let tiles_per_row = vocab.div_ceil(TILE_COLUMNS);
    let row_blocks = rows.div_ceil(TILE_ROWS);
    let bias = head.bias.as_ref().map(vector);
    let predicts = |position: usize| position % seq != seq - 1;
    // Per row and tile of columns: (max, Σ exp(z − max)); per row: the target's logit.
    let mut partial = vec![(f32::NEG_INFINITY, 0f64); rows * tiles_per_row];
    let mut picked = vec![0f32; rows];
    // Reduces the columns `start..start + columns` of the logits, whose tiles `tile_logits(first
    // row, rows, first column from start, columns, dst)` computes.
    let mut reduce_columns = |start: usize, columns: usize, tile_logits: &TileLogits| {
        // `start` is 0 or a multiple of `for_head_columns`' block, itself a multiple of a tile.
        let (first_tile, tiles) = (start / TILE_COLUMNS, columns.div_ceil(TILE_COLUMNS));
        let reduced: Vec<Vec<(f32, f64, Option<f32>)>> = (0..tiles * row_blocks)
            .into_par_iter()
            .map(|task| {
                // Consecutive tasks share a tile of the weight (they go to one thread in runs).
                let (tile, block) = (task / row_blocks, task % row_blocks);
                let (first_row, n) = (block * TILE_ROWS, TILE_ROWS.min(rows - block * TILE_ROWS));
                let (first_column, m) = (tile * TILE_COLUMNS, TILE_COLUMNS.min(columns - tile * TILE_COLUMNS));
                let mut logits = vec![0f32; n * m];
                tile_logits(first_row, n, first_column, m, &mut logits);
                let global = start + first_column;
                logits
                    .chunks_exact_mut(m)
                    .enumerate()
                    .map(|(r, row)| {
                        let position = first_row + r;
                        if !predicts(position) {
                            return (f32::NEG_INFINITY, 0.0, None);
                        }
                        if let Some(b) = &bias {
                            fastmath::with_wide_vectors(
                                #[inline(always)]
                                || row.iter_mut().zip(&b[global..]).for_each(|(z, b)| *z += b),
                            );
                        }
                        let target = tokens[position + 1] as usize;
                        let target = (global..global + m).contains(&target).then(|| row[target - global]);
                        let max = fastmath::max(row);
                        (max, fastmath::exp_in_place_sum(row, 1.0, max), target)
                    })
                    .collect()
            })
            .collect();
        for (task, rows_of_tile) in reduced.into_iter().enumerate() {
            let (tile, block) = (first_tile + task / row_blocks, task % row_blocks);
            for (r, (max, sum, target)) in rows_of_tile.into_iter().enumerate() {
                let row = block * TILE_ROWS + r;
                partial[row * tiles_per_row + tile] = (max, sum);
                if let Some(z) = target {
                    picked[row] = z;
                }
            }
        }
    };
    if let Some(packed) = head.packed_bf16() {
        let x = Bf16Rows::of(hidden, rows, width);
        reduce_columns(0, vocab, &|first_row, n, first_column, m, dst: &mut [f32]| {
            packed.product_into(&x, first_row..first_row + n, first_column..first_column + m, dst, m)
        });
    } else {
        for_head_columns(&head.weight, Matrix::borrowed(&head.weight).as_ref(), |start, columns, w| {
            reduce_columns(start, columns, &|first_row, n, first_column, m, dst: &mut [f32]| {
                let w_tile = (&w.values()[first_column * w.col..], w.row, w.col);
                gemm_on_threads(n, m, width, dst, m, false, (&hidden[first_row * width..], width, 1), w_tile, 1);
            })
        });
    }
    (0..rows)
        .filter(|&row| predicts(row))
        .map(|row| {
            let tiles = &partial[row * tiles_per_row..(row + 1) * tiles_per_row];
            let max = tiles.iter().fold(f32::NEG_INFINITY, |m, &(t, _)| m.max(t)) as f64;
            let sum: f64 = tiles.iter().map(|&(t, s)| s * (t as f64 - max).exp()).sum();
            max + sum.ln() - picked[row] as f64
        })
        .sum()
}

/// Computes one tile of the head's logits: (first row, rows, first column, columns, `dst`).
type TileLogits<'a> = dyn Fn(usize, usize, usize, usize, &mut [f32]) + Sync + 'a;

/// The head's logits `[rows, vocab]` of `hidden` `[rows, width]` (a bf16 head converted in
/// blocks of columns, as in [`head_loss`]).
pub(crate) fn head_logits(head: &Linear, hidden: &[f32], rows: usize) -> Vec<f32> {
    let (width, vocab) = (head.inputs(), head.outputs());
    assert_eq!(hidden.len(), rows * width);
    let mut logits = if let Some(packed) = head.packed_bf16() {
        packed.product(&Bf16Rows::of(hidden, rows, width))
    } else {
        let mut logits = vec![0f32; rows * vocab];
        for_head_columns(&head.weight, Matrix::borrowed(&head.weight).as_ref(), |start, columns, w| {
            gemm(rows, columns, width, &mut logits[start..], vocab, false, (hidden, width, 1), (w.values(), w.row, w.col));
        });
        logits
    };
    if let Some(bias) = head.bias.as_ref().map(vector) {
        logits.par_chunks_mut(vocab).for_each(|row| row.iter_mut().zip(&bias).for_each(|(z, b)| *z += b));
    }
    logits
}

/// Calls `f(first column, columns, matrix)` over the head's weight `[width, vocab]`: once with
/// `whole` when the weight is an f32 buffer already, else per block of columns converted to f32
/// one at a time, so that a bf16 head is never whole in f32 (a 7B-wide head over SmolLM2's
/// 49 152 tokens would add 0.8 GB to the peak, and the bf16 copy `into_data` makes 0.4 GB more).
fn for_head_columns(weight: &Tensor<2>, whole: Option<&Matrix>, mut f: impl FnMut(usize, usize, &Matrix)) {
    const COLUMNS: usize = 4096;
    let [width, vocab] = weight.dims();
    if let Some(whole) = whole {
        return f(0, vocab, whole);
    }
    for start in (0..vocab).step_by(COLUMNS) {
        let end = vocab.min(start + COLUMNS);
        f(start, end - start, &Matrix::of(&weight.clone().slice([0..width, start..end])));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{DType, TensorData};

    /// Linears that read one row, their columns dealt out to three threads as one product (the
    /// shares straddle the layers' borders), give each layer's own product and bias, for a
    /// row-major weight and for a transposed one.
    #[test]
    fn one_row_through_several_linears_at_once_equals_each_linear_alone() {
        let device = Device::flex();
        let k = 200;
        let x: Vec<f32> = (0..k).map(|i| ((i * 7 % 23) as f32 - 11.0) / 13.0).collect();
        let layer = |n: usize, seed: usize, transposed: bool| {
            let w: Vec<f32> = (0..k * n).map(|i| (((i + seed) * 31 % 97) as f32 - 48.0) / 50.0).collect();
            let weight = if transposed {
                Tensor::<2>::from_data(TensorData::new(w, [n, k]), &device).transpose()
            } else {
                Tensor::<2>::from_data(TensorData::new(w, [k, n]), &device)
            };
            let bias =
                (seed % 2 == 1).then(|| Tensor::<1>::from_data(TensorData::new((0..n).map(|j| j as f32 / 7.0).collect::<Vec<_>>(), [n]), &device));
            Linear::new(weight, bias)
        };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("a pool");
        for transposed in [false, true] {
            let layers = [layer(900, 1, transposed), layer(300, 2, transposed), layer(300, 3, transposed)];
            assert!(1500 * k > THREADS_MIN_PRODUCTS, "the shape takes the shared split");
            let together = pool.install(|| linears_of_one_input([&layers[0], &layers[1], &layers[2]], &x, 1));
            for (layer, got) in layers.iter().zip(&together) {
                let alone = linear(layer, &x, 1);
                let worst = got.iter().zip(&alone).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(got.len() == alone.len() && worst < 1e-5, "max difference {worst} (transposed: {transposed})");
            }
        }
    }

    /// A single-row product split across threads (three, so the shares are uneven) equals the
    /// plain sum, for a row-major weight and for a transposed one (a tied head), accumulating or
    /// not.
    #[test]
    fn a_single_row_split_across_threads_equals_the_plain_sum() {
        let (k, n) = (300, 1000);
        assert!(k * n > THREADS_MIN_PRODUCTS && n >= 2 * GEMV_MIN_COLUMNS, "the shape takes the split path");
        let x: Vec<f32> = (0..k).map(|i| ((i * 7 % 23) as f32 - 11.0) / 13.0).collect();
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0).collect();
        let transposed: Vec<f32> = (0..n * k).map(|i| w[(i % k) * n + i / k]).collect();
        let expected: Vec<f32> = (0..n).map(|j| (0..k).map(|i| x[i] * w[i * n + j]).sum::<f32>() + 1.0).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("a pool");
        for (values, row, col) in [(&w, n, 1), (&transposed, 1, k)] {
            let mut out = vec![1f32; n];
            pool.install(|| gemm(1, n, k, &mut out, n, true, (&x, k, 1), (values, row, col)));
            let worst = out.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "max difference {worst} (rhs strides {row}, {col})");
            pool.install(|| gemm(1, n, k, &mut out, n, false, (&x, k, 1), (values, row, col)));
            let worst = out.iter().zip(&expected).map(|(a, b)| (a - (b - 1.0)).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "max difference {worst} without accumulating");
        }
    }

    /// The host head's logits equal burn's matmul for a tied (transposed) f32 head with a bias
    /// and for a bf16 head wider than one block of columns.
    #[test]
    fn host_head_logits_equal_burns_matmul() {
        let (width, vocab, rows) = (16, 4096 + 300, 3);
        let device = Device::flex();
        let table: Vec<f32> = (0..vocab * width).map(|i| half::bf16::from_f32(((i * 29 % 89) as f32 - 44.0) / 45.0).to_f32()).collect();
        let embedding = Tensor::<2>::from_data(TensorData::new(table, [vocab, width]), &device);
        let bias = Some(Tensor::<1>::from_data(TensorData::new((0..vocab).map(|i| (i % 5) as f32 / 4.0).collect::<Vec<_>>(), [vocab]), &device));
        let tied = Linear::new(embedding.clone().transpose(), bias);
        let bf16 = Linear::new(embedding.transpose().cast(DType::BF16), None);
        let hidden: Vec<f32> = (0..rows * width).map(|i| ((i * 11 % 19) as f32 - 9.0) / 10.0).collect();
        let input = Tensor::<3>::from_data(TensorData::new(hidden.clone(), [1, rows, width]), &device);
        for head in [&tied, &bf16] {
            let expected = crate::host_forward::with_generic_path(|| head.forward(input.clone()));
            let expected = expected.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32");
            let got = head_logits(head, &hidden, rows);
            assert_eq!(got.len(), expected.len());
            let worst = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "max difference {worst}");
        }
    }

    /// A bf16 head wider than one block of columns gives the loss and gradient of the same
    /// values as one f32 matrix (the conversion is exact; only the summation order differs).
    #[test]
    fn a_bf16_head_in_blocks_of_columns_equals_the_whole_f32_head() {
        let (width, vocab, seq) = (8, 2 * 4096 + 37, 6);
        let device = Device::flex();
        let values: Vec<f32> = (0..width * vocab).map(|i| half::bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 40.0).to_f32()).collect();
        let f32_weight = Tensor::<2>::from_data(TensorData::new(values, [width, vocab]), &device);
        let bias = Some(Tensor::<1>::from_data(TensorData::new((0..vocab).map(|i| (i % 7) as f32 / 10.0).collect::<Vec<_>>(), [vocab]), &device));
        let whole = Linear::new(f32_weight.clone(), bias.clone());
        let blocks = Linear::new(f32_weight.cast(DType::BF16), bias);
        assert!(Matrix::borrowed(&blocks.weight).is_none(), "the bf16 head takes the block path");
        let hidden: Vec<f32> = (0..2 * seq * width).map(|i| ((i * 13 % 17) as f32 - 8.0) / 9.0).collect();
        let tokens: Vec<u32> = (0..2 * seq as u32).map(|i| (i * 977 + 5) % vocab as u32).collect();
        let (loss_whole, grad_whole) = head_loss(&whole, &hidden, &tokens, seq);
        let (loss_blocks, grad_blocks) = head_loss(&blocks, &hidden, &tokens, seq);
        assert!((loss_whole - loss_blocks).abs() <= 1e-6 * loss_whole.abs(), "{loss_whole} vs {loss_blocks}");
        let largest = grad_whole.iter().fold(0f32, |m, g| m.max(g.abs()));
        assert!(largest > 0.0);
        for (a, b) in grad_whole.iter().zip(&grad_blocks) {
            assert!((a - b).abs() <= 1e-5 * largest, "{a} vs {b}");
        }
    }

    /// Evaluation's tiled NLL equals the row-block loss (times the predicted positions) for an
    /// f32 head with a bias and for a bf16 one without, converted in blocks of columns, over more
    /// rows than a tile and a vocabulary that no tile size divides.
    #[test]
    fn the_tiled_nll_equals_the_row_block_loss() {
        let (width, vocab, seq) = (8, 2 * 4096 + 37, 150);
        let device = Device::flex();
        let values: Vec<f32> = (0..width * vocab).map(|i| half::bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 12.0).to_f32()).collect();
        let f32_weight = Tensor::<2>::from_data(TensorData::new(values, [width, vocab]), &device);
        let bias = Some(Tensor::<1>::from_data(TensorData::new((0..vocab).map(|i| (i % 7) as f32 / 3.0).collect::<Vec<_>>(), [vocab]), &device));
        let hidden: Vec<f32> = (0..2 * seq * width).map(|i| ((i * 13 % 17) as f32 - 8.0) / 3.0).collect();
        let tokens: Vec<u32> = (0..2 * seq as u32).map(|i| (i * 977 + 5) % vocab as u32).collect();
        let predicted = (2 * (seq - 1)) as f64;
        for head in [Linear::new(f32_weight.clone(), bias.clone()), Linear::new(f32_weight.clone().cast(DType::BF16), None)] {
            let (mean, _) = head_loss(&head, &hidden, &tokens, seq);
            let summed = summed_head_nll(&head, &hidden, &tokens, seq);
            assert!(mean > 1.0, "a loss to compare: {mean}");
            assert!((summed - mean * predicted).abs() <= 1e-6 * summed.abs(), "{summed} vs {}", mean * predicted);
        }
    }
}
