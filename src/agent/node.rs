//! `coral agent`: in a cluster, on one node. Watches ImageSets and its own Node, keeps the
//! wanted images on the runtime through the engine, and records what the node holds: its Node's
//! Coral labels (one merge patch per change) and its NodeImage status.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use super::cri::Cri;
use super::engine::{Engine, EngineOptions};
use super::record::{desired_labels, label_patch, node_image_status, node_pressure};
use super::retention::RetentionPolicy;
use super::tracker::Tracker;
use super::wanted_images;
use crate::api::{ImageSet, NodeImage, NodeImageSpec, NodeImageStatus};
use crate::controller::secrets::copy_name;
use crate::credentials::Keyring;
use crate::metrics::AgentMetrics;

/// Everything `coral agent` is configured with.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub node_name: String,
    /// Coral's namespace, where the controller keeps copies of the pull secrets.
    pub coral_namespace: String,
    pub cri_socket: String,
    pub engine: EngineOptions,
    /// When images no ImageSet wants any more are removed.
    pub retention: RetentionPolicy,
    /// Pull a public image's ready mirror copy before its source.
    pub pull_through_mirror: bool,
    pub probe_listen: SocketAddr,
    /// Quiet period that coalesces changes before the wanted set or the records are rewritten.
    pub debounce: Duration,
}

/// Delay before a failed write to the API server is tried again.
const WRITE_RETRY: Duration = Duration::from_secs(5);

/// Readiness of the agent.
struct AgentProbes {
    engine: Arc<Engine>,
    synced: AtomicBool,
}

impl crate::probe::Probes for AgentProbes {
    fn ready(&self) -> Result<(), String> {
        if !self.engine.runtime_up() {
            Err("the container runtime does not answer".to_string())
        } else if !self.synced.load(Ordering::SeqCst) {
            Err("ImageSets and the node not listed yet".to_string())
        } else {
            Ok(())
        }
    }

    fn metrics(&self) -> String {
        self.engine.metrics().render()
    }
}

/// Runs the agent until the process ends.
pub async fn run(options: AgentOptions) -> anyhow::Result<()> {
    let metrics = AgentMetrics::new();
    let cri = Cri::new(&options.cri_socket)?;
    let engine = Engine::new(cri, options.engine.clone(), metrics);
    let probes = Arc::new(AgentProbes {
        engine: engine.clone(),
        synced: AtomicBool::new(false),
    });
    crate::probe::spawn(
        TcpListener::bind(options.probe_listen).await?,
        probes.clone(),
    );
    let client = crate::cluster::client().await?;
    let version = engine.connect().await;
    info!(
        socket = %options.cri_socket,
        runtime = %version.runtime_name,
        version = %version.runtime_version,
        cri = %version.api_version,
        "container runtime connected"
    );
    tokio::spawn(engine.clone().run());
    let agent = NodeAgent::new(client, options, engine);
    agent
        .run(|| probes.synced.store(true, Ordering::SeqCst))
        .await;
    Ok(())
}

/// The cluster side of the agent.
pub struct NodeAgent {
    client: Client,
    options: AgentOptions,
    engine: Arc<Engine>,
}

impl NodeAgent {
    pub fn new(client: Client, options: AgentOptions, engine: Arc<Engine>) -> Self {
        Self {
            client,
            options,
            engine,
        }
    }

    /// Watches, pulls and records until the process ends; `synced` is called once the
    /// ImageSets and the node are listed and the wanted set is computed.
    pub async fn run(self, synced: impl FnOnce()) {
        let changed = Arc::new(Notify::new());
        let node_changed = Arc::new(Notify::new());
        let config = crate::cluster::watch_config;
        let (image_sets, writer) = reflector::store::<ImageSet>();
        spawn_watch(
            "imagesets",
            watcher(Api::<ImageSet>::all(self.client.clone()), config())
                .default_backoff()
                .reflect(writer),
            vec![changed.clone()],
        );
        let (nodes, writer) = reflector::store::<Node>();
        spawn_watch(
            "node",
            watcher(
                Api::<Node>::all(self.client.clone()),
                config().fields(&format!("metadata.name={}", self.options.node_name)),
            )
            .default_backoff()
            .reflect(writer),
            vec![changed.clone(), node_changed.clone()],
        );
        if image_sets.wait_until_ready().await.is_err() || nodes.wait_until_ready().await.is_err() {
            error!("a watch stopped before its first list");
            return;
        }
        // The unwanted images keep their grace period across restarts.
        match Api::<NodeImage>::all(self.client.clone())
            .get_opt(&self.options.node_name)
            .await
        {
            Ok(Some(NodeImage {
                status: Some(status),
                ..
            })) => self.engine.restore_retention(&status),
            Ok(_) => {}
            Err(error) => {
                warn!(%error, "cannot read the NodeImage; unwanted images start their grace period again");
            }
        }
        let recorder = Recorder {
            nodes: Api::all(self.client.clone()),
            node_images: Api::all(self.client.clone()),
            node_name: self.options.node_name.clone(),
            last_status: Mutex::new(None),
            metrics: self.engine.metrics().clone(),
        };
        self.sync_wanted(&image_sets, &nodes).await;
        synced();
        let engine = self.engine.clone();
        let debounce = self.options.debounce;
        let recording_nodes = nodes.clone();
        tokio::spawn(async move {
            recorder
                .run(&engine, &recording_nodes, &node_changed, debounce)
                .await;
        });
        loop {
            // Secrets are read again every resync, so rotated credentials are picked up.
            tokio::select! {
                () = changed.notified() => {}
                () = tokio::time::sleep(self.options.engine.resync) => {}
            }
            tokio::time::sleep(self.options.debounce).await;
            self.sync_wanted(&image_sets, &nodes).await;
        }
    }

    /// Computes the wanted images from the ImageSets and the node's labels, with the
    /// credentials of their pull secrets, and hands them to the engine.
    pub async fn sync_wanted(&self, image_sets: &Store<ImageSet>, nodes: &Store<Node>) {
        let Some(node) = own_node(nodes, &self.options.node_name) else {
            warn!(node = %self.options.node_name, "the node is not listed; no images wanted");
            self.engine.set_wanted([]);
            return;
        };
        self.engine.set_node_pressure(node_pressure(&node));
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let sets = image_sets.state();
        let sets: Vec<&ImageSet> = sets.iter().map(AsRef::as_ref).collect();
        let wanted = wanted_images(&sets, &labels);
        self.engine
            .set_mirrors(if self.options.pull_through_mirror {
                super::mirror_copies(&sets, &wanted)
            } else {
                Default::default()
            });
        self.engine
            .set_refresh(super::refresh_periods(&sets, &labels));
        let secret_refs: BTreeSet<(String, String)> = wanted.values().flatten().cloned().collect();
        let keyrings =
            read_pull_secrets(&self.client, &self.options.coral_namespace, &secret_refs).await;
        let removed = self
            .engine
            .set_wanted(wanted.into_iter().map(|(image, refs)| {
                let mut keyring = Keyring::new();
                for key in refs {
                    if let Some(found) = keyrings.get(&key) {
                        keyring.extend(found);
                    }
                }
                (image, Arc::new(keyring))
            }));
        if !removed.is_empty() {
            info!(count = removed.len(), "images no longer wanted");
        }
        if let Err(error) = self.engine.retain(&self.options.retention).await {
            warn!(%error, "cannot remove unwanted images; trying again on the next resync");
        }
    }
}

/// The merge patch that makes a NodeImage's status `status`: lists it leaves out (empty) are
/// cleared, not left as they were.
pub fn status_patch(status: &NodeImageStatus) -> serde_json::Value {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if let Some(fields) = value.as_object_mut() {
        for list in ["conditions", "images", "unwanted", "removals"] {
            fields.entry(list).or_insert(serde_json::Value::Null);
        }
    }
    json!({ "status": value })
}

fn own_node(nodes: &Store<Node>, name: &str) -> Option<Arc<Node>> {
    nodes.state().into_iter().find(|n| n.name_any() == name)
}

/// Drives one watch: a change notifies every `notify`.
fn spawn_watch<K: Send + 'static>(
    resource: &'static str,
    stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    notify: Vec<Arc<Notify>>,
) {
    crate::cluster::spawn_watch(
        resource,
        stream,
        move || notify.iter().for_each(|n| n.notify_one()),
        || {},
    );
}

/// Reads the pull secrets the wanted images may use: the controller's copies of them in
/// Coral's namespace (so the agent reads Secrets in that one namespace only). Every read of
/// Secrets goes through this function. A secret that is missing or unreadable is logged and
/// skipped: pulls go on without it, and fail with the registry's answer if they needed it.
pub async fn read_pull_secrets(
    client: &Client,
    coral_namespace: &str,
    refs: &BTreeSet<(String, String)>,
) -> BTreeMap<(String, String), Keyring> {
    let mut keyrings = BTreeMap::new();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), coral_namespace);
    for (namespace, name) in refs {
        let copy = copy_name(namespace, name);
        match secrets.get_opt(&copy).await {
            Ok(Some(secret)) => {
                let mut keyring = Keyring::new();
                match keyring.add_secret(&secret) {
                    Ok(()) => {
                        keyrings.insert((namespace.clone(), name.clone()), keyring);
                    }
                    Err(error) => warn!(%error, "pull secret not used"),
                }
            }
            Ok(None) => {
                warn!(%namespace, %name, %copy, "pull secret not copied into Coral's namespace (yet)");
            }
            Err(error) => warn!(%namespace, %name, %copy, %error, "cannot read pull secret"),
        }
    }
    keyrings
}

/// Writes the node's Coral labels and its NodeImage status when they change.
pub struct Recorder {
    pub nodes: Api<Node>,
    pub node_images: Api<NodeImage>,
    pub node_name: String,
    /// The status last written (or read back), so unchanged status is never written.
    pub last_status: Mutex<Option<NodeImageStatus>>,
    pub metrics: AgentMetrics,
}

impl Recorder {
    async fn run(
        &self,
        engine: &Engine,
        nodes: &Store<Node>,
        node_changed: &Notify,
        debounce: Duration,
    ) {
        let mut changes = engine.subscribe();
        loop {
            let node = own_node(nodes, &self.node_name);
            let tracker = engine.snapshot();
            let paused = engine.paused_reason();
            let written = self
                .record(node.as_deref(), &tracker, paused.as_deref())
                .await;
            self.metrics.paused.set(i64::from(paused.is_some()));
            if written.is_err() {
                tokio::time::sleep(WRITE_RETRY).await;
                continue;
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                () = node_changed.notified() => {}
            }
            // Let a burst of changes (several pulls ending together) become one write.
            tokio::time::sleep(debounce).await;
        }
    }

    fn written(&self, what: &str, result: &Result<(), kube::Error>) {
        let label = if result.is_ok() { "success" } else { "failure" };
        self.metrics.writes.with_label_values(&[what, label]).inc();
        if let Err(error) = result {
            warn!(what, %error, "write to the API server failed; retrying");
        }
    }

    /// Writes what changed: the label patch when the node's Coral labels differ from the
    /// present images, the NodeImage status when it differs from the last one written.
    pub async fn record(
        &self,
        node: Option<&Node>,
        tracker: &Tracker,
        paused: Option<&str>,
    ) -> Result<(), kube::Error> {
        // Before the runtime's images are listed, the records say nothing about what the node
        // holds: writing them would take labels and availability away, for a moment.
        let (Some(node), true) = (node, tracker.listed()) else {
            return Ok(());
        };
        let current = node.metadata.labels.clone().unwrap_or_default();
        if let Some(patch) = label_patch(&current, &desired_labels(tracker)) {
            let result = self
                .nodes
                .patch(
                    &self.node_name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .map(drop);
            self.written("node_labels", &result);
            result?;
        }
        let previous = self
            .last_status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let previous = match previous {
            Some(previous) => Some(previous),
            None => self.ensure_node_image(node).await?,
        };
        let status = node_image_status(tracker, paused, previous.as_ref(), None);
        if previous.as_ref() == Some(&status) {
            return Ok(());
        }
        let result = self
            .node_images
            .patch_status(
                &self.node_name,
                &PatchParams::default(),
                &Patch::Merge(status_patch(&status)),
            )
            .await
            .map(drop);
        self.written("nodeimage", &result);
        match result {
            Ok(()) => {
                *self
                    .last_status
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(status);
                Ok(())
            }
            Err(error) => {
                // Deleted meanwhile, or another writer: read it again next time.
                *self
                    .last_status
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                Err(error)
            }
        }
    }

    /// Reads the node's NodeImage, creating it (owned by the Node, so it goes with it) when
    /// it is missing; returns its status.
    async fn ensure_node_image(&self, node: &Node) -> Result<Option<NodeImageStatus>, kube::Error> {
        if let Some(existing) = self.node_images.get_opt(&self.node_name).await? {
            return Ok(existing.status);
        }
        let mut object = NodeImage::new(
            &self.node_name,
            NodeImageSpec {
                node_name: self.node_name.clone(),
            },
        );
        object.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".to_string(),
            kind: "Node".to_string(),
            name: self.node_name.clone(),
            uid: node.metadata.uid.clone().unwrap_or_default(),
            ..OwnerReference::default()
        }]);
        let result = self
            .node_images
            .create(&PostParams::default(), &object)
            .await
            .map(drop);
        self.written("nodeimage_create", &result);
        match result {
            Ok(()) => Ok(None),
            // Created meanwhile (a restart racing its previous instance): read it.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(self
                .node_images
                .get_opt(&self.node_name)
                .await?
                .and_then(|n| n.status)),
            Err(error) => Err(error),
        }
    }
}

#[cfg(test)]
mod tests;
