//! `coral audit` against a cluster: the real binary lists Nodes, ImageSets, workloads and the
//! policy ConfigMap through the kubeconfig from a scripted API server.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test helpers panic on setup failures

mod support;

use std::collections::BTreeMap;

use serde_json::{Value, json};
use support::api_server::{ApiServer, empty_workload_lists, list};

fn label(image: &str) -> String {
    coral::image::label_key(&coral::image::ImageReference::parse(image).unwrap())
}

fn deployment(name: &str, selector: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
            "metadata": {"labels": {"app": name}},
            "spec": {"nodeSelector": selector, "containers": [{"name": "web", "image": "nginx:1.27"}]},
        }},
    })
}

#[tokio::test]
async fn audit_of_a_cluster_reads_its_nodes_workloads_and_policy_settings() {
    let nginx = label("nginx:1.27");
    let node = |name: &str, labels: Value, spec: Value| json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}, "spec": spec});
    let mut lists = empty_workload_lists();
    lists.extend([
        (
            "/api/v1/nodes".to_string(),
            list(
                "v1",
                "NodeList",
                vec![
                    node("a", json!({&nginx: "available"}), json!({})),
                    // Holds nginx, but cordoned: no use to a pod.
                    node(
                        "b",
                        json!({&nginx: "available"}),
                        json!({"unschedulable": true}),
                    ),
                ],
            ),
        ),
        (
            "/apis/coral.dev/v1alpha1/imagesets".to_string(),
            list(
                "coral.dev/v1alpha1",
                "ImageSetList",
                vec![json!({
                    "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
                    "metadata": {"name": "web", "namespace": "shop"},
                    "spec": {"images": ["nginx:1.27"]},
                })],
            ),
        ),
        (
            "/apis/apps/v1/deployments".to_string(),
            list(
                "apps/v1",
                "DeploymentList",
                vec![
                    deployment("web", json!({&nginx: "available"})),
                    deployment("plain", json!({})),
                ],
            ),
        ),
    ]);
    let objects = BTreeMap::from([(
        "/api/v1/namespaces/coral-system/configmaps/coral-policies".to_string(),
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "coral-policies", "namespace": "coral-system"},
               "data": {"settings.json": "{\"minAvailableNodes\": 1}"}}),
    )]);
    let server = ApiServer::start(lists, objects, BTreeMap::new()).await;
    let run = |args: &[&str]| {
        let mut command = server.coral();
        command.arg("audit").args(args);
        async move {
            tokio::task::spawn_blocking(move || command.output().unwrap())
                .await
                .unwrap()
        }
    };

    // minAvailableNodes 1 (the ConfigMap): node a will do.
    let output = run(&[]).await;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        text.contains("no stranded workloads (2 workload(s) checked against 2 node(s))"),
        "{text}"
    );

    // Two needed: the cordoned node does not count.
    let output = run(&["--min-available-nodes", "2", "-o", "json"]).await;
    assert_eq!(output.status.code(), Some(1));
    let found: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(found.as_array().unwrap().len(), 1, "{found}");
    assert_eq!(found[0]["name"], "web");
    assert_eq!(
        found[0]["images"][0]["image"],
        "docker.io/library/nginx:1.27"
    );
    assert_eq!(
        (
            found[0]["images"][0]["held"].as_u64(),
            found[0]["images"][0]["usable"].as_u64()
        ),
        (Some(2), Some(1))
    );
    assert!(server.writes().is_empty(), "an audit writes nothing");
}
