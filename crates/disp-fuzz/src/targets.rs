//! The fuzz targets: for each reader, a seed corpus built from the test fixtures and the code
//! that feeds one input through it, the way a command would.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use burn::tensor::{Device, Int, Tensor, TensorData};
use disp_core::params::RatioOf;
use disp_core::plan::{LayerIndices, PruningPlan};
use disp_models::gguf::{writer::GgufWriter, GgmlType, GgufFile};
use disp_models::CausalLm;

/// What a target reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// `model.safetensors` of a model folder, through the model loader.
    Safetensors,
    /// A GGUF file, through the reader and the dequantisation of every tensor.
    Gguf,
    /// A GGUF file, converted to a Hugging Face folder that is then loaded.
    GgufConvert,
    /// A pruning plan (JSON), checked against a model and applied to it.
    Plan,
    /// `config.json` of a pruned folder (the `disp` manifest), through the model loader.
    PrunedManifest,
    /// `config.json` of a dense folder, through the model loader.
    Config,
    /// `tokenizer.json`, loaded and used to encode and decode a sample.
    Tokenizer,
}

impl Target {
    pub const ALL: [Target; 7] =
        [Target::Safetensors, Target::Gguf, Target::GgufConvert, Target::Plan, Target::PrunedManifest, Target::Config, Target::Tokenizer];

    pub fn name(self) -> &'static str {
        match self {
            Target::Safetensors => "safetensors",
            Target::Gguf => "gguf",
            Target::GgufConvert => "gguf-convert",
            Target::Plan => "plan",
            Target::PrunedManifest => "pruned-manifest",
            Target::Config => "config",
            Target::Tokenizer => "tokenizer",
        }
    }

    /// Whether inputs are JSON texts (then tree mutations apply).
    pub fn is_json(self) -> bool {
        matches!(self, Target::Plan | Target::PrunedManifest | Target::Config | Target::Tokenizer)
    }
}

/// The test fixtures folder of the repository.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The fixture models the seeds come from (LLaMA with GQA and tied embeddings, OPT, Phi).
const SEED_MODELS: [&str; 3] = ["llama_gqa_tied", "opt_pre_ln", "phi"];

/// A prepared target: its seeds and the scratch folders its inputs are written to.
pub struct Harness {
    pub target: Target,
    pub seeds: Vec<Vec<u8>>,
    /// Model folders whose one file (config.json or model.safetensors) each input replaces,
    /// one per seed; for plans, the models the plans are for.
    folders: Vec<PathBuf>,
    models: Vec<Box<dyn CausalLm>>,
    scratch: tempfile::TempDir,
    device: Device,
}

fn copy_folder(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.path().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// A plan keeping every other position of every set (the first always).
fn every_other_plan(model: &dyn CausalLm) -> PruningPlan {
    let shape = model.model_shape();
    let layers = shape
        .blocks
        .iter()
        .map(|block| {
            let widths = block.site_widths();
            let mut site = 0;
            LayerIndices::from_sites(|_| {
                let width = widths[site];
                site += 1;
                (0..width as u32).step_by(2).collect()
            })
        })
        .collect();
    PruningPlan::from_layers(model.identity(), &shape, "fuzz-seed", RatioOf::Total, 0.5, layers, serde_json::json!({}))
}

impl Harness {
    pub fn new(target: Target) -> Result<Self> {
        let scratch = tempfile::tempdir().context("cannot create a scratch folder")?;
        let device = disp_core::select_device(disp_core::DeviceChoice::Cpu)?;
        let mut harness = Self { target, seeds: Vec::new(), folders: Vec::new(), models: Vec::new(), scratch, device };
        harness.prepare()?;
        Ok(harness)
    }

    fn prepare(&mut self) -> Result<()> {
        let root = self.scratch.path().to_path_buf();
        match self.target {
            Target::Safetensors | Target::Config => {
                for (i, name) in SEED_MODELS.iter().enumerate() {
                    let folder = root.join(format!("model{i}"));
                    copy_folder(&fixtures().join(name), &folder)?;
                    let file = if self.target == Target::Config { "config.json" } else { "model.safetensors" };
                    self.seeds.push(std::fs::read(folder.join(file))?);
                    self.folders.push(folder);
                }
            }
            Target::Plan => {
                for name in SEED_MODELS {
                    let model = disp_models::load_model(&fixtures().join(name), &self.device)?;
                    self.seeds.push(every_other_plan(model.as_ref()).to_json().into_bytes());
                    self.models.push(model);
                }
            }
            Target::PrunedManifest => {
                for (i, name) in SEED_MODELS.iter().enumerate() {
                    let source = fixtures().join(name);
                    let model = disp_models::load_model(&source, &self.device)?;
                    let folder = root.join(format!("pruned{i}"));
                    disp_export::export(&source, &every_other_plan(model.as_ref()), disp_export::ExportFormat::Pruned, &folder)?;
                    self.seeds.push(std::fs::read(folder.join("config.json"))?);
                    self.folders.push(folder);
                }
            }
            Target::Tokenizer => {
                self.seeds.push(std::fs::read(fixtures().join("byte_tokenizer.json"))?);
                let text = "the quick brown fox jumps over the lazy dog; the dog sleeps. ".repeat(20);
                let trained = disp_models::bpe::train_byte_level_bpe(std::iter::once(text.as_str()), 300)?;
                self.seeds.push(trained.to_string(false).map_err(|e| anyhow!("{e}"))?.into_bytes());
            }
            Target::Gguf | Target::GgufConvert => {
                self.seeds.push(tiny_llama_gguf(GgmlType::F32, false)?.to_bytes());
                self.seeds.push(tiny_llama_gguf(GgmlType::Q8_0, true)?.to_bytes());
            }
        }
        Ok(())
    }

    /// Feeds one input (derived from seed number `seed`) through the target.
    pub fn run(&self, seed: usize, input: &[u8]) -> Result<()> {
        let root = self.scratch.path();
        match self.target {
            Target::Safetensors | Target::Config | Target::PrunedManifest => {
                let folder = &self.folders[seed % self.folders.len()];
                let file = if self.target == Target::Safetensors { "model.safetensors" } else { "config.json" };
                std::fs::write(folder.join(file), input)?;
                let model = disp_models::load_model(folder, &self.device)?;
                // One token through the model: the sizes it was loaded with must be usable.
                let logits = model.forward_last(burn_tokens(&self.device), None);
                let _ = logits.dims();
                Ok(())
            }
            Target::Plan => {
                let model = &self.models[seed % self.models.len()];
                let text = std::str::from_utf8(input).map_err(|e| anyhow!("not UTF-8: {e}"))?;
                let plan = PruningPlan::parse(text)?;
                plan.validate(&model.identity(), &model.model_shape())?;
                let pruned = model.prune(&plan)?;
                let _ = pruned.forward_last(burn_tokens(&self.device), None).dims();
                Ok(())
            }
            Target::Tokenizer => {
                let text = std::str::from_utf8(input).map_err(|e| anyhow!("not UTF-8: {e}"))?;
                let tokenizer = disp_models::tokenizer::parse_tokenizer(text)?;
                let sample = "Hello world, the dog — café 42\n";
                let ids = tokenizer.encode(sample, false).map_err(|e| anyhow!("{e}"))?;
                tokenizer.decode(ids.get_ids(), false).map_err(|e| anyhow!("{e}"))?;
                Ok(())
            }
            Target::Gguf => {
                let path = root.join("input.gguf");
                std::fs::write(&path, input)?;
                let gguf = GgufFile::open(&path)?;
                for info in &gguf.tensors {
                    let mut values = vec![0f32; usize::try_from(info.element_count())?];
                    disp_models::gguf::quant::dequantize(info.ggml_type, gguf.tensor_bytes(info), &mut values)?;
                }
                Ok(())
            }
            Target::GgufConvert => {
                let path = root.join("input.gguf");
                let out = root.join("converted");
                std::fs::write(&path, input)?;
                let _ = std::fs::remove_dir_all(&out);
                let result = disp_models::gguf::convert_gguf_to_hf(&path, &out).and_then(|_| {
                    let model = disp_models::load_model(&out, &self.device)?;
                    let _ = model.forward_last(burn_tokens(&self.device), None).dims();
                    disp_models::TextTokenizer::load(&out)?.encode("hello world")?;
                    Ok(())
                });
                let _ = std::fs::remove_dir_all(&out);
                result
            }
        }
    }
}

/// One token (id 0, in every vocabulary), `[1, 1]`.
fn burn_tokens(device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(vec![0i64], [1, 1]), device)
}

/// A one-layer llama GGUF with a byte-level tokenizer (256 byte symbols, a few merges), its
/// matrices in `matrix_type`: a seed of the GGUF targets, and a base for tests to change.
pub fn tiny_llama_gguf(matrix_type: GgmlType, with_bias: bool) -> Result<GgufWriter> {
    const HIDDEN: usize = 32;
    const HEADS: usize = 2;
    const FFN: usize = 64;
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into()];
    tokens.extend(byte_symbols());
    let mut merges = Vec::new();
    for (a, b) in [("t", "h"), ("th", "e"), ("Ġ", "t"), ("h", "e"), ("Ġt", "he")] {
        merges.push(format!("{a} {b}"));
        if !tokens.contains(&format!("{a}{b}")) {
            tokens.push(format!("{a}{b}"));
        }
    }
    let vocab = tokens.len();
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", "llama")
        .metadata("llama.context_length", 64u32)
        .metadata("llama.embedding_length", HIDDEN as u32)
        .metadata("llama.block_count", 1u32)
        .metadata("llama.feed_forward_length", FFN as u32)
        .metadata("llama.attention.head_count", HEADS as u32)
        .metadata("llama.attention.head_count_kv", 1u32)
        .metadata("llama.attention.layer_norm_rms_epsilon", 1e-5f32)
        .metadata("llama.rope.freq_base", 10000f32)
        .metadata("tokenizer.ggml.model", "gpt2")
        .metadata("tokenizer.ggml.pre", "smollm")
        .metadata("tokenizer.ggml.tokens", tokens.clone())
        .metadata("tokenizer.ggml.merges", merges)
        .metadata("tokenizer.ggml.bos_token_id", 0u32)
        .metadata("tokenizer.ggml.eos_token_id", 0u32);
    let head_dim = HIDDEN / HEADS;
    let values = |n: usize| -> Vec<f32> { (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 200.0).collect() };
    let matrix = |w: &mut GgufWriter, name: &str, cols: usize, rows: usize, ty: GgmlType| -> Result<()> {
        w.tensor_f32(name, &[cols as u64, rows as u64], ty, &values(cols * rows))?;
        Ok(())
    };
    matrix(&mut w, "token_embd.weight", HIDDEN, vocab, GgmlType::F32)?;
    matrix(&mut w, "blk.0.attn_q.weight", HIDDEN, HIDDEN, matrix_type)?;
    matrix(&mut w, "blk.0.attn_k.weight", HIDDEN, head_dim, matrix_type)?;
    matrix(&mut w, "blk.0.attn_v.weight", HIDDEN, head_dim, matrix_type)?;
    matrix(&mut w, "blk.0.attn_output.weight", HIDDEN, HIDDEN, matrix_type)?;
    matrix(&mut w, "blk.0.ffn_gate.weight", HIDDEN, FFN, matrix_type)?;
    matrix(&mut w, "blk.0.ffn_up.weight", HIDDEN, FFN, matrix_type)?;
    matrix(&mut w, "blk.0.ffn_down.weight", FFN, HIDDEN, matrix_type)?;
    for norm in ["blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"] {
        w.tensor_f32(norm, &[HIDDEN as u64], GgmlType::F32, &[1.0; HIDDEN])?;
    }
    if with_bias {
        w.tensor_f32("blk.0.attn_q.bias", &[HIDDEN as u64], GgmlType::F32, &values(HIDDEN))?;
    }
    Ok(w)
}

/// GPT-2's byte-to-character table as strings, in byte order.
fn byte_symbols() -> Vec<String> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?').to_string()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?').to_string()
            }
        })
        .collect()
}
