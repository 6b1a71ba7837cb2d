//! `coral webhook`: the admission webhook.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use coral::policy::EvaluatorOptions;

use super::policy::EvaluationArgs;
use super::{host_name, init_logging};

#[derive(Debug, Args)]
pub(super) struct WebhookArgs {
    /// HTTPS address of /mutate and /validate/imagesets.
    #[arg(long, default_value = "0.0.0.0:8443", env = "CORAL_LISTEN")]
    listen: std::net::SocketAddr,
    /// PEM certificate chain; reloaded when the file changes.
    #[arg(long, value_name = "FILE", env = "CORAL_TLS_CERT")]
    tls_cert: PathBuf,
    /// PEM private key (ECDSA, Ed25519 or RSA); reloaded when the file changes.
    #[arg(long, value_name = "FILE", env = "CORAL_TLS_KEY")]
    tls_key: PathBuf,
    /// Plain-HTTP address of /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:8080", env = "CORAL_PROBE_LISTEN")]
    probe_listen: std::net::SocketAddr,
    /// What to answer when no decision can be made: allow (unchanged, with a warning) or deny.
    #[arg(long, value_enum, default_value = "allow", env = "CORAL_FAILURE_MODE")]
    failure_mode: coral::webhook::FailureMode,
    /// Serve from a cluster-state file instead of a cluster (for local policy work and demos).
    #[arg(long, env = "CORAL_STANDALONE")]
    standalone: bool,
    /// With --standalone: the cluster-state file (the format of `coral policy eval --state`);
    /// reloaded when it changes.
    #[arg(long, value_name = "STATE.yaml", env = "CORAL_STATE")]
    state: Option<PathBuf>,
    /// With --standalone: a policy directory or ConfigMap manifest, reloaded when it changes.
    /// Default: the embedded policies.
    #[arg(long, value_name = "DIR|FILE", env = "CORAL_POLICIES")]
    policies: Option<PathBuf>,
    /// In a cluster: the ConfigMap whose policies replace the embedded ones, watched and
    /// reloaded; a version that does not compile is rejected and the last good one serves.
    #[arg(long, value_name = "NAMESPACE/NAME", env = "CORAL_POLICIES_CONFIGMAP")]
    policies_configmap: Option<coral::webhook::ObjectName>,
    /// In a cluster: quiet period after a change before the policy data is rebuilt.
    #[arg(
        long,
        value_name = "MILLISECONDS",
        default_value = "500",
        env = "CORAL_DEBOUNCE_MS"
    )]
    debounce_ms: u64,
    /// In a cluster: this replica's name in the Events it records. Default: the host name.
    #[arg(long, env = "CORAL_POD_NAME")]
    pod_name: Option<String>,
    #[command(flatten)]
    evaluation: EvaluationArgs,
    /// Largest request body accepted (larger ones get HTTP 413).
    #[arg(
        long,
        value_name = "BYTES",
        default_value = "3145728",
        env = "CORAL_MAX_BODY_BYTES"
    )]
    max_body_bytes: usize,
    /// Time a client has to send its request headers and body.
    #[arg(
        long,
        value_name = "MILLISECONDS",
        default_value = "5000",
        env = "CORAL_REQUEST_TIMEOUT_MS"
    )]
    request_timeout_ms: u64,
    /// Decisions evaluated at once. Default: the number of CPUs.
    #[arg(long, env = "CORAL_WORKERS")]
    workers: Option<usize>,
    /// Memory for decisions already made: a request that differs from a decided one only in
    /// its uid (a ReplicaSet's Pods, a reinvocation) is answered from it until the cluster
    /// state or the policies change. 0 turns the cache off.
    #[arg(
        long,
        value_name = "MIB",
        default_value = "8",
        env = "CORAL_DECISION_CACHE_MIB"
    )]
    decision_cache_mib: usize,
    /// How often certificate, state and policy files are checked for changes.
    #[arg(
        long,
        value_name = "MILLISECONDS",
        default_value = "2000",
        env = "CORAL_POLL_INTERVAL_MS"
    )]
    poll_interval_ms: u64,
    /// After SIGTERM, how long in-flight requests may take to finish.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value = "30",
        env = "CORAL_SHUTDOWN_GRACE_SECONDS"
    )]
    shutdown_grace_seconds: u64,
}

pub(super) fn webhook(args: WebhookArgs) -> Result<ExitCode> {
    let WebhookArgs {
        listen,
        tls_cert,
        tls_key,
        probe_listen,
        failure_mode,
        standalone,
        state,
        policies,
        policies_configmap,
        debounce_ms,
        pod_name,
        evaluation,
        max_body_bytes,
        request_timeout_ms,
        workers,
        decision_cache_mib,
        poll_interval_ms,
        shutdown_grace_seconds,
    } = args;
    let source = if standalone {
        let Some(state) = state else {
            bail!("--standalone needs --state FILE (the format of `coral policy eval --state`)");
        };
        if policies_configmap.is_some() {
            bail!(
                "--policies-configmap reads from a cluster; with --standalone use --policies DIR|FILE"
            );
        }
        coral::webhook::Source::Files(coral::webhook::SnapshotSource { state, policies })
    } else {
        if state.is_some() || policies.is_some() {
            bail!(
                "--state and --policies are for --standalone; in a cluster the state comes from \
                 watches and the policies from --policies-configmap"
            );
        }
        coral::webhook::Source::Cluster(coral::webhook::ClusterOptions {
            policies_configmap,
            debounce: Duration::from_millis(debounce_ms),
            instance: pod_name.unwrap_or_else(host_name),
        })
    };
    init_logging();
    let options = coral::webhook::WebhookOptions {
        listen,
        tls_cert,
        tls_key,
        probe_listen,
        failure_mode,
        source,
        evaluator: EvaluatorOptions {
            decision_cache_bytes: decision_cache_mib.saturating_mul(1 << 20),
            ..evaluation.options()?
        },
        max_body_bytes,
        request_timeout: Duration::from_millis(request_timeout_ms),
        workers: workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
        }),
        poll_interval: Duration::from_millis(poll_interval_ms.max(100)),
        shutdown_grace: Duration::from_secs(shutdown_grace_seconds),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(coral::webhook::run(options))?;
    Ok(ExitCode::SUCCESS)
}
