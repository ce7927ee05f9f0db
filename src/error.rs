//! Error kinds that decide the process exit code.
//!
//! Anything the user handed us that is wrong (a malformed TOML or JSONL file, a missing
//! file, a checkpoint that does not match its config) is an [`InputError`]: the CLI maps it
//! to exit code 2. Everything else (I/O failures while writing, numerical failures) is an
//! ordinary `anyhow::Error` and maps to exit code 1.

use std::path::{Path, PathBuf};

/// Bad input from the user: exit code 2. The message always names the file (and the line
/// when there is one) so the user can fix it.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// A problem on one line of a text file (JSONL, TOML).
    #[error("{}:{line}: {msg}", path.display())]
    Line { path: PathBuf, line: usize, msg: String },
    /// A problem with a whole file (missing, unreadable, not UTF-8, wrong shapes).
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// A bad command-line value or configuration value not tied to one file.
    #[error("{0}")]
    Invalid(String),
}

impl InputError {
    pub fn line(path: &Path, line: usize, msg: impl Into<String>) -> Self {
        InputError::Line { path: path.to_path_buf(), line, msg: msg.into() }
    }
    pub fn file(path: &Path, msg: impl Into<String>) -> Self {
        InputError::File { path: path.to_path_buf(), msg: msg.into() }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        InputError::Invalid(msg.into())
    }
}

/// True when any error in the chain is an [`InputError`] (so the CLI exits with 2).
pub fn is_input_error(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.downcast_ref::<InputError>().is_some())
}
