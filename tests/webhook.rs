//! The real `coral webhook --standalone`, started on free ports with certificates made by the
//! test, driven over HTTPS with AdmissionReviews.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test helpers panic on setup failures

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Deserialize as _;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use support::{Authority, Webhook, get_probe, post, read_response, request_bytes, tls_stream};

const NGINX_LABEL: &str = "image.coral.dev/6965a10c15290ad0b29ca7fd1866de1850408b3c";

const STATE: &str = r#"
imageSets:
  - metadata: {name: web, namespace: shop}
    spec:
      images: ["nginx:1.27", "ghcr.io/example/migrate:1.0", "ghcr.io/example/report:3"]
nodes:
  - {name: a, labels: {kubernetes.io/os: linux}, images: ["nginx:1.27", "ghcr.io/example/migrate:1.0", "ghcr.io/example/report:3"]}
  - {name: b, labels: {kubernetes.io/os: linux}, images: ["nginx:1.27"]}
namespaces:
  - {name: shop, labels: {coral.dev/inject: enabled}}
"#;

/// The value of one sample in a Prometheus text exposition.
fn metric(metrics: &str, sample: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{metrics}"))
}

/// Waits until a metric sample reaches at least `value`, and returns it.
async fn wait_for_metric(webhook: &Webhook, sample: &str, value: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = get_probe(webhook, "/metrics").await;
        let current = metrics
            .lines()
            .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or(0.0);
        if current >= value {
            return current;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} never reached {value}:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    let webhook = Webhook::start(STATE, &[]);
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
    let webhook = Webhook::start(STATE, &[]);
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
    let webhook = Webhook::start(STATE, &[]);
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
    let webhook = Webhook::start(STATE, &["--failure-mode", "deny"]);
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
    let webhook = Webhook::start(STATE, &[]);
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
    let webhook = Webhook::start(STATE, &[]);
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
    // Expiring at 2040-01-01T00:00:00Z: the metric the expiry alert watches follows it.
    new_authority.issue_until(
        &webhook.path("tls.crt"),
        &webhook.path("tls.key"),
        Some((2040, 1, 1)),
    );
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
    let expiry = || async {
        let (_, metrics) = get_probe(&webhook, "/metrics").await;
        metric(&metrics, "coral_tls_certificate_expiry_timestamp_seconds")
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while expiry().await != 2_208_988_800.0 {
        assert!(
            Instant::now() < deadline,
            "expiry not updated: {}",
            expiry().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection from before still works.
    before
        .write_all(&request_bytes("/mutate", &body, true))
        .await
        .unwrap();
    assert_eq!(read_response(&mut before).await.0, 200);

    // A broken pair is rejected and the last good one kept.
    let errors_before = metric(
        &get_probe(&webhook, "/metrics").await.1,
        "coral_tls_certificate_errors_total",
    );
    replace_file(&webhook.path("tls.crt"), "not a certificate");
    wait_for_metric(
        &webhook,
        "coral_tls_certificate_errors_total",
        errors_before + 1.0,
    )
    .await;
    assert!(
        tls_stream(webhook.https, &new_authority.pem())
            .await
            .is_ok(),
        "the last good certificate is still served"
    );
}

#[tokio::test]
async fn state_file_changes_are_picked_up() {
    let webhook = Webhook::start(STATE, &[]);
    let object = annotated("deployment-web.json");
    let (response, _) = mutate(&webhook, &object, "CREATE").await;
    assert!(response.get("patch").is_some());

    // nginx leaves every node: nothing to steer to any more.
    let without_nginx = STATE
        .replace("linux}, images: [\"nginx:1.27\", ", "linux}, images: [")
        .replace("linux}, images: [\"nginx:1.27\"]}", "linux}}");
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
                    .contains("no node holds it yet"),
                "{response}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "state change never picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A broken state file keeps the last good state.
    replace_file(&webhook.path("state.yaml"), "nodes: 5");
    let failures = r#"coral_reloads_total{result="failure",what="state"}"#;
    assert_eq!(wait_for_metric(&webhook, failures, 1.0).await, 1.0);
    let (response, _) = mutate(&webhook, &object, "CREATE").await;
    assert!(
        response["warnings"][0]
            .as_str()
            .unwrap()
            .contains("no node holds it yet"),
        "the last good state is still in effect: {response}"
    );
    let (_, metrics) = get_probe(&webhook, "/metrics").await;
    assert!(
        metric(
            &metrics,
            r#"coral_reloads_total{result="success",what="state"}"#
        ) >= 1.0
    );
}

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_then_exits() {
    let mut webhook = Webhook::start(STATE, &[]);
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

#[tokio::test]
async fn tls_1_2_and_1_3_are_served() {
    let webhook = Webhook::start(STATE, &[]);
    for (version, expected) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let tcp = tokio::net::TcpStream::connect(webhook.https).await.unwrap();
        let mut stream = support::connector_for_versions(&webhook.authority.pem(), &[version])
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .expect("handshake");
        assert_eq!(stream.get_ref().1.protocol_version(), Some(expected));
        let body =
            serde_json::to_vec(&review("v", &annotated("deployment-web.json"), "CREATE")).unwrap();
        stream
            .write_all(&request_bytes("/mutate", &body, false))
            .await
            .unwrap();
        assert_eq!(read_response(&mut stream).await.0, 200);
    }
}

#[test]
fn webhook_flags_that_do_not_fit_together_are_explained() {
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_coral"))
            .args(["webhook", "--tls-cert", "x", "--tls-key", "y"])
            .args(args)
            .output()
            .unwrap();
        assert_ne!(output.status.code(), Some(0), "{args:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    assert!(run(&["--standalone"]).contains("--standalone needs --state FILE"));
    assert!(run(&["--state", "s.yaml"]).contains("--state and --policies are for --standalone"));
    assert!(
        run(&[
            "--standalone",
            "--state",
            "s.yaml",
            "--policies-configmap",
            "a/b"
        ])
        .contains("with --standalone use --policies")
    );
    let bad_name = run(&["--policies-configmap", "coral-policies"]);
    assert!(
        bad_name.contains("\"coral-policies\" is not NAMESPACE/NAME"),
        "{bad_name}"
    );
}

/// In a cluster, the webhook is not ready and answers with its failure mode until every watch
/// has listed; an API server that does not answer is retried.
#[tokio::test]
async fn cluster_mode_waits_for_the_first_list_before_ready() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let webhook = Webhook::start_in_cluster(
        &server,
        &["--policies-configmap", "coral-system/coral-policies"],
    );
    assert_eq!(get_probe(&webhook, "/healthz").await.0, 200);
    let (status, body) = get_probe(&webhook, "/readyz").await;
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: cluster state not listed yet")
    );

    let (response, _) = mutate(&webhook, &annotated("deployment-web.json"), "CREATE").await;
    assert_eq!(response["allowed"], true);
    let warnings = response["warnings"].to_string();
    assert!(
        warnings.contains("the cluster state is not listed yet"),
        "{warnings}"
    );
    assert!(response.get("patch").is_none());

    wait_for_metric(
        &webhook,
        "coral_watch_errors_total{resource=\"nodes\"}",
        1.0,
    )
    .await;
    wait_for_metric(
        &webhook,
        "coral_watch_errors_total{resource=\"configmaps\"}",
        1.0,
    )
    .await;
    assert_eq!(get_probe(&webhook, "/readyz").await.0, 503);
}

/// The real webhook in cluster mode against a scripted API server: it lists Nodes and
/// Namespaces (metadata only), ImageSets, NodeImages and the policy ConfigMap, becomes ready,
/// and decides from that state with the ConfigMap's policies and settings.
#[tokio::test]
async fn cluster_mode_decides_from_the_listed_state_and_the_policy_configmap() {
    use std::collections::BTreeMap;
    use support::api_server::{ApiServer, list};

    let meta = |name: &str, labels: Value| {
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
               "metadata": {"name": name, "resourceVersion": "1", "labels": labels}})
    };
    let node = |name: &str, labels: Value, spec: Value| {
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": name, "resourceVersion": "1", "labels": labels},
               "spec": spec,
               "status": {"images": [{"names": ["docker.io/library/nginx:1.27"], "sizeBytes": 1}]}})
    };
    let mut policies = serde_json::Map::new();
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap()
    {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        policies.insert(name, json!(std::fs::read_to_string(&path).unwrap()));
    }
    // Two nodes must hold an image before pods are steered to it.
    policies.insert("settings.json".into(), json!("{\"minAvailableNodes\": 2}"));
    let lists = BTreeMap::from([
        (
            "/api/v1/nodes".to_string(),
            list(
                "v1",
                "NodeList",
                vec![
                    node("a", json!({NGINX_LABEL: "available"}), json!({})),
                    node(
                        "b",
                        json!({NGINX_LABEL: "available"}),
                        json!({"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}),
                    ),
                    node("c", json!({}), json!({"unschedulable": true})),
                ],
            ),
        ),
        (
            "/api/v1/namespaces".to_string(),
            list(
                "meta.k8s.io/v1",
                "PartialObjectMetadataList",
                vec![meta("shop", json!({"coral.dev/inject": "enabled"}))],
            ),
        ),
        (
            "/apis/coral.dev/v1alpha1/imagesets".to_string(),
            list(
                "coral.dev/v1alpha1",
                "ImageSetList",
                vec![json!({
                    "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
                    "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "1"},
                    "spec": {"images": ["nginx:1.27", "redis:7"]},
                })],
            ),
        ),
        (
            "/apis/coral.dev/v1alpha1/nodeimages".to_string(),
            list("coral.dev/v1alpha1", "NodeImageList", vec![]),
        ),
        (
            "/apis/coral.dev/v1alpha1/registries".to_string(),
            list("coral.dev/v1alpha1", "RegistryList", vec![]),
        ),
        (
            "/api/v1/namespaces/coral-system/configmaps".to_string(),
            list(
                "v1",
                "ConfigMapList",
                vec![json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "coral-policies", "namespace": "coral-system", "uid": "cm-1", "resourceVersion": "3"},
                    "data": policies,
                })],
            ),
        ),
    ]);
    let server = ApiServer::start(lists, BTreeMap::new(), BTreeMap::new()).await;
    let webhook = Webhook::start_in_cluster(
        &server.url,
        &[
            "--policies-configmap",
            "coral-system/coral-policies",
            "--debounce-ms",
            "50",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = get_probe(&webhook, "/readyz").await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // nginx is on two nodes, but b's taint keeps this pod off it: not steered.
    let deployment = annotated("deployment-web.json");
    let (response, patched) = mutate(&webhook, &deployment, "CREATE").await;
    assert_eq!(response["allowed"], true);
    assert!(
        patched["spec"]["template"]["spec"]
            .get("nodeSelector")
            .is_none(),
        "{patched}"
    );
    let warnings = response["warnings"].to_string();
    assert!(
        warnings.contains("2 node(s) hold it, 1 of them usable by this pod (0 cordoned, 1 with taints it does not tolerate"),
        "{warnings}"
    );
    // Tolerating the taint, it may use both: steered.
    let mut tolerant = deployment.clone();
    tolerant["spec"]["template"]["spec"]["tolerations"] =
        json!([{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}]);
    let (response, patched) = mutate(&webhook, &tolerant, "CREATE").await;
    assert_eq!(response["allowed"], true);
    assert_eq!(
        patched["spec"]["template"]["spec"]["nodeSelector"],
        json!({NGINX_LABEL: "available"}),
        "nginx is on two nodes the pod may use: pods are steered to them"
    );
    let (_, metrics) = get_probe(&webhook, "/metrics").await;
    assert_eq!(
        metric(&metrics, "coral_index_objects{resource=\"nodes\"}"),
        3.0
    );
    assert_eq!(
        metric(
            &metrics,
            "coral_reloads_total{result=\"success\",what=\"policies\"}"
        ),
        1.0
    );
    let events: Vec<_> = server
        .writes()
        .into_iter()
        .filter(|w| {
            w.uri
                .starts_with("/apis/events.k8s.io/v1/namespaces/coral-system/events")
        })
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].body["reason"], "PoliciesLoaded");
    assert!(
        server.writes().iter().all(|w| w.uri.contains("/events")),
        "the webhook writes nothing but Events"
    );
}

/// Sends one review with this uid; returns the response.
async fn mutate_as(webhook: &Webhook, uid: &str, object: &Value) -> Value {
    let body = serde_json::to_vec(&review(uid, object, "CREATE")).unwrap();
    let (status, text) = post(webhook, "/mutate", &body).await;
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["response"]["uid"], uid);
    answer["response"].clone()
}

#[tokio::test]
async fn a_request_decided_before_is_answered_from_the_cache_until_the_state_changes() {
    let webhook = Webhook::start(STATE, &[]);
    let object = annotated("deployment-web.json");
    let first = mutate_as(&webhook, "uid-1", &object).await;
    let second = mutate_as(&webhook, "uid-2", &object).await;
    assert!(first.get("patch").is_some(), "{first}");
    assert_eq!(first["patch"], second["patch"]);
    assert_eq!(first["warnings"], second["warnings"]);
    let (_, metrics) = get_probe(&webhook, "/metrics").await;
    let hits = r#"coral_decision_cache_requests_total{result="hit"}"#;
    let misses = r#"coral_decision_cache_requests_total{result="miss"}"#;
    let evaluations = r#"coral_policy_evaluation_duration_seconds_count{kind="Deployment"}"#;
    assert_eq!(metric(&metrics, hits), 1.0);
    assert_eq!(metric(&metrics, misses), 1.0);
    assert_eq!(metric(&metrics, evaluations), 1.0);

    // Anything else that differs is another decision.
    let mut other = object.clone();
    other["metadata"]["labels"] = json!({"tier": "front"});
    mutate_as(&webhook, "uid-3", &other).await;
    let (_, metrics) = get_probe(&webhook, "/metrics").await;
    assert_eq!(metric(&metrics, misses), 2.0);

    // A new state drops what was decided with the old one.
    let without_nginx = STATE
        .replace("linux}, images: [\"nginx:1.27\", ", "linux}, images: [")
        .replace("linux}, images: [\"nginx:1.27\"]}", "linux}}");
    replace_file(&webhook.path("state.yaml"), &without_nginx);
    let reloads = r#"coral_reloads_total{result="success",what="state"}"#;
    wait_for_metric(&webhook, reloads, 1.0).await;
    let after = mutate_as(&webhook, "uid-4", &object).await;
    assert!(
        after.get("patch").is_none(),
        "decided with the new state: {after}"
    );
    let (_, metrics) = get_probe(&webhook, "/metrics").await;
    assert_eq!(metric(&metrics, hits), 1.0);
    assert_eq!(metric(&metrics, misses), 3.0);

    // Turned off, every request is evaluated.
    let uncached = Webhook::start(STATE, &["--decision-cache-mib", "0"]);
    mutate_as(&uncached, "uid-1", &object).await;
    mutate_as(&uncached, "uid-2", &object).await;
    let (_, metrics) = get_probe(&uncached, "/metrics").await;
    assert_eq!(metric(&metrics, evaluations), 2.0);
    assert!(
        !metrics.contains("coral_decision_cache_requests_total{"),
        "{metrics}"
    );
}

#[test]
fn the_tests_run_the_webhook_with_the_environment_deploy_gives_it() {
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/base/webhook.yaml"),
    )
    .unwrap();
    let deployment: Value = serde_yaml::Deserializer::from_str(&manifest)
        .map(|document| Value::deserialize(document).unwrap())
        .find(|object| object["kind"] == "Deployment")
        .unwrap();
    let env = &deployment["spec"]["template"]["spec"]["containers"][0]["env"];
    for (name, value) in support::DEPLOYED_ENV {
        let entry = env
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} is not set in deploy/base/webhook.yaml"));
        assert_eq!(entry["value"], value, "{name}");
    }
}

#[tokio::test]
async fn a_private_image_is_not_handed_to_another_namespace() {
    let state = r#"
imageSets:
  - metadata: {name: app, namespace: team-a}
    spec: {images: ["ghcr.io/acme/private-app:1.0"], imagePullSecrets: [{name: ghcr}]}
nodes:
  - {name: a, images: ["ghcr.io/acme/private-app:1.0"]}
"#;
    let webhook = Webhook::start(state, &[]);
    let pod = |namespace: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "app", "namespace": namespace,
                         "annotations": {"coral.dev/inject": "selectors,pull-policy"}},
            "spec": {"containers": [{"name": "app", "image": "ghcr.io/acme/private-app:1.0", "imagePullPolicy": "Always"}]},
        })
    };
    let ask = |namespace: &'static str| {
        let object = pod(namespace);
        let webhook = &webhook;
        async move {
            let review = json!({
                "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": {"uid": format!("uid-{namespace}"),
                    "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "namespace": namespace, "name": "app", "operation": "CREATE",
                    "userInfo": {"username": "someone"}, "object": object},
            });
            let (status, text) =
                post(webhook, "/mutate", &serde_json::to_vec(&review).unwrap()).await;
            assert_eq!(status, 200, "{text}");
            serde_json::from_str::<Value>(&text).unwrap()["response"].clone()
        }
    };
    let other = ask("team-b").await;
    assert!(
        other.get("patch").is_none(),
        "team-b must not be steered to it: {other}"
    );
    assert!(
        other["warnings"][0]
            .as_str()
            .unwrap()
            .contains("private to namespace(s) team-a"),
        "{other}"
    );
    let own = ask("team-a").await;
    let patch = base64::engine::general_purpose::STANDARD
        .decode(own["patch"].as_str().expect("team-a is steered"))
        .unwrap();
    let patch = String::from_utf8(patch).unwrap();
    assert!(
        patch.contains("nodeSelector") && patch.contains("IfNotPresent"),
        "{patch}"
    );
}

/// A policy set that runs away on Pods labelled `bomb` (each value a different way past the
/// engine's own checks) and warns `fine` on every other object.
const RUNAWAY_POLICIES: &str = r#"package coral.mutate

bomb := object.get(input.object.metadata, ["labels", "bomb"], "")

warn contains "fine" if bomb == ""

warn contains sprintf("%d", [count(numbers.range(1, 100000000))]) if bomb == "range"

warn contains sprintf("%d", [count(net.cidr_expand("10.0.0.0/8"))]) if bomb == "cidr"

warn contains sprintf("%d", [count(xs)]) if {
	bomb == "loop"
	xs := [sprintf("%d-%d", [a, b]) | some a in numbers.range(1, 5000); some b in numbers.range(1, 5000)]
}
"#;

fn pod(name: &str, bomb: Option<&str>) -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"containers": [{"name": "app", "image": "nginx:1.27"}]}
    });
    if let Some(bomb) = bomb {
        pod["metadata"]["labels"] = json!({"bomb": bomb});
    }
    pod
}

#[tokio::test]
async fn a_runaway_policy_is_stopped_within_its_bounds_and_the_webhook_keeps_serving() {
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(policies.path().join("mutate.rego"), RUNAWAY_POLICIES).unwrap();
    let directory = policies.path().to_str().unwrap();
    let webhook = Webhook::start(STATE, &["--policies", directory]);
    let (response, _) = mutate(&webhook, &pod("calm", None), "CREATE").await;
    assert_eq!(response["warnings"], json!(["fine"]), "{response}");
    let limit = Duration::from_millis(250);

    for bomb in ["range", "cidr", "loop"] {
        let started = Instant::now();
        let (response, _) = mutate(&webhook, &pod(bomb, Some(bomb)), "CREATE").await;
        let took = started.elapsed();
        eprintln!("{bomb}: answered after {took:?}: {}", response["warnings"]);
        assert!(took < limit * 2, "{bomb}: {took:?}");
        assert_eq!(
            response["allowed"], true,
            "--failure-mode allow: {response}"
        );
        let warning = response["warnings"][0].as_str().unwrap();
        assert!(
            warning.contains("took longer than 250ms")
                || warning.contains("memory budget of 64 MiB"),
            "{bomb}: {warning}"
        );
    }
    // All at once, and calm requests among them: every one is answered.
    let requests = (0..8).map(|i| {
        let bomb = ["range", "cidr", "loop"][i % 3];
        let object = if i % 2 == 0 {
            pod(bomb, Some(bomb))
        } else {
            pod("calm", None)
        };
        let webhook = &webhook;
        async move { mutate_as(webhook, &format!("together-{i}"), &object).await }
    });
    for response in futures::future::join_all(requests).await {
        assert_eq!(response["allowed"], true, "{response}");
    }
    let (response, _) = mutate(&webhook, &pod("calm", None), "CREATE").await;
    assert_eq!(
        response["warnings"],
        json!(["fine"]),
        "still serving: {response}"
    );

    let (_, metrics) = get_probe(&webhook, "/metrics").await;
    assert!(metric(&metrics, r#"coral_policy_errors_total{class="memory"}"#) >= 1.0);
    let peak = support::process::memory_kib(webhook.child.id(), "VmHWM:") as f64 / 1024.0;
    eprintln!("peak resident memory {peak:.1} MiB");
    assert!(peak < 256.0, "peak resident memory {peak:.1} MiB");

    // A set that runs away on the probe evaluation is refused; the last good one serves.
    let always = RUNAWAY_POLICIES.replace("bomb == \"range\"", "true");
    replace_file(&policies.path().join("mutate.rego"), &always);
    let failures = r#"coral_reloads_total{result="failure",what="state"}"#;
    wait_for_metric(&webhook, failures, 1.0).await;
    let (response, _) = mutate(&webhook, &pod("calm", None), "CREATE").await;
    assert_eq!(response["warnings"], json!(["fine"]), "{response}");
    let log = webhook.log.lock().unwrap().join("\n");
    assert!(
        log.contains("break the evaluation bounds on a probe evaluation"),
        "{log}"
    );
}

#[tokio::test]
async fn a_controlled_pod_asking_for_the_mirror_runs_its_copy() {
    // The standalone webhook's state file carries the mirror as the controller records it:
    // the ImageSet's status and the Registry's Reachable condition.
    let state = r#"
imageSets:
  - metadata: {name: web, namespace: shop}
    spec:
      images: ["nginx:1.27"]
      mirror: {registry: local}
    status:
      images:
        - {image: "nginx:1.27", normalized: "docker.io/library/nginx:1.27", label: x,
           mirror: {reference: "localhost:30500/docker.io/library/nginx:1.27", state: mirrored}}
registries:
  - metadata: {name: local}
    spec: {endpoint: "localhost:30500"}
    status:
      conditions: [{type: Reachable, status: "True", reason: Answered, message: ok, lastTransitionTime: "2026-01-01T00:00:00Z"}]
nodes:
  - {name: a, images: ["nginx:1.27"]}
namespaces:
  - {name: shop, labels: {coral.dev/inject: enabled}}
"#;
    let webhook = Webhook::start(state, &[]);
    let owner = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1", "uid": "1", "controller": true}]);
    let pod = |inject: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1-x", "namespace": "shop", "ownerReferences": owner,
                         "annotations": {"coral.dev/inject": inject}},
            "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]},
        })
    };
    // Made from a template: decided all the same, since it asks for the mirror.
    let (response, patched) = mutate(&webhook, &pod("mirror"), "CREATE").await;
    assert_eq!(response["allowed"], true, "{response}");
    assert_eq!(
        patched["spec"]["containers"][0]["image"],
        "localhost:30500/docker.io/library/nginx:1.27"
    );
    // A controlled Pod asking for anything else is still skipped.
    let (response, _) = mutate(&webhook, &pod("selectors"), "CREATE").await;
    assert!(response.get("patch").is_none(), "{response}");
}
