//! Building blocks shared by the families: linear layers that can be cut to index sets, norms,
//! rotary embeddings, causal (grouped-query) attention and the KV cache.

use anyhow::Result;
use burn::tensor::activation::{gelu, relu, silu};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};
use rayon::prelude::*;

use std::sync::Arc;

use crate::host_bf16::PackedBf16;
use crate::weights::Checkpoint;

/// `y = x·W + b` with `W` stored `[in, out]`.
///
/// `weight` keeps the checkpoint's precision (bf16/f16 checkpoints stay bf16/f16 in memory; see
/// [`crate::weights::weight_dtype`]); [`Self::forward`] casts it to the activations' dtype for
/// the one matmul, so the computation is f32 with f32 accumulation while only one layer's weight
/// exists in f32 at a time. Code that reads `weight` as numbers must not assume f32: use
/// [`Self::weight_as`] (or `into_data().convert::<f32>()`). `bias` is f32.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor<2>,
    pub bias: Option<Tensor<1>>,
    /// The packed bf16 copy `--compute bf16` multiplies with ([`Self::pack_bf16`]).
    bf16: Option<Arc<Bf16Copy>>,
}

/// A packed bf16 copy of a linear's weight and the weight tensor it was made from: assigning a
/// new `weight` (LoRA merges, 2:4 masks) leaves the copy stale, so it is used only while `weight`
/// is still that tensor (the clone held here keeps its buffer alive, so the buffer's address
/// cannot be reused by another tensor).
#[derive(Debug)]
struct Bf16Copy {
    packed: PackedBf16,
    source: Tensor<2>,
}

/// Where a tensor's values live and how it views them: equal for two tensors exactly when they
/// are views of one buffer with the same layout.
#[derive(PartialEq)]
struct BufferView {
    address: usize,
    start_offset: usize,
    strides: Vec<isize>,
    dims: Vec<usize>,
    dtype: DType,
}

fn buffer_view(t: &Tensor<2>) -> Option<BufferView> {
    let flex = t.clone().try_into_primitive::<burn::backend::Flex>().ok()?;
    let layout = flex.layout();
    Some(BufferView {
        address: flex.bytes().as_ptr() as usize,
        start_offset: layout.start_offset(),
        strides: layout.strides().to_vec(),
        dims: t.dims().to_vec(),
        dtype: flex.dtype(),
    })
}

impl Linear {
    pub fn new(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Self {
        Self { weight, bias, bf16: None }
    }

    /// Makes the packed bf16 copy of the weight that the host forward then multiplies with
    /// ([`crate::host_bf16`]); returns its bytes.
    pub(crate) fn pack_bf16(&mut self) -> usize {
        let values = self.weight_as(DType::F32);
        let matrix = crate::host_search::host_matrix(&values);
        let (values, row, col) = matrix.strided();
        let packed = PackedBf16::pack(self.inputs(), self.outputs(), (values, row, col));
        let bytes = packed.bytes();
        self.bf16 = Some(Arc::new(Bf16Copy { packed, source: self.weight.clone() }));
        bytes
    }

    /// The packed bf16 copy, while it is a copy of the current weight.
    pub(crate) fn packed_bf16(&self) -> Option<&PackedBf16> {
        let copy = self.bf16.as_ref()?;
        let current = buffer_view(&self.weight)?;
        (buffer_view(&copy.source)? == current).then_some(&copy.packed)
    }

    /// Loads `{prefix}.weight` (HF `[out, in]`) and, if `bias`, `{prefix}.bias`.
    pub fn load(ck: &Checkpoint, prefix: &str, inputs: usize, outputs: usize, bias: bool, device: &Device) -> Result<Self> {
        let weight = ck.matrix_in_out(&format!("{prefix}.weight"), inputs, outputs, device)?;
        let bias = if bias { Some(ck.tensor(&format!("{prefix}.bias"), [outputs], device)?) } else { None };
        Ok(Self::new(weight, bias))
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, inputs] = x.dims();
        let outputs = self.weight.dims()[1];
        let y = x.reshape([batch * seq, inputs]);
        // burn-flex's bf16 matmul converts both operands to f32 and rounds the product to bf16;
        // casting the weight and multiplying in the activations' dtype is the same work without
        // the rounding (a no-op for f32 weights).
        let weight = self.weight_as(y.dtype());
        let y = y.matmul(weight);
        let y = match &self.bias {
            Some(b) => y + b.clone().unsqueeze::<2>(),
            None => y,
        };
        y.reshape([batch, seq, outputs])
    }

    /// The weight in `dtype` (the stored tensor itself when it already is).
    pub fn weight_as(&self, dtype: DType) -> Tensor<2> {
        if self.weight.dtype() == dtype {
            self.weight.clone()
        } else {
            self.weight.clone().cast(dtype)
        }
    }

    pub fn inputs(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn outputs(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn num_params(&self) -> usize {
        self.inputs() * self.outputs() + self.bias.as_ref().map_or(0, |_| self.outputs())
    }

    /// Keeps only the input rows at `kept` (the block reads fewer positions).
    pub fn keep_inputs(&self, kept: &Tensor<1, Int>) -> Self {
        Self::new(self.weight.clone().select(0, kept.clone()), self.bias.clone())
    }

    /// Keeps only the output columns (and bias entries) at `kept`.
    pub fn keep_outputs(&self, kept: &Tensor<1, Int>) -> Self {
        Self::new(self.weight.clone().select(1, kept.clone()), self.bias.clone().map(|b| b.select(0, kept.clone())))
    }
}

/// Root-mean-square norm (LLaMA).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor<1>,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(ck: &Checkpoint, name: &str, width: usize, eps: f64, device: &Device) -> Result<Self> {
        Ok(Self { weight: ck.tensor(name, [width], device)?, eps })
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let rms = x.clone().powi_scalar(2).mean_dim(2).add_scalar(self.eps).sqrt();
        x / rms * self.weight.clone().unsqueeze::<3>()
    }
}

/// Layer norm with affine weight and bias (OPT, Phi).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor<1>,
    pub bias: Tensor<1>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(ck: &Checkpoint, prefix: &str, width: usize, eps: f64, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: ck.tensor(&format!("{prefix}.weight"), [width], device)?,
            bias: ck.tensor(&format!("{prefix}.bias"), [width], device)?,
            eps,
        })
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let mean = x.clone().mean_dim(2);
        let centred = x - mean;
        let var = centred.clone().powi_scalar(2).mean_dim(2);
        centred / var.add_scalar(self.eps).sqrt() * self.weight.clone().unsqueeze::<3>() + self.bias.clone().unsqueeze::<3>()
    }
}

/// MLP activation, chosen by its transformers name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x·σ(x)` (`silu`, `swish`): the gate of LLaMA-like SwiGLU MLPs.
    Silu,
    Relu,
    /// Exact GELU, `x·Φ(x)` with the error function (`gelu`).
    Gelu,
    /// GELU's tanh approximation (`gelu_new`, `gelu_pytorch_tanh`): Phi is trained with it, and
    /// it differs from the exact GELU by ~1e-3, enough to move the logits visibly.
    GeluTanh,
}

impl Activation {
    /// The transformers names accepted by [`Self::from_hf_name`], for error messages.
    pub const SUPPORTED: &'static str = "silu, swish, relu, gelu, gelu_new, gelu_pytorch_tanh";

    pub fn from_hf_name(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "relu" => Some(Self::Relu),
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    pub fn forward(self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Self::Silu => silu(x),
            Self::Relu => relu(x),
            Self::Gelu => gelu(x),
            Self::GeluTanh => {
                // x³ as a product, not a power, so negative inputs never meet powf.
                let cube = x.clone() * x.clone() * x.clone();
                let inner = (x.clone() + cube.mul_scalar(0.044715)).mul_scalar((2.0 / std::f64::consts::PI).sqrt());
                x.mul_scalar(0.5) * inner.tanh().add_scalar(1.0)
            }
        }
    }
}

/// Frequency scaling of LLaMA 3.1 (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// Rotary position embedding in HF's rotate-half layout, optionally on the first `rotary_dim`
/// channels of each head only (Phi's partial rotary).
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
    rotary_dim: usize,
    head_dim: usize,
}

impl Rope {
    pub fn new(theta: f64, head_dim: usize, rotary_dim: usize, scaling: Option<Llama3Scaling>) -> Self {
        let mut inv_freq: Vec<f64> = (0..rotary_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / rotary_dim as f64)).collect();
        if let Some(s) = scaling {
            let low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
            let high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
            for f in &mut inv_freq {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                    *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                }
            }
        }
        Self { inv_freq, rotary_dim, head_dim }
    }

    /// cos and sin tables `[T, rotary_dim]` for positions `start..start+len`.
    fn tables(&self, start: usize, len: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let half = self.rotary_dim / 2;
        let mut cos = Vec::with_capacity(len * self.rotary_dim);
        let mut sin = Vec::with_capacity(len * self.rotary_dim);
        for pos in start..start + len {
            for _ in 0..2 {
                for f in &self.inv_freq[..half] {
                    // f32 angle, as HF computes it, so long positions round the same way.
                    let angle = (pos as f32) * (*f as f32);
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let shape = [len, self.rotary_dim];
        (Tensor::from_data(TensorData::new(cos, shape), device), Tensor::from_data(TensorData::new(sin, shape), device))
    }

    /// cos and sin `[len, rotary_dim / 2]` of positions `start..start+len`, as [`Self::apply`]
    /// uses them (its tables repeat each half).
    pub(crate) fn half_tables(&self, start: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.rotary_dim / 2;
        let angles = (start..start + len).flat_map(|pos| self.inv_freq[..half].iter().map(move |f| (pos as f32) * (*f as f32)));
        angles.map(|a| (a.cos(), a.sin())).unzip()
    }

    /// [`Self::apply`] in place on row-major `[positions, heads·head_dim]` values, position `p`
    /// of the rows reading row `p` of `tables` (from [`Self::half_tables`]).
    pub(crate) fn rotate_rows(&self, x: &mut [f32], heads: usize, tables: &(Vec<f32>, Vec<f32>), positions: impl Fn(usize) -> usize + Sync) {
        self.rotate_rows_by(x, heads, tables, positions, 1.0);
    }

    /// The transpose of [`Self::rotate_rows`] (rotation by the opposite angles): turns the
    /// gradient with respect to rotated values into the gradient with respect to the inputs.
    pub(crate) fn unrotate_rows(&self, x: &mut [f32], heads: usize, tables: &(Vec<f32>, Vec<f32>), positions: impl Fn(usize) -> usize + Sync) {
        self.rotate_rows_by(x, heads, tables, positions, -1.0);
    }

    /// Rotation by the angles of `tables`, with sin multiplied by `direction` (±1); rows in
    /// parallel, each as a wide-vector build (element-wise: the same bits either way).
    fn rotate_rows_by(&self, x: &mut [f32], heads: usize, tables: &(Vec<f32>, Vec<f32>), positions: impl Fn(usize) -> usize + Sync, direction: f32) {
        let half = self.rotary_dim / 2;
        x.par_chunks_exact_mut(heads * self.head_dim).enumerate().for_each(|(row, values)| {
            let at = positions(row) * half;
            let (cos, sin) = (&tables.0[at..at + half], &tables.1[at..at + half]);
            disp_core::fastmath::with_wide_vectors(
                #[inline(always)]
                || {
                    for head in values.chunks_exact_mut(self.head_dim) {
                        let (first, second) = head[..self.rotary_dim].split_at_mut(half);
                        for (((a, b), c), s) in first.iter_mut().zip(second.iter_mut()).zip(cos).zip(sin) {
                            let (x, y, s) = (*a, *b, s * direction);
                            *a = x * c - y * s;
                            *b = y * c + x * s;
                        }
                    }
                },
            );
        });
    }

    /// Rotates `[B, H, T, head_dim]` for positions starting at `start`.
    pub fn apply(&self, x: Tensor<4>, start: usize) -> Tensor<4> {
        let [_, _, seq, _] = x.dims();
        let (cos, sin) = self.tables(start, seq, &x.device());
        let (cos, sin) = (cos.unsqueeze::<4>(), sin.unsqueeze::<4>());
        let half = self.rotary_dim / 2;
        let rot = if self.rotary_dim == self.head_dim { x.clone() } else { x.clone().narrow(3, 0, self.rotary_dim) };
        let first = rot.clone().narrow(3, 0, half);
        let second = rot.clone().narrow(3, half, half);
        let rotated_half = Tensor::cat(vec![second.neg(), first], 3);
        let out = rot * cos + rotated_half * sin;
        if self.rotary_dim == self.head_dim {
            out
        } else {
            let pass = x.narrow(3, self.rotary_dim, self.head_dim - self.rotary_dim);
            Tensor::cat(vec![out, pass], 3)
        }
    }
}

/// Keys and values of earlier positions, one entry per layer: burn tensors (the generic path),
/// or host rows (the host path, batch 1), converted to tensors the first time the generic path
/// needs them.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor<4>, Tensor<4>)>>,
    len: usize,
    host: Option<HostKv>,
}

/// Keys and values of batch row 0 per layer, row-major `[positions, kv_heads·head_dim]`, grown
/// in place (no copy of the earlier positions per step).
#[derive(Debug, Clone)]
pub(crate) struct HostKv {
    pub kv_heads: usize,
    pub head_dim: usize,
    pub device: Device,
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers], len: 0, host: None }
    }

    /// The host rows, if the cache holds them (an empty cache starts holding them here).
    pub(crate) fn host_rows(&mut self, kv_heads: usize, head_dim: usize, device: &Device) -> Option<&mut HostKv> {
        if self.len == 0 && self.host.is_none() && self.layers.iter().all(Option::is_none) {
            let layers = vec![(Vec::new(), Vec::new()); self.layers.len()];
            self.host = Some(HostKv { kv_heads, head_dim, device: device.clone(), layers });
        }
        self.host.as_mut()
    }

    /// Whether the cache holds host rows (so the host path can continue it).
    pub(crate) fn is_host(&self) -> bool {
        self.host.is_some()
    }

    /// Turns host rows into the tensors the generic path appends to.
    fn materialize(&mut self) {
        let Some(host) = self.host.take() else { return };
        let (kv, hd) = (host.kv_heads, host.head_dim);
        for (slot, (k, v)) in self.layers.iter_mut().zip(host.layers) {
            let positions = k.len() / (kv * hd);
            if positions == 0 {
                continue;
            }
            let head_major = |x: &[f32]| -> Tensor<4> {
                let values: Vec<f32> = (0..kv).flat_map(|h| (0..positions).flat_map(move |t| x[(t * kv + h) * hd..][..hd].iter().copied())).collect();
                Tensor::from_data(TensorData::new(values, [1, kv, positions, hd]), &host.device)
            };
            *slot = Some((head_major(&k), head_major(&v)));
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends this step's keys and values `[B, KV, T, hd]` and returns all of them.
    pub fn append(&mut self, layer: usize, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        self.materialize();
        let (k, v) = match self.layers[layer].take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        (k, v)
    }

    /// Called once per forward pass, after every layer appended `added` positions.
    pub fn advance(&mut self, added: usize) {
        self.len += added;
    }

    /// Turns a cache of batch 1 into one of batch `n`, every row a copy: several continuations
    /// of one prompt then attend to a prompt computed once.
    pub fn repeat_batch(&mut self, n: usize) {
        self.materialize();
        for (k, v) in self.layers.iter_mut().flatten() {
            assert_eq!(k.dims()[0], 1, "only a cache of batch 1 can be repeated");
            *k = k.clone().repeat_dim(0, n);
            *v = v.clone().repeat_dim(0, n);
        }
    }
}

/// Splits `[B, T, heads·hd]` into `[B, heads, T, hd]`.
pub fn split_heads(x: Tensor<3>, heads: usize, head_dim: usize) -> Tensor<4> {
    let [batch, seq, _] = x.dims();
    x.reshape([batch, seq, heads, head_dim]).swap_dims(1, 2)
}

/// Causal attention with grouped-query heads. `q` is `[B, H, T, hd]` for positions
/// `start..start+T`; `k`, `v` are `[B, KV, start+T, hd]`. Returns `[B, T, H·hd]`. With a
/// `window` (sliding-window attention), the query at position `p` sees only the keys at
/// `p - window + 1 ..= p`, as transformers' sliding-window mask.
///
/// Uses burn's fused attention op (on the CPU backend a tiled kernel with online softmax that
/// skips the masked half); its causal mask is aligned to the last key, which is exactly the
/// KV-cache case. Each KV head is broadcast to the query heads that share it. A window shorter
/// than the keys needs an explicit mask.
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, start: usize, window: Option<usize>) -> Tensor<3> {
    let [batch, heads, seq, head_dim] = q.dims();
    let [_, kv_heads, keys, _] = k.dims();
    debug_assert_eq!(keys, start + seq, "keys must cover every earlier position");
    let window = window.filter(|&w| w < keys);
    let device = q.device();
    // A single query (decoding) has nothing to skip, and its keys would be copied out of the cache.
    if seq > 1 && !device.is_autodiff() && device == Device::flex() {
        return host_causal_attention(q, k, v, window);
    }
    let group = heads / kv_heads;
    let repeat = |t: Tensor<4>| {
        if group == 1 {
            t
        } else {
            t.unsqueeze_dim::<5>(2).expand([batch, kv_heads, group, keys, head_dim]).reshape([batch, heads, keys, head_dim])
        }
    };
    let (mask, is_causal) = match window {
        Some(window) => (Some(window_mask(start, seq, window, &device).expand([batch, heads, seq, keys])), false),
        None => (None, seq > 1),
    };
    let options = AttentionModuleOptions { scale: None, softcap: None, is_causal };
    let out = attention(q, repeat(k), repeat(v), mask, None, options);
    out.swap_dims(1, 2).reshape([batch, seq, heads * head_dim])
}

/// `[1, 1, T, start+T]`, true where query `start + i` may not see key `j`: in its future or
/// `window` or more positions back.
fn window_mask(start: usize, seq: usize, window: usize, device: &Device) -> Tensor<4, Bool> {
    let keys = start + seq;
    let hidden: Vec<bool> = (0..seq).flat_map(|i| (0..keys).map(move |j| j > start + i || j + window <= start + i)).collect();
    Tensor::from_data(TensorData::new(hidden, [1, 1, seq, keys]), device)
}

/// [`causal_attention`] on the CPU device without autodiff: the tensors are already in host
/// memory, and [`crate::host_attention`] skips the masked part and vectorises the softmax.
fn host_causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, window: Option<usize>) -> Tensor<3> {
    let [batch, heads, queries, head_dim] = q.dims();
    let [_, kv_heads, keys, _] = k.dims();
    let device = q.device();
    let host = |t: Tensor<4>| t.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 data");
    let (q, k, v) = (host(q), host(k), host(v));
    let shape = crate::host_attention::AttentionShape { heads, kv_heads, queries, keys, head_dim, window };
    let (q_len, kv_len) = (heads * queries * head_dim, kv_heads * keys * head_dim);
    let mut out = Vec::with_capacity(batch * q_len);
    for b in 0..batch {
        out.extend(crate::host_attention::causal_attention(
            &q[b * q_len..(b + 1) * q_len],
            &k[b * kv_len..(b + 1) * kv_len],
            &v[b * kv_len..(b + 1) * kv_len],
            shape,
        ));
    }
    Tensor::from_data(TensorData::new(out, [batch, queries, heads * head_dim]), &device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packed copy serves only the weight it was made from: a new tensor assigned to
    /// `weight` (a LoRA merge, a 2:4 mask) is multiplied as it is, never through the stale copy.
    #[test]
    fn a_packed_copy_is_used_only_while_the_weight_is_the_one_packed() {
        let device = Device::flex();
        let values: Vec<f32> = (0..6 * 20).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
        let mut linear = Linear::new(Tensor::<2>::from_data(TensorData::new(values, [6, 20]), &device), None);
        assert!(linear.packed_bf16().is_none(), "nothing packed yet");
        let bytes = linear.pack_bf16();
        assert_eq!(bytes, PackedBf16::bytes_for(6, 20));
        assert!(linear.packed_bf16().is_some(), "the packed weight itself");
        linear.weight = linear.weight.clone();
        assert!(linear.packed_bf16().is_some(), "a clone views the same buffer");
        let kept = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 2, 5], [3]), &device);
        assert!(linear.keep_inputs(&kept).packed_bf16().is_none(), "a pruned copy has its own weight");
        linear.weight = linear.weight.clone().transpose().transpose();
        assert!(linear.packed_bf16().is_some(), "a view with the same layout");
        linear.weight = linear.weight.clone() * 2.0;
        assert!(linear.packed_bf16().is_none(), "a new weight leaves the copy stale");
    }
}
