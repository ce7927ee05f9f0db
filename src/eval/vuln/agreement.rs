//! How often two analyzers agree on "flagged one of the eight CWEs or not": counts, percent
//! agreement and Cohen's kappa.

use serde::Serialize;

use super::analyzer::Analysis;
use super::tools::ToolStatus;

/// Two analyzers' flagged / not-flagged verdicts over the samples both ran on.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Agreement {
    pub a: String,
    pub b: String,
    pub n: u64,
    pub both: u64,
    pub only_a: u64,
    pub only_b: u64,
    pub neither: u64,
}

impl Agreement {
    pub fn compute(a: &str, b: &str, analyses: &[Analysis]) -> Agreement {
        let mut g = Agreement { a: a.into(), b: b.into(), ..Default::default() };
        for x in analyses.iter().filter(|x| x.analyzers.iter().any(|n| n == a) && x.analyzers.iter().any(|n| n == b)) {
            g.n += 1;
            match (x.flagged_by(a), x.flagged_by(b)) {
                (true, true) => g.both += 1,
                (true, false) => g.only_a += 1,
                (false, true) => g.only_b += 1,
                (false, false) => g.neither += 1,
            }
        }
        g
    }

    pub fn agree(&self) -> u64 {
        self.both + self.neither
    }

    pub fn percent(&self) -> Option<f64> {
        (self.n > 0).then(|| 100.0 * self.agree() as f64 / self.n as f64)
    }

    /// Cohen's kappa; `None` when it is undefined (no samples, or both analyzers gave one
    /// and the same verdict to everything).
    pub fn kappa(&self) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let n = self.n as f64;
        let po = self.agree() as f64 / n;
        let pa = (self.both + self.only_a) as f64 / n;
        let pb = (self.both + self.only_b) as f64 / n;
        let pe = pa * pb + (1.0 - pa) * (1.0 - pb);
        ((1.0 - pe).abs() > 1e-12).then(|| (po - pe) / (1.0 - pe))
    }
}

/// All pairwise agreements among the analyzers that ran.
pub fn agreements(analyses: &[Analysis], statuses: &[ToolStatus]) -> Vec<Agreement> {
    let ran: Vec<&str> = statuses.iter().filter(|s| s.status == "ran").map(|s| s.analyzer.as_str()).collect();
    let mut out = Vec::new();
    for i in 0..ran.len() {
        for j in i + 1..ran.len() {
            out.push(Agreement::compute(ran[i], ran[j], analyses));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kappa() {
        let g = Agreement { n: 10, both: 4, neither: 4, only_a: 1, only_b: 1, ..Default::default() };
        assert!((g.kappa().unwrap_or(0.0) - 0.6).abs() < 1e-9);
        let all_clean = Agreement { n: 5, neither: 5, ..Default::default() };
        assert_eq!(all_clean.kappa(), None);
        assert_eq!(all_clean.percent(), Some(100.0));
    }
}
