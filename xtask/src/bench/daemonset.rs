//! How `deploy/base/daemonset.yaml` runs the agent, so that the bench runs it the same way: its
//! CPU limit (for the capped runs) and its environment (for every agent the bench starts).

use crate::bench::cap::CpuLimit;
use crate::bench::error::BenchError;
use crate::file_error::FileError;
use std::path::Path;

pub struct DaemonSet {
    pub limit: CpuLimit,
    /// The container's environment variables with a literal value.
    pub env: Vec<(String, String)>,
}

impl DaemonSet {
    pub fn read(workspace: &Path) -> Result<DaemonSet, BenchError> {
        let path = workspace.join("deploy/base/daemonset.yaml");
        let text = std::fs::read_to_string(&path).map_err(FileError::on("cannot read", &path))?;
        let limit = CpuLimit::parse_manifest(&text).ok_or_else(|| BenchError::Parse {
            what: path.display().to_string(),
            detail: "no `limits:` block with a `cpu:` quantity (like `cpu: 500m`)".into(),
        })?;
        Ok(DaemonSet {
            limit,
            env: parse_env(&text),
        })
    }
}

/// The `name`/`value` pairs of the first `env:` block. Variables whose value comes from the API
/// server (`valueFrom`, like the node's name) are left out: the lab has none.
fn parse_env(text: &str) -> Vec<(String, String)> {
    let indent = |line: &str| line.len() - line.trim_start().len();
    let mut lines = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let Some(block) = lines.by_ref().find(|l| l.trim() == "env:").map(indent) else {
        return Vec::new();
    };
    let unquote = |v: &str| v.trim().trim_matches('"').to_string();
    let mut env = Vec::new();
    // The current item's name and the column of its keys (`- name:` starts an item).
    let mut item: Option<(String, usize)> = None;
    for line in lines.take_while(|l| indent(l) > block) {
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- name:") {
            item = Some((unquote(name), indent(line) + 2));
        } else if let (Some(value), Some((_, column))) = (trimmed.strip_prefix("value:"), &item) {
            if indent(line) == *column {
                let (name, _) = item.take().expect("matched just above");
                env.push((name, unquote(value)));
            }
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_literal_values_and_leaves_out_the_api_servers() {
        let manifest = "      containers:\n        - name: agent\n          env:\n            # why\n            - name: NODE_NAME\n              valueFrom:\n                configMapKeyRef:\n                  name: other\n                  key: node\n            - name: RUST_LOG\n              value: info\n            - name: GLIBC_TUNABLES\n              value: \"glibc.malloc.hugetlb=1\"\n          ports:\n            - name: metrics\n              value: 9965\n";
        assert_eq!(
            parse_env(manifest),
            [
                ("RUST_LOG", "info"),
                ("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
            ]
            .map(|(n, v)| (n.to_string(), v.to_string()))
        );
        assert!(parse_env("containers:\n  - name: agent\n").is_empty());
    }
}
