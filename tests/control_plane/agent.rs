//! The agent under its own ServiceAccount: it labels its own node and nothing else.

use super::*;

/// kubectl with another kubeconfig; whether it succeeded, and its error output.
fn kubectl_as(kubeconfig: &std::path::Path, args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn the_agent_labels_its_own_node_with_its_own_token_and_nothing_else() {
    let plane = coral_control_plane(&["deploy/base/agent-policy.yaml"]);
    let containerd = runtime::Containerd::start();
    let registry = runtime::Registry::start(None);
    let app = registry.push("shop/app", "1.0", "app");
    let image_set = json!({
        "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"images": [app], "nodeSelector": {"matchLabels": {"pool": "web"}}},
    });
    assert!(
        plane
            .kubectl_stdin(&["create"], &image_set)
            .status
            .success()
    );
    plane.node("node-a", json!({"pool": "web"}), json!([]), false);
    plane.node("node-b", json!({"pool": "web"}), json!([]), false);

    // The agent's token as the kubelet mounts it: bound to its Pod on node-a, so it carries
    // the node's name.
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "coral-agent-node-a", "namespace": "coral-system"},
        "spec": {"nodeName": "node-a", "serviceAccountName": "coral-agent",
                 "containers": [{"name": "agent", "image": "coral:test"}]},
    });
    assert!(plane.kubectl_stdin(&["create"], &pod).status.success());
    let token = plane.kubectl_ok(&[
        "create",
        "token",
        "coral-agent",
        "-n",
        "coral-system",
        "--duration=1h",
        "--bound-object-kind=Pod",
        "--bound-object-name=coral-agent-node-a",
    ]);
    let kubeconfig =
        plane.service_account_kubeconfig_with_token(token.trim(), "coral-agent-node-a");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_coral"));
    command
        .args(["agent", "--node-name", "node-a", "--debounce", "50ms"])
        .args(["--cri-socket", &containerd.address()])
        .env("KUBECONFIG", &kubeconfig)
        .env("KUBERNETES_SERVICE_HOST", "");
    let _agent = support::process::Daemon::spawn("agent of node-a", command);

    // It pulls the image through containerd, labels its Node and records its NodeImage.
    let key = label(&app);
    wait_until(
        "node-a labelled and its NodeImage written",
        Duration::from_secs(60),
        || {
            let node: Value =
                serde_json::from_str(&plane.kubectl_ok(&["get", "node", "node-a", "-o", "json"]))
                    .unwrap();
            let output = plane.kubectl(&["get", "nodeimage", "node-a", "-o", "json"]);
            let node_image: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
            node["metadata"]["labels"][&key] == "available"
                && node_image["status"]["available"] == 1
        },
    );

    // The controller turns what the agent recorded into the ImageSet's status: both nodes
    // are targeted, the one with an agent holds the image.
    let _controller = start_controller(&plane, "controller-0");
    wait_until(
        "the ImageSet's status as the agent reports",
        Duration::from_secs(30),
        || {
            let output = plane.kubectl(&["get", "imageset", "web", "-n", "shop", "-o", "json"]);
            let set: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
            let image = &set["status"]["images"][0];
            let ready = set["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "Ready").cloned())
                .unwrap_or(Value::Null);
            image["nodesTargeted"] == 2
                && image["nodesAvailable"] == 1
                && ready["status"] == "False"
                && ready["reason"] == "NotAllAvailable"
        },
    );

    // The agent's own token, through the API server's admission: its own Node's Coral labels
    // only.
    let coral_label = format!("{}=available", label("busybox:1.36"));
    let (allowed, error) = kubectl_as(&kubeconfig, &["label", "node", "node-a", &coral_label]);
    assert!(allowed, "its own node's Coral label: {error}");
    for (what, args) in [
        (
            "another node",
            vec!["label", "node", "node-b", coral_label.as_str()],
        ),
        (
            "a label that is not Coral's",
            vec!["label", "node", "node-a", "pool=batch", "--overwrite"],
        ),
        (
            "the node's spec",
            vec![
                "patch",
                "node",
                "node-a",
                "-p",
                r#"{"spec":{"unschedulable":true}}"#,
            ],
        ),
    ] {
        let (allowed, error) = kubectl_as(&kubeconfig, &args);
        assert!(
            !allowed && error.contains("coral-agent-own-node"),
            "{what}: allowed={allowed} {error}"
        );
    }
    let other = std::env::temp_dir().join(format!("coral-nodeimage-{}.json", std::process::id()));
    std::fs::write(
        &other,
        json!({"apiVersion": "coral.dev/v1alpha1", "kind": "NodeImage",
               "metadata": {"name": "node-b"}, "spec": {"nodeName": "node-b"}})
        .to_string(),
    )
    .unwrap();
    let (allowed, error) = kubectl_as(&kubeconfig, &["create", "-f", other.to_str().unwrap()]);
    let _ = std::fs::remove_file(&other);
    assert!(
        !allowed && error.contains("coral-agent-own-node"),
        "another node's NodeImage: {error}"
    );
    let node_b: Value =
        serde_json::from_str(&plane.kubectl_ok(&["get", "node", "node-b", "-o", "json"])).unwrap();
    assert!(
        node_b["metadata"]["labels"]
            .get(label("busybox:1.36"))
            .is_none()
    );
}
