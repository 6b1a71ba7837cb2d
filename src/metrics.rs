//! Prometheus metrics, all prefixed `coral_`, with bounded labels (kinds, operations, results,
//! rule names and error classes; never object names or image references).

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Metrics of the admission webhook.
#[derive(Clone)]
pub struct WebhookMetrics {
    registry: Registry,
    /// Admission requests by kind, operation and result.
    pub requests: IntCounterVec,
    /// Seconds from request to response, by route.
    pub request_seconds: HistogramVec,
    /// Seconds spent evaluating policies for one decision.
    pub evaluation_seconds: HistogramVec,
    /// Patches answered, by the top-level field they change.
    pub patches: IntCounterVec,
    /// Policy errors, by class.
    pub policy_errors: IntCounterVec,
    /// Decisions looked up in the decision cache, by result (`hit`, `miss`).
    pub decision_cache: IntCounterVec,
    /// Reloads of policies, state or certificates, by what and result.
    pub reloads: IntCounterVec,
    /// Unix time the policy data (the cluster-state index) was last rebuilt.
    pub index_built: Gauge,
    /// Requests refused before admission (bad body, too large, timed out), by reason.
    pub rejected: IntCounterVec,
    /// Requests answered while the TLS certificate could not be renewed.
    pub certificate_errors: IntCounter,
    /// When the serving certificate in use expires (Unix seconds).
    pub certificate_expiry: IntGauge,
    /// Errors of the cluster watches (each is retried with backoff), by resource.
    pub watch_errors: IntCounterVec,
    /// Objects in the cluster-state index, by resource.
    pub index_objects: IntGaugeVec,
    /// 1 while the policy ConfigMap in the cluster is the one in use; 0 while it is rejected
    /// and the last good policies serve.
    pub policy_configmap_valid: IntGauge,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    // Names and labels are static and valid, so construction cannot fail.
    #[allow(clippy::expect_used)]
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition")
}

fn histogram(name: &str, help: &str, labels: &[&str], buckets: Vec<f64>) -> HistogramVec {
    #[allow(clippy::expect_used)]
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric definition")
}

impl WebhookMetrics {
    pub fn new() -> Self {
        let latency = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ];
        #[allow(clippy::expect_used)]
        let metrics = Self {
            registry: Registry::new(),
            requests: counter(
                "coral_admission_requests_total",
                "Admission requests by kind, operation and result.",
                &["kind", "operation", "result"],
            ),
            request_seconds: histogram(
                "coral_admission_request_duration_seconds",
                "Time from reading a request to answering it.",
                &["route"],
                latency.clone(),
            ),
            evaluation_seconds: histogram(
                "coral_policy_evaluation_duration_seconds",
                "Time spent deciding one request with the policies.",
                &["kind"],
                latency,
            ),
            patches: counter(
                "coral_admission_patches_total",
                "Patch operations answered, by the pod-spec field they change.",
                &["field"],
            ),
            policy_errors: counter(
                "coral_policy_errors_total",
                "Decisions that failed, by class (evaluation, timeout, rail, ...).",
                &["class"],
            ),
            decision_cache: counter(
                "coral_decision_cache_requests_total",
                "Decisions looked up in the cache of decisions made with the current state and policies, by result (hit, miss).",
                &["result"],
            ),
            reloads: counter(
                "coral_reloads_total",
                "Reloads of policies, cluster state and TLS certificates, by result.",
                &["what", "result"],
            ),
            index_built: Gauge::new(
                "coral_index_built_timestamp_seconds",
                "Unix time the policy data was last rebuilt from the cluster state.",
            )
            .expect("valid metric definition"),
            rejected: counter(
                "coral_http_rejected_total",
                "Requests refused before admission, by reason.",
                &["reason"],
            ),
            certificate_expiry: IntGauge::new(
                "coral_tls_certificate_expiry_timestamp_seconds",
                "Unix time the serving certificate in use expires.",
            )
            .expect("valid metric definition"),
            certificate_errors: IntCounter::new(
                "coral_tls_certificate_errors_total",
                "Failed loads of the TLS certificate or key (the last good pair is kept).",
            )
            .expect("valid metric definition"),
            watch_errors: counter(
                "coral_watch_errors_total",
                "Errors of the cluster watches (retried with backoff), by resource.",
                &["resource"],
            ),
            index_objects: IntGaugeVec::new(
                Opts::new(
                    "coral_index_objects",
                    "Objects in the cluster-state index, by resource.",
                ),
                &["resource"],
            )
            .expect("valid metric definition"),
            policy_configmap_valid: IntGauge::new(
                "coral_policy_configmap_valid",
                "1 while the policy ConfigMap is in use, 0 while it is rejected (the last good policies serve).",
            )
            .expect("valid metric definition"),
        };
        metrics.policy_configmap_valid.set(1);
        register(&metrics.registry, metrics.collectors());
        metrics
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.requests.clone()),
            Box::new(self.request_seconds.clone()),
            Box::new(self.evaluation_seconds.clone()),
            Box::new(self.patches.clone()),
            Box::new(self.policy_errors.clone()),
            Box::new(self.decision_cache.clone()),
            Box::new(self.reloads.clone()),
            Box::new(self.index_built.clone()),
            Box::new(self.rejected.clone()),
            Box::new(self.certificate_errors.clone()),
            Box::new(self.certificate_expiry.clone()),
            Box::new(self.watch_errors.clone()),
            Box::new(self.index_objects.clone()),
            Box::new(self.policy_configmap_valid.clone()),
        ]
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

impl Default for WebhookMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Metrics of the node agent and `coral prefetch`.
#[derive(Clone)]
pub struct AgentMetrics {
    registry: Registry,
    /// Pulls by result (`success`, `failure`).
    pub pulls: IntCounterVec,
    /// Seconds a successful pull took.
    pub pull_seconds: prometheus::Histogram,
    /// Bytes of the images pulled (their size as the runtime reports it).
    pub pulled_bytes: IntCounter,
    /// Wanted images by state (`wanted`, `available`, `pulling`, `failed`, `paused`).
    pub images: IntGaugeVec,
    /// 1 while pulls are paused under node pressure or the image-filesystem budget.
    pub paused: IntGauge,
    /// Failed CRI calls by operation and gRPC code.
    pub cri_errors: IntCounterVec,
    /// Images that disappeared after being available (kubelet garbage collection).
    pub vanished: IntCounter,
    /// Images removed from the runtime because no ImageSet wants them, by reason (`grace`,
    /// `watermark`).
    pub removed: IntCounterVec,
    /// Images no ImageSet wants any more, still on the node.
    pub unwanted_images: IntGauge,
    /// Their size, as the runtime reports it.
    pub unwanted_bytes: IntGauge,
    /// Tags resolved again under `spec.refresh`, by result (`unchanged`, `moved`, `failed`).
    pub refreshes: IntCounterVec,
    /// Wanted images this agent pinned on containerd.
    pub pinned_images: IntGauge,
    /// Writes to the API server by what (`node_labels`, `nodeimage`) and result.
    pub writes: IntCounterVec,
    /// Pulls of a mirror's copy before the source (`success`, `failure`: the source is
    /// pulled all the same).
    pub mirror_pulls: IntCounterVec,
}

impl AgentMetrics {
    pub fn new() -> Self {
        #[allow(clippy::expect_used)]
        let metrics = Self {
            registry: Registry::new(),
            pulls: counter(
                "coral_agent_pulls_total",
                "Image pulls by result.",
                &["result"],
            ),
            pull_seconds: prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "coral_agent_pull_duration_seconds",
                    "Time a successful pull took.",
                )
                .buckets(vec![
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                ]),
            )
            .expect("valid metric definition"),
            pulled_bytes: IntCounter::new(
                "coral_agent_pulled_bytes_total",
                "Size of the images pulled, as the runtime reports it.",
            )
            .expect("valid metric definition"),
            images: IntGaugeVec::new(
                Opts::new("coral_agent_images", "Wanted images by state."),
                &["state"],
            )
            .expect("valid metric definition"),
            paused: IntGauge::new(
                "coral_agent_paused",
                "1 while pulls are paused under node pressure or the image-filesystem budget.",
            )
            .expect("valid metric definition"),
            cri_errors: counter(
                "coral_agent_cri_errors_total",
                "Failed CRI calls by operation and gRPC code.",
                &["operation", "code"],
            ),
            vanished: IntCounter::new(
                "coral_agent_vanished_images_total",
                "Images that disappeared after being available (kubelet garbage collection).",
            )
            .expect("valid metric definition"),
            removed: counter(
                "coral_agent_removed_images_total",
                "Images removed from the runtime because no ImageSet wants them, by reason.",
                &["reason"],
            ),
            unwanted_images: IntGauge::new(
                "coral_agent_unwanted_images",
                "Images no ImageSet wants any more, still on the node.",
            )
            .expect("valid metric definition"),
            unwanted_bytes: IntGauge::new(
                "coral_agent_unwanted_bytes",
                "Size of the images no ImageSet wants any more, still on the node.",
            )
            .expect("valid metric definition"),
            refreshes: counter(
                "coral_agent_refreshes_total",
                "Tags resolved again under spec.refresh, by result.",
                &["result"],
            ),
            pinned_images: IntGauge::new(
                "coral_agent_pinned_images",
                "Wanted images this agent pinned on containerd, out of the kubelet's image garbage collection.",
            )
            .expect("valid metric definition"),
            writes: counter(
                "coral_agent_api_writes_total",
                "Writes to the API server by what and result.",
                &["what", "result"],
            ),
            mirror_pulls: counter(
                "coral_agent_mirror_pulls_total",
                "Pulls of a mirror's copy before the source, by result.",
                &["result"],
            ),
        };
        register(&metrics.registry, metrics.collectors());
        metrics
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        let metrics = self;
        vec![
            Box::new(metrics.pulls.clone()),
            Box::new(metrics.pull_seconds.clone()),
            Box::new(metrics.pulled_bytes.clone()),
            Box::new(metrics.images.clone()),
            Box::new(metrics.paused.clone()),
            Box::new(metrics.cri_errors.clone()),
            Box::new(metrics.vanished.clone()),
            Box::new(metrics.removed.clone()),
            Box::new(metrics.unwanted_images.clone()),
            Box::new(metrics.unwanted_bytes.clone()),
            Box::new(metrics.refreshes.clone()),
            Box::new(metrics.pinned_images.clone()),
            Box::new(metrics.writes.clone()),
            Box::new(metrics.mirror_pulls.clone()),
        ]
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Every metric Coral's components export: its name, and the names of its labels. What the
/// alerts and the dashboard in `deploy/overlays/monitoring` may use.
pub fn catalog() -> std::collections::BTreeMap<String, Vec<String>> {
    let collectors = WebhookMetrics::new()
        .collectors()
        .into_iter()
        .chain(AgentMetrics::new().collectors())
        .chain(ControllerMetrics::new().collectors());
    let mut catalog = std::collections::BTreeMap::new();
    for collector in collectors {
        for desc in collector.desc() {
            catalog.insert(desc.fq_name.clone(), desc.variable_labels.clone());
        }
    }
    catalog
}

fn register(registry: &Registry, collectors: Vec<Box<dyn Collector>>) {
    for collector in collectors {
        // Each collector is registered once, on a fresh registry: no duplicates.
        #[allow(clippy::expect_used)]
        registry
            .register(collector)
            .expect("metric registered once");
    }
}

fn render(registry: &Registry) -> String {
    let mut buffer = Vec::new();
    let encoder = TextEncoder::new();
    if let Err(error) = encoder.encode(&registry.gather(), &mut buffer) {
        return format!("# error encoding metrics: {error}\n");
    }
    String::from_utf8(buffer).unwrap_or_default()
}

/// Metrics of the controller.
#[derive(Clone)]
pub struct ControllerMetrics {
    registry: Registry,
    /// ImageSet reconciles by result.
    pub reconciles: IntCounterVec,
    /// Seconds one ImageSet's reconcile took.
    pub reconcile_seconds: prometheus::Histogram,
    /// ImageSets by condition type and status.
    pub image_sets: IntGaugeVec,
    /// Share of (image, targeted node) pairs where the image is available.
    pub available_ratio: Gauge,
    /// ImageSet images held under different digests across nodes, or by nodes and the mirror.
    pub drifting_images: IntGauge,
    /// 1 while this replica leads.
    pub leader: IntGauge,
    /// Workloads whose pod template requires image labels too few schedulable nodes satisfy,
    /// by kind.
    pub stranded_workloads: IntGaugeVec,
    /// Bytes of blobs copied into each Registry.
    pub mirror_bytes: IntCounterVec,
    /// Blobs of mirrored images by registry and result (`copied`, `skipped`: already there).
    pub mirror_blobs: IntCounterVec,
    /// Seconds one image's copy (or check) took, by registry.
    pub mirror_seconds: HistogramVec,
    /// Failed copies by registry and reason (`source`, `mirror`, `digest`, `invalid`,
    /// `registry`: the Registry missing or unusable; `delete`: a retired copy not deleted).
    pub mirror_failures: IntCounterVec,
    /// Copies no ImageSet mirrors any more deleted from their Registry, by registry.
    pub mirror_deleted: IntCounterVec,
    /// Images of mirroring ImageSets by state (`copying`, `mirrored`, `failed`).
    pub mirror_images: IntGaugeVec,
    /// 1 while a Registry's last probe answered, by registry.
    pub registry_reachable: IntGaugeVec,
}

impl ControllerMetrics {
    pub fn new() -> Self {
        #[allow(clippy::expect_used)]
        let metrics = Self {
            registry: Registry::new(),
            reconciles: counter(
                "coral_controller_reconciles_total",
                "ImageSet reconciles by result.",
                &["result"],
            ),
            reconcile_seconds: prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "coral_controller_reconcile_duration_seconds",
                    "Time one ImageSet's reconcile took.",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            )
            .expect("valid metric definition"),
            image_sets: IntGaugeVec::new(
                Opts::new(
                    "coral_controller_imagesets",
                    "ImageSets by condition type and status.",
                ),
                &["condition", "status"],
            )
            .expect("valid metric definition"),
            drifting_images: IntGauge::new(
                "coral_controller_drifting_images",
                "ImageSet images held under different digests across nodes, or by nodes and the mirror.",
            )
            .expect("valid metric definition"),
            available_ratio: Gauge::new(
                "coral_controller_available_ratio",
                "Share of (image, targeted node) pairs where the image is available.",
            )
            .expect("valid metric definition"),
            leader: IntGauge::new("coral_controller_leader", "1 while this replica leads.")
                .expect("valid metric definition"),
            stranded_workloads: IntGaugeVec::new(
                Opts::new(
                    "coral_stranded_workloads",
                    "Workloads whose pod template requires image labels that fewer than minAvailableNodes schedulable nodes satisfy, by kind.",
                ),
                &["kind"],
            )
            .expect("valid metric definition"),
            mirror_bytes: counter(
                "coral_mirror_bytes_copied_total",
                "Bytes of blobs copied into each Registry.",
                &["registry"],
            ),
            mirror_blobs: counter(
                "coral_mirror_blobs_total",
                "Blobs of mirrored images by registry and result (copied, skipped: already there).",
                &["registry", "result"],
            ),
            mirror_seconds: histogram(
                "coral_mirror_copy_duration_seconds",
                "Time one image's copy or check took, by registry.",
                &["registry"],
                vec![0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1200.0],
            ),
            mirror_failures: counter(
                "coral_mirror_failures_total",
                "Failed copies by registry and reason (source, mirror, digest, invalid, registry, delete).",
                &["registry", "reason"],
            ),
            mirror_deleted: counter(
                "coral_mirror_deleted_total",
                "Copies no ImageSet mirrors any more deleted from their Registry, by registry.",
                &["registry"],
            ),
            mirror_images: IntGaugeVec::new(
                Opts::new(
                    "coral_mirror_images",
                    "Images of mirroring ImageSets by state (copying, mirrored, failed).",
                ),
                &["state"],
            )
            .expect("valid metric definition"),
            registry_reachable: IntGaugeVec::new(
                Opts::new(
                    "coral_registry_reachable",
                    "1 while a Registry's last probe answered, by registry.",
                ),
                &["registry"],
            )
            .expect("valid metric definition"),
        };
        register(&metrics.registry, metrics.collectors());
        metrics
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        let metrics = self;
        vec![
            Box::new(metrics.mirror_bytes.clone()),
            Box::new(metrics.mirror_blobs.clone()),
            Box::new(metrics.mirror_seconds.clone()),
            Box::new(metrics.mirror_failures.clone()),
            Box::new(metrics.mirror_deleted.clone()),
            Box::new(metrics.mirror_images.clone()),
            Box::new(metrics.registry_reachable.clone()),
            Box::new(metrics.reconciles.clone()),
            Box::new(metrics.reconcile_seconds.clone()),
            Box::new(metrics.image_sets.clone()),
            Box::new(metrics.available_ratio.clone()),
            Box::new(metrics.drifting_images.clone()),
            Box::new(metrics.leader.clone()),
            Box::new(metrics.stranded_workloads.clone()),
        ]
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}
