//! The Helm chart (`deploy/helm/coral`) rendered by the pinned Helm that scripts/helm.sh builds,
//! and `deploy/` rendered by `kubectl kustomize`, as objects to compare.

use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

/// The variable naming the helm binary scripts/helm.sh built.
pub const BIN_ENV: &str = "CORAL_HELM_BIN";

/// The chart, from the repository's root.
pub const CHART: &str = "deploy/helm/coral";

/// The labels the chart adds to every object that `deploy/` does not have: Helm's own.
pub const HELM_LABELS: [&str; 4] = [
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
];

pub fn bin() -> PathBuf {
    std::env::var_os(BIN_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{BIN_ENV} is not set: run scripts/helm.sh"))
}

fn root() -> &'static str {
    env!("CARGO_MANIFEST_DIR")
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(bin())
        .args(args)
        .current_dir(root())
        .output()
        .expect("helm runs")
}

/// Runs helm in the repository's root; its stdout, or a panic with its stderr.
pub fn helm(args: &[&str]) -> String {
    let output = run(args);
    assert!(
        output.status.success(),
        "helm {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

/// Runs helm expecting it to fail; its stderr.
pub fn helm_fails(args: &[&str]) -> String {
    let output = run(args);
    assert!(
        !output.status.success(),
        "helm {} succeeded: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `helm template coral CHART --include-crds` with `values` (helm arguments such as
/// `--set`, `--values`): its objects.
pub fn render(values: &[&str]) -> Vec<Value> {
    let mut args = vec!["template", "coral", CHART, "--include-crds"];
    args.extend_from_slice(values);
    objects(&helm(&args))
}

/// `kubectl kustomize DIR`: its objects.
pub fn kustomize(dir: &str) -> Vec<Value> {
    let output = Command::new("kubectl")
        .args(["kustomize", dir])
        .current_dir(root())
        .output()
        .expect("kubectl runs");
    assert!(
        output.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    objects(&String::from_utf8(output.stdout).expect("utf-8"))
}

/// The objects of a multi-document YAML stream (empty documents left out).
pub fn objects(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|document| Value::deserialize(document).expect("YAML"))
        .filter(|object| !object.is_null())
        .collect()
}

/// `object` without Helm's labels (and without a labels map they alone made).
pub fn without_helm_labels(mut object: Value) -> Value {
    if let Some(metadata) = object["metadata"].as_object_mut() {
        if let Some(labels) = metadata.get_mut("labels").and_then(Value::as_object_mut) {
            for label in HELM_LABELS {
                labels.remove(label);
            }
            if labels.is_empty() {
                metadata.remove("labels");
            }
        }
    }
    object
}

/// kind/namespace/name of an object.
pub fn key(object: &Value) -> String {
    format!(
        "{}/{}/{}",
        object["kind"].as_str().unwrap_or(""),
        object["metadata"]["namespace"].as_str().unwrap_or(""),
        object["metadata"]["name"].as_str().unwrap_or("")
    )
}
