//! Coral against a real Kubernetes control plane built from the Kubernetes modules
//! (`scripts/control-plane.sh`): the real `coral webhook`, `coral controller` and `coral agent`,
//! each under its own ServiceAccount with the RBAC of `deploy/`, the webhook registered with a
//! MutatingWebhookConfiguration made from `deploy/`'s (a `url` on loopback, since nothing routes
//! Service IPs here), and the real scheduler and controller manager making and binding Pods.
//!
//! One file per concern: `placement`, `install`, `agent`, `controller` (and its lease),
//! `mirror`, `lifecycle`; the helpers they share are here and in `tests/support`.
//!
//! Needs the control plane: `scripts/test.sh` builds it and runs this with `--ignored`; without
//! it the tests are reported as ignored, never as passed.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test helpers panic on setup failures

#[path = "../support/mod.rs"]
mod support;

#[path = "../support/runtime.rs"]
#[allow(dead_code)]
mod runtime;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use support::control_plane::ControlPlane;
use support::{Webhook, get_probe};

#[path = "../support/node.rs"]
#[allow(dead_code)]
mod node;

#[path = "../support/buildkit.rs"]
#[allow(dead_code)]
mod buildkit;

mod agent;
mod controller;
mod install;
mod lifecycle;
mod mirror;
mod nodes;
mod placement;

fn label(image: &str) -> String {
    coral::image::label_key(&coral::image::ImageReference::parse(image).unwrap())
}

/// The objects of a YAML file of the repository.
fn manifests(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).unwrap())
        .filter(|value| !value.is_null())
        .collect()
}

/// The object `kubectl get … -o json` answers, once it exists.
fn wait_for(plane: &ControlPlane, what: &str, args: &[&str]) -> Value {
    let mut found = Value::Null;
    wait_until(what, Duration::from_secs(30), || {
        let output = plane.kubectl(args);
        found = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        output.status.success()
    });
    found
}

/// A Deployment of `images` in `shop`, asking for both injections, with `pod_spec` merged in.
fn deployment(app: &str, images: &[&str], pod_spec: Value) -> Value {
    let containers: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(i, image)| json!({"name": format!("c{i}"), "image": image}))
        .collect();
    let mut spec = json!({"containers": containers});
    for (key, value) in pod_spec.as_object().unwrap() {
        spec[key] = value.clone();
    }
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": app, "namespace": "shop", "annotations": {"coral.dev/inject": "selectors,pull-policy"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": app}},
            "template": {"metadata": {"labels": {"app": app}}, "spec": spec},
        },
    })
}

/// The binaries of `scripts/control-plane.sh`.
fn control_plane_binaries() -> std::path::PathBuf {
    ControlPlane::binaries().unwrap_or_else(|| {
        panic!(
            "{} is not set: run scripts/control-plane.sh",
            support::control_plane::BIN_ENV
        )
    })
}

/// A control plane with Coral's CRDs (Established), namespace and RBAC as `deploy/` has them,
/// the manifests of `extra`, and the namespace `shop`.
fn coral_control_plane(extra: &[&str]) -> ControlPlane {
    install_coral(ControlPlane::start(&control_plane_binaries()), extra)
}

/// Coral's CRDs, namespace and RBAC, the manifests of `extra` and the namespace `shop`, on
/// `plane`.
fn install_coral(plane: ControlPlane, extra: &[&str]) -> ControlPlane {
    let mut args = vec![
        "apply",
        "-f",
        "crds/",
        "-f",
        "deploy/base/namespace.yaml",
        "-f",
        "deploy/base/rbac.yaml",
    ];
    for manifest in extra {
        args.extend(["-f", manifest]);
    }
    plane.kubectl_ok(&args);
    wait_for_crds(&plane);
    plane.kubectl_ok(&["create", "namespace", "shop"]);
    plane
}

/// The same, the namespace `shop` opted in to Coral's injections.
fn injecting_control_plane() -> ControlPlane {
    let plane = coral_control_plane(&[]);
    plane.kubectl_ok(&["label", "namespace", "shop", "coral.dev/inject=enabled"]);
    plane
}

/// Waits until Coral's CRDs are Established.
fn wait_for_crds(plane: &ControlPlane) {
    plane.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/imagesets.coral.dev",
        "crd/nodeimages.coral.dev",
        "crd/registries.coral.dev",
        "--timeout=30s",
    ]);
}

fn image_set_status(plane: &ControlPlane) -> Value {
    let output = plane.kubectl(&["get", "imageset", "shop", "-n", "shop", "-o", "json"]);
    serde_json::from_slice::<Value>(&output.stdout)
        .map(|set| set["status"].clone())
        .unwrap_or(Value::Null)
}

/// A plain HTTP GET; the whole answer, status line first (empty when nothing listens).
fn http_get(address: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(address) else {
        return String::new();
    };
    let _ = write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A `coral controller` under the coral-controller ServiceAccount, killed when dropped; its
/// probes and metrics at `.probes`.
fn start_controller(plane: &ControlPlane, name: &str) -> support::process::Daemon {
    start_controller_with(plane, name, &[])
}

/// The same, with more flags.
fn start_controller_with(
    plane: &ControlPlane,
    name: &str,
    extra: &[&str],
) -> support::process::Daemon {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_coral"));
    command
        .args(["controller", "--pod-name", name, "--lease-duration", "3s"])
        .args(["--debounce", "100ms", "--resync", "2s"])
        .args(extra)
        .env(
            "KUBECONFIG",
            plane.service_account_kubeconfig("coral-system", "coral-controller"),
        )
        .env("KUBERNETES_SERVICE_HOST", "");
    support::process::Daemon::spawn(&format!("controller {name}"), command)
}

/// `coral agent` for node `name` on `containerd`; its probes and metrics at `.probes`.
fn start_agent_process(
    name: &str,
    containerd: &runtime::Containerd,
    kubeconfig: &std::path::Path,
    extra: &[&str],
) -> support::process::Daemon {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_coral"));
    command
        .args(["agent", "--node-name", name, "--debounce", "50ms"])
        .args(extra)
        .args(["--cri-socket", &containerd.address()])
        .args(["--initial-backoff", "500ms", "--max-backoff", "2s"])
        .args(["--resync", "2s"])
        .env("KUBECONFIG", kubeconfig)
        .env("KUBERNETES_SERVICE_HOST", "");
    support::process::Daemon::spawn(&format!("agent of {name}"), command)
}

/// One containerd "node" with its `coral agent`.
struct AgentNode {
    name: String,
    containerd: runtime::Containerd,
    /// Where the agent's metrics answer (its last life's, once killed).
    metrics: std::net::SocketAddr,
    kubeconfig: std::path::PathBuf,
    agent: Option<support::process::Daemon>,
    /// Successful pulls of the agent's earlier lives.
    pulls_before: u64,
}

impl AgentNode {
    /// A node `name` with a containerd of its own and no agent yet.
    fn new(name: &str, kubeconfig: &std::path::Path) -> Self {
        Self {
            name: name.to_string(),
            containerd: runtime::Containerd::start(),
            metrics: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            kubeconfig: kubeconfig.to_path_buf(),
            agent: None,
            pulls_before: 0,
        }
    }

    fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    fn start_agent_with(&mut self, extra: &[&str]) {
        let agent = start_agent_process(&self.name, &self.containerd, &self.kubeconfig, extra);
        self.metrics = agent.probes;
        self.agent = Some(agent);
    }

    /// Successful pulls of the running agent, from its metrics.
    fn pulls(&self) -> u64 {
        http_get(self.metrics, "/metrics")
            .lines()
            .find_map(|line| {
                line.strip_prefix(r#"coral_agent_pulls_total{result="success"} "#)?
                    .trim()
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    }

    fn kill_agent(&mut self) {
        self.pulls_before += self.pulls();
        self.agent = None;
    }
}

fn image_set_status_of(plane: &ControlPlane, name: &str) -> Value {
    let output = plane.kubectl(&["get", "imageset", name, "-n", "shop", "-o", "json"]);
    serde_json::from_slice::<Value>(&output.stdout)
        .map(|set| set["status"].clone())
        .unwrap_or(Value::Null)
}

/// A Registry as the API server has it.
fn registry_object(plane: &ControlPlane, name: &str) -> Value {
    serde_json::from_str(&plane.kubectl_ok(&["get", "registry", name, "-o", "json"])).unwrap()
}

/// `kubectl apply` of one object, which must succeed.
fn apply(plane: &ControlPlane, object: &Value) {
    let output = plane.kubectl_stdin(&["apply"], object);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A metric's value in a Prometheus exposition (the first series whose line starts so).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// What the webhook answers for a Pod in `shop` of one container running `image`, with the
/// `coral.dev/inject` annotation `inject`: its patch operations and warnings.
fn review_pod(
    webhook: &Webhook,
    runtime: &tokio::runtime::Runtime,
    image: &str,
    inject: &str,
) -> (Vec<Value>, Vec<String>) {
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "mirror", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "name": "app", "operation": "CREATE",
            "userInfo": {"username": "admin"}, "dryRun": false,
            "object": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "app", "namespace": "shop", "annotations": {"coral.dev/inject": inject}},
                "spec": {"containers": [{"name": "app", "image": image}]}},
        }
    });
    let body = serde_json::to_vec(&review).unwrap();
    let (status, text) = runtime.block_on(support::post(webhook, "/mutate", &body));
    assert_eq!(status, 200, "{text}");
    let review: Value = serde_json::from_str(&text).unwrap();
    let response = &review["response"];
    assert_eq!(response["allowed"], true, "{response}");
    let patch = response["patch"]
        .as_str()
        .map(|p| {
            serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(p).unwrap())
                .unwrap()
        })
        .unwrap_or_default();
    let warnings = response["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w.as_str().map(str::to_string))
        .collect();
    (patch, warnings)
}

/// `deploy/`'s webhook configurations, pointed at the webhook on loopback (as `localhost`,
/// the name the controller's certificate gives it here), with no caBundle: the controller
/// fills it in.
fn webhook_configurations(port: u16) -> Vec<Value> {
    let mut configurations = manifests("deploy/base/webhook-configurations.yaml");
    for configuration in &mut configurations {
        for webhook in configuration["webhooks"].as_array_mut().unwrap() {
            let path = webhook["clientConfig"]["service"]["path"]
                .as_str()
                .unwrap()
                .to_string();
            webhook["clientConfig"] = json!({"url": format!("https://localhost:{port}{path}")});
            // The API server and the webhook share two busy cores in the tests.
            webhook["timeoutSeconds"] = json!(10);
        }
    }
    configurations
}

/// Coral's webhook and controller, each under its own ServiceAccount with `deploy/`'s RBAC,
/// the webhook registered with `deploy/`'s configurations (reached on loopback) and serving the
/// certificate the controller issued, whose caBundle the controller filled in.
struct Steering {
    /// Both run until the Steering is dropped.
    _webhook: Webhook,
    _controller: support::process::Daemon,
    controller_probes: std::net::SocketAddr,
}

impl Steering {
    /// Starts both and waits until the API server calls the webhook: a server-side dry run
    /// of `probe` comes back `mutated`.
    fn start(plane: &ControlPlane, probe: &Value, mutated: impl Fn(&Value) -> bool) -> Self {
        Self::start_with(plane, &[], probe, mutated)
    }

    /// The same, the webhook run with `webhook_args` too.
    fn start_with(
        plane: &ControlPlane,
        webhook_args: &[&str],
        probe: &Value,
        mutated: impl Fn(&Value) -> bool,
    ) -> Self {
        // The webhook, under its own ServiceAccount, and registered as deploy/ registers it.
        let kubeconfig = plane.service_account_kubeconfig("coral-system", "coral-webhook");
        let mut args = vec!["--debounce-ms", "50", "--pod-name", "coral-webhook-0"];
        args.extend(webhook_args);
        let webhook = Webhook::start_with_kubeconfig(&kubeconfig, &args);
        let deadline = Instant::now() + Duration::from_secs(30);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        loop {
            let (status, body) = runtime.block_on(get_probe(&webhook, "/readyz"));
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the webhook never became ready: {body}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // The controller, under its own ServiceAccount: the webhook's certificate and caBundle,
        // status, stranded workloads, retiring.
        let controller = start_controller_with(
            plane,
            "controller-0",
            &[
                "--cleanup-timeout",
                "1s",
                "--manage-webhook-certs",
                // The certificate names the Service; here the webhook is reached as localhost.
                "--webhook-service",
                "localhost",
            ],
        );
        let controller_probes = controller.probes;
        wait_until(
            "the controller is ready (every watch listed: its RBAC is enough)",
            Duration::from_secs(30),
            || http_get(controller_probes, "/readyz").starts_with("HTTP/1.1 200"),
        );

        // The webhook serves the certificate the controller issued (mounted from its Secret in a
        // cluster; copied to the files the webhook watches here), and the configurations, applied
        // without a caBundle, get it from the controller.
        let secret = wait_for(
            plane,
            "the webhook certificate Secret",
            &[
                "get",
                "secret",
                "coral-webhook-tls",
                "-n",
                "coral-system",
                "-o",
                "json",
            ],
        );
        let decode = |key: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(secret["data"][key].as_str().unwrap())
                .unwrap()
        };
        std::fs::write(webhook.path("tls.key"), decode("tls.key")).unwrap();
        std::fs::write(webhook.path("tls.crt"), decode("tls.crt")).unwrap();
        for configuration in webhook_configurations(webhook.https.port()) {
            let output = plane.kubectl_stdin(&["apply"], &configuration);
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        wait_until(
            "the controller to fill in the caBundle",
            Duration::from_secs(30),
            || {
                plane
                    .kubectl_ok(&[
                        "get",
                        "mutatingwebhookconfiguration",
                        "coral",
                        "-o",
                        "jsonpath={.webhooks[0].clientConfig.caBundle}",
                    ])
                    .trim()
                    .len()
                    > 100
            },
        );
        // The API server's webhook client picks the configuration up within a moment: wait until
        // a dry-run create comes back mutated.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let output = plane.kubectl_stdin(&["create", "--dry-run=server", "-o", "json"], probe);
            let object: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
            if mutated(&object) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the API server never called the webhook: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Self {
            _webhook: webhook,
            _controller: controller,
            controller_probes,
        }
    }
}

/// The condition `kind` of a status, as (status, message).
fn condition_of(status: &Value, kind: &str) -> (String, String) {
    status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == kind)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_string(),
                c["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .unwrap_or_default()
}
