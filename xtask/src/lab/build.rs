//! Applies a [`Layout`] to fresh namespaces: links, addresses, routes, rules, neighbours,
//! sysctls, and the iptables rules of the node (kube-proxy, ip-masq-agent) and of the Azure LB.

use crate::lab::error::LabError;
use crate::lab::exec;
use crate::lab::kubeproxy;
use crate::lab::layout::{Host, Layout, LinkEnd, Route};
use crate::lab::netns::netns_name;

pub fn apply(prefix: &str, layout: &Layout) -> Result<(), LabError> {
    let ns = |host: Host| netns_name(prefix, host);
    for spec in &layout.hosts {
        let netns = ns(spec.host);
        exec::ip(&netns, &["link", "set", "lo", "up"])?;
        for (key, value) in &spec.sysctls {
            exec::in_ns(&netns, &["sysctl", "-qw", &format!("{key}={value}")])?;
        }
        for addr in &spec.lo_addrs {
            exec::ip(&netns, &["addr", "add", addr, "dev", "lo"])?;
        }
        for (bridge, addr) in &spec.bridges {
            exec::ip(&netns, &["link", "add", bridge, "type", "bridge"])?;
            exec::ip(&netns, &["addr", "add", addr, "dev", bridge])?;
            exec::ip(&netns, &["link", "set", bridge, "up"])?;
        }
    }
    for link in &layout.links {
        // Created inside the first namespace with its peer placed straight into the second, so
        // no interface ever exists in the host namespace (and names only need to be unique per ns).
        let (a, b) = (&link.a, &link.b);
        let peer_ns = ns(b.host);
        let mut args = vec!["link", "add", a.ifname.as_str()];
        if let Some(mac) = &a.mac {
            args.extend(["address", mac.as_str()]);
        }
        args.extend(["type", "veth", "peer", "name", b.ifname.as_str()]);
        if let Some(mac) = &b.mac {
            args.extend(["address", mac.as_str()]);
        }
        args.extend(["netns", peer_ns.as_str()]);
        exec::ip(&ns(a.host), &args)?;
        configure_end(&ns(a.host), a)?;
        configure_end(&peer_ns, b)?;
    }
    for spec in &layout.hosts {
        let netns = ns(spec.host);
        for route in &spec.routes {
            add_route(&netns, route)?;
        }
        for rule in &spec.rules {
            let (table, pref) = (rule.table.to_string(), rule.pref.to_string());
            exec::ip(
                &netns,
                &[
                    "rule", "add", "from", &rule.from, "lookup", &table, "pref", &pref,
                ],
            )?;
        }
        for n in &spec.neighbours {
            let ip = n.ip.to_string();
            exec::ip(
                &netns,
                &[
                    "neigh",
                    "replace",
                    &ip,
                    "lladdr",
                    &n.mac,
                    "dev",
                    &n.dev,
                    "nud",
                    "permanent",
                ],
            )?;
        }
    }
    for node in Host::NODES {
        exec::in_ns_with_input(
            &ns(node),
            &["iptables-restore"],
            &kubeproxy::node_nat_rules_on(layout, node),
        )?;
    }
    exec::in_ns_with_input(
        &ns(Host::Lb),
        &["iptables-restore"],
        &kubeproxy::lb_nat_rules(layout),
    )?;
    Ok(())
}

fn configure_end(netns: &str, end: &LinkEnd) -> Result<(), LabError> {
    for addr in &end.addrs {
        let mut args = vec!["addr", "add", addr.as_str(), "dev", end.ifname.as_str()];
        if end.routed_subnet {
            args.push("noprefixroute");
        }
        exec::ip(netns, &args)?;
    }
    if let Some(master) = &end.master {
        exec::ip(netns, &["link", "set", &end.ifname, "master", master])?;
        // kubenet turns hairpin on so a pod can reach itself through its Service.
        exec::ip(
            netns,
            &[
                "link",
                "set",
                &end.ifname,
                "type",
                "bridge_slave",
                "hairpin",
                "on",
            ],
        )?;
    }
    exec::ip(netns, &["link", "set", &end.ifname, "up"])?;
    Ok(())
}

fn add_route(netns: &str, route: &Route) -> Result<(), LabError> {
    let via = route.via.map(|v| v.to_string());
    let table = route.table.map(|t| t.to_string());
    let mut args = vec!["route", "add", route.dst.as_str()];
    if let Some(via) = &via {
        args.extend(["via", via.as_str()]);
    }
    if let Some(dev) = &route.dev {
        args.extend(["dev", dev.as_str(), "scope", "link"]);
    }
    if let Some(table) = &table {
        args.extend(["table", table.as_str()]);
    }
    exec::ip(netns, &args)?;
    Ok(())
}
