//! PNG charts for training reports: the training curves and the feature-density histogram.
//!
//! Charts are drawn with `plotters` into an in-memory RGB buffer and encoded with `png`, so no
//! temporary file is written. Text is rendered with DejaVu Sans, read once per process from
//! [`FONT_PATH`] (Debian package [`FONT_PACKAGE`], installed by `scripts/setup.sh`); no system
//! font lookup happens.
//!
//! Non-finite values are skipped, not drawn, so a run that diverged for a few steps still gets
//! its charts. An empty input, or one with nothing drawable, is [`PlotError::NoData`].

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

/// The font every chart's text is drawn with.
pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
/// The Debian package that provides [`FONT_PATH`].
pub const FONT_PACKAGE: &str = "fonts-dejavu-core";

/// Size in pixels of [`training_curves`]' image.
const CURVES_SIZE: (u32, u32) = (900, 900);
/// Size in pixels of [`density_histogram`]'s image.
const HISTOGRAM_SIZE: (u32, u32) = (900, 600);
/// Bins of the density histogram between the smallest nonzero log10 density and 0.
const DENSITY_BINS: usize = 50;

/// Bars of live latents, and the line colour of the curves.
const LIVE_COLOR: RGBColor = RGBColor(31, 119, 180);
/// The bar of dead latents (density 0).
const DEAD_COLOR: RGBColor = RGBColor(214, 39, 40);
/// The minor grid lines.
const LIGHT_GRID: RGBColor = RGBColor(238, 238, 238);

/// Why a chart could not be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlotError {
    /// The input was empty, or held no finite value to draw.
    #[error("nothing to plot: the input is empty or has no finite values")]
    NoData,
    /// The font file could not be read.
    #[error("the font {path} is missing ({reason}); install the Debian package {package} (apt-get install {package})")]
    FontMissing { path: String, package: &'static str, reason: String },
    /// The font file is not a font ab_glyph can use.
    #[error("the font {path} could not be parsed as a TrueType font; reinstall the Debian package {package}")]
    FontInvalid { path: String, package: &'static str },
    /// plotters failed while drawing.
    #[error("drawing the chart failed: {0}")]
    Drawing(String),
    /// The PNG encoder failed.
    #[error("encoding the chart as PNG failed: {0}")]
    Png(String),
}

/// One logged training step, as the plots need it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CurvePoint {
    /// Tokens trained on so far (the x axis).
    pub tokens: u64,
    /// The total loss.
    pub loss: f64,
    /// Mean number of nonzero latents per token.
    pub l0: f64,
    /// Fraction of variance unexplained.
    pub fvu: f64,
    /// Fraction of latents currently considered dead (not plotted).
    pub dead_fraction: f64,
}

/// Three stacked panels sharing the x axis "tokens": the total loss (log y), L0 (linear y) and
/// FVU (log y), under `title`. Non-finite values, and values ≤ 0 on the log panels, are skipped.
/// Returns the bytes of a 900×900 PNG.
///
/// Errors: [`PlotError::NoData`] when `points` is empty or no panel has a value to draw; the font
/// and drawing errors of [`PlotError`].
pub fn training_curves(title: &str, points: &[CurvePoint]) -> Result<Vec<u8>, PlotError> {
    let loss = series(points, |p| p.loss, true);
    let l0 = series(points, |p| p.l0, false);
    let fvu = series(points, |p| p.fvu, true);
    if loss.is_empty() && l0.is_empty() && fvu.is_empty() {
        return Err(PlotError::NoData);
    }
    let tokens = points.iter().map(|p| p.tokens as f64);
    let x_range =
        padded_linear(tokens.clone().fold(f64::INFINITY, f64::min), tokens.fold(f64::NEG_INFINITY, f64::max), 0.0);

    render(CURVES_SIZE, |root| {
        let root = root.titled(title, ("sans-serif", 24)).map_err(drawing)?;
        let panels = root.split_evenly((3, 1));
        draw_curve(&panels[0], "total loss", &loss, x_range.clone(), true, false)?;
        draw_curve(&panels[1], "L0", &l0, x_range.clone(), false, false)?;
        draw_curve(&panels[2], "FVU", &fvu, x_range, true, true)
    })
}

/// Histogram of log10(feature density), where `density[i]` in [0, 1] is the fraction of tokens
/// on which latent i fired: 50 bins from the smallest nonzero log10 density to 0. Latents with
/// density 0 (dead) cannot be placed on a log axis, so they get their own red bar labelled
/// "dead" at the left, and the caption gives their count. Non-finite values and values outside
/// [0, 1] are skipped (and counted in the caption). Returns the bytes of a 900×600 PNG.
///
/// Errors: [`PlotError::NoData`] when `density` is empty or has no valid value; the font and
/// drawing errors of [`PlotError`].
pub fn density_histogram(title: &str, density: &[f64]) -> Result<Vec<u8>, PlotError> {
    let valid: Vec<f64> = density.iter().copied().filter(|d| d.is_finite() && (0.0..=1.0).contains(d)).collect();
    if valid.is_empty() {
        return Err(PlotError::NoData);
    }
    let skipped = density.len() - valid.len();
    let logs: Vec<f64> = valid.iter().filter(|&&d| d > 0.0).map(|d| d.log10()).collect();
    let dead = valid.len() - logs.len();

    // Live latents all at density (nearly) 1, or none at all, leave no span: show one decade.
    let lo = logs.iter().copied().fold(0.0, f64::min);
    let lo = if lo < -1e-6 { lo } else { -1.0 };
    let width = -lo / DENSITY_BINS as f64;
    let mut counts = vec![0usize; DENSITY_BINS];
    for v in &logs {
        let bin = ((v - lo) / width).floor();
        counts[(bin.max(0.0) as usize).min(DENSITY_BINS - 1)] += 1;
    }
    // The dead bar is two bins wide, one bin left of the first bin.
    let dead_bar = (lo - 3.0 * width, lo - width);
    let tallest = counts.iter().copied().max().unwrap_or(0).max(dead).max(1) as u64;
    let y_max = tallest + tallest.div_ceil(10);

    let mut caption =
        format!("{} latents, {} dead ({:.1}%)", valid.len(), dead, 100.0 * dead as f64 / valid.len() as f64);
    if skipped > 0 {
        caption.push_str(&format!(", {skipped} invalid skipped"));
    }

    render(HISTOGRAM_SIZE, |root| {
        let root = root.titled(title, ("sans-serif", 24)).map_err(drawing)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&caption, ("sans-serif", 16))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(dead_bar.0 - width..width, 0..y_max)
            .map_err(drawing)?;
        let x_label = |x: &f64| match *x {
            x if x < lo - width / 2.0 => String::new(), // the dead bar's side of the axis
            x if x.abs() < width / 2.0 => "0".to_string(),
            x => format!("{x:.1}"),
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(LIGHT_GRID)
            .x_desc("log10(feature density)")
            .y_desc("latents")
            .x_label_formatter(&x_label)
            .draw()
            .map_err(drawing)?;

        let bars = counts.iter().enumerate().filter(|(_, &c)| c > 0).map(|(i, &c)| {
            let left = lo + i as f64 * width;
            // A sliver of white between neighbouring bars.
            Rectangle::new([(left, 0), (left + 0.9 * width, c as u64)], LIVE_COLOR.filled())
        });
        chart.draw_series(bars).map_err(drawing)?;
        if dead > 0 {
            let bar = Rectangle::new([(dead_bar.0, 0), (dead_bar.1, dead as u64)], DEAD_COLOR.filled());
            chart.draw_series(std::iter::once(bar)).map_err(drawing)?;
            let label_style = TextStyle::from(("sans-serif", 16).into_font())
                .color(&DEAD_COLOR)
                .pos(Pos::new(HPos::Center, VPos::Bottom));
            let label_at = ((dead_bar.0 + dead_bar.1) / 2.0, dead as u64);
            chart.draw_series(std::iter::once(Text::new("dead", label_at, label_style))).map_err(drawing)?;
        }
        Ok(())
    })
}

/// (tokens, value) for the points whose value can be drawn: finite, and positive on a log axis.
fn series(points: &[CurvePoint], value: impl Fn(&CurvePoint) -> f64, log: bool) -> Vec<(f64, f64)> {
    points.iter().map(|p| (p.tokens as f64, value(p))).filter(|&(_, v)| v.is_finite() && (!log || v > 0.0)).collect()
}

/// One panel of [`training_curves`]. An empty series still gets its axes.
fn draw_curve(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    name: &str,
    data: &[(f64, f64)],
    x_range: std::ops::Range<f64>,
    log_y: bool,
    x_desc: bool,
) -> Result<(), PlotError> {
    let lo = data.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = data.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let mut builder = ChartBuilder::on(area);
    builder.margin(10).x_label_area_size(35).y_label_area_size(75);
    let line = LIVE_COLOR.stroke_width(2);
    // With a single point there is no line to draw: mark the point instead.
    let markers = if data.len() == 1 { data } else { &[] };
    let x_format = |x: &f64| human_count(*x);
    macro_rules! finish {
        ($chart:expr, $y_format:expr) => {{
            let mut chart = $chart;
            let mut mesh = chart.configure_mesh();
            mesh.y_desc(name).light_line_style(LIGHT_GRID).x_label_formatter(&x_format).y_label_formatter($y_format);
            if x_desc {
                mesh.x_desc("tokens");
            }
            mesh.draw().map_err(drawing)?;
            chart.draw_series(LineSeries::new(data.iter().copied(), line)).map_err(drawing)?;
            chart.draw_series(markers.iter().map(|&p| Circle::new(p, 4, LIVE_COLOR.filled()))).map_err(drawing)?;
        }};
    }
    if log_y {
        let (lo, hi) = if data.is_empty() { (0.1, 10.0) } else { padded_log(lo, hi) };
        let chart = builder.build_cartesian_2d(x_range, (lo..hi).log_scale()).map_err(drawing)?;
        finish!(chart, &|y: &f64| short_number(*y));
    } else {
        let range = if data.is_empty() { 0.0..1.0 } else { padded_linear(lo, hi, 0.05) };
        let chart = builder.build_cartesian_2d(x_range, range).map_err(drawing)?;
        finish!(chart, &|y: &f64| short_number(*y));
    }
    Ok(())
}

/// [lo, hi] widened by `pad` of its span on each side, or to a non-empty range around a single
/// value.
fn padded_linear(lo: f64, hi: f64, pad: f64) -> std::ops::Range<f64> {
    if hi > lo {
        let margin = (hi - lo) * pad;
        lo - margin..hi + margin
    } else {
        let margin = (lo.abs() * 0.1).max(1.0);
        lo - margin..lo + margin
    }
}

/// A positive [lo, hi] widened to whole decades (at least one), so a log axis always has
/// labelled ticks at both ends.
fn padded_log(lo: f64, hi: f64) -> (f64, f64) {
    let lo_exp = lo.log10().floor();
    let hi_exp = hi.log10().ceil().max(lo_exp + 1.0);
    // A hair wider, so plotters' own rounding still puts the end decades inside the range.
    (10f64.powf(lo_exp) * (1.0 - 1e-9), 10f64.powf(hi_exp) * (1.0 + 1e-9))
}

/// Token counts for the x axis: 950, 12k, 3.5M, 1.2B.
fn human_count(x: f64) -> String {
    let a = x.abs();
    let (value, suffix) = if a >= 1e9 {
        (x / 1e9, "B")
    } else if a >= 1e6 {
        (x / 1e6, "M")
    } else if a >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    let text = format!("{value:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}{suffix}")
}

/// Axis values in a few characters: 0.0123, 12.5, 3e-5, 2e6.
fn short_number(y: f64) -> String {
    let a = y.abs();
    if a == 0.0 || (1e-3..1e4).contains(&a) {
        let text = format!("{y:.4}");
        let text = if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.') } else { &text };
        text.to_string()
    } else {
        format!("{y:.1e}")
    }
}

fn drawing<E: std::error::Error>(e: E) -> PlotError {
    PlotError::Drawing(e.to_string())
}

/// Registers DejaVu Sans as plotters' "sans-serif" font, once per process. The outcome, failure
/// included, is remembered: a missing font is an installation problem, not a transient one.
fn ensure_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<Result<(), PlotError>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = read_font(Path::new(FONT_PATH))?;
            // plotters keeps a 'static reference to the font: it lives as long as the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| PlotError::FontInvalid { path: FONT_PATH.to_string(), package: FONT_PACKAGE })
        })
        .clone()
}

fn read_font(path: &Path) -> Result<Vec<u8>, PlotError> {
    std::fs::read(path).map_err(|e| PlotError::FontMissing {
        path: path.display().to_string(),
        package: FONT_PACKAGE,
        reason: e.to_string(),
    })
}

/// Draws on a white `size` canvas in memory and returns it as PNG bytes.
fn render(
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<(), PlotError>,
) -> Result<Vec<u8>, PlotError> {
    ensure_font()?;
    let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        draw(&root)?;
        root.present().map_err(drawing)?;
    }
    encode_png(&rgb, size)
}

fn encode_png(rgb: &[u8], (width, height): (u32, u32)) -> Result<Vec<u8>, PlotError> {
    let png_error = |e: png::EncodingError| PlotError::Png(e.to_string());
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(png_error)?;
    writer.write_image_data(rgb).map_err(png_error)?;
    writer.finish().map_err(png_error)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

    /// Decodes PNG bytes to (width, height, RGB pixels), checking the signature and the format.
    fn decode(bytes: &[u8]) -> (u32, u32, Vec<[u8; 3]>) {
        assert_eq!(bytes[..8], PNG_SIGNATURE, "PNG signature");
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.color_type, info.bit_depth), (png::ColorType::Rgb, png::BitDepth::Eight));
        let pixels = buf[..info.buffer_size()].chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect();
        (info.width, info.height, pixels)
    }

    fn has(pixels: &[[u8; 3]], color: RGBColor) -> bool {
        pixels.contains(&[color.0, color.1, color.2])
    }

    fn non_white(pixels: &[[u8; 3]]) -> usize {
        pixels.iter().filter(|p| **p != [255, 255, 255]).count()
    }

    fn point(step: u64) -> CurvePoint {
        let t = step as f64 + 1.0;
        CurvePoint {
            tokens: step * 4096,
            loss: 1.0 / t.sqrt(),
            l0: 32.0 + 100.0 / t,
            fvu: 0.5 / t.sqrt(),
            dead_fraction: 0.0,
        }
    }

    #[test]
    fn training_curves_draw_a_900_square_png() {
        let points: Vec<_> = (0..200).map(point).collect();
        let (w, h, pixels) = decode(&training_curves("topk k=32, 4608 latents", &points).unwrap());
        assert_eq!((w, h), (900, 900));
        assert!(non_white(&pixels) > 10_000, "only {} non-white pixels", non_white(&pixels));
        assert!(has(&pixels, LIVE_COLOR), "no curve drawn");
    }

    #[test]
    fn training_curves_take_a_single_point() {
        let (w, h, pixels) = decode(&training_curves("one step", &[point(3)]).unwrap());
        assert_eq!((w, h), (900, 900));
        assert!(has(&pixels, LIVE_COLOR), "the point is not marked");
    }

    #[test]
    fn training_curves_skip_non_finite_and_non_positive_values() {
        let mut points: Vec<_> = (0..50).map(point).collect();
        points[10].loss = f64::NAN;
        points[11].fvu = f64::INFINITY;
        points[12].l0 = f64::NEG_INFINITY;
        points[13].loss = 0.0; // cannot go on a log axis
        points[14].fvu = -1.0;
        let (w, h, pixels) = decode(&training_curves("with gaps", &points).unwrap());
        assert_eq!((w, h), (900, 900));
        assert!(has(&pixels, LIVE_COLOR));
        // A panel left with nothing to draw still renders (here: every FVU is NaN).
        for p in &mut points {
            p.fvu = f64::NAN;
        }
        training_curves("no fvu", &points).unwrap();
    }

    #[test]
    fn training_curves_without_data_is_an_error() {
        assert_eq!(training_curves("empty", &[]), Err(PlotError::NoData));
        let nan = CurvePoint { tokens: 1, loss: f64::NAN, l0: f64::NAN, fvu: -1.0, dead_fraction: 0.0 };
        assert_eq!(training_curves("all NaN", &[nan; 5]), Err(PlotError::NoData));
    }

    #[test]
    fn density_histogram_draws_live_and_dead_bars() {
        // Densities from 1e-6 to 1e-1, and 100 dead latents.
        let density: Vec<f64> =
            (0..4608).map(|i| if i < 100 { 0.0 } else { 10f64.powf(-6.0 + 5.0 * (i as f64 / 4608.0)) }).collect();
        let (w, h, pixels) = decode(&density_histogram("feature density", &density).unwrap());
        assert_eq!((w, h), (900, 600));
        assert!(non_white(&pixels) > 10_000);
        assert!(has(&pixels, LIVE_COLOR), "no live bars");
        assert!(has(&pixels, DEAD_COLOR), "no dead bar");
    }

    #[test]
    fn density_histogram_without_dead_latents_has_no_dead_bar() {
        let density: Vec<f64> = (1..=1000).map(|i| i as f64 / 1000.0).collect();
        let (_, _, pixels) = decode(&density_histogram("all alive", &density).unwrap());
        assert!(has(&pixels, LIVE_COLOR));
        assert!(!has(&pixels, DEAD_COLOR));
    }

    #[test]
    fn density_histogram_all_dead() {
        let (w, h, pixels) = decode(&density_histogram("all dead", &[0.0; 4608]).unwrap());
        assert_eq!((w, h), (900, 600));
        assert!(has(&pixels, DEAD_COLOR), "no dead bar");
        assert!(!has(&pixels, LIVE_COLOR), "live bars without live latents");
    }

    #[test]
    fn density_histogram_edge_cases() {
        // Every live latent at density 1: no span between the smallest density and 0.
        decode(&density_histogram("always on", &[1.0; 10]).unwrap());
        // A single latent, and invalid values among valid ones.
        decode(&density_histogram("one", &[0.25]).unwrap());
        let mixed = [f64::NAN, 0.01, f64::INFINITY, -0.5, 1.5, 0.0, 1e-4];
        let (_, _, pixels) = decode(&density_histogram("mixed", &mixed).unwrap());
        assert!(has(&pixels, LIVE_COLOR) && has(&pixels, DEAD_COLOR));
    }

    #[test]
    fn density_histogram_without_data_is_an_error() {
        assert_eq!(density_histogram("empty", &[]), Err(PlotError::NoData));
        assert_eq!(density_histogram("invalid", &[f64::NAN, -1.0, 2.0]), Err(PlotError::NoData));
    }

    #[test]
    fn a_missing_font_names_the_path_and_the_package() {
        let err = read_font(Path::new("/nonexistent/DejaVuSans.ttf")).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, PlotError::FontMissing { .. }));
        assert!(message.contains("/nonexistent/DejaVuSans.ttf"), "{message}");
        assert!(message.contains("fonts-dejavu-core"), "{message}");
    }

    #[test]
    fn axis_labels_are_short() {
        assert_eq!(human_count(950.0), "950");
        assert_eq!(human_count(12_000.0), "12k");
        assert_eq!(human_count(3_500_000.0), "3.5M");
        assert_eq!(human_count(1.25e9), "1.25B");
        assert_eq!(short_number(0.0123), "0.0123");
        assert_eq!(short_number(12.5), "12.5");
        assert_eq!(short_number(0.0), "0");
        assert_eq!(short_number(3e-5), "3.0e-5");
    }
}
