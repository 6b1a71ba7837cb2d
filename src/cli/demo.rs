//! `coral demo`: the admission webhook, standalone on localhost over HTTPS with the embedded
//! default policies and the example cluster state, sent the example workloads as the API server
//! sends them. Everything it needs is compiled into the binary, so it runs anywhere.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use k8s_openapi::jiff::Timestamp;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

use coral::controller::certs;
use coral::index::StateFile;
use coral::policy::{Decision, EvaluatorOptions, PolicyRequest};
use coral::webhook::{FailureMode, SnapshotSource, Source, WebhookOptions, serve};

use super::policy::render_diff;

const STATE_FILE: &str = "examples/state.yaml";
const STATE: &str = include_str!("../../examples/state.yaml");

const WORKLOADS: [(&str, &str); 5] = [
    (
        "examples/workloads/shop-deployment.yaml",
        include_str!("../../examples/workloads/shop-deployment.yaml"),
    ),
    (
        "examples/workloads/report-cronjob.yaml",
        include_str!("../../examples/workloads/report-cronjob.yaml"),
    ),
    (
        "examples/workloads/api-pod.yaml",
        include_str!("../../examples/workloads/api-pod.yaml"),
    ),
    (
        "examples/workloads/batch-deployment.yaml",
        include_str!("../../examples/workloads/batch-deployment.yaml"),
    ),
    (
        "examples/workloads/legacy-deployment.yaml",
        include_str!("../../examples/workloads/legacy-deployment.yaml"),
    ),
];

/// A scratch directory for the demo's state file and certificate, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run() -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(demo())
}

async fn demo() -> Result<ExitCode> {
    let state = StateFile::parse(STATE, STATE_FILE)?;
    let scratch = Scratch(std::env::temp_dir().join(format!("coral-demo-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0)
        .with_context(|| format!("cannot create {}", scratch.0.display()))?;
    let state_path = scratch.0.join("state.yaml");
    std::fs::write(&state_path, STATE)?;
    // A certificate for localhost from a CA made on the spot, as the controller makes them.
    let issued = certs::issue(
        None,
        certs::Renewal::All,
        &["localhost".to_string()],
        "",
        "coral-demo",
        Timestamp::now(),
    )?;
    let data = issued.data.unwrap_or_default();
    let file = |key: &str| -> Result<Vec<u8>> {
        Ok(data
            .get(key)
            .context("issued certificate incomplete")?
            .0
            .clone())
    };
    std::fs::write(scratch.0.join("tls.crt"), file("tls.crt")?)?;
    std::fs::write(scratch.0.join("tls.key"), file("tls.key")?)?;
    let ca = file("ca.crt")?;

    let options = WebhookOptions {
        listen: "127.0.0.1:0".parse()?,
        tls_cert: scratch.0.join("tls.crt"),
        tls_key: scratch.0.join("tls.key"),
        probe_listen: "127.0.0.1:0".parse()?,
        failure_mode: FailureMode::Allow,
        source: Source::Files(SnapshotSource {
            state: state_path,
            policies: None,
        }),
        evaluator: EvaluatorOptions::default(),
        max_body_bytes: 3 << 20,
        request_timeout: Duration::from_secs(5),
        workers: 2,
        poll_interval: Duration::from_secs(60),
        shutdown_grace: Duration::from_secs(5),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(serve(
        options,
        async {
            let _ = stopped.await;
        },
        move |bound| {
            let _ = bound_tx.send(bound);
        },
    ));
    let Ok(bound) = bound_rx.await else {
        server.await??;
        bail!("the webhook stopped before listening");
    };
    println!(
        "Coral demo: the admission webhook, standalone on https://{} with the embedded default \
         policies and the cluster state of {STATE_FILE}: {} ImageSet(s), {} node(s).",
        bound.https,
        state.image_sets.len(),
        state.nodes.len()
    );
    for node in &state.nodes {
        println!(
            "  node {}: holds {}",
            node.name,
            node.images
                .iter()
                .map(|i| &**i)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!(
        "Each workload goes to POST /mutate as an AdmissionReview, as the API server sends it."
    );
    let connector = connector(&ca)?;
    for (number, (name, text)) in WORKLOADS.iter().enumerate() {
        let object: Value =
            serde_yaml::from_str(text).with_context(|| format!("{name} is not valid YAML"))?;
        let mut request = PolicyRequest::create(object.clone(), "default")?;
        request.uid = format!("00000000-0000-4000-8000-{number:012}");
        request.dry_run = false;
        request.user_info = json!({"username": "demo-user", "groups": ["system:authenticated"]});
        let review = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": request,
        });
        let answer = post(&connector, bound.https, "/mutate", &review).await?;
        let decision = decision_of(&answer, &request.uid, object)?;
        let why = text
            .lines()
            .take_while(|line| line.starts_with('#'))
            .map(|line| line.trim_start_matches('#').trim())
            .collect::<Vec<_>>()
            .join(" ");
        println!("\n== {name}\n   {why}");
        print!("{}", render_diff(&request, &decision)?);
    }
    let _ = stop.send(());
    server.await??;
    println!(
        "\nTry your own: coral policy eval -f WORKLOAD.yaml --state {STATE_FILE} [--policies DIR]"
    );
    Ok(ExitCode::SUCCESS)
}

fn connector(ca_pem: &[u8]) -> Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(certificate?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// One HTTPS/1.1 request, verified against the demo's CA; returns the JSON answer.
async fn post(connector: &TlsConnector, to: SocketAddr, path: &str, body: &Value) -> Result<Value> {
    let tcp = tokio::net::TcpStream::connect(to).await?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await
        .context("TLS handshake with the webhook failed")?;
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    // The server closes the connection after its answer (Connection: close); a peer that
    // closes without TLS close_notify still delivered the whole answer.
    if let Err(error) = tls.read_to_end(&mut response).await
        && error.kind() != std::io::ErrorKind::UnexpectedEof
    {
        return Err(error.into());
    }
    let response = String::from_utf8(response).context("the answer is not UTF-8")?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("the answer has no body")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "the webhook answered {}: {body}",
            head.lines().next().unwrap_or_default()
        );
    }
    serde_json::from_str(body).context("the answer is not JSON")
}

/// The decision an AdmissionReview answer carries: its patch applied to the object, its
/// warnings, and its denial.
fn decision_of(answer: &Value, uid: &str, object: Value) -> Result<Decision> {
    let response = &answer["response"];
    if response["uid"] != uid {
        bail!("the answer is for uid {}, not {uid}", response["uid"]);
    }
    let allowed = response["allowed"].as_bool().unwrap_or(false);
    let patch: json_patch::Patch = match response["patch"].as_str() {
        Some(encoded) => serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .context("the patch is not base64")?,
        )
        .context("the patch is not a JSON Patch")?,
        None => json_patch::Patch(Vec::new()),
    };
    let mut patched = object;
    json_patch::patch(&mut patched, &patch).context("the patch does not apply")?;
    let strings = |value: &Value| -> Vec<String> {
        value
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    let denials = if allowed {
        Vec::new()
    } else {
        vec![
            response["status"]["message"]
                .as_str()
                .unwrap_or("denied")
                .to_string(),
        ]
    };
    Ok(Decision {
        allowed,
        patch,
        warnings: strings(&response["warnings"]),
        denials,
        object: patched,
    })
}
