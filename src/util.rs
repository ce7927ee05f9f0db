//! Small file-system and hashing helpers shared by every stage.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::error::InputError;

/// Write `bytes` to `path` atomically: write a temporary file in the same directory, fsync
/// it, then rename it over the target. A crash leaves either the old file or the new one,
/// never a torn one.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
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
