//! What the components that talk to the API server share: the client, the watch settings,
//! and the task that drives a watch.

use std::pin::pin;

use anyhow::Context as _;
use futures::{Stream, StreamExt};
use kube::runtime::watcher;
use tracing::{error, warn};

/// A client of the cluster the process runs in (its service account), or of `KUBECONFIG`.
pub async fn client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default()
        .await
        .context("cannot configure a Kubernetes client (in-cluster service account or KUBECONFIG)")
}

/// Watch settings: lists are answered from the API server's watch cache
/// (`resourceVersion=0`), whole: the server ignores paging for such lists, and kube drops
/// `resourceVersion=0` when paging.
pub fn watch_config() -> watcher::Config {
    watcher::Config {
        page_size: None,
        ..watcher::Config::default().any_semantic()
    }
}

/// Drives a (reflected, backed-off) watch until the process ends: `changed` after every
/// change once the first list is complete, `failed` after every error (each is retried with
/// backoff, and a store keeps its contents meanwhile).
pub fn spawn_watch<K: Send + 'static>(
    resource: &'static str,
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    changed: impl Fn() + Send + 'static,
    failed: impl Fn() + Send + 'static,
) {
    tokio::spawn(async move {
        let mut stream = pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(_) => changed(),
                Err(error) => {
                    failed();
                    warn!(resource, %error, "watch failed; retrying with backoff");
                }
            }
        }
        error!(resource, "watch stream ended");
    });
}
