//! The admission webhook: `/mutate` and `/validate/imagesets` over HTTPS (rustls, TLS 1.2 and
//! 1.3), `/healthz`, `/readyz` and `/metrics` on a separate plain-HTTP port.
//!
//! Decisions read an immutable [`Snapshot`] (policies prepared with the cluster state), swapped
//! whole when the state or the policies change, never rebuilt per request.

pub mod admission;
mod cluster;
mod server;
mod standalone;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub use admission::FailureMode;
pub use cluster::{ClusterOptions, ObjectName, ObjectNameError};
pub use server::{Bound, accept_https, run, serve};
pub use standalone::{SnapshotSource, load_snapshot};

use crate::metrics::WebhookMetrics;
use crate::policy::{EvaluatorOptions, Snapshot};

/// Everything `coral webhook` is configured with.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// HTTPS address of the admission routes.
    pub listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// Plain-HTTP address of `/healthz`, `/readyz` and `/metrics`.
    pub probe_listen: SocketAddr,
    pub failure_mode: FailureMode,
    /// Where policies and cluster state come from.
    pub source: Source,
    pub evaluator: EvaluatorOptions,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Time allowed for a client to send its request (headers and body).
    pub request_timeout: Duration,
    /// Decisions evaluated at once (off the async threads).
    pub workers: usize,
    /// How often certificate, state and policy files are checked for changes.
    pub poll_interval: Duration,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
}

/// Where policies and cluster state come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Files, reloaded when they change (`--standalone`).
    Files(SnapshotSource),
    /// The cluster, through watches.
    Cluster(ClusterOptions),
}

/// State shared by the handlers.
pub(crate) struct Shared {
    /// `None` until the first snapshot is built.
    pub snapshot: RwLock<Option<Arc<Snapshot>>>,
    pub metrics: WebhookMetrics,
    pub failure_mode: FailureMode,
    pub workers: Arc<tokio::sync::Semaphore>,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub evaluation_timeout: Duration,
    /// The admission listener is bound with TLS configured, and not shutting down.
    pub listening: AtomicBool,
    /// A first snapshot is installed (in cluster mode: built after every watch listed).
    pub synced: AtomicBool,
}

impl Shared {
    pub fn new(metrics: WebhookMetrics, options: &WebhookOptions) -> Self {
        Self {
            snapshot: RwLock::new(None),
            metrics,
            failure_mode: options.failure_mode,
            workers: Arc::new(tokio::sync::Semaphore::new(options.workers.max(1))),
            max_body_bytes: options.max_body_bytes,
            request_timeout: options.request_timeout,
            evaluation_timeout: options.evaluator.timeout,
            listening: false.into(),
            synced: false.into(),
        }
    }

    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.read().ok().and_then(|s| s.clone())
    }

    pub fn replace_snapshot(&self, snapshot: Snapshot) {
        if let Ok(mut current) = self.snapshot.write() {
            *current = Some(Arc::new(snapshot));
        }
    }
}

/// Ready for admission traffic once synced and listening.
impl crate::probe::Probes for Shared {
    fn ready(&self) -> Result<(), String> {
        if !self.synced.load(Ordering::SeqCst) {
            Err("cluster state not listed yet".to_string())
        } else if !self.listening.load(Ordering::SeqCst) {
            Err("admission listener not serving".to_string())
        } else {
            Ok(())
        }
    }

    fn metrics(&self) -> String {
        self.metrics.render()
    }
}
