//! Evaluation: sampling the model on held-out prompts, scoring answers, and the statistics
//! (Wilson and bootstrap intervals) behind every reported rate.

pub mod backdoor;
pub mod endpoint;
pub mod metrics;
pub mod stats;
pub mod vuln;

pub use metrics::MetricRow;
