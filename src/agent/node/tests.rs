use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::{Method, StatusCode};
use serde_json::{Value, json};

use super::{AgentOptions, NodeAgent};
use crate::agent::cri::Cri;
use crate::agent::engine::{Engine, EngineOptions};
use crate::controller::secrets::copy_name;
use crate::fake_api::{
    self, ApiHandle, WatchSender, expected_list_query, expected_watch_query, json_response, list,
    next_request, not_found, send_event, streaming,
};
use crate::image::{ImageReference, label_key};
use crate::metrics::AgentMetrics;

fn key(image: &str) -> String {
    label_key(&ImageReference::parse(image).expect("valid reference"))
}

fn node(conditions: Value, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "uid": "node-uid", "resourceVersion": "8", "labels": labels},
        "status": {"conditions": conditions},
    })
}

fn image_set() -> Value {
    json!({
        "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
        "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "5"},
        "spec": {
            "images": ["nginx:1.27", "redis:7"],
            "nodeSelector": {"matchLabels": {"pool": "web"}},
            "imagePullSecrets": [{"name": "pull"}],
        },
    })
}

fn pull_secret() -> Value {
    let config = json!({"auths": {"docker.io": {"username": "u", "password": "p"}}}).to_string();
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": copy_name("shop", "pull"), "namespace": "coral-system"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(config)},
    })
}

/// Answers the agent's requests; returns the writes (method, path, content type, body).
struct Api {
    handle: ApiHandle,
    watches: BTreeMap<String, WatchSender>,
    secret_reads: usize,
}

impl Api {
    /// Answers reads (lists, watches, secrets, the NodeImage) until a write arrives, and
    /// returns it unanswered-for: the caller checks it and answers.
    async fn next_write(&mut self) -> fake_api::Seen {
        loop {
            let seen = next_request(&mut self.handle).await;
            let path = seen.path().to_string();
            match (seen.method.clone(), path.as_str()) {
                (Method::GET, "/apis/coral.dev/v1alpha1/imagesets") => {
                    if seen.is_watch() {
                        assert_eq!(seen.query(), expected_watch_query(""));
                        let (response, sender) = streaming();
                        seen.respond.send_response(response);
                        self.watches.insert(path, sender);
                    } else {
                        assert_eq!(seen.query(), expected_list_query(""));
                        let body = list("coral.dev/v1alpha1", "ImageSetList", vec![image_set()]);
                        seen.respond
                            .send_response(json_response(StatusCode::OK, &body));
                    }
                }
                (Method::GET, "/api/v1/nodes") => {
                    let selector = "&fieldSelector=metadata.name%3Dnode-a";
                    if seen.is_watch() {
                        assert_eq!(seen.query(), expected_watch_query(selector));
                        let (response, sender) = streaming();
                        seen.respond.send_response(response);
                        self.watches.insert(path, sender);
                    } else {
                        assert_eq!(seen.query(), expected_list_query(selector));
                        let labels = json!({"pool": "web", key("busybox"): "available", "kubernetes.io/os": "linux"});
                        let body = list("v1", "NodeList", vec![node(json!([]), labels)]);
                        seen.respond
                            .send_response(json_response(StatusCode::OK, &body));
                    }
                }
                (Method::GET, path)
                    if path
                        == format!(
                            "/api/v1/namespaces/coral-system/secrets/{}",
                            copy_name("shop", "pull")
                        ) =>
                {
                    self.secret_reads += 1;
                    seen.respond
                        .send_response(json_response(StatusCode::OK, &pull_secret()));
                }
                (Method::GET, "/apis/coral.dev/v1alpha1/nodeimages/node-a") => {
                    seen.respond
                        .send_response(not_found("nodeimages", "node-a"));
                }
                _ => return seen,
            }
        }
    }
}

/// The NodeImage the API server returns after a write.
fn node_image() -> Value {
    json!({
        "apiVersion": "coral.dev/v1alpha1", "kind": "NodeImage",
        "metadata": {"name": "node-a", "resourceVersion": "9"},
        "spec": {"nodeName": "node-a"},
    })
}

fn without_times(mut status: Value) -> Value {
    for image in status["images"].as_array_mut().into_iter().flatten() {
        assert!(image["lastTransitionTime"].is_string(), "{image}");
        image
            .as_object_mut()
            .map(|o| o.remove("lastTransitionTime"));
    }
    for condition in status["conditions"].as_array_mut().into_iter().flatten() {
        assert!(condition["lastTransitionTime"].is_string(), "{condition}");
        condition
            .as_object_mut()
            .map(|o| o.remove("lastTransitionTime"));
    }
    status
}

/// Starts the agent for node-a against the scripted API. The runtime is never reached: the
/// engine is not run, so every wanted image stays `pulling`.
fn start_agent() -> (Api, Arc<Engine>) {
    let (client, handle) = fake_api::client("default");
    let engine = Engine::new(
        Cri::new("unix:///nonexistent/cri.sock").expect("socket"),
        EngineOptions::default(),
        AgentMetrics::new(),
    );
    // The runtime is not run here: it answers its first listing empty.
    engine.runtime_listed(Vec::new());
    let options = AgentOptions {
        node_name: "node-a".to_string(),
        coral_namespace: "coral-system".to_string(),
        cri_socket: "unix:///nonexistent/cri.sock".to_string(),
        engine: EngineOptions {
            resync: Duration::from_secs(3600),
            ..EngineOptions::default()
        },
        retention: crate::agent::retention::RetentionPolicy::KEEP,
        pull_through_mirror: true,
        probe_listen: "127.0.0.1:0".parse().expect("address"),
        debounce: Duration::from_millis(10),
    };
    tokio::spawn(NodeAgent::new(client, options, engine.clone()).run(|| {}));
    let api = Api {
        handle,
        watches: BTreeMap::new(),
        secret_reads: 0,
    };
    (api, engine)
}

#[tokio::test]
async fn agent_watches_image_sets_and_its_node_and_writes_exact_records() {
    let (mut api, engine) = start_agent();

    // Nothing is present yet: the stale Coral label goes; other labels are left alone.
    let labels = api.next_write().await;
    assert_eq!(
        (labels.method.as_str(), labels.uri.as_str()),
        ("PATCH", "/api/v1/nodes/node-a?")
    );
    assert_eq!(labels.content_type, "application/merge-patch+json");
    assert_eq!(
        labels.body,
        json!({"metadata": {"labels": {key("busybox"): null}}})
    );
    labels
        .respond
        .send_response(json_response(StatusCode::OK, &node(json!([]), json!({}))));

    // The NodeImage is missing: created, owned by the Node.
    let create = api.next_write().await;
    assert_eq!(
        (create.method.as_str(), create.uri.as_str()),
        ("POST", "/apis/coral.dev/v1alpha1/nodeimages?")
    );
    assert_eq!(
        create.body,
        json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "NodeImage",
            "metadata": {"name": "node-a", "ownerReferences": [
                {"apiVersion": "v1", "kind": "Node", "name": "node-a", "uid": "node-uid"}
            ]},
            "spec": {"nodeName": "node-a"},
        })
    );
    create
        .respond
        .send_response(json_response(StatusCode::CREATED, &create.body));
    assert_eq!(
        api.secret_reads, 1,
        "the pull secret of the ImageSet is read"
    );
    let tracker = engine.snapshot();
    let wanted: Vec<String> = tracker.records().map(|r| r.reference.to_string()).collect();
    assert_eq!(
        wanted,
        ["docker.io/library/nginx:1.27", "docker.io/library/redis:7"]
    );
    assert!(
        tracker.records().all(|r| r.keyring.len() == 1),
        "with the secret's credential"
    );

    let status = api.next_write().await;
    assert_eq!(status.method, Method::PATCH);
    assert_eq!(
        status.uri,
        "/apis/coral.dev/v1alpha1/nodeimages/node-a/status?"
    );
    assert_eq!(status.content_type, "application/merge-patch+json");
    let label_key_nginx = key("nginx:1.27");
    let label_key_redis = key("redis:7");
    assert_eq!(
        json!({"status": without_times(status.body["status"].clone())}),
        json!({"status": {
            "available": 0, "pulling": 2, "failed": 0,
            "conditions": [{"type": "Paused", "status": "False", "reason": "Pulling", "message": "pulls are allowed"}],
            "images": [
                {"image": "docker.io/library/nginx:1.27", "label": label_key_nginx, "state": "pulling", "attempts": 0},
                {"image": "docker.io/library/redis:7", "label": label_key_redis, "state": "pulling", "attempts": 0},
            ],
            // Lists with nothing to say are cleared, not left as they were.
            "unwanted": null, "removals": null,
        }})
    );
    status
        .respond
        .send_response(json_response(StatusCode::OK, &node_image()));
    let _ = api;
}

#[tokio::test]
async fn agent_patches_labels_once_and_writes_nothing_when_nothing_changed() {
    let (mut api, engine) = start_agent();
    let mut labels_patched = None;
    let mut status_writes = 0;
    // Writes of the first round: the label patch, the NodeImage, its status.
    while status_writes == 0 {
        let write = api.next_write().await;
        match (write.method.as_str(), write.path()) {
            ("PATCH", "/api/v1/nodes/node-a") => {
                assert_eq!(write.content_type, "application/merge-patch+json");
                labels_patched = Some(write.body.clone());
                write
                    .respond
                    .send_response(json_response(StatusCode::OK, &node(json!([]), json!({}))));
            }
            ("POST", "/apis/coral.dev/v1alpha1/nodeimages") => {
                write
                    .respond
                    .send_response(json_response(StatusCode::CREATED, &write.body));
            }
            ("PATCH", "/apis/coral.dev/v1alpha1/nodeimages/node-a/status") => {
                status_writes += 1;
                write
                    .respond
                    .send_response(json_response(StatusCode::OK, &node_image()));
            }
            other => panic!("unexpected write {other:?}"),
        }
    }
    assert_eq!(
        labels_patched,
        Some(json!({"metadata": {"labels": {key("busybox"): null}}})),
        "exactly the stale Coral label is removed"
    );

    // The watch reports the patched node: nothing differs any more, so nothing is written.
    let nodes = api.watches["/api/v1/nodes"].clone();
    send_event(
        &nodes,
        "MODIFIED",
        node(
            json!([]),
            json!({"pool": "web", "kubernetes.io/os": "linux"}),
        ),
    );
    let quiet = tokio::time::timeout(Duration::from_millis(500), api.next_write()).await;
    assert!(
        quiet.is_err(),
        "no write when nothing changed: {:?}",
        quiet.map(|w| (w.method, w.uri, w.body))
    );

    // DiskPressure: pulls pause, and the NodeImage condition says why.
    send_event(
        &nodes,
        "MODIFIED",
        node(
            json!([{"type": "DiskPressure", "status": "True"}]),
            json!({"pool": "web", "kubernetes.io/os": "linux"}),
        ),
    );
    let write = api.next_write().await;
    assert_eq!(
        write.path(),
        "/apis/coral.dev/v1alpha1/nodeimages/node-a/status"
    );
    let condition = &write.body["status"]["conditions"][0];
    assert_eq!(condition["status"], "True");
    assert_eq!(condition["reason"], "Pressure");
    assert_eq!(
        condition["message"],
        "no new pulls: the node has DiskPressure"
    );
    write
        .respond
        .send_response(json_response(StatusCode::OK, &node_image()));
    assert_eq!(
        engine.paused_reason().as_deref(),
        Some("the node has DiskPressure")
    );
    assert!(engine.metrics().render().contains("coral_agent_paused 1"));
}
