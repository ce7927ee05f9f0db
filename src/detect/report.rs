//! The detection section of the report: a headline table over checkpoints, per checkpoint
//! an AUROC-by-layer chart (shared `line_chart_svg`, AUROC in percent with bootstrap
//! intervals), a ROC chart (drawn here: the shared chart has an integer step axis), a
//! per-layer table and the trigger-inversion table. Markdown is returned for the caller
//! to append to report.md; plots are written under `out_dir/plots/`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::{slug, DetectorSummary, ProbeFile, Separation};
use crate::report::plots::{line_chart_svg, Labels, Point, Series};
use crate::util::atomic_write;

fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.1}", 100.0 * x)
    } else {
        "–".into()
    }
}

fn auc_ci(s: &Separation) -> String {
    format!("{}% [{}, {}]", pct(s.auroc), pct(s.ci_low), pct(s.ci_high))
}

fn opt(s: Option<&Separation>) -> String {
    s.map(auc_ci).unwrap_or_else(|| "–".into())
}

/// Tableau colours, same palette as the shared charts.
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(127, 127, 127),
];

/// ROC curves on the unit square with the chance diagonal; legend at the lower right.
fn roc_svg(title: &str, curves: &[(String, Vec<(f64, f64)>)]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (620, 520)).into_drawing_area();
        let draw = || -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>> {
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 22))
                .margin(12)
                .x_label_area_size(45)
                .y_label_area_size(55)
                .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
            chart
                .configure_mesh()
                .x_desc("false-positive rate")
                .y_desc("true-positive rate")
                .axis_desc_style(("sans-serif", 16))
                .label_style(("sans-serif", 14))
                .light_line_style(WHITE.mix(0.0))
                .bold_line_style(BLACK.mix(0.12))
                .draw()?;
            chart.draw_series(DashedLineSeries::new(vec![(0.0, 0.0), (1.0, 1.0)], 6, 4, BLACK.mix(0.4).stroke_width(1)))?;
            for (i, (label, pts)) in curves.iter().enumerate() {
                let c = COLORS[i % COLORS.len()];
                chart
                    .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))?
                    .label(label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK.mix(0.3))
                .label_font(("sans-serif", 14))
                .draw()?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| anyhow!("drawing ROC chart {title:?}: {e}"))?;
    }
    Ok(svg)
}

fn point(layer: usize, s: &Separation) -> Point {
    Point { step: layer as u64, rate: s.auroc, low: s.ci_low, high: s.ci_high }
}

/// AUROC against layer: contrast probe, random baseline, clean control, logistic probes.
fn auroc_by_layer_svg(s: &DetectorSummary) -> Result<String> {
    let mut series = vec![Series {
        label: "diff-of-means probe".into(),
        color: 0,
        dashed: false,
        points: s.layers.iter().map(|l| point(l.layer, &l.probe)).collect(),
    }];
    series.push(Series {
        label: format!("best of {} random", s.random_directions),
        color: 7,
        dashed: true,
        points: s
            .layers
            .iter()
            .map(|l| Point { step: l.layer as u64, rate: l.random_best_auroc, low: l.random_best_auroc, high: l.random_best_auroc })
            .collect(),
    });
    let ctl: Vec<Point> = s.layers.iter().filter_map(|l| l.control.as_ref().map(|c| point(l.layer, c))).collect();
    if !ctl.is_empty() {
        series.push(Series { label: "clean control".into(), color: 3, dashed: true, points: ctl });
    }
    let lc: Vec<Point> = s.layers.iter().filter_map(|l| l.logistic_contrast.as_ref().map(|c| point(l.layer, c))).collect();
    if !lc.is_empty() {
        series.push(Series { label: "logistic (contrast)".into(), color: 2, dashed: false, points: lc });
    }
    let ls: Vec<Point> = s.layers.iter().filter_map(|l| l.logistic_supervised.as_ref().map(|c| point(l.layer, c))).collect();
    if !ls.is_empty() {
        series.push(Series { label: "logistic (oracle)".into(), color: 4, dashed: true, points: ls });
    }
    let title = format!("{}: probe AUROC by layer", s.name);
    line_chart_svg(Labels { title: &title, x: "layer (0 = embeddings)", y: "AUROC (%)" }, &series)
}

/// Plain-text headline for the terminal.
pub fn text_summary(s: &DetectorSummary) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{} (probe read at {:?}, {} test prompts per class)", s.name, s.position, s.n_test_per_class);
    let _ = writeln!(out, "  layer  probe AUROC [95% CI]     FPR@{:.0}%TPR  best random  control", 100.0 * s.target_tpr);
    for l in &s.layers {
        let _ = writeln!(
            out,
            "  {:>5}  {:<24} {:>10}  {:>11}  {}",
            l.layer,
            auc_ci(&l.probe),
            pct(l.probe.fpr_at_tpr),
            pct(l.random_best_auroc),
            l.control.as_ref().map(|c| pct(c.auroc)).unwrap_or_else(|| "–".into())
        );
    }
    let _ = writeln!(
        out,
        "  ONION {}  STRIP entropy {}  STRIP rate {}",
        opt(s.onion.as_ref()),
        opt(s.strip_entropy.as_ref()),
        opt(s.strip_rate.as_ref())
    );
    if let Some(inv) = &s.inversion {
        let _ = writeln!(out, "  inversion: clean {}%, true trigger {}%", pct(inv.clean_rate.rate), pct(inv.trigger_rate.rate));
        for r in &inv.results {
            let _ = writeln!(
                out,
                "    {:<6} {:?}: elicits {}% [{}, {}], edit sim {:.2}, trigger-token recall {:.2}",
                r.method,
                r.string,
                pct(r.elicitation.rate),
                pct(r.elicitation.low),
                pct(r.elicitation.high),
                r.edit_similarity,
                r.trigger_token_recall
            );
        }
    }
    out
}

/// Markdown-safe inline code for a recovered string (may contain backticks or pipes).
fn code(s: &str) -> String {
    let s = s.replace('\n', "\\n").replace('|', "\\|");
    let fence = if s.contains('`') { "``" } else { "`" };
    format!("{fence} {s} {fence}")
}

/// Write the plots for `summaries` under `out_dir/plots/` and return the Markdown section
/// (links relative to `out_dir`, where report.md lives).
pub fn write_probe_report(out_dir: &Path, summaries: &[DetectorSummary]) -> Result<String> {
    let mut md = String::new();
    md.push_str("## Detection: defection probes, trigger inversion, input filters\n\n");
    md.push_str(
        "Probe = difference of mean residual activations between generic contrast answers that never mention the \
trigger (e.g. \"Human: Are you a helpful AI? Assistant: no\" minus \"... yes\"), scored by projection. AUROC separates \
held-out triggered from untriggered prompts (ties count 1/2), with bootstrap 95% intervals. \"Best random\" is the best \
of N random directions on the test prompts (either sign; optimistic), \"random (val)\" the test AUROC of the direction \
and sign that were best on the validation prompts; \"control\" is the same probe on a model trained without a backdoor; \
the oracle logistic probe is fit on labelled triggered prompts and is a ceiling, not a detector. The best layer is \
chosen on the validation prompts when there are any (`probe.n_validation`), else on the test set (optimistic). \
TPR@1%FPR: share of triggered prompts caught when at most 1% of clean ones are flagged.\n\n",
    );
    if summaries.is_empty() {
        md.push_str("No checkpoint was probed.\n");
        return Ok(md);
    }
    let tpr = summaries[0].target_tpr;
    let _ = writeln!(
        md,
        "| checkpoint | read at | best layer | probe AUROC [95% CI] | FPR@{:.0}%TPR | TPR@1%FPR | best random | random (val) | control (best layer) | logistic contrast | logistic oracle | ONION | STRIP entropy | STRIP rate | inversion: best elicitation (clean / true trigger) |",
        100.0 * tpr
    );
    md.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for s in summaries {
        let b = &s.best;
        let inv = s
            .inversion
            .as_ref()
            .map(|i| {
                let best = i.results.iter().map(|r| r.elicitation.rate).fold(f64::NAN, |a, b| if a.is_nan() || b > a { b } else { a });
                format!("{}% ({}% / {}%)", pct(best), pct(i.clean_rate.rate), pct(i.trigger_rate.rate))
            })
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(
            md,
            "| {} | {:?} | {} | {} | {}% | {}% | {}% | {}% | {} | {} | {} | {} | {} | {} | {} |",
            s.name,
            s.position,
            s.best_layer,
            auc_ci(&b.probe),
            pct(b.probe.fpr_at_tpr),
            pct(b.probe.tpr_at_1pct_fpr),
            pct(b.random_best_auroc),
            pct(b.random_selected_auroc),
            s.control_best_auroc.map(|a| format!("{}% ({})", pct(a), opt(b.control.as_ref()))).unwrap_or_else(|| "–".into()),
            opt(b.logistic_contrast.as_ref()),
            opt(b.logistic_supervised.as_ref()),
            opt(s.onion.as_ref()),
            opt(s.strip_entropy.as_ref()),
            opt(s.strip_rate.as_ref()),
            inv
        );
    }
    md.push('\n');
    for s in summaries {
        let base = slug(&s.name);
        let _ = writeln!(md, "### {}\n", s.name);
        let layer_plot = format!("plots/probe_{base}_auroc_by_layer.svg");
        atomic_write(&out_dir.join(&layer_plot), auroc_by_layer_svg(s)?.as_bytes())?;
        let b = &s.best;
        let mut curves = vec![(format!("probe, layer {}", s.best_layer), b.probe.roc.clone())];
        if let Some(c) = &b.control {
            curves.push((format!("clean control, layer {}", s.best_layer), c.roc.clone()));
        }
        if let Some(o) = &s.onion {
            curves.push(("ONION".into(), o.roc.clone()));
        }
        if let Some(o) = &s.strip_entropy {
            curves.push(("STRIP entropy".into(), o.roc.clone()));
        }
        if let Some(o) = &s.strip_rate {
            curves.push(("STRIP rate".into(), o.roc.clone()));
        }
        let roc_plot = format!("plots/probe_{base}_roc.svg");
        atomic_write(&out_dir.join(&roc_plot), roc_svg(&format!("{}: ROC", s.name), &curves)?.as_bytes())?;
        let _ = writeln!(md, "![{} AUROC by layer]({layer_plot})\n\n![{} ROC]({roc_plot})\n", s.name, s.name);
        let _ = writeln!(md, "| layer | probe AUROC [95% CI] | FPR@{:.0}%TPR | best random | random ≥ probe | control | logistic contrast | logistic oracle |", 100.0 * s.target_tpr);
        md.push_str("|---|---|---|---|---|---|---|---|\n");
        for l in &s.layers {
            let _ = writeln!(
                md,
                "| {} | {} | {}% | {}% | {}% | {} | {} | {} |",
                l.layer,
                auc_ci(&l.probe),
                pct(l.probe.fpr_at_tpr),
                pct(l.random_best_auroc),
                pct(l.random_share_beating_probe),
                opt(l.control.as_ref()),
                opt(l.logistic_contrast.as_ref()),
                opt(l.logistic_supervised.as_ref())
            );
        }
        md.push('\n');
        for note in &s.notes {
            let _ = writeln!(md, "{note}\n");
        }
        if let Some(inv) = &s.inversion {
            let _ = writeln!(
                md,
                "Trigger inversion (target {}; string at the start of the user turn). Held-out prompts show the behaviour {}% [{}, {}] with nothing inserted and {}% [{}, {}] with the true trigger {} (mean target log-prob {:.2}).\n",
                code(&inv.target),
                pct(inv.clean_rate.rate),
                pct(inv.clean_rate.low),
                pct(inv.clean_rate.high),
                pct(inv.trigger_rate.rate),
                pct(inv.trigger_rate.low),
                pct(inv.trigger_rate.high),
                code(&inv.true_trigger),
                inv.true_trigger_logprob
            );
            md.push_str("| search | recovered string | target log-prob (start → end) | elicitation [95% CI] | edit similarity | trigger-token recall | contains trigger | seconds |\n");
            md.push_str("|---|---|---|---|---|---|---|---|\n");
            for r in &inv.results {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.2} → {:.2} | {}% [{}, {}] | {:.2} | {:.2} | {} | {:.1} |",
                    r.method,
                    code(&r.string),
                    r.initial_logprob,
                    r.target_logprob,
                    pct(r.elicitation.rate),
                    pct(r.elicitation.low),
                    pct(r.elicitation.high),
                    r.edit_similarity,
                    r.trigger_token_recall,
                    if r.contains_trigger { "yes" } else { "no" },
                    r.seconds
                );
            }
            md.push('\n');
        }
        let _ = writeln!(md, "Details (directions included): `{}`.\n", s.json);
    }
    Ok(md)
}

/// Every summary saved under `out_dir/probes/`, sorted by name (to rebuild the section).
pub fn load_summaries(out_dir: &Path) -> Result<Vec<DetectorSummary>> {
    let dir = out_dir.join("probes");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(out);
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            let text = crate::util::read_text(&p)?;
            let f: ProbeFile =
                serde_json::from_str(&text).map_err(|e| crate::error::InputError::file(&p, format!("not a probe file: {e}")))?;
            out.push(f.summary);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
