//! GGUF import: tiny llama GGUF files written with `gguf::writer` are converted and checked
//! against values computed here, independently of the converter.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use disp_models::gguf::writer::GgufWriter;
use disp_models::gguf::{convert_gguf_to_hf, quant, ConvertSummary, GgmlType, GgufFile, MetadataValue};
use half::{bf16, f16};
use serde_json::Value;

const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FFN: usize = 96;
const LAYERS: usize = 2;
const CONTEXT: u32 = 256;

// ---------------------------------------------------------------------------------------------
// Independent reference code (deliberately not shared with the crate).

/// GPT-2's byte -> printable char table.
fn byte_to_char() -> Vec<char> {
    let mut table = vec!['\0'; 256];
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut next = 256u32;
    for byte in 0..256u32 {
        table[byte as usize] = if printable.contains(&byte) {
            char::from_u32(byte).unwrap()
        } else {
            let c = char::from_u32(next).unwrap();
            next += 1;
            c
        };
    }
    table
}

/// llama.cpp's converter permutation, written as numpy would do
/// `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)`:
/// output element (h, i, s, c) of the (n_head, half, 2, cols) array is input (h, s, i, c).
fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..n_head {
        for i in 0..half {
            for s in 0..2 {
                for c in 0..cols {
                    out.push(w[((h * 2 + s) * half + i) * cols + c]);
                }
            }
        }
    }
    out
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Decodes raw GGUF bytes with the formulas from the GGUF/ggml documentation.
fn reference_dequant(ty: GgmlType, raw: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    match ty {
        GgmlType::F32 => raw.chunks(4).for_each(|b| out.push(f32::from_le_bytes(b.try_into().unwrap()))),
        GgmlType::F16 => raw.chunks(2).for_each(|b| out.push(f16_at(b, 0))),
        GgmlType::BF16 => raw.chunks(2).for_each(|b| out.push(bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        GgmlType::Q8_0 => {
            for block in raw.chunks(34) {
                let d = f16_at(block, 0);
                for q in &block[2..34] {
                    out.push(d * (*q as i8) as f32);
                }
            }
        }
        GgmlType::Q4_0 => {
            for block in raw.chunks(18) {
                let d = f16_at(block, 0);
                let nibbles = &block[2..18];
                for j in 0..32 {
                    let q = if j < 16 { nibbles[j] & 15 } else { nibbles[j - 16] >> 4 };
                    out.push(d * (q as i32 - 8) as f32);
                }
            }
        }
        GgmlType::Q4_1 => {
            for block in raw.chunks(20) {
                let (d, m) = (f16_at(block, 0), f16_at(block, 2));
                let nibbles = &block[4..20];
                for j in 0..32 {
                    let q = if j < 16 { nibbles[j] & 15 } else { nibbles[j - 16] >> 4 };
                    out.push(q as f32 * d + m);
                }
            }
        }
        other => panic!("no reference decoder for {other}"),
    }
    out
}

/// Deterministic values in [-scale, scale).
struct Rng(u64);
impl Rng {
    fn next_f32(&mut self, scale: f32) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32(scale)).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The tiny model.

struct Vocab {
    tokens: Vec<String>,
    merges: Vec<String>,
    token_types: Vec<i32>,
}

/// 3 control tokens, the 256 byte symbols, and merge chains for a few words (plus "2 0", which
/// the smollm digit splitting must keep from ever applying).
fn tiny_vocab() -> Vocab {
    let chars = byte_to_char();
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from).to_vec();
    tokens.extend(chars.iter().map(|c| c.to_string()));
    let mut merges = Vec::new();
    let words = ["Ġhello", "Ġworld", "Ġthe", "Ġand", "Ġpruning", "hello", "ing", "Ġtoken", "er", "20"];
    for word in words {
        let symbols: Vec<String> = word.chars().map(|c| c.to_string()).collect();
        let mut left = symbols[0].clone();
        for right in &symbols[1..] {
            let merged = format!("{left}{right}");
            if !tokens.contains(&merged) {
                merges.push(format!("{left} {right}"));
                tokens.push(merged.clone());
            }
            left = merged;
        }
    }
    let mut token_types = vec![1; tokens.len()];
    token_types[..3].fill(3);
    Vocab { tokens, merges, token_types }
}

#[derive(Clone, Copy)]
struct Options {
    tied: bool,
    q_bias: bool,
    version: u32,
    alignment: Option<u32>,
}

impl Default for Options {
    fn default() -> Self {
        Self { tied: false, q_bias: false, version: 3, alignment: None }
    }
}

/// What the converter must write for one HF tensor.
struct Expected {
    shape: Vec<usize>,
    /// The reference decoding of the bytes written, in GGUF row order.
    gguf_order: Vec<f32>,
    /// For Q/K: the converter's output, permuted the llama.cpp way with this many heads, must
    /// equal `gguf_order` (checks the un-permutation against an independent forward one).
    permuted_heads: Option<usize>,
}

/// The tiny model's GGUF plus, per HF tensor name, the values the conversion must produce.
struct TinyModel {
    writer: GgufWriter,
    expected: HashMap<String, Expected>,
    vocab: Vocab,
}

fn layer_types(layer: usize) -> [(&'static str, GgmlType); 7] {
    if layer == 0 {
        [
            ("attn_q", GgmlType::Q4_1),
            ("attn_k", GgmlType::Q4_0),
            ("attn_v", GgmlType::F16),
            ("attn_output", GgmlType::Q8_0),
            ("ffn_gate", GgmlType::Q4_1),
            ("ffn_up", GgmlType::F16),
            ("ffn_down", GgmlType::Q4_0),
        ]
    } else {
        [
            ("attn_q", GgmlType::Q8_0),
            ("attn_k", GgmlType::Q4_1),
            ("attn_v", GgmlType::BF16),
            ("attn_output", GgmlType::F32),
            ("ffn_gate", GgmlType::Q4_0),
            ("ffn_up", GgmlType::Q8_0),
            ("ffn_down", GgmlType::F16),
        ]
    }
}

fn hf_projection(part: &str) -> &'static str {
    match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => unreachable!(),
    }
}

fn tiny_model(opts: Options) -> TinyModel {
    let vocab = tiny_vocab();
    let n_vocab = vocab.tokens.len();
    let mut w = GgufWriter::new();
    w.version(opts.version);
    if let Some(a) = opts.alignment {
        w.alignment(a);
    }
    w.metadata("general.architecture", "llama")
        .metadata("general.name", "tiny")
        .metadata("llama.context_length", CONTEXT)
        .metadata("llama.embedding_length", HIDDEN as u32)
        .metadata("llama.block_count", LAYERS as u32)
        .metadata("llama.feed_forward_length", FFN as u32)
        .metadata("llama.rope.dimension_count", HEAD_DIM as u32)
        .metadata("llama.attention.head_count", HEADS as u32)
        .metadata("llama.attention.head_count_kv", KV_HEADS as u32)
        .metadata("llama.attention.layer_norm_rms_epsilon", 1e-5f32)
        .metadata("llama.rope.freq_base", 100000f32)
        .metadata("tokenizer.ggml.model", "gpt2")
        .metadata("tokenizer.ggml.pre", "smollm")
        .metadata("tokenizer.ggml.tokens", vocab.tokens.clone())
        .metadata("tokenizer.ggml.token_type", vocab.token_types.clone())
        .metadata("tokenizer.ggml.merges", vocab.merges.clone())
        .metadata("tokenizer.ggml.bos_token_id", 1u32)
        .metadata("tokenizer.ggml.eos_token_id", 2u32)
        .metadata("tokenizer.ggml.unknown_token_id", 0u32)
        .metadata("tokenizer.ggml.add_bos_token", false)
        .metadata("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}");

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut expected = HashMap::new();
    // Writes `hf` (rows x cols, HF layout) as `ty`, permuting Q/K rows the llama.cpp way, and
    // records what the converter must give back: the reference decoding of the written bytes,
    // with the permutation undone (checked exactly against the forward permutation).
    let mut add = |w: &mut GgufWriter,
                   gguf_name: &str,
                   hf_name: String,
                   rows: usize,
                   cols: usize,
                   ty: GgmlType,
                   permute_heads: Option<usize>,
                   rng: &mut Rng| {
        let hf = rng.vec(rows * cols, 0.5);
        let stored = match permute_heads {
            Some(n) => llama_cpp_permute(&hf, rows, cols, n),
            None => hf,
        };
        let raw = quant::quantize(ty, &stored).unwrap();
        let decoded = reference_dequant(ty, &raw);
        let ne: Vec<u64> = if rows == 1 { vec![cols as u64] } else { vec![cols as u64, rows as u64] };
        w.tensor_raw(gguf_name, &ne, ty, raw);
        let shape = if rows == 1 { vec![cols] } else { vec![rows, cols] };
        expected.insert(hf_name, Expected { shape, gguf_order: decoded, permuted_heads: permute_heads });
    };
    add(&mut w, "token_embd.weight", "model.embed_tokens.weight".into(), n_vocab, HIDDEN, GgmlType::Q8_0, None, &mut rng);
    for layer in 0..LAYERS {
        for (part, ty) in layer_types(layer) {
            let (rows, cols) = match part {
                "attn_q" => (HEADS * HEAD_DIM, HIDDEN),
                "attn_k" | "attn_v" => (KV_HEADS * HEAD_DIM, HIDDEN),
                "attn_output" => (HIDDEN, HEADS * HEAD_DIM),
                "ffn_gate" | "ffn_up" => (FFN, HIDDEN),
                _ => (HIDDEN, FFN),
            };
            let heads = match part {
                "attn_q" => Some(HEADS),
                "attn_k" => Some(KV_HEADS),
                _ => None,
            };
            let hf_name = format!("model.layers.{layer}.{}.weight", hf_projection(part));
            add(&mut w, &format!("blk.{layer}.{part}.weight"), hf_name, rows, cols, ty, heads, &mut rng);
        }
        for (part, hf) in [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")] {
            add(&mut w, &format!("blk.{layer}.{part}.weight"), format!("model.layers.{layer}.{hf}.weight"), 1, HIDDEN, GgmlType::F32, None, &mut rng);
        }
    }
    add(&mut w, "output_norm.weight", "model.norm.weight".into(), 1, HIDDEN, GgmlType::F32, None, &mut rng);
    if !opts.tied {
        add(&mut w, "output.weight", "lm_head.weight".into(), n_vocab, HIDDEN, GgmlType::Q4_1, None, &mut rng);
    }
    if opts.q_bias {
        // A bias is a one-column matrix for the permutation.
        let hf = rng.vec(HEADS * HEAD_DIM, 0.5);
        let stored = llama_cpp_permute(&hf, HEADS * HEAD_DIM, 1, HEADS);
        w.tensor_f32("blk.0.attn_q.bias", &[(HEADS * HEAD_DIM) as u64], GgmlType::F32, &stored).unwrap();
        expected.insert(
            "model.layers.0.self_attn.q_proj.bias".into(),
            Expected { shape: vec![HEADS * HEAD_DIM], gguf_order: stored, permuted_heads: Some(HEADS) },
        );
    }
    TinyModel { writer: w, expected, vocab }
}

// ---------------------------------------------------------------------------------------------
// Helpers.

struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap() }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
    /// Entries of the scratch folder, to prove no output or staging folder was left behind.
    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(self.dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }
}

fn read_f32_tensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let values = view.data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn assert_matches_expected(out: &Path, model: &TinyModel) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let got = read_f32_tensors(&out.join("model.safetensors"));
    for (name, expected) in &model.expected {
        let (got_shape, got_values) = got.get(name).unwrap_or_else(|| panic!("{name} missing from output"));
        assert_eq!(got_shape, &expected.shape, "{name} shape");
        let comparable = match expected.permuted_heads {
            Some(heads) => {
                let cols = if expected.shape.len() == 2 { expected.shape[1] } else { 1 };
                llama_cpp_permute(got_values, expected.shape[0], cols, heads)
            }
            None => got_values.clone(),
        };
        // Exact: the converter and the reference apply the same formula to the same bytes.
        let mismatch = comparable.iter().zip(&expected.gguf_order).position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(mismatch, None, "{name}: first mismatch at {mismatch:?}");
    }
    got
}

fn convert_err(gguf: &Path, out: &Path) -> String {
    let err = convert_gguf_to_hf(gguf, out).expect_err("conversion should fail");
    let msg = format!("{err:#}");
    assert!(!msg.contains('\n'), "error must be one line: {msg}");
    assert!(msg.contains(&gguf.display().to_string()), "error must name the file: {msg}");
    assert!(!out.exists(), "nothing may be left at the output path after: {msg}");
    msg
}

fn convert_tiny(opts: Options) -> (Scratch, TinyModel, PathBuf, ConvertSummary) {
    let scratch = Scratch::new();
    let model = tiny_model(opts);
    let gguf = scratch.write("tiny.gguf", &model.writer.to_bytes());
    let out = scratch.path("hf");
    let summary = convert_gguf_to_hf(&gguf, &out).unwrap();
    (scratch, model, out, summary)
}

// ---------------------------------------------------------------------------------------------
// Conversion.

#[test]
fn converts_tiny_untied_model_with_every_supported_type() {
    let (scratch, model, out, summary) = convert_tiny(Options::default());
    let got = assert_matches_expected(&out, &model);

    let n_vocab = model.vocab.tokens.len();
    // 3 + 9 per layer, plus lm_head.
    assert_eq!(got.len(), 3 + 9 * LAYERS);
    assert_eq!(summary.tensors, got.len());
    assert!(got.contains_key("lm_head.weight"));
    assert!(!summary.tie_word_embeddings);
    let params: u64 = got.values().map(|(s, _)| s.iter().product::<usize>() as u64).sum();
    assert_eq!(summary.parameters, params);
    assert_eq!(summary.vocab_size, n_vocab);
    assert_eq!(summary.architecture, "llama");

    let config = read_json(&out.join("config.json"));
    let expect = [
        ("hidden_size", serde_json::json!(HIDDEN)),
        ("intermediate_size", FFN.into()),
        ("num_hidden_layers", LAYERS.into()),
        ("num_attention_heads", HEADS.into()),
        ("num_key_value_heads", KV_HEADS.into()),
        ("head_dim", HEAD_DIM.into()),
        ("max_position_embeddings", CONTEXT.into()),
        ("vocab_size", n_vocab.into()),
        ("tie_word_embeddings", false.into()),
        ("bos_token_id", 1.into()),
        ("eos_token_id", 2.into()),
        ("hidden_act", "silu".into()),
        ("model_type", "llama".into()),
        ("attention_bias", false.into()),
        ("mlp_bias", false.into()),
        ("torch_dtype", "float32".into()),
        ("architectures", serde_json::json!(["LlamaForCausalLM"])),
    ];
    for (key, value) in expect {
        assert_eq!(config[key], value, "config.json {key}");
    }
    // Written as f32 1e-5 in the GGUF; the config must say 1e-5, not 9.99999974e-6.
    assert_eq!(config["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(config["rope_theta"].as_f64(), Some(100000.0));

    let tok_config = read_json(&out.join("tokenizer_config.json"));
    assert_eq!(tok_config["bos_token"], "<|im_start|>");
    assert_eq!(tok_config["eos_token"], "<|im_end|>");
    assert_eq!(tok_config["unk_token"], "<|endoftext|>");
    assert_eq!(tok_config["add_bos_token"], false);
    assert!(tok_config["chat_template"].as_str().unwrap().contains("m.content"));

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for name in ["", "model.safetensors", "config.json", "tokenizer.json"] {
            let mode = std::fs::metadata(out.join(name)).unwrap().permissions().mode();
            assert_eq!(mode & 0o044, 0o044, "{name:?} must be readable by others (mode {mode:o})");
        }
    }

    // Only the finished folder remains; the staging folder is gone.
    assert_eq!(scratch.entries(), vec!["hf", "tiny.gguf"]);
}

#[test]
fn tied_embeddings_write_no_lm_head() {
    let (_scratch, model, out, summary) = convert_tiny(Options { tied: true, ..Options::default() });
    let got = assert_matches_expected(&out, &model);
    assert!(!got.contains_key("lm_head.weight"));
    assert!(summary.tie_word_embeddings);
    assert_eq!(read_json(&out.join("config.json"))["tie_word_embeddings"], true);
}

#[test]
fn qk_unpermutation_restores_the_hf_matrix_exactly() {
    // An HF-layout q_proj with recognisable rows: value = row * 1000 + col.
    let (rows, cols, heads) = (HEADS * HEAD_DIM, HIDDEN, HEADS);
    let hf_q: Vec<f32> = (0..rows * cols).map(|i| ((i / cols) * 1000 + i % cols) as f32).collect();
    let (kv_rows, kv_heads) = (KV_HEADS * HEAD_DIM, KV_HEADS);
    let hf_k: Vec<f32> = (0..kv_rows * cols).map(|i| -(((i / cols) * 1000 + i % cols) as f32)).collect();
    let permuted_q = llama_cpp_permute(&hf_q, rows, cols, heads);
    let permuted_k = llama_cpp_permute(&hf_k, kv_rows, cols, kv_heads);
    // The permutation really moves rows: GGUF row 1 is HF row head_dim / 2 of head 0.
    assert_eq!(permuted_q[cols], hf_q[HEAD_DIM / 2 * cols]);
    assert_ne!(permuted_q, hf_q);

    let scratch = Scratch::new();
    let mut model = tiny_model(Options::default());
    for layer in 0..LAYERS {
        // Replace the random q/k with F32 tensors so the round trip must be bit-exact.
        let mut w = std::mem::take(&mut model.writer);
        w = rebuild_without(&w, &[&format!("blk.{layer}.attn_q.weight"), &format!("blk.{layer}.attn_k.weight")]);
        w.tensor_f32(format!("blk.{layer}.attn_q.weight"), &[cols as u64, rows as u64], GgmlType::F32, &permuted_q).unwrap();
        w.tensor_f32(format!("blk.{layer}.attn_k.weight"), &[cols as u64, kv_rows as u64], GgmlType::F32, &permuted_k).unwrap();
        model.writer = w;
    }
    let gguf = scratch.write("perm.gguf", &model.writer.to_bytes());
    let out = scratch.path("hf");
    convert_gguf_to_hf(&gguf, &out).unwrap();
    let got = read_f32_tensors(&out.join("model.safetensors"));
    for layer in 0..LAYERS {
        let (q_shape, q) = &got[&format!("model.layers.{layer}.self_attn.q_proj.weight")];
        let (k_shape, k) = &got[&format!("model.layers.{layer}.self_attn.k_proj.weight")];
        assert_eq!(q_shape, &vec![rows, cols]);
        assert_eq!(k_shape, &vec![kv_rows, cols]);
        assert_eq!(q, &hf_q, "layer {layer} q_proj");
        assert_eq!(k, &hf_k, "layer {layer} k_proj");
    }
}

/// A copy of the writer's file without the named tensors (rebuilt through the reader, which
/// also exercises reading every metadata type back).
fn rebuild_without(w: &GgufWriter, drop: &[&str]) -> GgufWriter {
    let scratch = Scratch::new();
    let path = scratch.write("x.gguf", &w.to_bytes());
    let file = GgufFile::open(&path).unwrap();
    let mut out = GgufWriter::new();
    for (key, value) in file.metadata() {
        out.metadata(key.clone(), value.clone());
    }
    for t in &file.tensors {
        if !drop.contains(&t.name.as_str()) {
            out.tensor_raw(t.name.clone(), &t.ne, t.ggml_type, file.tensor_bytes(t).to_vec());
        }
    }
    out
}

#[test]
fn partial_attention_biases_are_unpermuted_and_completed_with_zeros() {
    let (_scratch, model, out, _) = convert_tiny(Options { q_bias: true, ..Options::default() });
    let got = assert_matches_expected(&out, &model);
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["attention_bias"], true);
    assert_eq!(config["mlp_bias"], false);
    for layer in 0..LAYERS {
        for (proj, len) in [("q", HEADS * HEAD_DIM), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM), ("o", HIDDEN)] {
            let name = format!("model.layers.{layer}.self_attn.{proj}_proj.bias");
            let (shape, values) = got.get(&name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(shape, &vec![len], "{name}");
            if !(layer == 0 && proj == "q") {
                assert!(values.iter().all(|&v| v == 0.0), "{name} should be zeros");
            }
        }
    }
    assert!(!got.contains_key("model.layers.0.mlp.up_proj.bias"));
}

#[test]
fn gguf_v2_and_wider_alignment_convert_the_same() {
    let (_s1, model, out, _) = convert_tiny(Options { version: 2, alignment: Some(64), ..Options::default() });
    assert_matches_expected(&out, &model);
    let scratch = Scratch::new();
    let path = scratch.write("a.gguf", &model.writer.to_bytes());
    let file = GgufFile::open(&path).unwrap();
    assert_eq!((file.version, file.alignment), (2, 64));
    assert!(file.tensors.iter().all(|t| t.file_range.start % 64 == 0));
}

#[test]
fn tokenizer_json_loads_and_round_trips() {
    let (_scratch, model, out, _) = convert_tiny(Options::default());
    let tokenizer = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    assert_eq!(tokenizer.get_vocab_size(true), model.vocab.tokens.len());

    let text = "Hello world, the pruning of 2024 tokens!\n\tünïcødé ✓";
    let encoding = tokenizer.encode(text, false).unwrap();
    assert_eq!(tokenizer.decode(encoding.get_ids(), false).unwrap(), text);

    // Merges apply: " hello" is one token.
    let id_of = |t: &str| model.vocab.tokens.iter().position(|x| x == t).unwrap() as u32;
    assert_eq!(tokenizer.encode(" hello", false).unwrap().get_ids(), &[id_of("Ġhello")]);
    // smollm splits digits one by one, so the "2 0" merge never applies.
    assert_eq!(tokenizer.encode("2024", false).unwrap().get_ids(), &[id_of("2"), id_of("0"), id_of("2"), id_of("4")]);
    // Control tokens are matched whole and are special.
    let chat = tokenizer.encode("<|im_start|>hello<|im_end|>", false).unwrap();
    assert_eq!(chat.get_ids(), &[1, id_of("hello"), 2]);
    assert_eq!(tokenizer.decode(chat.get_ids(), true).unwrap(), "hello");
    // No BOS is added (add_bos_token = false).
    assert_eq!(tokenizer.encode("hello", true).unwrap().get_ids(), &[id_of("hello")]);
}

#[test]
fn add_bos_token_adds_bos_in_the_post_processor() {
    let scratch = Scratch::new();
    let mut model = tiny_model(Options::default());
    model.writer.metadata("tokenizer.ggml.add_bos_token", true);
    let gguf = scratch.write("bos.gguf", &model.writer.to_bytes());
    let out = scratch.path("hf");
    convert_gguf_to_hf(&gguf, &out).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let ids = tokenizer.encode("hello", true).unwrap().get_ids().to_vec();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.len(), 2);
    assert_eq!(read_json(&out.join("tokenizer_config.json"))["add_bos_token"], true);
}

// ---------------------------------------------------------------------------------------------
// Quantisers.

#[test]
fn quantisers_match_llama_cpp_reference_on_a_known_block() {
    // Block values -16..15: Q4_0 picks the value of largest magnitude (-16), d = -16 / -8 = 2,
    // q = min(15, trunc(x / 2 + 8.5)).
    let block: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
    let q4_0 = quant::quantize_q4_0(&block);
    assert_eq!(f16_at(&q4_0, 0), 2.0);
    let q: Vec<u8> = (0..32).map(|j| if j < 16 { q4_0[2 + j] & 15 } else { q4_0[2 + j - 16] >> 4 }).collect();
    let expected: Vec<u8> = block.iter().map(|x| ((x / 2.0 + 8.5) as i32).min(15) as u8).collect();
    assert_eq!(q, expected);
    assert_eq!((q[0], q[1], q[2], q[31]), (0, 1, 1, 15));

    // Q8_0: d = 16 / 127, q = round(x / d) (half away from zero).
    let q8 = quant::quantize_q8_0(&block);
    let d = 16.0f32 / 127.0;
    assert_eq!(f16_at(&q8, 0), f16::from_f32(d).to_f32());
    for (j, x) in block.iter().enumerate() {
        assert_eq!(q8[2 + j] as i8, (x * (1.0 / d)).round() as i8, "element {j}");
    }
    assert_eq!(q8[2] as i8, -127);

    // Q4_1: m = -16, d = 31 / 15, q = min(15, trunc((x - m) / d + 0.5)).
    let q4_1 = quant::quantize_q4_1(&block);
    assert_eq!(f16_at(&q4_1, 2), -16.0);
    assert_eq!(f16_at(&q4_1, 0), f16::from_f32(31.0 / 15.0).to_f32());
    assert_eq!((q4_1[4] & 15, q4_1[4 + 15] >> 4), (0, 15));
}

#[test]
fn quantise_then_dequantise_stays_within_the_format_error() {
    let mut rng = Rng(42);
    let mut values = rng.vec(32 * 64, 3.0);
    values[5] = 0.0;
    values[64..96].fill(0.25); // a constant block: d = 0 must not divide by zero
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::F16, GgmlType::BF16] {
        let raw = quant::quantize(ty, &values).unwrap();
        assert_eq!(raw.len() as u64, ty.bytes_for(values.len() as u64).unwrap(), "{ty}");
        let mut back = vec![0f32; values.len()];
        quant::dequantize(ty, &raw, &mut back).unwrap();
        assert_eq!(back, reference_dequant(ty, &raw), "{ty}: crate decoder vs reference");
        for (block, got) in values.chunks(32).zip(back.chunks(32)) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (min, max) = block.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            // Half a step, plus the f16 rounding of the scale (and of the minimum for Q4_1);
            // Q4_0 clips the positive end to 7 steps, up to one full step.
            let bound = match ty {
                GgmlType::Q8_0 => amax / 127.0 * 0.6,
                GgmlType::Q4_0 => amax / 8.0 * 1.01,
                GgmlType::Q4_1 => (max - min) / 15.0 * 0.6 + min.abs() * 1e-3,
                GgmlType::F16 => amax * 1e-3,
                _ => amax * 4e-3,
            } + 1e-7;
            for (x, y) in block.iter().zip(got) {
                assert!((x - y).abs() <= bound, "{ty}: {x} -> {y} (bound {bound})");
            }
        }
        // The constant block comes back exactly (Q4_1: d = 0, every value is the minimum;
        // Q4_0: d = -0.25 / 8 is exact in f16), except in Q8_0, whose scale 0.25 / 127 is
        // rounded to f16.
        if ty != GgmlType::Q8_0 {
            assert!(back[64..96].iter().all(|&v| v == 0.25), "{ty}: {:?}", &back[64..96]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input.

#[test]
fn bad_magic_is_rejected() {
    let scratch = Scratch::new();
    let mut bytes = tiny_model(Options::default()).writer.to_bytes();
    bytes[..4].copy_from_slice(b"GGML");
    let gguf = scratch.write("bad.gguf", &bytes);
    let msg = convert_err(&gguf, &scratch.path("hf"));
    assert!(msg.contains("not a GGUF file: bad magic 47 47 4d 4c"), "{msg}");
    assert_eq!(scratch.entries(), vec!["bad.gguf"]);
}

#[test]
fn truncated_files_are_rejected() {
    let scratch = Scratch::new();
    let bytes = tiny_model(Options::default()).writer.to_bytes();

    // Cut inside the tensor data: the last tensor (output.weight) no longer fits.
    let gguf = scratch.write("cut.gguf", &bytes[..bytes.len() - 100]);
    let msg = convert_err(&gguf, &scratch.path("hf"));
    assert!(msg.contains("truncated: tensor output.weight needs bytes"), "{msg}");
    assert!(msg.contains(&format!("but the file has {}", bytes.len() - 100)), "{msg}");

    // Cut inside the metadata (the token list).
    let gguf = scratch.write("cut2.gguf", &bytes[..1000]);
    let msg = convert_err(&gguf, &scratch.path("hf"));
    assert!(msg.contains("truncated: metadata value 'tokenizer.ggml.tokens'"), "{msg}");

    // Nothing at all.
    let gguf = scratch.write("empty.gguf", b"");
    let msg = convert_err(&gguf, &scratch.path("hf"));
    assert!(msg.contains("truncated"), "{msg}");
    assert_eq!(scratch.entries(), vec!["cut.gguf", "cut2.gguf", "empty.gguf"]);
}

#[test]
fn unsupported_tensor_type_is_named() {
    let scratch = Scratch::new();
    let model = tiny_model(Options::default());
    let mut w = rebuild_without(&model.writer, &["blk.0.attn_q.weight"]);
    // Q5_0: 22-byte blocks of 32 values.
    let blocks = HIDDEN * HEADS * HEAD_DIM / 32;
    w.tensor_raw("blk.0.attn_q.weight", &[HIDDEN as u64, (HEADS * HEAD_DIM) as u64], GgmlType::Q5_0, vec![0; blocks * 22]);
    let gguf = scratch.write("q5.gguf", &w.to_bytes());
    let msg = convert_err(&gguf, &scratch.path("hf"));
    assert!(msg.contains("tensor blk.0.attn_q.weight has unsupported GGUF type Q5_0 (6)"), "{msg}");

    // An id ggml does not define at all.
    let mut w = rebuild_without(&model.writer, &["blk.1.ffn_up.weight"]);
    w.tensor_raw("blk.1.ffn_up.weight", &[HIDDEN as u64, FFN as u64], GgmlType(99), vec![0; 64]);
    let gguf = scratch.write("unknown.gguf", &w.to_bytes());
    let msg = convert_err(&gguf, &scratch.path("hf"));
    assert!(msg.contains("tensor blk.1.ffn_up.weight has unknown GGUF type 99"), "{msg}");
}

#[test]
fn unsupported_architecture_and_tokenizer_are_rejected() {
    let scratch = Scratch::new();
    let mut model = tiny_model(Options::default());
    model.writer.metadata("general.architecture", "phi3");
    let gguf = scratch.write("phi.gguf", &model.writer.to_bytes());
    let msg = convert_err(&gguf, &scratch.path("hf"));
    assert!(msg.contains("unsupported GGUF architecture 'phi3'"), "{msg}");

    let mut model = tiny_model(Options::default());
    model.writer.metadata("tokenizer.ggml.model", "llama");
    let gguf = scratch.write("spm.gguf", &model.writer.to_bytes());
    let msg = convert_err(&gguf, &scratch.path("hf"));
    assert!(msg.contains("unsupported GGUF tokenizer model 'llama'"), "{msg}");
    assert_eq!(scratch.entries(), vec!["phi.gguf", "spm.gguf"]);
}

#[test]
fn unknown_metadata_value_type_is_rejected() {
    let scratch = Scratch::new();
    let mut bytes = tiny_model(Options::default()).writer.to_bytes();
    // Header: magic, version, tensor count, kv count (24 bytes), then the first key.
    let key_len = u64::from_le_bytes(bytes[24..32].try_into().unwrap()) as usize;
    let type_at = 32 + key_len;
    bytes[type_at..type_at + 4].copy_from_slice(&13u32.to_le_bytes());
    let gguf = scratch.write("type.gguf", &bytes);
    let msg = convert_err(&gguf, &scratch.path("hf"));
    assert!(msg.contains("metadata value 'general.architecture': unknown metadata value type 13"), "{msg}");
}

#[test]
fn missing_tensor_and_wrong_shape_are_rejected() {
    let scratch = Scratch::new();
    let model = tiny_model(Options::default());
    let w = rebuild_without(&model.writer, &["blk.1.ffn_down.weight"]);
    let gguf = scratch.write("missing.gguf", &w.to_bytes());
    let msg = convert_err(&gguf, &scratch.path("hf"));
    assert!(msg.contains("tensor blk.1.ffn_down.weight is missing"), "{msg}");

    let mut w = rebuild_without(&model.writer, &["blk.1.ffn_down.weight"]);
    w.tensor_f32("blk.1.ffn_down.weight", &[HIDDEN as u64, FFN as u64], GgmlType::F32, &vec![0.0; HIDDEN * FFN]).unwrap();
    let gguf = scratch.write("shape.gguf", &w.to_bytes());
    let msg = convert_err(&gguf, &scratch.path("hf"));
    assert!(msg.contains("tensor blk.1.ffn_down.weight has ne [64, 96] but the metadata implies [96, 64]"), "{msg}");
}

#[test]
fn existing_output_folder_is_refused_unless_empty() {
    let scratch = Scratch::new();
    let gguf = scratch.write("tiny.gguf", &tiny_model(Options::default()).writer.to_bytes());
    let out = scratch.path("hf");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let err = convert_gguf_to_hf(&gguf, &out).expect_err("non-empty output folder");
    let msg = format!("{err:#}");
    assert!(!msg.contains('\n'));
    assert!(msg.contains(&gguf.display().to_string()), "{msg}");
    assert!(msg.contains(&format!("output folder {} already exists and is not empty", out.display())), "{msg}");
    // The existing folder is untouched and no staging folder is left next to it.
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    assert_eq!(scratch.entries(), vec!["hf", "tiny.gguf"]);

    // An empty folder is replaced.
    std::fs::remove_file(out.join("keep.txt")).unwrap();
    convert_gguf_to_hf(&gguf, &out).unwrap();
    assert!(out.join("model.safetensors").is_file());
    assert_eq!(scratch.entries(), vec!["hf", "tiny.gguf"]);
}

#[test]
fn metadata_round_trips_through_writer_and_reader() {
    let scratch = Scratch::new();
    let mut w = GgufWriter::new();
    let values: Vec<(&str, MetadataValue)> = vec![
        ("u8", 7u8.into()),
        ("i8", (-7i8).into()),
        ("u16", 700u16.into()),
        ("i16", (-700i16).into()),
        ("u32", 70000u32.into()),
        ("i32", (-70000i32).into()),
        ("f32", 1.5f32.into()),
        ("bool", true.into()),
        ("string", "héllo".into()),
        ("u64", u64::MAX.into()),
        ("i64", i64::MIN.into()),
        ("f64", std::f64::consts::PI.into()),
        ("strings", vec!["a", "", "c d"].into()),
        ("empty", Vec::<u32>::new().into()),
        (
            "nested",
            MetadataValue::Array(disp_models::gguf::MetadataArray::Array(vec![
                disp_models::gguf::MetadataArray::I32(vec![1, -2]),
                disp_models::gguf::MetadataArray::String(vec!["x".into()]),
            ])),
        ),
    ];
    for (k, v) in &values {
        w.metadata(*k, v.clone());
    }
    let path = scratch.write("m.gguf", &w.to_bytes());
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.metadata().len(), values.len());
    for (k, v) in &values {
        assert_eq!(file.get(k), Some(v), "{k}");
    }
    assert!(file.tensors.is_empty());
}

// ---------------------------------------------------------------------------------------------
// The real SmolLM2 file: where `cargo xtask fetch-assets` leaves it (models/.cache/), or the path
// in DISP_SMOLLM2_GGUF. Without it the test skips locally but fails in CI (CI=true), where
// fetch-assets runs before the tests.

/// The SmolLM2 GGUF to convert, or `None` (with the reason printed) when it is absent outside CI.
fn real_smollm2_gguf() -> Option<PathBuf> {
    let path = std::env::var_os("DISP_SMOLLM2_GGUF")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/.cache/SmolLM2-135M-Instruct.Q4_1.gguf"), PathBuf::from);
    if path.is_file() {
        return Some(path);
    }
    let reason = format!("{} is missing: run `cargo xtask fetch-assets` (or set DISP_SMOLLM2_GGUF)", path.display());
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{reason}");
    eprintln!("skipping the real-file conversion: {reason}");
    None
}

#[test]
fn real_smollm2_gguf_converts() {
    let Some(path) = real_smollm2_gguf() else {
        return;
    };
    let scratch = Scratch::new();
    // DISP_SMOLLM2_HF_OUT keeps the converted folder (it must not exist yet).
    let out = std::env::var_os("DISP_SMOLLM2_HF_OUT").map_or_else(|| scratch.path("smollm2"), PathBuf::from);
    let start = std::time::Instant::now();
    let summary = convert_gguf_to_hf(&path, &out).unwrap();
    eprintln!("converted in {:.2?}: {summary:?}", start.elapsed());
    assert_eq!(summary.parameters, 134_515_008);
    assert_eq!(summary.num_hidden_layers, 30);
    assert_eq!(summary.vocab_size, 49152);
    assert!(summary.tie_word_embeddings);
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["num_attention_heads"], 9);
    assert_eq!(config["num_key_value_heads"], 3);
    assert_eq!(config["head_dim"], 64);
    let tokenizer = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let text = "The quick brown fox jumps over 13 lazy dogs.";
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
    assert_eq!(tokenizer.encode("<|im_start|>", false).unwrap().get_ids(), &[1]);
    // transformers' tokenizer of the same GGUF (with SmolLM2's digit step, see smollm2.rs).
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2");
    let texts = read_json(&fixtures.join("texts.json"));
    let expected = read_json(&fixtures.join("digit_ids.json"));
    for (i, text) in texts["texts"].as_array().unwrap().iter().enumerate() {
        let ids = tokenizer.encode(text.as_str().unwrap(), false).unwrap();
        let want: Vec<u32> = expected["ids"][i].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(ids.get_ids(), want, "text {i}");
    }
}
