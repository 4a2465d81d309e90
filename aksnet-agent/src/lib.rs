//! aksnet's node agent. Data flows through the modules in this order:
//!
//! `capture` (kernel programs, netlink) → `events` (decoded conntrack entries) → `flows` (flow
//! table) → `model` (classification against the AKS path models, using `topology`) → outputs
//! (`output` for `--dump` and `explain`, `metrics` for Prometheus). `startup` assembles the
//! topology from its sources and refreshes it beside the event loop.

pub mod capture;
pub mod enrich;
pub mod events;
pub mod flows;
pub mod metrics;
pub mod model;
pub mod output;
pub mod pipeline;
pub mod startup;
pub mod topology;
