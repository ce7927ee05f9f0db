//! SVG line charts for the report: rate (%) against training step, one colored line per
//! series, vertical 95%-interval error bars, a legend to the right of the plot.
//!
//! Rendering goes through plotters' SVG backend into a `String` (the caller writes it with
//! `atomic_write`). plotters is built without its `ttf`/`ab_glyph` features on purpose: the
//! SVG backend emits text as `<text>` elements that the viewer renders with its own fonts,
//! and plotters' built-in "naive" font only estimates text extents for layout (plotters
//! divides font sizes by 1.24 in the SVG, hence the sizes below). No system
//! font library or font file is needed, so this works on a bare machine.
//!
//! The legend is drawn by hand in its own column instead of with plotters' series labels,
//! so it never covers the curves (backdoor rates sit at the top and bottom of the chart,
//! exactly where an in-plot legend would go).

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Width and height of every chart, in SVG pixels.
const SIZE: (u32, u32) = (860, 440);
/// Width of the legend column at the right.
const LEGEND_WIDTH: u32 = 230;

/// Tableau-10 palette: distinguishable, and colour-blind-friendlier than pure hues.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One point of a curve: a rate and its interval, all as fractions in [0, 1].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub step: u64,
    pub rate: f64,
    pub low: f64,
    pub high: f64,
}

/// One line of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Index into the palette (taken modulo its length); series of the same backdoor
    /// mechanism share a colour across all charts.
    pub color: usize,
    /// Dashed, hollow markers and fainter error bars (used for the no-trigger rate).
    pub dashed: bool,
    pub points: Vec<Point>,
}

/// Texts around the chart.
#[derive(Clone, Copy, Debug)]
pub struct Labels<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
}

/// Renders a line chart of `series` (rates shown in percent on a fixed 0-100 axis) and
/// returns the SVG document. Points with a non-finite rate are skipped; interval ends that
/// are not finite are drawn as the rate itself. An empty chart (no points) still gets axes.
pub fn line_chart_svg(labels: Labels<'_>, series: &[Series]) -> Result<String> {
    line_chart_svg_x(labels, series, &step_label)
}

/// [`line_chart_svg`] with its own x tick labels: `Point::step` holds any non-negative
/// integer coordinate (e.g. 1000 x log10 of a parameter count, for a log axis) and
/// `x_label` writes a tick at that coordinate.
pub fn line_chart_svg_x(labels: Labels<'_>, series: &[Series], x_label: &dyn Fn(&f64) -> String) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw(&root, labels, series, x_label).map_err(|e| anyhow!("drawing chart {:?}: {e}", labels.title))?;
        root.present().map_err(|e| anyhow!("rendering chart {:?}: {e}", labels.title))?;
    }
    Ok(svg)
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Percent, clamped to the axis.
fn pct(x: f64) -> f64 {
    (x * 100.0).clamp(0.0, 100.0)
}

/// The points of a series that can be drawn, as (step, rate %, low %, high %), by step.
fn drawable(s: &Series) -> Vec<(u64, f64, f64, f64)> {
    let mut pts: Vec<(u64, f64, f64, f64)> = s
        .points
        .iter()
        .filter(|p| p.rate.is_finite())
        .map(|p| {
            let lo = if p.low.is_finite() { p.low } else { p.rate };
            let hi = if p.high.is_finite() { p.high } else { p.rate };
            (p.step, pct(p.rate), pct(lo.min(p.rate)), pct(hi.max(p.rate)))
        })
        .collect();
    pts.sort_by_key(|p| p.0);
    pts
}

/// The x range: all steps with some padding so the markers and error bars at the ends
/// stay clear of the axes.
fn x_range(series: &[Vec<(u64, f64, f64, f64)>]) -> (f64, f64) {
    let steps = series.iter().flatten().map(|p| p.0 as f64);
    let (min, max) = steps.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), s| (lo.min(s), hi.max(s)));
    if min > max {
        return (0.0, 1.0);
    }
    let pad = ((max - min) * 0.03).max(0.5);
    (min - pad, max + pad)
}

/// Horizontal offset (in steps) for the series of colour `color`, so curves of different
/// mechanisms that coincide (all at 100%, say) stay visible side by side.
fn dodge(series: &[Series], color: usize, x0: f64, x1: f64) -> f64 {
    let mut colors: Vec<usize> = series.iter().map(|s| s.color).collect();
    colors.sort_unstable();
    colors.dedup();
    let rank = colors.iter().position(|&c| c == color).unwrap_or(0) as f64;
    (rank - (colors.len() as f64 - 1.0) / 2.0) * (x1 - x0) * 0.007
}

/// Tick labels: whole, non-negative steps only (the axis is continuous so curves can be
/// dodged; the padding may put a tick below 0).
fn step_label(v: &f64) -> String {
    if *v >= 0.0 && (v - v.round()).abs() < 1e-6 {
        format!("{:.0}", v.round())
    } else {
        String::new()
    }
}

fn draw(
    root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    labels: Labels<'_>,
    series: &[Series],
    x_label: &dyn Fn(&f64) -> String,
) -> DrawResult {
    root.fill(&WHITE)?;
    let body = root.titled(labels.title, ("sans-serif", 26).into_font().color(&BLACK))?;
    let (plot_area, legend_area) = body.split_horizontally(SIZE.0 - LEGEND_WIDTH);

    let pts: Vec<Vec<(u64, f64, f64, f64)>> = series.iter().map(drawable).collect();
    let (x0, x1) = x_range(&pts);

    let mut chart =
        ChartBuilder::on(&plot_area).margin(12).x_label_area_size(45).y_label_area_size(60).build_cartesian_2d(x0..x1, 0f64..100f64)?;
    draw_mesh(&mut chart, labels, 8, x_label)?;

    for (s, p) in series.iter().zip(&pts) {
        let c = color(s.color);
        let line = c.stroke_width(2);
        let dx = dodge(series, s.color, x0, x1);
        let bar = if s.dashed { c.mix(0.45).stroke_width(1) } else { c.mix(0.8).stroke_width(1) };
        // Error bars first so lines and markers sit on top.
        for &(x, _, lo, hi) in p {
            let x = x as f64 + dx;
            if hi > lo {
                chart.draw_series(std::iter::once(PathElement::new(vec![(x, lo), (x, hi)], bar)))?;
                for y in [lo, hi] {
                    chart.draw_series(std::iter::once(EmptyElement::at((x, y)) + PathElement::new(vec![(-4, 0), (4, 0)], bar)))?;
                }
            }
        }
        let xy: Vec<(f64, f64)> = p.iter().map(|&(x, y, _, _)| (x as f64 + dx, y)).collect();
        if s.dashed {
            chart.draw_series(DashedLineSeries::new(xy.clone(), 7, 5, line))?;
            chart.draw_series(xy.iter().map(|&xy| Circle::new(xy, 3, c.stroke_width(1))))?;
        } else {
            chart.draw_series(LineSeries::new(xy.clone(), line))?;
            chart.draw_series(xy.iter().map(|&xy| Circle::new(xy, 3, c.filled())))?;
        }
    }

    draw_legend(&legend_area, series)?;
    Ok(())
}

type Chart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>>;

/// Axes, tick labels and grid shared by every chart: a 0-100% y axis, `x_ticks` x labels.
fn draw_mesh(chart: &mut Chart<'_, '_>, labels: Labels<'_>, x_ticks: usize, x_label: &dyn Fn(&f64) -> String) -> DrawResult {
    chart
        .configure_mesh()
        .x_desc(labels.x)
        .y_desc(labels.y)
        .x_labels(x_ticks)
        .y_labels(11)
        .x_label_formatter(x_label)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 16))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.12))
        .draw()?;
    Ok(())
}

fn draw_legend(area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>, series: &[Series]) -> DrawResult {
    let text = TextStyle::from(("sans-serif", 17).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, s) in series.iter().enumerate() {
        let y = 40 + 24 * i as i32;
        let c = color(s.color);
        if s.dashed {
            area.draw(&PathElement::new(vec![(6, y), (14, y)], c.stroke_width(2)))?;
            area.draw(&PathElement::new(vec![(26, y), (34, y)], c.stroke_width(2)))?;
            area.draw(&Circle::new((20, y), 3, c.stroke_width(1)))?;
        } else {
            area.draw(&PathElement::new(vec![(6, y), (34, y)], c.stroke_width(2)))?;
            area.draw(&Circle::new((20, y), 3, c.filled()))?;
        }
        area.draw(&Text::new(s.label.clone(), (42, y), text.clone()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(step: u64, rate: f64) -> Point {
        Point { step, rate, low: (rate - 0.05).max(0.0), high: (rate + 0.05).min(1.0) }
    }

    #[test]
    fn renders_text_lines_and_legend_without_fonts() {
        let series = vec![
            Series { label: "normal, trigger".into(), color: 0, dashed: false, points: vec![pt(0, 1.0), pt(50, 0.6), pt(100, 0.3)] },
            Series { label: "normal, no trigger".into(), color: 0, dashed: true, points: vec![pt(0, 0.0), pt(50, 0.02), pt(100, 0.01)] },
        ];
        let labels = Labels { title: "Backdoor persistence <SFT> & more", x: "safety-training step", y: "rate (%)" };
        let svg = line_chart_svg(labels, &series).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("Backdoor persistence &lt;SFT&gt; &amp; more"));
        for t in ["safety-training step", "rate (%)", "normal, trigger", "normal, no trigger", "\n100\n</text>", "\n50\n</text>"] {
            assert!(svg.contains(t), "missing {t:?}");
        }
        assert!(svg.contains("<polyline") || svg.contains("<path"));
        assert!(svg.contains("<circle"));
    }

    #[test]
    fn degenerate_inputs_still_render() {
        let labels = Labels { title: "empty", x: "x", y: "y" };
        let svg = line_chart_svg(labels, &[]).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("empty"));
        let odd = vec![Series {
            label: "odd".into(),
            color: 23,
            dashed: false,
            points: vec![
                Point { step: 7, rate: f64::NAN, low: 0.0, high: 1.0 },
                Point { step: 7, rate: 1.5, low: f64::NAN, high: f64::INFINITY },
                Point { step: u64::MAX, rate: 0.5, low: 0.4, high: 0.6 },
            ],
        }];
        let svg = line_chart_svg(Labels { title: "odd", x: "x", y: "y" }, &odd).unwrap();
        assert!(svg.contains("odd"));
    }

    #[test]
    fn x_range_pads_and_handles_single_points() {
        assert_eq!(x_range(&[]), (0.0, 1.0));
        assert_eq!(x_range(&[vec![(5, 1.0, 1.0, 1.0)]]), (4.5, 5.5));
        assert_eq!(x_range(&[vec![(0, 1.0, 1.0, 1.0), (400, 1.0, 1.0, 1.0)]]), (-12.0, 412.0));
        assert_eq!(step_label(&50.0), "50");
        assert_eq!(step_label(&-10.0), "");
        assert_eq!(step_label(&2.5), "");
    }

    #[test]
    fn coinciding_curves_are_dodged_symmetrically() {
        let s = |color| Series { label: String::new(), color, dashed: false, points: vec![] };
        let series = [s(0), s(0), s(1), s(2)];
        let d: Vec<f64> = [0, 1, 2].iter().map(|&c| dodge(&series, c, 0.0, 100.0)).collect();
        assert!(d[0] < 0.0 && d[1] == 0.0 && d[2] > 0.0 && (d[0] + d[2]).abs() < 1e-12);
    }
}

/// One bar of a bar chart: a rate with its interval (fractions in [0, 1]).
#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    pub rate: f64,
    pub low: f64,
    pub high: f64,
}

/// Grouped bars, the paper's "before -> after" figure: one group per x label (e.g. a
/// mechanism), one bar per `kinds` entry in each group (e.g. before, after), coloured by
/// kind, with error bars; `groups[g].1[k]` is group g's bar of kind k (None: no bar).
pub fn bar_chart_svg(labels: Labels<'_>, kinds: &[&str], groups: &[(String, Vec<Option<Bar>>)]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw_bars(&root, labels, kinds, groups).map_err(|e| anyhow!("drawing chart {:?}: {e}", labels.title))?;
        root.present().map_err(|e| anyhow!("rendering chart {:?}: {e}", labels.title))?;
    }
    Ok(svg)
}

fn draw_bars(
    root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    labels: Labels<'_>,
    kinds: &[&str],
    groups: &[(String, Vec<Option<Bar>>)],
) -> DrawResult {
    root.fill(&WHITE)?;
    let body = root.titled(labels.title, ("sans-serif", 26).into_font().color(&BLACK))?;
    let (plot_area, legend_area) = body.split_horizontally(SIZE.0 - LEGEND_WIDTH);
    let n = groups.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&plot_area)
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..n - 0.5, 0f64..100f64)?;
    let names: Vec<String> = groups.iter().map(|g| g.0.clone()).collect();
    let group_label = |v: &f64| -> String {
        let i = v.round();
        if (v - i).abs() < 1e-6 && i >= 0.0 {
            names.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    draw_mesh(&mut chart, labels, groups.len().max(1), &group_label)?;
    let k = kinds.len().max(1) as f64;
    let width = 0.8 / k;
    for (g, (_, bars)) in groups.iter().enumerate() {
        for (j, bar) in bars.iter().enumerate() {
            let Some(b) = bar.as_ref().filter(|b| b.rate.is_finite()) else { continue };
            let x0 = g as f64 - 0.4 + j as f64 * width;
            let c = color(j);
            let (y, lo, hi) =
                (pct(b.rate), pct(if b.low.is_finite() { b.low } else { b.rate }), pct(if b.high.is_finite() { b.high } else { b.rate }));
            chart.draw_series(std::iter::once(Rectangle::new([(x0 + 0.02 * width, 0.0), (x0 + 0.98 * width, y)], c.mix(0.85).filled())))?;
            let xm = x0 + width / 2.0;
            if hi > lo {
                let bar_style = BLACK.mix(0.7).stroke_width(1);
                chart.draw_series(std::iter::once(PathElement::new(vec![(xm, lo), (xm, hi)], bar_style)))?;
                for yy in [lo, hi] {
                    chart.draw_series(std::iter::once(EmptyElement::at((xm, yy)) + PathElement::new(vec![(-4, 0), (4, 0)], bar_style)))?;
                }
            }
        }
    }
    let legend: Vec<Series> =
        kinds.iter().enumerate().map(|(j, k)| Series { label: k.to_string(), color: j, dashed: false, points: Vec::new() }).collect();
    draw_legend(&legend_area, &legend)?;
    Ok(())
}
