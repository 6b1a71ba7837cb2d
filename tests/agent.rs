//! The pull engine and `coral prefetch` against real containerd (CRI plugin) and a real
//! registry, both started by the tests in temp directories, with images built by umoci and
//! pushed by skopeo.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test helpers panic on setup failures

#[path = "support/runtime.rs"]
#[allow(dead_code)]
mod runtime;

#[path = "support/api_server.rs"]
#[allow(dead_code)]
mod api_server;

#[path = "support/process.rs"]
#[allow(dead_code)]
mod process;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use coral::agent::cri::Cri;
use coral::agent::engine::{Engine, EngineOptions, Kept};
use coral::agent::record::node_image_status;
use coral::agent::retention::RetentionPolicy;
use coral::agent::tracker::RetryPolicy;
use coral::api::ImageState;
use coral::credentials::Keyring;
use coral::image::ImageReference;
use coral::metrics::AgentMetrics;
use k8s_openapi::api::core::v1::Secret;

use process::Kill;
use runtime::{Containerd, Registry, docker_config};

const WAIT: Duration = Duration::from_secs(60);

fn reference(text: &str) -> ImageReference {
    ImageReference::parse(text).unwrap()
}

fn fast_retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
        max_attempts,
    }
}

fn engine(containerd: &Containerd, retry: RetryPolicy) -> Arc<Engine> {
    Engine::new(
        Cri::new(&containerd.address()).unwrap(),
        EngineOptions {
            max_concurrent_pulls: 2,
            retry,
            resync: Duration::from_millis(200),
            image_fs_budget: None,
            pin_images: false,
        },
        AgentMetrics::new(),
    )
}

/// Waits until the engine's record of `image` satisfies `check`.
async fn wait_for(
    engine: &Engine,
    image: &str,
    what: &str,
    check: impl Fn(&coral::agent::tracker::ImageRecord) -> bool,
) {
    let image = reference(image);
    let deadline = Instant::now() + WAIT;
    loop {
        let tracker = engine.snapshot();
        let record = tracker.get(&image).expect("wanted");
        if check(record) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{image}: never {what}; last record: {record:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(engine: &Engine, sample: &str) -> f64 {
    engine
        .metrics()
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn runtime_has(containerd: &Containerd, image: &str) -> bool {
    Cri::new(&containerd.address())
        .unwrap()
        .image_status(image)
        .await
        .unwrap()
        .is_some()
}

fn prefetch(containerd: &Containerd, sets: &str, extra: &[&str]) -> (bool, String) {
    containerd.prefetch_sets(sets, extra)
}

fn image_sets(sets: &[(&str, &str, &[&str])]) -> String {
    sets.iter()
        .map(|(name, selector, images)| {
            format!(
                "apiVersion: coral.dev/v1alpha1\nkind: ImageSet\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  nodeSelector: {selector}\n  images: {images:?}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

#[test]
fn prefetch_pulls_what_the_node_labels_select_then_finds_it_present() {
    let containerd = Containerd::start();
    let registry = Registry::start(None);
    let app = registry.push("shop/app", "1.0", "app");
    let worker = registry.push("shop/worker", "2.0", "worker");
    let batch = registry.push("batch/job", "1", "job");
    let sets = image_sets(&[
        ("web", "{matchLabels: {pool: web}}", &[&app, &worker]),
        ("batch", "{matchLabels: {pool: batch}}", &[&batch]),
    ]);

    let (ok, output) = prefetch(&containerd, &sets, &["--node-labels", "pool=web"]);
    assert!(ok, "{output}");
    assert!(output.contains(&format!("pulled     {app}")), "{output}");
    assert!(output.contains(&format!("pulled     {worker}")), "{output}");
    assert!(!output.contains(&batch), "not selected: {output}");
    assert!(output.contains("2 of 2 image(s) available"), "{output}");
    let table = output.lines().find(|l| l.starts_with(&app)).unwrap();
    assert!(table.contains("available  sha256:"), "{table}");

    // A second run finds both present and pulls nothing.
    let (ok, output) = prefetch(&containerd, &sets, &["--node-labels", "pool=web"]);
    assert!(ok, "{output}");
    assert!(output.contains(&format!("present    {app}")), "{output}");
    assert!(output.contains(&format!("present    {worker}")), "{output}");
    assert!(!output.contains("pulled "), "{output}");

    // Without labels only ImageSets with an empty selector apply: none here.
    let (ok, output) = prefetch(&containerd, &sets, &[]);
    assert!(ok, "{output}");
    assert!(output.contains("nothing to pull"), "{output}");
}

#[test]
fn prefetch_uses_docker_config_credentials_and_names_a_refused_password() {
    let containerd = Containerd::start();
    let registry = Registry::start(Some(("coral", "s3cret")));
    let private = registry.push("team/private", "1.0", "private");
    let sets = image_sets(&[("private", "{}", &[&private])]);
    let dir = tempfile::tempdir().unwrap();

    let wrong = dir.path().join("wrong.json");
    std::fs::write(&wrong, docker_config(&registry.host(), "coral", "nope")).unwrap();
    let (ok, output) = prefetch(
        &containerd,
        &sets,
        &[
            "--docker-config",
            wrong.to_str().unwrap(),
            "--max-attempts",
            "1",
        ],
    );
    assert!(!ok, "a refused password fails: {output}");
    assert!(output.contains("401 Unauthorized"), "{output}");
    assert!(
        output.contains(&format!("credentials tried: {}", registry.host())),
        "{output}"
    );
    assert!(output.contains("0 of 1 image(s) available"), "{output}");

    let right = dir.path().join("right.json");
    std::fs::write(&right, docker_config(&registry.host(), "coral", "s3cret")).unwrap();
    let (ok, output) = prefetch(
        &containerd,
        &sets,
        &["--docker-config", right.to_str().unwrap()],
    );
    assert!(ok, "{output}");
    assert!(
        output.contains(&format!("pulled     {private}")),
        "{output}"
    );
}

#[test]
fn prefetch_fails_a_missing_tag_after_its_attempts_with_backoff() {
    let containerd = Containerd::start();
    let registry = Registry::start(None);
    let missing = format!("{}/shop/app:missing", registry.host());
    let sets = image_sets(&[("web", "{}", &[&missing])]);
    let started = Instant::now();
    let (ok, output) = prefetch(
        &containerd,
        &sets,
        &[
            "--max-attempts",
            "3",
            "--initial-backoff",
            "200ms",
            "--max-backoff",
            "5s",
        ],
    );
    let elapsed = started.elapsed();
    assert!(!ok, "{output}");
    assert!(
        output.contains(&format!(
            "retrying   {missing} (attempt 1 of 3 failed: CRI PullImage failed (not_found)"
        )),
        "{output}"
    );
    assert!(
        output.contains(&format!("retrying   {missing} (attempt 2 of 3")),
        "{output}"
    );
    assert!(
        output.contains(&format!("failed     {missing} after 3 attempt(s)")),
        "{output}"
    );
    // Backoff of about 200 ms then 400 ms (±20%) between the three attempts.
    assert!(elapsed >= Duration::from_millis(480), "{elapsed:?}");
}

#[test]
fn prefetch_explains_an_unreachable_runtime_and_bad_image_sets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sets.yaml");
    std::fs::write(&file, image_sets(&[("web", "{}", &["nginx:1.27"])])).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_coral"))
        .args(["prefetch", "-f"])
        .arg(&file)
        .args(["--cri-socket", "unix:///nonexistent/containerd.sock"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr
            .contains("cannot reach the container runtime at unix:///nonexistent/containerd.sock"),
        "{stderr}"
    );

    std::fs::write(
        &file,
        image_sets(&[("web", "{}", &["nginx:1.27", "docker.io/library/nginx:1.27"])]),
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_coral"))
        .args(["prefetch", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("ImageSet web: spec.images[1]"), "{stderr}");
    assert!(
        stderr.contains("is the same image as spec.images[0]"),
        "{stderr}"
    );
}

#[tokio::test]
async fn engine_pulls_with_a_dockerconfigjson_secret_trying_matching_keys_in_order() {
    let containerd = Containerd::start();
    let registry = Registry::start(Some(("coral", "s3cret")));
    let private = registry.push("team/private", "1.0", "private");
    // The more specific key comes first and is refused; the host-wide key is tried next.
    let auth = |user: &str, password: &str| {
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    };
    let config = serde_json::json!({"auths": {
        registry.host(): {"auth": auth("coral", "s3cret")},
        format!("{}/team", registry.host()): {"auth": auth("coral", "stale")},
    }});
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "pull", "namespace": "shop"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(config.to_string())},
    }))
    .unwrap();
    let mut keyring = Keyring::new();
    keyring.add_secret(&secret).unwrap();
    let engine = engine(&containerd, fast_retry(3));
    engine.set_wanted([(reference(&private), Arc::new(keyring))]);
    let runner = tokio::spawn(engine.clone().run());
    wait_for(&engine, &private, "available", |r| {
        r.state == ImageState::Available
    })
    .await;
    let record = engine
        .snapshot()
        .get(&reference(&private))
        .cloned()
        .unwrap();
    let held = record.held.unwrap();
    assert!(held.digest.unwrap().starts_with("sha256:"));
    assert!(held.size > 0);
    assert_eq!(
        metric(&engine, "coral_agent_pulls_total{result=\"success\"}"),
        1.0
    );
    runner.abort();
}

#[tokio::test]
async fn engine_rides_out_a_registry_outage() {
    let containerd = Containerd::start();
    let mut registry = Registry::start(None);
    let app = registry.push("shop/app", "1.0", "app");
    registry.stop();
    let engine = engine(&containerd, fast_retry(100));
    engine.set_wanted([(reference(&app), Arc::new(Keyring::new()))]);
    let runner = tokio::spawn(engine.clone().run());
    wait_for(&engine, &app, "failing while the registry is down", |r| {
        r.attempts >= 2
    })
    .await;
    let record = engine.snapshot().get(&reference(&app)).cloned().unwrap();
    assert!(
        record
            .last_error
            .as_deref()
            .unwrap()
            .contains("connection refused"),
        "{record:?}"
    );
    registry.resume();
    wait_for(&engine, &app, "available once the registry is back", |r| {
        r.state == ImageState::Available
    })
    .await;
    runner.abort();
}

#[tokio::test]
async fn engine_survives_a_containerd_restart() {
    let mut containerd = Containerd::start();
    let registry = Registry::start(None);
    let first = registry.push("shop/first", "1", "first");
    let second = registry.push("shop/second", "1", "second");
    let engine = engine(&containerd, fast_retry(3));
    println!("runtime: {:?}", engine.connect().await);
    engine.set_wanted([(reference(&first), Arc::new(Keyring::new()))]);
    let runner = tokio::spawn(engine.clone().run());
    wait_for(&engine, &first, "available", |r| {
        r.state == ImageState::Available
    })
    .await;

    containerd.stop();
    let deadline = Instant::now() + WAIT;
    while engine.runtime_up() {
        assert!(
            Instant::now() < deadline,
            "the engine never noticed the runtime going away"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Wanted while the runtime is away: the engine keeps its state and waits.
    engine.set_wanted([
        (reference(&first), Arc::new(Keyring::new())),
        (reference(&second), Arc::new(Keyring::new())),
    ]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tracker = engine.snapshot();
    assert_eq!(
        tracker.get(&reference(&first)).unwrap().state,
        ImageState::Available,
        "state kept while the runtime is away"
    );
    assert!(
        metric(
            &engine,
            "coral_agent_cri_errors_total{code=\"unavailable\",operation=\"ListImages\"}"
        ) >= 1.0
    );

    containerd.resume();
    wait_for(&engine, &second, "available after the restart", |r| {
        r.state == ImageState::Available
    })
    .await;
    assert!(engine.runtime_up());
    assert_eq!(
        engine.snapshot().get(&reference(&second)).unwrap().attempts,
        0,
        "the outage cost no attempt"
    );
    runner.abort();
}

#[tokio::test]
async fn engine_repulls_an_image_removed_behind_its_back_once() {
    let containerd = Containerd::start();
    let registry = Registry::start(None);
    let app = registry.push("shop/app", "1.0", "app");
    let engine = engine(&containerd, fast_retry(3));
    engine.set_wanted([(reference(&app), Arc::new(Keyring::new()))]);
    let runner = tokio::spawn(engine.clone().run());
    wait_for(&engine, &app, "available", |r| {
        r.state == ImageState::Available
    })
    .await;

    Cri::new(&containerd.address())
        .unwrap()
        .remove(&app)
        .await
        .unwrap();
    wait_for(&engine, &app, "pulled again", |r| {
        r.pulls == 2 && r.state == ImageState::Available
    })
    .await;
    assert_eq!(metric(&engine, "coral_agent_vanished_images_total"), 1.0);
    // Several resync periods later: no further pulls.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(engine.snapshot().get(&reference(&app)).unwrap().pulls, 2);
    assert_eq!(
        metric(&engine, "coral_agent_pulls_total{result=\"success\"}"),
        2.0
    );
    assert!(runtime_has(&containerd, &app).await);
    runner.abort();
}

#[tokio::test]
async fn unwanted_images_go_after_their_grace_period_unless_a_wanted_image_shares_them() {
    let containerd = Containerd::start();
    let registry = Registry::start(None);
    let keep = registry.push("shop/keep", "1", "keep");
    let drop_ = registry.push("shop/drop", "1", "drop");
    let same = registry.copy(&keep, "shop/same", "1");
    let engine = engine(&containerd, fast_retry(3));
    let keyring = Arc::new(Keyring::new());
    engine.set_wanted([
        (reference(&keep), keyring.clone()),
        (reference(&drop_), keyring.clone()),
        (reference(&same), keyring.clone()),
    ]);
    let runner = tokio::spawn(engine.clone().run());
    for image in [&keep, &drop_, &same] {
        wait_for(&engine, image, "available", |r| {
            r.state == ImageState::Available
        })
        .await;
    }

    // No longer wanted: within the grace period the images stay on the runtime.
    let grace = RetentionPolicy {
        grace: Some(Duration::from_secs(2)),
        high_watermark: None,
        low_watermark: None,
    };
    let removed = engine.set_wanted([(reference(&keep), keyring.clone())]);
    assert_eq!(removed.len(), 2);
    assert!(engine.retain(&grace).await.unwrap().is_empty());
    assert!(runtime_has(&containerd, &drop_).await);
    assert_eq!(metric(&engine, "coral_agent_unwanted_images"), 2.0);
    let status = node_image_status(&engine.snapshot(), None, None, None);
    assert_eq!(status.unwanted.len(), 2, "{status:?}");
    // Never removed without a grace period or a watermark.
    assert!(
        engine
            .retain(&RetentionPolicy::KEEP)
            .await
            .unwrap()
            .is_empty()
    );

    // Past it: `drop` goes; `same` has the content of the wanted `keep` and stays.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kept = engine.retain(&grace).await.unwrap();
    assert!(!runtime_has(&containerd, &drop_).await);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].0, reference(&same));
    assert!(matches!(kept[0].1, Kept::SharedWithWanted(_)));
    assert!(runtime_has(&containerd, &keep).await);
    assert_eq!(
        metric(
            &engine,
            "coral_agent_removed_images_total{reason=\"grace\"}"
        ),
        1.0
    );
    assert_eq!(metric(&engine, "coral_agent_unwanted_images"), 1.0);
    // The NodeImage records the removal and why `same` stays.
    let status = node_image_status(&engine.snapshot(), None, None, None);
    assert_eq!(status.removals.len(), 1);
    assert_eq!(status.removals[0].image, reference(&drop_).to_string());
    assert_eq!(status.removals[0].reason, "grace");
    assert!(
        status.removals[0]
            .digest
            .as_deref()
            .is_some_and(|d| d.starts_with("sha256:"))
    );
    assert_eq!(status.unwanted.len(), 1);
    assert!(
        status.unwanted[0]
            .kept
            .as_deref()
            .is_some_and(|k| k.contains("same content")),
        "{status:?}"
    );

    // Wanted again, then not: a new grace period.
    engine.set_wanted([
        (reference(&keep), keyring.clone()),
        (reference(&same), keyring.clone()),
    ]);
    assert_eq!(metric(&engine, "coral_agent_unwanted_images"), 1.0);
    engine.retain(&grace).await.unwrap();
    assert_eq!(metric(&engine, "coral_agent_unwanted_images"), 0.0);
    runner.abort();
}

#[tokio::test]
async fn over_the_high_watermark_the_least_recently_wanted_unwanted_images_go_first() {
    let containerd = Containerd::start();
    let registry = Registry::start(None);
    // Three images of about 1 MiB each, unlike each other.
    let mut rng = fastrand::Rng::with_seed(12);
    let images: Vec<String> = ["old", "mid", "new"]
        .iter()
        .map(|name| {
            let mut content = vec![0u8; 1 << 20];
            rng.fill(&mut content);
            registry.push_bytes(&format!("shop/{name}"), "1", &content)
        })
        .collect();
    let engine = engine(&containerd, fast_retry(3));
    let keyring = Arc::new(Keyring::new());
    engine.set_wanted(images.iter().map(|i| (reference(i), keyring.clone())));
    let runner = tokio::spawn(engine.clone().run());
    for image in &images {
        wait_for(&engine, image, "available", |r| {
            r.state == ImageState::Available
        })
        .await;
    }
    let cri = Cri::new(&containerd.address()).unwrap();
    let deadline = Instant::now() + WAIT;
    let mut used = cri.image_fs_used_bytes().await.unwrap();
    while used < 3 << 20 {
        assert!(
            Instant::now() < deadline,
            "containerd never measured its image filesystem ({used} bytes)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        used = cri.image_fs_used_bytes().await.unwrap();
    }
    // Unwanted one after the other: `old` first.
    for image in &images {
        let rest: Vec<_> = images
            .iter()
            .skip_while(|i| *i != image)
            .skip(1)
            .map(|i| (reference(i), keyring.clone()))
            .collect();
        engine.set_wanted(rest);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let watermark = |high: u64, low: u64| RetentionPolicy {
        grace: Some(Duration::from_secs(3600)),
        high_watermark: Some(high),
        low_watermark: Some(low),
    };
    // Under the high watermark: nothing goes within the grace period.
    engine
        .retain(&watermark(used + (1 << 20), used - (3 << 19)))
        .await
        .unwrap();
    for image in &images {
        assert!(runtime_has(&containerd, image).await, "{image}");
    }
    // Over it, with the low watermark about 1.5 MiB lower: the two least recently wanted go.
    engine
        .retain(&watermark(used - 1, used - (3 << 19)))
        .await
        .unwrap();
    assert!(!runtime_has(&containerd, &images[0]).await, "old stays");
    assert!(!runtime_has(&containerd, &images[1]).await, "mid stays");
    assert!(runtime_has(&containerd, &images[2]).await, "new went");
    assert_eq!(
        metric(
            &engine,
            "coral_agent_removed_images_total{reason=\"watermark\"}"
        ),
        2.0
    );
    let status = node_image_status(&engine.snapshot(), None, None, None);
    let removed: Vec<(&str, &str)> = status
        .removals
        .iter()
        .map(|r| (r.image.as_str(), r.reason.as_str()))
        .collect();
    let name = |i: usize| reference(&images[i]).to_string();
    assert_eq!(
        removed,
        [
            (name(1).as_str(), "watermark"),
            (name(0).as_str(), "watermark")
        ],
        "newest first"
    );
    runner.abort();
}

#[test]
fn prefetch_stops_at_the_image_filesystem_budget() {
    let containerd = Containerd::start();
    let registry = Registry::start(None);
    let first = registry.push("shop/first", "1", "first");
    let second = registry.push("shop/second", "1", "second");
    let (ok, output) = prefetch(&containerd, &image_sets(&[("one", "{}", &[&first])]), &[]);
    assert!(ok, "{output}");
    // The runtime now uses more than one byte (as soon as it has measured its snapshots): a
    // budget of one byte pauses every new pull.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cri = runtime.block_on(async { Cri::new(&containerd.address()).unwrap() });
    let deadline = Instant::now() + WAIT;
    while runtime.block_on(cri.image_fs_used_bytes()).unwrap() <= 1 {
        assert!(
            Instant::now() < deadline,
            "containerd never measured its image filesystem"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let sets = image_sets(&[("two", "{}", &[&first, &second])]);
    let (ok, output) = prefetch(&containerd, &sets, &["--image-fs-budget", "1"]);
    assert!(!ok, "{output}");
    assert!(output.contains(&format!("present    {first}")), "{output}");
    assert!(
        output.contains(&format!(
            "paused     {second}: the image filesystem is over its budget"
        )),
        "{output}"
    );
    assert!(output.contains("1 of 2 image(s) available"), "{output}");
    let (ok, output) = prefetch(&containerd, &sets, &["--image-fs-budget", "10Gi"]);
    assert!(ok, "{output}");
}

/// `GET path` on the probe port; returns the status code and body.
fn probe(address: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: probe\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The real `coral agent` binary: probes answer at once; readiness waits for the runtime and
/// then for the cluster; the runtime coming back is noticed.
#[test]
fn agent_binary_reports_readiness_through_its_probes() {
    use std::io::{BufRead, BufReader};
    let mut containerd = Containerd::start();
    containerd.stop();
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let server = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    std::fs::write(
        dir.path().join("kubeconfig"),
        api_server::kubeconfig_for(&server),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_coral"))
        .args([
            "agent",
            "--node-name",
            "node-a",
            "--probe-listen",
            "127.0.0.1:0",
        ])
        .args(["--cri-socket", &containerd.address()])
        .env("KUBECONFIG", dir.path().join("kubeconfig"))
        .env("KUBERNETES_SERVICE_HOST", "")
        .env("CORAL_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _child = Kill(child);
    let mut lines = BufReader::new(stderr).lines();
    let address = loop {
        let line = lines
            .next()
            .expect("the agent logs its probe address")
            .unwrap();
        if line.contains("probe server listening") {
            break line.rsplit("address=").next().unwrap().trim().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});

    assert_eq!(probe(&address, "/healthz"), (200, "ok".to_string()));
    assert_eq!(
        probe(&address, "/readyz"),
        (
            503,
            "not ready: the container runtime does not answer".to_string()
        )
    );
    let unavailable = "coral_agent_cri_errors_total{code=\"unavailable\",operation=\"Version\"}";
    let deadline = Instant::now() + WAIT;
    while !probe(&address, "/metrics").1.contains(unavailable) {
        assert!(Instant::now() < deadline, "no failed Version call counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    containerd.resume();
    loop {
        let (status, body) = probe(&address, "/readyz");
        if body == "not ready: ImageSets and the node not listed yet" {
            assert_eq!(status, 503);
            break;
        }
        assert!(Instant::now() < deadline, "runtime never noticed: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, metrics) = probe(&address, "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("coral_agent_paused 0"), "{metrics}");
}

/// The real `coral agent` against a scripted API server, real containerd and a private
/// registry: it pulls what the ImageSets selecting its node want, with the credentials of the
/// pull-secret copy in Coral's namespace, then labels its node and records its NodeImage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_binary_pulls_what_image_sets_want_and_labels_its_node() {
    use std::collections::BTreeMap;

    use api_server::{ApiServer, list};
    use coral::controller::secrets::copy_name;
    use coral::image::label_key;
    use serde_json::json;

    let containerd = Containerd::start();
    let registry = Registry::start(Some(("coral", "s3cret")));
    let app = registry.push("shop/app", "1.0", "app");
    let worker = registry.push("shop/worker", "1.0", "worker");
    let batch = registry.push("batch/job", "1", "job");
    let image_set = |name: &str, pool: &str, images: &[&String]| {
        json!({
            "apiVersion": "coral.dev/v1alpha1", "kind": "ImageSet",
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": "1"},
            "spec": {"images": images, "nodeSelector": {"matchLabels": {"pool": pool}},
                     "imagePullSecrets": [{"name": "registry"}]},
        })
    };
    let stale = label_key(&reference("busybox:1"));
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "uid": "uid-a", "resourceVersion": "1",
                     "labels": {"pool": "web", stale.clone(): "available"}},
    });
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": copy_name("shop", "registry"), "namespace": "coral-system"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(
            docker_config(&registry.host(), "coral", "s3cret"))},
    });
    let node_image = json!({
        "apiVersion": "coral.dev/v1alpha1", "kind": "NodeImage",
        "metadata": {"name": "node-a", "resourceVersion": "2"}, "spec": {"nodeName": "node-a"},
    });
    let server = ApiServer::start(
        BTreeMap::from([
            (
                "/apis/coral.dev/v1alpha1/imagesets".to_string(),
                list(
                    "coral.dev/v1alpha1",
                    "ImageSetList",
                    vec![
                        image_set("web", "web", &[&app, &worker]),
                        image_set("batch", "batch", &[&batch]),
                    ],
                ),
            ),
            (
                "/api/v1/nodes".to_string(),
                list("v1", "NodeList", vec![node.clone()]),
            ),
        ]),
        BTreeMap::from([(
            format!(
                "/api/v1/namespaces/coral-system/secrets/{}",
                copy_name("shop", "registry")
            ),
            secret,
        )]),
        BTreeMap::from([
            ("/api/v1/nodes/node-a".to_string(), node),
            (
                "/apis/coral.dev/v1alpha1/nodeimages/node-a".to_string(),
                node_image,
            ),
        ]),
    )
    .await;
    let child = server
        .coral()
        .args([
            "agent",
            "--node-name",
            "node-a",
            "--probe-listen",
            "127.0.0.1:0",
        ])
        .args(["--cri-socket", &containerd.address(), "--debounce", "50ms"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _child = Kill(child);

    let (app_key, worker_key) = (label_key(&reference(&app)), label_key(&reference(&worker)));
    let deadline = Instant::now() + WAIT;
    let mut labels = serde_json::Map::new();
    let status = loop {
        let writes = server.writes();
        labels.clear();
        for write in writes
            .iter()
            .filter(|w| w.uri.starts_with("/api/v1/nodes/node-a"))
        {
            assert_eq!(write.method, "PATCH");
            assert_eq!(write.content_type, "application/merge-patch+json");
            labels.extend(
                write.body["metadata"]["labels"]
                    .as_object()
                    .unwrap()
                    .clone(),
            );
        }
        let status = writes
            .iter()
            .rev()
            .find(|w| {
                w.uri
                    .starts_with("/apis/coral.dev/v1alpha1/nodeimages/node-a/status")
            })
            .map(|w| w.body["status"].clone());
        if let Some(status) = status.filter(|s| s["available"] == 2) {
            if labels.get(&app_key) == Some(&json!("available"))
                && labels.get(&worker_key) == Some(&json!("available"))
            {
                break status;
            }
        }
        assert!(Instant::now() < deadline, "never recorded: {writes:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        labels.get(&stale),
        Some(&serde_json::Value::Null),
        "the stale label goes"
    );
    assert_eq!(labels.len(), 3, "{labels:?}");
    let images: Vec<&str> = status["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["state"].as_str().unwrap())
        .collect();
    assert_eq!(images, ["available", "available"]);
    let created = server
        .writes()
        .into_iter()
        .find(|w| w.method == "POST")
        .expect("the NodeImage is created");
    assert_eq!(
        created.body["metadata"]["ownerReferences"][0]["uid"],
        "uid-a"
    );
    assert!(runtime_has(&containerd, &app).await);
    assert!(runtime_has(&containerd, &worker).await);
    assert!(!runtime_has(&containerd, &batch).await, "not selected");
}

#[tokio::test]
async fn engine_pulls_a_mirrored_image_through_the_mirror_first() {
    let containerd = Containerd::start();
    let source = Registry::start(None);
    let mirror = Registry::start(None);
    let app = source.push("shop/app", "1.0", "through the mirror");
    let copy = mirror.copy(&app, "copies/shop/app", "1.0");
    let engine = engine(&containerd, fast_retry(3));
    engine.set_mirrors(HashMap::from([(reference(&app), reference(&copy))]));
    engine.set_wanted([(reference(&app), Arc::new(Keyring::new()))]);
    let runner = tokio::spawn(engine.clone().run());
    wait_for(&engine, &app, "available", |r| {
        r.state == ImageState::Available
    })
    .await;
    assert!(
        runtime_has(&containerd, &copy).await,
        "the mirror's copy is on the node"
    );
    assert!(
        runtime_has(&containerd, &app).await,
        "and the source reference too"
    );
    assert_eq!(
        metric(
            &engine,
            "coral_agent_mirror_pulls_total{result=\"success\"}"
        ),
        1.0
    );
    runner.abort();
}

#[tokio::test]
async fn an_unwanted_image_a_container_uses_stays_until_the_container_goes() {
    use k8s_cri::v1::{
        ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec,
        LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption,
        PodSandboxConfig, PodSandboxMetadata, RemoveContainerRequest, RemovePodSandboxRequest,
        RunPodSandboxRequest, StopPodSandboxRequest,
    };
    let registry = Registry::start(None);
    let pause = registry.push_pause("system/pause", "1");
    let containerd = Containerd::start_with_sandbox(Some(&pause));
    let app = registry.push("shop/app", "1", "app");
    let engine = engine(&containerd, fast_retry(3));
    let keyring = Arc::new(Keyring::new());
    engine.set_wanted([(reference(&app), keyring.clone())]);
    let runner = tokio::spawn(engine.clone().run());
    wait_for(&engine, &app, "available", |r| {
        r.state == ImageState::Available
    })
    .await;

    // A pod on the node's host network (no CNI here) with a container of the image.
    let mut runtime = Cri::new(&containerd.address()).unwrap().runtime_service();
    let sandbox_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "web".into(),
            uid: "uid-web".into(),
            namespace: "shop".into(),
            attempt: 0,
        }),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Node as i32,
                    ipc: NamespaceMode::Node as i32,
                    ..NamespaceOption::default()
                }),
                ..LinuxSandboxSecurityContext::default()
            }),
            ..LinuxPodSandboxConfig::default()
        }),
        log_directory: containerd.dir.path().join("logs").display().to_string(),
        ..PodSandboxConfig::default()
    };
    let sandbox = runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("the pod sandbox runs")
        .into_inner()
        .pod_sandbox_id;
    let container = runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: sandbox.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "app".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: app.clone(),
                    ..ImageSpec::default()
                }),
                command: vec!["/data/content".into()],
                log_path: "app.log".into(),
                ..ContainerConfig::default()
            }),
            sandbox_config: Some(sandbox_config),
        })
        .await
        .expect("the container is created")
        .into_inner()
        .container_id;

    // Unwanted and past its grace period, but in use: it stays, and the NodeImage says why.
    let now = RetentionPolicy {
        grace: Some(Duration::ZERO),
        high_watermark: None,
        low_watermark: None,
    };
    engine.set_wanted([]);
    let kept = engine.retain(&now).await.unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(matches!(kept[0].1, Kept::InUse(_)), "{kept:?}");
    assert!(runtime_has(&containerd, &app).await);
    let status = node_image_status(&engine.snapshot(), None, None, None);
    assert!(
        status.unwanted[0]
            .kept
            .as_deref()
            .is_some_and(|k| k.contains("a container uses it")),
        "{status:?}"
    );

    // The container goes: so does the image.
    runtime
        .remove_container(RemoveContainerRequest {
            container_id: container,
        })
        .await
        .unwrap();
    assert!(engine.retain(&now).await.unwrap().is_empty());
    assert!(!runtime_has(&containerd, &app).await);
    let status = node_image_status(&engine.snapshot(), None, None, None);
    assert!(status.unwanted.is_empty());
    assert_eq!(status.removals[0].reason, "grace");
    runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: sandbox.clone(),
        })
        .await
        .unwrap();
    runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: sandbox,
        })
        .await
        .unwrap();
    runner.abort();
}

#[tokio::test]
async fn spec_refresh_pulls_a_moved_tag_again_and_nothing_when_it_has_not_moved() {
    let containerd = Containerd::start();
    let registry = Registry::start(None);
    let app = registry.push("shop/app", "1", "first");
    let engine = engine(&containerd, fast_retry(3));
    engine.set_wanted([(reference(&app), Arc::new(Keyring::new()))]);
    engine.set_refresh(HashMap::from([(
        reference(&app),
        Duration::from_millis(300),
    )]));
    let runner = tokio::spawn(engine.clone().run());
    wait_for(&engine, &app, "available", |r| {
        r.state == ImageState::Available
    })
    .await;
    let first = engine
        .snapshot()
        .get(&reference(&app))
        .unwrap()
        .held
        .clone()
        .unwrap();

    // Refreshed a few times with the tag where it was: the same image, no pull counted.
    let deadline = Instant::now() + WAIT;
    while metric(&engine, "coral_agent_refreshes_total{result=\"unchanged\"}") < 2.0 {
        assert!(Instant::now() < deadline, "never refreshed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let record = engine.snapshot().get(&reference(&app)).unwrap().clone();
    assert_eq!(record.pulls, 1);
    assert_eq!(record.held.as_ref(), Some(&first));
    assert_eq!(
        metric(&engine, "coral_agent_refreshes_total{result=\"moved\"}"),
        0.0
    );

    // The tag moves in the registry: the next refresh pulls the new content.
    registry.push("shop/app", "1", "second");
    let moved = registry.manifest_digest(&app);
    assert_ne!(first.digest.as_deref(), Some(moved.as_str()));
    wait_for(&engine, &app, "pulled the moved tag", |r| {
        r.held.as_ref().and_then(|h| h.digest.as_deref()) == Some(moved.as_str())
    })
    .await;
    assert_eq!(
        metric(&engine, "coral_agent_refreshes_total{result=\"moved\"}"),
        1.0
    );
    assert_eq!(engine.snapshot().get(&reference(&app)).unwrap().pulls, 2);
    let status = node_image_status(&engine.snapshot(), None, None, None);
    assert_eq!(status.images[0].digest.as_deref(), Some(moved.as_str()));

    // The registry goes away: refreshes fail, and the node keeps what it holds.
    drop(registry);
    let deadline = Instant::now() + WAIT;
    while metric(&engine, "coral_agent_refreshes_total{result=\"failed\"}") < 1.0 {
        assert!(Instant::now() < deadline, "a refresh never failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let record = engine.snapshot().get(&reference(&app)).unwrap().clone();
    assert_eq!(record.state, ImageState::Available);
    assert_eq!(record.held.and_then(|h| h.digest), Some(moved));
    runner.abort();
}

/// The labels containerd's own CLI shows for an image of the CRI's namespace.
fn containerd_labels(containerd: &Containerd, image: &str) -> String {
    let output = Command::new("ctr")
        .args(["--address", &containerd.socket().display().to_string()])
        .args(["--namespace", "k8s.io", "images", "ls"])
        .output()
        .expect("ctr runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|line| line.split_whitespace().next() == Some(image))
        .map(|line| {
            line.split_whitespace()
                .last()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default()
}

/// Whether the CRI reports the image pinned.
async fn cri_pinned(containerd: &Containerd, image: &str) -> bool {
    let cri = Cri::new(&containerd.address()).unwrap();
    k8s_cri::v1::image_service_client::ImageServiceClient::new(cri.channel())
        .image_status(k8s_cri::v1::ImageStatusRequest {
            image: Some(k8s_cri::v1::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .is_some_and(|i| i.pinned)
}

#[tokio::test]
async fn wanted_images_are_pinned_on_containerd_and_unwanted_ones_released() {
    let containerd = Containerd::start();
    let registry = Registry::start(None);
    let app = registry.push("shop/app", "1", "app");
    let other = registry.push("shop/other", "1", "other");
    let engine = Engine::new(
        Cri::new(&containerd.address()).unwrap(),
        EngineOptions {
            max_concurrent_pulls: 2,
            retry: fast_retry(3),
            resync: Duration::from_millis(200),
            image_fs_budget: None,
            pin_images: true,
        },
        AgentMetrics::new(),
    );
    let keyring = Arc::new(Keyring::new());
    engine.set_wanted([
        (reference(&app), keyring.clone()),
        (reference(&other), keyring.clone()),
    ]);
    let runner = tokio::spawn(engine.clone().run());
    let pinned = "io.cri-containerd.pinned=pinned";
    let deadline = Instant::now() + WAIT;
    while !(containerd_labels(&containerd, &app).contains(pinned)
        && containerd_labels(&containerd, &other).contains(pinned))
    {
        assert!(Instant::now() < deadline, "never pinned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&engine, "coral_agent_pinned_images"), 2.0);
    // What this containerd makes of the label (1.7 and later report it to the kubelet).
    let reported = cri_pinned(&containerd, &app).await;
    println!("containerd reports the labelled image pinned over the CRI: {reported}");

    // `other` is no longer wanted: it loses the label, `app` keeps it.
    engine.set_wanted([(reference(&app), keyring.clone())]);
    let deadline = Instant::now() + WAIT;
    while containerd_labels(&containerd, &other).contains(pinned) {
        assert!(Instant::now() < deadline, "never released");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(containerd_labels(&containerd, &app).contains(pinned));
    assert_eq!(metric(&engine, "coral_agent_pinned_images"), 1.0);

    // Removed behind the engine's back and pulled again: pinned again.
    Cri::new(&containerd.address())
        .unwrap()
        .remove(&app)
        .await
        .unwrap();
    wait_for(&engine, &app, "pulled again", |r| r.pulls == 2).await;
    let deadline = Instant::now() + WAIT;
    while !containerd_labels(&containerd, &app).contains(pinned) {
        assert!(Instant::now() < deadline, "never pinned again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    runner.abort();
}
