//! Placement: every Pod Coral mutated is bound by the real scheduler, to a node that holds what
//! it was steered to, for each stranding case of the default policies. When the ImageSet is
//! deleted while workloads still require its labels, its images retire (finalizer held,
//! `Retiring` condition) until forced, and what is then stranded is reported.

use super::*;

/// Where the Pods of `app` in `shop` were bound, once all of them are; panics with the
/// scheduler's message when one cannot be scheduled.
fn bound_nodes(plane: &ControlPlane, app: &str, replicas: usize) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pods: Value = serde_json::from_str(&plane.kubectl_ok(&[
            "get",
            "pods",
            "-n",
            "shop",
            "-l",
            &format!("app={app}"),
            "-o",
            "json",
        ]))
        .unwrap();
        let items = pods["items"].as_array().unwrap();
        let nodes: Vec<&str> = items
            .iter()
            .filter_map(|pod| pod["spec"]["nodeName"].as_str())
            .collect();
        if items.len() >= replicas && nodes.len() == items.len() {
            return nodes.into_iter().map(str::to_string).collect();
        }
        if Instant::now() > deadline {
            let events = plane.kubectl_ok(&[
                "get",
                "events",
                "-n",
                "shop",
                "--field-selector",
                "reason=FailedScheduling",
                "-o",
                "custom-columns=OBJECT:.involvedObject.name,MESSAGE:.message",
            ]);
            panic!("{app}: pods not all bound: {pods}\n{events}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The stored template's nodeSelector.
fn stored_selector(plane: &ControlPlane, app: &str) -> Value {
    let object: Value = serde_json::from_str(&plane.kubectl_ok(&[
        "get",
        "deployment",
        app,
        "-n",
        "shop",
        "-o",
        "json",
    ]))
    .unwrap();
    object["spec"]["template"]["spec"]
        .get("nodeSelector")
        .cloned()
        .unwrap_or(json!({}))
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn the_real_scheduler_binds_every_pod_coral_mutated() {
    let plane = injecting_control_plane();
    let image_set = json!({
        "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
        "metadata": {"name": "shop", "namespace": "shop"},
        "spec": {"images": ["nginx:1.27", "nginx:1.28", "redis:7.4", "busybox:1.36", "alpine:3.20"]},
    });
    let output = plane.kubectl_stdin(&["create"], &image_set);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The nodes of tests/data/placement/state.yaml, labelled as agents label them.
    let held = |images: &[&str], extra: Value| {
        let mut labels = extra;
        for image in images {
            labels[label(image)] = json!("available");
        }
        labels
    };
    plane.node(
        "web-a",
        held(&["nginx:1.27", "nginx:1.28"], json!({"pool": "web"})),
        json!([]),
        false,
    );
    plane.node(
        "web-b",
        held(&["redis:7.4"], json!({"pool": "web"})),
        json!([]),
        false,
    );
    plane.node("db-a", held(&[], json!({"pool": "db"})), json!([]), false);
    plane.node(
        "gpu-a",
        held(&["busybox:1.36"], json!({"pool": "gpu"})),
        json!([{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]),
        false,
    );
    plane.node(
        "old-a",
        held(&["alpine:3.20"], json!({"pool": "old"})),
        json!([]),
        true,
    );

    // The webhook and the controller, each under its own ServiceAccount, the webhook
    // registered as deploy/ registers it.
    let steering = Steering::start(
        &plane,
        &deployment("probe", &["nginx:1.27"], json!({})),
        |object| {
            object["spec"]["template"]["spec"]["nodeSelector"][label("nginx:1.27")] == "available"
        },
    );
    let controller_probes = steering.controller_probes;

    // Invalid ImageSets: the CRD schema refuses what it can say, Coral's validating webhook
    // the rest.
    let invalid = |name: &str, images: Value| {
        json!({"apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
               "metadata": {"name": name, "namespace": "shop"}, "spec": {"images": images}})
    };
    let output = plane.kubectl_stdin(&["create"], &invalid("empty", json!([])));
    let refusal = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && refusal.contains("spec.images"),
        "{refusal}"
    );
    // The webhook is registered with failurePolicy Ignore (as deploy/ has it): a call that
    // misses its 2 s timeout on a loaded machine lets the object through. Such an object is
    // deleted and the create tried again, at most three times; the refusal must come.
    let mut output = None;
    for attempt in 1..=3 {
        let created = plane.kubectl_stdin(
            &["create"],
            &invalid("twice", json!(["nginx", "docker.io/library/nginx:latest"])),
        );
        if !created.status.success() {
            output = Some(created);
            break;
        }
        eprintln!("attempt {attempt}: the API server let the ImageSet through (webhook ignored)");
        plane.kubectl_ok(&["delete", "imageset", "twice", "-n", "shop"]);
    }
    let output = output.expect("the validating webhook never refused the duplicate");
    let refusal = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success()
            && refusal.contains("denied the request")
            && refusal.contains("is the same image as spec.images[0]"),
        "{refusal}"
    );

    // Reinvocation: a second webhook, called after Coral's (configurations go by name), adds
    // an init container; the API server calls Coral again (reinvocationPolicy IfNeeded), and
    // Coral steers to that image too.
    let second = SecondWebhook::start();
    let add_init = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "zz-add-init"},
        "webhooks": [{
            "name": "add-init.test.coral.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": {"url": format!("https://localhost:{}/mutate", second.port),
                             "caBundle": base64::engine::general_purpose::STANDARD.encode(second.authority.pem())},
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop"}},
            "objectSelector": {"matchLabels": {"test.coral.dev/add-init": "nginx-1.28"}},
            "rules": [{"apiGroups": ["apps"], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["deployments"]}],
            "failurePolicy": "Fail", "timeoutSeconds": 10, "reinvocationPolicy": "Never",
        }],
    });
    let output = plane.kubectl_stdin(&["apply"], &add_init);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let required_pool_db = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["db"]}]},
    ]}}});
    let untainted: BTreeSet<String> = ["web-a", "web-b", "db-a"].map(String::from).into();
    let cases: Vec<(&str, Vec<&str>, Value, BTreeSet<String>)> = vec![
        // 1. Two images on different nodes: steered to one, still schedulable.
        (
            "apart",
            vec!["nginx:1.27", "redis:7.4"],
            json!({}),
            ["web-a", "web-b"].map(String::from).into(),
        ),
        // 2. The pod's own nodeSelector and required affinity keep it off the image's nodes.
        (
            "db-selector",
            vec!["nginx:1.27"],
            json!({"nodeSelector": {"pool": "db"}}),
            ["db-a".to_string()].into(),
        ),
        (
            "db-affinity",
            vec!["nginx:1.27"],
            json!({"affinity": required_pool_db}),
            ["db-a".to_string()].into(),
        ),
        // ... an image held only by a node whose taint it does not tolerate, or a cordoned one.
        (
            "tainted-only",
            vec!["busybox:1.36"],
            json!({}),
            untainted.clone(),
        ),
        (
            "cordoned-only",
            vec!["alpine:3.20"],
            json!({}),
            untainted.clone(),
        ),
        // 3. An updated image whose old key stays in the template.
        (
            "updated",
            vec!["nginx:1.28"],
            json!({"nodeSelector": {label("nginx:1.27"): "available", "pool": "web"}}),
            ["web-a".to_string()].into(),
        ),
        // Positive controls: a tolerated taint keeps the label; a node holding all gets all.
        (
            "tolerant",
            vec!["busybox:1.36"],
            json!({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]}),
            ["gpu-a".to_string()].into(),
        ),
        (
            "together",
            vec!["nginx:1.27", "nginx:1.28"],
            json!({}),
            ["web-a".to_string()].into(),
        ),
    ];
    let mut reinvoked = deployment("reinvoked", &["nginx:1.27"], json!({}));
    reinvoked["metadata"]["labels"] = json!({"test.coral.dev/add-init": "nginx-1.28"});
    let output = plane.kubectl_stdin(&["create"], &reinvoked);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for (app, images, pod_spec, _) in &cases {
        let output = plane.kubectl_stdin(&["create"], &deployment(app, images, pod_spec.clone()));
        assert!(
            output.status.success(),
            "{app}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    for (app, _, _, expected) in &cases {
        let nodes = bound_nodes(&plane, app, 2);
        assert!(
            nodes.is_subset(expected),
            "{app}: bound to {nodes:?}, expected within {expected:?}"
        );
    }
    assert_eq!(
        bound_nodes(&plane, "reinvoked", 2),
        ["web-a".to_string()].into()
    );
    assert_eq!(
        stored_selector(&plane, "reinvoked"),
        json!({label("nginx:1.27"): "available", label("nginx:1.28"): "available"}),
        "reinvoked after the second webhook added nginx:1.28"
    );
    drop(second);
    // What the webhook did, in the stored templates.
    assert_eq!(
        stored_selector(&plane, "tolerant"),
        json!({label("busybox:1.36"): "available"})
    );
    assert_eq!(
        stored_selector(&plane, "together"),
        json!({label("nginx:1.27"): "available", label("nginx:1.28"): "available"})
    );
    assert_eq!(
        stored_selector(&plane, "updated"),
        json!({"pool": "web", label("nginx:1.28"): "available"})
    );
    assert_eq!(
        stored_selector(&plane, "db-selector"),
        json!({"pool": "db"})
    );
    let apart = stored_selector(&plane, "apart");
    assert_eq!(
        apart.as_object().unwrap().len(),
        1,
        "steered to one of the two images: {apart}"
    );

    // A Pod, not a template, is judged the same way; the scheduler binds it too.
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bare", "namespace": "shop", "labels": {"app": "bare"}, "annotations": {"coral.dev/inject": "selectors,pull-policy"}},
        "spec": {"containers": [{"name": "a", "image": "nginx:1.27"}, {"name": "b", "image": "redis:7.4"}]},
    });
    let output = plane.kubectl_stdin(&["create"], &pod);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let nodes = bound_nodes(&plane, "bare", 1);
    assert!(
        nodes.is_subset(&["web-a", "web-b"].map(String::from).into()),
        "{nodes:?}"
    );

    // `coral audit` of the cluster, through the admin kubeconfig: nothing stranded.
    let (code, text) = audit(&plane, &[]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("no stranded workloads"), "{text}");

    // The controller has the ImageSet's status written; nothing is stranded. The printer
    // columns answer "is it there yet?".
    wait_until("the ImageSet's status", Duration::from_secs(30), || {
        image_set_status(&plane)["imageCount"] == 5
    });
    let table = plane.kubectl_ok(&["get", "imagesets", "-n", "shop"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["NAME", "IMAGES", "NODES", "COMPLETE", "READY", "AGE"],
        "{table}"
    );
    assert!(table.contains("shop   5"), "{table}");
    assert!(
        http_get(controller_probes, "/metrics")
            .contains("coral_stranded_workloads{kind=\"Deployment\"} 0")
    );

    // 4. The ImageSet deleted while workloads require its labels: its images are retiring,
    // the finalizer holds it, and the condition names the workloads.
    plane.kubectl_ok(&["delete", "imageset", "shop", "-n", "shop", "--wait=false"]);
    wait_until("the Retiring condition", Duration::from_secs(30), || {
        image_set_status(&plane)["conditions"]
            .as_array()
            .is_some_and(|c| {
                c.iter().any(|c| {
                    c["type"] == "Retiring"
                        && c["message"]
                            .as_str()
                            .unwrap_or("")
                            .contains("Deployment shop/together")
                })
            })
    });
    // An update of a template drops the keys of the images no longer managed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        plane.kubectl_ok(&[
            "annotate",
            "deployment",
            "together",
            "-n",
            "shop",
            "--overwrite",
            &format!("touched={}", deadline.elapsed().as_nanos()),
        ]);
        if stored_selector(&plane, "together") == json!({}) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the keys of unmanaged images stayed: {}",
            stored_selector(&plane, "together")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Forced: the retiring images go, the controller removes the labels (no agent runs here;
    // --cleanup-timeout 1s) and releases the finalizer; what still requires them is stranded.
    plane.kubectl_ok(&[
        "annotate",
        "imageset",
        "shop",
        "-n",
        "shop",
        "coral.dev/force-remove=true",
    ]);
    wait_until("the ImageSet to go", Duration::from_secs(30), || {
        !plane
            .kubectl(&["get", "imageset", "shop", "-n", "shop"])
            .status
            .success()
    });
    let web_a: Value =
        serde_json::from_str(&plane.kubectl_ok(&["get", "node", "web-a", "-o", "json"])).unwrap();
    assert!(
        web_a["metadata"]["labels"]
            .get(label("nginx:1.27"))
            .is_none(),
        "{}",
        web_a["metadata"]["labels"]
    );
    wait_until(
        "a Stranded Event on a workload that still requires a removed label",
        Duration::from_secs(30),
        || {
            !plane
                .kubectl_ok(&[
                    "get",
                    "events",
                    "-n",
                    "shop",
                    "--field-selector",
                    "reason=Stranded,involvedObject.name=tolerant",
                    "-o",
                    "name",
                ])
                .trim()
                .is_empty()
        },
    );
    assert!(
        !http_get(controller_probes, "/metrics")
            .contains("coral_stranded_workloads{kind=\"Deployment\"} 0")
    );
    // `coral audit` finds the same, with the reason: the image no ImageSet manages any more.
    let (code, text) = audit(&plane, &["-o", "json"]);
    assert_eq!(code, Some(1), "{text}");
    let found: Value = serde_json::from_str(&text).unwrap();
    let tolerant = found
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "tolerant")
        .unwrap_or_else(|| panic!("{found}"));
    assert_eq!(tolerant["kind"], "Deployment");
    assert_eq!(tolerant["images"][0]["image"], Value::Null, "{tolerant}");
    assert_eq!(tolerant["nodes"], 0);

    // failurePolicy Ignore: with the webhook gone, workloads are admitted unchanged.
    drop(steering);
    let output = plane.kubectl_stdin(
        &["create"],
        &deployment("unanswered", &["nginx:1.28"], json!({})),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stored_selector(&plane, "unanswered"), json!({}));
}

/// A second mutating webhook, in this process: it adds an init container running
/// `nginx:1.28` to the Deployments it is sent, over the webhook's own TLS and HTTP stack.
struct SecondWebhook {
    port: u16,
    authority: support::Authority,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

impl SecondWebhook {
    fn start() -> Self {
        use axum::body::Bytes;
        use coral::webhook::admission::Review;

        let dir = tempfile::tempdir().unwrap();
        let authority = support::Authority::new();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        authority.issue(&cert, &key);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let tls =
            std::sync::Arc::new(coral::webhook::tls::ReloadingCert::load(&cert, &key).unwrap());
        let tls =
            tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls.server_config().unwrap()));
        let app = axum::Router::new().route(
            "/mutate",
            axum::routing::post(|body: Bytes| async move {
                let review = Review::parse(&body).unwrap();
                let patch = json!([{"op": "add", "path": "/spec/template/spec/initContainers",
                                    "value": [{"name": "setup", "image": "nginx:1.28"}]}]);
                axum::Json(json!({
                    "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                    "response": {
                        "uid": review.uid, "allowed": true, "patchType": "JSONPatch",
                        "patch": base64::engine::general_purpose::STANDARD.encode(patch.to_string()),
                    },
                }))
            }),
        );
        runtime.spawn(coral::webhook::accept_https(
            listener,
            tls,
            app,
            Duration::from_secs(5),
            std::future::pending::<()>(),
        ));
        Self {
            port,
            authority,
            runtime: Some(runtime),
            _dir: dir,
        }
    }
}

impl Drop for SecondWebhook {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// `coral audit` of the cluster as the admin; its exit code and standard output.
fn audit(plane: &ControlPlane, args: &[&str]) -> (Option<i32>, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_coral"))
        .arg("audit")
        .args(args)
        .env("KUBECONFIG", &plane.kubeconfig)
        .env("KUBERNETES_SERVICE_HOST", "")
        .output()
        .unwrap();
    (
        output.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}
