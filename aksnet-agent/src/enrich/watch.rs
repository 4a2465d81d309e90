//! One watch task per resource: feeds the index from kube-runtime's watcher, which lists, watches,
//! resumes from the last resourceVersion when a watch breaks, and relists when that is too old.

use super::extract::Indexed;
use super::Shared;
use futures::StreamExt;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::mem;
use std::sync::Arc;

/// Runs until the task is aborted: watcher errors are retried with the watcher's default backoff
/// (0.8 s doubling to 30 s, as client-go does), and lookups answer from the last known state
/// meanwhile.
pub async fn follow<K>(api: Api<K>, config: watcher::Config, shared: Arc<Shared>)
where
    K: Indexed + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    // Objects of a (re)list, applied at once when it completes so that lookups never see half of
    // one.
    let mut listing = Vec::new();
    let mut failing = false;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                // Once per outage: the backoff retries every 30 s at most and would flood the log.
                if !failing {
                    log::warn!(
                        "kubernetes {} watch failed: {e}; retrying with backoff, flows keep their last known names",
                        K::KIND
                    );
                    failing = true;
                }
                continue;
            }
        };
        if mem::take(&mut failing) {
            log::info!("kubernetes {} watch resumed", K::KIND);
        }
        match event {
            Event::Init => listing.clear(),
            Event::InitApply(obj) => listing.push((obj.owner(), obj.record())),
            Event::InitDone => {
                shared
                    .write()
                    .replace_kind(K::KIND, mem::take(&mut listing));
                shared.mark_synced(K::KIND);
            }
            Event::Apply(obj) => shared.write().upsert(obj.owner(), obj.record()),
            Event::Delete(obj) => shared.write().remove(&obj.owner()),
        }
    }
}
