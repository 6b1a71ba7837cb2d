//! Prometheus metrics, all prefixed `coral_`, with bounded labels (kinds, operations, results,
//! rule names and error classes; never object names or image references).

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
    /// Reloads of policies, state or certificates, by what and result.
    pub reloads: IntCounterVec,
    /// Unix time the policy data (the cluster-state index) was last rebuilt.
    pub index_built: Gauge,
    /// Requests refused before admission (bad body, too large, timed out), by reason.
    pub rejected: IntCounterVec,
    /// Requests answered while the TLS certificate could not be renewed.
    pub certificate_errors: IntCounter,
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
        metrics.register_all();
        metrics
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.requests.clone()),
            Box::new(self.request_seconds.clone()),
            Box::new(self.evaluation_seconds.clone()),
            Box::new(self.patches.clone()),
            Box::new(self.policy_errors.clone()),
            Box::new(self.reloads.clone()),
            Box::new(self.index_built.clone()),
            Box::new(self.rejected.clone()),
            Box::new(self.certificate_errors.clone()),
            Box::new(self.watch_errors.clone()),
            Box::new(self.index_objects.clone()),
            Box::new(self.policy_configmap_valid.clone()),
        ];
        for collector in collectors {
            // Each collector is registered once, on a fresh registry: no duplicates.
            #[allow(clippy::expect_used)]
            self.registry
                .register(collector)
                .expect("metric registered once");
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(error) = encoder.encode(&self.registry.gather(), &mut buffer) {
            return format!("# error encoding metrics: {error}\n");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for WebhookMetrics {
    fn default() -> Self {
        Self::new()
    }
}
