//! `coral controller`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use coral::controller::mirroring::MirrorOptions;
use coral::controller::{CertTargets, ControllerOptions};
use coral::time::parse_duration;

#[derive(Debug, Args)]
pub struct ControllerArgs {
    /// Coral's namespace: pull-secret copies, the leader Lease, the webhook certificate.
    #[arg(
        long,
        value_name = "NAMESPACE",
        default_value = "coral-system",
        env = "CORAL_NAMESPACE"
    )]
    namespace: String,
    /// This replica's name (its pod name) in the Lease and in Events. Default: the host name.
    #[arg(long, env = "CORAL_POD_NAME")]
    pod_name: Option<String>,
    /// How long the leader's Lease holds without renewal; a standby takes over after it.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration, env = "CORAL_LEASE_DURATION")]
    lease_duration: Duration,
    /// How long agents get to remove a deleted ImageSet's labels before the controller removes
    /// them itself (from nodes whose agent is gone).
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration, env = "CORAL_CLEANUP_TIMEOUT")]
    cleanup_timeout: Duration,
    /// How often everything is reconciled when nothing changes (pull secrets are compared with
    /// their sources then).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration, env = "CORAL_RESYNC")]
    resync: Duration,
    /// Quiet period that coalesces changes into one reconcile.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = parse_duration, env = "CORAL_DEBOUNCE")]
    debounce: Duration,
    /// Issue the webhook's certificate (a self-signed CA kept in a Secret) and keep the
    /// caBundle of Coral's webhook configurations current. Leave off with cert-manager.
    #[arg(long, env = "CORAL_MANAGE_WEBHOOK_CERTS")]
    manage_webhook_certs: bool,
    /// With --manage-webhook-certs: the Secret the webhook mounts.
    #[arg(
        long,
        default_value = "coral-webhook-tls",
        env = "CORAL_WEBHOOK_SECRET"
    )]
    webhook_secret: String,
    /// With --manage-webhook-certs: the webhook's Service (its DNS names go in the certificate).
    #[arg(long, default_value = "coral-webhook", env = "CORAL_WEBHOOK_SERVICE")]
    webhook_service: String,
    /// With --manage-webhook-certs: the MutatingWebhookConfiguration and
    /// ValidatingWebhookConfiguration whose caBundle is kept current.
    #[arg(long, default_value = "coral", env = "CORAL_WEBHOOK_CONFIGURATION")]
    webhook_configuration: String,
    /// Plain-HTTP address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080", env = "CORAL_PROBE_LISTEN")]
    probe_listen: std::net::SocketAddr,
    /// The policy ConfigMap (the webhook's) whose settings.json gives minAvailableNodes for
    /// judging stranded workloads; watched. Absent: the default settings.
    #[arg(
        long,
        value_name = "NAMESPACE/NAME",
        default_value = "coral-system/coral-policies",
        env = "CORAL_POLICIES_CONFIGMAP"
    )]
    policies_configmap: coral::webhook::ObjectName,
    /// Images of mirroring ImageSets copied into their Registry at once.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64), env = "CORAL_MIRROR_CONCURRENCY")]
    mirror_concurrency: u16,
    /// How often a mirrored image's source tag is compared with the mirror; a tag that moved
    /// is copied again (a check transfers nothing when nothing moved).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration, env = "CORAL_MIRROR_RECHECK")]
    mirror_recheck: Duration,
    /// How often every Registry is probed (`GET /v2/` with its credentials) for its
    /// `Reachable` condition.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration, env = "CORAL_REGISTRY_PROBE_INTERVAL")]
    registry_probe_interval: Duration,
    /// How long a copy that no ImageSet mirrors any more stays in its Registry before it is
    /// deleted (its manifest, through the registry API; never while a Pod runs it).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration, env = "CORAL_MIRROR_RETENTION")]
    mirror_retention: Duration,
    /// Never delete copies from Registries.
    #[arg(long, env = "CORAL_MIRROR_KEEP_UNWANTED")]
    mirror_keep_unwanted: bool,
}

pub fn run_controller(args: ControllerArgs) -> Result<ExitCode> {
    super::init_logging();
    let options = ControllerOptions {
        namespace: args.namespace,
        identity: args.pod_name.unwrap_or_else(super::host_name),
        lease_duration: args.lease_duration.max(Duration::from_secs(3)),
        cleanup_timeout: args.cleanup_timeout,
        resync: args.resync,
        debounce: args.debounce,
        certs: args.manage_webhook_certs.then(|| CertTargets {
            secret: args.webhook_secret,
            service: args.webhook_service,
            mutating: args.webhook_configuration.clone(),
            validating: args.webhook_configuration,
        }),
        probe_listen: args.probe_listen,
        policies_configmap: Some(args.policies_configmap),
        mirror: MirrorOptions {
            concurrency: usize::from(args.mirror_concurrency),
            recheck: args.mirror_recheck.max(Duration::from_secs(1)),
            probe_every: args.registry_probe_interval.max(Duration::from_secs(1)),
            retention: (!args.mirror_keep_unwanted).then_some(args.mirror_retention),
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(coral::controller::run(options))?;
    Ok(ExitCode::SUCCESS)
}
