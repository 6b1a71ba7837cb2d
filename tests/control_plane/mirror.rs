//! The in-cluster mirror: copies into a registry, a moved tag followed, a Pod that runs the
//! copy with the source stopped, registries with their own CA.

use super::*;

/// The mirror status of the one image of ImageSet `shop/mirrored`, and its `Mirrored`
/// condition's status.
fn mirror_status(plane: &ControlPlane) -> (Value, String) {
    let status = image_set_status_of(plane, "mirrored");
    let condition = status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Mirrored")
        .map(|c| c["status"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    (status["images"][0]["mirror"].clone(), condition)
}

/// A controller that checks mirrored tags every 2 s and probes Registries every second, and
/// the address of its metrics.
fn start_mirroring_controller(
    plane: &ControlPlane,
    name: &str,
) -> (support::process::Daemon, std::net::SocketAddr) {
    let flags = ["--mirror-recheck", "2s", "--registry-probe-interval", "1s"];
    let controller = start_controller_with(plane, name, &flags);
    let probe = controller.probes;
    (controller, probe)
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn the_controller_mirrors_into_a_registry_follows_a_moved_tag_and_resumes_after_a_restart() {
    const USER: &str = "coral";
    const PASSWORD: &str = "s3cret";
    let plane = coral_control_plane(&[]);
    // The source and the mirror both want credentials: the source's come from the ImageSet's
    // pull secret (the controller's copy), the mirror's from the Registry's secret.
    let mut source = runtime::Registry::start(Some((USER, PASSWORD)));
    let mut mirror = runtime::Registry::start(Some((USER, PASSWORD)));
    let reference = source.push("shop/app", "1.0", "app one");
    assert_eq!(reference, format!("{}/shop/app:1.0", source.host()));
    // Pods pull by the endpoint (as nodes reach it); Coral copies through the push endpoint.
    let endpoint = format!("localhost:{}", mirror.port);
    let path = format!("{}/shop/app:1.0", source.host().replace(':', "_"));
    let mirror_reference = format!("{endpoint}/{path}");
    for (namespace, name, host) in [
        ("shop", "source-pull", source.host()),
        ("coral-system", "mirror-push", mirror.host()),
    ] {
        plane.kubectl_ok(&[
            "create",
            "secret",
            "docker-registry",
            name,
            "-n",
            namespace,
            &format!("--docker-server={host}"),
            &format!("--docker-username={USER}"),
            &format!("--docker-password={PASSWORD}"),
        ]);
    }
    apply(
        &plane,
        &json!({
            "apiVersion": "coral.dev/v1alpha1",
            "kind": "Registry",
            "metadata": {"name": "local"},
            "spec": {
                "endpoint": endpoint, "pushEndpoint": mirror.host(),
                "credentialsSecret": "mirror-push",
                // Pods cannot read it without credentials: it may hold the private image.
                "privateImages": true,
            },
        }),
    );
    apply(
        &plane,
        &json!({
            "apiVersion": "coral.dev/v1alpha1",
            "kind": "ImageSet",
            "metadata": {"name": "mirrored", "namespace": "shop"},
            "spec": {
                "images": [reference],
                "imagePullSecrets": [{"name": "source-pull"}],
                "mirror": {"registry": "local"},
                // Mirror only: no node is selected.
                "nodeSelector": {"matchLabels": {"coral.dev/mirror-only": "true"}},
            },
        }),
    );
    let (controller, probe) = start_mirroring_controller(&plane, "controller-0");
    let started = Instant::now();
    wait_until("the image mirrored", Duration::from_secs(60), || {
        let (status, condition) = mirror_status(&plane);
        status["state"] == "mirrored" && condition == "True"
    });
    println!(
        "mirrored {:.1} s after the controller started",
        started.elapsed().as_secs_f64()
    );
    let (status, _) = mirror_status(&plane);
    assert_eq!(status["reference"], mirror_reference.as_str());
    let source_digest = source.manifest_digest(&reference);
    assert_eq!(status["sourceDigest"], source_digest.as_str());
    assert_eq!(status["digest"], source_digest.as_str());
    assert_eq!(
        mirror.manifest_digest(&format!("{}/{path}", mirror.host())),
        source_digest,
        "the mirror serves the source's manifest, digest kept"
    );
    wait_until(
        "the Registry reachable with one image",
        Duration::from_secs(30),
        || {
            let registry = registry_object(&plane, "local");
            registry["status"]["mirroredImages"] == 1
                && registry["status"]["conditions"][0]["status"] == "True"
        },
    );
    let metrics = http_get(probe, "/metrics");
    assert!(
        metric(
            &metrics,
            "coral_mirror_bytes_copied_total{registry=\"local\"}"
        )
        .is_some_and(|b| b > 0.0),
        "{metrics}"
    );

    // The tag moves at the source: the next check copies the new image.
    source.push("shop/app", "1.0", "app two");
    let moved = source.manifest_digest(&reference);
    assert_ne!(moved, source_digest);
    wait_until("the moved tag copied", Duration::from_secs(30), || {
        mirror_status(&plane).0["digest"] == moved.as_str()
    });

    // A restart: the new leader takes up the status and copies nothing (the mirror holds
    // everything), and the image never goes back to copying.
    drop(controller);
    let (_controller, probe) = start_mirroring_controller(&plane, "controller-1");
    wait_until(
        "the new leader checked the image",
        Duration::from_secs(30),
        || {
            let metrics = http_get(probe, "/metrics");
            // (Null: the status could not be read this time, under load.)
            let state = mirror_status(&plane).0["state"].clone();
            assert!(state.is_null() || state == "mirrored", "{state}");
            metric(
                &metrics,
                "coral_mirror_copy_duration_seconds_count{registry=\"local\"}",
            )
            .is_some_and(|n| n >= 2.0)
        },
    );
    let metrics = http_get(probe, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "coral_mirror_bytes_copied_total{registry=\"local\"}"
        ),
        Some(0.0),
        "{metrics}"
    );

    // The source down: the mirrored copy stays usable, the error is shown.
    source.stop();
    wait_until(
        "the source's failure recorded",
        Duration::from_secs(30),
        || {
            let (status, condition) = mirror_status(&plane);
            status["state"] == "mirrored"
                && condition == "True"
                && status["lastError"]
                    .as_str()
                    .is_some_and(|e| e.contains("reading the manifest of"))
        },
    );
    // The mirror down: the Registry is unreachable, then reachable again.
    mirror.stop();
    wait_until("the Registry unreachable", Duration::from_secs(30), || {
        let registry = registry_object(&plane, "local");
        registry["status"]["conditions"][0]["status"] == "False"
            && registry["status"]["lastError"].as_str().is_some()
    });
    mirror.resume();
    source.resume();
    wait_until(
        "the Registry reachable again and the error gone",
        Duration::from_secs(30),
        || {
            let registry = registry_object(&plane, "local");
            registry["status"]["conditions"][0]["status"] == "True"
                && mirror_status(&plane).0["lastError"].is_null()
        },
    );
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn a_pod_runs_the_mirrors_copy_which_containerd_pulls_with_the_source_stopped() {
    let plane = coral_control_plane(&[]);
    let mut source = runtime::Registry::start(None);
    let mut mirror = runtime::Registry::start(None);
    let app = source.push("shop/app", "1.0", "served from the mirror");
    let secret = source.push("shop/secret", "1.0", "private");
    let mirror_ref = format!(
        "{}/{}/shop/app:1.0",
        mirror.host(),
        source.host().replace(':', "_")
    );
    apply(
        &plane,
        &json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "Registry",
            "metadata": {"name": "local"},
            "spec": {"endpoint": mirror.host()},
        }),
    );
    let nowhere = json!({"matchLabels": {"coral.dev/mirror-only": "true"}});
    apply(
        &plane,
        &json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
            "metadata": {"name": "cache", "namespace": "shop"},
            "spec": {"images": [app], "mirror": {"registry": "local"}, "nodeSelector": nowhere},
        }),
    );
    // A private image (pulled with a pull secret) is not copied into a Registry that does not
    // take private images, nor into one anyone reads.
    apply(
        &plane,
        &json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "Registry",
            "metadata": {"name": "open"},
            "spec": {"endpoint": mirror.host(), "privateImages": true},
        }),
    );
    plane.kubectl_ok(&[
        "create",
        "secret",
        "docker-registry",
        "source-pull",
        "-n",
        "shop",
        &format!("--docker-server={}", source.host()),
        "--docker-username=coral",
        "--docker-password=s3cret",
    ]);
    for (name, registry) in [("private", "local"), ("private-open", "open")] {
        apply(
            &plane,
            &json!({
                "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {
                    "images": [secret], "imagePullSecrets": [{"name": "source-pull"}],
                    "mirror": {"registry": registry}, "nodeSelector": nowhere,
                },
            }),
        );
    }
    let _controller =
        start_controller_with(&plane, "controller-0", &["--registry-probe-interval", "1s"]);
    wait_until("the public image mirrored", Duration::from_secs(60), || {
        image_set_status_of(&plane, "cache")["images"][0]["mirror"]["state"] == "mirrored"
    });
    for (name, why) in [
        (
            "private",
            "does not take private images (spec.privateImages)",
        ),
        ("private-open", "serves pulls without credentials"),
    ] {
        wait_until("the private image refused", Duration::from_secs(30), || {
            let status = image_set_status_of(&plane, name)["images"][0]["mirror"].clone();
            status["state"] == "failed"
                && status["lastError"]
                    .as_str()
                    .is_some_and(|e| e.contains(why))
        });
    }
    assert!(
        !mirror.manifest_exists(&format!(
            "{}/{}/shop/secret:1.0",
            mirror.host(),
            source.host().replace(':', "_")
        )),
        "the private image never reached the open mirror"
    );

    let kubeconfig = plane.service_account_kubeconfig("coral-system", "coral-webhook");
    let webhook = Webhook::start_with_kubeconfig(&kubeconfig, &["--debounce-ms", "50"]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let to_mirror =
        json!({"op": "replace", "path": "/spec/containers/0/image", "value": mirror_ref});
    wait_until(
        "the webhook runs the mirror's copy",
        Duration::from_secs(30),
        || {
            runtime.block_on(get_probe(&webhook, "/readyz")).0 == 200
                && review_pod(&webhook, &runtime, &app, "mirror").0 == vec![to_mirror.clone()]
        },
    );
    let (patch, _) = review_pod(&webhook, &runtime, &secret, "mirror");
    assert!(
        patch.is_empty(),
        "a private image stays on its source: {patch:?}"
    );

    // The source stopped, a real containerd pulls what the pod now runs.
    source.stop();
    let containerd = runtime::Containerd::start();
    let (ok, text) = containerd.prefetch(std::slice::from_ref(&mirror_ref), &[]);
    assert!(ok, "{text}");
    assert!(text.contains(&format!("pulled     {mirror_ref}")), "{text}");

    // The mirror down: once the Registry is seen unreachable, a new pod keeps its source and
    // a pod already rewritten gets its source back.
    source.resume();
    mirror.stop();
    let back = json!({"op": "replace", "path": "/spec/containers/0/image", "value": app});
    wait_until(
        "the webhook falls back to the source",
        Duration::from_secs(30),
        || review_pod(&webhook, &runtime, &mirror_ref, "mirror").0 == vec![back.clone()],
    );
    let (patch, warnings) = review_pod(&webhook, &runtime, &app, "mirror");
    assert!(patch.is_empty(), "{patch:?}");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("is not ready in mirror Registry local")),
        "{warnings:?}"
    );
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn a_registry_with_its_own_ca_is_mirrored_into_over_https_and_another_ca_is_refused() {
    let plane = coral_control_plane(&[]);
    let source = runtime::Registry::start(None);
    let app = source.push("shop/app", "1.0", "over https");
    let dir = tempfile::tempdir().unwrap();
    let authority = support::Authority::new();
    let (certificate, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    authority.issue(&certificate, &key);
    let mirror = runtime::Registry::start_tls(&certificate, &key);
    for (secret, pem) in [
        ("registry-ca", authority.pem()),
        ("other-ca", support::Authority::new().pem()),
    ] {
        let file = dir.path().join(format!("{secret}.crt"));
        std::fs::write(&file, pem).unwrap();
        plane.kubectl_ok(&[
            "create",
            "secret",
            "generic",
            secret,
            "-n",
            "coral-system",
            &format!("--from-file=ca.crt={}", file.display()),
        ]);
    }
    let nowhere = json!({"matchLabels": {"coral.dev/mirror-only": "true"}});
    for (name, ca) in [("trusted", "registry-ca"), ("untrusted", "other-ca")] {
        apply(
            &plane,
            &json!({
                "apiVersion": "coral.dev/v1alpha1", "kind": "Registry",
                "metadata": {"name": name},
                "spec": {"endpoint": mirror.host(), "tls": {"caSecret": {"name": ca}}},
            }),
        );
        apply(
            &plane,
            &json!({
                "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
                "metadata": {"name": name, "namespace": "shop"},
                "spec": {"images": [app], "mirror": {"registry": name}, "nodeSelector": nowhere},
            }),
        );
    }
    let (_controller, probe) = start_mirroring_controller(&plane, "controller-0");
    wait_until(
        "the image mirrored over HTTPS",
        Duration::from_secs(60),
        || image_set_status_of(&plane, "trusted")["images"][0]["mirror"]["state"] == "mirrored",
    );
    wait_until("the other CA refused", Duration::from_secs(30), || {
        let status = image_set_status_of(&plane, "untrusted")["images"][0]["mirror"].clone();
        let registry = registry_object(&plane, "untrusted");
        status["state"] == "failed"
            && registry["status"]["conditions"][0]["status"] == "False"
            && registry["status"]["lastError"]
                .as_str()
                .is_some_and(|e| e.to_lowercase().contains("certificate"))
    });
    assert_eq!(
        registry_object(&plane, "trusted")["status"]["conditions"][0]["status"],
        "True"
    );
    // A deleted Registry leaves no reachability series behind (its alert would fire on).
    let untrusted = "coral_registry_reachable{registry=\"untrusted\"}";
    assert!(http_get(probe, "/metrics").contains(&format!("{untrusted} 0")));
    plane.kubectl_ok(&["delete", "registry", "untrusted"]);
    wait_until(
        "the deleted Registry's series gone",
        Duration::from_secs(30),
        || {
            let metrics = http_get(probe, "/metrics");
            metrics.contains("coral_registry_reachable{registry=\"trusted\"} 1")
                && !metrics.contains(untrusted)
        },
    );
}
