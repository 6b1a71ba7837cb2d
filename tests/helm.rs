//! The Helm chart (`deploy/helm/coral`) and `deploy/` are one source of truth: the chart with
//! its default values renders what `kubectl kustomize deploy/` renders, and with each overlay's
//! values what that overlay renders (Helm's labels aside); it passes `helm lint --strict`; each
//! value changes what it says; values outside the schema are refused with their name.
//!
//! These tests need the pinned Helm (scripts/helm.sh builds it; scripts/test.sh runs them).
#![allow(clippy::expect_used, clippy::unwrap_used)] // test helpers panic on setup failures

mod support;

use std::collections::BTreeMap;

use serde_json::{Value, json};
use support::helm::{CHART, helm, helm_fails, key, kustomize, render, without_helm_labels};

/// Each kustomization of deploy/ and the chart values that stand for it.
const EQUIVALENTS: [(&str, &[&str]); 6] = [
    ("deploy", &[]),
    (
        "deploy/overlays/containerd",
        &["--set", "runtime.type=containerd"],
    ),
    ("deploy/overlays/crio", &["--set", "runtime.type=crio"]),
    (
        "deploy/overlays/cert-manager",
        &["--set", "certificates.mode=cert-manager"],
    ),
    (
        "deploy/overlays/monitoring",
        &["--set", "monitoring.enabled=true"],
    ),
    (
        "deploy/overlays/registry",
        &["--set", "registry.enabled=true"],
    ),
];

const EVERY_VALUE: &str = "tests/data/helm-values.yaml";

fn by_key(objects: Vec<Value>) -> BTreeMap<String, Value> {
    objects
        .into_iter()
        .map(|object| (key(&object), object))
        .collect()
}

#[test]
#[ignore = "needs the Helm built by scripts/helm.sh (CORAL_HELM_BIN); scripts/test.sh runs it"]
fn the_chart_renders_what_kustomize_renders_for_deploy_and_each_overlay() {
    let overlays = support::overlays();
    for overlay in &overlays {
        assert!(
            EQUIVALENTS.iter().any(|(dir, _)| dir == overlay),
            "{overlay} has no equivalent chart values here: add them to the chart and to EQUIVALENTS"
        );
    }
    for (dir, values) in EQUIVALENTS {
        let chart = by_key(
            render(values)
                .into_iter()
                .map(without_helm_labels)
                .collect(),
        );
        let kustomized = by_key(kustomize(dir));
        let only = |a: &BTreeMap<String, Value>, b: &BTreeMap<String, Value>| {
            a.keys()
                .filter(|k| !b.contains_key(*k))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert!(
            only(&chart, &kustomized).is_empty() && only(&kustomized, &chart).is_empty(),
            "{dir} {values:?}: only in the chart {:?}, only in kustomize {:?}",
            only(&chart, &kustomized),
            only(&kustomized, &chart)
        );
        for (key, object) in &kustomized {
            let pretty = |object: &Value| serde_json::to_string_pretty(object).unwrap();
            assert_eq!(
                pretty(&chart[key]),
                pretty(object),
                "{dir} {values:?}: {key} differs (left: the chart)"
            );
        }
        eprintln!(
            "{dir}: {} objects, the same from the chart",
            kustomized.len()
        );
    }
}

#[test]
#[ignore = "needs the Helm built by scripts/helm.sh (CORAL_HELM_BIN); scripts/test.sh runs it"]
fn every_object_the_chart_renders_carries_helms_labels() {
    for object in render(&["--values", EVERY_VALUE]) {
        if object["kind"] == "CustomResourceDefinition" {
            continue; // crds/ are installed as they are, without templating
        }
        let labels = &object["metadata"]["labels"];
        assert_eq!(
            labels["app.kubernetes.io/managed-by"],
            "Helm",
            "{}",
            key(&object)
        );
        assert_eq!(
            labels["app.kubernetes.io/instance"],
            "coral",
            "{}",
            key(&object)
        );
    }
}

#[test]
#[ignore = "needs the Helm built by scripts/helm.sh (CORAL_HELM_BIN); scripts/test.sh runs it"]
fn the_chart_passes_helm_lint_strict_with_every_values_set() {
    for (dir, values) in EQUIVALENTS {
        let mut args = vec!["lint", "--strict", CHART];
        args.extend_from_slice(values);
        let output = helm(&args);
        assert!(output.contains("0 chart(s) failed"), "{dir}: {output}");
    }
    let output = helm(&["lint", "--strict", CHART, "--values", EVERY_VALUE]);
    assert!(output.contains("0 chart(s) failed"), "{output}");
}

#[test]
#[ignore = "needs the Helm built by scripts/helm.sh (CORAL_HELM_BIN); scripts/test.sh runs it"]
fn a_packaged_chart_renders_what_the_directory_renders() {
    // deploy/helm/coral links to deploy/base (CRDs, policies, RBAC) rather than copying it;
    // the packaged chart must carry the files themselves.
    let out = tempfile::tempdir().unwrap();
    helm(&[
        "package",
        CHART,
        "--destination",
        out.path().to_str().unwrap(),
    ]);
    let package = out.path().join("coral-0.1.0.tgz");
    let packaged = support::helm::objects(&helm(&[
        "template",
        "coral",
        package.to_str().unwrap(),
        "--include-crds",
        "--values",
        EVERY_VALUE,
    ]));
    assert_eq!(by_key(packaged), by_key(render(&["--values", EVERY_VALUE])));
}

#[test]
#[ignore = "needs the Helm built by scripts/helm.sh (CORAL_HELM_BIN); scripts/test.sh runs it"]
fn each_value_changes_what_it_says() {
    let objects = by_key(render(&["--values", EVERY_VALUE]));
    let text = serde_json::to_string(&objects).unwrap();
    assert!(
        !text.contains("coral-system"),
        "the namespace is everywhere"
    );
    for (key, object) in &objects {
        if let Some(namespace) = object["metadata"]["namespace"].as_str() {
            assert_eq!(namespace, "images", "{key}");
        }
    }
    assert!(objects.contains_key("Namespace//images"));

    let pod = |key: &str| objects[key]["spec"]["template"]["spec"].clone();
    let controller = pod("Deployment/images/coral-controller");
    assert_eq!(
        objects["Deployment/images/coral-controller"]["spec"]["replicas"],
        3
    );
    assert_eq!(
        controller["containers"][0]["args"],
        json!([
            "controller",
            "--policies-configmap=images/coral-policies",
            "--resync=30s"
        ]),
        "cert-manager issues the certificate, so the controller does not"
    );
    assert_eq!(
        controller["containers"][0]["image"],
        "registry.example.com/coral:0.1.1"
    );
    assert_eq!(controller["containers"][0]["imagePullPolicy"], "Always");
    assert_eq!(
        controller["imagePullSecrets"],
        json!([{"name": "registry"}])
    );
    assert_eq!(controller["nodeSelector"], json!({"pool": "system"}));
    assert_eq!(controller["tolerations"][0]["key"], "dedicated");

    let webhook = pod("Deployment/images/coral-webhook");
    assert_eq!(
        objects["Deployment/images/coral-webhook"]["spec"]["replicas"],
        1
    );
    assert!(
        !objects.contains_key("PodDisruptionBudget/images/coral-webhook"),
        "one replica: a budget would block every drain"
    );
    let args = webhook["containers"][0]["args"].as_array().unwrap();
    for arg in [
        "--policies-configmap=images/coral-policies",
        "--failure-mode=deny",
        "--eval-timeout-ms=100",
    ] {
        assert!(args.contains(&json!(arg)), "{arg} in {args:?}");
    }
    assert_eq!(
        webhook["containers"][0]["resources"]["limits"]["memory"],
        "512Mi"
    );

    let agent = pod("DaemonSet/images/coral-agent");
    assert_eq!(
        agent["containers"][0]["args"],
        json!([
            "agent",
            "--cri-socket=unix:///run/crio/crio.sock",
            "--unwanted-grace=1h"
        ])
    );
    assert_eq!(
        agent["containers"][0]["volumeMounts"][0]["mountPath"],
        "/run/crio"
    );
    assert_eq!(agent["volumes"][0]["hostPath"]["path"], "/run/crio");
    assert!(agent.get("tolerations").is_none(), "{agent}");
    assert_eq!(agent["nodeSelector"], json!({"kubernetes.io/os": "linux"}));

    let mutating = &objects["MutatingWebhookConfiguration//coral"];
    assert_eq!(
        mutating["webhooks"][0]["namespaceSelector"],
        json!({"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["shop", "web"]},
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["images"]},
        ]})
    );
    for kind in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        assert_eq!(
            objects[&format!("{kind}//coral")]["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
            "images/coral-webhook"
        );
    }
    assert_eq!(
        objects["Certificate/images/coral-webhook"]["spec"]["dnsNames"][0],
        "coral-webhook.images.svc"
    );
    assert_eq!(
        objects["ValidatingAdmissionPolicy//coral-agent-own-node"]["spec"]["matchConditions"][0]["expression"],
        "request.userInfo.username == \"system:serviceaccount:images:coral-agent\""
    );
    assert_eq!(
        objects["ClusterRoleBinding//coral-agent"]["subjects"][0]["namespace"],
        "images"
    );

    // The webhook takes the settings as they are rendered.
    let policies = &objects["ConfigMap/images/coral-policies"]["data"];
    let settings = coral::policy::Settings::from_json(policies["settings.json"].as_str().unwrap())
        .expect("the webhook accepts the rendered settings");
    assert_eq!(settings.scheduling, coral::policy::Scheduling::Preferred);
    assert_eq!(settings.min_available_nodes, 2);
    assert_eq!(settings.share_private_images_with, vec!["web".to_string()]);
    for file in coral::policy::embedded_file_names() {
        assert!(policies.get(file).is_some(), "{file} in {policies}");
    }
    assert!(objects.contains_key("ServiceMonitor/images/coral"));
    assert_eq!(
        objects["ServiceMonitor/images/coral"]["spec"]["namespaceSelector"]["matchNames"],
        json!(["images"])
    );
}

#[test]
#[ignore = "needs the Helm built by scripts/helm.sh (CORAL_HELM_BIN); scripts/test.sh runs it"]
fn values_outside_the_schema_are_refused_by_name() {
    for (value, says) in [
        (
            "certificates.mode=vault",
            "'/certificates/mode': value must be one of 'self-managed', 'cert-manager'",
        ),
        ("runtime.type=docker", "'/runtime/type'"),
        (
            "webhook.replica=3",
            "'/webhook': additional properties 'replica'",
        ),
        ("webhook.failureMode=open", "'/webhook/failureMode'"),
        (
            "policies.settings.sheduling=preferred",
            "additional properties 'sheduling' not allowed",
        ),
        (
            "controller.extraArgs[0]=resync",
            "'/controller/extraArgs/0'",
        ),
        ("namespace.name=Coral", "'/namespace/name'"),
    ] {
        let error = helm_fails(&["template", "coral", CHART, "--set", value]);
        assert!(error.contains(says), "--set {value}: {error}");
    }
}
