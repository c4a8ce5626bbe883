//! Helpers shared by the integration tests: fixture paths and reference tensors.
#![allow(dead_code)]

use std::path::PathBuf;

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use disp_core::plan::{LayerIndices, PruningPlan};
use disp_core::selection::BlockGates;
use disp_core::RatioOf;
use disp_models::CausalLm;
use safetensors::SafeTensors;

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// A reference tensor from `reference.safetensors`: (shape, f32 values) — ints widened.
pub fn reference(dir: &std::path::Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(dir.join("reference.safetensors")).expect("reference file");
    let st = SafeTensors::deserialize(&bytes).expect("valid reference");
    let view = st.tensor(name).unwrap_or_else(|_| panic!("reference has no '{name}'"));
    let values = match view.dtype() {
        safetensors::Dtype::F32 => view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        safetensors::Dtype::I64 => view.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
        other => panic!("unexpected dtype {other:?}"),
    };
    (view.shape().to_vec(), values)
}

pub fn token_tensor(shape: &[usize], values: &[f32], device: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = values.iter().map(|&v| v as i64).collect();
    Tensor::from_data(TensorData::new(ids, [shape[0], shape[1]]), device)
}

pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A seeded pseudo-random subset of 0..width: sorted, never empty, about two thirds kept.
pub fn random_subset(width: usize, seed: u64) -> Vec<u32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut kept: Vec<u32> = (0..width as u32)
        .filter(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            !state.is_multiple_of(3)
        })
        .collect();
    if kept.is_empty() {
        kept.push((seed % width as u64) as u32);
    }
    kept
}

pub fn random_plan(model: &dyn CausalLm, seed: u64) -> PruningPlan {
    let shape = model.model_shape();
    let layers: Vec<LayerIndices> = shape
        .blocks
        .iter()
        .enumerate()
        .map(|(l, block)| {
            let widths = block.site_widths();
            LayerIndices::from_sites(|site| random_subset(widths[site.index()], seed + (l * 5 + site.index()) as u64))
        })
        .collect();
    PruningPlan::from_layers(model.identity(), &shape, "random", RatioOf::Total, 0.3, layers, serde_json::Value::Null)
}

/// The device of the device-generic tests: `DISP_TEST_DEVICE` (cpu, wgpu, cuda), the CPU when unset.
pub fn device() -> Device {
    disp_core::device::test_device().unwrap_or_else(|e| panic!("{e:#}")).0
}

/// `cpu` on the CPU, `gpu` on a GPU backend: its kernels (tiled matmuls, fused element-wise
/// chains, a different `exp`) round differently from the CPU's, within float32 noise.
pub fn tolerance(cpu: f32, gpu: f32) -> f32 {
    match disp_core::device::test_device().unwrap_or_else(|e| panic!("{e:#}")).1 {
        disp_core::DeviceChoice::Cpu => cpu,
        _ => gpu,
    }
}

pub fn load(name: &str) -> (Box<dyn CausalLm>, Device) {
    let device = device();
    let model = disp_models::load_model(&fixture(name), &device).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    (model, device)
}

pub fn logits(model: &dyn CausalLm, dir: &Path, gates: Option<&[BlockGates]>) -> Vec<f32> {
    let (shape, ids) = reference(dir, "input_ids");
    to_vec(model.forward(token_tensor(&shape, &ids, model.device()), gates, None))
}

pub fn hidden_and_intermediate(model: &dyn CausalLm) -> (usize, usize) {
    let block = model.model_shape().blocks[0];
    (block.hidden, block.intermediate)
}

/// Cached decoding (a prefill of 5, then one token at a time) reproduces the full forward pass
/// to 1e-4 on the first row of the fixture's input.
pub fn check_cached_decoding(name: &str) {
    let (model, device) = load(name);
    let dir = fixture(name);
    let (shape, ids) = reference(&dir, "input_ids");
    let seq = shape[1];
    let full = logits(model.as_ref(), &dir, None);
    let vocab = model.vocab_size();
    let mut cache = model.new_cache();
    let prefill = 5;
    let mut steps = Vec::new();
    let row: Vec<f32> = ids[..seq].to_vec();
    steps.push(to_vec(model.forward(token_tensor(&[1, prefill], &row[..prefill], &device), None, Some(&mut cache))));
    for t in prefill..seq {
        steps.push(to_vec(model.forward(token_tensor(&[1, 1], &row[t..t + 1], &device), None, Some(&mut cache))));
    }
    let cached: Vec<f32> = steps.concat();
    let diff = max_abs_diff(&cached, &full[..seq * vocab]);
    let limit = tolerance(1e-4, 1e-3);
    assert!(diff <= limit, "{name}: cached decoding differs from the full pass by {diff} > {limit}");
}
