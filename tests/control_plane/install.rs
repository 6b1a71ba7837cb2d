//! The install: `deploy/`, its overlays and the Helm chart applied to a real API server, and
//! `kubectl coral` answering from the live cluster.

use super::*;

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn deploy_and_its_overlays_apply_to_a_real_api_server() {
    let plane = ControlPlane::start(&control_plane_binaries());
    // A server-side dry run cannot create the namespace its other objects go in.
    plane.kubectl_ok(&[
        "apply",
        "--server-side",
        "--field-manager=coral-test",
        "-f",
        "deploy/base/namespace.yaml",
    ]);
    // deploy/ first (its CRDs), then every overlay there is.
    let overlays = support::overlays();
    assert!(overlays.len() >= 5, "{overlays:?}");
    for dir in std::iter::once("deploy".to_string()).chain(overlays) {
        let dir = dir.as_str();
        let rendered = std::process::Command::new("kubectl")
            .args(["kustomize", dir])
            .output()
            .unwrap();
        assert!(
            rendered.status.success(),
            "{dir}: {}",
            String::from_utf8_lossy(&rendered.stderr)
        );
        // cert-manager's and the Prometheus Operator's own kinds need their CRDs, which are
        // not Coral's to install.
        let objects: Vec<Value> = serde_yaml::Deserializer::from_slice(&rendered.stdout)
            .map(|document| Value::deserialize(document).unwrap())
            .filter(|o| {
                let api_version = o["apiVersion"].as_str().unwrap_or("");
                !api_version.starts_with("cert-manager.io/")
                    && !api_version.starts_with("monitoring.coreos.com/")
            })
            .collect();
        let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
        for args in [
            &[
                "apply",
                "--server-side",
                "--dry-run=server",
                "--field-manager=coral-test",
            ][..],
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=coral-test",
            ][..],
        ] {
            let output = plane.kubectl_stdin(args, &list);
            assert!(
                output.status.success(),
                "kubectl {} of {dir}: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        if dir == "deploy" {
            wait_for_crds(&plane);
        }
    }
    // The API server type-checked the agent's ValidatingAdmissionPolicy: no warnings.
    let mut status = Value::Null;
    wait_until("the policy's type check", Duration::from_secs(30), || {
        let policy: Value = serde_json::from_str(&plane.kubectl_ok(&[
            "get",
            "validatingadmissionpolicy",
            "coral-agent-own-node",
            "-o",
            "json",
        ]))
        .unwrap();
        status = policy["status"].clone();
        status.get("typeChecking").is_some()
    });
    assert!(
        status["typeChecking"]["expressionWarnings"]
            .as_array()
            .is_none_or(Vec::is_empty),
        "{status}"
    );
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN) and the Helm built by scripts/helm.sh (CORAL_HELM_BIN); scripts/test.sh runs it"]
fn the_helm_chart_with_every_value_changed_applies_to_a_real_api_server() {
    // tests/helm.rs checks that the chart's defaults equal deploy/ (which the test above
    // applies); this applies what every other value renders.
    let plane = ControlPlane::start(&control_plane_binaries());
    let objects: Vec<Value> = support::helm::render(&["--values", "tests/data/helm-values.yaml"])
        .into_iter()
        .filter(|o| {
            let api_version = o["apiVersion"].as_str().unwrap_or("");
            !api_version.starts_with("cert-manager.io/")
                && !api_version.starts_with("monitoring.coreos.com/")
        })
        .collect();
    // The namespace and the CRDs first: a dry run cannot create what its other objects need.
    let (first, rest): (Vec<Value>, Vec<Value>) = objects
        .into_iter()
        .partition(|o| o["kind"] == "Namespace" || o["kind"] == "CustomResourceDefinition");
    let apply = |items: Vec<Value>, dry_run: bool| {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        let mut args = vec!["apply", "--server-side", "--field-manager=coral-test"];
        if dry_run {
            args.push("--dry-run=server");
        }
        let output = plane.kubectl_stdin(&args, &list);
        assert!(
            output.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    };
    apply(first, false);
    wait_for_crds(&plane);
    apply(rest.clone(), true);
    apply(rest, false);
    let namespace: Value =
        serde_json::from_str(&plane.kubectl_ok(&["get", "namespace", "images", "-o", "json"]))
            .unwrap();
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    let stored: Value = serde_json::from_str(&plane.kubectl_ok(&[
        "get",
        "deployment",
        "coral-webhook",
        "-n",
        "images",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(stored["spec"]["replicas"], 1);
}

/// `kubectl coral …` through kubectl's plugin mechanism: `kubectl-coral` on the PATH.
fn kubectl_coral(plane: &ControlPlane, plugins: &std::path::Path, args: &[&str]) -> String {
    let path = format!(
        "{}:{}",
        plugins.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = std::process::Command::new("kubectl")
        .arg("coral")
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", &plane.kubeconfig)
        .env("KUBERNETES_SERVICE_HOST", "")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "kubectl coral {args:?}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn kubectl_coral_answers_status_why_and_nodes_from_the_live_cluster() {
    let plane = injecting_control_plane();
    let plugins = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_coral"),
        plugins.path().join("kubectl-coral"),
    )
    .unwrap();
    let image_set = json!({
        "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"images": ["nginx:1.27", "redis:7.4"], "nodeSelector": {"matchLabels": {"pool": "web"}}},
    });
    assert!(
        plane
            .kubectl_stdin(&["create"], &image_set)
            .status
            .success()
    );
    let mut held = json!({"pool": "web"});
    held[label("nginx:1.27")] = json!("available");
    plane.node("node-a", held, json!([]), false);
    plane.node("node-b", json!({"pool": "web"}), json!([]), false);
    // node-b's agent could not pull redis.
    let node_image = json!({"apiVersion": "coral.dev/v1alpha1", "kind": "NodeImage",
        "metadata": {"name": "node-b"}, "spec": {"nodeName": "node-b"}});
    assert!(
        plane
            .kubectl_stdin(&["create"], &node_image)
            .status
            .success()
    );
    let status = json!({"status": {"available": 0, "pulling": 0, "failed": 1, "conditions": [],
        "images": [{"image": "docker.io/library/redis:7.4", "label": label("redis:7.4"),
                    "state": "failed", "attempts": 5,
                    "lastError": "pull access denied for redis"}]}});
    plane.kubectl_ok(&[
        "patch",
        "nodeimage",
        "node-b",
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
    let _controller = start_controller(&plane, "controller-0");
    wait_until("the ImageSet's status", Duration::from_secs(30), || {
        image_set_status_of(&plane, "web")["imageCount"] == 2
    });
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop",
                     "annotations": {"coral.dev/inject": "selectors"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [
                                  {"name": "web", "image": "nginx:1.27"},
                                  {"name": "cache", "image": "redis:7.4"},
                                  {"name": "tools", "image": "busybox:1.36"}]}}},
    });
    assert!(
        plane
            .kubectl_stdin(&["create"], &deployment)
            .status
            .success()
    );

    let status = kubectl_coral(&plane, plugins.path(), &["status"]);
    println!("{status}");
    assert!(status.contains("shop/web  Ready: False"), "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.contains("nginx:1.27") && l.contains("1/2")),
        "{status}"
    );
    assert!(
        status
            .lines()
            .any(|l| l.contains("redis:7.4") && l.contains("1 failed")),
        "{status}"
    );

    let why = kubectl_coral(
        &plane,
        plugins.path(),
        &["why", "deployment/web", "-n", "shop"],
    );
    println!("{why}");
    assert!(why.contains("policies: embedded"), "{why}");
    assert!(why.contains("Deployment shop/web: "), "{why}");
    assert!(
        why.contains(&label("nginx:1.27")),
        "steered to nginx: {why}"
    );
    assert!(
        why.contains("nginx:1.27: managed by shop/web; on 1 of 2 targeted node(s)"),
        "{why}"
    );
    assert!(
        why.contains("redis:7.4: managed by shop/web; on 0 of 2 targeted node(s)"),
        "{why}"
    );
    assert!(why.contains("failed on 1"), "{why}");
    assert!(why.contains("busybox:1.36: unmanaged"), "{why}");
    assert!(why.contains("warning: "), "the policies say why: {why}");

    let nodes = kubectl_coral(&plane, plugins.path(), &["nodes", "redis:7.4"]);
    println!("{nodes}");
    assert!(
        nodes.contains("node-b") && nodes.contains("failed after 5 attempt(s): pull access denied"),
        "{nodes}"
    );
    assert!(nodes.contains("0 of 2 node(s) hold it"), "{nodes}");
    let nodes = kubectl_coral(&plane, plugins.path(), &["nodes", "nginx:1.27"]);
    assert!(
        nodes.contains("node-a") && nodes.contains("1 of 2 node(s) hold it"),
        "{nodes}"
    );
}
