//! The figure of `disp inspect --plot`: one PNG of [`WIDTH`]×[`HEIGHT`] with two panels, like the
//! paper's width and selection figures.
//!
//! * top: the kept fraction of each index set (S1..S5) per layer;
//! * bottom: per layer a band of four rows, S1, S2, S3 and S5, over the embedding positions:
//!   pale grey where the set keeps the position, the set's colour where it drops it (the dropped
//!   positions are the minority and the information); positions sorted by how many index sets
//!   keep them. (The unions S1 ∪ S3 and S2 ∪ S5 would hide most of the pruning:
//!   at 30 % the union of two 85 % sets covers nearly every position.)
//!
//! The canvas, the embedded font and the atomic PNG write come from `disp-plot`.

use std::path::Path;

use anyhow::Result;
use disp_core::selection::Site;
use disp_plot::plotters::prelude::*;
use disp_plot::{whole_number, Canvas, DrawResult, FONT, OKABE_ITO};

use super::{Inspection, PositionUsage, EMBEDDING_SITES};

pub const WIDTH: u32 = 1600;
pub const HEIGHT: u32 = 1000;

/// Height of the kept-fraction panel; the map gets the rest below the title.
const TOP_PANEL_HEIGHT: u32 = 330;
/// Width of the legend column right of each panel (the same for both, so their x axes align).
const LEGEND_WIDTH: u32 = 290;

/// Draws the figure and writes it to `out` (via a temporary sibling and a rename).
pub fn write_png(inspection: &Inspection, usage: &PositionUsage, out: &Path) -> Result<()> {
    disp_plot::write_png(out, WIDTH, HEIGHT, |root| draw(inspection, usage, root))
}

fn draw(inspection: &Inspection, usage: &PositionUsage, root: &Canvas<'_>) -> DrawResult {
    let title = format!("{}: {:.1}% of {} parameters removed", inspection.headline(), 100.0 * inspection.achieved_ratio, inspection.ratio_of.name());
    let body = root.margin(10, 0, 0, 0).titled(&title, (FONT, 30))?;
    let (top, bottom) = body.split_vertically(TOP_PANEL_HEIGHT);
    let plot_width = WIDTH - LEGEND_WIDTH;
    let (top_chart, top_legend) = top.split_horizontally(plot_width);
    let (map_chart, map_legend) = bottom.split_horizontally(plot_width);
    draw_kept_fractions(inspection, &top_chart)?;
    draw_legend(&top_legend, &Site::ALL.map(|site| (format!("{} {}", site.label(), site.description()), site_colour(site), Swatch::Line)))?;
    draw_selection_map(inspection, usage, &map_chart)?;
    let heading = [("dropped from".to_string(), WHITE, Swatch::None)];
    let dropped = EMBEDDING_SITES.map(|site| (format!("{} {}", site.label(), site.description()), site_colour(site), Swatch::Box));
    let kept = [("kept".to_string(), KEPT, Swatch::Box)];
    draw_legend(&map_legend, &[&heading[..], &dropped[..], &kept[..]].concat())?;
    Ok(())
}

/// Top panel: x = layer, y = kept fraction, one line per index set.
fn draw_kept_fractions(inspection: &Inspection, area: &Canvas<'_>) -> DrawResult {
    let layers = inspection.layers.len();
    // Layer l sits at x = l; half a layer of margin on both sides.
    let x_range = -0.5..(layers as f64 - 0.5);
    let mut chart = ChartBuilder::on(area)
        .margin(15)
        .x_label_area_size(55)
        .y_label_area_size(90)
        .caption("kept fraction of each index set, per layer", (FONT, 22))
        .build_cartesian_2d(x_range, 0f64..1.05)?;
    chart
        .configure_mesh()
        .x_desc("layer")
        .y_desc("kept fraction")
        .x_labels((layers + 1).min(40))
        .y_labels(11)
        .x_label_formatter(&whole_number)
        .y_label_formatter(&|v| format!("{:.0}%", 100.0 * v))
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 20))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()?;
    for site in Site::ALL {
        let points = (0..layers).map(|layer| (layer as f64, inspection.kept_fraction(layer, site)));
        chart.draw_series(LineSeries::new(points, site_colour(site).stroke_width(2)).point_size(3))?;
    }
    Ok(())
}

/// Bottom panel: x = embedding position (sorted by use), y = layer; each layer is a band of one
/// row per embedding index set (S1 at the top, S5 at the bottom), a cell per position.
fn draw_selection_map(inspection: &Inspection, usage: &PositionUsage, area: &Canvas<'_>) -> DrawResult {
    let layers = inspection.layers.len();
    let hidden = usage.hidden();
    let order = usage.positions_by_use();
    let mut chart = ChartBuilder::on(area)
        .margin(15)
        .x_label_area_size(55)
        .y_label_area_size(90)
        .caption("embedding positions dropped from S1, S2, S3, S5 (rows top to bottom in each layer)", (FONT, 22))
        .build_cartesian_2d(0f64..hidden as f64, -0.5..(layers as f64 - 0.5))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(format!("embedding position (all {hidden}), sorted by how many index sets keep it, most kept left"))
        .y_desc("layer")
        .x_labels(12)
        .y_labels((layers + 1).min(16))
        .x_label_formatter(&whole_number)
        .y_label_formatter(&whole_number)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 20))
        .draw()?;
    // Layer l covers [l - 0.5, l + 0.5]: a white gap of GAP at its top and bottom separates the
    // layers, the rest is split into one row per set. Rank r of the sorted order covers [r, r + 1).
    const GAP: f64 = 0.06;
    let row_height = (1.0 - 2.0 * GAP) / EMBEDDING_SITES.len() as f64;
    let mut cells = Vec::with_capacity(layers * EMBEDDING_SITES.len() * hidden);
    for (layer, indices) in inspection.layers.iter().enumerate() {
        for (row, site) in EMBEDDING_SITES.into_iter().enumerate() {
            let mut kept = vec![false; hidden];
            for &position in indices.get(site) {
                kept[position as usize] = true;
            }
            let top = layer as f64 + 0.5 - GAP - row as f64 * row_height;
            for (rank, &position) in order.iter().enumerate() {
                let colour = if kept[position] { KEPT } else { site_colour(site) };
                let x = rank as f64;
                cells.push(Rectangle::new([(x, top - row_height), (x + 1.0, top)], colour.filled()));
            }
        }
    }
    chart.draw_series(cells)?;
    Ok(())
}

#[derive(Clone, Copy)]
enum Swatch {
    Line,
    Box,
    /// A heading over the entries below it.
    None,
}

/// A column of colour swatches and labels, in a panel's legend area.
fn draw_legend(area: &Canvas<'_>, entries: &[(String, RGBColor, Swatch)]) -> DrawResult {
    // Below the panel's caption, level with the top of its plotting area.
    let (left, mut y) = (8, 70);
    for (label, colour, swatch) in entries {
        match swatch {
            Swatch::Line => {
                area.draw(&PathElement::new(vec![(left, y), (left + 30, y)], colour.stroke_width(3)))?;
                area.draw(&Circle::new((left + 15, y), 4, colour.filled()))?;
            }
            Swatch::Box => area.draw(&Rectangle::new([(left + 4, y - 9), (left + 26, y + 9)], colour.filled()))?,
            Swatch::None => {}
        }
        let indent = if matches!(swatch, Swatch::None) { 0 } else { 40 };
        area.draw(&Text::new(label.clone(), (left + indent, y - 10), (FONT, 18).into_font()))?;
        y += 32;
    }
    Ok(())
}

/// Positions a set keeps: a grey light enough to let the dropped cells stand out, dark enough to
/// tell apart from the white gaps between layers.
const KEPT: RGBColor = RGBColor(224, 224, 224);

/// One colour-blind-safe colour per index set.
fn site_colour(site: Site) -> RGBColor {
    match site {
        Site::AttnIn => OKABE_ITO[0],
        Site::AttnOut => OKABE_ITO[1],
        Site::MlpIn => OKABE_ITO[2],
        Site::MlpInter => OKABE_ITO[3],
        Site::MlpOut => OKABE_ITO[4],
    }
}
