//! `disp-export` writes a pruned model to disk, so that it can be shipped and loaded like any
//! other checkpoint instead of as masks pasted into model code.
//!
//! Two formats, both produced straight from the source checkpoint's stored tensors (the weights
//! are copied byte for byte in their original dtype; no weight is changed, only selected):
//! * [`ExportFormat::Pruned`]: the block linears keep only the rows and columns of their index
//!   sets, the index sets themselves are stored as I64 tensors, and `config.json` gains a `disp`
//!   section (see `disp_models::pruned_folder`). The folder is really smaller on disk, and
//!   `disp_models::load_model` runs it with `index_select`/`index_add`.
//! * [`ExportFormat::DenseEquivalent`]: the same function as a stock-architecture checkpoint:
//!   dropped rows and columns (and bias entries) become zeros, so HF transformers loads it with its
//!   ordinary class. Same size as the source; for interoperability, not for savings.
//!
//! Everything is written into a temporary sibling folder and renamed into place when complete.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use disp_core::plan::{check_index_set, LayerIndices, PruningPlan};
use disp_core::selection::Site;
use disp_io::fsutil::StagedFolder;
use disp_io::hf_folder::{write_json, write_weights};
use disp_models::layers::Linear;
use disp_models::pruned_folder::{block_tensor, cut_axes, index_tensor_name, CutAxes, ExportManifest, LinearSlot, CONFIG_KEY};
use disp_models::weights::{transpose, RawTensor};
use disp_models::{CausalLm, Checkpoint, Family, RawConfig};
use safetensors::{Dtype, View};
use sha2::{Digest, Sha256};

/// How the pruned model is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// Smaller tensors plus index sets; loaded by `disp`.
    Pruned,
    /// Stock architecture with zeros at the dropped positions; loaded by anything.
    DenseEquivalent,
}

impl std::str::FromStr for ExportFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pruned" => Ok(Self::Pruned),
            "dense-equivalent" => Ok(Self::DenseEquivalent),
            other => Err(format!("unknown export format '{other}' (expected pruned or dense-equivalent)")),
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSummary {
    pub tensors: usize,
    /// Floating-point values stored (index sets not counted).
    pub stored_params: u64,
    /// Floating-point values of the source checkpoint.
    pub source_params: u64,
    /// Size of the written `model.safetensors`.
    pub weight_bytes: u64,
    /// SHA-256 of the source config and weight files.
    pub source_fingerprint: String,
}

/// Files besides the weights and the config that make a model folder usable (tokenizer,
/// generation defaults); copied when present.
const COMPANION_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
];

/// Writes `plan` applied to the HF folder `model_dir` into `out_dir` (which must not exist or be
/// empty). Errors are one line; on error nothing is left at `out_dir`.
pub fn export(model_dir: &Path, plan: &PruningPlan, format: ExportFormat, out_dir: &Path) -> Result<ExportSummary> {
    let staged = StagedFolder::new(out_dir)?;
    let (raw, family, ck) = open_for_plan(model_dir, plan)?;
    let fingerprint = source_fingerprint(&raw.path, &ck.paths().collect::<Vec<_>>())?;
    if let Some(planned) = &plan.model.fingerprint {
        if *planned != fingerprint {
            bail!("{}: the plan was made for different weights (fingerprint {planned}, folder has {fingerprint})", model_dir.display());
        }
    }

    let mut names: Vec<&str> = ck.names().collect();
    names.sort_unstable();
    let mut outputs: Vec<(String, OutputTensor)> = Vec::with_capacity(names.len());
    let (mut stored_params, mut source_params) = (0u64, 0u64);
    for name in names {
        ck.check_finite(name)?;
        let raw_tensor = ck.raw(name)?;
        let cut = match cut_axes(family, name) {
            Some(axes) => Some(Cut::new(
                axes,
                plan.layers.get(axes.layer).ok_or_else(|| anyhow!("{}: tensor '{name}' is in a layer the plan does not have", ck.describe()))?,
            )),
            None => None,
        };
        if cut.is_some() && element_size(raw_tensor.dtype).is_none() {
            bail!("{}: tensor '{name}' has dtype {:?}; only F32, F16 and BF16 block weights can be cut", ck.describe(), raw_tensor.dtype);
        }
        let tensor = OutputTensor::weight(raw_tensor, cut, format);
        if element_size(tensor.dtype).is_some() {
            source_params += tensor.source_len() as u64;
            stored_params += tensor.shape.iter().product::<usize>() as u64;
        }
        outputs.push((name.to_string(), tensor));
    }

    let mut config = raw.json.clone();
    match format {
        ExportFormat::Pruned => {
            for (layer, indices) in plan.layers.iter().enumerate() {
                for site in Site::ALL {
                    outputs.push((index_tensor_name(layer, site), OutputTensor::indices(indices.get(site))));
                }
            }
            let mut manifest = ExportManifest::of_plan(plan);
            manifest.source.fingerprint = Some(fingerprint.clone());
            config[CONFIG_KEY] = serde_json::to_value(&manifest).expect("manifests serialise");
        }
        ExportFormat::DenseEquivalent => {
            // Provenance only: the loaders of every tool ignore unknown keys.
            config["disp_dense_equivalent"] = serde_json::json!({
                "method": plan.method,
                "achieved_ratio": plan.achieved_ratio,
                "ratio_of": plan.ratio_of,
                "source_fingerprint": fingerprint,
                "note": "dropped rows/columns of the block linears are zeros; pruned parameter count is in `pruned_params`",
                "pruned_params": plan.pruned_params,
            });
        }
    }

    let tensor_count = outputs.len();
    let weight_bytes = write_folder(&staged, model_dir, outputs, &config)?;
    staged.publish()?;
    Ok(ExportSummary { tensors: tensor_count, stored_params, source_params, weight_bytes, source_fingerprint: fingerprint })
}

/// Writes `model` — the dense model of `model_dir` with block linear weights changed in memory,
/// e.g. zeroed by a semi-structured sparsity baseline — as a stock checkpoint: every block linear
/// tensor comes from the model (in the source dtype), everything else is copied from the source.
/// `provenance` is stored in `config.json` under `disp_modified_weights`.
pub fn export_modified_weights(model_dir: &Path, model: &dyn CausalLm, provenance: serde_json::Value, out_dir: &Path) -> Result<ExportSummary> {
    let staged = StagedFolder::new(out_dir)?;
    if model.is_pruned() {
        bail!("{}: the model is pruned; export its plan with `disp export` instead", model_dir.display());
    }
    let raw = RawConfig::read(model_dir)?;
    let family = raw.family()?;
    if family != model.family() {
        bail!("{}: the checkpoint is {}, the model {}", model_dir.display(), family.model_type(), model.family().model_type());
    }
    let ck = Checkpoint::open(model_dir)?;
    let fingerprint = source_fingerprint(&raw.path, &ck.paths().collect::<Vec<_>>())?;
    let mut names: Vec<&str> = ck.names().collect();
    names.sort_unstable();
    let mut outputs: Vec<(String, OutputTensor)> = Vec::with_capacity(names.len());
    let mut params = 0u64;
    for name in names {
        let source = ck.raw(name)?;
        let tensor = match block_tensor(family, name) {
            Some(block) => {
                let values = checked_block_values(model, block, name, &ck, &source)?;
                OutputTensor { dtype: source.dtype, shape: source.shape.clone(), content: Content::Owned(encode(&values, source.dtype)) }
            }
            None => OutputTensor::weight(source, None, ExportFormat::DenseEquivalent),
        };
        if element_size(tensor.dtype).is_some() {
            params += tensor.shape.iter().product::<usize>() as u64;
        }
        outputs.push((name.to_string(), tensor));
    }
    let mut config = raw.json.clone();
    config["disp_modified_weights"] = serde_json::json!({ "source_fingerprint": fingerprint, "how": provenance });
    let tensors = outputs.len();
    let weight_bytes = write_folder(&staged, model_dir, outputs, &config)?;
    staged.publish()?;
    Ok(ExportSummary { tensors, stored_params: params, source_params: params, weight_bytes, source_fingerprint: fingerprint })
}

/// Writes `model` — loaded from the pruned folder `pruned_dir`, with its block linear weights
/// changed in memory (recovery fine-tuning merges its adapters into them) — as a pruned folder
/// (the same index sets, the model's weights in the source dtype) or, with
/// [`ExportFormat::DenseEquivalent`], as a stock checkpoint with zeros at the dropped positions.
/// Everything else is copied from the source. `provenance` is stored in `config.json` under
/// `disp_finetuned`.
pub fn export_changed_pruned(
    pruned_dir: &Path,
    model: &dyn CausalLm,
    provenance: serde_json::Value,
    format: ExportFormat,
    out_dir: &Path,
) -> Result<ExportSummary> {
    let staged = StagedFolder::new(out_dir)?;
    let raw = RawConfig::read(pruned_dir)?;
    let family = raw.family()?;
    let Some(plan) = disp_models::pruned_folder::read_plan(pruned_dir)? else {
        bail!("{}: not a pruned folder (no '{CONFIG_KEY}' section in config.json)", pruned_dir.display());
    };
    if !model.is_pruned() || family != model.family() {
        bail!("{}: the model in memory is not this folder's pruned {}", pruned_dir.display(), family.model_type());
    }
    let ck = Checkpoint::open(pruned_dir)?;
    let fingerprint = source_fingerprint(&raw.path, &ck.paths().collect::<Vec<_>>())?;
    let shape = model.model_shape();
    let mut names: Vec<&str> = ck.names().collect();
    names.sort_unstable();
    let mut outputs: Vec<(String, OutputTensor)> = Vec::with_capacity(names.len());
    let (mut stored_params, mut source_params) = (0u64, 0u64);
    for name in names {
        let source = ck.raw(name)?;
        let is_index = (0..plan.layers.len()).any(|layer| Site::ALL.iter().any(|&site| index_tensor_name(layer, site) == name));
        if is_index && format == ExportFormat::DenseEquivalent {
            continue;
        }
        let tensor = match block_tensor(family, name).filter(|_| !is_index) {
            Some(block) => {
                let values = checked_block_values(model, block, name, &ck, &source)?;
                match format {
                    ExportFormat::Pruned => {
                        OutputTensor { dtype: source.dtype, shape: source.shape.clone(), content: Content::Owned(encode(&values, source.dtype)) }
                    }
                    ExportFormat::DenseEquivalent => {
                        let layer = plan
                            .layers
                            .get(block.axes.layer)
                            .ok_or_else(|| anyhow!("{}: '{name}' is in a layer the plan does not have", ck.describe()))?;
                        let full = |site: Site| {
                            if site == Site::MlpInter {
                                shape.blocks[block.axes.layer].intermediate
                            } else {
                                shape.blocks[block.axes.layer].hidden
                            }
                        };
                        let rows: Option<&[u32]> = block.axes.rows.map(|s| layer.get(s));
                        let cols: Option<&[u32]> = block.axes.cols.map(|s| layer.get(s));
                        let full_rows = block.axes.rows.map_or(source.shape[0], full);
                        let full_cols = if source.shape.len() == 2 { block.axes.cols.map_or(source.shape[1], full) } else { 1 };
                        let stored_cols = source.shape.get(1).copied().unwrap_or(1);
                        let mut dense = vec![0f32; full_rows * full_cols];
                        for (r, row) in values.chunks_exact(stored_cols).enumerate() {
                            let to_row = rows.map_or(r, |k| k[r] as usize);
                            for (c, &v) in row.iter().enumerate() {
                                let to_col = cols.map_or(c, |k| k[c] as usize);
                                dense[to_row * full_cols + to_col] = v;
                            }
                        }
                        let dense_shape = if source.shape.len() == 2 { vec![full_rows, full_cols] } else { vec![full_rows] };
                        OutputTensor { dtype: source.dtype, shape: dense_shape, content: Content::Owned(encode(&dense, source.dtype)) }
                    }
                }
            }
            None => OutputTensor::weight(source, None, ExportFormat::DenseEquivalent),
        };
        if element_size(tensor.dtype).is_some() {
            source_params += tensor.source_len() as u64;
            stored_params += tensor.shape.iter().product::<usize>() as u64;
        }
        outputs.push((name.to_string(), tensor));
    }
    let mut config = raw.json.clone();
    config["disp_finetuned"] = serde_json::json!({ "source_fingerprint": fingerprint, "how": provenance });
    if format == ExportFormat::DenseEquivalent {
        if let Some(object) = config.as_object_mut() {
            object.remove(CONFIG_KEY);
        }
        config["disp_dense_equivalent"] = serde_json::json!({
            "method": plan.method,
            "achieved_ratio": plan.achieved_ratio,
            "ratio_of": plan.ratio_of,
            "note": "dropped rows/columns of the block linears are zeros; pruned parameter count is in `pruned_params`",
            "pruned_params": plan.pruned_params,
        });
    }
    let tensors = outputs.len();
    let weight_bytes = write_folder(&staged, pruned_dir, outputs, &config)?;
    staged.publish()?;
    Ok(ExportSummary { tensors, stored_params, source_params, weight_bytes, source_fingerprint: fingerprint })
}

/// The model's current values of block tensor `name` in the HF layout, after checking that the
/// stored tensor they replace has a float dtype and the same number of values.
fn checked_block_values(
    model: &dyn CausalLm,
    block: disp_models::pruned_folder::BlockTensor,
    name: &str,
    ck: &Checkpoint,
    source: &disp_models::weights::RawTensor<'_>,
) -> Result<Vec<f32>> {
    if element_size(source.dtype).is_none() {
        bail!("{}: tensor '{name}' has dtype {:?}; block weights must be F32, F16 or BF16", ck.describe(), source.dtype);
    }
    let values = hf_values(model, block, name, ck)?;
    if values.len() != source.shape.iter().product::<usize>() {
        bail!("{}: tensor '{name}' has shape {:?}, the model's has {} values", ck.describe(), source.shape, values.len());
    }
    Ok(values)
}

/// The values of block tensor `name` in the model, in HF layout (`[out, in]` for weights).
fn hf_values(model: &dyn CausalLm, block: disp_models::pruned_folder::BlockTensor, name: &str, ck: &Checkpoint) -> Result<Vec<f32>> {
    let linears = model.block_linears(block.axes.layer);
    let linear: &Linear = match block.slot {
        LinearSlot::AttnInput(i) => linears.attn_inputs[i],
        LinearSlot::AttnOutput => linears.attn_output,
        LinearSlot::MlpInput(i) => linears.mlp_inputs[i],
        LinearSlot::MlpOutput => linears.mlp_output,
    };
    if block.is_bias {
        let bias = linear.bias.clone().ok_or_else(|| anyhow!("{}: the model has no bias for '{name}'", ck.describe()))?;
        return bias.into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| anyhow!("{e:?}"));
    }
    // Ours is [in, out]; HF stores [out, in].
    let [inputs, outputs] = linear.weight.dims();
    let ours = linear.weight.clone().into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| anyhow!("{e:?}"))?;
    Ok(transpose(&ours, inputs, outputs))
}

/// Values in a float dtype's little-endian bytes.
fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        Dtype::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Writes the weights, the config and the companion files into the staging folder; returns the
/// weight file's size.
fn write_folder(staged: &StagedFolder, model_dir: &Path, outputs: Vec<(String, OutputTensor)>, config: &serde_json::Value) -> Result<u64> {
    let weight_bytes = write_weights(staged.path(), outputs)?;
    write_json(&staged.path().join("config.json"), config)?;
    for file in COMPANION_FILES {
        let source = model_dir.join(file);
        if source.is_file() {
            std::fs::copy(&source, staged.path().join(file)).with_context(|| format!("{}: cannot copy", source.display()))?;
        }
    }
    Ok(weight_bytes)
}

/// Checks that `plan` can be exported from the dense folder `model_dir` (see [`check_plan_fits`])
/// without writing anything: for commands to call before long work whose plan they export.
pub fn check_plan(model_dir: &Path, plan: &PruningPlan) -> Result<()> {
    open_for_plan(model_dir, plan).map(|_| ())
}

/// The config, family and checkpoint of a dense source folder that `plan` fits.
fn open_for_plan(model_dir: &Path, plan: &PruningPlan) -> Result<(RawConfig, Family, Checkpoint)> {
    let raw = RawConfig::read(model_dir)?;
    if raw.json.get(CONFIG_KEY).is_some() {
        bail!("{}: already a pruned folder; export from the dense source model", raw.path.display());
    }
    let family = raw.family()?;
    let ck = Checkpoint::open(model_dir)?;
    check_plan_fits(plan, &raw, family, &ck)?;
    Ok((raw, family, ck))
}

/// Checks the plan against the config and the checkpoint's own tensors: format, family and sizes
/// of its header, layer count, and every index set sorted, unique and within the axis it cuts.
fn check_plan_fits(plan: &PruningPlan, raw: &RawConfig, family: Family, ck: &Checkpoint) -> Result<()> {
    let fail = |msg: String| anyhow!("{}: {msg}", ck.describe());
    if plan.format_version != disp_core::plan::PLAN_FORMAT_VERSION {
        bail!("unknown plan format version {} (this build reads {})", plan.format_version, disp_core::plan::PLAN_FORMAT_VERSION);
    }
    if plan.model.model_type != family.model_type() {
        return Err(fail(format!("the plan is for a {} model, this checkpoint is {}", plan.model.model_type, family.model_type())));
    }
    if plan.model.num_layers != plan.layers.len() {
        bail!("the plan's header says {} layers but it lists index sets for {}", plan.model.num_layers, plan.layers.len());
    }
    let config_size = |keys: &[&str]| keys.iter().find_map(|k| raw.json.get(*k).and_then(serde_json::Value::as_u64));
    let sizes = [
        ("hidden_size", plan.model.hidden_size, config_size(&["hidden_size"])),
        ("intermediate_size", plan.model.intermediate_size, config_size(&["intermediate_size", "ffn_dim"])),
        ("num_hidden_layers", plan.model.num_layers, config_size(&["num_hidden_layers"])),
    ];
    for (key, planned, actual) in sizes {
        if actual.is_some_and(|actual| actual != planned as u64) {
            bail!("the plan is for {key} = {planned}, {} has {}", raw.path.display(), actual.unwrap_or_default());
        }
    }
    let mut widths: BTreeMap<(usize, usize), (Site, usize)> = BTreeMap::new();
    for name in ck.names() {
        let Some(axes) = cut_axes(family, name) else { continue };
        let shape = ck.shape(name)?;
        for (site, axis) in [(axes.rows, 0), (axes.cols, 1)] {
            if let (Some(site), Some(&width)) = (site, shape.get(axis)) {
                widths.insert((axes.layer, site.index()), (site, width));
            }
        }
    }
    let layers = widths.keys().map(|(layer, _)| layer + 1).max().unwrap_or(0);
    if layers != plan.layers.len() {
        return Err(fail(format!("the plan has {} layers, the checkpoint {layers}", plan.layers.len())));
    }
    for ((layer, _), (site, width)) in widths {
        let indices = plan.layers.get(layer).ok_or_else(|| fail(format!("the plan has no layer {layer}")))?;
        check_index_set(indices.get(site), width).map_err(|e| fail(format!("plan layer {layer} {} ({}): {e}", site.label(), site.description())))?;
    }
    Ok(())
}

/// SHA-256 over the config and the weight files, in that order.
pub fn source_fingerprint(config: &Path, weights: &[&Path]) -> Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    for path in std::iter::once(config).chain(weights.iter().copied()) {
        let mut file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        loop {
            let n = file.read(&mut buffer).with_context(|| format!("{}: cannot read", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn element_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

/// The kept positions along each axis of one tensor.
struct Cut {
    rows: Option<Vec<u32>>,
    cols: Option<Vec<u32>>,
}

impl Cut {
    fn new(axes: CutAxes, layer: &LayerIndices) -> Self {
        Self { rows: axes.rows.map(|s| layer.get(s).to_vec()), cols: axes.cols.map(|s| layer.get(s).to_vec()) }
    }
}

/// A tensor of the output file, produced when the writer asks for it so that only one tensor's
/// bytes are held at a time.
struct OutputTensor<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    content: Content<'a>,
}

enum Content<'a> {
    Copy(&'a [u8]),
    Cut { source: RawTensor<'a>, cut: Cut, format: ExportFormat },
    Owned(Vec<u8>),
}

impl<'a> OutputTensor<'a> {
    fn weight(source: RawTensor<'a>, cut: Option<Cut>, format: ExportFormat) -> Self {
        let dtype = source.dtype;
        match cut {
            None => Self { dtype, shape: source.shape.clone(), content: Content::Copy(source.bytes) },
            Some(cut) => {
                let mut shape = source.shape.clone();
                if format == ExportFormat::Pruned {
                    if let Some(rows) = &cut.rows {
                        shape[0] = rows.len();
                    }
                    if let Some(cols) = &cut.cols {
                        shape[1] = cols.len();
                    }
                }
                Self { dtype, shape, content: Content::Cut { source, cut, format } }
            }
        }
    }

    fn indices(kept: &[u32]) -> Self {
        let bytes = kept.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect();
        Self { dtype: Dtype::I64, shape: vec![kept.len()], content: Content::Owned(bytes) }
    }

    fn source_len(&self) -> usize {
        match &self.content {
            Content::Cut { source, .. } => source.shape.iter().product(),
            _ => self.shape.iter().product(),
        }
    }
}

impl View for OutputTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match &self.content {
            Content::Copy(bytes) => Cow::Borrowed(bytes),
            Content::Owned(bytes) => Cow::Borrowed(bytes),
            Content::Cut { source, cut, format } => Cow::Owned(cut_bytes(source, cut, *format)),
        }
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * element_size(self.dtype).unwrap_or(8)
    }
}

/// The bytes of a cut tensor: only the kept rows/columns (pruned) or zeros elsewhere
/// (dense-equivalent). A 1-D tensor (bias) is cut along its only axis by `rows`.
fn cut_bytes(source: &RawTensor<'_>, cut: &Cut, format: ExportFormat) -> Vec<u8> {
    let size = element_size(source.dtype).expect("checked before cutting");
    let rows = source.shape[0];
    let cols = source.shape.get(1).copied().unwrap_or(1);
    let row_bytes = cols * size;
    let all_rows: Vec<u32>;
    let kept_rows = match &cut.rows {
        Some(r) => r.as_slice(),
        None => {
            all_rows = (0..rows as u32).collect();
            &all_rows
        }
    };
    match format {
        ExportFormat::Pruned => {
            let out_cols = cut.cols.as_ref().map_or(cols, Vec::len);
            let mut out = Vec::with_capacity(kept_rows.len() * out_cols * size);
            for &r in kept_rows {
                let row = &source.bytes[r as usize * row_bytes..(r as usize + 1) * row_bytes];
                match &cut.cols {
                    None => out.extend_from_slice(row),
                    Some(kept_cols) => {
                        for &c in kept_cols {
                            out.extend_from_slice(&row[c as usize * size..(c as usize + 1) * size]);
                        }
                    }
                }
            }
            out
        }
        ExportFormat::DenseEquivalent => {
            // IEEE zero is all-zero bytes in every float format.
            let mut out = vec![0u8; source.bytes.len()];
            for &r in kept_rows {
                let span = r as usize * row_bytes..(r as usize + 1) * row_bytes;
                match &cut.cols {
                    None => out[span.clone()].copy_from_slice(&source.bytes[span]),
                    Some(kept_cols) => {
                        for &c in kept_cols {
                            let at = span.start + c as usize * size;
                            out[at..at + size].copy_from_slice(&source.bytes[at..at + size]);
                        }
                    }
                }
            }
            out
        }
    }
}
