//! `coral mirror` against real registries (the `docker-registry` OCI registry, the source with
//! htpasswd auth, the mirror with and without), with images built by umoci and a multi-platform
//! image index pushed by `skopeo copy --all`; then a real containerd pulls the mirror
//! reference through `coral prefetch` with the source stopped.
#![allow(clippy::expect_used, clippy::unwrap_used)] // test helpers panic on setup failures

#[path = "support/runtime.rs"]
#[allow(dead_code)]
mod runtime;

use std::path::Path;
use std::process::Command;

use runtime::{Containerd, Registry, docker_config};

const USER: &str = "coral";
const PASSWORD: &str = "s3cret";

fn image_set(images: &[String]) -> String {
    format!(
        "apiVersion: coral.dev/v1alpha1\nkind: ImageSet\nmetadata: {{name: mirrored, namespace: default}}\nspec:\n  images: {images:?}\n"
    )
}

/// Runs `coral mirror` on an ImageSet of `images`: whether it succeeded, and what it printed.
fn mirror(dir: &Path, images: &[String], to: &str, extra: &[&str]) -> (bool, String) {
    let file = dir.join("set.yaml");
    std::fs::write(&file, image_set(images)).unwrap();
    let mut args = vec!["mirror", "-f", file.to_str().unwrap(), "--to", to];
    args.extend(extra);
    runtime::coral(&args)
}

/// A Docker config with a credential for each `(host, user, password)`.
fn credentials(dir: &Path, entries: &[(&str, &str, &str)]) -> String {
    let mut auths = serde_json::Map::new();
    for (host, user, password) in entries {
        let config: serde_json::Value =
            serde_json::from_str(&docker_config(host, user, password)).unwrap();
        auths.insert(host.to_string(), config["auths"][*host].clone());
    }
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::json!({"auths": auths}).to_string()).unwrap();
    path.display().to_string()
}

/// The mirror reference of a source reference on a loopback registry, by the mapping rule.
fn mirrored(mirror: &Registry, source: &str) -> String {
    let (host, rest) = source.split_once('/').unwrap();
    format!("{}/{}/{rest}", mirror.host(), host.replace(':', "_"))
}

#[test]
fn every_platform_is_copied_with_its_digests_and_a_second_run_transfers_nothing() {
    let source = Registry::start(Some((USER, PASSWORD)));
    let target = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let app = source.push("team/app", "1.0", "app one");
    let multi = source.push_index(
        "team/multi",
        "2.0",
        &[
            ("linux", "amd64", "multi amd64"),
            ("linux", "arm64", "multi arm64"),
        ],
    );
    let app_digest = source.manifest_digest(&app);
    let pinned = format!("{}/team/app@{app_digest}", source.host());
    let config = credentials(dir.path(), &[(&source.host(), USER, PASSWORD)]);
    let images = vec![app.clone(), multi.clone(), pinned.clone()];

    let (ok, text) = mirror(
        dir.path(),
        &images,
        &target.host(),
        &["--docker-config", &config],
    );
    assert!(ok, "{text}");
    eprintln!("{text}");
    assert!(text.contains("3 of 3 image(s) mirrored"), "{text}");
    assert!(
        text.contains(&format!(
            "mirrored   {multi} as {}",
            mirrored(&target, &multi)
        )),
        "{text}"
    );
    // Every digest is the source's: the index, each platform's manifest, the pinned one.
    assert_eq!(
        target.manifest_digest(&mirrored(&target, &multi)),
        source.manifest_digest(&multi),
        "the index keeps its digest"
    );
    assert_eq!(target.manifest_digest(&mirrored(&target, &app)), app_digest);
    assert_eq!(
        target.manifest_digest(&mirrored(&target, &pinned)),
        app_digest,
        "a digest reference works in the mirror"
    );
    let index: serde_json::Value =
        serde_json::from_slice(&target.manifest(&mirrored(&target, &multi))).unwrap();
    for platform in ["linux/amd64", "linux/arm64"] {
        let (_, arch) = platform.split_once('/').unwrap();

        let child = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["platform"]["architecture"] == arch)
            .unwrap()["digest"]
            .as_str()
            .unwrap()
            .to_string();
        let by_digest = format!(
            "{}@{child}",
            mirrored(&target, &multi).rsplit_once(':').unwrap().0
        );
        assert_eq!(target.manifest_digest(&by_digest), child, "{platform}");
    }

    let (ok, text) = mirror(
        dir.path(),
        &images,
        &target.host(),
        &["--docker-config", &config],
    );
    assert!(ok, "{text}");
    assert_eq!(
        text.matches("present    ").count(),
        3,
        "nothing transferred: {text}"
    );
    assert!(!text.contains("mirrored   "), "{text}");
}

#[test]
fn a_moved_tag_is_copied_again_and_platforms_can_be_chosen() {
    let source = Registry::start(None);
    let target = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let app = source.push("app", "1.0", "first");
    let (ok, text) = mirror(dir.path(), std::slice::from_ref(&app), &target.host(), &[]);
    assert!(ok, "{text}");
    let first = target.manifest_digest(&mirrored(&target, &app));

    source.push("app", "1.0", "second");
    let (ok, text) = mirror(dir.path(), std::slice::from_ref(&app), &target.host(), &[]);
    assert!(ok, "{text}");
    assert!(
        text.contains("mirrored   "),
        "the moved tag is copied again: {text}"
    );
    let second = target.manifest_digest(&mirrored(&target, &app));
    assert_ne!(first, second);
    assert_eq!(second, source.manifest_digest(&app));

    let multi = source.push_index(
        "multi",
        "1",
        &[("linux", "amd64", "a"), ("linux", "arm64", "b")],
    );
    let prefix = format!("{}/only-arm", target.host());
    let (ok, text) = mirror(
        dir.path(),
        std::slice::from_ref(&multi),
        &prefix,
        &["--platform", "linux/arm64"],
    );
    assert!(ok, "{text}");
    let mirror_reference = format!(
        "{prefix}/{}",
        multi.replace(&source.host(), &source.host().replace(':', "_"))
    );
    let index: serde_json::Value =
        serde_json::from_slice(&target.manifest(&mirror_reference)).unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1, "{index}");
    assert_eq!(index["manifests"][0]["platform"]["architecture"], "arm64");
    assert!(
        text.contains("(source sha256:"),
        "a new index, both digests shown: {text}"
    );

    let (ok, text) = mirror(
        dir.path(),
        std::slice::from_ref(&multi),
        &target.host(),
        &["--platform", "linux/s390x"],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("the image index has no manifest for linux/s390x"),
        "{text}"
    );
    assert!(text.contains("0 of 1 image(s) mirrored"), "{text}");
}

#[test]
fn failures_name_the_side_that_failed_and_exit_non_zero() {
    let mut source = Registry::start(None);
    let target = Registry::start(Some((USER, PASSWORD)));
    let dir = tempfile::tempdir().unwrap();
    let app = source.push("app", "1.0", "content");
    let missing = format!("{}/app:9.9", source.host());

    // The mirror refuses a wrong password.
    let config = credentials(dir.path(), &[(&target.host(), USER, "wrong")]);
    let (ok, text) = mirror(
        dir.path(),
        std::slice::from_ref(&app),
        &target.host(),
        &["--docker-config", &config],
    );
    assert!(!ok, "{text}");
    assert!(text.contains("failed     "), "{text}");
    assert!(
        text.contains(&mirrored(&target, &app)),
        "names the mirror reference: {text}"
    );

    // With the right one, a missing tag fails alone; the other image is mirrored.
    let config = credentials(dir.path(), &[(&target.host(), USER, PASSWORD)]);
    let (ok, text) = mirror(
        dir.path(),
        &[app.clone(), missing.clone()],
        &target.host(),
        &["--docker-config", &config],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!(
            "failed     {missing}: reading the manifest of {missing}"
        )),
        "{text}"
    );
    assert!(text.contains("1 of 2 image(s) mirrored"), "{text}");

    // The source down: named, and nothing crashes.
    source.stop();
    let (ok, text) = mirror(
        dir.path(),
        std::slice::from_ref(&app),
        &target.host(),
        &["--docker-config", &config],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!("failed     {app}: reading the manifest of {app}")),
        "{text}"
    );
}

/// Pushes an image of `content` to `source`, mirrors it into `target` with `coral mirror`
/// (with the credentials of whichever side wants them), stops the source; the source
/// reference.
fn mirror_one_then_stop_the_source(
    source: &mut Registry,
    target: &Registry,
    content: &str,
) -> String {
    let dir = tempfile::tempdir().unwrap();
    let app = source.push("team/app", "1.0", content);
    let entries: Vec<(String, &str, &str)> = [&*source, target]
        .iter()
        .filter(|r| r.credentials.is_some())
        .map(|r| (r.host(), USER, PASSWORD))
        .collect();
    let entries: Vec<(&str, &str, &str)> = entries
        .iter()
        .map(|(h, u, p)| (h.as_str(), *u, *p))
        .collect();
    let config = credentials(dir.path(), &entries);
    let (ok, text) = mirror(
        dir.path(),
        std::slice::from_ref(&app),
        &target.host(),
        &["--docker-config", &config],
    );
    assert!(ok, "{text}");
    source.stop();
    app
}

#[test]
fn containerd_pulls_the_mirror_reference_with_the_source_stopped() {
    let mut source = Registry::start(Some((USER, PASSWORD)));
    let target = Registry::start(None);
    let app = mirror_one_then_stop_the_source(&mut source, &target, "served from the mirror");

    let containerd = Containerd::start();
    let (ok, text) = containerd.prefetch(&[mirrored(&target, &app)], &[]);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("pulled     {}", mirrored(&target, &app))),
        "{text}"
    );
}

#[test]
fn a_blob_corrupted_on_the_way_is_caught_by_its_digest_and_never_lands() {
    let source = Registry::start(None);
    let target = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let app = source.push("app", "1.0", "intact");
    let manifest: serde_json::Value = serde_json::from_slice(&source.manifest(&app)).unwrap();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let path = source.blob_path(&layer);
    let intact = std::fs::read(&path).unwrap();
    let mut corrupted = intact.clone();
    let last = corrupted.len() - 1;
    corrupted[last] ^= 0xff;
    std::fs::write(&path, &corrupted).unwrap();

    let (ok, text) = mirror(
        dir.path(),
        std::slice::from_ref(&app),
        &target.host(),
        &["--attempts", "1"],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!(
            "failed     {app}: reading a blob of {app} ({layer}): "
        )),
        "the source's bytes are blamed: {text}"
    );
    assert!(text.contains("the source served "), "{text}");
    assert!(
        text.contains(&format!(
            "for a blob of {} bytes with digest {layer}",
            intact.len()
        )),
        "{text}"
    );
    let blob = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}", mirrored(&target, &app)))
        .output()
        .unwrap();
    assert!(!blob.status.success(), "nothing of it is in the mirror");
    assert!(
        !target.blob_path(&layer).exists(),
        "the corrupted layer never lands"
    );

    std::fs::write(&path, &intact).unwrap();
    let (ok, text) = mirror(dir.path(), std::slice::from_ref(&app), &target.host(), &[]);
    assert!(ok, "{text}");
    assert_eq!(
        target.manifest_digest(&mirrored(&target, &app)),
        source.manifest_digest(&app)
    );
}

#[test]
fn a_mirror_that_comes_back_is_retried_with_backoff() {
    let source = Registry::start(None);
    let mut target = Registry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let app = source.push("app", "1.0", "retried");
    let host = target.host();
    let expected = mirrored(&target, &app);
    target.stop();
    let (ok, text) = std::thread::scope(|scope| {
        scope.spawn(|| {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            target.resume();
        });
        mirror(
            dir.path(),
            std::slice::from_ref(&app),
            &host,
            &["--attempts", "5"],
        )
    });
    assert!(ok, "{text}");
    assert!(text.contains(&format!("retrying   {app} in ")), "{text}");
    assert!(
        text.contains("writing to the mirror"),
        "the failed attempt names the mirror: {text}"
    );
    assert!(
        text.contains(&format!("mirrored   {app} as {expected}")),
        "{text}"
    );
}

#[test]
fn a_runtime_given_credentials_for_the_mirror_pulls_from_it_without_the_pods_help() {
    // The managed registry wants credentials for every read: a node's containerd holds them
    // (an Authorization header in its hosts.toml), as the README tells, and the kubelet passes
    // none.
    let mut source = Registry::start(None);
    let target = Registry::start(Some((USER, PASSWORD)));
    let app =
        mirror_one_then_stop_the_source(&mut source, &target, "read with the node's credentials");

    let containerd = Containerd::start();
    let prefetch = || containerd.prefetch(&[mirrored(&target, &app)], &["--max-attempts", "1"]);
    let (ok, text) = prefetch();
    assert!(
        !ok,
        "the mirror refuses a runtime without credentials: {text}"
    );

    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let host = target.host();
    let hosts = containerd.dir.path().join("certs.d").join(&host);
    std::fs::create_dir_all(&hosts).unwrap();
    std::fs::write(
        hosts.join("hosts.toml"),
        format!(
            "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  [host.\"http://{host}\".header]\n    authorization = \"Basic {token}\"\n"
        ),
    )
    .unwrap();
    let (ok, text) = prefetch();
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("pulled     {}", mirrored(&target, &app))),
        "{text}"
    );
}
