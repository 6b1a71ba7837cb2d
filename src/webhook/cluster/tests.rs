use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use serde_json::{Value, json};

use super::{ClusterOptions, ObjectName, PolicyChange, PolicyTracker, sync};
use crate::api::{ImageSet, NodeImage};
use crate::fake_api::{
    self, ApiHandle, WAIT, WatchSender, expected_list_query, expected_watch_query, json_response,
    next_request, send_event, streaming,
};
use crate::image::{ImageReference, label_key};
use crate::index::{ClusterIndex, ClusterObjects};
use crate::metrics::WebhookMetrics;
use crate::policy::EvaluatorOptions;
use crate::webhook::{FailureMode, Shared};

fn key(image: &str) -> String {
    label_key(&ImageReference::parse(image).expect("valid reference"))
}

fn shared() -> Arc<Shared> {
    Arc::new(Shared {
        snapshot: std::sync::RwLock::new(None),
        metrics: WebhookMetrics::new(),
        failure_mode: FailureMode::Allow,
        workers: std::sync::Arc::new(tokio::sync::Semaphore::new(1)),
        max_body_bytes: 1 << 20,
        request_timeout: Duration::from_secs(1),
        evaluation_timeout: Duration::from_secs(1),
        listening: false.into(),
        synced: false.into(),
    })
}

/// A Node as the API server lists it, with a status Coral must not keep.
fn node(name: &str, labels: Value) -> Value {
    node_with_spec(name, labels, json!({"podCIDR": "10.0.0.0/24"}))
}

fn node_with_spec(name: &str, labels: Value, spec: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "resourceVersion": "7", "labels": labels},
        "spec": spec,
        "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "images": [{"names": ["docker.io/library/nginx:1.27"], "sizeBytes": 70000000}],
        },
    })
}

fn image_set() -> Value {
    json!({
        "apiVersion": "coral.dev/v1alpha1",
        "kind": "ImageSet",
        "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "5", "uid": "u-1"},
        "spec": {"images": ["nginx:1.27", "redis:7"], "nodeSelector": {"matchLabels": {"pool": "web"}}},
    })
}

fn configmap(files: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "coral-policies", "namespace": "coral-system", "uid": "cm-uid", "resourceVersion": "31"},
        "data": files,
    })
}

const GOOD_POLICY: &str =
    "package coral.mutate\n\nwarn contains \"custom policies\" if { input.request }\n";
const BAD_POLICY: &str = "package coral.mutate\n\nwarn contains x if {\n";

/// The list and the watch each resource gets, answered as an API server would.
struct FakeApi {
    handle: ApiHandle,
    /// Watch streams by resource path, kept open.
    watches: BTreeMap<String, WatchSender>,
    /// Event bodies posted.
    events: Vec<Value>,
    configmap: Value,
}

impl FakeApi {
    fn list(&self, path: &str) -> Value {
        let metadata = json!({"resourceVersion": "100"});
        match path {
            "/api/v1/nodes" => json!({
                "apiVersion": "v1", "kind": "NodeList", "metadata": metadata,
                "items": [
                    node("node-a", json!({"pool": "web", key("nginx:1.27"): "available"})),
                    node("node-b", json!({"pool": "web", key("nginx:1.27"): "available", key("redis:7"): "available"})),
                    node("node-c", json!({"pool": "batch"})),
                ],
            }),
            "/api/v1/namespaces" => json!({
                "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": metadata,
                "items": [{"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                           "metadata": {"name": "shop", "labels": {"coral.dev/inject": "enabled"}}}],
            }),
            "/apis/coral.dev/v1alpha1/imagesets" => json!({
                "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSetList", "metadata": metadata,
                "items": [image_set()],
            }),
            "/apis/coral.dev/v1alpha1/nodeimages" => json!({
                "apiVersion": "coral.dev/v1alpha1", "kind": "NodeImageList", "metadata": metadata,
                "items": [{
                    "apiVersion": "coral.dev/v1alpha1", "kind": "NodeImage",
                    "metadata": {"name": "node-a"},
                    "spec": {"nodeName": "node-a"},
                    "status": {"available": 1, "pulling": 0, "failed": 1, "images": [
                        {"image": "docker.io/library/redis:7", "label": key("redis:7"), "state": "failed", "attempts": 5, "lastError": "not found"},
                    ]},
                }],
            }),
            "/apis/coral.dev/v1alpha1/registries" => json!({
                "apiVersion": "coral.dev/v1alpha1", "kind": "RegistryList", "metadata": metadata,
                "items": [{
                    "apiVersion": "coral.dev/v1alpha1", "kind": "Registry",
                    "metadata": {"name": "local"},
                    "spec": {"endpoint": "localhost:30500"},
                    "status": {"mirroredImages": 0, "conditions": [{
                        "type": "Reachable", "status": "True", "reason": "Answered", "message": "GET /v2/ answered",
                        "lastTransitionTime": "2026-01-01T00:00:00Z",
                    }]},
                }],
            }),
            "/api/v1/namespaces/coral-system/configmaps" => json!({
                "apiVersion": "v1", "kind": "ConfigMapList", "metadata": metadata,
                "items": [self.configmap.clone()],
            }),
            other => panic!("unexpected list of {other}"),
        }
    }

    /// Answers requests until `done` says the test has seen enough.
    async fn serve_until(&mut self, mut done: impl FnMut(&Self) -> bool) {
        while !done(self) {
            let seen = next_request(&mut self.handle).await;
            let path = seen.path().to_string();
            let query = seen.query().to_string();
            if seen.method == Method::POST {
                assert_eq!(
                    path,
                    "/apis/events.k8s.io/v1/namespaces/coral-system/events"
                );
                seen.respond
                    .send_response(json_response(StatusCode::CREATED, &seen.body));
                self.events.push(seen.body);
                continue;
            }
            assert_eq!(seen.method, Method::GET, "{}", seen.uri);
            // Namespaces are watched as metadata only; Nodes whole, for their taints and
            // spec.unschedulable.
            assert_eq!(
                seen.accept.contains("as=PartialObjectMetadata"),
                path == "/api/v1/namespaces",
                "{path}: Accept was {:?}",
                seen.accept
            );
            let expected_field_selector = if path.ends_with("/configmaps") {
                "&fieldSelector=metadata.name%3Dcoral-policies"
            } else {
                ""
            };
            if seen.is_watch() {
                assert_eq!(
                    query,
                    expected_watch_query(expected_field_selector),
                    "watch of {path}"
                );
                let (response, sender) = streaming();
                seen.respond.send_response(response);
                assert!(
                    self.watches.insert(path.clone(), sender).is_none(),
                    "{path} watched twice"
                );
            } else {
                // Nodes and NodeImages are listed in pages, read consistently.
                let expected = if path == "/api/v1/nodes" || path.ends_with("/nodeimages") {
                    "&limit=100".to_string()
                } else {
                    expected_list_query(expected_field_selector)
                };
                assert_eq!(query, expected, "list of {path}");
                let list = self.list(&path);
                seen.respond
                    .send_response(json_response(StatusCode::OK, &list));
            }
        }
    }
}

fn start(configmap: Value) -> (FakeApi, Arc<Shared>) {
    let (client, handle) = fake_api::client("coral-system");
    let shared = shared();
    let options = ClusterOptions {
        policies_configmap: Some("coral-system/coral-policies".parse().expect("valid name")),
        debounce: Duration::from_millis(10),
        instance: "coral-webhook-0".to_string(),
    };
    tokio::spawn(sync(
        client,
        options,
        EvaluatorOptions::default(),
        shared.clone(),
    ));
    let api = FakeApi {
        handle,
        watches: BTreeMap::new(),
        events: Vec::new(),
        configmap,
    };
    (api, shared)
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn cluster_sync_lists_and_watches_each_resource_then_follows_changes() {
    let (mut api, shared) = start(configmap(json!({
        "mutate.rego": GOOD_POLICY,
        "settings.json": "{\"skipControlledPods\": false}",
    })));
    // Six lists, six watches, and the Event recording that the ConfigMap's policies serve.
    api.serve_until(|api| api.watches.len() == 6 && !api.events.is_empty())
        .await;
    eventually("the first snapshot", || {
        shared.synced.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    assert_eq!(
        crate::probe::Probes::ready(&*shared),
        Err("admission listener not serving".to_string()),
        "not ready before the admission listener is bound"
    );

    let snapshot = shared.snapshot().expect("a snapshot once synced");
    assert_eq!(
        snapshot.policy_origin,
        "configmap coral-system/coral-policies"
    );
    assert!(
        !snapshot.skip_controlled_pods,
        "settings.json of the ConfigMap applies"
    );
    assert_eq!(snapshot.index.node_count(), 3);
    assert_eq!(
        snapshot.index.registries().get("local"),
        Some(&crate::index::RegistryHealth {
            endpoint: "localhost:30500".into(),
            reachable: true,
        }),
        "Registries are watched for the mirror injection"
    );
    assert_eq!(
        snapshot
            .namespace_labels("shop")
            .get("coral.dev/inject")
            .map(String::as_str),
        Some("enabled")
    );
    let availability = snapshot.index.image_availability();
    let nginx = &availability["docker.io/library/nginx:1.27"];
    assert_eq!(
        (
            nginx.nodes_targeted,
            nginx.nodes_available,
            nginx.nodes_failed
        ),
        (2, 2, 0)
    );
    let redis = &availability["docker.io/library/redis:7"];
    assert_eq!(
        (
            redis.nodes_targeted,
            redis.nodes_available,
            redis.nodes_failed
        ),
        (2, 1, 1)
    );

    let loaded = &api.events[0];
    assert_eq!(loaded["reason"], "PoliciesLoaded");
    assert_eq!(loaded["type"], "Normal");
    assert_eq!(loaded["regarding"]["kind"], "ConfigMap");
    assert_eq!(loaded["regarding"]["name"], "coral-policies");
    assert_eq!(loaded["reportingController"], "coral-webhook");
    assert_eq!(loaded["reportingInstance"], "coral-webhook-0");

    // node-c joins the web pool, reports redis and is cordoned: one rebuild picks all up.
    let nodes = api.watches["/api/v1/nodes"].clone();
    send_event(
        &nodes,
        "MODIFIED",
        node_with_spec(
            "node-c",
            json!({"pool": "web", key("redis:7"): "available"}),
            json!({"unschedulable": true}),
        ),
    );
    send_event(&nodes, "DELETED", node("node-a", json!({})));
    eventually("the node changes in the snapshot", || {
        let snapshot = shared.snapshot().expect("snapshot");
        let availability = snapshot.index.image_availability();
        let redis = &availability["docker.io/library/redis:7"];
        snapshot.index.node_count() == 2
            && (
                redis.nodes_targeted,
                redis.nodes_available,
                redis.nodes_failed,
            ) == (2, 2, 0)
    })
    .await;
    // Of node-b and the cordoned node-c, a pod may use node-b only.
    let snapshot = shared.snapshot().expect("snapshot");
    assert_eq!(snapshot.placement.eligible_count(&json!({})), 1);
    let text = shared.metrics.render();
    assert!(
        text.contains("coral_index_objects{resource=\"nodes\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("coral_reloads_total{result=\"success\",what=\"policies\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn cluster_rejects_a_policy_configmap_that_does_not_compile_and_keeps_the_last_good() {
    let (mut api, shared) = start(configmap(json!({
        "mutate.rego": GOOD_POLICY,
        "settings.json": "{\"skipControlledPods\": false}",
    })));
    api.serve_until(|api| api.watches.len() == 6 && !api.events.is_empty())
        .await;
    eventually("the first snapshot", || shared.snapshot().is_some()).await;

    let configmaps = api.watches["/api/v1/namespaces/coral-system/configmaps"].clone();
    let mut broken = configmap(json!({"mutate.rego": GOOD_POLICY, "broken.rego": BAD_POLICY}));
    broken["metadata"]["resourceVersion"] = json!("32");
    send_event(&configmaps, "MODIFIED", broken);
    api.serve_until(|api| api.events.len() == 2).await;

    let rejected = &api.events[1];
    assert_eq!(rejected["reason"], "PoliciesRejected");
    assert_eq!(rejected["type"], "Warning");
    assert_eq!(rejected["action"], "LoadPolicies");
    assert_eq!(rejected["regarding"]["name"], "coral-policies");
    assert_eq!(rejected["regarding"]["namespace"], "coral-system");
    let note = rejected["note"].as_str().expect("a note");
    assert!(
        note.contains("broken.rego:4:"),
        "the note names the file and line: {note}"
    );
    assert!(
        note.ends_with("the last good policies keep serving"),
        "{note}"
    );

    eventually("the failure in the metrics", || {
        let text = shared.metrics.render();
        text.contains("coral_reloads_total{result=\"failure\",what=\"policies\"} 1")
            && text.contains("coral_policy_configmap_valid 0")
    })
    .await;
    let snapshot = shared.snapshot().expect("snapshot");
    assert_eq!(
        snapshot.policy_origin,
        "configmap coral-system/coral-policies"
    );
    assert!(
        !snapshot.skip_controlled_pods,
        "the last good settings still apply"
    );

    // Deleting the ConfigMap brings back the embedded policies.
    send_event(&configmaps, "DELETED", configmap(json!({})));
    eventually("the embedded policies", || {
        shared.snapshot().expect("snapshot").policy_origin == "embedded default policies"
    })
    .await;
    assert!(
        shared
            .metrics
            .render()
            .contains("coral_policy_configmap_valid 1")
    );
}

fn parse_configmap(value: Value) -> ConfigMap {
    serde_json::from_value(value).expect("a ConfigMap")
}

#[test]
fn cluster_policy_tracker_compiles_each_configmap_version_once() {
    let mut tracker =
        PolicyTracker::new(Some("coral-system/coral-policies".parse().expect("name")))
            .expect("tracker");
    let options = EvaluatorOptions::default();
    let good = parse_configmap(configmap(json!({"mutate.rego": GOOD_POLICY})));
    let (snapshot, change) = tracker.build(Some(&good), ClusterIndex::new(), &options);
    assert!(matches!(change, PolicyChange::Loaded { .. }), "{change:?}");
    assert_eq!(
        snapshot.expect("snapshot").policy_origin,
        "configmap coral-system/coral-policies"
    );
    let (_, change) = tracker.build(Some(&good), ClusterIndex::new(), &options);
    assert_eq!(change, PolicyChange::Unchanged);

    let mut bad = parse_configmap(configmap(json!({"broken.rego": BAD_POLICY})));
    bad.metadata.resource_version = Some("32".into());
    let (snapshot, change) = tracker.build(Some(&bad), ClusterIndex::new(), &options);
    let PolicyChange::Rejected { error, configmap } = change else {
        panic!("expected a rejection, got {change:?}");
    };
    assert!(error.contains("broken.rego:4:"), "{error}");
    assert_eq!(configmap.name.as_deref(), Some("coral-policies"));
    assert_eq!(
        snapshot.expect("snapshot").policy_origin,
        "configmap coral-system/coral-policies"
    );
    // The same bad version is not reported again.
    let (_, change) = tracker.build(Some(&bad), ClusterIndex::new(), &options);
    assert_eq!(change, PolicyChange::Unchanged);

    let (snapshot, change) = tracker.build(None, ClusterIndex::new(), &options);
    assert_eq!(change, PolicyChange::Embedded);
    assert_eq!(
        snapshot.expect("snapshot").policy_origin,
        "embedded default policies"
    );
}

#[test]
fn cluster_policy_tracker_rejects_a_configmap_that_breaks_the_evaluation_bounds() {
    let _one_at_a_time = crate::policy::tests::runaway();
    let mut tracker =
        PolicyTracker::new(Some("coral-system/coral-policies".parse().expect("name")))
            .expect("tracker");
    let options = EvaluatorOptions::default();
    let good = parse_configmap(configmap(json!({"mutate.rego": GOOD_POLICY})));
    let (_, change) = tracker.build(Some(&good), ClusterIndex::new(), &options);
    assert!(matches!(change, PolicyChange::Loaded { .. }), "{change:?}");

    // It compiles; only an evaluation shows what it costs.
    let bomb = "package coral.mutate\n\nwarn contains sprintf(\"%d\", [count(numbers.range(1, 100000000))]) if true\n";
    let mut runaway = parse_configmap(configmap(json!({"mutate.rego": bomb})));
    runaway.metadata.resource_version = Some("33".into());
    let started = std::time::Instant::now();
    let (snapshot, change) = tracker.build(Some(&runaway), ClusterIndex::new(), &options);
    assert!(
        started.elapsed() < options.timeout * 2,
        "{:?}",
        started.elapsed()
    );
    let PolicyChange::Rejected { error, .. } = change else {
        panic!("expected a rejection, got {change:?}");
    };
    assert!(
        // Memory, or time when other evaluations grew the process beside it and it ran
        // again until its time was up.
        error.contains("break the evaluation bounds on a probe evaluation")
            && (error.contains("memory budget of 64 MiB") || error.contains("longer than 250ms")),
        "{error}"
    );
    // The last good policies keep serving.
    let snapshot = snapshot.expect("snapshot");
    let request = crate::policy::PolicyRequest::create(
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
               "spec": {"containers": [{"name": "c", "image": "nginx:1.27"}]}}),
        "default",
    )
    .expect("request");
    snapshot
        .decide(&request)
        .expect("the last good policies decide");
}

#[test]
fn cluster_policy_tracker_without_a_configmap_serves_the_embedded_policies() {
    let mut tracker = PolicyTracker::new(None).expect("tracker");
    let options = EvaluatorOptions::default();
    let (_, change) = tracker.build(None, ClusterIndex::new(), &options);
    assert_eq!(change, PolicyChange::Embedded);
    let (_, change) = tracker.build(None, ClusterIndex::new(), &options);
    assert_eq!(change, PolicyChange::Unchanged);
}

#[test]
fn cluster_object_names_parse_namespace_and_name() {
    let name: ObjectName = "coral-system/coral-policies".parse().expect("valid");
    assert_eq!(name.namespace, "coral-system");
    assert_eq!(name.name, "coral-policies");
    assert_eq!(name.to_string(), "coral-system/coral-policies");
    for bad in [
        "coral-policies",
        "/x",
        "x/",
        "a/b/c",
        "Coral/x",
        "ns/Name",
        "-ns/x",
        "ns/x_y",
    ] {
        let error = bad.parse::<ObjectName>().expect_err(bad);
        assert!(error.to_string().contains(bad), "{error}");
    }
}

#[test]
fn cluster_index_from_objects_ignores_node_images_of_unknown_nodes() {
    let set: ImageSet = serde_json::from_value(image_set()).expect("ImageSet");
    let node_a: Node = serde_json::from_value(json!({
        "metadata": {"name": "node-a", "labels": {"pool": "web"}},
        "spec": {"unschedulable": true, "taints": [{"key": "gpu", "effect": "NoSchedule"}]},
    }))
    .expect("Node");
    let failed = |node: &str| -> NodeImage {
        serde_json::from_value(json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "NodeImage",
            "metadata": {"name": node}, "spec": {"nodeName": node},
            "status": {"available": 0, "pulling": 0, "failed": 1, "images": [
                {"image": "nginx:1.27", "label": key("nginx:1.27"), "state": "failed", "attempts": 1},
            ]},
        }))
        .expect("NodeImage")
    };
    let (known, gone) = (failed("node-a"), failed("node-gone"));
    let index = ClusterIndex::from_objects(ClusterObjects {
        image_sets: &[&set],
        nodes: &[&node_a],
        namespaces: &[],
        node_images: &[&known, &gone],
    });
    assert_eq!(index.node_count(), 1);
    let nginx = &index.image_availability()["docker.io/library/nginx:1.27"];
    assert_eq!((nginx.nodes_targeted, nginx.nodes_failed), (1, 1));
    // The node's taint and cordon reach placement: only a pod tolerating both may use it.
    let placement = index.placement();
    assert_eq!(placement.eligible_count(&json!({})), 0);
    let gpu = json!({"key": "gpu", "operator": "Exists"});
    let cordon = json!({"key": "node.kubernetes.io/unschedulable", "operator": "Exists"});
    assert_eq!(placement.eligible_count(&json!({"tolerations": [gpu]})), 0);
    assert_eq!(
        placement.eligible_count(&json!({"tolerations": [gpu, cordon]})),
        1
    );
}

#[test]
fn stored_nodes_keep_only_what_placement_reads() {
    let mut node: Node = serde_json::from_value(json!({
        "metadata": {
            "name": "node-a", "uid": "u1", "resourceVersion": "7",
            "labels": {"pool": "web"},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
            "managedFields": [{"manager": "kubelet", "operation": "Update"}],
        },
        "spec": {"podCIDR": "10.0.0.0/24", "providerID": "x://1", "unschedulable": true,
                 "taints": [{"key": "gpu", "value": "a100", "effect": "NoSchedule"}]},
        "status": {
            "images": [{"names": ["docker.io/library/nginx:1.27"], "sizeBytes": 1}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }))
    .expect("Node");
    crate::cluster::strip_node(&mut node);
    assert_eq!(
        serde_json::to_value(&node).expect("json"),
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "uid": "u1", "resourceVersion": "7", "labels": {"pool": "web"}},
            "spec": {"unschedulable": true, "taints": [{"key": "gpu", "value": "a100", "effect": "NoSchedule"}]},
        })
    );
}
