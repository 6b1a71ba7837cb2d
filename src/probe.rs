//! The plain-HTTP probe server of every long-running component: `/healthz`, `/readyz` and
//! `/metrics`. Nothing else is served on it.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tracing::{error, info};

/// What the probes report.
pub trait Probes: Send + Sync + 'static {
    /// `Ok` when ready for work, otherwise why not.
    fn ready(&self) -> Result<(), String>;
    /// The Prometheus text exposition.
    fn metrics(&self) -> String;
}

/// Serves the probes on `listener` until the process ends.
pub fn spawn(listener: TcpListener, probes: Arc<dyn Probes>) {
    if let Ok(address) = listener.local_addr() {
        info!(%address, "probe server listening (healthz, readyz, metrics)");
    }
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(probes);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            error!(%error, "probe server stopped");
        }
    });
}

async fn readyz(State(probes): State<Arc<dyn Probes>>) -> Response {
    match probes.ready() {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}"),
        )
            .into_response(),
    }
}

async fn metrics(State(probes): State<Arc<dyn Probes>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        probes.metrics(),
    )
        .into_response()
}
