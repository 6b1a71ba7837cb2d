use serde_json::{Value, json};

use super::*;
use crate::index::StateFile;

const STATE: &str = r#"
imageSets:
  - metadata: {name: shop, namespace: shop}
    spec: {images: ["nginx:1.27", "redis:7.4"]}
nodes:
  - {name: a, labels: {pool: web}, images: ["nginx:1.27"]}
  - {name: b, labels: {pool: db}, images: ["redis:7.4"]}
  - {name: c, labels: {pool: db}, images: ["nginx:1.27"], unschedulable: true}
"#;

fn label(image: &str) -> String {
    crate::image::label_key(&crate::image::ImageReference::parse(image).expect("reference"))
}

fn judge(object: Value, min: usize) -> Option<Stranded> {
    let index = StateFile::parse(STATE, "test").expect("state").to_index();
    stranded_workload(&object, &index.placement(), &index.images_by_label(), min)
}

fn deployment(pod_spec: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"template": {"spec": pod_spec}},
    })
}

#[test]
fn a_template_requiring_images_no_node_holds_together_is_stranded() {
    let both = json!({"nodeSelector": {label("nginx:1.27"): "available", label("redis:7.4"): "available"}});
    let found = judge(deployment(both), 1).expect("stranded");
    assert_eq!(
        (found.kind, found.name.as_str(), found.nodes, found.needed),
        ("Deployment", "web", 0, 1)
    );
    // Labels are listed in label order.
    let mut parts = [
        (
            label("nginx:1.27"),
            "docker.io/library/nginx:1.27 on 2 node(s), 1 usable",
        ),
        (
            label("redis:7.4"),
            "docker.io/library/redis:7.4 on 1 node(s), 1 usable",
        ),
    ];
    parts.sort();
    let parts: Vec<&str> = parts.iter().map(|(_, text)| *text).collect();
    assert_eq!(
        found.reason(),
        format!(
            "its pod template requires {}; 0 schedulable node(s) satisfy it, 1 needed (minAvailableNodes)",
            parts.join(", ")
        )
    );
}

#[test]
fn the_templates_own_constraints_and_cordons_count() {
    // nginx is on a (pool web) and on c (pool db, cordoned): a db template cannot use either.
    let db = json!({"nodeSelector": {"pool": "db", label("nginx:1.27"): "available"}});
    let found = judge(deployment(db), 1).expect("stranded");
    assert_eq!(found.images[0].held, 2);
    assert_eq!(found.images[0].usable, 0);
    // Tolerating the cordon, c will do.
    let tolerant = json!({
        "nodeSelector": {"pool": "db", label("nginx:1.27"): "available"},
        "tolerations": [{"key": "node.kubernetes.io/unschedulable", "operator": "Exists"}],
    });
    assert_eq!(judge(deployment(tolerant), 1), None);
}

#[test]
fn enough_nodes_is_not_stranded_and_min_available_nodes_raises_the_bar() {
    let nginx = json!({"nodeSelector": {label("nginx:1.27"): "available"}});
    assert_eq!(judge(deployment(nginx.clone()), 1), None);
    let found = judge(deployment(nginx), 2).expect("stranded with two needed");
    assert_eq!((found.nodes, found.needed), (1, 2));
}

#[test]
fn labels_of_images_no_imageset_manages_are_named_as_such() {
    let gone = "image.coral.dev/0000000000000000000000000000000000000000";
    let found =
        judge(deployment(json!({"nodeSelector": {gone: "available"}})), 1).expect("stranded");
    assert_eq!(found.images[0].image, None);
    assert!(
        found
            .reason()
            .contains("(no ImageSet manages it) on 0 node(s)"),
        "{}",
        found.reason()
    );
}

#[test]
fn required_affinity_on_image_labels_counts_too() {
    let affinity = json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": label("redis:7.4"), "operator": "In", "values": ["available"]},
            {"key": "pool", "operator": "In", "values": ["web"]},
        ]}],
    }}}});
    let found = judge(deployment(affinity), 1).expect("stranded");
    assert_eq!(found.images.len(), 1);
    assert_eq!(
        found.images[0].image.as_deref(),
        Some("docker.io/library/redis:7.4")
    );
}

#[test]
fn templates_without_image_labels_owned_objects_and_bound_pods_are_not_judged() {
    assert_eq!(
        judge(deployment(json!({"nodeSelector": {"pool": "gpu"}})), 1),
        None
    );
    let stale = json!({"nodeSelector": {label("redis:7.4"): "available", "pool": "web"}});
    let mut owned = deployment(stale.clone());
    owned["kind"] = json!("ReplicaSet");
    owned["metadata"]["ownerReferences"] =
        json!([{"kind": "Deployment", "name": "web", "controller": true}]);
    assert_eq!(judge(owned, 1), None);
    let pod = |node_name: &str| {
        let mut spec = stale.clone();
        spec["nodeName"] = json!(node_name);
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "shop"}, "spec": spec})
    };
    assert_eq!(judge(pod("a"), 1), None);
    assert_eq!(judge(pod(""), 1).map(|s| s.kind), Some("Pod"));
    assert_eq!(judge(json!({"kind": "ConfigMap"}), 1), None);
}
