//! The controller: aggregates NodeImages and Node labels into ImageSet status, records Events,
//! owns the ImageSet finalizer, copies pull secrets into Coral's namespace and, optionally,
//! manages the webhook's certificate, and mirrors the images of ImageSets with `spec.mirror`
//! into their Registry. One replica leads (a Lease); only the leader writes and copies.

pub mod aggregate;
pub mod certs;
pub mod leader;
pub mod mirroring;
mod patches;
pub mod retiring;
mod run;
pub mod scale;
pub mod secrets;
pub mod workloads;
mod writer;

use std::net::SocketAddr;
use std::time::Duration;

use crate::webhook::ObjectName;

pub use patches::{
    FINALIZER, add_finalizer_patch, orphan_labels, other_live_sets, remove_finalizer_patch,
    status_patch,
};
pub use run::run;
pub use secrets::referenced_secrets;
pub use writer::{Outcome, Writer, find_stranded};

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
    /// The mirror worker's settings.
    pub mirror: mirroring::MirrorOptions,
}

#[cfg(test)]
mod tests;
