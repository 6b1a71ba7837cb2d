use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

use super::*;
use crate::api::{ImageSet, ImageSetSpec};

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn expression(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.to_string(),
        operator: operator.to_string(),
        values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
    }
}

fn image_set(
    namespace: &str,
    name: &str,
    images: &[&str],
    selector: Option<LabelSelector>,
) -> ImageSet {
    let mut set = ImageSet::new(
        name,
        ImageSetSpec {
            images: images.iter().map(|i| i.to_string()).collect(),
            node_selector: selector,
            ..ImageSetSpec::default()
        },
    );
    set.metadata.namespace = Some(namespace.to_string());
    set
}

fn key(reference: &str) -> String {
    label_key(&ImageReference::parse(reference).expect("valid"))
}

#[test]
fn selectors_match_like_kubernetes() {
    let node = labels(&[("pool", "web"), ("zone", "a")]);
    let selector = |match_labels: &[(&str, &str)], expressions: Vec<LabelSelectorRequirement>| {
        Selector::new(Some(&LabelSelector {
            match_labels: Some(labels(match_labels)),
            match_expressions: Some(expressions),
        }))
        .expect("valid selector")
    };
    assert!(Selector::new(None).expect("none").matches(&node));
    assert!(selector(&[], vec![]).matches(&node));
    assert!(selector(&[("pool", "web")], vec![]).matches(&node));
    assert!(!selector(&[("pool", "batch")], vec![]).matches(&node));
    assert!(selector(&[], vec![expression("zone", "In", &["a", "b"])]).matches(&node));
    assert!(!selector(&[], vec![expression("zone", "In", &["c"])]).matches(&node));
    assert!(selector(&[], vec![expression("zone", "NotIn", &["c"])]).matches(&node));
    assert!(selector(&[], vec![expression("gpu", "NotIn", &["yes"])]).matches(&node));
    assert!(selector(&[], vec![expression("pool", "Exists", &[])]).matches(&node));
    assert!(!selector(&[], vec![expression("gpu", "Exists", &[])]).matches(&node));
    assert!(selector(&[], vec![expression("gpu", "DoesNotExist", &[])]).matches(&node));
    assert!(
        !selector(
            &[("pool", "web")],
            vec![expression("zone", "DoesNotExist", &[])]
        )
        .matches(&node)
    );
}

#[test]
fn invalid_selectors_are_reported() {
    let check = |expression: LabelSelectorRequirement| {
        Selector::new(Some(&LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![expression]),
        }))
        .expect_err("invalid")
        .to_string()
    };
    assert!(check(expression("a", "Equals", &["x"])).contains("unknown operator \"Equals\""));
    assert!(check(expression("a", "In", &[])).contains("needs at least one value"));
    assert!(check(expression("a", "Exists", &["x"])).contains("takes no values"));
    assert!(check(expression("", "Exists", &[])).contains("key is empty"));
}

#[test]
fn image_set_validation_names_the_offending_entry() {
    let spec = |images: &[&str]| ImageSetSpec {
        images: images.iter().map(|i| i.to_string()).collect(),
        ..ImageSetSpec::default()
    };
    let valid = validate_image_set(&spec(&["nginx", "redis:7"])).expect("valid");
    assert_eq!(valid.images.len(), 2);
    let error = validate_image_set(&spec(&["nginx", "Bad Ref"])).expect_err("bad ref");
    assert!(error.to_string().starts_with("spec.images[1]: "), "{error}");
    let error = validate_image_set(&spec(&["nginx", "docker.io/library/nginx:latest"]))
        .expect_err("duplicate");
    assert_eq!(
        error.to_string(),
        "spec.images[1] \"docker.io/library/nginx:latest\" is the same image as spec.images[0] (docker.io/library/nginx:latest)"
    );
    assert_eq!(validate_image_set(&spec(&[])), Err(ImageSetError::NoImages));
    let mut bad_selector = spec(&["nginx"]);
    bad_selector.node_selector = Some(LabelSelector {
        match_labels: None,
        match_expressions: Some(vec![expression("a", "In", &[])]),
    });
    let error = validate_image_set(&bad_selector).expect_err("selector");
    assert!(
        error
            .to_string()
            .starts_with("spec.nodeSelector.matchExpressions[0]"),
        "{error}"
    );
}

#[test]
fn availability_counts_targeted_available_and_failed_nodes() {
    let mut index = ClusterIndex::new();
    let web = LabelSelector {
        match_labels: Some(labels(&[("pool", "web")])),
        match_expressions: None,
    };
    index.apply_image_set(&image_set(
        "shop",
        "web",
        &["nginx:1.27", "redis"],
        Some(web),
    ));
    index.apply_image_set(&image_set("ops", "all", &["nginx:1.27"], None));
    index.apply_node(
        "a",
        labels(&[("pool", "web"), (&key("nginx:1.27"), "available")]),
    );
    index.apply_node("b", labels(&[("pool", "web"), (&key("redis"), "pulling")]));
    index.apply_node(
        "c",
        labels(&[("pool", "batch"), (&key("nginx:1.27"), "available")]),
    );
    index.set_node_failures("b", ["docker.io/library/redis:latest".to_string()].into());

    let availability = index.image_availability();
    let nginx = &availability["docker.io/library/nginx:1.27"];
    assert_eq!(
        nginx.image_sets,
        vec!["ops/all".to_string(), "shop/web".to_string()]
    );
    assert_eq!(nginx.nodes_targeted, 3, "union of both sets' nodes");
    assert_eq!(nginx.nodes_available, 2);
    assert_eq!(nginx.label, key("nginx:1.27"));
    let redis = &availability["docker.io/library/redis:latest"];
    assert_eq!(redis.nodes_targeted, 2);
    assert_eq!(
        redis.nodes_available, 0,
        "only the value `available` counts"
    );
    assert_eq!(redis.nodes_failed, 1);
    assert_eq!(index.node_count(), 3);

    index.delete_image_set("ops", "all");
    index.delete_node("c");
    let availability = index.image_availability();
    assert_eq!(
        availability["docker.io/library/nginx:1.27"].nodes_targeted,
        2
    );
    assert_eq!(
        availability["docker.io/library/nginx:1.27"].nodes_available,
        1
    );
}

#[test]
fn invalid_image_sets_never_break_the_index() {
    let mut index = ClusterIndex::new();
    let bad = LabelSelector {
        match_labels: None,
        match_expressions: Some(vec![expression("a", "Bogus", &[])]),
    };
    index.apply_image_set(&image_set(
        "shop",
        "bad",
        &["nginx", "NOT VALID"],
        Some(bad),
    ));
    index.apply_node("a", labels(&[]));
    let availability = index.image_availability();
    assert_eq!(availability.len(), 1, "the invalid reference is skipped");
    assert_eq!(
        availability["docker.io/library/nginx:latest"].nodes_targeted,
        0
    );
}

#[test]
fn namespaces_are_indexed() {
    let mut index = ClusterIndex::new();
    index.apply_namespace("shop", labels(&[("coral.dev/inject", "enabled")]));
    assert_eq!(index.namespace_labels("shop").map(|l| l.len()), Some(1));
    index.delete_namespace("shop");
    assert!(index.namespace_labels("shop").is_none());
}

#[test]
fn state_file_images_become_labels_and_errors_name_the_entry() {
    let state = StateFile::parse(
        "nodes:\n  - {name: a, labels: {pool: web}, images: [nginx]}\nnamespaces:\n  - {name: shop}\n",
        "s.yaml",
    )
    .expect("valid");
    let index = state.to_index();
    assert_eq!(index.label_counts().get(&key("nginx")), Some(&1));

    let cases = [
        ("nodes:\n  - {name: a, images: ['Bad Ref']}\n", "node \"a\""),
        (
            "imageSets:\n  - metadata: {name: x}\n    spec: {images: [nginx, nginx]}\n",
            "ImageSet /x",
        ),
        (
            "imageSets:\n  - metadata: {}\n    spec: {images: [nginx]}\n",
            "no metadata.name",
        ),
        ("nodes: 5\n", "state file s.yaml is not valid"),
        ("nodez: []\n", "unknown field `nodez`"),
        ("settings: {preferredWeight: 500}\n", "preferredWeight"),
        (
            "settings: {sharePrivateImagesWith: [Team_B]}\n",
            "sharePrivateImagesWith has \"Team_B\"",
        ),
    ];
    for (text, expected) in cases {
        let error = StateFile::parse(text, "s.yaml").expect_err(text);
        assert!(error.to_string().contains(expected), "{text}: {error}");
    }
}

#[test]
fn an_image_set_being_deleted_manages_nothing() {
    let mut index = ClusterIndex::new();
    let mut set = image_set("shop", "web", &["nginx:1.27"], None);
    index.apply_image_set(&set);
    assert_eq!(index.image_availability().len(), 1);
    set.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
    ));
    index.apply_image_set(&set);
    assert!(index.image_availability().is_empty());
    assert!(index.images_by_label().is_empty());
}

#[test]
fn a_json_state_file_indexes_like_its_yaml() {
    let yaml = "nodes:\n  - {name: a, labels: {pool: web}, images: [nginx, redis], taints: [{key: k, effect: NoSchedule}]}\n  - {name: b, images: [nginx], failed: [redis]}\n";
    let json = r#"{"nodes": [
        {"name": "a", "labels": {"pool": "web"}, "images": ["nginx", "redis"], "taints": [{"key": "k", "effect": "NoSchedule"}]},
        {"name": "b", "images": ["nginx"], "failed": ["redis"]}]}"#;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.json");
    std::fs::write(&path, json).expect("write");
    let from_yaml = StateFile::parse(yaml, "s.yaml").expect("yaml").into_index();
    for from_json in [
        StateFile::parse(json, "s.json").expect("json").to_index(),
        StateFile::load(&path).expect("json file").into_index(),
    ] {
        assert_eq!(from_json.label_counts(), from_yaml.label_counts());
        assert_eq!(from_json.label_counts().get(&key("nginx")), Some(&2));
        assert_eq!(
            from_json.image_availability(),
            from_yaml.image_availability()
        );
        assert_eq!(from_json.placement().node_count(), 2);
    }

    std::fs::write(
        &path,
        "{\"nodes\": [{\"name\": \"a\", \"images\": [\"Bad Ref\"]}]}",
    )
    .expect("write");
    let error = StateFile::load(&path)
        .expect_err("bad reference")
        .to_string();
    assert!(
        error.contains("node \"a\"") && error.contains("state.json"),
        "{error}"
    );
    std::fs::write(&path, "{\"nodes\": 5}").expect("write");
    let error = StateFile::load(&path).expect_err("bad shape").to_string();
    assert!(error.contains("is not valid JSON"), "{error}");
}

#[test]
fn an_image_pulled_with_credentials_is_private_to_their_namespaces() {
    let state = StateFile::parse(
        r#"
imageSets:
  - metadata: {name: app, namespace: team-a}
    spec: {images: ["ghcr.io/acme/private-app:1.0"], imagePullSecrets: [{name: ghcr}]}
  - metadata: {name: app, namespace: team-c}
    spec: {images: ["ghcr.io/acme/private-app:1.0", "nginx"], imagePullSecrets: [{name: ghcr}]}
  - metadata: {name: web, namespace: team-b}
    spec: {images: ["nginx", "ghcr.io/acme/private-app:1.0"]}
"#,
        "s.yaml",
    )
    .expect("valid");
    let availability = state.to_index().image_availability();
    assert_eq!(
        availability["ghcr.io/acme/private-app:1.0"].private_to,
        ["team-a", "team-c"],
        "an ImageSet without credentials (team-b) does not make it its own"
    );
    assert_eq!(
        availability["docker.io/library/nginx:latest"].private_to,
        ["team-c"]
    );
    let data = crate::policy::coral_data(&state.to_index(), &crate::policy::Settings::default());
    let private = &data["coral"]["images"]["ghcr.io/acme/private-app:1.0"];
    assert_eq!(private["private"], true);
    assert_eq!(
        private["namespaces"],
        serde_json::json!(["team-a", "team-c"])
    );
    assert_eq!(
        data["coral"]["settings"]["sharePrivateImagesWith"],
        serde_json::json!([])
    );
}
