//! The image lifecycle: digest drift and `spec.refresh`, pinning, retention on the nodes and in
//! the mirror.

use super::*;

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn a_moved_tag_drifts_across_two_nodes_until_spec_refresh_and_pin_runs_the_agreed_digest() {
    let plane = coral_control_plane(&[]);
    let registry = runtime::Registry::start(None);
    let app = registry.push("shop/app", "1", "first");
    let first = registry.manifest_digest(&app);
    let kubeconfig = plane.service_account_kubeconfig("coral-system", "coral-agent");
    let mut nodes: Vec<AgentNode> = ["node-a", "node-b"]
        .iter()
        .map(|name| {
            plane.node(name, json!({"pool": "web"}), json!([]), false);
            AgentNode::new(name, &kubeconfig)
        })
        .collect();
    let image_set = |refresh: Option<&str>| {
        let mut spec = json!({"images": [app], "nodeSelector": {"matchLabels": {"pool": "web"}}});
        if let Some(refresh) = refresh {
            spec["refresh"] = json!(refresh);
        }
        json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
            "metadata": {"name": "drift", "namespace": "shop"}, "spec": spec,
        })
    };
    apply(&plane, &image_set(None));
    let controller = start_controller(&plane, "controller-0");
    let probe = controller.probes;

    // node-a pulls the tag, which then moves; node-b, starting later, pulls where it is now.
    nodes[0].start_agent();
    wait_until(
        "node-a holds the first digest",
        Duration::from_secs(60),
        || {
            let status = image_set_status_of(&plane, "drift");
            status["images"][0]["nodesAvailable"] == 1 && status["images"][0]["digest"] == first
        },
    );
    registry.push("shop/app", "1", "second");
    let second = registry.manifest_digest(&app);
    nodes[1].start_agent();
    wait_until("DigestDrift", Duration::from_secs(60), || {
        let status = image_set_status_of(&plane, "drift");
        condition_of(&status, "DigestDrift").0 == "True"
    });
    let status = image_set_status_of(&plane, "drift");
    let (_, message) = condition_of(&status, "DigestDrift");
    assert!(
        message.contains(&first) && message.contains(&second),
        "{message}"
    );
    assert_eq!(status["images"][0]["nodesDiffering"], 1, "{status}");
    assert_eq!(
        status["images"][0]["digests"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    wait_until("the drift metric", Duration::from_secs(30), || {
        metric(
            &http_get(probe, "/metrics"),
            "coral_controller_drifting_images",
        ) == Some(1.0)
    });

    // With drift the webhook pins nothing, and says why.
    let webhook_kubeconfig = plane.service_account_kubeconfig("coral-system", "coral-webhook");
    let webhook = Webhook::start_with_kubeconfig(&webhook_kubeconfig, &["--debounce-ms", "50"]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    wait_until(
        "the webhook sees the drift",
        Duration::from_secs(30),
        || {
            runtime.block_on(get_probe(&webhook, "/readyz")).0 == 200
                && review_pod(&webhook, &runtime, &app, "pin")
                    .1
                    .iter()
                    .any(|w| w.contains("held under different digests"))
        },
    );
    assert!(review_pod(&webhook, &runtime, &app, "pin").0.is_empty());

    // spec.refresh: node-a resolves the tag again and pulls what moved; the drift ends.
    apply(&plane, &image_set(Some("5s")));
    wait_until("the nodes agree", Duration::from_secs(60), || {
        let status = image_set_status_of(&plane, "drift");
        condition_of(&status, "DigestDrift").0 == "False"
            && status["images"][0]["digest"] == second
            && status["images"][0]["nodesDiffering"] == 0
    });
    let refreshes = |node: &AgentNode, result: &str| {
        metric(
            &http_get(node.metrics, "/metrics"),
            &format!("coral_agent_refreshes_total{{result=\"{result}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(refreshes(&nodes[0], "moved"), 1.0);
    // No image vanished: a pull that ended while the agent listed the runtime is not taken for
    // gone and pulled again (which, with the tag moved meanwhile, would end the drift early).
    for node in &nodes {
        let vanished = metric(
            &http_get(node.metrics, "/metrics"),
            "coral_agent_vanished_images_total",
        );
        assert_eq!(vanished, Some(0.0), "{}", node.name);
    }
    // node-b held the moved tag already: its refreshes find nothing to pull.
    wait_until("node-b refreshed", Duration::from_secs(30), || {
        refreshes(&nodes[1], "unchanged") >= 1.0
    });
    assert_eq!(refreshes(&nodes[1], "moved"), 0.0);
    assert_eq!(nodes[1].pulls(), 1);

    // Now the webhook pins the digest both nodes hold, and a real containerd pulls it.
    let pinned = format!("{app}@{second}");
    let to_pinned = json!({"op": "replace", "path": "/spec/containers/0/image", "value": pinned});
    wait_until("the webhook pins", Duration::from_secs(30), || {
        review_pod(&webhook, &runtime, &app, "pin").0 == vec![to_pinned.clone()]
    });
    let containerd = runtime::Containerd::start();
    let (ok, text) = containerd.prefetch(std::slice::from_ref(&pinned), &[]);
    assert!(ok, "{text}");
    assert!(text.contains(&format!("pulled     {pinned}")), "{text}");
    wait_until("no drift in the metric", Duration::from_secs(30), || {
        metric(
            &http_get(probe, "/metrics"),
            "coral_controller_drifting_images",
        ) == Some(0.0)
    });
    for node in &mut nodes {
        node.kill_agent();
    }
}

/// The NodeImage status of a node.
fn node_image_status(plane: &ControlPlane, node: &str) -> Value {
    let output = plane.kubectl(&["get", "nodeimage", node, "-o", "json"]);
    serde_json::from_slice::<Value>(&output.stdout)
        .map(|n| n["status"].clone())
        .unwrap_or(Value::Null)
}

/// Whether the containerd of `node` holds `image`.
fn runtime_holds(node: &AgentNode, image: &str) -> bool {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        coral::agent::cri::Cri::new(&node.containerd.address())
            .unwrap()
            .image_status(image)
            .await
            .unwrap()
            .is_some()
    })
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn the_agent_removes_an_unwanted_image_after_its_grace_period_across_a_restart() {
    let plane = coral_control_plane(&[]);
    let registry = runtime::Registry::start(None);
    let keep = registry.push("shop/keep", "1", "keep");
    let old = registry.push("shop/old", "1", "old");
    plane.node("node-a", json!({"pool": "web"}), json!([]), false);
    let mut node = AgentNode::new(
        "node-a",
        &plane.service_account_kubeconfig("coral-system", "coral-agent"),
    );
    let image_set = |images: &[&String]| {
        json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
            "metadata": {"name": "retention", "namespace": "shop"},
            "spec": {"images": images, "nodeSelector": {"matchLabels": {"pool": "web"}}},
        })
    };
    apply(&plane, &image_set(&[&keep, &old]));
    let _controller = start_controller(&plane, "controller-0");
    let grace = ["--unwanted-grace", "8s"];
    node.start_agent_with(&grace);
    wait_until("both images held", Duration::from_secs(60), || {
        node_image_status(&plane, "node-a")["available"] == 2
    });

    // `old` leaves the ImageSet: unwanted, recorded with its time, still on the runtime.
    apply(&plane, &image_set(&[&keep]));
    let left = Instant::now();
    wait_until("old recorded unwanted", Duration::from_secs(30), || {
        node_image_status(&plane, "node-a")["unwanted"][0]["image"] == old.as_str()
    });
    let since = node_image_status(&plane, "node-a")["unwanted"][0]["since"].clone();
    assert!(since.is_string());
    assert!(
        runtime_holds(&node, &old),
        "removed within its grace period"
    );

    // A restart within the grace period keeps when it became unwanted: the image goes once
    // the grace period that began before the restart ends.
    std::thread::sleep(Duration::from_secs(2));
    node.kill_agent();
    node.start_agent_with(&grace);
    wait_until(
        "the restarted agent took it up",
        Duration::from_secs(30),
        || http_get(node.metrics, "/metrics").contains("coral_agent_unwanted_images 1"),
    );
    assert_eq!(
        node_image_status(&plane, "node-a")["unwanted"][0]["since"],
        since
    );
    wait_until("old removed", Duration::from_secs(60), || {
        node_image_status(&plane, "node-a")["removals"][0]["image"] == old.as_str()
    });
    let waited = left.elapsed();
    assert!(
        waited >= Duration::from_secs(7) && waited < Duration::from_secs(20),
        "removed {waited:?} after it left"
    );
    assert!(!runtime_holds(&node, &old));
    assert!(runtime_holds(&node, &keep));
    let status = node_image_status(&plane, "node-a");
    assert_eq!(status["removals"][0]["reason"], "grace", "{status}");
    assert!(status["unwanted"].is_null(), "{status}");
    let metrics = http_get(node.metrics, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "coral_agent_removed_images_total{reason=\"grace\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    node.kill_agent();
}

/// The digests of the layers of an image manifest.
fn layer_digests(manifest: &[u8]) -> Vec<String> {
    let manifest: Value = serde_json::from_slice(manifest).unwrap();
    manifest["layers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["digest"].as_str().map(str::to_string))
        .collect()
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn a_copy_no_imageset_mirrors_is_deleted_after_its_retention_unless_a_pod_runs_it() {
    let plane = coral_control_plane(&[]);
    let source = runtime::Registry::start(None);
    let mut mirror = runtime::Registry::start(None);
    let images: Vec<String> = ["kept", "running", "gone"]
        .iter()
        .map(|name| source.push(&format!("shop/{name}"), "1", name))
        .collect();
    let mirror_host = mirror.host();
    let copy = |image: &str| {
        format!(
            "{mirror_host}/{}",
            image.replace(&source.host(), &source.host().replace(':', "_"))
        )
    };
    apply(
        &plane,
        &json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "Registry",
            "metadata": {"name": "local"}, "spec": {"endpoint": mirror.host()},
        }),
    );
    let image_set = |images: &[String]| {
        json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
            "metadata": {"name": "mirrored", "namespace": "shop"},
            "spec": {"images": images, "mirror": {"registry": "local"},
                     "nodeSelector": {"matchLabels": {"coral.dev/mirror-only": "true"}}},
        })
    };
    apply(&plane, &image_set(&images));
    let flags = [
        "--mirror-retention",
        "3s",
        "--registry-probe-interval",
        "1s",
    ];
    let controller = start_controller_with(&plane, "controller-0", &flags);
    let probe = controller.probes;
    wait_until("all three mirrored", Duration::from_secs(60), || {
        let status = registry_object(&plane, "local")["status"].clone();
        status["mirroredImages"] == 3 && status["mirroredBytes"].as_i64().is_some_and(|b| b > 0)
    });
    let bytes_of_three = registry_object(&plane, "local")["status"]["mirroredBytes"]
        .as_i64()
        .unwrap();
    let gone_layers = layer_digests(&mirror.manifest(&copy(&images[2])));
    let kept_layers = layer_digests(&mirror.manifest(&copy(&images[0])));

    // A Pod (no kubelet here: it stays Pending, which counts as running) runs one copy.
    apply(
        &plane,
        &json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "runner", "namespace": "shop"},
            "spec": {"containers": [{"name": "app", "image": copy(&images[1])}]},
        }),
    );
    // Two images leave the ImageSet: retired, then deleted once 3 s have passed, except the
    // one the Pod runs.
    apply(&plane, &image_set(&images[..1]));
    wait_until("the unused copy deleted", Duration::from_secs(60), || {
        !mirror.manifest_exists(&copy(&images[2]))
    });
    let status = registry_object(&plane, "local")["status"].clone();
    assert!(mirror.manifest_exists(&copy(&images[0])), "{status}");
    assert!(mirror.manifest_exists(&copy(&images[1])), "{status}");
    wait_until("the kept copy says why", Duration::from_secs(30), || {
        let status = registry_object(&plane, "local")["status"].clone();
        status["retiring"].as_array().is_some_and(|r| {
            r.len() == 1
                && r[0]["reference"] == copy(&images[1])
                && r[0]["kept"] == "Pod shop/runner runs it"
        })
    });
    let status = registry_object(&plane, "local")["status"].clone();
    assert_eq!(status["mirroredImages"], 1, "{status}");
    assert!(
        status["mirroredBytes"].as_i64().unwrap() < bytes_of_three,
        "{status}"
    );

    // The Pod goes: so does its copy.
    // (No kubelet confirms a graceful deletion here.)
    plane.kubectl_ok(&[
        "delete",
        "pod",
        "runner",
        "-n",
        "shop",
        "--grace-period=0",
        "--force",
    ]);
    wait_until(
        "the copy the Pod ran deleted",
        Duration::from_secs(60),
        || !mirror.manifest_exists(&copy(&images[1])),
    );
    wait_until("nothing retiring", Duration::from_secs(30), || {
        registry_object(&plane, "local")["status"]["retiring"].is_null()
    });
    let metrics = http_get(probe, "/metrics");
    assert_eq!(
        metric(&metrics, "coral_mirror_deleted_total{registry=\"local\"}"),
        Some(2.0),
        "{metrics}"
    );

    // The registry's own garbage collection, run while it does not serve (as the managed
    // registry's init container does), frees the deleted images' layers and only those.
    let gc = manifests("deploy/overlays/registry/registry.yaml")
        .into_iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "coral-registry-gc")
        .expect("the garbage collection's ConfigMap");
    for layer in &gone_layers {
        assert!(
            mirror.blob_path(layer).exists(),
            "{layer} is stored before the sweep"
        );
    }
    let output = mirror.garbage_collect(gc["data"]["gc.yml"].as_str().unwrap());
    for layer in &gone_layers {
        assert!(
            !mirror.blob_path(layer).exists(),
            "{layer} stayed: {output}"
        );
    }
    for layer in &kept_layers {
        assert!(mirror.blob_path(layer).exists(), "{layer} went: {output}");
    }
    assert!(mirror.manifest_exists(&copy(&images[0])));

    // The ImageSet itself is deleted: its last copy retires before its finalizer goes, and
    // is deleted after the retention.
    plane.kubectl_ok(&["delete", "imageset", "mirrored", "-n", "shop"]);
    wait_until(
        "the deleted set's copy deleted",
        Duration::from_secs(60),
        || !mirror.manifest_exists(&copy(&images[0])),
    );
    wait_until("nothing mirrored", Duration::from_secs(30), || {
        let status = registry_object(&plane, "local")["status"].clone();
        status["mirroredImages"] == 0 && status["retiring"].is_null()
    });
}
