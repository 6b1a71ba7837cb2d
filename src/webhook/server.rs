//! The HTTPS admission server, the plain-HTTP probe server, file polling and shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

use super::admission::{
    Answer, MutateStep, Review, decided_response, decision_response, failure_response, mutate_step,
    patched_fields, validate_image_set_review,
};
use super::standalone::{Stamp, source_stamp};
use super::tls::{Reload, ReloadingCert};
use super::{Shared, SnapshotSource, Source, WebhookOptions, load_snapshot};
use crate::metrics::WebhookMetrics;
use crate::policy::{Decision, PolicyRequest, WorkloadKind};
use crate::time::unix_now;

/// Time a client has to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The addresses the webhook is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub https: std::net::SocketAddr,
    pub probes: std::net::SocketAddr,
}

/// Runs the webhook until SIGTERM or SIGINT, then lets in-flight requests finish.
pub async fn run(options: WebhookOptions) -> anyhow::Result<()> {
    serve(options, shutdown_signal(), |_| {}).await
}

/// Runs the webhook until `shutdown` completes, then lets in-flight requests finish.
/// `on_bound` learns the addresses once both listeners are bound.
pub async fn serve(
    options: WebhookOptions,
    shutdown: impl std::future::Future<Output = ()>,
    on_bound: impl FnOnce(Bound),
) -> anyhow::Result<()> {
    let metrics = WebhookMetrics::new();
    let cert = Arc::new(ReloadingCert::load(&options.tls_cert, &options.tls_key)?);
    let tls = TlsAcceptor::from(Arc::new(cert.server_config()?));
    if let Some(expiry) = cert.not_after() {
        metrics.certificate_expiry.set(expiry);
    }
    let shared = Arc::new(Shared::new(metrics, &options));
    let files = match &options.source {
        Source::Files(files) => {
            shared.replace_snapshot(load_snapshot(files, &options.evaluator)?);
            shared.metrics.index_built.set(unix_now());
            shared.synced.store(true, Ordering::SeqCst);
            Some((files.clone(), source_stamp(files)))
        }
        Source::Cluster(cluster) => {
            let client = crate::cluster::client()
                .await
                .context("run with --standalone --state FILE to serve without a cluster")?;
            info!(
                policies = %cluster.policies_configmap.as_ref().map_or("embedded".to_string(), ToString::to_string),
                "watching the cluster; ready after the first full list"
            );
            tokio::spawn(super::cluster::sync(
                client,
                cluster.clone(),
                options.evaluator.clone(),
                shared.clone(),
            ));
            None
        }
    };

    let probes = TcpListener::bind(options.probe_listen).await?;
    let probes_address = probes.local_addr()?;
    crate::probe::spawn(probes, shared.clone());

    let listener = TcpListener::bind(options.listen).await?;
    tokio::spawn(poll_files(
        shared.clone(),
        cert.clone(),
        options.clone(),
        files,
    ));
    // TLS configured and the listener bound; ready once synced too.
    shared.listening.store(true, Ordering::SeqCst);
    info!(address = %listener.local_addr()?, "admission server listening (HTTPS)");
    on_bound(Bound {
        https: listener.local_addr()?,
        probes: probes_address,
    });

    let app = Router::new()
        .route("/mutate", post(mutate))
        .route("/validate/imagesets", post(validate))
        .with_state(shared.clone());
    // The listener closes when the loop ends: no new connections.
    let graceful = accept_https(listener, tls, app, options.request_timeout, shutdown).await;
    info!("shutting down: no new connections; waiting for in-flight requests");
    shared.listening.store(false, Ordering::SeqCst);
    tokio::select! {
        () = graceful.shutdown() => info!("all connections closed"),
        () = tokio::time::sleep(options.shutdown_grace) => warn!("shutdown grace period over; exiting with connections open"),
    }
    Ok(())
}

/// Serves `app` over TLS on `listener` (HTTP/1.1 with keep-alive, TCP_NODELAY, handshake and
/// header timeouts) until `shutdown` completes; the answer is what tracks the connections
/// still open. The benchmarks' no-op responder serves on the same stack.
pub async fn accept_https(
    listener: TcpListener,
    tls: TlsAcceptor,
    app: Router,
    request_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> GracefulShutdown {
    let service = TowerToHyperService::new(app);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        warn!(%error, "accept failed");
                        continue;
                    }
                };
                // Small request, small answer: send it now rather than wait to coalesce.
                if let Err(error) = tcp.set_nodelay(true) {
                    info!(%peer, %error, "cannot set TCP_NODELAY");
                }
                let tls = tls.clone();
                let service = service.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => {
                            info!(%peer, %error, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            info!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let mut http = hyper::server::conn::http1::Builder::new();
                    http.timer(TokioTimer::new())
                        .header_read_timeout(request_timeout);
                    let connection = http.serve_connection(TokioIo::new(stream), service);
                    if let Err(error) = watcher.watch(connection).await {
                        info!(%peer, %error, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    graceful
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = terminate => info!("SIGTERM received"),
        result = tokio::signal::ctrl_c() => {
            if result.is_ok() {
                info!("SIGINT received");
            }
        }
    }
}

/// Reloads the certificate, and in standalone mode the snapshot, when their files change.
async fn poll_files(
    shared: Arc<Shared>,
    cert: Arc<ReloadingCert>,
    options: WebhookOptions,
    mut files: Option<(SnapshotSource, Stamp)>,
) {
    let mut interval = tokio::time::interval(options.poll_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        match cert.reload_if_changed() {
            Ok(Reload::Unchanged) => {}
            Ok(Reload::Reloaded) => {
                info!("TLS certificate reloaded");
                if let Some(expiry) = cert.not_after() {
                    shared.metrics.certificate_expiry.set(expiry);
                }
                shared
                    .metrics
                    .reloads
                    .with_label_values(&["certificate", "success"])
                    .inc();
            }
            Err(error) => {
                error!(%error, "TLS certificate not reloaded; keeping the previous one");
                shared
                    .metrics
                    .reloads
                    .with_label_values(&["certificate", "failure"])
                    .inc();
                shared.metrics.certificate_errors.inc();
            }
        }
        let Some((source, stamp)) = &mut files else {
            continue;
        };
        let current = source_stamp(source);
        if current == *stamp {
            continue;
        }
        *stamp = current;
        let source = source.clone();
        let evaluator = options.evaluator.clone();
        let loaded = tokio::task::spawn_blocking(move || load_snapshot(&source, &evaluator)).await;
        match loaded {
            Ok(Ok(snapshot)) => {
                shared.replace_snapshot(snapshot);
                shared.metrics.index_built.set(unix_now());
                shared
                    .metrics
                    .reloads
                    .with_label_values(&["state", "success"])
                    .inc();
                info!("policies and cluster state reloaded");
            }
            Ok(Err(error)) => {
                shared
                    .metrics
                    .reloads
                    .with_label_values(&["state", "failure"])
                    .inc();
                error!(%error, class = error.metric_label(), "reload failed; keeping the last good policies and state");
            }
            Err(error) => error!(%error, "reload task failed"),
        }
    }
}

fn json_response(value: &Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn refuse(shared: &Shared, status: StatusCode, reason: &'static str, message: String) -> Response {
    shared.metrics.rejected.with_label_values(&[reason]).inc();
    info!(reason, %message, "request refused");
    (status, message).into_response()
}

/// Reads the body within the size limit and the request timeout, and parses the review.
async fn read_review(shared: &Shared, request: Request) -> Result<Review, Response> {
    let body: Body = request.into_body();
    let bytes = match tokio::time::timeout(
        shared.request_timeout,
        to_bytes(body, shared.max_body_bytes),
    )
    .await
    {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return Err(refuse(
                shared,
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "request body is larger than {} bytes, or was cut off",
                    shared.max_body_bytes
                ),
            ));
        }
        Err(_) => {
            return Err(refuse(
                shared,
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!(
                    "request body not received within {:?}",
                    shared.request_timeout
                ),
            ));
        }
    };
    Review::parse(&bytes).map_err(|error| {
        refuse(
            shared,
            StatusCode::BAD_REQUEST,
            error.metric_label(),
            error.to_string(),
        )
    })
}

async fn mutate(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let started = Instant::now();
    let review = match read_review(&shared, request).await {
        Ok(review) => review,
        Err(response) => return response,
    };
    let (kind, operation) = review.kind_and_operation();
    let Some(snapshot) = shared.snapshot() else {
        let (value, answer) = failure_response(
            &review.uid,
            shared.failure_mode,
            "the cluster state is not listed yet",
        );
        return finish(&shared, "mutate", started, kind, operation, answer, &value);
    };
    let uid = review.uid.clone();
    let (value, answer) = match mutate_step(
        review,
        shared.failure_mode,
        snapshot.skip_controlled_pods,
        snapshot.mirror_by_default,
    ) {
        MutateStep::Answer(value, answer) => (value, answer),
        MutateStep::Decide(request) => decide(&shared, snapshot, *request, &uid, kind).await,
    };
    finish(&shared, "mutate", started, kind, operation, answer, &value)
}

/// Decides a request: from the snapshot's cache when it was decided before, with the policies
/// on a worker otherwise.
async fn decide(
    shared: &Shared,
    snapshot: Arc<crate::policy::Snapshot>,
    mut request: PolicyRequest,
    uid: &str,
    kind: &'static str,
) -> (Value, Answer) {
    let workload = request.workload_kind();
    let key = snapshot.cache.key(&mut request);
    if let Some(key) = &key {
        let cached = snapshot.cache.get(key);
        let result = if cached.is_some() { "hit" } else { "miss" };
        shared
            .metrics
            .decision_cache
            .with_label_values(&[result])
            .inc();
        if let Some(decision) = cached {
            if let Ok(workload) = workload {
                count_patches(shared, &decision, workload);
            }
            return decision_response(uid, &decision);
        }
    }
    // The wait for a worker counts: the answer comes within twice the evaluation bound
    // whatever runs. The worker stays taken until its evaluation ends (the evaluation guard
    // ends a runaway one), so stuck evaluations never pile up beyond the workers.
    // The evaluation's own time is measured from when it has a worker (none: it never got one).
    let mut evaluation_started = None;
    let decided = tokio::time::timeout(shared.evaluation_timeout * 2, async {
        // The semaphore is never closed.
        let permit = shared.workers.clone().acquire_owned().await.ok();
        evaluation_started = Some(Instant::now());
        let snapshot = snapshot.clone();
        tokio::task::spawn_blocking(move || {
            let decided = snapshot.decide(&request);
            drop(permit);
            decided
        })
        .await
    })
    .await;
    if let Some(started) = evaluation_started {
        shared
            .metrics
            .evaluation_seconds
            .with_label_values(&[kind])
            .observe(started.elapsed().as_secs_f64());
    }
    match decided {
        Ok(Ok(result)) => {
            match &result {
                Ok(decision) => {
                    if let Ok(workload) = workload {
                        count_patches(shared, decision, workload);
                    }
                    if let Some(key) = key {
                        snapshot.cache.insert(key, decision);
                    }
                }
                Err(error) => {
                    shared
                        .metrics
                        .policy_errors
                        .with_label_values(&[error.metric_label()])
                        .inc();
                    warn!(uid = %uid, kind, %error, "policy decision failed");
                }
            }
            decided_response(uid, shared.failure_mode, result)
        }
        Ok(Err(error)) => {
            shared
                .metrics
                .policy_errors
                .with_label_values(&["panic"])
                .inc();
            error!(uid = %uid, %error, "policy evaluation task failed");
            failure_response(
                uid,
                shared.failure_mode,
                "policy evaluation failed unexpectedly",
            )
        }
        Err(_) => {
            shared
                .metrics
                .policy_errors
                .with_label_values(&["timeout"])
                .inc();
            failure_response(uid, shared.failure_mode, "policy evaluation timed out")
        }
    }
}

fn count_patches(shared: &Shared, decision: &Decision, workload: WorkloadKind) {
    for (field, count) in patched_fields(decision, workload) {
        shared
            .metrics
            .patches
            .with_label_values(&[field])
            .inc_by(count as u64);
    }
}

async fn validate(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let started = Instant::now();
    let review = match read_review(&shared, request).await {
        Ok(review) => review,
        Err(response) => return response,
    };
    let (kind, operation) = review.kind_and_operation();
    let (value, answer) = validate_image_set_review(review);
    finish(
        &shared, "validate", started, kind, operation, answer, &value,
    )
}

fn finish(
    shared: &Shared,
    route: &str,
    started: Instant,
    kind: &str,
    operation: &str,
    answer: Answer,
    value: &Value,
) -> Response {
    shared
        .metrics
        .requests
        .with_label_values(&[kind, operation, answer.metric_label()])
        .inc();
    shared
        .metrics
        .request_seconds
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    json_response(value)
}
