//! The controller's run loop: the watches folded into the aggregator, leader election, the
//! reconcile of every ImageSet on each change and on every resync.

use std::collections::{BTreeSet, HashSet};
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use super::aggregate::{Aggregator, DIGEST_DRIFT_CONDITION, Problems, image_drift};
use super::mirroring::Mirroring;
use super::retiring::LabelUsers;
use super::secrets::referenced_secrets;
use super::workloads::Workloads;
use super::writer::{Writer, find_stranded};
use super::{ControllerOptions, REPORTER, leader, secrets};
use crate::api::{ImageSet, NodeImage, Registry};
use crate::index::{ClusterIndex, ClusterObjects};
use crate::metrics::ControllerMetrics;
use crate::policy::{SETTINGS_FILE, Settings};

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
            Err("ImageSets, Nodes, NodeImages and Registries not listed yet".to_string())
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
    // Registries wake the mirror worker; the ImageSets' watch does too (below).
    let mirror_wake = Arc::new(Notify::new());
    let (registries, writer) = reflector::store::<Registry>();
    {
        let wake = mirror_wake.clone();
        crate::cluster::spawn_watch(
            "registries",
            watcher(Api::<Registry>::all(client.clone()), config())
                .default_backoff()
                .reflect(writer),
            move || wake.notify_one(),
            || {},
        );
    }
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
    registries.wait_until_ready().await?;
    workloads.wait_until_ready().await?;
    if let Some(policies) = &policies {
        policies.wait_until_ready().await?;
    }
    probes.synced.store(true, Ordering::SeqCst);
    info!("ImageSets, Nodes, NodeImages, Registries and workloads listed");
    let mirroring = Mirroring::new(
        client.clone(),
        options.namespace.clone(),
        metrics.clone(),
        options.mirror.clone(),
    );
    tokio::spawn(mirroring.clone().run(
        image_sets.clone(),
        registries.clone(),
        leading.clone(),
        mirror_wake.clone(),
        changed.clone(),
    ));
    let watched = Watched {
        mirroring,
        mirror_wake,
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
    mirroring: Arc<Mirroring>,
    /// Wakes the mirror worker: on every pass, since ImageSets changed or a resync is due.
    mirror_wake: Arc<Notify>,
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
    watched.mirror_wake.notify_one();
    let now = Timestamp::now();
    for set in &sets {
        if !leading.load(Ordering::SeqCst) {
            // Leadership lost mid-pass: the new leader takes over from here.
            return;
        }
        if set.metadata.deletion_timestamp.is_some() {
            // Its copies are retired before its finalizer can go, so that a set deleted while
            // no controller ran leaves nothing behind in the mirror.
            watched.mirroring.retire_deleted(set);
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
        let copies = watched.mirroring.copies(&namespace, &set.name_any());
        let result = writer
            .reconcile(
                set, &sets, aggregator, &problems, &users, &copies, options, now,
            )
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
    for kind in ["Ready", "Progressing", "Degraded", DIGEST_DRIFT_CONDITION] {
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
    let (mut available, mut targeted, mut drifting) = (0usize, 0usize, 0i64);
    for set in sets {
        let namespace = set.metadata.namespace.as_deref().unwrap_or_default();
        if let Some(summary) = aggregator.summary(namespace, &set.name_any()) {
            for (_, _, _, counts) in &summary.images {
                available += counts.available;
                targeted += summary.targeted;
            }
            let images = set.status.iter().flat_map(|s| &s.images);
            drifting += images
                .zip(&summary.images)
                .filter(|(image, (_, normalized, _, counts))| {
                    image.normalized == *normalized && image_drift(image, counts).is_some()
                })
                .count() as i64;
        }
    }
    metrics.drifting_images.set(drifting);
    metrics.available_ratio.set(if targeted == 0 {
        1.0
    } else {
        available as f64 / targeted as f64
    });
}
