//! The controller and its lease: a standby takes over when the leader dies, and the whole
//! system converges after each component is killed.

use super::*;

/// Which controller replica holds the Lease (empty: none, or the API server does not answer).
fn lease_holder(plane: &ControlPlane) -> String {
    let output = plane.kubectl(&[
        "get",
        "lease",
        "coral-controller",
        "-n",
        "coral-system",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn a_standby_controller_takes_over_when_the_leader_dies() {
    let plane = coral_control_plane(&[]);
    let image_set_with_secret = |name: &str, secret: &str| {
        plane.kubectl_ok(&[
            "create",
            "secret",
            "docker-registry",
            secret,
            "-n",
            "shop",
            "--docker-server=registry.example.com",
            "--docker-username=u",
            "--docker-password=p",
        ]);
        let set = json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"images": ["registry.example.com/app:1"], "imagePullSecrets": [{"name": secret}]},
        });
        assert!(plane.kubectl_stdin(&["create"], &set).status.success());
    };
    let holder = || lease_holder(&plane);
    let mut first = Some(start_controller(&plane, "controller-0"));
    wait_until("controller-0 to lead", Duration::from_secs(30), || {
        holder() == "controller-0"
    });
    let _second = start_controller(&plane, "controller-1");

    // The leader copies the pull secret an ImageSet references into Coral's namespace.
    image_set_with_secret("web", "registry-web");
    let copy = coral::controller::secrets::copy_name("shop", "registry-web");
    let secret = wait_for(
        &plane,
        "the pull-secret copy",
        &["get", "secret", &copy, "-n", "coral-system", "-o", "json"],
    );
    assert_eq!(secret["type"], "kubernetes.io/dockerconfigjson");
    assert_eq!(
        secret["metadata"]["annotations"]["coral.dev/source"],
        "shop/registry-web"
    );

    // The leader dies: the standby takes the Lease once it expires, and carries on.
    drop(first.take());
    wait_until(
        "controller-1 to take the Lease",
        Duration::from_secs(30),
        || holder() == "controller-1",
    );
    image_set_with_secret("api", "registry-api");
    let copy = coral::controller::secrets::copy_name("shop", "registry-api");
    wait_for(
        &plane,
        "the new leader's pull-secret copy",
        &["get", "secret", &copy, "-n", "coral-system", "-o", "json"],
    );
    wait_until(
        "the new leader's ImageSet status",
        Duration::from_secs(30),
        || {
            let output = plane.kubectl(&[
                "get",
                "imageset",
                "api",
                "-n",
                "shop",
                "-o",
                "jsonpath={.status.imageCount}",
            ]);
            output.stdout == b"1"
        },
    );
}

/// Coral running whole against the real control plane, and what the test has seen of it.
struct System {
    plane: ControlPlane,
    registry: runtime::Registry,
    nodes: Vec<AgentNode>,
    controllers: Vec<(String, Option<support::process::Daemon>)>,
    webhook: Option<Webhook>,
    webhook_kubeconfig: std::path::PathBuf,
    /// The images the ImageSet asks for, in order.
    wanted: Vec<String>,
    /// The policy version the webhook must end up answering with.
    policies: String,
    /// Per node, the image labels seen once the system converged: none may go.
    held: Vec<BTreeSet<String>>,
    tokio: tokio::runtime::Runtime,
    answered: usize,
    unanswered: usize,
}

/// What the probe asks the webhook: a Pod of the two first images, steering asked for.
fn probe_review(images: &[String]) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "probe", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "name": "probe", "operation": "CREATE",
            "userInfo": {"username": "admin"}, "dryRun": false,
            "object": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "probe", "namespace": "shop",
                             "annotations": {"coral.dev/inject": "selectors"}},
                "spec": {"containers": images.iter().enumerate()
                    .map(|(i, image)| json!({"name": format!("c{i}"), "image": image}))
                    .collect::<Vec<_>>()}},
        }
    })
}

impl System {
    fn set_images(&mut self, images: &[String]) {
        self.wanted = images.to_vec();
        let patch = json!({"spec": {"images": images}}).to_string();
        self.plane.kubectl_ok(&[
            "patch",
            "imageset",
            "shop",
            "-n",
            "shop",
            "--type=merge",
            "-p",
            &patch,
        ]);
    }

    fn start_webhook(&mut self) {
        let webhook = Webhook::start_with_kubeconfig(
            &self.webhook_kubeconfig,
            &[
                "--policies-configmap",
                "coral-system/coral-policies",
                "--debounce-ms",
                "100",
            ],
        );
        self.webhook = Some(webhook);
    }

    fn policy_configmap(&self, version: &str) {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir("policies").unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
        std::fs::write(
            dir.path().join("version.rego"),
            format!("package coral.mutate\n\nwarn contains \"policies {version}\" if true\n"),
        )
        .unwrap();
        let from = format!("--from-file={}", dir.path().display());
        let manifest = self.plane.kubectl_ok(&[
            "create",
            "configmap",
            "coral-policies",
            "-n",
            "coral-system",
            &from,
            "--dry-run=client",
            "-o",
            "json",
        ]);
        let configmap: Value = serde_json::from_str(&manifest).unwrap();
        let output = self.plane.kubectl_stdin(&["apply"], &configmap);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The image labels of each node; `None` while the API server does not answer.
    fn node_labels(&self) -> Option<Vec<BTreeSet<String>>> {
        let output = self.plane.kubectl(&["get", "nodes", "-o", "json"]);
        let list: Value = serde_json::from_slice(&output.stdout).ok()?;
        let items = list["items"].as_array()?;
        self.nodes
            .iter()
            .map(|node| {
                let item = items.iter().find(|i| i["metadata"]["name"] == node.name)?;
                let labels = item["metadata"]["labels"].as_object()?;
                Some(
                    labels
                        .iter()
                        .filter(|(key, value)| {
                            key.starts_with("image.coral.dev/") && *value == "available"
                        })
                        .map(|(key, _)| key.clone())
                        .collect(),
                )
            })
            .collect()
    }

    /// One look at the system while it converges: no label it held went, and the webhook,
    /// when it answers, steers only to images some node holds.
    fn observe(&mut self) {
        let labels = self.node_labels();
        if let Some(labels) = &labels {
            for ((node, held), now) in self.nodes.iter().zip(&self.held).zip(labels) {
                let lost: Vec<_> = held.difference(now).collect();
                assert!(
                    lost.is_empty(),
                    "{} lost {lost:?}; its labels: {}",
                    node.name,
                    self.plane
                        .kubectl_ok(&["get", "node", &node.name, "--show-labels"])
                );
            }
        }
        let Some(webhook) = &self.webhook else {
            self.unanswered += 1;
            return;
        };
        let body = serde_json::to_vec(&probe_review(&self.wanted[..2])).unwrap();
        let answer = self.tokio.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(2),
                support::post(webhook, "/mutate", &body),
            )
            .await
        });
        let Ok((200, text)) = answer else {
            self.unanswered += 1;
            return;
        };
        self.answered += 1;
        let review: Value = serde_json::from_str(&text).unwrap();
        let response = &review["response"];
        assert_eq!(response["allowed"], true, "{response}");
        let Some(patch) = response["patch"].as_str() else {
            return;
        };
        let patch: Vec<Value> = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(patch)
                .unwrap(),
        )
        .unwrap();
        // The labels as they are now: they only come, so one a node lacks now, it lacked when
        // the webhook answered.
        let Some(labels) = self.node_labels() else {
            return;
        };
        for operation in &patch {
            let mut keys: Vec<String> = Vec::new();
            let path = operation["path"].as_str().unwrap_or_default();
            if path == "/spec/nodeSelector" {
                keys.extend(
                    operation["value"]
                        .as_object()
                        .into_iter()
                        .flat_map(|m| m.keys().cloned()),
                );
            } else if let Some(key) = path.strip_prefix("/spec/nodeSelector/") {
                keys.push(key.replace("~1", "/").replace("~0", "~"));
            }
            for key in keys.iter().filter(|k| k.starts_with("image.coral.dev/")) {
                assert!(
                    labels.iter().any(|held| held.contains(key)),
                    "the webhook steered to {key}, which no node holds: {response}"
                );
            }
        }
    }

    /// Whether every part agrees on the wanted images; the first disagreement otherwise.
    fn converged(&mut self) -> Result<(), String> {
        let keys: BTreeSet<String> = self.wanted.iter().map(|image| label(image)).collect();
        let labels = self.node_labels().ok_or("the API server does not answer")?;
        for (node, held) in self.nodes.iter().zip(&labels) {
            if *held != keys {
                return Err(format!("{} is labelled {held:?}", node.name));
            }
            let output = self
                .plane
                .kubectl(&["get", "nodeimage", &node.name, "-o", "json"]);
            let status: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
            if status["status"]["available"] != self.wanted.len() {
                return Err(format!("NodeImage {}: {}", node.name, status["status"]));
            }
            let address = node.containerd.address();
            let images = self
                .tokio
                .block_on(async {
                    let cri = coral::agent::cri::Cri::new(&address).unwrap();
                    cri.list_images().await
                })
                .map_err(|e| e.to_string())?;
            for image in &self.wanted {
                if !images.iter().any(|held| held.repo_tags.contains(image)) {
                    return Err(format!("containerd of {} lacks {image}", node.name));
                }
            }
        }
        let status = &image_set_status(&self.plane);
        let ready = status["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready").cloned())
            .unwrap_or(Value::Null);
        let all = status["images"].as_array().is_some_and(|images| {
            images.len() == self.wanted.len()
                && images
                    .iter()
                    .all(|i| i["nodesAvailable"] == 3 && i["nodesTargeted"] == 3)
        });
        if status["imageCount"] != self.wanted.len() || !all || ready["status"] != "True" {
            return Err(format!("ImageSet status {status}"));
        }
        if let Some(webhook) = &self.webhook {
            let body = serde_json::to_vec(&probe_review(&self.wanted[..2])).unwrap();
            let answer = self
                .tokio
                .block_on(support::post(webhook, "/mutate", &body));
            let wanted = format!("policies {}", self.policies);
            if !answer.1.contains(&wanted) {
                return Err(format!(
                    "the webhook does not answer with {wanted}: {}",
                    answer.1
                ));
            }
        } else {
            return Err("no webhook".into());
        }
        self.held = labels;
        Ok(())
    }

    /// Waits until the system converges, watching it; prints and returns how long it took.
    fn settle(&mut self, fault: &str, since: Instant) -> Duration {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last = String::new();
        loop {
            self.observe();
            match self.converged() {
                Ok(()) => break,
                Err(why) if Instant::now() > deadline => panic!("{fault}: not converged: {why}"),
                Err(why) => {
                    if why != last {
                        let short: String = why.chars().take(160).collect();
                        println!("  {:.1} s: {short}", since.elapsed().as_secs_f64());
                        last = why;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        let took = since.elapsed();
        println!(
            "fault: {fault}: converged {:.1} s after it",
            took.as_secs_f64()
        );
        took
    }
}

#[test]
#[ignore = "needs the control plane built by scripts/control-plane.sh (CORAL_CONTROL_PLANE_BIN); scripts/test.sh runs it"]
fn the_whole_system_converges_after_each_component_is_killed() {
    let plane = injecting_control_plane();
    let registry = runtime::Registry::start(None);
    // app-3 is large enough (30 MB of random bytes) that killing its agent catches the pull.
    let mut random = String::with_capacity(60 << 20);
    for _ in 0..(30 << 20) / 8 {
        random.push_str(&format!("{:016x}", fastrand::u64(..)));
    }
    let images: Vec<String> = (1..=6)
        .map(|i| {
            let content = if i == 3 {
                random.clone()
            } else {
                format!("app {i}")
            };
            registry.push(&format!("shop/app-{i}"), "1.0", &content)
        })
        .collect();
    drop(random);

    let agent_kubeconfig = plane.service_account_kubeconfig("coral-system", "coral-agent");
    let nodes = (0..3)
        .map(|i| {
            let name = format!("node-{i}");
            plane.node(&name, json!({"pool": "web"}), json!([]), false);
            AgentNode::new(&name, &agent_kubeconfig)
        })
        .collect();
    let image_set = json!({
        "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
        "metadata": {"name": "shop", "namespace": "shop"},
        "spec": {"images": images[..2], "nodeSelector": {"matchLabels": {"pool": "web"}}},
    });
    assert!(
        plane
            .kubectl_stdin(&["create"], &image_set)
            .status
            .success()
    );
    let webhook_kubeconfig = plane.service_account_kubeconfig("coral-system", "coral-webhook");
    let mut system = System {
        controllers: ["controller-0", "controller-1"]
            .iter()
            .map(|name| (name.to_string(), Some(start_controller(&plane, name))))
            .collect(),
        plane,
        registry,
        nodes,
        webhook: None,
        webhook_kubeconfig,
        wanted: images[..2].to_vec(),
        policies: "v1".into(),
        held: vec![BTreeSet::new(); 3],
        tokio: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        answered: 0,
        unanswered: 0,
    };
    system.policy_configmap("v1");
    for node in &mut system.nodes {
        node.start_agent();
    }
    system.start_webhook();
    let started = Instant::now();
    system.settle("none (start)", started);
    let mut times = Vec::new();

    // An agent killed while it pulls a 30 MB image, and started again.
    system.set_images(&images[..3]);
    let fault = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    system.nodes[0].kill_agent();
    std::thread::sleep(Duration::from_secs(1));
    system.observe();
    system.nodes[0].start_agent();
    times.push(("agent mid-pull", system.settle("agent mid-pull", fault)));

    // The leading controller killed as it reconciles a change; the standby takes the Lease.
    let leader = lease_holder(&system.plane);
    system.set_images(&images[..4]);
    let fault = Instant::now();
    let index = system
        .controllers
        .iter()
        .position(|(name, _)| *name == leader)
        .unwrap();
    system.controllers[index].1 = None;
    times.push((
        "controller mid-reconcile",
        system.settle("controller mid-reconcile, the Lease taken over", fault),
    ));
    let holder = lease_holder(&system.plane);
    assert_ne!(holder, leader, "the standby holds the Lease");
    let name = system.controllers[index].0.clone();
    system.controllers[index].1 = Some(start_controller(&system.plane, &name));

    // The webhook killed while it reloads a new policy ConfigMap, and started again.
    let fault = Instant::now();
    system.policies = "v2".into();
    system.policy_configmap("v2");
    std::thread::sleep(Duration::from_millis(150));
    system.webhook = None;
    system.observe();
    system.start_webhook();
    times.push((
        "webhook mid-reload",
        system.settle("webhook during a policy reload", fault),
    ));

    // The registry down while the agents pull a new image.
    system.set_images(&images[..5]);
    let fault = Instant::now();
    system.registry.stop();
    for _ in 0..10 {
        system.observe();
        std::thread::sleep(Duration::from_millis(200));
    }
    system.registry.resume();
    times.push((
        "registry mid-pull",
        system.settle("registry during pulls", fault),
    ));

    // A node's containerd killed and started again: its images stay, and so do its labels.
    let fault = Instant::now();
    system.nodes[1].containerd.stop();
    for _ in 0..10 {
        system.observe();
        std::thread::sleep(Duration::from_millis(200));
    }
    system.nodes[1].containerd.resume();
    times.push(("containerd", system.settle("containerd", fault)));

    // The API server killed: the webhook answers from what it knows; then a change.
    let fault = Instant::now();
    system.plane.kill("kube-apiserver");
    for _ in 0..10 {
        system.observe();
        std::thread::sleep(Duration::from_millis(200));
    }
    system.plane.start_again("kube-apiserver");
    system.set_images(&images[..6]);
    times.push(("API server", system.settle("API server", fault)));

    // Nothing pulled twice: each node pulled each image once, whatever was killed.
    for node in &system.nodes {
        let pulls = node.pulls_before + node.pulls();
        assert!(
            pulls <= images.len() as u64,
            "{} pulled {pulls} times for {} images",
            node.name,
            images.len()
        );
    }
    println!(
        "faults: {} injected, convergence {}; webhook probes: {} answered (every one right), {} while it was down",
        times.len(),
        times
            .iter()
            .map(|(what, took)| format!("{what} {:.1} s", took.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
        system.answered,
        system.unanswered,
    );
}
