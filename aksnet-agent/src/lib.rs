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

/// An error and its causes on one line, each said once: a cause whose text the line already
/// holds (an error that quotes its own source) is not repeated.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot start")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("reading x: {0}")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn error_chain_says_each_cause_once() {
        let err = Outer(Inner(std::io::Error::from_raw_os_error(libc::ENOENT)));
        assert_eq!(
            super::error_chain(&err),
            "cannot start: reading x: No such file or directory (os error 2)"
        );
    }
}
