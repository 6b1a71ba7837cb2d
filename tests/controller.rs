//! The real `coral controller` against a scripted API server: it takes the Lease, then writes
//! what one reconcile pass needs, and nothing twice.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test helpers panic on setup failures

#[path = "support/api_server.rs"]
#[allow(dead_code)]
mod api_server;

#[path = "support/process.rs"]
#[allow(dead_code)]
mod process;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use api_server::{ApiServer, Write, empty_workload_lists, list};
use coral::controller::secrets::copy_name;
use coral::image::{ImageReference, label_key};
use process::Kill;

fn key(image: &str) -> String {
    label_key(&ImageReference::parse(image).unwrap())
}

fn find<'a>(writes: &'a [Write], method: &str, prefix: &str) -> Option<&'a Write> {
    writes
        .iter()
        .find(|w| w.method == method && w.uri.starts_with(prefix))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_binary_leads_then_reconciles_status_secrets_and_certificates() {
    let image_set = json!({
        "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
        "metadata": {"name": "web", "namespace": "shop", "uid": "uid-web", "generation": 2, "resourceVersion": "5"},
        "spec": {"images": ["nginx:1.27"], "imagePullSecrets": [{"name": "registry"}]},
    });
    let node = |name: &str, labels: Value| {
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": name, "resourceVersion": "1", "labels": labels},
               "status": {"images": [{"names": ["docker.io/library/nginx:1.27"], "sizeBytes": 1}]}})
    };
    // `stuck` requires the label of an image no node holds; `web` one node `a` holds.
    let deployment = |name: &str, image: &str| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "resourceVersion": "1"},
               "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
                   "metadata": {"labels": {"app": name}},
                   "spec": {"nodeSelector": {key(image): "available"}, "containers": [{"name": "c", "image": image}]}}}})
    };
    let source = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "registry", "namespace": "shop"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode("{\"auths\": {}}")},
    });
    let webhooks = |kind: &str| {
        json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind, "metadata": {"name": "coral"},
               "webhooks": [{"name": "x.coral.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                             "clientConfig": {"service": {"name": "coral-webhook", "namespace": "coral-system"}}}]})
    };
    let mut lists = empty_workload_lists();
    lists.extend([
        (
            "/apis/coral.dev/v1alpha1/imagesets".to_string(),
            list(
                "coral.dev/v1alpha1",
                "ImageSetList",
                vec![image_set.clone()],
            ),
        ),
        (
            "/api/v1/nodes".to_string(),
            list(
                "v1",
                "NodeList",
                vec![
                    node("a", json!({key("nginx:1.27"): "available"})),
                    node("b", json!({})),
                ],
            ),
        ),
        (
            "/apis/apps/v1/deployments".to_string(),
            list(
                "apps/v1",
                "DeploymentList",
                vec![
                    deployment("web", "nginx:1.27"),
                    deployment("stuck", "redis:7.4"),
                ],
            ),
        ),
        (
            "/api/v1/namespaces/coral-system/configmaps".to_string(),
            list("v1", "ConfigMapList", vec![]),
        ),
        (
            "/apis/coral.dev/v1alpha1/nodeimages".to_string(),
            list("coral.dev/v1alpha1", "NodeImageList", vec![]),
        ),
        (
            "/api/v1/namespaces/coral-system/secrets".to_string(),
            list("v1", "SecretList", vec![]),
        ),
    ]);
    let server = ApiServer::start(
        lists,
        BTreeMap::from([
            (
                "/api/v1/namespaces/shop/secrets/registry".to_string(),
                source,
            ),
            (
                "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/coral"
                    .to_string(),
                webhooks("MutatingWebhookConfiguration"),
            ),
            (
                "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/coral"
                    .to_string(),
                webhooks("ValidatingWebhookConfiguration"),
            ),
        ]),
        BTreeMap::from([(
            "/apis/coral.dev/v1alpha1/namespaces/shop/imagesets/web".to_string(),
            image_set,
        )]),
    )
    .await;
    let probes = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let child = server
        .coral()
        .args([
            "controller",
            "--manage-webhook-certs",
            "--pod-name",
            "controller-0",
        ])
        .args([
            "--probe-listen",
            &probes.to_string(),
            "--debounce",
            "50ms",
            "--resync",
            "1s",
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _child = Kill(child);

    let deadline = Instant::now() + Duration::from_secs(30);
    let writes = loop {
        let writes = server.writes();
        let done = find(
            &writes,
            "PATCH",
            "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/coral",
        )
        .is_some();
        if done {
            break writes;
        }
        assert!(Instant::now() < deadline, "no full pass: {writes:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let lease = find(
        &writes,
        "POST",
        "/apis/coordination.k8s.io/v1/namespaces/coral-system/leases",
    )
    .expect("the Lease is taken");
    assert_eq!(lease.body["spec"]["holderIdentity"], "controller-0");
    let copy = find(&writes, "POST", "/api/v1/namespaces/coral-system/secrets").expect("a copy");
    assert_eq!(copy.body["metadata"]["name"], copy_name("shop", "registry"));
    assert_eq!(
        copy.body["metadata"]["annotations"]["coral.dev/source"],
        "shop/registry"
    );
    let finalizer = find(
        &writes,
        "PATCH",
        "/apis/coral.dev/v1alpha1/namespaces/shop/imagesets/web?",
    )
    .expect("the finalizer");
    assert_eq!(
        finalizer.body,
        json!([{"op": "add", "path": "/metadata/finalizers", "value": ["coral.dev/cleanup"]}])
    );
    let status = find(
        &writes,
        "PATCH",
        "/apis/coral.dev/v1alpha1/namespaces/shop/imagesets/web/status",
    )
    .expect("the status");
    let image = &status.body["status"]["images"][0];
    assert_eq!(
        (
            image["nodesTargeted"].clone(),
            image["nodesAvailable"].clone()
        ),
        (json!(2), json!(1))
    );
    assert_eq!(status.body["status"]["observedGeneration"], 2);
    let events: Vec<&Write> = writes
        .iter()
        .filter(|w| {
            w.method == "POST"
                && w.uri
                    .starts_with("/apis/events.k8s.io/v1/namespaces/shop/events")
        })
        .collect();
    let mut reasons: Vec<&str> = events
        .iter()
        .filter_map(|e| e.body["reason"].as_str())
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["ImageAvailable", "Stranded"], "{events:#?}");
    // The stranded Deployment, and only it, gets a Warning naming the image it requires.
    let stranded = &events
        .iter()
        .find(|e| e.body["reason"] == "Stranded")
        .unwrap()
        .body;
    assert_eq!(stranded["type"], "Warning");
    assert_eq!(stranded["regarding"]["kind"], "Deployment");
    assert_eq!(stranded["regarding"]["name"], "stuck");
    assert_eq!(stranded["regarding"]["uid"], "uid-stuck");
    assert_eq!(
        stranded["note"],
        format!(
            "its pod template requires {} (no ImageSet manages it) on 0 node(s), 0 usable; 0 schedulable node(s) satisfy it, 1 needed (minAvailableNodes)",
            key("redis:7.4")
        )
    );
    let certificate = writes
        .iter()
        .find(|w| w.method == "POST" && w.body["metadata"]["name"] == "coral-webhook-tls")
        .expect("the certificate Secret");
    let ca = certificate.body["data"]["ca.crt"].clone();
    let bundle = find(
        &writes,
        "PATCH",
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/coral",
    )
    .expect("the caBundle");
    assert_eq!(bundle.body[1]["value"], ca);

    // The metric counts it; later passes (resync every second) record no second Event.
    let metrics = get_metrics(probes).await;
    assert!(
        metrics.contains("coral_stranded_workloads{kind=\"Deployment\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("coral_stranded_workloads{kind=\"Job\"} 0"),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stranded_events = server
        .writes()
        .iter()
        .filter(|w| w.method == "POST" && w.body["reason"] == "Stranded")
        .count();
    assert_eq!(stranded_events, 1);
}

/// GET /metrics from the probe server.
async fn get_metrics(address: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}
