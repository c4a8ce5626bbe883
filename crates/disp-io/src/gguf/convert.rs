//! GGUF (llama architecture) -> Hugging Face `LlamaForCausalLM` folder.
// Reads untrusted input: no panicking shortcuts (issue 12).
#![warn(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Result};
use safetensors::{Dtype, View};
use serde_json::{json, Value};

use crate::fsutil::StagedFolder;
use crate::hf_folder::{write_json, write_weights};

use super::format::{GgmlType, MetadataValue};
use super::quant::dequantize;
use super::reader::{GgufFile, TensorInfo};
use super::tokenizer::build_tokenizer;

/// What a conversion wrote.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    /// `general.architecture` of the source ("llama").
    pub architecture: String,
    /// Tensors written to model.safetensors (including zero biases filled in).
    pub tensors: usize,
    /// Values in those tensors.
    pub parameters: u64,
    pub num_hidden_layers: usize,
    pub vocab_size: usize,
    /// True when the GGUF has no `output.weight` and lm_head shares the embedding.
    pub tie_word_embeddings: bool,
    /// Size of model.safetensors in bytes.
    pub safetensors_bytes: u64,
}

/// Converts a llama-architecture GGUF file into a Hugging Face folder (config.json,
/// model.safetensors in f32, tokenizer.json, tokenizer_config.json) at `out_dir`.
///
/// Everything is written to a temporary sibling folder first and renamed into place, so on
/// error nothing is left at `out_dir`. `out_dir` must not exist or be an empty folder. Errors are
/// one line starting with the GGUF path.
pub fn convert_gguf_to_hf(gguf: &Path, out_dir: &Path) -> Result<ConvertSummary> {
    convert(gguf, out_dir).map_err(|e| anyhow!("{}: {}", gguf.display(), crate::fsutil::one_line(&format!("{e:#}"))))
}

fn convert(gguf_path: &Path, out_dir: &Path) -> Result<ConvertSummary> {
    // Fails before any work on an output folder that is in the way.
    let staging = StagedFolder::new(out_dir)?;
    let gguf = GgufFile::open_unprefixed(gguf_path)?;
    let plan = plan_llama(&gguf)?;
    let tokenizer = build_tokenizer(&gguf, Some(plan.config.max_position_embeddings))?;
    ensure!(
        tokenizer.vocab_size as u64 == plan.config.vocab_size,
        "the tokenizer has {} tokens but token_embd.weight has {} rows",
        tokenizer.vocab_size,
        plan.config.vocab_size
    );

    let config_json = config_json(&plan.config, &tokenizer);
    write_json(&staging.path().join("config.json"), &config_json)?;
    write_json(&staging.path().join("tokenizer_config.json"), &tokenizer.tokenizer_config)?;
    let tokenizer_path = staging.path().join("tokenizer.json");
    tokenizer.tokenizer.save(&tokenizer_path, true).map_err(|e| anyhow!("cannot write tokenizer.json: {e}"))?;
    // Reload to prove that what we wrote is a tokenizer.json the tokenizers crate accepts.
    tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| anyhow!("the written tokenizer.json does not load: {e}"))?;

    let tensors: Vec<(String, OutputTensor<'_>)> = plan.tensors.iter().map(|t| (t.hf_name.clone(), OutputTensor::new(&gguf, t))).collect();
    let parameters = plan.tensors.iter().map(|t| t.element_count() as u64).sum();
    let safetensors_bytes = write_weights(staging.path(), tensors)?;

    staging.publish()?;
    Ok(ConvertSummary {
        architecture: "llama".to_string(),
        tensors: plan.tensors.len(),
        parameters,
        num_hidden_layers: plan.config.num_hidden_layers as usize,
        vocab_size: plan.config.vocab_size as usize,
        tie_word_embeddings: plan.config.tie_word_embeddings,
        safetensors_bytes,
    })
}

/// The HF config values taken from `llama.*` metadata.
#[derive(Debug, Clone)]
struct LlamaConfig {
    hidden_size: u64,
    intermediate_size: u64,
    num_hidden_layers: u64,
    num_attention_heads: u64,
    num_key_value_heads: u64,
    head_dim: u64,
    rms_norm_eps: f64,
    rope_theta: f64,
    rope_scaling: Option<Value>,
    max_position_embeddings: u64,
    vocab_size: u64,
    tie_word_embeddings: bool,
    attention_bias: bool,
    mlp_bias: bool,
}

fn config_json(c: &LlamaConfig, tokenizer: &super::tokenizer::TokenizerParts) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": c.rope_scaling,
        "max_position_embeddings": c.max_position_embeddings,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "hidden_act": "silu",
        "attention_bias": c.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": c.mlp_bias,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": true,
        "torch_dtype": "float32",
    })
}

/// Where an output tensor's values come from.
#[derive(Debug, Clone)]
enum Source {
    /// A GGUF tensor (index into `GgufFile::tensors`).
    Gguf(usize),
    /// Zeros, for biases HF expects when only some projections have one.
    Zeros,
}

/// One tensor of model.safetensors.
#[derive(Debug, Clone)]
struct PlannedTensor {
    hf_name: String,
    /// Outermost first.
    shape: Vec<usize>,
    source: Source,
    /// Undo llama.cpp's Q/K row interleaving with this many heads.
    unpermute_heads: Option<usize>,
}

impl PlannedTensor {
    fn element_count(&self) -> usize {
        self.shape.iter().product()
    }
}

struct Plan {
    config: LlamaConfig,
    tensors: Vec<PlannedTensor>,
}

/// What a llama.cpp tensor name stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Role {
    Embedding,
    OutputNorm,
    Output,
    Layer(usize, LayerPart),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum LayerPart {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    AttnNorm,
    FfnNorm,
}

const LAYER_PARTS: [LayerPart; 9] = [
    LayerPart::Q,
    LayerPart::K,
    LayerPart::V,
    LayerPart::O,
    LayerPart::Gate,
    LayerPart::Up,
    LayerPart::Down,
    LayerPart::AttnNorm,
    LayerPart::FfnNorm,
];

impl LayerPart {
    fn from_gguf(name: &str) -> Option<Self> {
        Some(match name {
            "attn_q" => Self::Q,
            "attn_k" => Self::K,
            "attn_v" => Self::V,
            "attn_output" => Self::O,
            "ffn_gate" => Self::Gate,
            "ffn_up" => Self::Up,
            "ffn_down" => Self::Down,
            "attn_norm" => Self::AttnNorm,
            "ffn_norm" => Self::FfnNorm,
            _ => return None,
        })
    }

    fn gguf_name(self) -> &'static str {
        match self {
            Self::Q => "attn_q",
            Self::K => "attn_k",
            Self::V => "attn_v",
            Self::O => "attn_output",
            Self::Gate => "ffn_gate",
            Self::Up => "ffn_up",
            Self::Down => "ffn_down",
            Self::AttnNorm => "attn_norm",
            Self::FfnNorm => "ffn_norm",
        }
    }

    fn hf_name(self) -> &'static str {
        match self {
            Self::Q => "self_attn.q_proj",
            Self::K => "self_attn.k_proj",
            Self::V => "self_attn.v_proj",
            Self::O => "self_attn.o_proj",
            Self::Gate => "mlp.gate_proj",
            Self::Up => "mlp.up_proj",
            Self::Down => "mlp.down_proj",
            Self::AttnNorm => "input_layernorm",
            Self::FfnNorm => "post_attention_layernorm",
        }
    }

    fn is_attention_projection(self) -> bool {
        matches!(self, Self::Q | Self::K | Self::V | Self::O)
    }

    fn is_mlp_projection(self) -> bool {
        matches!(self, Self::Gate | Self::Up | Self::Down)
    }

    fn is_norm(self) -> bool {
        matches!(self, Self::AttnNorm | Self::FfnNorm)
    }
}

impl Role {
    fn gguf_name(self, suffix: &str) -> String {
        match self {
            Role::Embedding => format!("token_embd.{suffix}"),
            Role::OutputNorm => format!("output_norm.{suffix}"),
            Role::Output => format!("output.{suffix}"),
            Role::Layer(n, part) => format!("blk.{n}.{}.{suffix}", part.gguf_name()),
        }
    }

    fn hf_name(self, suffix: &str) -> String {
        match self {
            Role::Embedding => format!("model.embed_tokens.{suffix}"),
            Role::OutputNorm => format!("model.norm.{suffix}"),
            Role::Output => format!("lm_head.{suffix}"),
            Role::Layer(n, part) => format!("model.layers.{n}.{}.{suffix}", part.hf_name()),
        }
    }
}

/// Splits "blk.3.attn_q.bias" into (role, is_bias).
fn parse_tensor_name(name: &str) -> Option<(Role, bool)> {
    let (stem, suffix) = name.rsplit_once('.')?;
    let is_bias = match suffix {
        "weight" => false,
        "bias" => true,
        _ => return None,
    };
    let role = match stem {
        "token_embd" => Role::Embedding,
        "output_norm" => Role::OutputNorm,
        "output" => Role::Output,
        _ => {
            let rest = stem.strip_prefix("blk.")?;
            let (layer, part) = rest.split_once('.')?;
            // Reject "01"-style indices so every layer has exactly one spelling.
            if layer.len() > 1 && layer.starts_with('0') {
                return None;
            }
            Role::Layer(layer.parse().ok()?, LayerPart::from_gguf(part)?)
        }
    };
    Some((role, is_bias))
}

fn required_u64(gguf: &GgufFile, key: &str) -> Result<u64> {
    let value = gguf.get(key).ok_or_else(|| anyhow!("metadata {key} is missing"))?;
    integer(key, value)
}

fn optional_u64(gguf: &GgufFile, key: &str) -> Result<Option<u64>> {
    gguf.get(key).map(|v| integer(key, v)).transpose()
}

fn integer(key: &str, value: &MetadataValue) -> Result<u64> {
    value.as_u64().ok_or_else(|| anyhow!("metadata {key} must be a non-negative integer, found {}", value.type_description()))
}

fn optional_f64(gguf: &GgufFile, key: &str) -> Result<Option<f64>> {
    gguf.get(key)
        .map(|v| match v {
            // Widen through the shortest decimal so 1e-5f32 becomes 1e-5, not 9.9999997e-6.
            MetadataValue::F32(x) => Ok(x.to_string().parse::<f64>().unwrap_or(f64::from(*x))),
            _ => v.as_f64().ok_or_else(|| anyhow!("metadata {key} must be a number, found {}", v.type_description())),
        })
        .transpose()
}

/// Reads the architecture, checks every tensor against the metadata and decides the output.
fn plan_llama(gguf: &GgufFile) -> Result<Plan> {
    let architecture = match gguf.get("general.architecture") {
        None => bail!("metadata general.architecture is missing"),
        Some(v) => v.as_str().ok_or_else(|| anyhow!("metadata general.architecture must be a string, found {}", v.type_description()))?,
    };
    if architecture != "llama" {
        bail!("unsupported GGUF architecture '{architecture}' (only 'llama' is supported)");
    }

    // Type support first: it is the most useful thing to report about a file we cannot read.
    for t in &gguf.tensors {
        if !t.ggml_type.is_dequantizable() {
            bail!("tensor {} has unsupported GGUF type {} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)", t.name, t.ggml_type);
        }
    }

    if let Some(experts) = optional_u64(gguf, "llama.expert_count")? {
        ensure!(experts == 0, "mixture-of-experts llama models (llama.expert_count = {experts}) are not supported");
    }
    let hidden = required_u64(gguf, "llama.embedding_length")?;
    let ffn = match gguf.get("llama.feed_forward_length") {
        None => bail!("metadata llama.feed_forward_length is missing"),
        Some(MetadataValue::Array(_)) => {
            bail!("per-layer llama.feed_forward_length arrays are not supported")
        }
        Some(v) => integer("llama.feed_forward_length", v)?,
    };
    let layers = required_u64(gguf, "llama.block_count")?;
    let heads = match gguf.get("llama.attention.head_count") {
        None => bail!("metadata llama.attention.head_count is missing"),
        Some(MetadataValue::Array(_)) => {
            bail!("per-layer llama.attention.head_count arrays are not supported")
        }
        Some(v) => integer("llama.attention.head_count", v)?,
    };
    let kv_heads = match gguf.get("llama.attention.head_count_kv") {
        None => heads,
        Some(MetadataValue::Array(_)) => {
            bail!("per-layer llama.attention.head_count_kv arrays are not supported")
        }
        Some(v) => integer("llama.attention.head_count_kv", v)?,
    };
    ensure!(hidden > 0 && ffn > 0 && layers > 0, "llama.embedding_length, llama.feed_forward_length and llama.block_count must be positive");
    // Each layer has nine tensors; a count the header cannot back is refused before anything is
    // planned for it.
    let tensor_count = gguf.tensors.len() as u64;
    ensure!(
        layers.saturating_mul(LAYER_PARTS.len() as u64) <= tensor_count,
        "llama.block_count = {layers} needs {} layer tensors but the file has {tensor_count} tensors",
        layers.saturating_mul(LAYER_PARTS.len() as u64)
    );
    ensure!(heads > 0 && kv_heads > 0, "llama.attention.head_count and head_count_kv must be positive");
    ensure!(heads % kv_heads == 0, "llama.attention.head_count = {heads} is not a multiple of head_count_kv = {kv_heads}");
    let head_dim = match optional_u64(gguf, "llama.attention.key_length")? {
        Some(k) => k,
        None => {
            ensure!(hidden % heads == 0, "llama.embedding_length = {hidden} is not divisible by llama.attention.head_count = {heads}");
            hidden / heads
        }
    };
    if let Some(v) = optional_u64(gguf, "llama.attention.value_length")? {
        ensure!(v == head_dim, "llama.attention.value_length = {v} differs from the key length {head_dim}");
    }
    ensure!(head_dim > 0 && head_dim % 2 == 0, "head dimension {head_dim} must be even and positive");
    if let Some(rope_dims) = optional_u64(gguf, "llama.rope.dimension_count")? {
        ensure!(
            rope_dims == head_dim,
            "llama.rope.dimension_count = {rope_dims} differs from the head dimension {head_dim} (partial RoPE is not supported)"
        );
    }
    let rms_norm_eps = optional_f64(gguf, "llama.attention.layer_norm_rms_epsilon")?
        .ok_or_else(|| anyhow!("metadata llama.attention.layer_norm_rms_epsilon is missing"))?;
    ensure!(rms_norm_eps > 0.0 && rms_norm_eps < 1.0, "llama.attention.layer_norm_rms_epsilon = {rms_norm_eps} must be a small positive number");
    let rope_theta = optional_f64(gguf, "llama.rope.freq_base")?.unwrap_or(10_000.0);
    ensure!(rope_theta > 0.0 && rope_theta.is_finite(), "llama.rope.freq_base = {rope_theta} must be a positive number");
    let max_position_embeddings = required_u64(gguf, "llama.context_length")?;
    ensure!(max_position_embeddings > 0, "llama.context_length is 0; it must be at least 1");
    let rope_scaling = rope_scaling(gguf)?;

    let mut found: BTreeMap<(Role, bool), usize> = BTreeMap::new();
    for (index, t) in gguf.tensors.iter().enumerate() {
        let (role, is_bias) =
            parse_tensor_name(&t.name).ok_or_else(|| anyhow!("unexpected tensor {} (not part of a llama model this converter knows)", t.name))?;
        if let Role::Layer(n, part) = role {
            ensure!((n as u64) < layers, "tensor {} belongs to layer {n} but llama.block_count is {layers}", t.name);
            ensure!(!(is_bias && part.is_norm()), "tensor {} is a bias on an RMS norm, which llama has not", t.name);
        }
        ensure!(
            !(is_bias && matches!(role, Role::Embedding | Role::OutputNorm | Role::Output)),
            "unexpected tensor {} (llama has no such bias)",
            t.name
        );
        found.insert((role, is_bias), index);
    }

    let vocab = gguf.tensor("token_embd.weight").ok_or_else(|| anyhow!("tensor token_embd.weight is missing"))?.ne.get(1).copied().unwrap_or(0);
    let q_rows = heads.checked_mul(head_dim).ok_or_else(|| anyhow!("llama.attention.head_count x head dimension overflows"))?;
    let kv_rows = kv_heads.checked_mul(head_dim).ok_or_else(|| anyhow!("llama.attention.head_count_kv x head dimension overflows"))?;
    let weight_ne = |role: Role| -> Vec<u64> {
        match role {
            Role::Embedding | Role::Output => vec![hidden, vocab],
            Role::OutputNorm => vec![hidden],
            Role::Layer(_, part) => match part {
                LayerPart::Q => vec![hidden, q_rows],
                LayerPart::K | LayerPart::V => vec![hidden, kv_rows],
                LayerPart::O => vec![q_rows, hidden],
                LayerPart::Gate | LayerPart::Up => vec![hidden, ffn],
                LayerPart::Down => vec![ffn, hidden],
                LayerPart::AttnNorm | LayerPart::FfnNorm => vec![hidden],
            },
        }
    };

    let mut roles = vec![Role::Embedding, Role::OutputNorm];
    let tie_word_embeddings = !found.contains_key(&(Role::Output, false));
    if !tie_word_embeddings {
        roles.push(Role::Output);
    }
    for n in 0..layers as usize {
        roles.extend(LAYER_PARTS.iter().map(|&part| Role::Layer(n, part)));
    }
    let has_bias = |pred: fn(LayerPart) -> bool| found.keys().any(|(role, is_bias)| *is_bias && matches!(role, Role::Layer(_, p) if pred(*p)));
    // HF llama has one switch for all four attention biases and one for the three MLP biases,
    // so a file with only some of them gets zeros for the rest.
    let attention_bias = has_bias(LayerPart::is_attention_projection);
    let mlp_bias = has_bias(LayerPart::is_mlp_projection);

    let mut tensors = Vec::new();
    for role in roles {
        let expected_ne = weight_ne(role);
        let index = *found.get(&(role, false)).ok_or_else(|| anyhow!("tensor {} is missing", role.gguf_name("weight")))?;
        let info = tensor_at(gguf, index)?;
        check_ne(info, &expected_ne)?;
        let unpermute_heads = match role {
            Role::Layer(_, LayerPart::Q) => Some(heads as usize),
            Role::Layer(_, LayerPart::K) => Some(kv_heads as usize),
            _ => None,
        };
        tensors.push(PlannedTensor {
            hf_name: role.hf_name("weight"),
            shape: info.shape_outermost_first(),
            source: Source::Gguf(index),
            unpermute_heads,
        });
        let wants_bias = match role {
            Role::Layer(_, part) => (attention_bias && part.is_attention_projection()) || (mlp_bias && part.is_mlp_projection()),
            _ => false,
        };
        if wants_bias {
            // A projection's weight is [inputs, outputs]; its bias has the outputs.
            let outputs = expected_ne.get(1).copied().unwrap_or(0);
            let bias_ne = vec![outputs];
            let source = match found.get(&(role, true)) {
                Some(&bias_index) => {
                    check_ne(tensor_at(gguf, bias_index)?, &bias_ne)?;
                    Source::Gguf(bias_index)
                }
                None => Source::Zeros,
            };
            tensors.push(PlannedTensor { hf_name: role.hf_name("bias"), shape: vec![outputs as usize], source, unpermute_heads });
        }
    }
    ensure!(vocab > 0, "token_embd.weight has no rows");

    Ok(Plan {
        config: LlamaConfig {
            hidden_size: hidden,
            intermediate_size: ffn,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            vocab_size: vocab,
            tie_word_embeddings,
            attention_bias,
            mlp_bias,
        },
        tensors,
    })
}

fn tensor_at(gguf: &GgufFile, index: usize) -> Result<&TensorInfo> {
    gguf.tensors.get(index).ok_or_else(|| anyhow!("tensor #{index} is not in the file"))
}

fn check_ne(info: &TensorInfo, expected: &[u64]) -> Result<()> {
    ensure!(info.ne == expected, "tensor {} has ne {:?} but the metadata implies {:?} (innermost first)", info.name, info.ne, expected);
    Ok(())
}

/// HF `rope_scaling` from llama.cpp's `llama.rope.scaling.*` keys; only linear scaling maps
/// onto a plain llama config.
fn rope_scaling(gguf: &GgufFile) -> Result<Option<Value>> {
    let kind = match gguf.get("llama.rope.scaling.type") {
        None => None,
        Some(v) => Some(v.as_str().ok_or_else(|| anyhow!("metadata llama.rope.scaling.type must be a string, found {}", v.type_description()))?),
    };
    let factor = optional_f64(gguf, "llama.rope.scaling.factor")?.or(optional_f64(gguf, "llama.rope.scale_linear")?);
    let kind = kind.unwrap_or(if factor.is_some() { "linear" } else { "none" });
    match kind {
        "none" => Ok(None),
        "linear" => {
            let f = factor.ok_or_else(|| anyhow!("llama.rope.scaling.type is linear but llama.rope.scaling.factor is missing"))?;
            // Older transformers read "type", newer "rope_type".
            Ok((f != 1.0).then(|| json!({"rope_type": "linear", "type": "linear", "factor": f})))
        }
        other => bail!("unsupported RoPE scaling '{other}' (only linear is supported)"),
    }
}

/// A safetensors view that decodes its GGUF tensor only when the writer asks for the bytes,
/// so at most one tensor is held in f32 at a time.
struct OutputTensor<'a> {
    shape: Vec<usize>,
    bytes: Option<(&'a [u8], GgmlType)>,
    unpermute_heads: Option<usize>,
}

impl<'a> OutputTensor<'a> {
    fn new(gguf: &'a GgufFile, planned: &PlannedTensor) -> Self {
        let bytes = match planned.source {
            Source::Gguf(index) => gguf.tensors.get(index).map(|info| (gguf.tensor_bytes(info), info.ggml_type)),
            Source::Zeros => None,
        };
        Self { shape: planned.shape.clone(), bytes, unpermute_heads: planned.unpermute_heads }
    }

    fn values(&self) -> Vec<f32> {
        let count = self.shape.iter().product();
        let mut values = vec![0f32; count];
        if let Some((bytes, ty)) = self.bytes {
            // Sizes and types were validated when the file was opened and planned, so this cannot
            // fail; if it did, NaN makes the written model fail to load instead of a panic here.
            if dequantize(ty, bytes, &mut values).is_err() {
                values.fill(f32::NAN);
            }
        }
        match (self.unpermute_heads, self.shape.first()) {
            (Some(heads), Some(&rows)) if rows > 0 => unpermute_rows(&values, rows, count / rows, heads),
            _ => values,
        }
    }
}

impl View for OutputTensor<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let values = self.values();
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for v in values {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 4
    }
}

/// Inverts llama.cpp's Q/K permutation. Its converter turned each head's rows from HF's
/// rotate-half order (first half, second half) into interleaved pairs:
/// `w.reshape(heads, 2, head_dim / 2, cols).swapaxes(1, 2)`, i.e. GGUF row
/// `h * head_dim + 2 * i + s` holds HF row `h * head_dim + s * head_dim / 2 + i`.
// Indexes within `rows * cols`, which the asserts establish; not file contents.
#[allow(clippy::indexing_slicing)]
pub(crate) fn unpermute_rows(gguf_rows: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    assert_eq!(gguf_rows.len(), rows * cols);
    assert!(heads > 0 && rows.is_multiple_of(2 * heads), "rows {rows} do not split into {heads} heads of pairs");
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut hf = vec![0f32; rows * cols];
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..half {
                let hf_row = h * head_dim + s * half + i;
                let gguf_row = h * head_dim + 2 * i + s;
                hf[hf_row * cols..(hf_row + 1) * cols].copy_from_slice(&gguf_rows[gguf_row * cols..(gguf_row + 1) * cols]);
            }
        }
    }
    hf
}
