//! The controller: aggregates NodeImages and Node labels into ImageSet status, records Events,
//! owns the ImageSet finalizer, copies pull secrets into Coral's namespace and, optionally,
//! manages the webhook's certificate. One replica leads (a Lease); only the leader writes.

pub mod aggregate;
pub mod certs;
pub mod leader;
pub mod retiring;
pub mod scale;
pub mod secrets;
pub mod workloads;

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{Stream, StreamExt};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use self::aggregate::{Aggregator, Problems, image_set_status, transitions};
use self::retiring::{LabelUsers, with_retiring};
use self::workloads::Workloads;
use crate::api::{ImageSet, ImageSetStatus, NodeImage};
use crate::image::{ImageReference, label_key};
use crate::index::{ClusterIndex, ClusterObjects, Stranded, stranded_workload};
use crate::metrics::ControllerMetrics;
use crate::policy::{SETTINGS_FILE, Settings, WorkloadKind};
use crate::webhook::ObjectName;

/// The finalizer the controller puts on every ImageSet.
pub const FINALIZER: &str = "coral.dev/cleanup";
/// Name the controller records Events under.
const REPORTER: &str = "coral-controller";

/// Where `--manage-webhook-certs` keeps and publishes the webhook's certificate.
#[derive(Debug, Clone)]
pub struct CertTargets {
    /// The Secret (in Coral's namespace) the webhook mounts.
    pub secret: String,
    /// The webhook's Service (its DNS names go in the certificate).
    pub service: String,
    /// MutatingWebhookConfiguration and ValidatingWebhookConfiguration to patch.
    pub mutating: String,
    pub validating: String,
}

/// Everything `coral controller` is configured with.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Coral's namespace: pull-secret copies, the lease, the webhook certificate.
    pub namespace: String,
    /// This replica (its pod name).
    pub identity: String,
    pub lease_duration: Duration,
    /// How long agents get to remove a deleted ImageSet's labels before the controller
    /// removes them itself (from dead nodes, say).
    pub cleanup_timeout: Duration,
    /// How often everything is reconciled when nothing changes.
    pub resync: Duration,
    /// Quiet period that coalesces changes into one reconcile.
    pub debounce: Duration,
    pub certs: Option<CertTargets>,
    pub probe_listen: SocketAddr,
    /// The policy ConfigMap whose `settings.json` gives `minAvailableNodes` for judging
    /// stranded workloads; the default settings when `None` or absent.
    pub policies_configmap: Option<ObjectName>,
}

/// The API calls of a reconcile.
pub struct Writer {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: ControllerMetrics,
}

/// What a reconcile of one ImageSet did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub finalizer_added: bool,
    pub finalizer_removed: bool,
    pub status_patched: bool,
    pub labels_removed: usize,
    pub events: usize,
}

/// The merge patch writing a status. An empty `retiring` is written as null: a merge patch
/// leaves alone a field it does not name, and the list would stay.
pub fn status_patch(status: &ImageSetStatus) -> Value {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if status.retiring.is_empty()
        && let Some(fields) = value.as_object_mut()
    {
        fields.insert("retiring".into(), Value::Null);
    }
    json!({ "status": value })
}

/// The JSON patch adding the finalizer.
pub fn add_finalizer_patch(set: &ImageSet) -> Value {
    match &set.metadata.finalizers {
        None => json!([{"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}]),
        Some(current) => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": current},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ]),
    }
}

/// The JSON patch removing the finalizer, if it is there.
pub fn remove_finalizer_patch(set: &ImageSet) -> Option<Value> {
    let index = set
        .metadata
        .finalizers
        .as_ref()?
        .iter()
        .position(|f| f == FINALIZER)?;
    Some(json!([
        {"op": "test", "path": format!("/metadata/finalizers/{index}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{index}")},
    ]))
}

fn has_finalizer(set: &ImageSet) -> bool {
    set.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == FINALIZER))
}

/// The ImageSets of `all` other than `set` that are not being deleted.
pub fn other_live_sets<'a>(
    set: &'a ImageSet,
    all: &'a [&'a ImageSet],
) -> impl Iterator<Item = &'a ImageSet> + 'a {
    all.iter().copied().filter(move |other| {
        other.metadata.deletion_timestamp.is_none()
            && (other.metadata.namespace != set.metadata.namespace
                || other.metadata.name != set.metadata.name)
    })
}

/// Label keys of `set`'s images that no other live ImageSet wants.
pub fn orphan_labels(set: &ImageSet, all: &[&ImageSet]) -> BTreeSet<String> {
    let labels = |s: &ImageSet| -> BTreeSet<String> {
        s.spec
            .images
            .iter()
            .filter_map(|i| ImageReference::parse(i).ok())
            .map(|r| label_key(&r))
            .collect()
    };
    let wanted_elsewhere: BTreeSet<String> = other_live_sets(set, all).flat_map(&labels).collect();
    labels(set)
        .into_iter()
        .filter(|l| !wanted_elsewhere.contains(l))
        .collect()
}

impl Writer {
    fn image_sets(&self, set: &ImageSet) -> Api<ImageSet> {
        Api::namespaced(
            self.client.clone(),
            set.metadata.namespace.as_deref().unwrap_or_default(),
        )
    }

    /// Reconciles one ImageSet: its finalizer, its status (patched only when it changed),
    /// the Events of its transitions, and, while it is being deleted, the cleanup of labels
    /// no other ImageSet needs.
    #[allow(clippy::too_many_arguments)] // the reconcile's inputs, each read once
    pub async fn reconcile(
        &self,
        set: &ImageSet,
        all: &[&ImageSet],
        aggregator: &Mutex<Aggregator>,
        problems: &Problems,
        users: &LabelUsers,
        options: &ControllerOptions,
        now: Timestamp,
    ) -> Result<Outcome, kube::Error> {
        let mut outcome = Outcome::default();
        let name = set.name_any();
        let api = self.image_sets(set);
        let retiring = retiring::retiring_images(set, all, users);
        if set.metadata.deletion_timestamp.is_some() {
            if has_finalizer(set) {
                // What is still retiring keeps the finalizer, and its labels on the nodes.
                let releasing = retiring.is_empty();
                let previous = set.status.clone().unwrap_or_default();
                let status = with_retiring(
                    previous.clone(),
                    retiring,
                    users,
                    set.status.as_ref(),
                    &Time(now),
                );
                if status != previous {
                    api.patch_status(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(status_patch(&status)),
                    )
                    .await?;
                    outcome.status_patched = true;
                }
                if releasing {
                    self.finalize(set, all, aggregator, options, now, &mut outcome)
                        .await?;
                }
            }
            return Ok(outcome);
        }
        if !has_finalizer(set) {
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::<()>::Json(
                    serde_json::from_value(add_finalizer_patch(set)).unwrap_or_default(),
                ),
            )
            .await?;
            outcome.finalizer_added = true;
        }
        let (status, notices) = {
            let aggregator = aggregator.lock().unwrap_or_else(PoisonError::into_inner);
            let namespace = set.metadata.namespace.as_deref().unwrap_or_default();
            let Some(summary) = aggregator.summary(namespace, &name) else {
                return Ok(outcome);
            };
            let status = with_retiring(
                image_set_status(
                    set.metadata.generation,
                    &summary,
                    problems,
                    set.status.as_ref(),
                    &Time(now),
                ),
                retiring,
                users,
                set.status.as_ref(),
                &Time(now),
            );
            let notices = transitions(set.status.as_ref(), &status, &summary);
            (status, notices)
        };
        if set.status.as_ref() != Some(&status) {
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(status_patch(&status)),
            )
            .await?;
            outcome.status_patched = true;
            let reference = set.object_ref(&());
            for notice in notices {
                let event = Event {
                    type_: if notice.warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: notice.reason.to_string(),
                    note: Some(notice.message.chars().take(1000).collect()),
                    action: "Reconcile".to_string(),
                    secondary: None,
                };
                match self.recorder.publish(&event, &reference).await {
                    Ok(()) => outcome.events += 1,
                    Err(error) => warn!(%error, imageset = %name, "cannot record an Event"),
                }
            }
        }
        Ok(outcome)
    }

    async fn finalize(
        &self,
        set: &ImageSet,
        all: &[&ImageSet],
        aggregator: &Mutex<Aggregator>,
        options: &ControllerOptions,
        now: Timestamp,
        outcome: &mut Outcome,
    ) -> Result<(), kube::Error> {
        let orphans = orphan_labels(set, all);
        let carriers: Vec<(String, Vec<String>)> = {
            let aggregator = aggregator.lock().unwrap_or_else(PoisonError::into_inner);
            let mut by_node: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for label in &orphans {
                for node in aggregator.nodes_with_label(label) {
                    by_node
                        .entry(node.to_string())
                        .or_default()
                        .push(label.clone());
                }
            }
            by_node.into_iter().collect()
        };
        let name = set.name_any();
        if carriers.is_empty() {
            if let Some(patch) = remove_finalizer_patch(set) {
                self.image_sets(set)
                    .patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::<()>::Json(serde_json::from_value(patch).unwrap_or_default()),
                    )
                    .await?;
                outcome.finalizer_removed = true;
                info!(imageset = %name, "labels cleaned up; finalizer released");
            }
            return Ok(());
        }
        let deleting_since = set
            .metadata
            .deletion_timestamp
            .as_ref()
            .map_or(now, |t| t.0);
        let timeout = SignedDuration::try_from(options.cleanup_timeout).unwrap_or_default();
        if deleting_since
            .checked_add(timeout)
            .is_ok_and(|end| end > now)
        {
            // The agents remove the labels; wait for them.
            return Ok(());
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        for (node, labels) in carriers {
            let labels: serde_json::Map<String, Value> =
                labels.into_iter().map(|l| (l, Value::Null)).collect();
            nodes
                .patch(
                    &node,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": labels}})),
                )
                .await?;
            outcome.labels_removed += labels.len();
            warn!(%node, imageset = %name, "the node's agent did not remove labels in time; removed them");
        }
        Ok(())
    }

    /// Puts `ca` into the caBundle of every webhook of the named (mutating or validating)
    /// webhook configuration that lacks it; a configuration that does not exist is left be.
    async fn patch_ca_bundle<K>(&self, name: &str, ca: &str) -> anyhow::Result<()>
    where
        K: Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::Serialize
            + serde::de::DeserializeOwned,
    {
        let api: Api<K> = Api::all(self.client.clone());
        let Some(configuration) = api.get_opt(name).await? else {
            return Ok(());
        };
        if let Some(patch) = certs::ca_bundle_patch(&serde_json::to_value(&configuration)?, ca) {
            api.patch(
                name,
                &PatchParams::default(),
                &Patch::<()>::Json(serde_json::from_value(patch)?),
            )
            .await?;
            info!(configuration = %name, kind = %K::kind(&()), "caBundle updated");
        }
        Ok(())
    }

    /// Keeps the webhook certificate Secret current and its CA in the webhook configurations.
    pub async fn ensure_certs(
        &self,
        namespace: &str,
        targets: &CertTargets,
        now: Timestamp,
    ) -> anyhow::Result<()> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let current = secrets.get_opt(&targets.secret).await?;
        let dns = certs::dns_names(&targets.service, namespace);
        let renewal = certs::renewal(current.as_ref(), &dns, now);
        let secret = if renewal == certs::Renewal::None {
            current.context("the certificate Secret vanished")?
        } else {
            let issued = certs::issue(
                current.as_ref(),
                renewal,
                &dns,
                namespace,
                &targets.secret,
                now,
            )?;
            let written = match current {
                Some(_) => {
                    secrets
                        .replace(&targets.secret, &PostParams::default(), &issued)
                        .await?
                }
                None => secrets.create(&PostParams::default(), &issued).await?,
            };
            info!(secret = %targets.secret, ?renewal, "webhook certificate issued");
            written
        };
        let ca = secret
            .data
            .as_ref()
            .and_then(|d| d.get("ca.crt"))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .context("the certificate Secret has no ca.crt")?;
        self.patch_ca_bundle::<MutatingWebhookConfiguration>(&targets.mutating, &ca)
            .await?;
        self.patch_ca_bundle::<ValidatingWebhookConfiguration>(&targets.validating, &ca)
            .await?;
        Ok(())
    }
}

/// The stranded workloads among `workloads`, each with the object it was found in.
pub fn find_stranded<'a>(
    workloads: &'a [Value],
    index: &ClusterIndex,
    min_nodes: usize,
) -> Vec<(Stranded, &'a Value)> {
    let placement = index.placement();
    let images = index.images_by_label();
    workloads
        .iter()
        .filter_map(|object| {
            stranded_workload(object, &placement, &images, min_nodes).map(|found| (found, object))
        })
        .collect()
}

impl Writer {
    /// Counts stranded workloads by kind, and records a Warning Event `Stranded` on each that
    /// was not stranded in the last pass (`seen`, which this updates).
    pub async fn report_stranded(
        &self,
        found: &[(Stranded, &Value)],
        seen: &Mutex<BTreeSet<String>>,
    ) {
        for kind in WorkloadKind::ALL {
            let count = found.iter().filter(|(s, _)| s.kind == kind.name()).count();
            self.metrics
                .stranded_workloads
                .with_label_values(&[kind.name()])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        let now: BTreeSet<String> = found
            .iter()
            .map(|(s, _)| format!("{} {}/{}", s.kind, s.namespace, s.name))
            .collect();
        let new: Vec<&(Stranded, &Value)> = {
            let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
            let new = found
                .iter()
                .filter(|(s, _)| !seen.contains(&format!("{} {}/{}", s.kind, s.namespace, s.name)))
                .collect();
            *seen = now;
            new
        };
        for (stranded, object) in new {
            warn!(kind = stranded.kind, namespace = %stranded.namespace, name = %stranded.name, reason = %stranded.reason(), "workload stranded");
            let text = |pointer: &str| {
                object
                    .pointer(pointer)
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            let reference = ObjectReference {
                api_version: text("/apiVersion"),
                kind: Some(stranded.kind.to_string()),
                namespace: Some(stranded.namespace.clone()),
                name: Some(stranded.name.clone()),
                uid: text("/metadata/uid"),
                ..ObjectReference::default()
            };
            let event = Event {
                type_: EventType::Warning,
                reason: "Stranded".to_string(),
                note: Some(stranded.reason().chars().take(1000).collect()),
                action: "CheckPlacement".to_string(),
                secondary: None,
            };
            if let Err(error) = self.recorder.publish(&event, &reference).await {
                warn!(%error, name = %stranded.name, "cannot record an Event on a stranded workload");
            }
        }
    }
}

/// Referenced pull secrets of live ImageSets, `(namespace, name)`.
pub fn referenced_secrets(sets: &[&ImageSet]) -> BTreeSet<(String, String)> {
    sets.iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .flat_map(|s| {
            let namespace = s.metadata.namespace.clone().unwrap_or_default();
            s.spec
                .image_pull_secrets
                .iter()
                .map(move |r| (namespace.clone(), r.name.clone()))
        })
        .collect()
}

/// Readiness of the controller: every watch listed.
struct ControllerProbes {
    synced: AtomicBool,
    metrics: ControllerMetrics,
}

impl crate::probe::Probes for ControllerProbes {
    fn ready(&self) -> Result<(), String> {
        if self.synced.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("ImageSets, Nodes and NodeImages not listed yet".to_string())
        }
    }

    fn metrics(&self) -> String {
        self.metrics.render()
    }
}

/// Applies a watch stream to the aggregator. A relist (after a watch expired) replaces what
/// the stream had said: objects not listed again are removed.
/// How a watched resource changes the aggregation.
struct Fold<K> {
    resource: &'static str,
    /// The key `delete` takes.
    key: fn(&K) -> String,
    apply: fn(&mut Aggregator, &K),
    delete: fn(&mut Aggregator, &str),
}

fn spawn_fold<K: Send + 'static>(
    fold: Fold<K>,
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    aggregator: Arc<Mutex<Aggregator>>,
    changed: Arc<Notify>,
) {
    let Fold {
        resource,
        key,
        apply,
        delete,
    } = fold;
    tokio::spawn(async move {
        let mut stream = pin!(stream);
        let mut known: HashSet<String> = HashSet::new();
        let mut relisted: Option<Vec<K>> = None;
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    warn!(resource, %error, "watch failed; retrying with backoff");
                    continue;
                }
            };
            let mut aggregator = aggregator.lock().unwrap_or_else(PoisonError::into_inner);
            match event {
                watcher::Event::Init => relisted = Some(Vec::new()),
                watcher::Event::InitApply(object) => {
                    relisted.get_or_insert_with(Vec::new).push(object);
                }
                watcher::Event::InitDone => {
                    let objects = relisted.take().unwrap_or_default();
                    let listed: HashSet<String> = objects
                        .iter()
                        .map(|o| {
                            apply(&mut aggregator, o);
                            key(o)
                        })
                        .collect();
                    for gone in known.difference(&listed) {
                        delete(&mut aggregator, gone);
                    }
                    known = listed;
                    changed.notify_one();
                }
                watcher::Event::Apply(object) => {
                    apply(&mut aggregator, &object);
                    known.insert(key(&object));
                    changed.notify_one();
                }
                watcher::Event::Delete(object) => {
                    let key = key(&object);
                    delete(&mut aggregator, &key);
                    known.remove(&key);
                    changed.notify_one();
                }
            }
        }
        error!(resource, "watch stream ended");
    });
}

fn set_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Runs the controller until the process ends.
pub async fn run(options: ControllerOptions) -> anyhow::Result<()> {
    let metrics = ControllerMetrics::new();
    let probes = Arc::new(ControllerProbes {
        synced: AtomicBool::new(false),
        metrics: metrics.clone(),
    });
    crate::probe::spawn(
        TcpListener::bind(options.probe_listen).await?,
        probes.clone(),
    );
    let client = crate::cluster::client().await?;
    let leading = Arc::new(AtomicBool::new(false));
    let elected = Arc::new(Notify::new());
    tokio::spawn(leader::run(
        client.clone(),
        leader::LeaseOptions {
            namespace: options.namespace.clone(),
            name: "coral-controller".to_string(),
            identity: options.identity.clone(),
            duration: options.lease_duration,
            renew_every: options.lease_duration / 3,
        },
        leading.clone(),
        elected.clone(),
    ));

    let aggregator = Arc::new(Mutex::new(Aggregator::new()));
    let changed = Arc::new(Notify::new());
    let config = crate::cluster::watch_config;
    let (image_sets, writer) = reflector::store::<ImageSet>();
    spawn_fold(
        Fold {
            resource: "imagesets",
            key: |set: &ImageSet| {
                set_key(
                    set.metadata.namespace.as_deref().unwrap_or_default(),
                    &set.name_any(),
                )
            },
            apply: |aggregator, set| aggregator.apply_image_set(set),
            delete: |aggregator, key| {
                if let Some((namespace, name)) = key.split_once('/') {
                    aggregator.delete_image_set(namespace, name);
                }
            },
        },
        watcher(Api::<ImageSet>::all(client.clone()), config())
            .default_backoff()
            .reflect(writer),
        aggregator.clone(),
        changed.clone(),
    );
    let (nodes, writer) = reflector::store::<Node>();
    spawn_fold(
        Fold {
            resource: "nodes",
            key: |node: &Node| node.name_any(),
            apply: |aggregator, node| {
                aggregator.apply_node_labels(
                    &node.name_any(),
                    node.metadata.labels.clone().unwrap_or_default(),
                );
            },
            delete: Aggregator::delete_node,
        },
        watcher(Api::<Node>::all(client.clone()), config())
            .default_backoff()
            .modify(crate::cluster::strip_node)
            .reflect(writer),
        aggregator.clone(),
        changed.clone(),
    );
    let (node_images, writer) = reflector::store::<NodeImage>();
    spawn_fold(
        Fold {
            resource: "nodeimages",
            key: |node_image: &NodeImage| node_image.spec.node_name.clone(),
            apply: Aggregator::apply_node_image,
            delete: Aggregator::delete_node_image,
        },
        watcher(Api::<NodeImage>::all(client.clone()), config())
            .default_backoff()
            .reflect(writer),
        aggregator.clone(),
        changed.clone(),
    );
    let workloads = Workloads::watch(&client, &changed);
    let policies = options.policies_configmap.as_ref().map(|name| {
        let (store, writer) = reflector::store::<ConfigMap>();
        let changed = changed.clone();
        crate::cluster::spawn_watch(
            "configmaps",
            crate::cluster::configmap_watch(&client, name).reflect(writer),
            move || changed.notify_one(),
            || {},
        );
        store
    });
    wait_ready(&image_sets, &nodes, &node_images).await?;
    workloads.wait_until_ready().await?;
    if let Some(policies) = &policies {
        policies.wait_until_ready().await?;
    }
    probes.synced.store(true, Ordering::SeqCst);
    info!("ImageSets, Nodes, NodeImages and workloads listed");
    let watched = Watched {
        image_sets,
        nodes,
        workloads,
        policies,
        stranded: Mutex::new(BTreeSet::new()),
    };

    let writer = Writer {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: REPORTER.to_string(),
                instance: Some(options.identity.clone()),
            },
        ),
        client,
        metrics: metrics.clone(),
    };
    loop {
        let leads = leading.load(Ordering::SeqCst);
        metrics.leader.set(i64::from(leads));
        if leads {
            reconcile_all(&writer, &watched, &aggregator, &options, &leading).await;
            tokio::select! {
                () = changed.notified() => {}
                () = tokio::time::sleep(options.resync) => {}
            }
        } else {
            // A new leader starts at once.
            elected.notified().await;
        }
        tokio::time::sleep(options.debounce).await;
    }
}

/// What the controller watches besides the aggregation's inputs.
struct Watched {
    image_sets: Store<ImageSet>,
    nodes: Store<Node>,
    workloads: Workloads,
    policies: Option<Store<ConfigMap>>,
    /// `Kind namespace/name` of the workloads found stranded in the last pass.
    stranded: Mutex<BTreeSet<String>>,
}

impl Watched {
    /// `minAvailableNodes` of the policy ConfigMap's settings (the default when absent or
    /// invalid: the webhook rejects an invalid one too).
    fn min_available_nodes(&self) -> u32 {
        let configmap = self
            .policies
            .as_ref()
            .and_then(|store| store.state().into_iter().next());
        let text = configmap
            .as_ref()
            .and_then(|c| c.data.as_ref())
            .and_then(|data| data.get(SETTINGS_FILE));
        match text.map(|text| Settings::from_json(text)) {
            Some(Ok(settings)) => settings.min_available_nodes,
            Some(Err(error)) => {
                warn!(%error, "the policy ConfigMap's settings.json is not valid; judging stranded workloads with the default minAvailableNodes");
                Settings::default().min_available_nodes
            }
            None => Settings::default().min_available_nodes,
        }
    }
}

async fn wait_ready(
    image_sets: &Store<ImageSet>,
    nodes: &Store<Node>,
    node_images: &Store<NodeImage>,
) -> anyhow::Result<()> {
    image_sets.wait_until_ready().await?;
    nodes.wait_until_ready().await?;
    node_images.wait_until_ready().await?;
    Ok(())
}

/// One pass over everything: pull-secret copies, every ImageSet, the webhook certificate.
async fn reconcile_all(
    writer: &Writer,
    watched: &Watched,
    aggregator: &Mutex<Aggregator>,
    options: &ControllerOptions,
    leading: &AtomicBool,
) {
    let sets = watched.image_sets.state();
    let sets: Vec<&ImageSet> = sets.iter().map(AsRef::as_ref).collect();
    let workloads = watched.workloads.values();
    let users = LabelUsers::of(&workloads);
    let nodes = watched.nodes.state();
    let nodes: Vec<&Node> = nodes.iter().map(AsRef::as_ref).collect();
    let index = ClusterIndex::from_objects(ClusterObjects {
        image_sets: &sets,
        nodes: &nodes,
        ..ClusterObjects::default()
    });
    let min = watched.min_available_nodes() as usize;
    let stranded = find_stranded(&workloads, &index, min);
    writer.report_stranded(&stranded, &watched.stranded).await;
    let missing = match secrets::sync_copies(
        &writer.client,
        &options.namespace,
        &referenced_secrets(&sets),
    )
    .await
    {
        Ok(missing) => missing,
        Err(error) => {
            warn!(%error, "cannot copy pull secrets");
            BTreeSet::new()
        }
    };
    let now = Timestamp::now();
    for set in &sets {
        if !leading.load(Ordering::SeqCst) {
            // Leadership lost mid-pass: the new leader takes over from here.
            return;
        }
        let namespace = set.metadata.namespace.clone().unwrap_or_default();
        let problems = Problems {
            secrets: set
                .spec
                .image_pull_secrets
                .iter()
                .map(|r| format!("{namespace}/{}", r.name))
                .filter(|s| missing.contains(s))
                .collect(),
        };
        let started = Instant::now();
        let result = writer
            .reconcile(set, &sets, aggregator, &problems, &users, options, now)
            .await;
        writer
            .metrics
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok(_) => "success",
            Err(error) => {
                warn!(imageset = %set.name_any(), %error, "reconcile failed; retried on the next change or resync");
                "failure"
            }
        };
        writer.metrics.reconciles.with_label_values(&[label]).inc();
    }
    observe(&writer.metrics, &sets, aggregator);
    if let Some(targets) = &options.certs
        && let Err(error) = writer.ensure_certs(&options.namespace, targets, now).await
    {
        warn!(%error, "cannot manage the webhook certificate");
    }
}

/// ImageSets by condition, and the share of (image, targeted node) pairs available.
fn observe(metrics: &ControllerMetrics, sets: &[&ImageSet], aggregator: &Mutex<Aggregator>) {
    let mut by_condition: std::collections::BTreeMap<(String, String), i64> = Default::default();
    for kind in ["Ready", "Progressing", "Degraded"] {
        for status in ["True", "False"] {
            by_condition.insert((kind.to_string(), status.to_string()), 0);
        }
    }
    for set in sets {
        for condition in set.status.iter().flat_map(|s| &s.conditions) {
            if let Some(count) =
                by_condition.get_mut(&(condition.type_.clone(), condition.status.clone()))
            {
                *count += 1;
            }
        }
    }
    for ((kind, status), count) in by_condition {
        metrics
            .image_sets
            .with_label_values(&[&kind, &status])
            .set(count);
    }
    let aggregator = aggregator.lock().unwrap_or_else(PoisonError::into_inner);
    let (mut available, mut targeted) = (0usize, 0usize);
    for set in sets {
        let namespace = set.metadata.namespace.as_deref().unwrap_or_default();
        if let Some(summary) = aggregator.summary(namespace, &set.name_any()) {
            for (_, _, _, counts) in &summary.images {
                available += counts.available;
                targeted += summary.targeted;
            }
        }
    }
    metrics.available_ratio.set(if targeted == 0 {
        1.0
    } else {
        available as f64 / targeted as f64
    });
}

#[cfg(test)]
mod tests;
