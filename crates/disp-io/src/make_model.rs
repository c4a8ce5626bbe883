//! `disp make-model`: LLaMA-shaped Hugging Face folders with seeded random weights, so that
//! memory and speed at scale can be measured without downloading a checkpoint (and on machines
//! that weights cannot be carried to).
//!
//! Every tensor is generated and written in chunks straight into its shard (a safetensors
//! header is fully determined by the names, dtypes and shapes, so it is written first): the model
//! is never held in memory. Chunk `c` of tensor `t` is drawn from its own SplitMix64 stream, so the
//! bytes depend only on the seed, not on the number of threads.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::rng::{mix64, SplitMix64};

/// A LLaMA architecture `make-model` can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlamaShape {
    pub name: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub max_positions: usize,
}

/// The shapes `--shape` takes.
pub const SHAPES: &[LlamaShape] = &[
    LlamaShape { name: "llama2-7b", hidden: 4096, layers: 32, intermediate: 11008, heads: 32, kv_heads: 32, max_positions: 4096 },
    LlamaShape { name: "llama2-13b", hidden: 5120, layers: 40, intermediate: 13824, heads: 40, kv_heads: 40, max_positions: 4096 },
    // 1.17 B parameters with a 49k vocabulary: the LLaMA-3.2-1B layout at 16 layers.
    LlamaShape { name: "llama-1b", hidden: 2048, layers: 16, intermediate: 8192, heads: 32, kv_heads: 8, max_positions: 4096 },
    LlamaShape { name: "tiny", hidden: 64, layers: 2, intermediate: 160, heads: 4, kv_heads: 2, max_positions: 512 },
];

impl LlamaShape {
    pub fn by_name(name: &str) -> Result<Self> {
        SHAPES.iter().copied().find(|s| s.name == name).ok_or_else(|| {
            let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
            anyhow::anyhow!("unknown model shape '{name}' (known: {})", names.join(", "))
        })
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Every tensor in HF order with its shape and whether it is a norm (ones) or a matrix.
    fn tensors(&self, vocab: usize) -> Vec<(String, Vec<usize>, bool)> {
        let (d, kv) = (self.hidden, self.kv_heads * self.head_dim());
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![vocab, d], false)];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![d], true));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![d, d], false));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d], false));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d], false));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, d], false));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![d], true));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![self.intermediate, d], false));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![self.intermediate, d], false));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![d, self.intermediate], false));
        }
        out.push(("model.norm.weight".to_string(), vec![d], true));
        out.push(("lm_head.weight".to_string(), vec![vocab, d], false));
        out
    }
}

/// The element type of the written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    BF16,
}

impl StoredDtype {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            _ => bail!("unknown dtype '{name}' (known: bf16, f16, f32)"),
        }
    }

    fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    fn safetensors_name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        }
    }

    fn encode(self, value: f32, out: &mut Vec<u8>) {
        match self {
            Self::F32 => out.extend_from_slice(&value.to_le_bytes()),
            Self::F16 => out.extend_from_slice(&half::f16::from_f32(value).to_le_bytes()),
            Self::BF16 => out.extend_from_slice(&half::bf16::from_f32(value).to_le_bytes()),
        }
    }
}

/// What to write.
#[derive(Debug, Clone)]
pub struct MakeModelRequest {
    pub shape: LlamaShape,
    pub dtype: StoredDtype,
    pub seed: u64,
    /// A `tokenizer.json` file, or a folder holding one (its `tokenizer_config.json` is copied too).
    pub tokenizer: std::path::PathBuf,
    /// Largest shard in bytes (HF's default is 5 GB).
    pub max_shard_bytes: u64,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadeModel {
    pub parameters: u64,
    pub bytes: u64,
    pub shards: usize,
    pub vocab: usize,
}

/// Standard deviation of the matrices, as LLaMA's `initializer_range`.
const INIT_STD: f64 = 0.02;
/// Values generated and written per chunk.
const CHUNK: usize = 1 << 20;

/// Writes the model folder `out` atomically: `config.json`, the shards with their index, the
/// tokenizer. Fails before writing when the disk has not the room.
pub fn make_model(request: &MakeModelRequest, out: &Path) -> Result<MadeModel> {
    let shape = request.shape;
    if request.max_shard_bytes == 0 {
        bail!("--shard-mb: the shard size must be positive");
    }
    let (tokenizer_json, tokenizer_config) = tokenizer_files(&request.tokenizer)?;
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_json)
        .map_err(|e| anyhow::anyhow!("{}: not a tokenizer: {}", tokenizer_json.display(), crate::fsutil::one_line(&e.to_string())))?;
    let vocab = tokenizer.get_vocab_size(true);
    if vocab == 0 {
        bail!("{}: the tokenizer has no tokens", tokenizer_json.display());
    }
    let tensors = shape.tensors(vocab);
    let element = request.dtype.bytes() as u64;
    let parameters: u64 = tensors.iter().map(|(_, s, _)| s.iter().product::<usize>() as u64).sum();
    let bytes = parameters * element;
    check_free_space(out, bytes)?;

    // Greedy shards in HF order, each at most `max_shard_bytes` (a bigger tensor gets its own).
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut filled = 0u64;
    for (i, (_, s, _)) in tensors.iter().enumerate() {
        let size = s.iter().product::<usize>() as u64 * element;
        if filled > 0 && filled + size > request.max_shard_bytes {
            shards.push(Vec::new());
            filled = 0;
        }
        filled += size;
        if let Some(shard) = shards.last_mut() {
            shard.push(i);
        }
    }

    let staged = crate::fsutil::StagedFolder::new(out)?;
    let mut weight_map = serde_json::Map::new();
    for (n, members) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", n + 1, shards.len());
        let path = staged.path().join(&file);
        write_shard(&path, &tensors, members, request.dtype, request.seed)?;
        for &i in members {
            weight_map.insert(tensors[i].0.clone(), json!(file));
        }
    }
    let index = json!({"metadata": {"total_size": bytes}, "weight_map": weight_map});
    crate::fsutil::write_atomic(&staged.path().join(crate::hf_folder::SHARD_INDEX), serde_json::to_string_pretty(&index)?.as_bytes())?;
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "vocab_size": vocab,
        "torch_dtype": request.dtype.torch_name(),
        "initializer_range": INIT_STD,
        "disp_make_model": {"shape": shape.name, "seed": request.seed},
    });
    crate::fsutil::write_atomic(&staged.path().join("config.json"), serde_json::to_string_pretty(&config)?.as_bytes())?;
    copy_file(&tokenizer_json, &staged.path().join("tokenizer.json"))?;
    if let Some(cfg) = tokenizer_config {
        copy_file(&cfg, &staged.path().join("tokenizer_config.json"))?;
    }
    staged.publish()?;
    Ok(MadeModel { parameters, bytes, shards: shards.len(), vocab })
}

/// `tokenizer.json` and, for a folder, its `tokenizer_config.json` if present.
fn tokenizer_files(source: &Path) -> Result<(std::path::PathBuf, Option<std::path::PathBuf>)> {
    if source.is_dir() {
        let json = source.join("tokenizer.json");
        if !json.is_file() {
            bail!("{}: no tokenizer.json in this folder", source.display());
        }
        let config = source.join("tokenizer_config.json");
        return Ok((json, config.is_file().then_some(config)));
    }
    if !source.is_file() {
        bail!("{}: no such tokenizer file or folder", source.display());
    }
    Ok((source.to_path_buf(), None))
}

fn copy_file(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Fails when the file system of `out` has less free space than the folder needs (plus 1 %).
fn check_free_space(out: &Path, bytes: u64) -> Result<()> {
    let mut probe = out.to_path_buf();
    // The nearest existing ancestor tells the file system the folder will be on.
    while !probe.exists() {
        match probe.parent() {
            Some(p) if !p.as_os_str().is_empty() => probe = p.to_path_buf(),
            _ => {
                probe = std::path::PathBuf::from(".");
                break;
            }
        }
    }
    let needed = bytes + bytes / 100;
    if let Some(free) = free_bytes(&probe) {
        if needed > free {
            bail!(
                "{}: the model needs {} of disk but only {} are free there",
                out.display(),
                crate::fmt::human_bytes(needed.into()),
                crate::fmt::human_bytes(free.into())
            );
        }
    }
    Ok(())
}

/// Bytes an unprivileged process may still write on the file system of `path`; a test may
/// pretend to less through `DISP_TEST_FREE_DISK_BYTES`.
fn free_bytes(path: &Path) -> Option<u64> {
    if let Some(v) = std::env::var_os("DISP_TEST_FREE_DISK_BYTES") {
        return v.to_str()?.parse().ok();
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c_path` is a valid NUL-terminated string and `stat` a properly sized out-value.
        if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
            return None;
        }
        #[allow(clippy::unnecessary_cast)]
        Some(stat.f_bavail as u64 * stat.f_frsize as u64)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Writes one shard: its header, then each member's values chunk by chunk.
fn write_shard(path: &Path, tensors: &[(String, Vec<usize>, bool)], members: &[usize], dtype: StoredDtype, seed: u64) -> Result<()> {
    let element = dtype.bytes();
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for &i in members {
        let (name, shape, _) = &tensors[i];
        let size = shape.iter().product::<usize>() * element;
        header.insert(name.clone(), json!({"dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [offset, offset + size]}));
        offset += size;
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header))?;
    // The data section starts 8-byte aligned, as the safetensors writer pads it.
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let file = std::fs::File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    let mut writer = std::io::BufWriter::with_capacity(8 << 20, file);
    let fail = |e: std::io::Error| anyhow::anyhow!("{}: cannot write: {e}", path.display());
    writer.write_all(&(header.len() as u64).to_le_bytes()).map_err(fail)?;
    writer.write_all(&header).map_err(fail)?;
    for &i in members {
        let (_, shape, is_norm) = &tensors[i];
        let count: usize = shape.iter().product();
        let chunks = count.div_ceil(CHUNK);
        // A few chunks at a time in parallel, written in order.
        let batch = rayon::current_num_threads().max(1) * 2;
        for first in (0..chunks).step_by(batch) {
            let last = (first + batch).min(chunks);
            let encoded: Vec<Vec<u8>> = {
                use rayon::prelude::*;
                (first..last)
                    .into_par_iter()
                    .map(|c| {
                        let len = CHUNK.min(count - c * CHUNK);
                        let mut out = Vec::with_capacity(len * element);
                        if *is_norm {
                            (0..len).for_each(|_| dtype.encode(1.0, &mut out));
                        } else {
                            // Uniform with the init's standard deviation: cheaper than normal draws
                            // and as good for measuring (nn.Linear's own init is uniform too).
                            let bound = (INIT_STD * 3f64.sqrt()) as f32;
                            let mut rng = SplitMix64::new(mix64(seed ^ mix64(i as u64 + 1) ^ mix64((c as u64) << 32 | 0xC0FFEE)));
                            for _ in 0..len {
                                let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
                                dtype.encode((2.0 * u - 1.0) * bound, &mut out);
                            }
                        }
                        out
                    })
                    .collect()
            };
            for chunk in encoded {
                writer.write_all(&chunk).map_err(fail)?;
            }
        }
    }
    writer.flush().map_err(fail)?;
    writer.into_inner().map_err(|e| anyhow::anyhow!("{}: cannot write: {e}", path.display()))?.sync_all().map_err(fail)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_the_parameter_counts_of_their_names() {
        let count = |name: &str, vocab: usize| -> u64 {
            LlamaShape::by_name(name).unwrap().tensors(vocab).iter().map(|(_, s, _)| s.iter().product::<usize>() as u64).sum()
        };
        // LLaMA-2-7B with its own 32000-token vocabulary has 6.74 B parameters.
        assert_eq!(count("llama2-7b", 32000), 6_738_415_616);
        let one_b = count("llama-1b", 49152) as f64 / 1e9;
        assert!((one_b - 1.17).abs() < 0.01, "{one_b}");
        assert!(LlamaShape::by_name("llama-7b").unwrap_err().to_string().contains("known: llama2-7b"));
        assert!(StoredDtype::parse("int8").unwrap_err().to_string().contains("known: bf16, f16, f32"));
    }
}
