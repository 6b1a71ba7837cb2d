//! The controller's API calls against a scripted API server: exact requests and bodies.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use http::{Method, StatusCode};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};

use super::aggregate::{Aggregator, Problems};
use super::leader::{LeaseOptions, round};
use super::retiring::LabelUsers;
use super::secrets::{copy_name, sync_copies};
use super::{CertTargets, ControllerOptions, Outcome, Writer};
use crate::api::ImageSet;
use crate::fake_api::{self, ApiHandle, Seen, json_response, next_request, not_found};
use crate::image::{ImageReference, label_key};
use crate::metrics::ControllerMetrics;

fn key(image: &str) -> String {
    label_key(&ImageReference::parse(image).expect("valid reference"))
}

fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).expect("time")
}

fn options() -> ControllerOptions {
    ControllerOptions {
        namespace: "coral-system".into(),
        identity: "controller-0".into(),
        lease_duration: Duration::from_secs(15),
        cleanup_timeout: Duration::from_secs(120),
        resync: Duration::from_secs(60),
        debounce: Duration::from_millis(10),
        certs: None,
        probe_listen: "127.0.0.1:0".parse().expect("address"),
        policies_configmap: None,
        mirror: crate::controller::mirroring::MirrorOptions {
            concurrency: 2,
            recheck: Duration::from_secs(600),
            probe_every: Duration::from_secs(30),
            retention: None,
        },
    }
}

fn writer() -> (Writer, ApiHandle) {
    let (client, handle) = fake_api::client("default");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "coral-controller".into(),
            instance: Some("controller-0".into()),
        },
    );
    let writer = Writer {
        client,
        recorder,
        metrics: ControllerMetrics::new(),
    };
    (writer, handle)
}

fn image_set(name: &str, images: &[&str], extra_metadata: Value) -> ImageSet {
    let mut metadata = json!({"name": name, "namespace": "shop", "generation": 3, "uid": format!("uid-{name}"), "resourceVersion": "7"});
    if let (Some(metadata), Some(extra)) = (metadata.as_object_mut(), extra_metadata.as_object()) {
        metadata.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
        "metadata": metadata,
        "spec": {"images": images, "nodeSelector": {"matchLabels": {"pool": "web"}}},
    }))
    .expect("ImageSet")
}

fn labels(available: &[&str]) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([("pool".to_string(), "web".to_string())]);
    for image in available {
        labels.insert(key(image), "available".to_string());
    }
    labels
}

/// Runs `work` while answering its requests with `answer`; returns its result and the
/// requests seen (method, path and query, content type, body).
async fn serve<T>(
    mut handle: ApiHandle,
    work: impl std::future::Future<Output = T>,
    mut answer: impl FnMut(&Seen) -> http::Response<fake_api::MockBody>,
) -> (T, Vec<(String, String, String, Value)>) {
    let mut seen = Vec::new();
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            result = &mut work => return (result, seen),
            request = next_request(&mut handle) => {
                let response = answer(&request);
                seen.push((request.method.to_string(), request.uri.clone(), request.content_type.clone(), request.body.clone()));
                request.respond.send_response(response);
            }
        }
    }
}

type Seen4 = Vec<(String, String, String, Value)>;

/// Method and path-and-query of each request.
fn calls(seen: &Seen4) -> Vec<(&str, &str)> {
    seen.iter()
        .map(|(m, u, _, _)| (m.as_str(), u.as_str()))
        .collect()
}

/// Reconciles `set` once against the scripted API.
async fn reconcile_once(
    set: &ImageSet,
    all: &[&ImageSet],
    aggregator: &Mutex<Aggregator>,
    answer: impl FnMut(&Seen) -> http::Response<fake_api::MockBody>,
) -> (Result<Outcome, kube::Error>, Seen4) {
    reconcile_with_users(set, all, aggregator, &LabelUsers::default(), answer).await
}

/// Reconciles `set` once, with these workloads requiring image labels.
async fn reconcile_with_users(
    set: &ImageSet,
    all: &[&ImageSet],
    aggregator: &Mutex<Aggregator>,
    users: &LabelUsers,
    answer: impl FnMut(&Seen) -> http::Response<fake_api::MockBody>,
) -> (Result<Outcome, kube::Error>, Seen4) {
    let (writer, handle) = writer();
    let options = options();
    let problems = Problems::default();
    let copies = std::collections::BTreeMap::new();
    let work = writer.reconcile(
        set,
        all,
        aggregator,
        &problems,
        users,
        &copies,
        &options,
        now(),
    );
    serve(handle, work, answer).await
}

/// The status a merge patch leaves on the server: fields patched to null are gone.
fn stored_status(patch: &Value) -> crate::api::ImageSetStatus {
    let mut status = patch["status"].clone();
    if let Some(fields) = status.as_object_mut() {
        fields.retain(|_, value| !value.is_null());
    }
    serde_json::from_value(status).expect("status")
}

fn without_times(mut value: Value) -> Value {
    if let Some(conditions) = value["status"]["conditions"].as_array_mut() {
        for condition in conditions {
            assert!(condition["lastTransitionTime"].is_string(), "{condition}");
            condition
                .as_object_mut()
                .map(|c| c.remove("lastTransitionTime"));
        }
    }
    value
}

#[tokio::test]
async fn controller_adds_its_finalizer_patches_status_and_records_events() {
    let mut aggregator = Aggregator::new();
    aggregator.apply_node_labels("a", labels(&["nginx:1.27"]));
    aggregator.apply_node_labels("b", labels(&[]));
    let set = image_set("web", &["nginx:1.27"], json!({}));
    aggregator.apply_image_set(&set);
    let aggregator = Mutex::new(aggregator);
    let echo = serde_json::to_value(&set).expect("json");
    let (outcome, seen) =
        reconcile_once(&set, &[&set], &aggregator, |request| match request.method {
            Method::POST => json_response(StatusCode::CREATED, &request.body),
            _ => json_response(StatusCode::OK, &echo),
        })
        .await;
    let outcome = outcome.expect("reconciled");
    assert_eq!(
        outcome,
        Outcome {
            finalizer_added: true,
            status_patched: true,
            events: 1,
            ..Outcome::default()
        }
    );
    assert_eq!(seen.len(), 3, "{seen:#?}");
    assert_eq!(
        (seen[0].0.as_str(), seen[0].1.as_str(), seen[0].2.as_str()),
        (
            "PATCH",
            "/apis/coral.dev/v1alpha1/namespaces/shop/imagesets/web?",
            "application/json-patch+json"
        )
    );
    assert_eq!(
        seen[0].3,
        json!([{"op": "add", "path": "/metadata/finalizers", "value": ["coral.dev/cleanup"]}])
    );
    assert_eq!(
        (seen[1].0.as_str(), seen[1].1.as_str(), seen[1].2.as_str()),
        (
            "PATCH",
            "/apis/coral.dev/v1alpha1/namespaces/shop/imagesets/web/status?",
            "application/merge-patch+json"
        )
    );
    assert_eq!(
        without_times(seen[1].3.clone()),
        json!({"status": {
            "observedGeneration": 3,
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "NotAllAvailable", "message": "0 of 1 image(s) are on all 2 targeted node(s)", "observedGeneration": 3},
                {"type": "Progressing", "status": "True", "reason": "Pulling", "message": "1 pull(s) pending or under way on the targeted nodes", "observedGeneration": 3},
                {"type": "Degraded", "status": "False", "reason": "AsExpected", "message": "no failures", "observedGeneration": 3},
                {"type": "DigestDrift", "status": "False", "reason": "Consistent", "message": "every image is held under one digest", "observedGeneration": 3},
            ],
            "imageCount": 1, "nodesTargeted": 2, "imagesComplete": 0,
            "images": [{
                "image": "nginx:1.27", "normalized": "docker.io/library/nginx:1.27", "label": key("nginx:1.27"),
                "nodesTargeted": 2, "nodesAvailable": 1, "nodesPulling": 1, "nodesFailed": 0, "nodesDiffering": 0,
            }],
            "retiring": null,
        }})
    );
    let (method, uri, _, event) = &seen[2];
    assert_eq!(
        (method.as_str(), uri.as_str()),
        ("POST", "/apis/events.k8s.io/v1/namespaces/shop/events?")
    );
    assert_eq!(event["reason"], "ImageAvailable");
    assert_eq!(event["type"], "Normal");
    assert_eq!(
        event["note"],
        "nginx:1.27 is available on its first node (1 of 2 targeted)"
    );
    assert_eq!(event["regarding"]["kind"], "ImageSet");
    assert_eq!(event["regarding"]["name"], "web");
    assert_eq!(event["reportingController"], "coral-controller");

    // Written back as the API server holds it: nothing changed, nothing is written.
    let mut current = set.clone();
    current.metadata.finalizers = Some(vec!["coral.dev/cleanup".into()]);
    current.status = Some(stored_status(&seen[1].3));
    let (outcome, seen) = reconcile_once(&current, &[&current], &aggregator, |_| {
        panic!("no request expected")
    })
    .await;
    assert_eq!(outcome.expect("reconciled"), Outcome::default());
    assert!(seen.is_empty());
}

#[tokio::test]
async fn controller_releases_its_finalizer_once_no_node_carries_an_orphan_label() {
    let deleted_at = |seconds_ago: i64| {
        json!({
            "deletionTimestamp": Timestamp::from_second(1_800_000_000 - seconds_ago).expect("time").to_string(),
            "finalizers": ["example.com/other", "coral.dev/cleanup"],
        })
    };
    // `web` is being deleted; `api` still wants redis, so only nginx's label is an orphan.
    let api = image_set(
        "api",
        &["redis:7"],
        json!({"finalizers": ["coral.dev/cleanup"]}),
    );
    let mut aggregator = Aggregator::new();
    aggregator.apply_node_labels("a", labels(&["nginx:1.27", "redis:7"]));
    let aggregator = Mutex::new(aggregator);

    // Within the timeout: the agents remove the labels; the controller waits.
    let recent = image_set("web", &["nginx:1.27", "redis:7"], deleted_at(10));
    let (outcome, seen) = reconcile_once(&recent, &[&recent, &api], &aggregator, |_| {
        panic!("no request expected")
    })
    .await;
    assert_eq!(outcome.expect("reconciled"), Outcome::default());
    assert!(seen.is_empty());

    // Past the timeout (node a's agent is gone): the controller removes the label itself.
    let stale = image_set("web", &["nginx:1.27", "redis:7"], deleted_at(600));
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "a"}});
    let (outcome, seen) = reconcile_once(&stale, &[&stale, &api], &aggregator, |_| {
        json_response(StatusCode::OK, &node)
    })
    .await;
    assert_eq!(
        outcome.expect("reconciled"),
        Outcome {
            labels_removed: 1,
            ..Outcome::default()
        }
    );
    assert_eq!(
        seen,
        [(
            "PATCH".to_string(),
            "/api/v1/nodes/a?".to_string(),
            "application/merge-patch+json".to_string(),
            json!({"metadata": {"labels": {key("nginx:1.27"): null}}}),
        )]
    );

    // The label is gone: the finalizer is released, guarded by a test of its position.
    aggregator
        .lock()
        .expect("lock")
        .apply_node_labels("a", labels(&["redis:7"]));
    let echo = serde_json::to_value(&stale).expect("json");
    let (outcome, seen) = reconcile_once(&stale, &[&stale, &api], &aggregator, |_| {
        json_response(StatusCode::OK, &echo)
    })
    .await;
    assert_eq!(
        outcome.expect("reconciled"),
        Outcome {
            finalizer_removed: true,
            ..Outcome::default()
        }
    );
    assert_eq!(
        seen[0].1,
        "/apis/coral.dev/v1alpha1/namespaces/shop/imagesets/web?"
    );
    assert_eq!(seen[0].2, "application/json-patch+json");
    assert_eq!(
        seen[0].3,
        json!([
            {"op": "test", "path": "/metadata/finalizers/1", "value": "coral.dev/cleanup"},
            {"op": "remove", "path": "/metadata/finalizers/1"},
        ])
    );
}

#[tokio::test]
async fn controller_two_image_sets_sharing_an_image_never_block_each_others_deletion() {
    let deleting =
        json!({"deletionTimestamp": "2027-01-15T08:00:00Z", "finalizers": ["coral.dev/cleanup"]});
    let a = image_set("a", &["nginx:1.27"], deleting.clone());
    let b = image_set("b", &["nginx:1.27"], deleting);
    let mut aggregator = Aggregator::new();
    aggregator.apply_node_labels("n", labels(&[]));
    let aggregator = Mutex::new(aggregator);
    // Both deleted at once and no node holds the label: both finalizers go.
    for set in [&a, &b] {
        let echo = serde_json::to_value(set).expect("json");
        let (outcome, _) = reconcile_once(set, &[&a, &b], &aggregator, |_| {
            json_response(StatusCode::OK, &echo)
        })
        .await;
        assert!(outcome.expect("reconciled").finalizer_removed);
    }
}

fn secret(namespace: &str, name: &str, data: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "4", "annotations": annotations},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(data)},
    })
}

#[tokio::test]
async fn controller_copies_pull_secrets_updates_them_and_deletes_unreferenced_copies() {
    let (client, handle) = fake_api::client("default");
    let copy = copy_name("shop", "pull");
    let stale = copy_name("shop", "old");
    let sources = BTreeSet::from([
        ("shop".to_string(), "missing".to_string()),
        ("shop".to_string(), "pull".to_string()),
    ]);
    let work = sync_copies(&client, "coral-system", &sources);
    let list = json!({"apiVersion": "v1", "kind": "SecretList", "metadata": {}, "items": [
        secret("coral-system", &copy, "{\"auths\": {}}", json!({"coral.dev/source": "shop/pull"})),
        secret("coral-system", &stale, "{}", json!({"coral.dev/source": "shop/old"})),
    ]});
    let source = secret(
        "shop",
        "pull",
        "{\"auths\": {\"r.example.com\": {}}}",
        json!({}),
    );
    let (missing, seen) = serve(handle, work, |request| {
        match (request.method.as_str(), request.path()) {
            ("GET", "/api/v1/namespaces/coral-system/secrets") => {
                json_response(StatusCode::OK, &list)
            }
            ("GET", "/api/v1/namespaces/shop/secrets/missing") => not_found("secrets", "missing"),
            ("GET", "/api/v1/namespaces/shop/secrets/pull") => {
                json_response(StatusCode::OK, &source)
            }
            ("DELETE", _) => json_response(
                StatusCode::OK,
                &json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            ),
            _ => json_response(StatusCode::OK, &request.body),
        }
    })
    .await;
    assert_eq!(
        missing.expect("synced"),
        BTreeSet::from(["shop/missing".to_string()])
    );
    let calls = calls(&seen);
    assert_eq!(
        calls,
        [
            (
                "GET",
                "/api/v1/namespaces/coral-system/secrets?&labelSelector=coral.dev%2Fpull-secret-copy%3Dtrue"
            ),
            ("GET", "/api/v1/namespaces/shop/secrets/missing"),
            ("GET", "/api/v1/namespaces/shop/secrets/pull"),
            (
                "PUT",
                &format!("/api/v1/namespaces/coral-system/secrets/{copy}?")
            ),
            (
                "DELETE",
                &format!("/api/v1/namespaces/coral-system/secrets/{stale}?")
            ),
        ]
    );
    assert_eq!(
        seen[3].3,
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {
                "name": copy, "namespace": "coral-system", "resourceVersion": "4",
                "labels": {"coral.dev/pull-secret-copy": "true", "app.kubernetes.io/managed-by": "coral"},
                "annotations": {"coral.dev/source": "shop/pull"},
            },
            "type": "kubernetes.io/dockerconfigjson",
            "data": source["data"],
        })
    );
}

#[tokio::test]
async fn controller_lease_is_acquired_renewed_and_respected() {
    let lease_options = LeaseOptions {
        namespace: "coral-system".into(),
        name: "coral-controller".into(),
        identity: "controller-0".into(),
        duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(5),
    };
    let path = "/apis/coordination.k8s.io/v1/namespaces/coral-system/leases/coral-controller";

    // No lease: created, held by us.
    let (client, handle) = fake_api::client("default");
    let api = kube::Api::namespaced(client, "coral-system");
    let (leads, seen) = serve(
        handle,
        round(&api, &lease_options),
        |request| match request.method {
            Method::GET => not_found("leases", "coral-controller"),
            _ => json_response(StatusCode::CREATED, &request.body),
        },
    )
    .await;
    assert!(leads.expect("round"));
    assert_eq!((seen[0].0.as_str(), seen[0].1.as_str()), ("GET", path));
    assert_eq!(
        (seen[1].0.as_str(), seen[1].1.as_str()),
        (
            "POST",
            "/apis/coordination.k8s.io/v1/namespaces/coral-system/leases?"
        )
    );
    let created = seen[1].3.clone();
    assert_eq!(created["spec"]["holderIdentity"], "controller-0");
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(created["spec"]["leaseTransitions"], 0);

    // Ours: renewed with a replace guarded by its resourceVersion.
    let mut ours = created.clone();
    ours["metadata"]["resourceVersion"] = json!("11");
    let (client, handle) = fake_api::client("default");
    let api = kube::Api::namespaced(client, "coral-system");
    let (leads, seen) = serve(
        handle,
        round(&api, &lease_options),
        |request| match request.method {
            Method::GET => json_response(StatusCode::OK, &ours),
            _ => json_response(StatusCode::OK, &request.body),
        },
    )
    .await;
    assert!(leads.expect("round"));
    assert_eq!(
        (seen[1].0.as_str(), seen[1].1.as_str()),
        ("PUT", &format!("{path}?")[..])
    );
    assert_eq!(seen[1].3["metadata"]["resourceVersion"], "11");
    assert_eq!(seen[1].3["spec"]["holderIdentity"], "controller-0");

    // Another replica's, freshly renewed: stand by, write nothing.
    let mut theirs = ours.clone();
    theirs["spec"]["holderIdentity"] = json!("controller-1");
    theirs["spec"]["renewTime"] = json!(Timestamp::now().to_string());
    let (client, handle) = fake_api::client("default");
    let api = kube::Api::namespaced(client, "coral-system");
    let (leads, seen) = serve(handle, round(&api, &lease_options), |_| {
        json_response(StatusCode::OK, &theirs)
    })
    .await;
    assert!(!leads.expect("round"));
    assert_eq!(seen.len(), 1, "only the read");
}

#[tokio::test]
async fn controller_issues_the_webhook_certificate_and_patches_ca_bundles() {
    let (writer, handle) = writer();
    let targets = CertTargets {
        secret: "coral-webhook-tls".into(),
        service: "coral-webhook".into(),
        mutating: "coral".into(),
        validating: "coral".into(),
    };
    let work = writer.ensure_certs("coral-system", &targets, now());
    let created: std::cell::RefCell<Option<Value>> = Default::default();
    let (result, seen) = serve(handle, work, |request| match (request.method.as_str(), request.path()) {
        ("GET", "/api/v1/namespaces/coral-system/secrets/coral-webhook-tls") => not_found("secrets", "coral-webhook-tls"),
        ("POST", "/api/v1/namespaces/coral-system/secrets") => {
            created.replace(Some(request.body.clone()));
            json_response(StatusCode::CREATED, &request.body)
        }
        ("GET", "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/coral") => json_response(StatusCode::OK, &json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "coral"},
            "webhooks": [{"name": "mutate.coral.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                          "clientConfig": {"service": {"name": "coral-webhook", "namespace": "coral-system"}}}],
        })),
        ("GET", "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/coral") => not_found("validatingwebhookconfigurations", "coral"),
        _ => json_response(StatusCode::OK, &json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration", "metadata": {"name": "coral"},
        })),
    })
    .await;
    result.expect("certificates managed");
    let secret = created.into_inner().expect("a Secret created");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(
        secret["metadata"]["annotations"]["coral.dev/dns-names"],
        "coral-webhook,coral-webhook.coral-system,coral-webhook.coral-system.svc,coral-webhook.coral-system.svc.cluster.local"
    );
    let ca = secret["data"]["ca.crt"].as_str().expect("ca.crt");
    let calls = calls(&seen);
    assert_eq!(
        calls,
        [
            (
                "GET",
                "/api/v1/namespaces/coral-system/secrets/coral-webhook-tls"
            ),
            ("POST", "/api/v1/namespaces/coral-system/secrets?"),
            (
                "GET",
                "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/coral"
            ),
            (
                "PATCH",
                "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/coral?"
            ),
            (
                "GET",
                "/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations/coral"
            ),
        ]
    );
    assert_eq!(seen[3].2, "application/json-patch+json");
    // The caBundle is the CA PEM, base64-encoded: the same bytes the Secret holds as ca.crt.
    assert_eq!(
        seen[3].3,
        json!([
            {"op": "test", "path": "/webhooks/0/name", "value": "mutate.coral.dev"},
            {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": ca},
        ])
    );
}

fn deployment_requiring(name: &str, image: &str) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
        "spec": {"template": {"spec": {"nodeSelector": {key(image): "available"}, "containers": []}}},
    })
}

#[tokio::test]
async fn an_image_dropped_while_a_workload_requires_its_label_is_retiring() {
    let mut aggregator = Aggregator::new();
    aggregator.apply_node_labels("a", labels(&["nginx:1.27", "nginx:1.28"]));
    let mut set = image_set(
        "web",
        &["nginx:1.28"],
        json!({"finalizers": ["coral.dev/cleanup"]}),
    );
    // The last status still lists nginx:1.27: it was in the spec until now.
    set.status = Some(serde_json::from_value(json!({"images": [
        {"image": "nginx:1.27", "normalized": "docker.io/library/nginx:1.27", "label": key("nginx:1.27")},
    ]})).expect("status"));
    aggregator.apply_image_set(&set);
    let aggregator = Mutex::new(aggregator);
    let users = LabelUsers::of(&[deployment_requiring("web", "nginx:1.27")]);
    let echo = serde_json::to_value(&set).expect("json");
    let (outcome, seen) =
        reconcile_with_users(
            &set,
            &[&set],
            &aggregator,
            &users,
            |request| match request.method {
                Method::POST => json_response(StatusCode::CREATED, &request.body),
                _ => json_response(StatusCode::OK, &echo),
            },
        )
        .await;
    assert!(outcome.expect("reconciled").status_patched);
    let (method, uri, _, body) = &seen[0];
    assert_eq!(
        (method.as_str(), uri.as_str()),
        (
            "PATCH",
            "/apis/coral.dev/v1alpha1/namespaces/shop/imagesets/web/status?"
        )
    );
    assert_eq!(
        body["status"]["retiring"],
        json!([{
            "image": "docker.io/library/nginx:1.27", "label": key("nginx:1.27"),
            "workloads": ["Deployment shop/web"], "workloadCount": 1,
        }])
    );
    let retiring = body["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "Retiring")
        .expect("the Retiring condition");
    assert_eq!(
        (&retiring["status"], &retiring["reason"]),
        (&json!("True"), &json!("StillRequired"))
    );
    assert!(
        retiring["message"]
            .as_str()
            .expect("message")
            .contains("Deployment shop/web")
    );

    // Written back, unchanged: nothing more to write.
    let mut current = set.clone();
    current.status = Some(stored_status(body));
    let (_, seen) =
        reconcile_with_users(
            &current,
            &[&current],
            &aggregator,
            &users,
            |request| match request.method {
                Method::POST => json_response(StatusCode::CREATED, &request.body),
                _ => panic!("no write expected: {}", request.uri),
            },
        )
        .await;
    assert!(seen.iter().all(|(m, ..)| m == "POST"), "{seen:#?}");

    // No workload requires it any more: retiring ends, written as null.
    let (_, seen) = reconcile_with_users(
        &current,
        &[&current],
        &aggregator,
        &LabelUsers::default(),
        |request| match request.method {
            Method::POST => json_response(StatusCode::CREATED, &request.body),
            _ => json_response(StatusCode::OK, &echo),
        },
    )
    .await;
    let status = &seen
        .iter()
        .find(|(m, u, ..)| m == "PATCH" && u.contains("/status"))
        .expect("status")
        .3;
    assert_eq!(status["status"]["retiring"], Value::Null);
    assert!(
        status["status"]["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .all(|c| c["type"] != "Retiring"),
        "{status}"
    );
}

#[tokio::test]
async fn a_deleted_set_keeps_its_finalizer_and_labels_while_its_images_are_retiring() {
    let deleted = json!({
        "deletionTimestamp": Timestamp::from_second(1_800_000_000 - 600).expect("time").to_string(),
        "finalizers": ["coral.dev/cleanup"],
    });
    let mut aggregator = Aggregator::new();
    aggregator.apply_node_labels("a", labels(&["nginx:1.27"]));
    let aggregator = Mutex::new(aggregator);
    let set = image_set("web", &["nginx:1.27"], deleted);
    let users = LabelUsers::of(&[deployment_requiring("web", "nginx:1.27")]);
    let echo = serde_json::to_value(&set).expect("json");
    // Past the cleanup timeout, but a workload requires the label: only the status is written.
    let (outcome, seen) = reconcile_with_users(&set, &[&set], &aggregator, &users, |_| {
        json_response(StatusCode::OK, &echo)
    })
    .await;
    assert_eq!(
        outcome.expect("reconciled"),
        Outcome {
            status_patched: true,
            ..Outcome::default()
        }
    );
    assert_eq!(
        calls(&seen),
        [(
            "PATCH",
            "/apis/coral.dev/v1alpha1/namespaces/shop/imagesets/web/status?"
        )]
    );
    assert_eq!(
        seen[0].3["status"]["retiring"][0]["image"],
        "docker.io/library/nginx:1.27"
    );

    // Released: retiring ends, then the usual cleanup (the label, past the timeout).
    let mut released = set.clone();
    released.status = Some(stored_status(&seen[0].3));
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "a"}});
    let (outcome, seen) = reconcile_with_users(
        &released,
        &[&released],
        &aggregator,
        &LabelUsers::default(),
        |request| {
            if request.uri.starts_with("/api/v1/nodes") {
                json_response(StatusCode::OK, &node)
            } else {
                json_response(StatusCode::OK, &echo)
            }
        },
    )
    .await;
    let outcome = outcome.expect("reconciled");
    assert!(outcome.status_patched);
    assert_eq!(outcome.labels_removed, 1);
    assert_eq!(
        calls(&seen),
        [
            (
                "PATCH",
                "/apis/coral.dev/v1alpha1/namespaces/shop/imagesets/web/status?"
            ),
            ("PATCH", "/api/v1/nodes/a?"),
        ]
    );
    assert_eq!(
        seen[1].3,
        json!({"metadata": {"labels": {key("nginx:1.27"): null}}})
    );
}

#[tokio::test]
async fn stranded_workloads_get_one_warning_event_and_are_counted_by_kind() {
    let (writer, handle) = writer();
    let index =
        crate::index::StateFile::parse("nodes:\n  - {name: a, images: [\"nginx:1.27\"]}\n", "test")
            .expect("state")
            .to_index();
    let workloads = vec![
        deployment_requiring("fine", "nginx:1.27"),
        deployment_requiring("stuck", "redis:7.4"),
    ];
    let found = super::find_stranded(&workloads, &index, 1);
    assert_eq!(found.len(), 1);
    let seen_before = Mutex::new(BTreeSet::new());
    let work = async {
        writer.report_stranded(&found, &seen_before).await;
        // The same again: no second Event.
        writer.report_stranded(&found, &seen_before).await;
    };
    let ((), seen) = serve(handle, work, |request| {
        json_response(StatusCode::CREATED, &request.body)
    })
    .await;
    assert_eq!(
        calls(&seen),
        [("POST", "/apis/events.k8s.io/v1/namespaces/shop/events?")]
    );
    let event = &seen[0].3;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "Stranded");
    assert_eq!(event["action"], "CheckPlacement");
    assert_eq!(
        event["regarding"],
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "namespace": "shop", "name": "stuck", "uid": "uid-stuck"})
    );
    assert_eq!(
        event["note"],
        format!(
            "its pod template requires {} (no ImageSet manages it) on 0 node(s), 0 usable; 0 schedulable node(s) satisfy it, 1 needed (minAvailableNodes)",
            key("redis:7.4")
        )
    );
    let metrics = writer.metrics.render();
    assert!(
        metrics.contains("coral_stranded_workloads{kind=\"Deployment\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("coral_stranded_workloads{kind=\"CronJob\"} 0"),
        "{metrics}"
    );
}
