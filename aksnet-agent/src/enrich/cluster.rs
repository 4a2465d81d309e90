//! What the Kubernetes API says about the cluster's addresses, for the topology: the API
//! server's endpoints (the `kubernetes` Service's EndpointSlices in `default`), the Service CIDRs
//! (`ServiceCIDR` objects, Kubernetes 1.33+) and this node's pod CIDRs (`Node.spec.podCIDRs`).
//!
//! One-off reads with read-only RBAC, each bounded by [`API_TIMEOUT`]; what fails is a note
//! and leaves its fact to other sources.

use crate::topology::{Cidr, TopologyLayer};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::ListParams;
use kube::{Api, Client};
use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

/// The longest one API read may take before its fact is left to other sources.
pub const API_TIMEOUT: Duration = Duration::from_secs(5);

/// The label EndpointSlices carry with their Service's name.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Reads the API server's addresses, the Service CIDRs and `node_name`'s pod CIDRs.
pub async fn cluster_layer(
    client: Client,
    node_name: Option<&str>,
) -> (TopologyLayer, Vec<String>) {
    let mut layer = TopologyLayer::default();
    let mut notes = Vec::new();
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), "default");
    let params = ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}=kubernetes"));
    match bounded(
        "the `kubernetes` Service's EndpointSlices",
        slices.list(&params),
    )
    .await
    {
        Ok(list) => {
            let ips = addresses(
                list.items
                    .iter()
                    .flat_map(|s| &s.endpoints)
                    .flat_map(|e| &e.addresses),
            );
            layer.api_server = Some(ips).filter(|v| !v.is_empty());
        }
        Err(e) => notes.push(format!("{e}; the API server's address is unknown")),
    }
    let cidrs = Api::<ServiceCIDR>::all(client.clone());
    match bounded("ServiceCIDRs", cidrs.list(&ListParams::default())).await {
        Ok(list) => {
            let cidrs = prefixes(
                list.items
                    .iter()
                    .filter_map(|c| c.spec.as_ref()?.cidrs.as_ref())
                    .flatten(),
            );
            layer.service_cidr = Some(cidrs).filter(|v| !v.is_empty());
        }
        Err(e) => notes.push(format!(
            "{e} (ServiceCIDR objects exist from Kubernetes 1.33); the Service CIDR comes from \
             ClusterIPs"
        )),
    }
    match node_name {
        Some(name) => {
            let nodes = Api::<Node>::all(client);
            match bounded("this node", nodes.get(name)).await {
                Ok(node) => {
                    let spec = node.spec.unwrap_or_default();
                    let cidrs = match spec.pod_cidrs {
                        Some(list) if !list.is_empty() => prefixes(list.iter()),
                        _ => prefixes(spec.pod_cidr.iter()),
                    };
                    layer.node_pod_cidrs = Some(cidrs).filter(|v| !v.is_empty());
                    layer.node_name = Some(name.to_string());
                }
                Err(e) => notes.push(format!("{e}; this node's pod CIDR is unknown")),
            }
        }
        None => notes.push("NODE_NAME is not set: this node's pod CIDR is not read".into()),
    }
    (layer, notes)
}

/// Awaits one API read for at most [`API_TIMEOUT`]; the error names what was read.
async fn bounded<T>(
    what: &str,
    read: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(API_TIMEOUT, read).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("cannot read {what} from the Kubernetes API: {e}")),
        Err(_) => Err(format!(
            "reading {what} from the Kubernetes API took over {API_TIMEOUT:?}"
        )),
    }
}

/// Distinct addresses, in order; what does not parse is skipped.
fn addresses<'a>(texts: impl Iterator<Item = &'a String>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for ip in texts.filter_map(|t| t.parse().ok()) {
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// Distinct prefixes, in order; what does not parse is skipped.
fn prefixes<'a>(texts: impl Iterator<Item = &'a String>) -> Vec<Cidr> {
    let mut out: Vec<Cidr> = Vec::new();
    for cidr in texts.filter_map(|t| t.parse().ok()) {
        if !out.contains(&cidr) {
            out.push(cidr);
        }
    }
    out
}
