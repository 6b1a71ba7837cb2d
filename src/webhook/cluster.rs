//! Cluster mode: watches on Nodes, Namespaces (metadata only), ImageSets and NodeImages feed
//! the index as events arrive (no store of the objects is kept beside it; of a Node only its
//! labels, taints and `spec.unschedulable` are read), and a reflector holds the policy
//! ConfigMap. A change schedules one rebuild of the snapshot after a short quiet period;
//! requests never rebuild anything.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ObjectReference};
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use thiserror::Error;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use super::Shared;
use crate::api::{ImageSet, Registry};
use crate::index::{ClusterIndex, LiveIndex, WatchedNode, WatchedNodeImage};
use crate::policy::{CompiledPolicies, EvaluatorOptions, PolicyError, PolicySet, Snapshot};

/// Name the webhook records Events under.
const REPORTER: &str = "coral-webhook";

/// Where cluster mode reads from.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The ConfigMap whose policies replace the embedded ones; the embedded policies when `None`.
    pub policies_configmap: Option<ObjectName>,
    /// Quiet period after a change before the snapshot is rebuilt, so that a burst of changes
    /// (a rollout labelling many nodes) costs one rebuild.
    pub debounce: Duration,
    /// This replica's name in the Events it records (its pod name).
    pub instance: String,
}

/// `NAMESPACE/NAME` of a namespaced object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectName {
    pub namespace: String,
    pub name: String,
}

/// A `NAMESPACE/NAME` that cannot name an object.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{input:?} is not NAMESPACE/NAME: {reason}")]
pub struct ObjectNameError {
    input: String,
    reason: &'static str,
}

impl FromStr for ObjectName {
    type Err = ObjectNameError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| ObjectNameError {
            input: input.to_string(),
            reason,
        };
        let (namespace, name) = input
            .split_once('/')
            .ok_or_else(|| invalid("expected one '/'"))?;
        if namespace.is_empty() || name.is_empty() || name.contains('/') {
            return Err(invalid("expected one '/' between two non-empty names"));
        }
        if namespace.len() > 63 || !is_dns_name(namespace, false) {
            return Err(invalid(
                "the namespace must be a DNS label: at most 63 lower-case letters, digits and '-'",
            ));
        }
        if name.len() > 253 || !is_dns_name(name, true) {
            return Err(invalid(
                "the name must be a DNS subdomain: lower-case letters, digits, '-' and '.'",
            ));
        }
        Ok(Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        })
    }
}

fn is_dns_name(text: &str, dots: bool) -> bool {
    let alphanumeric = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    text.starts_with(alphanumeric)
        && text.ends_with(alphanumeric)
        && text
            .chars()
            .all(|c| alphanumeric(c) || c == '-' || (dots && c == '.'))
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What happened to the policies in one rebuild.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PolicyChange {
    /// Same policies as before.
    Unchanged,
    /// The ConfigMap's policies compiled and now serve.
    Loaded { configmap: ObjectReference },
    /// The ConfigMap's policies do not compile; the last good ones keep serving.
    Rejected {
        configmap: ObjectReference,
        error: String,
    },
    /// There is no policy ConfigMap (any more): the embedded policies serve.
    Embedded,
}

/// The policies in use and the ConfigMap version they were last checked against. Pure: it is
/// given the ConfigMap as the reflector holds it.
pub(crate) struct PolicyTracker {
    configmap: Option<ObjectName>,
    embedded: CompiledPolicies,
    current: CompiledPolicies,
    /// Whether `current` came from the ConfigMap.
    from_configmap: bool,
    /// `uid/resourceVersion` of the ConfigMap last looked at (`None` inside: absent);
    /// `None`: never looked.
    seen: Option<Option<String>>,
}

impl PolicyTracker {
    pub fn new(configmap: Option<ObjectName>) -> Result<Self, PolicyError> {
        let embedded = CompiledPolicies::compile(&PolicySet::embedded())?;
        Ok(Self {
            configmap,
            current: embedded.clone(),
            embedded,
            from_configmap: false,
            seen: None,
        })
    }

    /// Builds the snapshot of `index` with the ConfigMap's policies when they are new and
    /// usable, and with the last good policies otherwise.
    pub fn build(
        &mut self,
        configmap: Option<&ConfigMap>,
        index: ClusterIndex,
        options: &EvaluatorOptions,
    ) -> (Result<Snapshot, PolicyError>, PolicyChange) {
        let configmap = configmap.filter(|_| self.configmap.is_some());
        let version = configmap.map(|c| {
            format!(
                "{}/{}",
                c.metadata.uid.as_deref().unwrap_or_default(),
                c.metadata.resource_version.as_deref().unwrap_or_default()
            )
        });
        if self.seen.as_ref() == Some(&version) {
            return (
                Snapshot::new(&self.current, index, None, options.clone()),
                PolicyChange::Unchanged,
            );
        }
        let first = self.seen.is_none();
        self.seen = Some(version);
        let (Some(configmap), Some(name)) = (configmap, &self.configmap) else {
            let change = if first || self.from_configmap {
                self.current = self.embedded.clone();
                self.from_configmap = false;
                PolicyChange::Embedded
            } else {
                PolicyChange::Unchanged
            };
            return (
                Snapshot::new(&self.current, index, None, options.clone()),
                change,
            );
        };
        let reference = configmap.object_ref(&());
        let candidate = PolicySet::from_configmap(configmap, &format!("configmap {name}"))
            .and_then(|set| CompiledPolicies::compile(&set))
            .and_then(|compiled| {
                let snapshot = Snapshot::new(&compiled, index.clone(), None, options.clone())?;
                snapshot.probe()?;
                Ok((compiled, snapshot))
            });
        match candidate {
            Ok((compiled, snapshot)) => {
                self.current = compiled;
                self.from_configmap = true;
                (
                    Ok(snapshot),
                    PolicyChange::Loaded {
                        configmap: reference,
                    },
                )
            }
            Err(error) => (
                Snapshot::new(&self.current, index, None, options.clone()),
                PolicyChange::Rejected {
                    configmap: reference,
                    error: error.to_string(),
                },
            ),
        }
    }
}

/// The cluster as the webhook reads it: watches feeding an index directly (nothing of the
/// watched objects is kept beside it), and the policy ConfigMap's reflector.
struct Feeds {
    live: Arc<Mutex<LiveIndex>>,
    /// Notified when a watch completes a list.
    listed: Arc<Notify>,
    configmap: Option<Store<ConfigMap>>,
}

impl Feeds {
    /// Starts one watch per resource; each notifies `changed` after it applies a change.
    fn start(
        client: &Client,
        configmap: Option<&ObjectName>,
        changed: &Arc<Notify>,
        shared: &Arc<Shared>,
    ) -> Self {
        let feeds = Self {
            live: Arc::new(Mutex::new(LiveIndex::new())),
            listed: Arc::new(Notify::new()),
            configmap: None,
        };
        let config = crate::cluster::watch_config;
        // Nodes and NodeImages are many and large (a Node's status lists the images the
        // kubelet reports): listed in pages, so that a list never has to fit in memory whole.
        let paged = crate::cluster::paged_watch_config;
        feeds.spawn(
            "imagesets",
            watcher(Api::<ImageSet>::all(client.clone()), config()).default_backoff(),
            LiveIndex::image_set,
            changed,
            shared,
        );
        feeds.spawn(
            "nodes",
            watcher(Api::<WatchedNode>::all(client.clone()), paged()).default_backoff(),
            LiveIndex::node,
            changed,
            shared,
        );
        feeds.spawn(
            "namespaces",
            watcher(
                Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
                config(),
            )
            .default_backoff(),
            LiveIndex::namespace,
            changed,
            shared,
        );
        feeds.spawn(
            "nodeimages",
            watcher(Api::<WatchedNodeImage>::all(client.clone()), paged()).default_backoff(),
            LiveIndex::node_image,
            changed,
            shared,
        );
        feeds.spawn(
            "registries",
            watcher(Api::<Registry>::all(client.clone()), config()).default_backoff(),
            LiveIndex::registry,
            changed,
            shared,
        );
        let configmap = configmap.map(|name| {
            let (store, writer) = reflector::store();
            spawn_reflector(
                "configmaps",
                crate::cluster::configmap_watch(client, name).reflect(writer),
                changed,
                shared,
            );
            store
        });
        Self { configmap, ..feeds }
    }

    /// Drives one watch into the index: a change schedules a rebuild, an error is counted.
    fn spawn<K: Send + 'static>(
        &self,
        resource: &'static str,
        stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
        feed: fn(&mut LiveIndex, watcher::Event<K>) -> bool,
        changed: &Arc<Notify>,
        shared: &Arc<Shared>,
    ) {
        let (live, listed, changed, shared) = (
            self.live.clone(),
            self.listed.clone(),
            changed.clone(),
            shared.clone(),
        );
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let event = match event {
                    Ok(event) => event,
                    Err(error) => {
                        shared
                            .metrics
                            .watch_errors
                            .with_label_values(&[resource])
                            .inc();
                        warn!(resource, %error, "watch failed; retrying with backoff");
                        continue;
                    }
                };
                let list_done = matches!(event, watcher::Event::InitDone);
                // A panic in an earlier event leaves an index that is still consistent.
                let applied = feed(
                    &mut live.lock().unwrap_or_else(PoisonError::into_inner),
                    event,
                );
                if list_done {
                    listed.notify_one();
                }
                if applied {
                    changed.notify_one();
                }
            }
            error!(resource, "watch stream ended");
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LiveIndex> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until every watch has listed once.
    async fn wait_until_ready(&self) -> bool {
        while !self.lock().listed() {
            self.listed.notified().await;
        }
        match &self.configmap {
            Some(store) => store.wait_until_ready().await.is_ok(),
            None => true,
        }
    }
}

/// Drives one reflector: a change schedules a rebuild, an error is counted.
fn spawn_reflector<K: Send + 'static>(
    resource: &'static str,
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    changed: &Arc<Notify>,
    shared: &Arc<Shared>,
) {
    let changed = changed.clone();
    let shared = shared.clone();
    crate::cluster::spawn_watch(
        resource,
        stream,
        move || changed.notify_one(),
        move || {
            shared
                .metrics
                .watch_errors
                .with_label_values(&[resource])
                .inc();
        },
    );
}

/// Keeps the shared snapshot in step with the cluster until the process ends.
pub(crate) async fn sync(
    client: Client,
    options: ClusterOptions,
    evaluator: EvaluatorOptions,
    shared: Arc<Shared>,
) {
    let changed = Arc::new(Notify::new());
    let listing = std::time::Instant::now();
    let stores = Feeds::start(
        &client,
        options.policies_configmap.as_ref(),
        &changed,
        &shared,
    );
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: REPORTER.to_string(),
            instance: Some(options.instance.clone()),
        },
    );
    let tracker = match PolicyTracker::new(options.policies_configmap.clone()) {
        Ok(tracker) => Arc::new(Mutex::new(tracker)),
        Err(error) => {
            error!(%error, "the embedded policies do not compile");
            return;
        }
    };
    let mut first_ready_logged = false;
    if !stores.wait_until_ready().await {
        error!("a cluster watch stopped before its first list");
        return;
    }
    info!(
        seconds = listing.elapsed().as_secs_f64(),
        "cluster state listed"
    );
    loop {
        rebuild(&stores, &tracker, &evaluator, &shared, &recorder).await;
        if shared.synced.load(Ordering::SeqCst) && !first_ready_logged {
            first_ready_logged = true;
            info!(
                seconds = listing.elapsed().as_secs_f64(),
                "ready: first snapshot built since the first list began"
            );
        }
        changed.notified().await;
        tokio::time::sleep(options.debounce).await;
    }
}

/// Builds a snapshot from the stores off the async threads, installs it, and reports what
/// happened to the policies.
async fn rebuild(
    stores: &Feeds,
    tracker: &Arc<Mutex<PolicyTracker>>,
    evaluator: &EvaluatorOptions,
    shared: &Shared,
    recorder: &Recorder,
) {
    let index = stores.lock().index();
    let configmap = stores
        .configmap
        .as_ref()
        .and_then(|store| store.state().into_iter().next());
    let options = evaluator.clone();
    let tracker = tracker.clone();
    let built = tokio::task::spawn_blocking(move || {
        // A panic in an earlier rebuild leaves the tracker as it was before that rebuild.
        let mut tracker = tracker.lock().unwrap_or_else(PoisonError::into_inner);
        tracker.build(configmap.as_deref(), index, &options)
    })
    .await;
    let (snapshot, change) = match built {
        Ok(built) => built,
        Err(error) => {
            error!(%error, "snapshot rebuild task failed; keeping the last snapshot");
            shared
                .metrics
                .reloads
                .with_label_values(&["state", "failure"])
                .inc();
            return;
        }
    };
    report_policy_change(&change, shared, recorder).await;
    match snapshot {
        Ok(snapshot) => {
            let metrics = &shared.metrics;
            for (resource, count) in [
                ("imagesets", snapshot.index.image_set_count()),
                ("nodes", snapshot.index.node_count()),
                ("namespaces", snapshot.index.namespace_count()),
            ] {
                metrics
                    .index_objects
                    .with_label_values(&[resource])
                    .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
            shared.replace_snapshot(snapshot);
            metrics.index_built.set(crate::time::unix_now());
            metrics
                .reloads
                .with_label_values(&["state", "success"])
                .inc();
            if !shared.synced.swap(true, Ordering::SeqCst) {
                info!("first snapshot of the cluster state built");
            }
        }
        Err(error) => {
            shared
                .metrics
                .reloads
                .with_label_values(&["state", "failure"])
                .inc();
            error!(%error, "cannot prepare the policies with the cluster state; keeping the last snapshot");
        }
    }
}

async fn report_policy_change(change: &PolicyChange, shared: &Shared, recorder: &Recorder) {
    let metrics = &shared.metrics;
    let (event, reference) = match change {
        PolicyChange::Unchanged => return,
        PolicyChange::Embedded => {
            metrics.policy_configmap_valid.set(1);
            info!("serving the embedded policies (no policy ConfigMap)");
            return;
        }
        PolicyChange::Loaded { configmap } => {
            metrics.policy_configmap_valid.set(1);
            metrics
                .reloads
                .with_label_values(&["policies", "success"])
                .inc();
            info!(configmap = ?configmap.name, "policies loaded from the ConfigMap");
            (
                Event {
                    type_: EventType::Normal,
                    reason: "PoliciesLoaded".into(),
                    note: Some("the webhook serves the policies of this ConfigMap".into()),
                    action: "LoadPolicies".into(),
                    secondary: None,
                },
                configmap,
            )
        }
        PolicyChange::Rejected { configmap, error } => {
            metrics.policy_configmap_valid.set(0);
            metrics
                .reloads
                .with_label_values(&["policies", "failure"])
                .inc();
            error!(configmap = ?configmap.name, %error, "policy ConfigMap rejected; the last good policies keep serving");
            (
                Event {
                    type_: EventType::Warning,
                    reason: "PoliciesRejected".into(),
                    note: Some(event_note(&format!(
                        "{error}; the last good policies keep serving"
                    ))),
                    action: "LoadPolicies".into(),
                    secondary: None,
                },
                configmap,
            )
        }
    };
    if let Err(error) = recorder.publish(&event, reference).await {
        warn!(%error, reason = %event.reason, "cannot record an Event on the policy ConfigMap");
    }
}

/// An Event note is limited to 1 kB.
fn event_note(text: &str) -> String {
    const LIMIT: usize = 1000;
    if text.len() <= LIMIT {
        return text.to_string();
    }
    let mut end = LIMIT - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests;
