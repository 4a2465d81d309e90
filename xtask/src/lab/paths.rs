//! The traffic-path names the lab expects the classifier to give each conntrack entry. One list,
//! so it can be aligned with the classifier's path ids in one place.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PathId {
    /// Internet → Azure LB (floating IP) → node DNAT → pod, TCP.
    LbInbound,
    /// The same for UDP.
    LbInboundUdp,
    /// Azure LB health probe from 168.63.129.16 to a nodePort / healthCheckNodePort.
    LbHealthProbe,
    /// In-cluster L7 ingress, first leg: LB → node DNAT → ingress pod.
    L7Ingress,
    /// In-cluster L7 ingress, second leg: the ingress pod → the upstream pod's endpoint IP, a
    /// connection of its own ("proxied by" the ingress pod, never one flow with the first).
    L7IngressUpstream,
    /// Application Gateway (AGIC) → pod IP, no NAT on the node.
    AgicInbound,
    /// Application Gateway → node NodePort → DNAT (backend pool set up by hand, kubenet).
    AgicNodePort,
    /// A vnet client to a pod (azure-cni: pod IP; kubenet and Overlay: node IP + NodePort; every
    /// CNI: an internal LB frontend, floating IP). Clients in declared private ranges (peered
    /// vnets, on-premises) take the same path, without the LB.
    VnetClientToPod,
    /// Pod → internet: node MASQUERADE, then the LB's outbound SNAT off the node.
    PodToInternet,
    /// Pod → another vnet address.
    PodToVnet,
    /// Pod → private endpoint (resolved through the privatelink zone).
    PodToPrivateEndpoint,
    /// Pod → a ClusterIP Service (here: the pod's DNS query to kube-dns). Not in the list.
    PodToService,
    /// Pod (CoreDNS) → Azure DNS 168.63.129.16, masqueraded to the node IP. Not in the list.
    PodToAzureDns,
    /// Application Gateway for Containers → pod IP from its delegated subnet, no NAT on the node
    /// (azure-cni and Overlay only).
    AgcInbound,
    /// Pod → pod with no NAT; here the second node's view of a ClusterIP connection the first
    /// node DNATed to a pod on the second (the source is a pod on another node).
    PodToPod,
    /// Pod → the API server through the `kubernetes` Service: DNAT to the endpoint of
    /// `default/kubernetes`, which is no pod; MASQUERADE to the node IP unless azure-cni keeps
    /// the pod IP towards a private API server in the vnet.
    PodToApiServer,
    /// Pod → IMDS 169.254.169.254: ip-masq-agent masquerades link-local (masqLinkLocal) to the
    /// node IP.
    PodToImds,
    /// A vnet address → the node IP itself (kubelet :10250, hostNetwork pods), no NAT.
    VnetToNode,
    /// The leg another node forwarded here: eTP Cluster LB or NodePort traffic the first node
    /// DNATed to a pod on this node and MASQUERADEd to its own IP: node IP → pod, no NAT here.
    ForwardedByNode,
}

impl PathId {
    pub const ALL: [PathId; 19] = [
        PathId::LbInbound,
        PathId::LbInboundUdp,
        PathId::LbHealthProbe,
        PathId::L7Ingress,
        PathId::L7IngressUpstream,
        PathId::AgicInbound,
        PathId::AgicNodePort,
        PathId::VnetClientToPod,
        PathId::PodToInternet,
        PathId::PodToVnet,
        PathId::PodToPrivateEndpoint,
        PathId::PodToService,
        PathId::PodToAzureDns,
        PathId::AgcInbound,
        PathId::PodToPod,
        PathId::PodToApiServer,
        PathId::PodToImds,
        PathId::VnetToNode,
        PathId::ForwardedByNode,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PathId::LbInbound => "lb-inbound",
            PathId::LbInboundUdp => "lb-inbound-udp",
            PathId::LbHealthProbe => "lb-health-probe",
            PathId::L7Ingress => "l7-ingress",
            PathId::L7IngressUpstream => "l7-ingress-upstream",
            PathId::AgicInbound => "agic-inbound",
            PathId::AgicNodePort => "agic-nodeport",
            PathId::VnetClientToPod => "vnet-client-to-pod",
            PathId::PodToInternet => "pod-to-internet",
            PathId::PodToVnet => "pod-to-vnet",
            PathId::PodToPrivateEndpoint => "pod-to-private-endpoint",
            PathId::PodToService => "pod-to-service",
            PathId::PodToAzureDns => "pod-to-azure-dns",
            PathId::AgcInbound => "agc-inbound",
            PathId::PodToPod => "pod-to-pod",
            PathId::PodToApiServer => "pod-to-api-server",
            PathId::PodToImds => "pod-to-imds",
            PathId::VnetToNode => "vnet-to-node",
            PathId::ForwardedByNode => "forwarded-by-node",
        }
    }
}

impl fmt::Display for PathId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
