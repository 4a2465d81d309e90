//! Outputs: what a person reads (`--dump`, `explain`). Metrics live in `crate::metrics`.

pub mod dump;
pub mod explain;
