//! Kubernetes enrichment: names the Pod or Service behind an address.
//!
//! Watches the pods of this node (`spec.nodeName=$NODE_NAME`: other nodes' pods never appear in
//! this node's conntrack as local endpoints) and every Service of the cluster (cluster IPs and
//! Azure LB frontends, which any node may receive), and keeps an `IpAddr -> Owner` index that the
//! dump queries per flow. Outside a cluster the enricher is disabled and flows show bare
//! addresses; a lost API connection is retried in the background while flows keep flowing.
//! Its client also reads the cluster's address facts for the topology ([`cluster`]).

pub mod cluster;
mod extract;
mod index;
mod watch;

pub use index::{Owner, OwnerKind};

use crate::events::Proto;
use crate::topology::{Etp, LbFrontend, TopologyLayer};
use index::Index;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::runtime::watcher;
use kube::{Api, Client};
use std::ffi::OsString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once, RwLock, RwLockWriteGuard};
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum EnrichError {
    #[error("the Kubernetes API is configured but NODE_NAME is not set: set it from the downward API (fieldRef spec.nodeName), as deploy/base does")]
    NoNodeName,
    #[error("cannot load the Kubernetes client configuration (in-cluster service account or kubeconfig): {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("cannot build the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error("the enricher must be started inside a Tokio runtime (it spawns its watch tasks)")]
    NoRuntime,
}

/// What [`Enricher::start`] needs.
#[derive(Clone, Debug, Default)]
pub struct EnrichConfig {
    /// This node's name, whose pods are watched; required when an API is configured.
    pub node_name: Option<String>,
}

impl EnrichConfig {
    /// `NODE_NAME`, set by the DaemonSet from the downward API.
    pub fn from_env() -> Self {
        EnrichConfig {
            node_name: std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()),
        }
    }
}

/// Handle on the index. Cheap to clone; the watch tasks stop when the last clone is dropped.
#[derive(Clone)]
pub struct Enricher {
    running: Option<Arc<Running>>,
}

struct Running {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    client: Client,
    node_name: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// State shared between the watch tasks and the handle.
struct Shared {
    index: RwLock<Index>,
    pods_synced: AtomicBool,
    services_synced: AtomicBool,
    /// The first complete sync was logged (relists after an outage are not).
    sync_logged: AtomicBool,
}

impl Shared {
    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().expect("enrichment index poisoned")
    }

    fn mark_synced(&self, kind: OwnerKind) {
        let flag = match kind {
            OwnerKind::Pod => &self.pods_synced,
            OwnerKind::Service => &self.services_synced,
        };
        flag.store(true, Ordering::Relaxed);
        let both = self.pods_synced.load(Ordering::Relaxed)
            && self.services_synced.load(Ordering::Relaxed);
        // Flows captured before this line show bare addresses: tests and operators wait for it.
        if both && !self.sync_logged.swap(true, Ordering::Relaxed) {
            log::info!(
                "kubernetes enrichment synced: this node's pods and the cluster's Services are listed; flows show their names"
            );
        }
    }
}

static NO_API_LOGGED: Once = Once::new();

impl Enricher {
    /// Connects to the API the way kubectl would (kubeconfig, else the pod's service account).
    /// Without either, returns a disabled enricher, which is not an error: the agent also runs on
    /// plain hosts and in the lab.
    pub async fn start(config: EnrichConfig) -> Result<Enricher, EnrichError> {
        match connect(config).await? {
            Some((client, node_name)) => Enricher::start_with_client(client, node_name),
            None => {
                NO_API_LOGGED
                    .call_once(|| log::info!("no Kubernetes API: flows show bare addresses"));
                Ok(Enricher::disabled())
            }
        }
    }

    /// Starts the watches on a given client (tests point it at a recorded API). The first lookups
    /// may miss until [`Enricher::is_synced`].
    pub fn start_with_client(client: Client, node_name: String) -> Result<Enricher, EnrichError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| EnrichError::NoRuntime)?;
        let shared = Arc::new(Shared {
            index: RwLock::new(Index::default()),
            pods_synced: AtomicBool::new(false),
            services_synced: AtomicBool::new(false),
            sync_logged: AtomicBool::new(false),
        });
        let pods = watch::follow(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node_name}")),
            shared.clone(),
        );
        let services = watch::follow(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            shared.clone(),
        );
        let tasks = vec![runtime.spawn(pods), runtime.spawn(services)];
        Ok(Enricher {
            running: Some(Arc::new(Running {
                shared,
                tasks,
                client,
                node_name,
            })),
        })
    }

    /// What the API says about the cluster's addresses ([`cluster::cluster_layer`]); `None`
    /// without an API.
    pub async fn cluster_layer(&self) -> Option<(TopologyLayer, Vec<String>)> {
        let running = self.running.as_ref()?;
        Some(cluster::cluster_layer(running.client.clone(), Some(&running.node_name)).await)
    }

    /// The LB frontends the Services watch knows, as topology facts (no API call).
    pub fn frontends_layer(&self) -> TopologyLayer {
        let frontends: Vec<LbFrontend> = self
            .lb_frontends()
            .into_iter()
            .map(|(ip, service, etp)| LbFrontend {
                ip,
                service: Some(service),
                external_traffic_policy: Some(etp),
            })
            .collect();
        TopologyLayer {
            lb_frontends: Some(frontends).filter(|f| !f.is_empty()),
            ..TopologyLayer::default()
        }
    }

    /// An enricher that knows no names.
    pub fn disabled() -> Enricher {
        Enricher { running: None }
    }

    pub fn is_enabled(&self) -> bool {
        self.running.is_some()
    }

    /// Both initial listings (pods and services) have been loaded.
    pub fn is_synced(&self) -> bool {
        self.running.as_ref().is_some_and(|r| {
            r.shared.pods_synced.load(Ordering::Relaxed)
                && r.shared.services_synced.load(Ordering::Relaxed)
        })
    }

    /// The Pod or Service that owns `ip`. Where several Services share an address (one LB
    /// frontend for TCP and UDP services), the first by namespace/name: use
    /// [`Enricher::lookup_port`] when the port is known.
    pub fn lookup(&self, ip: IpAddr) -> Option<Owner> {
        self.with_index(|index| index.lookup(ip).cloned()).flatten()
    }

    /// The owner of `ip`, preferring the Service that exposes `proto`/`port` on it.
    pub fn lookup_port(&self, ip: IpAddr, proto: Proto, port: u16) -> Option<Owner> {
        self.with_index(|index| index.lookup_port(ip, proto, port).cloned())
            .flatten()
    }

    /// Every LB frontend IP with its `namespace/service` and externalTrafficPolicy, sorted, for
    /// the topology to learn the frontends it was not configured with.
    pub fn lb_frontends(&self) -> Vec<(IpAddr, String, Etp)> {
        self.with_index(Index::lb_frontends).unwrap_or_default()
    }

    fn with_index<T>(&self, f: impl FnOnce(&Index) -> T) -> Option<T> {
        let running = self.running.as_ref()?;
        let index = running
            .shared
            .index
            .read()
            .expect("enrichment index poisoned");
        Some(f(&index))
    }
}

/// A client of the API the way kubectl would find it (kubeconfig, else the pod's service
/// account), and this node's name; `None` where no API is configured.
pub async fn connect(config: EnrichConfig) -> Result<Option<(Client, String)>, EnrichError> {
    if !api_configured(|v| std::env::var_os(v), default_kubeconfig().as_deref()) {
        return Ok(None);
    }
    let node_name = config.node_name.ok_or(EnrichError::NoNodeName)?;
    let client = Client::try_from(kube::Config::infer().await?)?;
    Ok(Some((client, node_name)))
}

/// `~/.kube/config`, where kubectl and kube-rs look without `KUBECONFIG`.
fn default_kubeconfig() -> Option<PathBuf> {
    std::env::home_dir().map(|h| h.join(".kube").join("config"))
}

/// Whether kube-rs could find an API: in a pod (`KUBERNETES_SERVICE_HOST`), or through a
/// kubeconfig (`KUBECONFIG`, or the default file).
fn api_configured(
    var: impl Fn(&str) -> Option<OsString>,
    default_kubeconfig: Option<&Path>,
) -> bool {
    let set = |name| var(name).is_some_and(|v| !v.is_empty());
    set("KUBERNETES_SERVICE_HOST")
        || set("KUBECONFIG")
        || default_kubeconfig.is_some_and(Path::is_file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_is_found_in_a_pod_or_through_a_kubeconfig_only() {
        let none = |_: &str| None;
        let missing = Path::new("/nonexistent/.kube/config");
        assert!(!api_configured(none, Some(missing)));
        assert!(!api_configured(none, None));
        assert!(!api_configured(|_| Some(OsString::new()), Some(missing)));
        let in_pod = |v: &str| (v == "KUBERNETES_SERVICE_HOST").then(|| "10.0.0.1".into());
        assert!(api_configured(in_pod, Some(missing)));
        let kubeconfig = |v: &str| (v == "KUBECONFIG").then(|| "/tmp/kc".into());
        assert!(api_configured(kubeconfig, None));
        let dir = std::env::temp_dir().join(format!("aksnet-enrich-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config");
        std::fs::write(&file, "apiVersion: v1\n").unwrap();
        let found = api_configured(none, Some(&file));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(found);
    }

    #[tokio::test]
    async fn disabled_enricher_answers_nothing() {
        let e = Enricher::disabled();
        assert!(!e.is_enabled() && !e.is_synced());
        assert_eq!(e.lookup("10.244.0.10".parse().unwrap()), None);
        assert!(e.lb_frontends().is_empty());
    }
}
