//! `disp inspect`: what a pruning plan keeps, per layer and per embedding position, as a table,
//! one JSON object, or a PNG figure (`inspect/plot.rs`).
//!
//! The argument is a plan file from `disp prune`, a pruned model folder from `disp export` (its
//! `config.json` and weight file carry the plan) or a dense HF folder (every block at full width).

mod plot;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use clap::Args;
use disp_core::device::{select_device, DeviceChoice};
use disp_core::params::{BlockWidths, ModelShape, RatioOf};
use disp_core::plan::{check_index_set, LayerIndices, ModelIdentity, PruningPlan, PLAN_FORMAT_VERSION};
use disp_core::selection::Site;
use disp_io::fmt::thousands;

#[derive(Args)]
pub struct InspectArgs {
    /// A plan JSON file (from `disp prune`), a pruned model folder (from `disp export`) or a dense
    /// Hugging Face model folder.
    path: PathBuf,
    /// With a plan file: the model folder it was made for. The plan is checked against it and the
    /// block parameters are counted (a plan file alone records only the totals).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Also draw a PNG figure (1600x1000): the kept fraction of S1..S5 per layer, and which
    /// embedding positions each block reads and writes.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn inspect(device: DeviceChoice, args: InspectArgs) -> Result<()> {
    let inspection = load(device, &args)?;
    let usage = PositionUsage::of(&inspection.layers, inspection.model.hidden_size);
    // The figure first: if it cannot be written, nothing has been printed as if all went well.
    if let Some(out) = &args.plot {
        plot::write_png(&inspection, &usage, out)?;
    }
    if args.json {
        let mut json = inspection.to_json(&usage);
        if let Some(out) = &args.plot {
            json["plot"] = out.display().to_string().into();
        }
        println!("{json}");
    } else {
        print!("{}", inspection.render_text(&usage));
        if let Some(out) = &args.plot {
            println!("wrote {}", out.display());
        }
    }
    Ok(())
}

/// What the inspected path was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceKind {
    PlanFile,
    PrunedFolder,
    DenseFolder,
}

impl SourceKind {
    fn name(self) -> &'static str {
        match self {
            SourceKind::PlanFile => "plan file",
            SourceKind::PrunedFolder => "pruned model folder",
            SourceKind::DenseFolder => "dense model folder",
        }
    }
}

/// A parameter count before and after pruning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ParamCount {
    before: u64,
    after: u64,
}

impl ParamCount {
    fn kept_fraction(self) -> f64 {
        self.after as f64 / self.before as f64
    }

    fn to_json(self) -> serde_json::Value {
        serde_json::json!({ "before": self.before, "after": self.after, "kept_fraction": self.kept_fraction() })
    }
}

/// Everything `disp inspect` reports, from whichever kind of source.
#[derive(Debug, Clone)]
struct Inspection {
    source: PathBuf,
    kind: SourceKind,
    method: String,
    model: ModelIdentity,
    ratio_of: RatioOf,
    /// `None` for a dense folder, which was never pruned to a target.
    target_ratio: Option<f64>,
    achieved_ratio: f64,
    total_params: ParamCount,
    /// Known only with the model's shape (a folder, or a plan file with `--model`).
    block_params: Option<ParamCount>,
    layers: Vec<LayerIndices>,
}

fn load(device: DeviceChoice, args: &InspectArgs) -> Result<Inspection> {
    let path = &args.path;
    let meta = std::fs::metadata(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if meta.is_dir() {
        if let Some(model) = &args.model {
            bail!("--model {}: only for a plan file, and {} is a model folder", model.display(), path.display());
        }
        let device = select_device(device)?;
        // Reads config.json first, so a folder without one fails with that file's name.
        let plan = disp_models::pruned_folder::read_plan(path)?;
        let model = disp_models::load_model(path, &device)?;
        let shape = model.model_shape();
        return Ok(match plan {
            Some(plan) => Inspection::of_plan(path, SourceKind::PrunedFolder, plan, Some(&shape)),
            None => Inspection::dense(path, model.identity(), &shape),
        });
    }
    let plan = PruningPlan::load(path)?;
    check_plan_shape(&plan).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let shape = match &args.model {
        None => None,
        Some(dir) => {
            let model = disp_models::load_model(dir, &select_device(device)?)?;
            let shape = model.model_shape();
            plan.validate(&model.identity(), &shape).map_err(|e| anyhow!("{}: {e:#} (--model {})", path.display(), dir.display()))?;
            Some(shape)
        }
    };
    Ok(Inspection::of_plan(path, SourceKind::PlanFile, plan, shape.as_ref()))
}

/// The checks of [`PruningPlan::validate`] that need no model: one layer per block of the
/// recorded identity, index sets sorted, unique, non-empty and within d (or d_ff for S4). The
/// per-position counts index by these values, so they must hold before anything is counted.
fn check_plan_shape(plan: &PruningPlan) -> Result<()> {
    if plan.format_version != PLAN_FORMAT_VERSION {
        bail!("unknown plan format version {} (this build reads {PLAN_FORMAT_VERSION})", plan.format_version);
    }
    if plan.layers.is_empty() {
        bail!("plan has no layers");
    }
    if plan.layers.len() != plan.model.num_layers {
        bail!("plan lists {} layers for a model of {}", plan.layers.len(), plan.model.num_layers);
    }
    for (layer, indices) in plan.layers.iter().enumerate() {
        for site in Site::ALL {
            check_index_set(indices.get(site), site_width(&plan.model, site))
                .map_err(|e| anyhow!("layer {layer} {} ({}): {e}", site.label(), site.description()))?;
        }
    }
    Ok(())
}

/// Full width of a site's index set: d_ff for S4, d for the others.
fn site_width(model: &ModelIdentity, site: Site) -> usize {
    if site == Site::MlpInter {
        model.intermediate_size
    } else {
        model.hidden_size
    }
}

impl Inspection {
    fn of_plan(source: &Path, kind: SourceKind, plan: PruningPlan, shape: Option<&ModelShape>) -> Self {
        let widths: Vec<BlockWidths> = plan.widths();
        let (total_params, block_params) = match shape {
            Some(shape) => (
                ParamCount { before: shape.dense_total_params(), after: shape.total_params(&widths) },
                Some(ParamCount { before: shape.dense_block_params(), after: shape.block_params(&widths) }),
            ),
            None => (ParamCount { before: plan.dense_params, after: plan.pruned_params }, None),
        };
        Self {
            source: source.to_path_buf(),
            kind,
            method: plan.method,
            model: plan.model,
            ratio_of: plan.ratio_of,
            target_ratio: Some(plan.target_ratio),
            achieved_ratio: plan.achieved_ratio,
            total_params,
            block_params,
            layers: plan.layers,
        }
    }

    fn dense(source: &Path, model: ModelIdentity, shape: &ModelShape) -> Self {
        let full = ParamCount { before: shape.dense_total_params(), after: shape.dense_total_params() };
        let blocks = ParamCount { before: shape.dense_block_params(), after: shape.dense_block_params() };
        let layers = vec![LayerIndices::full(model.hidden_size, model.intermediate_size); model.num_layers];
        Self {
            source: source.to_path_buf(),
            kind: SourceKind::DenseFolder,
            method: "dense".into(),
            model,
            ratio_of: RatioOf::Total,
            target_ratio: None,
            achieved_ratio: 0.0,
            total_params: full,
            block_params: Some(blocks),
            layers,
        }
    }

    fn kept_fraction(&self, layer: usize, site: Site) -> f64 {
        self.layers[layer].get(site).len() as f64 / site_width(&self.model, site) as f64
    }

    fn mean_kept_fraction(&self, site: Site) -> f64 {
        let layers = self.layers.len();
        (0..layers).map(|layer| self.kept_fraction(layer, site)).sum::<f64>() / layers.max(1) as f64
    }

    fn mean_width(&self, site: Site) -> f64 {
        self.layers.iter().map(|l| l.get(site).len()).sum::<usize>() as f64 / self.layers.len().max(1) as f64
    }

    /// One line naming the plan: method and model.
    fn headline(&self) -> String {
        let m = &self.model;
        format!("{} on {} ({} layers, d {}, d_ff {})", self.method, m.model_type, m.num_layers, m.hidden_size, m.intermediate_size)
    }

    fn render_text(&self, usage: &PositionUsage) -> String {
        let mut out = String::new();
        let m = &self.model;
        let _ = writeln!(out, "{} ({})", self.source.display(), self.kind.name());
        let _ = writeln!(out, "method            {}", self.method);
        let _ = writeln!(out, "model             {}, {} layers, d {}, d_ff {}", m.model_type, m.num_layers, m.hidden_size, m.intermediate_size);
        let target = match self.target_ratio {
            Some(target) => format!(" (target {:.2}%)", 100.0 * target),
            None => String::new(),
        };
        let _ = writeln!(out, "removed           {:.2}% of {} parameters{target}", 100.0 * self.achieved_ratio, self.ratio_of.name());
        let _ = writeln!(out, "total parameters  {}", describe_count(self.total_params));
        let blocks = match self.block_params {
            Some(count) => describe_count(count),
            None => "unknown (pass --model DIR, the model folder the plan was made for)".into(),
        };
        let _ = writeln!(out, "block parameters  {blocks}");
        out.push('\n');

        let titles: Vec<String> = Site::ALL.into_iter().map(|site| format!("  {:<13}", column_title(site))).collect();
        let _ = writeln!(out, "{}", format!("{:>5}{}", "layer", titles.concat()).trim_end());
        for (layer, indices) in self.layers.iter().enumerate() {
            let _ = write!(out, "{layer:>5}");
            for site in Site::ALL {
                let _ = write!(out, "  {:>6.1}% {:>5}", 100.0 * self.kept_fraction(layer, site), indices.get(site).len());
            }
            out.push('\n');
        }
        let _ = write!(out, "{:>5}", "mean");
        for site in Site::ALL {
            let _ = write!(out, "  {:>6.1}% {:>5.0}", 100.0 * self.mean_kept_fraction(site), self.mean_width(site));
        }
        out.push('\n');
        out.push('\n');

        let blocks = usage.blocks;
        let _ = writeln!(
            out,
            "embedding positions (d = {}, {blocks} blocks): read (S1 or S3) by every block {}, by some {}, by none {}; \
             written (S2 or S5) by every block {}, by some {}, by none {}; neither read nor written by any block {}",
            usage.hidden(),
            usage.read_by_all(),
            usage.read_by_some(),
            usage.read_by_none(),
            usage.written_by_all(),
            usage.written_by_some(),
            usage.written_by_none(),
            usage.untouched()
        );
        out
    }

    fn to_json(&self, usage: &PositionUsage) -> serde_json::Value {
        let site_map = |value: &dyn Fn(Site) -> serde_json::Value| -> serde_json::Value {
            Site::ALL.into_iter().map(|site| (site_key(site), value(site))).collect::<serde_json::Map<_, _>>().into()
        };
        let layers: Vec<serde_json::Value> = self
            .layers
            .iter()
            .enumerate()
            .map(|(layer, indices)| {
                serde_json::json!({
                    "layer": layer,
                    "widths": site_map(&|site| indices.get(site).len().into()),
                    "kept_fraction": site_map(&|site| self.kept_fraction(layer, site).into()),
                })
            })
            .collect();
        serde_json::json!({
            "source": self.source.display().to_string(),
            "kind": match self.kind {
                SourceKind::PlanFile => "plan_file",
                SourceKind::PrunedFolder => "pruned_folder",
                SourceKind::DenseFolder => "dense_folder",
            },
            "method": self.method,
            "model": {
                "model_type": self.model.model_type,
                "num_layers": self.model.num_layers,
                "hidden_size": self.model.hidden_size,
                "intermediate_size": self.model.intermediate_size,
            },
            "ratio_of": self.ratio_of.name(),
            "target_ratio": self.target_ratio,
            "achieved_ratio": self.achieved_ratio,
            "total_params": self.total_params.to_json(),
            "block_params": self.block_params.map(ParamCount::to_json),
            "layers": layers,
            "mean_kept_fraction": site_map(&|site| self.mean_kept_fraction(site).into()),
            "positions": {
                "hidden_size": usage.hidden(),
                "read_by_every_block": usage.read_by_all(),
                "read_by_some_blocks": usage.read_by_some(),
                "read_by_no_block": usage.read_by_none(),
                "written_by_every_block": usage.written_by_all(),
                "written_by_some_blocks": usage.written_by_some(),
                "written_by_no_block": usage.written_by_none(),
                "untouched": usage.untouched(),
                "reads_per_position": usage.reads,
                "writes_per_position": usage.writes,
            },
        })
    }
}

/// The JSON key of a site: the field name in plans (`attn_in`, ...).
fn site_key(site: Site) -> String {
    match serde_json::to_value(site) {
        Ok(serde_json::Value::String(key)) => key,
        _ => unreachable!("Site serialises to a string"),
    }
}

fn column_title(site: Site) -> String {
    let short = match site {
        Site::AttnIn => "attn-in",
        Site::AttnOut => "attn-out",
        Site::MlpIn => "mlp-in",
        Site::MlpInter => "mlp-inter",
        Site::MlpOut => "mlp-out",
    };
    format!("{} {short}", site.label())
}

fn describe_count(count: ParamCount) -> String {
    format!("{} -> {} ({:.2}% kept)", thousands(count.before), thousands(count.after), 100.0 * count.kept_fraction())
}

/// The index sets over the embedding dimension d: S1 and S3 read it, S2 and S5 write it (S4
/// indexes the MLP intermediate width instead).
const EMBEDDING_SITES: [Site; 4] = [Site::AttnIn, Site::AttnOut, Site::MlpIn, Site::MlpOut];

fn reads_embedding(site: Site) -> bool {
    matches!(site, Site::AttnIn | Site::MlpIn)
}

/// Per embedding position, how many blocks read it (S1 ∪ S3) and how many write it (S2 ∪ S5).
/// A plan with one embedding subset for all blocks (regular structural pruning) has every count
/// at 0 or at the number of blocks; DISP-LLM's dimension independence shows as counts in between.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PositionUsage {
    blocks: usize,
    reads: Vec<usize>,
    writes: Vec<usize>,
    /// How many of the embedding index sets (S1, S2, S3, S5 of every block) keep the position.
    kept_by_sets: Vec<usize>,
}

impl PositionUsage {
    /// Index sets must be within `hidden` ([`check_plan_shape`]).
    fn of(layers: &[LayerIndices], hidden: usize) -> Self {
        let mut usage = Self { blocks: layers.len(), reads: vec![0; hidden], writes: vec![0; hidden], kept_by_sets: vec![0; hidden] };
        for layer in layers {
            let mut read = vec![false; hidden];
            let mut written = vec![false; hidden];
            for site in EMBEDDING_SITES {
                let union = if reads_embedding(site) { &mut read } else { &mut written };
                for &position in layer.get(site) {
                    union[position as usize] = true;
                    usage.kept_by_sets[position as usize] += 1;
                }
            }
            for (position, (r, w)) in read.into_iter().zip(written).enumerate() {
                usage.reads[position] += usize::from(r);
                usage.writes[position] += usize::from(w);
            }
        }
        usage
    }

    fn hidden(&self) -> usize {
        self.reads.len()
    }

    fn count(counts: &[usize], keep: impl Fn(usize) -> bool) -> usize {
        counts.iter().filter(|&&c| keep(c)).count()
    }

    fn read_by_all(&self) -> usize {
        Self::count(&self.reads, |c| c == self.blocks)
    }

    fn read_by_none(&self) -> usize {
        Self::count(&self.reads, |c| c == 0)
    }

    fn read_by_some(&self) -> usize {
        Self::count(&self.reads, |c| c > 0 && c < self.blocks)
    }

    fn written_by_all(&self) -> usize {
        Self::count(&self.writes, |c| c == self.blocks)
    }

    fn written_by_none(&self) -> usize {
        Self::count(&self.writes, |c| c == 0)
    }

    fn written_by_some(&self) -> usize {
        Self::count(&self.writes, |c| c > 0 && c < self.blocks)
    }

    /// Positions no block reads or writes: they only carry the embedding to the final norm.
    fn untouched(&self) -> usize {
        self.reads.iter().zip(&self.writes).filter(|&(&r, &w)| r == 0 && w == 0).count()
    }

    /// Positions ordered by how many index sets keep them, most first; ties keep the natural
    /// order. Sorting gathers the positions every block needs at the left and the ones few
    /// blocks use at the right, which a natural-order map scatters.
    fn positions_by_use(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.hidden()).collect();
        order.sort_by_key(|&p| (std::cmp::Reverse(self.kept_by_sets[p]), p));
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(attn_in: &[u32], attn_out: &[u32], mlp_in: &[u32], mlp_out: &[u32]) -> LayerIndices {
        LayerIndices {
            attn_in: attn_in.to_vec(),
            attn_out: attn_out.to_vec(),
            mlp_in: mlp_in.to_vec(),
            mlp_inter: vec![0],
            mlp_out: mlp_out.to_vec(),
        }
    }

    #[test]
    fn usage_counts_blocks_per_position() {
        // d = 4, two blocks: position 0 read by both, 1 read by one and written by both,
        // 2 written by one, 3 by nobody.
        let layers = vec![layer(&[0, 1], &[1], &[0], &[1, 2]), layer(&[0], &[1], &[0], &[1])];
        let usage = PositionUsage::of(&layers, 4);
        assert_eq!(usage.reads, vec![2, 1, 0, 0]);
        assert_eq!(usage.writes, vec![0, 2, 1, 0]);
        assert_eq!((usage.read_by_all(), usage.read_by_some(), usage.read_by_none()), (1, 1, 2));
        assert_eq!((usage.written_by_all(), usage.written_by_some(), usage.written_by_none()), (1, 1, 2));
        assert_eq!(usage.untouched(), 1);
        // Sets keeping 0: S1 S3 twice = 4; 1: S1 S2 S5, S2 S5 = 5; 2: S5 = 1; 3: none.
        assert_eq!(usage.kept_by_sets, vec![4, 5, 1, 0]);
        assert_eq!(usage.positions_by_use(), vec![1, 0, 2, 3]);
    }

    #[test]
    fn a_shared_subset_has_no_position_used_by_only_some_blocks() {
        let shared = layer(&[0, 2], &[0, 2], &[0, 2], &[0, 2]);
        let usage = PositionUsage::of(&[shared.clone(), shared.clone(), shared], 3);
        assert_eq!((usage.read_by_all(), usage.read_by_some(), usage.read_by_none()), (2, 0, 1));
        assert_eq!(usage.untouched(), 1);
        assert_eq!(usage.kept_by_sets, vec![12, 0, 12]);
        // Ties keep the natural order.
        assert_eq!(usage.positions_by_use(), vec![0, 2, 1]);
    }

    fn tiny_plan(layers: Vec<LayerIndices>) -> PruningPlan {
        PruningPlan {
            format_version: PLAN_FORMAT_VERSION,
            model: ModelIdentity { model_type: "llama".into(), num_layers: 2, hidden_size: 4, intermediate_size: 6, fingerprint: None },
            method: "test".into(),
            ratio_of: RatioOf::Total,
            target_ratio: 0.2,
            achieved_ratio: 0.2,
            dense_params: 1000,
            pruned_params: 800,
            layers,
            search: serde_json::Value::Null,
        }
    }

    #[test]
    fn plan_shape_is_checked_without_a_model() {
        let full = LayerIndices::full(4, 6);
        assert!(check_plan_shape(&tiny_plan(vec![full.clone(), full.clone()])).is_ok());
        let err = check_plan_shape(&tiny_plan(vec![full.clone()])).unwrap_err().to_string();
        assert!(err.contains("1 layers for a model of 2"), "{err}");
        assert!(check_plan_shape(&tiny_plan(vec![])).unwrap_err().to_string().contains("no layers"));
        let mut wide = full.clone();
        wide.mlp_out = vec![0, 4];
        let err = check_plan_shape(&tiny_plan(vec![full.clone(), wide])).unwrap_err().to_string();
        assert!(err.contains("layer 1 S5") && err.contains("out of range for width 4"), "{err}");
        // S4 is checked against d_ff, not d.
        let mut inter = full.clone();
        inter.mlp_inter = vec![5];
        assert!(check_plan_shape(&tiny_plan(vec![inter, full])).is_ok());
    }

    #[test]
    fn text_report_has_one_row_per_layer_and_the_widths() {
        let plan = tiny_plan(vec![layer(&[0, 1], &[1], &[0], &[1, 2]), LayerIndices::full(4, 6)]);
        let inspection = Inspection::of_plan(Path::new("p.json"), SourceKind::PlanFile, plan, None);
        let usage = PositionUsage::of(&inspection.layers, 4);
        let text = inspection.render_text(&usage);
        assert!(text.contains("1,000 -> 800 (80.00% kept)"), "{text}");
        assert!(text.contains("block parameters  unknown"), "{text}");
        let rows: Vec<&str> = text.lines().filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit())).collect();
        assert_eq!(rows.len(), 2, "{text}");
        assert_eq!(rows[0].split_whitespace().collect::<Vec<_>>(), ["0", "50.0%", "2", "25.0%", "1", "25.0%", "1", "16.7%", "1", "50.0%", "2"]);
        assert!(rows[1].split_whitespace().skip(1).step_by(2).all(|pct| pct == "100.0%"), "{}", rows[1]);
        // Layer 1 keeps everything, so only layer 0 decides: it reads 0 and 1, writes 1 and 2.
        assert!(text.contains("read (S1 or S3) by every block 2, by some 2, by none 0"), "{text}");
        assert!(text.contains("written (S2 or S5) by every block 2, by some 2, by none 0"), "{text}");
    }
}
