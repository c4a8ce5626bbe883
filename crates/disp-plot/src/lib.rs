//! PNG figures for disp: a canvas that `disp inspect --plot` and `cargo xtask reproduce-table`
//! draw on with plotters, then encode and write atomically.
//!
//! Text is drawn with DejaVu Sans embedded in the binary (`assets/`, Bitstream Vera licence,
//! registered under [`FONT`]), so a figure looks the same on a machine without system fonts.
//! Plotters draws into an RGB buffer; the `png` crate encodes it, and the bytes go through
//! [`disp_io::fsutil::write_atomic`], so a failed draw never leaves a partial file.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

pub use plotters;

/// The family name to use in every text style; the embedded font is registered under it.
pub const FONT: &str = "sans-serif";
static DEJAVU_SANS: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// The drawing area a figure is drawn on.
pub type Canvas<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
/// What drawing code returns: plotters' errors are boxed trait objects.
pub type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Draws a `width`×`height` figure with `draw` on a white canvas and writes it as a PNG to
/// `out` (via a temporary sibling and a rename).
pub fn write_png(out: &Path, width: u32, height: u32, draw: impl FnOnce(&Canvas<'_>) -> DrawResult) -> Result<()> {
    let png = render_png(width, height, draw).map_err(|e| anyhow!("{}: {e}", out.display()))?;
    disp_io::fsutil::write_atomic(out, &png)
}

/// Draws a figure and returns the encoded PNG bytes.
pub fn render_png(width: u32, height: u32, draw: impl FnOnce(&Canvas<'_>) -> DrawResult) -> Result<Vec<u8>> {
    register_font(FONT, FontStyle::Normal, DEJAVU_SANS).map_err(|_| anyhow!("the embedded DejaVu Sans font is not a valid font file"))?;
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("cannot draw the figure: {e}"))?;
        draw(&root).map_err(|e| anyhow!("cannot draw the figure: {e}"))?;
        root.present().map_err(|e| anyhow!("cannot draw the figure: {e}"))?;
    }
    encode_png(&rgb, width, height).map_err(|e| anyhow!("cannot encode the figure as PNG: {e}"))
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>, png::EncodingError> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(rgb)?;
    writer.finish()?;
    Ok(bytes)
}

/// Formats only whole numbers, so that f64 axes label integers (layers, positions) and nothing
/// between them.
pub fn whole_number(v: &f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{}", v.round() as i64)
    } else {
        String::new()
    }
}

/// Eight colours that stay apart for common colour-vision deficiencies (Okabe–Ito), black last.
pub const OKABE_ITO: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(230, 159, 0),
    RGBColor(0, 158, 115),
    RGBColor(213, 94, 0),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(240, 228, 66),
    RGBColor(0, 0, 0),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_of_the_requested_size_with_text() {
        let png = render_png(320, 200, |root| {
            root.draw(&Text::new("disp", (20, 20), (FONT, 40).into_font()))?;
            Ok(())
        })
        .unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(png));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.height), (320, 200));
        // The text left dark pixels on the white canvas: the embedded font was found and used.
        assert!(pixels.chunks(3).any(|p| p.iter().all(|&c| c < 100)));
        assert!(pixels.chunks(3).filter(|p| p.iter().all(|&c| c == 255)).count() > 320 * 200 / 2);
    }

    #[test]
    fn a_failing_draw_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("figure.png");
        let err = write_png(&out, 100, 100, |_| Err("no data".into())).unwrap_err();
        assert!(format!("{err:#}").contains("figure.png"), "{err:#}");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none());
    }
}
