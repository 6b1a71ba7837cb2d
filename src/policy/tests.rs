use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::*;
use crate::index::StateFile;

pub(crate) const STATE: &str = r#"
imageSets:
  - metadata: {name: web, namespace: shop}
    spec:
      images: ["nginx:1.27", "ghcr.io/example/api:1.4", "ghcr.io/example/migrate:1.0"]
      nodeSelector: {matchLabels: {pool: web}}
nodes:
  - {name: a, labels: {pool: web}, images: ["nginx:1.27", "ghcr.io/example/api:1.4", "ghcr.io/example/migrate:1.0"]}
  - {name: b, labels: {pool: web}, images: ["nginx:1.27"]}
  - {name: c, labels: {pool: batch}}
namespaces:
  - {name: shop, labels: {coral.dev/inject: enabled}}
"#;

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json")
}

fn evaluator_with(settings: Settings) -> Evaluator {
    let state = StateFile::parse(STATE, "test").expect("state");
    let policies = CompiledPolicies::compile(&PolicySet::embedded()).expect("compile");
    let data = coral_data(&state.to_index(), &settings);
    Evaluator::new(&policies, data, EvaluatorOptions::default()).expect("evaluator")
}

fn decide(evaluator: &Evaluator, object: Value) -> Decision {
    let request = PolicyRequest::create(object, "shop").expect("request");
    evaluator
        .decide(&request, &BTreeMap::new())
        .expect("decision")
}

fn annotate(mut object: Value, value: &str) -> Value {
    object["metadata"]["annotations"] = json!({"coral.dev/inject": value});
    object
}

const NGINX_LABEL: &str = "image.coral.dev/6965a10c15290ad0b29ca7fd1866de1850408b3c";

#[test]
fn annotated_deployment_gets_node_selector_and_pull_policy() {
    let evaluator = evaluator_with(Settings::default());
    let object = annotate(fixture("deployment-web.json"), "selectors,pull-policy");
    let decision = decide(&evaluator, object);
    assert!(decision.allowed);
    let spec = &decision.object["spec"]["template"]["spec"];
    assert_eq!(spec["nodeSelector"], json!({NGINX_LABEL: "available"}));
    assert_eq!(spec["containers"][0]["imagePullPolicy"], "IfNotPresent");
    let ops = serde_json::to_value(&decision.patch).expect("patch");
    assert_eq!(ops.as_array().map(Vec::len), Some(2), "{ops}");
}

#[test]
fn deployment_without_annotation_is_left_unchanged() {
    let evaluator = evaluator_with(Settings::default());
    let object = fixture("deployment-web.json");
    let decision = decide(&evaluator, object.clone());
    assert!(decision.allowed);
    assert!(decision.patch.0.is_empty());
    assert_eq!(decision.object, object);
    assert!(decision.warnings.is_empty(), "{:?}", decision.warnings);
}
