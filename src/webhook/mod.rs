//! The admission webhook: `/mutate` and `/validate/imagesets` over HTTPS (rustls, TLS 1.2 and
//! 1.3), `/healthz`, `/readyz` and `/metrics` on a separate plain-HTTP port.
//!
//! Decisions read an immutable [`Snapshot`] (policies prepared with the cluster state), swapped
//! whole when the state or the policies change, never rebuilt per request.

pub mod admission;
mod server;
mod standalone;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub use admission::FailureMode;
pub use server::run;
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
    pub source: SnapshotSource,
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

/// State shared by the handlers.
pub(crate) struct Shared {
    pub snapshot: RwLock<Arc<Snapshot>>,
    pub metrics: WebhookMetrics,
    pub failure_mode: FailureMode,
    pub workers: tokio::sync::Semaphore,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub evaluation_timeout: Duration,
    pub ready: AtomicBool,
}

impl Shared {
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.read().ok().map(|s| s.clone())
    }

    pub fn replace_snapshot(&self, snapshot: Snapshot) {
        if let Ok(mut current) = self.snapshot.write() {
            *current = Arc::new(snapshot);
        }
    }
}
