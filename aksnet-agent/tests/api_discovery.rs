//! The topology's facts from the Kubernetes API, against recorded API responses: the API
//! server's address (the `kubernetes` Service's EndpointSlices), the Service CIDRs (`ServiceCIDR`
//! objects) and this node's pod CIDRs (`Node.spec.podCIDRs`). No API server can run here: the
//! fake API of `aksnet_tests::kubeapi` replays the responses on loopback.

use aksnet_agent::enrich::cluster::cluster_layer;
use aksnet_agent::topology::Cidr;
use aksnet_tests::kubeapi::{KubeApi, Route};
use std::net::{IpAddr, SocketAddr};

const NODE: &str = "aks-nodepool1-00000000-vmss000000";
const SLICES: &str = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices";
const SERVICE_CIDRS: &str = "/apis/networking.k8s.io/v1/servicecidrs";

/// A public cluster's API server, as `kubectl get endpointslices -n default -o json` lists it.
const SLICES_LIST: &str = r#"{"kind":"EndpointSliceList","apiVersion":"discovery.k8s.io/v1","metadata":{"resourceVersion":"104211"},"items":[{"metadata":{"name":"kubernetes","namespace":"default","resourceVersion":"100","labels":{"kubernetes.io/service-name":"kubernetes","endpointslice.kubernetes.io/managed-by":"endpointslice-controller.k8s.io"}},"addressType":"IPv4","endpoints":[{"addresses":["198.51.100.50"],"conditions":{"ready":true}}],"ports":[{"name":"https","port":443,"protocol":"TCP"}]}]}"#;
/// A dual-stack cluster's ServiceCIDR (Kubernetes 1.33).
const SERVICE_CIDRS_LIST: &str = r#"{"kind":"ServiceCIDRList","apiVersion":"networking.k8s.io/v1","metadata":{"resourceVersion":"104211"},"items":[{"metadata":{"name":"kubernetes","resourceVersion":"10"},"spec":{"cidrs":["10.0.0.0/16","fd12:3456:789a:1::/108"]},"status":{"conditions":[{"type":"Ready","status":"True","lastTransitionTime":"2026-11-26T13:00:00Z","reason":"","message":""}]}}]}"#;
const NODE_GET: &str = r#"{"kind":"Node","apiVersion":"v1","metadata":{"name":"aks-nodepool1-00000000-vmss000000","resourceVersion":"104200"},"spec":{"podCIDR":"10.244.0.0/24","podCIDRs":["10.244.0.0/24","fd00:10:244::/64"],"providerID":"azure:///subscriptions/0/resourceGroups/mc_rg/providers/Microsoft.Compute/virtualMachineScaleSets/aks-nodepool1-00000000-vmss/virtualMachines/0"}}"#;

fn client(addr: SocketAddr) -> kube::Client {
    let url = format!("http://{addr}").parse().unwrap();
    kube::Client::try_from(kube::Config::new(url)).unwrap()
}

fn cidrs(s: &[&str]) -> Option<Vec<Cidr>> {
    Some(s.iter().map(|c| c.parse().unwrap()).collect())
}

#[tokio::test]
async fn api_server_service_cidrs_and_node_pod_cidrs() {
    let api = KubeApi::start(vec![
        Route::list(SLICES, SLICES_LIST.into()),
        Route::list(SERVICE_CIDRS, SERVICE_CIDRS_LIST.into()),
        Route::list(&format!("/api/v1/nodes/{NODE}"), NODE_GET.into()),
    ])
    .unwrap();
    let (layer, notes) = cluster_layer(client(api.addr()), Some(NODE)).await;
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(
        layer.api_server,
        Some(vec!["198.51.100.50".parse::<IpAddr>().unwrap()])
    );
    assert_eq!(
        layer.service_cidr,
        cidrs(&["10.0.0.0/16", "fd12:3456:789a:1::/108"])
    );
    assert_eq!(
        layer.node_pod_cidrs,
        cidrs(&["10.244.0.0/24", "fd00:10:244::/64"])
    );
    assert_eq!(layer.node_name.as_deref(), Some(NODE));
    // Only the `kubernetes` Service's slices are asked for.
    let requests = api.requests();
    assert!(
        requests.iter().any(|r| r.starts_with(SLICES)
            && r.contains("labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes")),
        "{requests:?}"
    );
}

/// An older cluster has no ServiceCIDR API, and the node may not be readable: notes, and the
/// facts are left to other sources.
#[tokio::test]
async fn what_the_api_cannot_answer_is_a_note() {
    let api = KubeApi::start(vec![Route::list(SLICES, SLICES_LIST.into())]).unwrap();
    let (layer, notes) = cluster_layer(client(api.addr()), Some(NODE)).await;
    assert!(layer.api_server.is_some());
    assert_eq!((layer.service_cidr, layer.node_pod_cidrs), (None, None));
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(
        notes[0].contains("ServiceCIDRs") && notes[0].contains("1.33"),
        "{notes:?}"
    );
    assert!(
        notes[1].contains("this node's pod CIDR is unknown"),
        "{notes:?}"
    );
    let (_, notes) = cluster_layer(client(api.addr()), None).await;
    assert!(notes.iter().any(|n| n.contains("NODE_NAME")), "{notes:?}");
}
