//! What the components that talk to the API server share: the client, the watch settings,
//! and the task that drives a watch.

use std::pin::pin;

use anyhow::Context as _;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
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

/// For resources with many large objects (Nodes, NodeImages): lists of 100 objects a page,
/// read consistently, so that no list response has to fit in memory whole.
pub fn paged_watch_config() -> watcher::Config {
    watcher::Config {
        page_size: Some(100),
        ..watcher::Config::default()
    }
}

/// A backed-off watch of one ConfigMap, by name (a field selector): the policy ConfigMap.
pub fn configmap_watch(
    client: &kube::Client,
    name: &crate::webhook::ObjectName,
) -> impl Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Send + 'static {
    watcher(
        kube::Api::<ConfigMap>::namespaced(client.clone(), &name.namespace),
        watch_config().fields(&format!("metadata.name={}", name.name)),
    )
    .default_backoff()
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

/// Keeps of a Node what Coral reads: its name, labels, taints and `spec.unschedulable`. Its
/// status (conditions, the images it holds, addresses) and the rest of its metadata go before
/// a reflector stores it, so memory follows the number of nodes, not the size of their status.
pub fn strip_node(node: &mut Node) {
    strip_metadata(&mut node.metadata);
    node.spec = node.spec.take().map(|spec| NodeSpec {
        taints: spec.taints,
        unschedulable: spec.unschedulable,
        ..NodeSpec::default()
    });
    node.status = None;
}

/// The identity of an object's metadata, its labels and its owners; annotations, managed
/// fields and the rest dropped.
pub fn strip_metadata(metadata: &mut ObjectMeta) {
    *metadata = ObjectMeta {
        name: metadata.name.take(),
        namespace: metadata.namespace.take(),
        labels: metadata.labels.take(),
        owner_references: metadata.owner_references.take(),
        resource_version: metadata.resource_version.take(),
        uid: metadata.uid.take(),
        ..ObjectMeta::default()
    };
}
