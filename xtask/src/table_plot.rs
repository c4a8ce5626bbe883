//! The comparison table's chart (`results.png` beside the markdown report): one panel per model
//! and held-out text, perplexity (log scale) against the fraction of total parameters removed,
//! one line per method, like the paper's ratio sweeps.
//!
//! Every line starts at the dense model (0 % removed). wanda-2:4 is one marker at the fraction of
//! total parameters it actually removes, which is less than its nominal 50 %.

use std::path::Path;

use anyhow::Result;
use disp_plot::plotters::prelude::*;
use disp_plot::plotters::series::DashedLineSeries;
use disp_plot::{Canvas, DrawResult, FONT, OKABE_ITO};

use crate::table::{models_in_order, CellResult, TableSettings};

const PANEL_WIDTH: u32 = 780;
const PANEL_HEIGHT: u32 = 480;
const TITLE_HEIGHT: u32 = 60;

/// The chart's path: the report's, with the extension `png`.
pub fn chart_path(settings: &TableSettings) -> std::path::PathBuf {
    settings.out_markdown.with_extension("png")
}

/// Draws the chart of `results` and writes it to `out`; nothing is written without results.
pub fn write_chart(settings: &TableSettings, results: &[CellResult], out: &Path) -> Result<()> {
    let models = models_in_order(results);
    let texts: Vec<&str> = settings.cell.heldout.iter().map(|(name, _)| name.as_str()).collect();
    if models.is_empty() || texts.is_empty() {
        return Ok(());
    }
    let width = PANEL_WIDTH * texts.len() as u32;
    let height = TITLE_HEIGHT + PANEL_HEIGHT * models.len() as u32;
    disp_plot::write_png(out, width, height, |root| {
        let retrained = settings.methods.iter().any(|m| m.ends_with("+recovery"));
        let title = if retrained {
            format!("Held-out perplexity after pruning (search steps {}; dashed: after recovery fine-tuning)", settings.cell.steps)
        } else {
            format!("Held-out perplexity after pruning, without retraining (search steps {})", settings.cell.steps)
        };
        let body = root.titled(&title, (FONT, 28))?;
        let panels = body.split_evenly((models.len(), texts.len()));
        for (index, panel) in panels.iter().enumerate() {
            let (model, text) = (models[index / texts.len()], texts[index % texts.len()]);
            draw_panel(settings, results, model, text, panel)?;
        }
        Ok(())
    })
}

/// A row's colour (colour-blind safe), the same in every panel: its method's, the `+kd` search
/// its own; a `+recovery` row has the colour of the row it fine-tunes and is drawn dashed.
fn method_colour(row: &str) -> RGBColor {
    match row.strip_suffix("+recovery").unwrap_or(row) {
        "disp" => OKABE_ITO[3],
        "disp+kd" => OKABE_ITO[6],
        "disp-direct" => OKABE_ITO[4],
        "uniform-magnitude" => OKABE_ITO[0],
        "uniform-wanda" => OKABE_ITO[2],
        "wanda-sp-mlp" => OKABE_ITO[1],
        "wanda-2:4" => OKABE_ITO[5],
        _ => OKABE_ITO[7],
    }
}

fn draw_panel(settings: &TableSettings, results: &[CellResult], model: &str, text: &str, area: &Canvas<'_>) -> DrawResult {
    let cells: Vec<&CellResult> = results.iter().filter(|r| r.model == model && r.perplexity.contains_key(text)).collect();
    let ppl = |r: &CellResult| r.perplexity[text];
    if cells.is_empty() {
        return Ok(());
    }
    let dense = cells.iter().find(|r| r.method == "dense").map(|r| ppl(r));
    let (low, high) = cells.iter().map(|r| ppl(r)).fold((f64::INFINITY, 0f64), |(lo, hi), p| (lo.min(p), hi.max(p)));
    // Room above the highest line for the legend, a little below the lowest.
    let y_range = (low / 1.3)..(high * 6.0);
    let x_max = settings.ratios.iter().copied().fold(0.0, f64::max) * 100.0 + 5.0;
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .caption(format!("{model}: perplexity on {text}"), (FONT, 22))
        .build_cartesian_2d(0f64..x_max, y_range.log_scale())?;
    chart
        .configure_mesh()
        .x_desc("% of total parameters removed (achieved)")
        .y_desc("perplexity (log scale)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| if *v < 10.0 { format!("{v:.1}") } else { format!("{v:.0}") })
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .light_line_style(WHITE)
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()?;
    if let Some(dense) = dense {
        chart
            .draw_series(DashedLineSeries::new([(0.0, dense), (x_max, dense)], 8, 6, BLACK.stroke_width(1)))?
            .label(format!("dense ({dense:.2})"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], BLACK.stroke_width(1)));
    }
    for method in &settings.methods {
        let colour = method_colour(method);
        let mut points: Vec<(f64, f64)> = cells.iter().filter(|r| r.method == *method).map(|r| (100.0 * r.achieved_ratio, ppl(r))).collect();
        if points.is_empty() {
            continue;
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        if method == "wanda-2:4" {
            chart
                .draw_series(points.iter().map(|&p| TriangleMarker::new(p, 9, colour.filled())))?
                .label(format!("{method} (50 % of block weights)"))
                .legend(move |(x, y)| TriangleMarker::new((x + 12, y), 7, colour.filled()));
            continue;
        }
        let line: Vec<(f64, f64)> = dense.map(|d| (0.0, d)).into_iter().chain(points.iter().copied()).collect();
        if method.ends_with("+recovery") {
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, colour.filled())))?;
            chart
                .draw_series(DashedLineSeries::new(line, 10, 5, colour.stroke_width(3)))?
                .label(method.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 10, y)], colour.stroke_width(3)));
            continue;
        }
        chart
            .draw_series(LineSeries::new(line, colour.stroke_width(3)).point_size(4))?
            .label(method.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(3)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .label_font((FONT, 15))
        .draw()?;
    Ok(())
}
