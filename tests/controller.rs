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

use api_server::{ApiServer, Write, list};
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
    let meta = |name: &str, labels: Value| {
        json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
               "metadata": {"name": name, "resourceVersion": "1", "labels": labels}})
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
    let server = ApiServer::start(
        BTreeMap::from([
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
                    "meta.k8s.io/v1",
                    "PartialObjectMetadataList",
                    vec![
                        meta("a", json!({key("nginx:1.27"): "available"})),
                        meta("b", json!({})),
                    ],
                ),
            ),
            (
                "/apis/coral.dev/v1alpha1/nodeimages".to_string(),
                list("coral.dev/v1alpha1", "NodeImageList", vec![]),
            ),
            (
                "/api/v1/namespaces/coral-system/secrets".to_string(),
                list("v1", "SecretList", vec![]),
            ),
        ]),
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
    let child = server
        .coral()
        .args([
            "controller",
            "--manage-webhook-certs",
            "--pod-name",
            "controller-0",
        ])
        .args(["--probe-listen", "127.0.0.1:0", "--debounce", "50ms"])
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
    let event = find(
        &writes,
        "POST",
        "/apis/events.k8s.io/v1/namespaces/shop/events",
    )
    .expect("an Event");
    assert_eq!(event.body["reason"], "ImageAvailable");
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
}
