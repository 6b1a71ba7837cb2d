//! The real `coral webhook --standalone`, started on free ports with certificates made by the
//! test, driven over HTTPS with AdmissionReviews.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test helpers panic on setup failures

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const NGINX_LABEL: &str = "image.coral.dev/6965a10c15290ad0b29ca7fd1866de1850408b3c";

const STATE: &str = r#"
imageSets:
  - metadata: {name: web, namespace: shop}
    spec:
      images: ["nginx:1.27", "ghcr.io/example/migrate:1.0", "ghcr.io/example/report:3"]
nodes:
  - {name: a, images: ["nginx:1.27", "ghcr.io/example/migrate:1.0", "ghcr.io/example/report:3"]}
  - {name: b, images: ["nginx:1.27"]}
namespaces:
  - {name: shop, labels: {coral.dev/inject: enabled}}
"#;

/// A certificate authority made for one test.
struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Authority {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes a serving certificate for localhost and 127.0.0.1, and its key.
    fn issue(&self, cert: &Path, key: &Path) {
        let key_pair = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let certificate = params.signed_by(&key_pair, &self.issuer).unwrap();
        // Write the key first: the server reloads when either file changes, and must see a
        // matching pair once both are written.
        std::fs::write(key, key_pair.serialize_pem()).unwrap();
        std::fs::write(cert, certificate.pem()).unwrap();
    }
}

/// A running webhook; killed and waited for when dropped, even when the test fails.
struct Webhook {
    child: Child,
    https: SocketAddr,
    probes: SocketAddr,
    dir: tempfile::TempDir,
    authority: Authority,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Webhook {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::new();
        authority.issue(&dir.path().join("tls.crt"), &dir.path().join("tls.key"));
        std::fs::write(dir.path().join("state.yaml"), STATE).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_coral"))
            .args([
                "webhook",
                "--standalone",
                "--listen",
                "127.0.0.1:0",
                "--probe-listen",
            ])
            .arg("127.0.0.1:0")
            .arg("--state")
            .arg(dir.path().join("state.yaml"))
            .arg("--tls-cert")
            .arg(dir.path().join("tls.crt"))
            .arg("--tls-key")
            .arg(dir.path().join("tls.key"))
            .args(["--poll-interval-ms", "100", "--request-timeout-ms", "1000"])
            .args(extra)
            .env("CORAL_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("coral webhook starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut https, mut probes) = (None, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        while https.is_none() || probes.is_none() {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("webhook logs its addresses");
            let address = || -> SocketAddr {
                line.rsplit("address=")
                    .next()
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap()
            };
            if line.contains("admission server listening") {
                https = Some(address());
            } else if line.contains("probe server listening") {
                probes = Some(address());
            }
        }
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        Self {
            child,
            https: https.unwrap(),
            probes: probes.unwrap(),
            dir,
            authority,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn connector(ca_pem: &str) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tls_stream(
    address: SocketAddr,
    ca_pem: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(address).await?;
    connector(ca_pem)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

fn request_bytes(path: &str, body: &[u8], keep_alive: bool) -> Vec<u8> {
    let mut bytes = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n",
        body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Reads one HTTP/1.1 response with a Content-Length body.
async fn read_response<S: AsyncReadExt + Unpin>(stream: &mut S) -> (u16, String) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buffer.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed mid-body");
                buffer.extend_from_slice(&chunk[..n]);
            }
            let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
            let body = String::from_utf8_lossy(&buffer[end + 4..end + 4 + length]).to_string();
            return (status, body);
        }
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a response");
        buffer.extend_from_slice(&chunk[..n]);
    }
}

async fn post(webhook: &Webhook, path: &str, body: &[u8]) -> (u16, String) {
    let mut stream = tls_stream(webhook.https, &webhook.authority.pem())
        .await
        .expect("TLS connection");
    stream
        .write_all(&request_bytes(path, body, false))
        .await
        .unwrap();
    read_response(&mut stream).await
}

async fn get_probe(webhook: &Webhook, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(webhook.probes).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    read_response(&mut stream).await
}

/// The value of one sample in a Prometheus text exposition.
fn metric(metrics: &str, sample: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{metrics}"))
}

/// Replaces a file the way Kubernetes volumes do: all at once.
fn replace_file(path: &Path, contents: &str) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn review(uid: &str, object: &Value, operation: &str) -> Value {
    let api_version = object["apiVersion"].as_str().unwrap();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let kind = object["kind"].as_str().unwrap();
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": group, "version": version, "kind": kind},
            "resource": {"group": group, "version": version, "resource": format!("{}s", kind.to_lowercase())},
            "namespace": "shop",
            "name": object["metadata"]["name"],
            "operation": operation,
            "userInfo": {"username": "kubernetes-admin"},
            "object": object,
            "dryRun": false,
        }
    })
}

fn annotated(name: &str) -> Value {
    let mut object = fixture(name);
    object["metadata"]["annotations"] = json!({"coral.dev/inject": "selectors,pull-policy"});
    object
}

/// Sends a review to /mutate; returns the response and the object with the patch applied.
async fn mutate(webhook: &Webhook, object: &Value, operation: &str) -> (Value, Value) {
    let uid = format!("uid-{}", object["metadata"]["name"].as_str().unwrap_or("x"));
    let body = serde_json::to_vec(&review(&uid, object, operation)).unwrap();
    let (status, text) = post(webhook, "/mutate", &body).await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = answer["response"].clone();
    assert_eq!(response["uid"], uid, "the response echoes the request uid");
    let mut patched = object.clone();
    if let Some(patch) = response["patch"].as_str() {
        assert_eq!(response["patchType"], "JSONPatch");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        json_patch::patch(&mut patched, &patch).unwrap();
    }
    (response, patched)
}

#[tokio::test]
async fn every_workload_kind_gets_its_patch() {
    let webhook = Webhook::start(&[]);
    let (status, body) = get_probe(&webhook, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready"));
    let cases = [
        ("deployment-web.json", "/spec/template/spec", NGINX_LABEL),
        ("statefulset-web.json", "/spec/template/spec", NGINX_LABEL),
        ("daemonset-web.json", "/spec/template/spec", NGINX_LABEL),
        ("replicaset-web.json", "/spec/template/spec", NGINX_LABEL),
        (
            "replicationcontroller-web.json",
            "/spec/template/spec",
            NGINX_LABEL,
        ),
        (
            "job-migrate.json",
            "/spec/template/spec",
            "image.coral.dev/",
        ),
        (
            "cronjob-report.json",
            "/spec/jobTemplate/spec/template/spec",
            "image.coral.dev/",
        ),
        ("pod-api.json", "/spec", NGINX_LABEL),
    ];
    for (name, spec_path, label) in cases {
        let object = annotated(name);
        for operation in ["CREATE", "UPDATE"] {
            let (response, patched) = mutate(&webhook, &object, operation).await;
            assert_eq!(response["allowed"], true, "{name}: {response}");
            let spec = patched.pointer(spec_path).unwrap();
            let selector = spec["nodeSelector"]
                .as_object()
                .unwrap_or_else(|| panic!("{name}: {patched}"));
            assert!(
                selector
                    .iter()
                    .any(|(k, v)| k.starts_with(label) && v == "available"),
                "{name}: {selector:?}"
            );
            let first = &spec["containers"][0];
            if first["image"] != "ghcr.io/example/api:1.4" {
                assert_eq!(first["imagePullPolicy"], "IfNotPresent", "{name}");
            }
        }
    }
    // The Pod's api image is not managed: left alone, with a warning.
    let (response, _) = mutate(&webhook, &annotated("pod-api.json"), "CREATE").await;
    assert!(
        response["warnings"][0]
            .as_str()
            .unwrap()
            .contains("ghcr.io/example/api:1.4")
    );

    let (_, metrics) = get_probe(&webhook, "/metrics").await;
    assert!(metrics.contains(r#"coral_admission_requests_total{kind="Deployment",operation="CREATE",result="patched"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"coral_admission_patches_total{field="nodeSelector"}"#));
    assert!(metrics.contains("coral_policy_evaluation_duration_seconds_bucket"));
}

#[tokio::test]
async fn unannotated_dry_run_and_controlled_pods() {
    let webhook = Webhook::start(&[]);
    // Without the annotation nothing changes.
    let plain = fixture("deployment-web.json");
    let (response, patched) = mutate(&webhook, &plain, "CREATE").await;
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none());
    assert_eq!(patched, plain);

    // dryRun is answered the same way.
    let object = annotated("deployment-web.json");
    let mut dry = review("dry", &object, "CREATE");
    dry["request"]["dryRun"] = true.into();
    let (status, text) = post(&webhook, "/mutate", &serde_json::to_vec(&dry).unwrap()).await;
    assert_eq!(status, 200);
    let dry_response: Value = serde_json::from_str(&text).unwrap();
    let (wet, _) = mutate(&webhook, &object, "CREATE").await;
    assert_eq!(dry_response["response"]["patch"], wet["patch"]);

    // A Pod owned by a ReplicaSet was mutated through its template: skipped.
    let mut pod = annotated("pod-api.json");
    pod["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "1", "controller": true}]);
    let (response, patched) = mutate(&webhook, &pod, "CREATE").await;
    assert!(response.get("patch").is_none(), "{response}");
    assert_eq!(patched, pod);

    // DELETE is never mutated.
    let (response, _) = mutate(&webhook, &object, "DELETE").await;
    assert!(response.get("patch").is_none());
    assert_eq!(response["allowed"], true);
}

#[tokio::test]
async fn hostile_input_gets_an_answer_never_a_crash() {
    let webhook = Webhook::start(&[]);
    let (status, text) = post(&webhook, "/mutate", b"garbage").await;
    assert_eq!(status, 400);
    assert!(text.contains("not JSON"), "{text}");

    let full =
        serde_json::to_vec(&review("t", &annotated("deployment-web.json"), "CREATE")).unwrap();
    let (status, text) = post(&webhook, "/mutate", &full[..full.len() / 2]).await;
    assert_eq!(status, 400, "truncated JSON: {text}");

    let (status, text) = post(
        &webhook,
        "/mutate",
        br#"{"apiVersion": "v1", "kind": "Pod"}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        text.contains("not an admission.k8s.io/v1 AdmissionReview"),
        "{text}"
    );

    let nested = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let (status, _) = post(&webhook, "/mutate", nested.as_bytes()).await;
    assert_eq!(status, 400, "deeply nested JSON");

    // 10 MiB: refused without reading it all into a decision.
    let huge = vec![b' '; 10 * 1024 * 1024];
    let mut stream = tls_stream(webhook.https, &webhook.authority.pem())
        .await
        .unwrap();
    let _ = stream
        .write_all(&request_bytes("/mutate", &huge, false))
        .await;
    let (status, text) = read_response(&mut stream).await;
    assert_eq!(status, 413, "{text}");

    // An object that cannot be read: allowed with a warning (failure mode allow).
    let mut unreadable = review("bad-object", &annotated("deployment-web.json"), "CREATE");
    unreadable["request"]["object"] = json!("not an object");
    let (status, text) = post(
        &webhook,
        "/mutate",
        &serde_json::to_vec(&unreadable).unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["uid"], "bad-object");
    assert!(
        answer["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("admitted unchanged")
    );

    // A slow client that never sends its body is cut off.
    let mut slow = tls_stream(webhook.https, &webhook.authority.pem())
        .await
        .unwrap();
    slow.write_all(b"POST /mutate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    let started = Instant::now();
    let (status, _) = tokio::time::timeout(Duration::from_secs(10), read_response(&mut slow))
        .await
        .expect("the server answers a stalled body");
    assert_eq!(status, 408);
    assert!(started.elapsed() < Duration::from_secs(5));

    // Still serving.
    let (response, _) = mutate(&webhook, &annotated("deployment-web.json"), "CREATE").await;
    assert_eq!(response["allowed"], true);
    let (_, metrics) = get_probe(&webhook, "/metrics").await;
    assert_eq!(
        metric(&metrics, r#"coral_http_rejected_total{reason="too_large"}"#),
        1.0
    );
    assert_eq!(
        metric(&metrics, r#"coral_http_rejected_total{reason="timeout"}"#),
        1.0
    );
}

#[tokio::test]
async fn failure_mode_deny_refuses_unreadable_objects() {
    let webhook = Webhook::start(&["--failure-mode", "deny"]);
    let mut unreadable = review("deny-me", &annotated("deployment-web.json"), "CREATE");
    unreadable["request"]["object"] = json!(42);
    let (status, text) = post(
        &webhook,
        "/mutate",
        &serde_json::to_vec(&unreadable).unwrap(),
    )
    .await;
    assert_eq!(
        status, 200,
        "a failed decision is an answer, not an HTTP error"
    );
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["response"]["allowed"], false);
    assert_eq!(answer["response"]["status"]["code"], 403);
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .starts_with("coral: ")
    );
}

#[tokio::test]
async fn image_sets_are_validated() {
    let webhook = Webhook::start(&[]);
    let set = |images: Value| {
        json!({
            "apiVersion": "coral.dev/v1alpha1",
            "kind": "ImageSet",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"images": images},
        })
    };
    let send = |object: Value| {
        let mut body = review("v", &object, "CREATE");
        body["request"]["kind"] =
            json!({"group": "coral.dev", "version": "v1alpha1", "kind": "ImageSet"});
        serde_json::to_vec(&body).unwrap()
    };
    let (status, text) = post(
        &webhook,
        "/validate/imagesets",
        &send(set(json!(["nginx:1.27", "redis"]))),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["response"]["allowed"],
        true
    );

    let (_, text) = post(
        &webhook,
        "/validate/imagesets",
        &send(set(json!(["nginx", "docker.io/library/nginx:latest"]))),
    )
    .await;
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("ImageSet web: spec.images[1]") && message.contains("same image"),
        "{message}"
    );

    let (_, text) = post(
        &webhook,
        "/validate/imagesets",
        &send(set(json!(["Not Valid"]))),
    )
    .await;
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("spec.images[0]")
    );
}

#[tokio::test]
async fn certificate_rotation_keeps_serving() {
    let webhook = Webhook::start(&[]);
    let old_ca = webhook.authority.pem();
    // A keep-alive connection opened before the rotation.
    let mut before = tls_stream(webhook.https, &old_ca).await.unwrap();
    let body =
        serde_json::to_vec(&review("k1", &annotated("deployment-web.json"), "CREATE")).unwrap();
    before
        .write_all(&request_bytes("/mutate", &body, true))
        .await
        .unwrap();
    assert_eq!(read_response(&mut before).await.0, 200);

    let new_authority = Authority::new();
    new_authority.issue(&webhook.path("tls.crt"), &webhook.path("tls.key"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if tls_stream(webhook.https, &new_authority.pem())
            .await
            .is_ok()
        {
            break;
        }
        assert!(Instant::now() < deadline, "new certificate never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        tls_stream(webhook.https, &old_ca).await.is_err(),
        "new connections get the new certificate"
    );
    // The connection from before still works.
    before
        .write_all(&request_bytes("/mutate", &body, true))
        .await
        .unwrap();
    assert_eq!(read_response(&mut before).await.0, 200);

    // A broken pair is rejected and the last good one kept.
    replace_file(&webhook.path("tls.crt"), "not a certificate");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        tls_stream(webhook.https, &new_authority.pem())
            .await
            .is_ok()
    );
    let (_, metrics) = get_probe(&webhook, "/metrics").await;
    assert!(metric(&metrics, "coral_tls_certificate_errors_total") >= 1.0);
}

#[tokio::test]
async fn state_file_changes_are_picked_up() {
    let webhook = Webhook::start(&[]);
    let object = annotated("deployment-web.json");
    let (response, _) = mutate(&webhook, &object, "CREATE").await;
    assert!(response.get("patch").is_some());

    // nginx leaves every node: nothing to steer to any more.
    let without_nginx = STATE
        .replace("{name: a, images: [\"nginx:1.27\", ", "{name: a, images: [")
        .replace("{name: b, images: [\"nginx:1.27\"]}", "{name: b}");
    assert_ne!(without_nginx, STATE);
    replace_file(&webhook.path("state.yaml"), &without_nginx);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (response, _) = mutate(&webhook, &object, "CREATE").await;
        if response.get("patch").is_none() {
            assert!(
                response["warnings"][0]
                    .as_str()
                    .unwrap()
                    .contains("on 0 node(s)"),
                "{response}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "state change never picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A broken state file keeps the last good state.
    replace_file(&webhook.path("state.yaml"), "nodes: 5");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (response, _) = mutate(&webhook, &object, "CREATE").await;
    assert_eq!(response["allowed"], true);
    let (_, metrics) = get_probe(&webhook, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            r#"coral_reloads_total{result="failure",what="state"}"#
        ),
        1.0
    );
    assert!(
        metric(
            &metrics,
            r#"coral_reloads_total{result="success",what="state"}"#
        ) >= 1.0
    );
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_then_exits() {
    let mut webhook = Webhook::start(&[]);
    let mut stream = tls_stream(webhook.https, &webhook.authority.pem())
        .await
        .unwrap();
    let body =
        serde_json::to_vec(&review("last", &annotated("deployment-web.json"), "CREATE")).unwrap();
    let request = request_bytes("/mutate", &body, false);
    let (head, tail) = request.split_at(request.len() - 10);
    stream.write_all(head).await.unwrap();
    // Let the server start on the request, then SIGTERM while it waits for the rest.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = webhook.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    stream.write_all(tail).await.unwrap();
    let (status, _) = read_response(&mut stream).await;
    assert_eq!(status, 200, "the in-flight request is answered");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = webhook.child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "webhook did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn webhook_without_standalone_explains_itself() {
    let output = Command::new(env!("CARGO_BIN_EXE_coral"))
        .args(["webhook", "--tls-cert", "x", "--tls-key", "y"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--standalone --state"));
}
