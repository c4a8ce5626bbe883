//! Checkpoints that are not files: a probe that records what each family's loader reads, and
//! tensors in memory that load to the same model as the files they came from (and stay
//! differentiable when they live on an autodiff device).

mod common;

use std::collections::{BTreeMap, HashMap};

use burn::tensor::{Device, Tensor, TensorData};
use common::*;
use disp_models::{Checkpoint, RawConfig};

/// The fixtures the probe and in-memory tests cover: every family and its variants.
const FIXTURES: [&str; 8] = ["llama_gqa_tied", "llama_mha_untied", "opt_pre_ln", "opt_post_ln_proj", "phi", "qwen2", "qwen3", "mistral"];

/// name -> (shape, f32 values) of every tensor in a fixture's files.
fn stored_tensors(name: &str) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let ck = Checkpoint::open(&fixture(name)).unwrap();
    ck.names()
        .map(|n| {
            let shape = ck.shape(n).unwrap();
            let values = ck.read_f32(n, &shape).unwrap();
            (n.to_string(), (shape, values))
        })
        .collect()
}

/// The fixture's tensors as an in-memory checkpoint on `device`.
fn memory_checkpoint(name: &str, device: &Device) -> Checkpoint {
    let map: HashMap<String, (Vec<usize>, Tensor<1>)> = stored_tensors(name)
        .into_iter()
        .map(|(n, (shape, values))| {
            let flat = Tensor::from_data(TensorData::new(values.clone(), [values.len()]), device);
            (n, (shape, flat))
        })
        .collect();
    Checkpoint::from_tensors(map).unwrap()
}

#[test]
fn probe_lists_exactly_the_tensors_of_each_fixture() {
    let device = Device::flex();
    for name in FIXTURES {
        let raw = RawConfig::read(&fixture(name)).unwrap();
        let probed = disp_models::parameter_shapes(&raw, &device).unwrap();
        let probed_map: BTreeMap<String, Vec<usize>> = probed.iter().cloned().collect();
        assert_eq!(probed_map.len(), probed.len(), "{name}: a tensor was listed twice");
        let stored: BTreeMap<String, Vec<usize>> = stored_tensors(name).into_iter().map(|(n, (s, _))| (n, s)).collect();
        assert_eq!(probed_map, stored, "{name}: probed tensors differ from the file's");
    }
    // Tied embeddings: the head is the embedding, so it is never read.
    let tied = disp_models::parameter_shapes(&RawConfig::read(&fixture("llama_gqa_tied")).unwrap(), &device).unwrap();
    assert!(tied.iter().all(|(n, _)| n != "lm_head.weight"));
}

#[test]
fn in_memory_checkpoint_gives_bit_identical_logits() {
    let device = Device::flex();
    for name in FIXTURES {
        let dir = fixture(name);
        let from_files = disp_models::load_model(&dir, &device).unwrap();
        let raw = RawConfig::read(&dir).unwrap();
        let from_memory = disp_models::load_model_from(&raw, &memory_checkpoint(name, &device), &device).unwrap();
        let (id_shape, ids) = reference(&dir, "input_ids");
        let a = to_vec(from_files.forward(token_tensor(&id_shape, &ids, &device), None, None));
        let b = to_vec(from_memory.forward(token_tensor(&id_shape, &ids, &device), None, None));
        let a_bits: Vec<u32> = a.iter().map(|x| x.to_bits()).collect();
        let b_bits: Vec<u32> = b.iter().map(|x| x.to_bits()).collect();
        assert!(a_bits == b_bits, "{name}: logits differ by up to {}", max_abs_diff(&a, &b));
    }
}

#[test]
fn in_memory_checkpoint_is_differentiable_in_every_tensor() {
    let device = Device::flex().autodiff();
    let name = "phi";
    let dir = fixture(name);
    let raw = RawConfig::read(&dir).unwrap();
    let mut map = HashMap::new();
    for (n, (shape, values)) in stored_tensors(name) {
        let flat = Tensor::<1>::from_data(TensorData::new(values.clone(), [values.len()]), &device).require_grad();
        map.insert(n, (shape, flat));
    }
    let leaves: Vec<(String, Tensor<1>)> = map.iter().map(|(n, (_, t))| (n.clone(), t.clone())).collect();
    let model = disp_models::load_model_from(&raw, &Checkpoint::from_tensors(map).unwrap(), &device).unwrap();
    let (id_shape, ids) = reference(&dir, "input_ids");
    let logits = model.forward(token_tensor(&id_shape, &ids, &device), None, None);
    let grads = logits.powi_scalar(2).sum().backward();
    for (n, leaf) in leaves {
        let grad = leaf.grad(&grads).unwrap_or_else(|| panic!("no gradient for '{n}'"));
        assert!(to_vec(grad.abs().sum()).iter().all(|&s| s > 0.0), "zero gradient for '{n}'");
    }
}

#[test]
fn in_memory_checkpoint_names_missing_and_misshapen_tensors() {
    let device = Device::flex();
    let raw = RawConfig::read(&fixture("llama_gqa_tied")).unwrap();
    let full = stored_tensors("llama_gqa_tied");
    let to_map = |tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>| -> HashMap<String, (Vec<usize>, Tensor<1>)> {
        tensors.iter().map(|(n, (s, v))| (n.clone(), (s.clone(), Tensor::from_data(TensorData::new(v.clone(), [v.len()]), &device)))).collect()
    };

    let mut missing = full.clone();
    missing.remove("model.layers.1.mlp.up_proj.weight");
    let err = disp_models::load_model_from(&raw, &Checkpoint::from_tensors(to_map(&missing)).unwrap(), &device).err().unwrap();
    assert_eq!(err.to_string(), "in-memory checkpoint: missing tensor 'model.layers.1.mlp.up_proj.weight'");

    // k_proj is [kv_dim 32, hidden 64]; stored the other way round it must be refused.
    let mut transposed = full.clone();
    transposed.get_mut("model.layers.0.self_attn.k_proj.weight").unwrap().0 = vec![64, 32];
    let err = disp_models::load_model_from(&raw, &Checkpoint::from_tensors(to_map(&transposed)).unwrap(), &device).err().unwrap();
    assert_eq!(err.to_string(), "in-memory checkpoint: tensor 'model.layers.0.self_attn.k_proj.weight' has shape [64, 32], expected [32, 64]");

    let mut short = to_map(&full);
    short.insert("model.norm.weight".into(), (vec![64], Tensor::zeros([63], &device)));
    let err = Checkpoint::from_tensors(short).err().unwrap();
    assert_eq!(err.to_string(), "in-memory checkpoint: tensor 'model.norm.weight' holds 63 values, its shape [64] needs 64");
}

#[test]
fn bf16_weights_stay_bf16_and_give_the_logits_of_their_f32_values() {
    use burn::tensor::DType;
    let device = Device::flex();
    let dir = fixture("llama_bf16");
    let bf16 = disp_models::load_model(&dir, &device).unwrap();
    // The same values decoded to f32 (exact: every bf16 is an f32), held in f32.
    let raw = RawConfig::read(&dir).unwrap();
    let f32_model = disp_models::load_model_from(&raw, &memory_checkpoint("llama_bf16", &device), &device).unwrap();
    for layer in 0..bf16.num_layers() {
        let linears = bf16.block_linears(layer);
        for linear in linears.attn_inputs.iter().chain(&linears.mlp_inputs).chain([&linears.attn_output, &linears.mlp_output]) {
            assert_eq!(linear.weight.dtype(), DType::BF16, "block {layer}: a weight became {:?}", linear.weight.dtype());
        }
        let f32_linears = f32_model.block_linears(layer);
        assert_eq!(f32_linears.attn_output.weight.dtype(), DType::F32);
    }
    // Held in bf16: half the bytes of the f32 copy's matrices.
    assert!(bf16.weight_bytes() * 10 < f32_model.weight_bytes() * 6, "{} vs {}", bf16.weight_bytes(), f32_model.weight_bytes());
    let (id_shape, ids) = reference(&dir, "input_ids");
    let a = to_vec(bf16.forward(token_tensor(&id_shape, &ids, &device), None, None));
    let b = to_vec(f32_model.forward(token_tensor(&id_shape, &ids, &device), None, None));
    // The cast is exact and the matmuls are f32: equal up to summation order, far inside bf16's
    // own rounding (2^-8 relative).
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(max_abs_diff(&a, &b) <= 1e-5 * scale, "logits differ by up to {} (scale {scale})", max_abs_diff(&a, &b));
}
