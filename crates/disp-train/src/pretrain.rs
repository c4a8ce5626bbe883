//! Training a small model of one of the supported families from scratch, with the family's own
//! loading and forward code (no second copy of any architecture).
//!
//! The trainable parameters are one flat tensor per checkpoint tensor, named and shaped as the
//! family's loader reads them ([`disp_models::parameter_shapes`], found by loading the family
//! from a probing checkpoint). Every step the model is loaded from an in-memory
//! [`Checkpoint`] over the current parameter values on `device.autodiff()` — only tensor handles
//! move, and the loaders' reshapes and transposes are recorded by autodiff — then a batch of
//! token windows runs forward, the next-token cross-entropy goes backward, the global gradient
//! norm is clipped and AdamW (decoupled weight decay on matrices only) updates the parameters.
//! The learning rate warms up linearly, then follows a cosine down to a floor.
//!
//! Everything random (initial weights, window order) is drawn from the seed, so a run is
//! reproducible bit for bit on the same machine.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use burn::module::{Module, Param, ParamGroup};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};
use disp_models::{CausalLm, Checkpoint, Family, RawConfig};
use serde::Serialize;
use serde_json::{json, Value};

use crate::loss::lm_loss;
use crate::rng::{Purpose, ShuffledBatches};
use disp_io::hf_folder::{write_json, write_weights};

/// The transformers release whose `config.json` layout [`hf_config`] reproduces.
pub const TRANSFORMERS_VERSION: &str = "5.24.0";

/// The sizes of a model to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ModelSize {
    pub hidden: usize,
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (LLaMA and Phi; OPT has as many as query heads).
    pub kv_heads: usize,
    /// MLP width (LLaMA: of each of the gate and up projections).
    pub intermediate: usize,
    pub vocab: usize,
    pub max_positions: usize,
}

impl ModelSize {
    /// The default tiny model of each family: hidden 192, 4 layers, 6 heads (LLaMA: 2 KV heads),
    /// MLP 768 (LLaMA: 512, as its gated MLP has three matrices), vocabulary 4096, 512 positions.
    pub fn tiny(family: Family) -> Self {
        let (kv_heads, intermediate) = match family {
            Family::Opt | Family::Phi => (6, 768),
            Family::Llama | Family::Qwen2 | Family::Qwen3 | Family::Mistral => (2, 512),
        };
        Self { hidden: 192, layers: 4, heads: 6, kv_heads, intermediate, vocab: 4096, max_positions: 512 }
    }
}

/// `config.json` for a freshly initialised model of `family`, with the fields and layout
/// transformers 5 writes when saving one (`rope_parameters` holding RoPE's settings, `dtype`).
/// LLaMA: SwiGLU, grouped-query attention, embeddings tied to the head. OPT: pre-LN blocks, ReLU,
/// tied head. Phi: partial rotary 0.5, `gelu_new`, separate head with bias. `special_token` is
/// BOS and EOS; there is no padding token.
pub fn hf_config(family: Family, size: &ModelSize, special_token: u32) -> Result<Value> {
    if size.heads == 0 || size.kv_heads == 0 || !size.hidden.is_multiple_of(size.heads) || !size.heads.is_multiple_of(size.kv_heads) {
        bail!("hidden {} must be a multiple of {} heads, and the heads a multiple of {} KV heads", size.hidden, size.heads, size.kv_heads);
    }
    let head_dim = size.hidden / size.heads;
    Ok(match family {
        Family::Qwen2 | Family::Qwen3 | Family::Mistral => {
            bail!("tiny models are trained for llama, opt and phi, not {}", family.model_type())
        }
        Family::Llama => json!({
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": special_token,
            "dtype": "float32",
            "eos_token_id": special_token,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "hidden_size": size.hidden,
            "initializer_range": 0.02,
            "intermediate_size": size.intermediate,
            "max_position_embeddings": size.max_positions,
            "mlp_bias": false,
            "model_type": "llama",
            "num_attention_heads": size.heads,
            "num_hidden_layers": size.layers,
            "num_key_value_heads": size.kv_heads,
            "pad_token_id": null,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": true,
            "transformers_version": TRANSFORMERS_VERSION,
            "use_cache": true,
            "vocab_size": size.vocab,
        }),
        Family::Opt => {
            if size.kv_heads != size.heads {
                bail!("OPT has no grouped-query attention: KV heads ({}) must equal heads ({})", size.kv_heads, size.heads);
            }
            json!({
                "_remove_final_layer_norm": false,
                "activation_function": "relu",
                "architectures": ["OPTForCausalLM"],
                "attention_dropout": 0.0,
                "bos_token_id": special_token,
                "do_layer_norm_before": true,
                "dropout": 0.0,
                "dtype": "float32",
                "enable_bias": true,
                "eos_token_id": special_token,
                "ffn_dim": size.intermediate,
                "hidden_size": size.hidden,
                "init_std": 0.02,
                "layer_norm_elementwise_affine": true,
                "layerdrop": 0.0,
                "max_position_embeddings": size.max_positions,
                "model_type": "opt",
                "num_attention_heads": size.heads,
                "num_hidden_layers": size.layers,
                "pad_token_id": null,
                "tie_word_embeddings": true,
                "transformers_version": TRANSFORMERS_VERSION,
                "use_cache": true,
                "vocab_size": size.vocab,
                "word_embed_proj_dim": size.hidden,
            })
        }
        Family::Phi => json!({
            "architectures": ["PhiForCausalLM"],
            "attention_dropout": 0.0,
            "bos_token_id": special_token,
            "dtype": "float32",
            "embd_pdrop": 0.0,
            "eos_token_id": special_token,
            "hidden_act": "gelu_new",
            "hidden_size": size.hidden,
            "initializer_range": 0.02,
            "intermediate_size": size.intermediate,
            "layer_norm_eps": 1e-5,
            "max_position_embeddings": size.max_positions,
            "model_type": "phi",
            "num_attention_heads": size.heads,
            "num_hidden_layers": size.layers,
            "num_key_value_heads": size.kv_heads,
            "pad_token_id": null,
            "qk_layernorm": false,
            "resid_pdrop": 0.0,
            "rope_parameters": {"partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": false,
            "transformers_version": TRANSFORMERS_VERSION,
            "use_cache": true,
            "vocab_size": size.vocab,
        }),
    })
}

/// Settings of one training run. [`Default`] holds the values used for the tiny models.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PretrainConfig {
    /// Optimizer updates.
    pub steps: usize,
    /// Token windows per step.
    pub batch_size: usize,
    /// Peak learning rate, reached at the end of the warm-up.
    pub learning_rate: f64,
    /// Steps of linear warm-up from 0 to the peak.
    pub warmup_steps: usize,
    /// Where the cosine decay ends, as a fraction of the peak.
    pub final_lr_fraction: f64,
    /// AdamW's decoupled weight decay, applied to matrices (embeddings included), never to
    /// biases or norm weights.
    pub weight_decay: f64,
    pub beta_2: f64,
    /// The global gradient norm is scaled down to this (0: no clipping).
    pub max_grad_norm: f64,
    /// Standard deviation of the normal initialisation of matrices and embeddings.
    pub init_std: f64,
    pub seed: u64,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 16,
            learning_rate: 3e-3,
            warmup_steps: 50,
            final_lr_fraction: 0.1,
            weight_decay: 0.1,
            beta_2: 0.95,
            max_grad_norm: 1.0,
            init_std: 0.02,
            seed: 0,
        }
    }
}

impl PretrainConfig {
    /// The learning rate of (1-based) step `step`: linear warm-up, then a cosine from the peak
    /// down to `final_lr_fraction` of it at the last step.
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        let peak = self.learning_rate;
        if step <= self.warmup_steps {
            return peak * step as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay_steps as f64).min(1.0);
        let floor = peak * self.final_lr_fraction;
        floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// How a parameter starts, decided by its checkpoint name alone (the same rule for every
/// family): biases at 0, norm weights at 1, everything else (linear weights, embeddings) drawn
/// from N(0, init_std²).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    Zeros,
    Ones,
    Normal,
}

impl Init {
    pub fn of(name: &str) -> Self {
        let (module, kind) = name.rsplit_once('.').unwrap_or(("", name));
        let module = module.rsplit('.').next().unwrap_or(module);
        match kind {
            "bias" => Self::Zeros,
            // input_layernorm, post_attention_layernorm, norm, self_attn_layer_norm, final_layernorm, ...
            "weight" if module.contains("norm") => Self::Ones,
            _ => Self::Normal,
        }
    }
}

/// The trainable tensors, flat, in the order of [`Pretrainer::names`].
#[derive(Module, Debug)]
pub struct FlatParameters {
    pub tensors: Vec<Param<Tensor<1>>>,
}

/// Progress of one update.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PretrainStep {
    /// Steps completed, counting this one (1-based).
    pub step: usize,
    /// Mean next-token NLL of the batch, before the update.
    pub loss: f64,
    pub learning_rate: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens in the batch.
    pub tokens: usize,
    /// Wall-clock seconds of the step.
    pub seconds: f64,
    /// Of which: loading the model over the parameters, the forward pass and the loss (until
    /// the loss is on the host).
    pub forward_seconds: f64,
    /// `backward()`.
    pub backward_seconds: f64,
}

/// One training run: the config, the parameters and their optimizer, and the training windows.
pub struct Pretrainer {
    raw: RawConfig,
    /// (checkpoint name, HF shape) of each parameter.
    names: Vec<(String, Vec<usize>)>,
    params: FlatParameters,
    optim: ModuleOptimizer,
    windows: Vec<Vec<u32>>,
    cfg: PretrainConfig,
    /// The autodiff device the parameters live on.
    device: Device,
    steps_done: usize,
    /// The epoch whose window order is cached in `order`.
    batches: ShuffledBatches,
}

impl Pretrainer {
    /// A freshly initialised model of `raw`'s config, to be trained on `windows` (token windows of
    /// one length) on `device` (the autodiff version of it is used).
    pub fn new(raw: RawConfig, windows: Vec<Vec<u32>>, cfg: &PretrainConfig, device: &Device) -> Result<Self> {
        if cfg.steps == 0 || cfg.batch_size == 0 {
            bail!("training needs at least one step and one window per batch");
        }
        if !(cfg.learning_rate > 0.0 && cfg.learning_rate.is_finite()) {
            bail!("learning rate must be positive, got {}", cfg.learning_rate);
        }
        // Written so that NaN fails too.
        let non_negative = |x: f64| x >= 0.0;
        if !(0.0..=1.0).contains(&cfg.final_lr_fraction) || !non_negative(cfg.weight_decay) || !non_negative(cfg.max_grad_norm) {
            bail!("final_lr_fraction must be in [0, 1], weight decay and gradient clipping non-negative");
        }
        let device = device.clone().autodiff();
        let names = disp_models::parameter_shapes(&raw, &device)?;
        let params = FlatParameters {
            tensors: names.iter().enumerate().map(|(i, (name, shape))| Param::from_tensor(initial_tensor(name, shape, i, cfg, &device))).collect(),
        };
        let matrices: Vec<_> = names.iter().zip(&params.tensors).filter(|((_, shape), _)| shape.len() == 2).map(|(_, p)| p.id).collect();
        let adamw = |weight_decay: f64| {
            AdamWConfig::new().with_beta_1(0.9).with_beta_2(cfg.beta_2 as f32).with_epsilon(1e-8).with_weight_decay(weight_decay as f32)
        };
        let optim = adamw(0.0).init().with_group(ParamGroup::from_ids(matrices), adamw(cfg.weight_decay).build(), None);
        let windows_count = windows.len();
        let trainer = Self {
            raw,
            names,
            params,
            optim,
            windows,
            cfg: cfg.clone(),
            device,
            steps_done: 0,
            batches: ShuffledBatches::new(windows_count, cfg.seed, Purpose::PretrainShuffle),
        };
        crate::search::check_windows(&trainer.windows, trainer.model()?.as_ref())?;
        Ok(trainer)
    }

    pub fn config(&self) -> &PretrainConfig {
        &self.cfg
    }

    pub fn raw_config(&self) -> &RawConfig {
        &self.raw
    }

    pub fn steps_done(&self) -> usize {
        self.steps_done
    }

    /// (checkpoint name, HF shape) of every parameter, in loading order.
    pub fn names(&self) -> &[(String, Vec<usize>)] {
        &self.names
    }

    /// Number of trained values (a tied head counts once).
    pub fn parameter_count(&self) -> usize {
        self.names.iter().map(|(_, shape)| shape.iter().product::<usize>()).sum()
    }

    /// The indices of the windows of (1-based) step `step`: the batches walk through the windows
    /// in a seeded random order, reshuffled every epoch.
    fn batch_windows(&mut self, step: usize) -> Vec<usize> {
        self.batches.batch(step, self.cfg.batch_size)
    }

    /// The model over the current parameters, on the autodiff device (differentiable in them).
    fn differentiable_model(&self) -> Result<Box<dyn CausalLm>> {
        let tensors = self.names.iter().zip(&self.params.tensors).map(|((name, shape), p)| (name.clone(), (shape.clone(), p.val()))).collect();
        disp_models::load_model_from(&self.raw, &Checkpoint::from_tensors(tensors)?, &self.device)
    }

    /// The model over the current parameters on the plain device, for evaluation.
    pub fn model(&self) -> Result<Box<dyn CausalLm>> {
        let tensors: HashMap<_, _> =
            self.names.iter().zip(&self.params.tensors).map(|((name, shape), p)| (name.clone(), (shape.clone(), p.val().inner()))).collect();
        disp_models::load_model_from(&self.raw, &Checkpoint::from_tensors(tensors)?, &self.device.clone().inner())
    }

    /// One AdamW update on the next batch. Fails, without updating, on a non-finite loss.
    pub fn step(&mut self) -> Result<PretrainStep> {
        let start = Instant::now();
        let step = self.steps_done + 1;
        let batch = self.batch_windows(step);
        let seq = self.windows[0].len();
        let flat: Vec<i64> = batch.iter().flat_map(|&i| self.windows[i].iter().map(|&t| t as i64)).collect();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(flat, [batch.len(), seq]), &self.device);
        let logits = self.differentiable_model()?.forward(tokens.clone(), None, None);
        let loss = lm_loss(logits, &tokens);
        if !loss.value.is_finite() {
            bail!("non-finite training loss at step {step} ({})", loss.value);
        }
        let forward_seconds = start.elapsed().as_secs_f64();
        let backward_start = Instant::now();
        let grads = loss.surrogate.backward();
        let backward_seconds = backward_start.elapsed().as_secs_f64();
        let mut grads = GradientsParams::from_grads(grads, &self.params);
        let grad_norm = clip_global_norm(&mut grads, &self.params, self.cfg.max_grad_norm);
        let learning_rate = self.cfg.learning_rate_at(step);
        self.params = self.optim.step(learning_rate, self.params.clone(), grads);
        self.steps_done = step;
        Ok(PretrainStep {
            step,
            loss: loss.value,
            learning_rate,
            grad_norm,
            tokens: batch.len() * seq,
            seconds: start.elapsed().as_secs_f64(),
            forward_seconds,
            backward_seconds,
        })
    }

    /// The current values: (name, HF shape, row-major f32 values) per parameter.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        self.names
            .iter()
            .zip(&self.params.tensors)
            .map(|((name, shape), p)| {
                let values = p.val().inner().into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 parameters");
                (name.clone(), shape.clone(), values)
            })
            .collect()
    }

    /// Writes `config` as `config.json`, a matching `generation_config.json` and the parameters
    /// as an f32 `model.safetensors` into `dir`: an HF folder that `disp_models::load_model` and
    /// transformers load.
    pub fn write_hf_files(&self, dir: &Path, config: &Value) -> Result<()> {
        write_json(&dir.join("config.json"), config)?;
        let generation = json!({
            "_from_model_config": true,
            "bos_token_id": config.get("bos_token_id"),
            "eos_token_id": config.get("eos_token_id"),
            "transformers_version": TRANSFORMERS_VERSION,
        });
        write_json(&dir.join("generation_config.json"), &generation)?;
        let tensors = self.tensors();
        let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
        let views = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, shape, _), b)| {
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b).map_err(|e| anyhow!("tensor '{name}': {e}"))?;
                Ok((name.clone(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        write_weights(dir, views)?;
        Ok(())
    }
}

/// The starting value of parameter `index` (`name`, HF `shape`), from its own seeded stream.
fn initial_tensor(name: &str, shape: &[usize], index: usize, cfg: &PretrainConfig, device: &Device) -> Tensor<1> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = match Init::of(name) {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Normal => {
            let mut rng = crate::rng::stream(cfg.seed, Purpose::PretrainInit, index as u64);
            (0..n).map(|_| (rng.normal() * cfg.init_std) as f32).collect()
        }
    };
    Tensor::from_data(TensorData::new(values, [n]), device)
}

/// Scales all gradients together so that their joint L2 norm is at most `max_norm` (0: leave
/// them); returns the norm before scaling.
fn clip_global_norm(grads: &mut GradientsParams, params: &FlatParameters, max_norm: f64) -> f64 {
    let taken: Vec<_> = params.tensors.iter().filter_map(|p| grads.remove::<1>(p.id).map(|g| (p.id, g))).collect();
    if taken.is_empty() {
        return 0.0;
    }
    let squares = Tensor::cat(taken.iter().map(|(_, g)| g.clone().square().sum()).collect(), 0);
    let norm = (squares.sum().into_scalar::<f32>() as f64).sqrt();
    let scale = if max_norm > 0.0 && norm > max_norm { max_norm / norm } else { 1.0 };
    for (id, g) in taken {
        grads.register(id, if scale < 1.0 { g.mul_scalar(scale) } else { g });
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initialisation_is_decided_by_the_name() {
        for name in [
            "model.layers.0.input_layernorm.weight",
            "model.norm.weight",
            "model.decoder.layers.3.self_attn_layer_norm.weight",
            "model.final_layernorm.weight",
            "model.decoder.final_layer_norm.weight",
        ] {
            assert_eq!(Init::of(name), Init::Ones, "{name}");
        }
        for name in ["model.decoder.layers.0.fc1.bias", "lm_head.bias", "model.final_layernorm.bias", "model.layers.1.self_attn.q_proj.bias"] {
            assert_eq!(Init::of(name), Init::Zeros, "{name}");
        }
        for name in ["model.embed_tokens.weight", "model.decoder.embed_positions.weight", "lm_head.weight", "model.layers.0.mlp.down_proj.weight"] {
            assert_eq!(Init::of(name), Init::Normal, "{name}");
        }
    }

    #[test]
    fn learning_rate_warms_up_then_decays_to_the_floor() {
        let cfg = PretrainConfig { steps: 100, warmup_steps: 10, learning_rate: 1e-3, final_lr_fraction: 0.1, ..Default::default() };
        assert!((cfg.learning_rate_at(1) - 1e-4).abs() < 1e-12);
        assert!((cfg.learning_rate_at(10) - 1e-3).abs() < 1e-12);
        assert!((cfg.learning_rate_at(100) - 1e-4).abs() < 1e-12);
        let lrs: Vec<f64> = (10..=100).map(|s| cfg.learning_rate_at(s)).collect();
        assert!(lrs.windows(2).all(|w| w[1] < w[0]), "decay is strictly decreasing");
    }

    #[test]
    fn configs_load_in_their_family_with_the_intended_structure() {
        let device = Device::flex();
        for family in [Family::Llama, Family::Opt, Family::Phi] {
            let size = ModelSize {
                hidden: 32,
                layers: 2,
                heads: 4,
                kv_heads: if family == Family::Llama { 2 } else { 4 },
                intermediate: 64,
                vocab: 300,
                max_positions: 64,
            };
            let raw = RawConfig { path: format!("<{family:?} config>").into(), json: hf_config(family, &size, 0).unwrap() };
            assert_eq!(raw.family().unwrap(), family);
            let names = disp_models::parameter_shapes(&raw, &device).unwrap();
            let has = |n: &str| names.iter().any(|(name, _)| name == n);
            match family {
                Family::Llama => {
                    assert!(!has("lm_head.weight"), "tied head");
                    assert!(names.iter().any(|(n, s)| n == "model.layers.0.self_attn.k_proj.weight" && *s == vec![16, 32]), "2 of 4 heads for K");
                }
                Family::Opt => {
                    assert!(!has("lm_head.weight") && has("model.decoder.final_layer_norm.weight"), "tied head, pre-LN final norm");
                    assert!(names.iter().any(|(n, s)| n == "model.decoder.embed_positions.weight" && *s == vec![66, 32]), "OPT's position offset 2");
                }
                Family::Phi => assert!(has("lm_head.weight") && has("lm_head.bias")),
                Family::Qwen2 | Family::Qwen3 | Family::Mistral => unreachable!("not trained from scratch"),
            }
        }
        let bad = ModelSize { heads: 5, ..ModelSize::tiny(Family::Llama) };
        assert!(hf_config(Family::Llama, &bad, 0).is_err());
        let err = hf_config(Family::Qwen3, &ModelSize::tiny(Family::Qwen3), 0).unwrap_err().to_string();
        assert!(err.contains("not qwen3"), "{err}");
    }
}
